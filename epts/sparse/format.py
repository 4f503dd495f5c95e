"""Compressed sparse export in compressed-tensors' `sparse-bitmask` format.

Each pruned weight `X.weight` of module `X` is stored as `X.shape` (dense shape, int64),
`X.compressed` (its non-zero values, row-major), `X.bitmask` (uint8, one bit per weight, numpy
`packbits(..., bitorder="little")` along each row) and `X.row_offsets` (int64, index of each row's
first value): keyed by the module, not the weight, as compressed-tensors' BitmaskCompressor writes
and reads them; config.json gets a `quantization_config` with a `sparsity_config` naming
the format, as llm-compressor writes it. Written and read here rather than through the
`compressed-tensors` package: its releases that still have this compressor (<= 0.14) do not
work with transformers 5, and transformers 5 cannot load the format by itself. The stack that does
read it back is transformers <= 4.55 with compressed-tensors 0.13 (4.56+ compress the meta-device
model before loading, which BitmaskCompressor cannot do); benchmarks/peer/compressed_tensors_check.py
checks that it gets exactly these weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..io import save_tensors_atomic, write_json_atomic

FORMAT = "sparse-bitmask"
PARTS = ("shape", "compressed", "bitmask", "row_offsets")
_INDEX = "model.safetensors.index.json"


def bitmask_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four tensors that stand for a 2-D `weight`, keyed by part name."""
    if weight.dim() != 2:
        raise ValueError(f"bitmask compression needs a 2-D weight, got shape {tuple(weight.shape)}")
    keep = weight != 0
    counts = keep.sum(dim=1)
    return {
        "shape": torch.tensor(list(weight.shape)),
        "compressed": weight[keep].contiguous(),
        "bitmask": torch.from_numpy(np.packbits(keep.cpu().numpy(), axis=-1, bitorder="little")),
        "row_offsets": torch.cumsum(counts, 0) - counts,
    }


def bitmask_decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight back from `bitmask_compress`'s parts."""
    shape = [int(n) for n in parts["shape"].tolist()]
    bits = np.unpackbits(parts["bitmask"].numpy(), axis=-1, count=shape[-1], bitorder="little")
    keep = torch.from_numpy(bits.reshape(shape).astype(bool))
    values = parts["compressed"]
    if keep.sum().item() != values.numel():
        raise ValueError(f"bitmask marks {keep.sum().item()} weights but {values.numel()} values are stored")
    return torch.zeros(shape, dtype=values.dtype).masked_scatter_(keep, values)  # 3x faster than dense[keep] = ...


def shards(folder: Path) -> list[Path]:
    index = folder / _INDEX
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [folder / "model.safetensors"]


def compress_folder(folder: str | os.PathLike, targets: list[str], structure: str = "unstructured") -> dict:
    """Rewrite a `save_pretrained` folder in place: every `targets` weight (full parameter names)
    becomes its bitmask parts, and config.json names the format. Returns the sparsity config."""
    folder = Path(folder)
    remaining = set(targets)
    zeros = total = 0
    renamed: dict[str, str] = {}
    if not_weights := [t for t in targets if not t.endswith(".weight")]:
        raise ValueError(f"only `.weight` parameters can be bitmask-compressed, got {not_weights[0]}")
    for shard in shards(folder):
        tensors = {}
        with safe_open(shard, framework="pt") as f:
            metadata = f.metadata()
            for key in f.keys():
                tensor = f.get_tensor(key)
                if key not in remaining:
                    tensors[key] = tensor
                    continue
                remaining.discard(key)
                zeros += int((tensor == 0).sum())
                total += tensor.numel()
                module = key.removesuffix(".weight")
                for part, value in bitmask_compress(tensor).items():
                    tensors[f"{module}.{part}"] = value
                    renamed[f"{module}.{part}"] = shard.name
        save_tensors_atomic(tensors, shard, metadata=metadata)
    if remaining:
        raise ValueError(f"{len(remaining)} weights to compress are not in {folder}, e.g. {sorted(remaining)[0]}")
    if (folder / _INDEX).is_file():
        index = json.loads((folder / _INDEX).read_text())
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in set(targets)} | renamed
        write_json_atomic(folder / _INDEX, index)
    sparsity_config = {
        "format": FORMAT,
        "targets": sorted(t.removesuffix(".weight") for t in targets),
        "ignore": [],
        "global_sparsity": zeros / total if total else 0.0,
        "sparsity_structure": structure,
    }
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": "0.13.0",  # the last compressed-tensors release with this compressor
        "sparsity_config": sparsity_config,
        "transform_config": {},
    }
    write_json_atomic(folder / "config.json", config)
    return sparsity_config


def is_compressed(folder: str | os.PathLike) -> bool:
    """Whether a model folder holds a sparse-bitmask checkpoint."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return (qc.get("sparsity_config") or {}).get("format") == FORMAT


def load_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a sparse-bitmask checkpoint, pruned weights decompressed to dense."""
    folder = Path(folder)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    if qc.get("config_groups"):
        raise ValueError(f"{folder} is also quantised; epts reads sparse-bitmask checkpoints without quantisation")
    state: dict[str, torch.Tensor] = {}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for shard in shards(folder):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                module, _, part = key.rpartition(".")
                if part in PARTS:
                    grouped.setdefault(f"{module}.weight", {})[part] = f.get_tensor(key)
                else:
                    state[key] = f.get_tensor(key)
    for name, parts in grouped.items():
        if set(parts) != set(PARTS):
            raise ValueError(f"{folder}: {name} lacks bitmask parts {sorted(set(PARTS) - set(parts))}")
        state[name] = bitmask_decompress(parts)
    return state
