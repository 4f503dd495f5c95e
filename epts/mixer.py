"""MSFM, the multi-sparsity feature mixer (METHOD.md, ingredient 4, last step).

The next block learns on the weighted sum of this block's outputs at one sparsity drawn from each
group, so it becomes robust to the features of every sparsity it must serve.
"""

from __future__ import annotations

import torch

from .blocks import BlockRunner
from .hilora import ElasticLinear, set_state


def draw_mix_sparsities(groups: list[tuple[float, float]], generator: torch.Generator) -> list[float]:
    """One sparsity per group, uniform in (lo, hi]."""
    return [hi - (hi - lo) * torch.rand((), generator=generator).item() for lo, hi in groups]


@torch.no_grad()
def mix_features(
    runner: BlockRunner,
    layers: dict[str, ElasticLinear],
    stream: torch.Tensor,
    sparsities: list[float],
    weights: tuple[float, ...],
    group1_adapter: bool = True,
) -> torch.Tensor:
    """sum_k w_k * block_{s_k, k}(stream), each group k with the adapters `hilora.active_adapters`
    gives it (none for group 1 when `group1_adapter` is False)."""
    mixed = runner.store.empty_like(stream).zero_()
    for k, (s, w) in enumerate(zip(sparsities, weights)):
        if w == 0:
            continue
        set_state(layers, s, k, group1_adapter)
        mixed.add_(runner.run(stream), alpha=w)
    return mixed
