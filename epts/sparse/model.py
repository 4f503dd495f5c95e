"""Packed models: a causal LM whose prunable linears are `SparseLinear` layers.

`load_packed` builds one from a sparse-bitmask folder without ever holding a dense weight of a
packed layer (the skeleton is made under accelerate's `init_empty_weights`, each layer from its
stored parts), so peak memory is close to the packed size. `pack_` turns a loaded dense model's
pruned linears into packed ones in place (each dense weight freed as it is packed).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..arch import arch_spec, decoder_blocks
from ..offload import is_streamed
from .format import PARTS, shards
from .linear import SparseLinear


class PackedLoadError(ValueError):
    pass


def packed_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """Every packed layer of the model, by its full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def packed_bytes(model: nn.Module) -> int:
    """Bytes the model holds: its packed layers' packed bytes plus every other tensor (shared ones once)."""
    layers = packed_layers(model).values()
    seen, total = set(), sum(layer.packed_bytes() for layer in layers)
    packed = {id(t) for layer in layers for t in (layer.values, layer.bitmask, layer.row_offsets)}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in packed or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def pack_(model: nn.Module, path: str = "auto") -> nn.Module:
    """Replace every prunable linear of every decoder block by a `SparseLinear` holding its weight
    packed (zeros are the pruned weights); returns `model`. Raises ValueError for a block-streamed
    model (load it whole first)."""
    blocks = decoder_blocks(model)
    if is_streamed(blocks[0]):
        raise ValueError("a block-streamed model cannot be packed in place: load it whole (stream=False)")
    for block in blocks:
        for name in arch_spec(model).prunable:
            layer = block.get_submodule(name)
            if isinstance(layer, nn.Linear):
                block.set_submodule(name, SparseLinear.from_linear(layer, path))
    return model


def load_packed(folder: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                path: str = "auto") -> nn.Module:
    """The causal LM of a sparse-bitmask folder (`epts export --format compressed`), its pruned
    linears packed, the other tensors loaded as stored, in eval mode. `dtype` casts every float
    tensor (None: the checkpoint's own). Raises PackedLoadError for a checkpoint that lacks a
    tensor or a part, and SparseRuntimeUnavailable where the kernels cannot run."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    targets = set(json.loads((folder / "config.json").read_text())["quantization_config"]["sparsity_config"]["targets"])
    del config.quantization_config  # the layers below read the parts themselves
    with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or config.dtype,
                                                 trust_remote_code=trust_remote_code)
    float_dtype = dtype or config.dtype or torch.float32
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for shard in shards(folder):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                module, _, part = key.rpartition(".")
                if module in targets and part in PARTS:
                    parts.setdefault(module, {})[part] = f.get_tensor(key)
                    if len(parts[module]) == len(PARTS):
                        _place(model, module, parts.pop(module), float_dtype, path)
                    continue
                tensor = f.get_tensor(key)
                if tensor.is_floating_point():
                    tensor = tensor.to(float_dtype)
                set_module_tensor_to_device(model, key, "cpu", value=tensor)
    if parts:
        module, have = next(iter(parts.items()))
        raise PackedLoadError(f"{folder}: {module} lacks bitmask parts {sorted(set(PARTS) - set(have))}: the "
                              f"checkpoint is incomplete; export it again")
    model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise PackedLoadError(f"{folder} lacks tensors its config needs: {', '.join(missing[:5])}: the checkpoint is "
                              f"incomplete; copy the missing weight files or export it again")
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


def _place(model: nn.Module, module: str, parts: dict[str, torch.Tensor], dtype: torch.dtype, path: str) -> None:
    out_features, in_features = (int(n) for n in parts["shape"].tolist())
    old = model.get_submodule(module)
    if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != (out_features, in_features):
        raise PackedLoadError(f"{module} is stored as a {out_features}x{in_features} sparse weight, but the model's "
                              f"config makes it {old}")
    # A bias read before the parts (keys are sorted) is on the old layer; one read after fills the
    # meta placeholder.
    bias = old.bias if old.bias is not None and not old.bias.is_meta else None
    layer = SparseLinear(in_features, out_features, parts["compressed"].to(dtype), parts["bitmask"],
                         parts["row_offsets"], bias, path)
    if old.bias is not None and bias is None:
        layer.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device="meta"), requires_grad=False)
    model.set_submodule(module, layer)
