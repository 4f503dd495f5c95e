"""The one table of architecture differences: where the decoder blocks are, which linears prune.

Everything else (calling a block, its attention masks, rotary embeddings) is captured from the
model's own forward pass in `blocks.py`, so adding a family means adding one row here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Where a family keeps its decoder blocks, which linears of a block are pruned, and the modules
    the last block's output passes through before the output embedding (in order; a family's
    variant without one of them holds None there)."""

    blocks: str
    prunable: tuple[str, ...]
    final: tuple[str, ...]


_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_LLAMA = ArchSpec("model.layers", _LLAMA_LINEARS, ("model.norm",))
_OPT = ArchSpec(
    "model.decoder.layers",
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    # OPT-350m has no final norm (its norms come after each sublayer) and projects back to the
    # embedding width.
    ("model.decoder.final_layer_norm", "model.decoder.project_out"),
)

# Keyed by `config.model_type`.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    "opt": _OPT,
}


class UnsupportedArchitectureError(ValueError):
    pass


def arch_spec(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"model type {model_type!r} has no supported decoder blocks; supported types: "
            f"{', '.join(sorted(ARCHITECTURES))}. Add a row to epts.arch.ARCHITECTURES for it."
        )
    return spec


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    spec = arch_spec(model)
    try:
        blocks = model.get_submodule(spec.blocks)
    except AttributeError as err:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no decoder blocks at {spec.blocks!r}: is it a causal LM "
            f"(AutoModelForCausalLM) of type {model.config.model_type!r}?"
        ) from err
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no decoder blocks at {spec.blocks!r}")
    return blocks


def prunable_linears(model: nn.Module, block: nn.Module) -> dict[str, nn.Linear]:
    """The prunable linears of one block, by their name inside the block, in the table's order."""
    out = {}
    for name in arch_spec(model).prunable:
        layer = block.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise UnsupportedArchitectureError(f"{name} in {type(block).__name__} is {type(layer).__name__}, not nn.Linear")
        out[name] = layer
    return out


def final_modules(model: nn.Module) -> list[nn.Module]:
    """The modules between the last decoder block and the output embedding, in the order the model
    applies them (`ArchSpec.final`; those the model does not have left out)."""
    out = []
    for name in arch_spec(model).final:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if module is not None:
            out.append(module)
    return out


def prunable_weight_names(model: nn.Module) -> list[str]:
    """Full parameter names (`model.layers.0.self_attn.q_proj.weight`, ...) of every prunable linear."""
    spec = arch_spec(model)
    return [f"{spec.blocks}.{b}.{name}.weight" for b in range(len(decoder_blocks(model))) for name in spec.prunable]
