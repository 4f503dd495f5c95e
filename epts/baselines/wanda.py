"""Wanda (Sun et al. 2023): keep the largest |W_ij| * ||X_j||_2 in every output row (or N:M group)."""

from __future__ import annotations

import torch

from .. import distributed
from ..importance import InputNormStats, Pattern, pattern_mask, wanda_scores


class WandaPruner:
    needs_inputs = True
    weight_parallel = False  # cheap to solve: every rank prunes every layer from the all-reduced norms

    def __init__(self, layer: torch.nn.Linear):
        self.layer = layer
        self.stats = InputNormStats(layer.in_features)

    def add_batch(self, inputs: torch.Tensor) -> None:
        self.stats.add_batch(inputs)

    def reduce(self) -> None:
        """Sum the input statistics of every process (torchrun)."""
        distributed.sum_(self.stats.sum_sq)

    def pruned_weight(self, pattern: Pattern) -> torch.Tensor:
        w = self.layer.weight.data
        return w * pattern_mask(wanda_scores(w, self.stats.norm()), pattern)
