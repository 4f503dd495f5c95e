"""Run-time switching (METHOD.md, ingredient 5, deployment): one served model whose sparsity changes
in place, re-merged from an elastic model (`ElasticModel.to_runtime`)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from .arch import decoder_blocks, prunable_linears
from .models import LoadedModel
from .offload import resident

if TYPE_CHECKING:  # the artifact module imports this one
    from .artifact import ElasticModel


class RuntimeModel:
    """A served model whose sparsity is switched in place: each switch re-merges the affected
    layers from the base weights, scores and adapters that the elastic model holds once, so memory
    is the base model plus this one working copy, whatever the number of sparsities served. Of a
    streamed base, the working copy is streamed too: its merged blocks live in scratch files."""

    def __init__(self, elastic: ElasticModel):
        self.elastic = elastic
        self.loaded = LoadedModel(copy.deepcopy(elastic.base.model), elastic.base.tokenizer, elastic.base.spec)
        self.sparsity: dict[int, float] = {b: 0.0 for b in range(len(elastic.blocks))}  # starts as the dense base
        self._base_blocks, self._blocks = decoder_blocks(elastic.base.model), decoder_blocks(self.loaded.model)
        self._base_layers = [prunable_linears(elastic.base.model, blk) for blk in self._base_blocks]
        self._layers = [prunable_linears(self.loaded.model, blk) for blk in self._blocks]

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @torch.no_grad()
    def set_sparsity(self, sparsity: float | dict[int, float]) -> None:
        """Switch every block to `sparsity`, or the blocks of a {block: s} mapping (others keep theirs)."""
        plan = self.elastic._per_block(sparsity)
        for b, s in plan.items():
            # Streamed models: the base block is loaded for its weights, the served one is loaded,
            # re-merged and kept in its scratch file (`offload.resident`); others are in memory.
            with resident(self._base_blocks[b]), resident(self._blocks[b], keep=True):
                for name, layer in self._layers[b].items():
                    layer.weight.copy_(self.elastic.merged_weight(b, name, self._base_layers[b][name], s))
            self.sparsity[b] = s
