"""MSFM, the multi-sparsity feature mixer (METHOD.md, ingredient 4, last step).

The next block learns on the weighted sum of this block's outputs at one sparsity drawn from each
group, so it becomes robust to the features of every sparsity it must serve.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .blocks import run_block
from .hilora import ElasticLinear, set_state


def draw_mix_sparsities(groups: list[tuple[float, float]], generator: torch.Generator) -> list[float]:
    """One sparsity per group, uniform in (lo, hi]."""
    return [hi - (hi - lo) * torch.rand((), generator=generator).item() for lo, hi in groups]


@torch.no_grad()
def mix_features(
    block: nn.Module,
    layers: dict[str, ElasticLinear],
    stream: torch.Tensor,
    kwargs: dict[str, Any],
    sparsities: list[float],
    weights: tuple[float, ...],
    group_uses_adapters: list[bool],
    hidden_as_kwarg: bool = False,
    batch_size: int = 8,
) -> torch.Tensor:
    """sum_k w_k * block_{s_k, k}(stream)."""
    mixed = torch.zeros_like(stream)
    for k, (s, w) in enumerate(zip(sparsities, weights)):
        if w == 0:
            continue
        set_state(layers, s, k, group_uses_adapters[k])
        mixed.add_(run_block(block, stream, kwargs, hidden_as_kwarg, batch_size), alpha=w)
    return mixed
