"""Checkpoints of an unfinished compress run, and the key that says which run a folder holds.

After every finished block: the blocks so far and both calibration streams. Nothing else is
needed to continue: each block draws from its own seeded generator and starts a fresh optimiser.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .artifact import (FORMAT_VERSION, MANIFEST, ArtifactError, BlockState, blocks_from_tensors, blocks_to_tensors,
                       windows_sha256)
from .config import EPTSConfig
from .io import save_tensors_atomic, write_json_atomic


def run_key(config: EPTSConfig, base_fingerprint: str, windows: torch.Tensor) -> str:
    """What makes two compress runs the same run: config, base weights and calibration windows.
    Where the streams live (`stream_memory_mb`) is no part of it: a run may resume under another budget."""
    fields = {k: v for k, v in config.to_dict().items() if k != "stream_memory_mb"}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    digest.update(base_fingerprint.encode())
    digest.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_settings(config: EPTSConfig, base_fingerprint: str, windows: torch.Tensor) -> dict:
    """What `run_key` covers, readable: recorded in a checkpoint so a refusal can name what differs."""
    fields = {k: v for k, v in config.to_dict().items() if k != "stream_memory_mb"}
    return json.loads(json.dumps({"config": fields, "base_fingerprint": base_fingerprint,
                                  "windows_sha256": windows_sha256(windows)}))


def _differences(old: dict, new: dict) -> str:
    """`old` and `new` run settings (`run_settings`) compared: the settings that differ, with both values."""
    flat_old, flat_new, differ = _config_differences(old, new)
    found = [f"{name}: {flat_old.get(name)} in the checkpoint, {flat_new.get(name)} now" for name in differ]
    if old.get("base_fingerprint") != new["base_fingerprint"]:
        found.append("the base model's weights (fingerprint)")
    if old.get("windows_sha256") != new["windows_sha256"]:
        found.append("the calibration windows (text, --nsamples, --seqlen or --seed)")
    return "; ".join(found)


def _only_added_at_default(old: dict, new: dict) -> bool:
    """Whether `new` run settings differ from a checkpoint's `old` ones only in config fields that the
    checkpoint's epts did not have, each at its default: a newer epts whose new field, at its default,
    runs as the older one did, so the finished blocks hold."""
    if old.get("base_fingerprint") != new["base_fingerprint"] or old.get("windows_sha256") != new["windows_sha256"]:
        return False
    flat_old, flat_new, differ = _config_differences(old, new)
    defaults = _flatten(json.loads(json.dumps(EPTSConfig().to_dict())))
    return bool(differ) and all(name not in flat_old and name in defaults and flat_new[name] == defaults[name]
                                for name in differ)


def _config_differences(old: dict, new: dict) -> tuple[dict, dict, list[str]]:
    """Both run settings' configs flattened ("calib.seed"), and the names whose values differ, sorted."""
    flat_old, flat_new = _flatten(old.get("config", {})), _flatten(new["config"])
    return flat_old, flat_new, [name for name in sorted(set(flat_old) | set(flat_new))
                                if flat_old.get(name) != flat_new.get(name)]


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat


CHECKPOINT = "checkpoint.json"


def save_checkpoint(folder: Path, run_key: str, blocks: list[BlockState], dense: torch.Tensor,
                    elastic: torch.Tensor, settings: dict | None = None) -> None:
    """Write the checkpoint after `len(blocks)` finished blocks; only the latest one is kept.
    `settings` (`run_settings`) is recorded so that another command's refusal can say what differs."""
    name = f"checkpoint-{len(blocks):05d}.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    adapters, norms = blocks_to_tensors(blocks)
    tensors = {"stream.dense": dense, "stream.elastic": elastic}
    tensors.update({f"adapter.{k}": v for k, v in adapters.items()})
    tensors.update({f"norm.{k}": v for k, v in norms.items()})
    save_tensors_atomic(tensors, folder / name)
    write_json_atomic(folder / CHECKPOINT, {
        "format_version": FORMAT_VERSION,
        "run_key": run_key,
        "settings": settings,
        "next_block": len(blocks),
        "tensors": name,
        "layers": list(blocks[0].adapters),
        "blocks": [s.info() for s in blocks],
    })
    for old in folder.glob("checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink()


def load_checkpoint(folder: Path, run_key: str, num_groups: int, settings: dict | None = None
                    ) -> tuple[list[BlockState], torch.Tensor, torch.Tensor] | None:
    """The finished blocks and both streams of an unfinished run of the same command, or None. A run
    checkpointed by an epts that lacked some config fields counts as the same where those fields are
    at their defaults now. Raises ArtifactError for another command's run, naming the settings that
    differ from `settings`."""
    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("run_key") != run_key and not (meta.get("settings") and settings
                                               and _only_added_at_default(meta["settings"], settings)):
        differ = _differences(meta["settings"], settings) if meta.get("settings") and settings else ""
        raise ArtifactError(f"{folder} holds an unfinished run of another compress command "
                            f"({differ or 'model, config or calibration differ'}): rerun that command, or pass "
                            f"--overwrite to start over")
    try:
        tensors = load_file(str(folder / meta["tensors"]))
    except Exception as err:  # safetensors raises its own error types for truncated files
        raise ArtifactError(f"checkpoint {folder / meta['tensors']} is damaged ({err}): pass --overwrite to "
                            f"start over") from err
    adapters = {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")}
    norms = {k.removeprefix("norm."): v for k, v in tensors.items() if k.startswith("norm.")}
    blocks = blocks_from_tensors(meta["blocks"], meta["layers"], num_groups, adapters, norms)
    return blocks, tensors["stream.dense"], tensors["stream.elastic"]


def clear_checkpoint(folder: Path) -> None:
    (folder / CHECKPOINT).unlink(missing_ok=True)
    for old in folder.glob("checkpoint-*.safetensors"):
        old.unlink()


def is_unfinished_run(folder: Path) -> bool:
    return (folder / CHECKPOINT).is_file() and not (folder / MANIFEST).is_file()
