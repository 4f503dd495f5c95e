"""Magnitude pruning: keep the largest |W| of every output row (or N:M group). Needs no data."""

from __future__ import annotations

import torch

from ..importance import Pattern, magnitude_scores, pattern_mask


class MagnitudePruner:
    needs_inputs = False
    weight_parallel = False

    def __init__(self, layer: torch.nn.Linear):
        self.layer = layer

    def add_batch(self, inputs: torch.Tensor) -> None:
        pass

    def reduce(self) -> None:
        pass

    def pruned_weight(self, pattern: Pattern) -> torch.Tensor:
        w = self.layer.weight.data
        return w * pattern_mask(magnitude_scores(w), pattern)
