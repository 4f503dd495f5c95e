"""Run-time switching (METHOD.md, ingredient 5, deployment): one served model whose sparsity changes
in place, re-merged from an elastic model; dense, or packed into the sparse runtime's layers."""

from __future__ import annotations

import copy

import torch

from .arch import arch_spec, decoder_blocks
from .artifact import ElasticModel
from .models import LoadedModel
from .offload import is_streamed, resident
from .sparse import kernels
from .sparse.linear import SparseLinear


class RuntimeModel:
    """A served model whose sparsity is switched in place: each switch re-merges the affected
    layers from the base weights, scores and adapters that the elastic model holds once, so memory
    is the base model plus this one working copy, whatever the number of sparsities served.

    `packed`: the working copy's prunable linears are `SparseLinear` layers holding only the kept
    values and bitmask (a switch re-merges and repacks them); the embeddings, head and final norm
    are shared with the base model, so the copy adds only the packed blocks. Of a streamed base
    (`ElasticModel.load(..., stream=True)`) the base blocks stay on disk; a dense working copy is
    streamed too (its merged blocks live in scratch files), a packed one is in memory.
    Raises SparseRuntimeUnavailable for `packed` where the kernels cannot run, ValueError for a
    sparsity outside the trained range.
    """

    def __init__(self, elastic: ElasticModel, sparsity: float | dict[int, float] | None = None, packed: bool = False):
        self.elastic = elastic
        self.packed = packed
        # Without a sparsity it starts as the dense base, which any artifact serves, whatever its range.
        self.sparsity: dict[int, float] = {b: 0.0 for b in range(len(elastic.blocks))}
        plan = dict(self.sparsity) if sparsity is None else elastic._per_block(sparsity)
        if packed:
            kernels.require()
            model = _packed_copy(elastic, plan)
            self.sparsity.update(plan)
        else:
            model = copy.deepcopy(elastic.base.model)
        self.loaded = LoadedModel(model, elastic.base.tokenizer, elastic.base.spec)
        if not packed and sparsity is not None:
            self.set_sparsity(sparsity)

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def set_sparsity(self, sparsity: float | dict[int, float]) -> None:
        """Switch every block to `sparsity`, or the blocks of a {block: s} mapping (others keep theirs)."""
        plan = self.elastic._per_block(sparsity)
        self.elastic.merge_into(self.model, plan)
        self.sparsity.update(plan)


@torch.no_grad()
def _packed_copy(elastic: ElasticModel, plan: dict[int, float]) -> torch.nn.Module:
    """A copy of the base model at `plan` whose prunable linears are packed. deepcopy's memo shares
    every tensor outside the decoder blocks with the base and skips the blocks' tensors (each
    block's are filled below from the base block, the prunable ones merged and packed), so no
    dense copy of a block is ever made."""
    base = elastic.base.model
    blocks = decoder_blocks(base)
    block_tensors = {id(t) for blk in blocks for t in [*blk.parameters(), *blk.buffers()]}
    memo = {id(t): t for t in [*base.parameters(), *base.buffers()] if id(t) not in block_tensors}
    memo.update({i: torch.nn.Parameter(torch.empty(0), requires_grad=False) for i in block_tensors})
    model = copy.deepcopy(base, memo)
    prunable = arch_spec(base).prunable
    for b, (source, block) in enumerate(zip(blocks, decoder_blocks(model))):
        if is_streamed(block):
            from accelerate.hooks import remove_hook_from_module

            remove_hook_from_module(block, recurse=True)
        with resident(source):
            for name in prunable:
                layer = source.get_submodule(name)
                weight = elastic.merged_weight(b, name, layer, plan.get(b, 0.0))
                bias = None if layer.bias is None else layer.bias.detach().clone()
                block.set_submodule(name, SparseLinear.from_dense(weight, bias))
            for name, tensor in [*source.named_parameters(), *source.named_buffers()]:
                if not name.startswith(tuple(f"{p}." for p in prunable)):
                    _set_tensor(block, name, tensor.detach().clone())
    return model.eval()


def _set_tensor(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value
