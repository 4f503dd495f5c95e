"""The elastic artifact (METHOD.md, ingredient 5): save, load, verify, materialise. Switching a
served model in place is `epts.runtime` (which builds on this module); checkpoints of an
unfinished run are `epts.checkpoint`.

A folder holding
- `manifest.json`: format version, config, groups, base model spec (absolute for a local path),
  fingerprint and dtype, the calibration source and its sha256, library versions, per-block
  group-1 marks, losses and timings, and the sha256 of each tensor file; written last;
- `adapters.safetensors`: every group's A and B (float32) for every prunable linear;
- `importance.safetensors`: the Wanda input-channel norms (scores are |W| times them, so they are
  recomputed from the base weights instead of being stored as full matrices).
The base weights are not copied: they are reloaded from the spec and checked by fingerprint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from . import __version__
from .arch import arch_spec, decoder_blocks, prunable_linears
from .config import EPTSConfig
from .hilora import active_adapters, adapter_scales, effective_weight
from .importance import importance_scores, row_ranks
from .io import save_tensors_atomic, write_json_atomic
from .models import LoadedModel, ModelLoadError, dtype_choice, fingerprint, load_model
from .offload import is_streamed, resident
from .sparse.linear import SparseLinear

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ADAPTERS = "adapters.safetensors"
IMPORTANCE = "importance.safetensors"


class ArtifactError(ValueError):
    pass


@dataclass
class BlockState:
    """What the optimisation learnt for one block."""

    adapters: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]  # layer -> ([A_k], [B_k])
    input_norms: dict[str, torch.Tensor]  # layer -> ||X_j||_2 (Wanda); empty for magnitude
    group1_adapter: bool  # False: the group-1 check dropped the group-1 adapter in this block
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> shared full-rank update (optional)
    losses: list[float] = field(default_factory=list)  # per group, mean over the last epoch
    group1_check: tuple[float, float] = (0.0, 0.0)  # loss with, without the group-1 adapter
    seconds: float = 0.0
    retries: list[dict] = field(default_factory=list)  # numerical-guard events: attempt, lr, reason
    lr: float | None = None  # the Adam learning rate the block trained at (None: not recorded, older artifacts)
    group1_lr: float | None = None  # the same for group 1's adapter

    def info(self) -> dict:
        return {"group1_adapter": self.group1_adapter, "losses": self.losses, "group1_check": list(self.group1_check),
                "seconds": self.seconds, "retries": self.retries, "lr": self.lr,
                "group1_lr": self.group1_lr}


def blocks_to_tensors(blocks: list[BlockState]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Adapters and input norms of every block, as flat safetensors dicts."""
    adapters, norms = {}, {}
    for b, state in enumerate(blocks):
        for name, (a_list, b_list) in state.adapters.items():
            for k, (a, bb) in enumerate(zip(a_list, b_list)):
                adapters[f"{b}.{name}.A.{k}"] = a
                adapters[f"{b}.{name}.B.{k}"] = bb
        for name, delta in state.deltas.items():
            adapters[f"{b}.{name}.delta"] = delta
        for name, norm in state.input_norms.items():
            norms[f"{b}.{name}.input_norm"] = norm
    return adapters, norms


def blocks_from_tensors(infos: list[dict], layers: list[str], num_groups: int, adapters: dict[str, torch.Tensor],
                        norms: dict[str, torch.Tensor]) -> list[BlockState]:
    return [
        BlockState(
            adapters={n: ([adapters[f"{b}.{n}.A.{k}"] for k in range(num_groups)],
                          [adapters[f"{b}.{n}.B.{k}"] for k in range(num_groups)]) for n in layers},
            deltas={n: adapters[f"{b}.{n}.delta"] for n in layers if f"{b}.{n}.delta" in adapters},
            input_norms={n: norms[f"{b}.{n}.input_norm"] for n in layers} if norms else {},
            group1_adapter=info["group1_adapter"],
            losses=info["losses"],
            group1_check=tuple(info["group1_check"]),
            seconds=info["seconds"],
            retries=info.get("retries", []),
            lr=info.get("lr"),
            group1_lr=info.get("group1_lr"),
        )
        for b, info in enumerate(infos)
    ]


def _sha256(path: Path, digest=None) -> str:
    digest = digest or hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def calibration_record(source: str | os.PathLike | torch.Tensor, windows: torch.Tensor) -> dict:
    """What the manifest says about the calibration: its source (an absolute path, a dataset name or
    "tensor"), the sha256 of a source file (of a folder: over its files' names and bytes, in
    order; None for a named dataset or a tensor), and the sha256 of the token windows used."""
    record: dict = {"source": "tensor", "sha256": None}
    if not isinstance(source, torch.Tensor):
        path = Path(source)
        record["source"] = str(path.resolve()) if path.exists() else str(source)
        if path.is_file():
            record["sha256"] = _sha256(path)
        elif path.is_dir():
            digest = hashlib.sha256()
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                digest.update(f"{file.relative_to(path).as_posix()}\0".encode())
                _sha256(file, digest)
            record["sha256"] = digest.hexdigest()
    record["windows_sha256"] = windows_sha256(windows)
    return record


def windows_sha256(windows: torch.Tensor) -> str:
    """sha256 of calibration windows (token ids as int64), as the manifest records it."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


class ElasticModel:
    """A base model plus everything needed to materialise it at any sparsity of the trained range."""

    def __init__(self, base: LoadedModel, config: EPTSConfig, blocks: list[BlockState], base_fingerprint: str,
                 stats: dict | None = None, calibration: dict | None = None):
        self.base = base
        self.config = config
        self.blocks = blocks
        self.base_fingerprint = base_fingerprint
        self.stats = dict(stats or {})
        self.calibration = calibration  # see calibration_record

        self._ranks: dict[tuple[int, str], torch.Tensor] = {}

    # ---- deployment -------------------------------------------------------------------------

    def ranks(self, block: int, name: str) -> torch.Tensor:
        """Per-row importance ranks of one layer, computed from the base weights once and cached
        (not cached for a streamed base, which must not end up holding a rank for every weight).
        A streamed base's block must be resident (`offload.resident`)."""
        key = (block, name)
        if key in self._ranks:
            return self._ranks[key]
        ranks = row_ranks(self.scores(block, name))
        if not is_streamed(decoder_blocks(self.base.model)[block]):
            self._ranks[key] = ranks
        return ranks

    def scores(self, block: int, name: str) -> torch.Tensor:
        """Importance of every weight of one layer (`importance.importance_scores`)."""
        layer = prunable_linears(self.base.model, decoder_blocks(self.base.model)[block])[name]
        return importance_scores(layer.weight, self.blocks[block].input_norms.get(name), self.config.criterion)

    def merged_weight(self, block: int, name: str, layer: torch.nn.Linear, sparsity: float) -> torch.Tensor:
        """M(s) * (W + sum_{j <= k} B_j A_j) for one layer of the base model (B_k A_k alone for an
        artifact trained without inheritance), in the base weight's dtype; at sparsity 0, the base
        weight itself (a copy), as the authors' code leaves it dense."""
        if sparsity == 0:
            return layer.weight.detach().clone()
        state = self.blocks[block]
        group = self.config.group_of(sparsity)
        a, b = state.adapters[name]
        active = active_adapters(group, state.group1_adapter, self.config.inherit_adapters,
                                 self.config.group1_inherited)
        device = layer.weight.device
        delta = state.deltas.get(name)
        return effective_weight(layer.weight, self.ranks(block, name).to(device), sparsity,
                                [a[j].to(device) for j in active], [b[j].to(device) for j in active],
                                None if delta is None else delta.to(device),
                                adapter_scales(active, sparsity, self.config.boundaries, self.config.adapter_ramp))

    def _per_block(self, sparsity: float | dict[int, float]) -> dict[int, float]:
        n = len(self.blocks)
        if isinstance(sparsity, dict):
            bad = [b for b in sparsity if not 0 <= int(b) < n]
            if bad:
                raise ValueError(f"block indices {bad} do not exist: the model has blocks 0..{n - 1}")
            plan = {int(b): float(s) for b, s in sparsity.items()}
        else:
            plan = {b: float(sparsity) for b in range(n)}
        for s in plan.values():
            self.config.group_of(s)  # raises, naming the range, when outside it
        return plan

    def materialize(self, sparsity: float | dict[int, float]) -> LoadedModel:
        """A plain sparse transformers model (adapters merged, no wrappers) at one sparsity, or at a
        per-block sparsity {block: s}, in the base model's dtype; blocks left out of the mapping,
        and blocks at sparsity 0, keep the base model's weights unchanged. A served model whose
        sparsity changes in place is `epts.RuntimeModel`."""
        loaded = LoadedModel(copy.deepcopy(self.base.model), self.base.tokenizer, self.base.spec)
        self.merge_into(loaded.model, self._per_block(sparsity))
        return loaded

    @torch.no_grad()
    def merge_into(self, model: torch.nn.Module, plan: dict[int, float]) -> None:
        """Write the merged weights of `plan` ({block: sparsity}) into `model`, a copy of the base
        model: into each prunable `nn.Linear`'s weight, or repacked into each `SparseLinear`. Of a
        streamed base, the base block is loaded for its weights and a streamed copy's block is
        loaded, re-merged and kept in its scratch file (`offload.resident`)."""
        base_blocks, blocks = decoder_blocks(self.base.model), decoder_blocks(model)
        for b, s in plan.items():
            with resident(base_blocks[b]), resident(blocks[b], keep=True):
                base_layers = prunable_linears(self.base.model, base_blocks[b])
                for name in arch_spec(model).prunable:
                    target = blocks[b].get_submodule(name)
                    merged = self.merged_weight(b, name, base_layers[name], s)
                    if isinstance(target, SparseLinear):
                        target.repack_(merged)
                    else:
                        target.weight.copy_(merged)

    # ---- persistence ------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the artifact folder; tensor files first, the manifest (with their sha256) last."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        adapters, norms = blocks_to_tensors(self.blocks)
        if not all(torch.isfinite(t).all() for t in adapters.values()):
            raise ArtifactError("refusing to save non-finite adapter weights")
        files = {ADAPTERS: adapters}
        if norms:
            files[IMPORTANCE] = norms
        for filename, tensors in files.items():
            save_tensors_atomic(tensors, out / filename)
        manifest = {
            "format_version": FORMAT_VERSION,
            "epts_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "base_model": {"spec": self.base.spec, "fingerprint": self.base_fingerprint, "dtype": self.base.dtype,
                           "trust_remote_code": self.base.trust_remote_code},
            "calibration": self.calibration,
            "versions": {"epts": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
            "config": self.config.to_dict(),
            "groups": self.config.groups,
            "num_blocks": len(self.blocks),
            "layers": list(self.blocks[0].adapters),
            "blocks": [s.info() for s in self.blocks],
            "stats": self.stats,
            "files": {name: _sha256(out / name) for name in files},
        }
        write_json_atomic(out / MANIFEST, manifest)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, base: LoadedModel | str | None = None, device: str = "cpu",
             dtype: str | torch.dtype = "auto", stream: bool = False, *, torch_dtype: str | torch.dtype | None = None,
             trust_remote_code: bool = False) -> "ElasticModel":
        """Load an artifact; the base model is reloaded from the manifest's spec unless given (a
        LoadedModel, or a spec for `load_model`), in `dtype` (a name or a torch dtype; `torch_dtype`
        is transformers' older spelling of it): "auto" is the dtype the artifact was made in. A base
        that runs code shipped with it (recorded at compress) needs `trust_remote_code`. Raises
        ArtifactError for a missing or damaged artifact, for a base model whose fingerprint differs
        (naming both dtypes when they differ) and for a recorded remote-code base without
        `trust_remote_code`; ModelLoadError when the base cannot be loaded or `dtype` is unknown."""
        if torch_dtype is not None:
            if dtype != "auto":
                raise ValueError("pass dtype or torch_dtype (its older name), not both")
            dtype = torch_dtype
        dtype = dtype_choice(dtype)  # before any loading: a bad dtype is no fault of the recorded base
        folder = Path(path)
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise ArtifactError(f"{folder} is not an EPTS artifact (no {MANIFEST}); it may be an unfinished run")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ArtifactError(f"{manifest_path} is damaged ({err}): copy the artifact again or rerun compress") from None
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ArtifactError(f"{folder} has artifact format {version}; this epts reads up to {FORMAT_VERSION}: "
                                f"upgrade epts")
        for name, digest in manifest["files"].items():
            file = folder / name
            if not file.is_file() or _sha256(file) != digest:
                raise ArtifactError(f"{file} is missing or damaged (sha256 differs from the manifest)")
        config = EPTSConfig.from_dict(manifest["config"])
        recorded = manifest["base_model"]
        made_in = recorded.get("dtype", "float32")  # artifacts before dtype was recorded were float32
        if not isinstance(base, LoadedModel):
            if recorded.get("trust_remote_code") and not trust_remote_code:
                raise ArtifactError(f"the base model of {folder} runs code shipped with it ({recorded['spec']}): "
                                    f"pass --trust-remote-code (trust_remote_code=True) if you trust that code")
            spec = base or recorded["spec"]
            try:
                base = load_model(spec, made_in if dtype == "auto" else dtype, device, trust_remote_code, stream=stream,
                                  runtime="dense")
            except ModelLoadError as err:
                if base is not None:
                    raise
                raise ModelLoadError(f"{err} (the base model recorded in {folder / MANIFEST}): pass --base with "
                                     f"the base model's folder, .gguf file or hub id") from err
        expected = recorded["fingerprint"]
        actual = fingerprint(base.model)
        if actual != expected:
            if base.dtype != made_in:
                raise ArtifactError(f"base model {base.spec!r} is loaded in {base.dtype}, but the artifact was made "
                                    f"from it in {made_in}: load it in {made_in} (--dtype {made_in} or auto)")
            raise ArtifactError(f"base model {base.spec!r} has fingerprint {actual[:16]}…, but the artifact was made "
                                f"from {expected[:16]}…: load the base model it was compressed from (--base)")
        adapters = load_file(str(folder / ADAPTERS))
        norms = load_file(str(folder / IMPORTANCE)) if IMPORTANCE in manifest["files"] else {}
        blocks = blocks_from_tensors(manifest["blocks"], manifest["layers"], config.num_groups, adapters, norms)
        return cls(base, config, blocks, expected, manifest.get("stats"), manifest.get("calibration"))

    # The transformers / peft names, for users who think in from_pretrained / save_pretrained.
    save_pretrained = save
    from_pretrained = load
