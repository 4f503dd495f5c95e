"""Single-sparsity one-shot pruning, block by block with the pruned model's own activations
propagated (as the Wanda and SparseGPT papers do): each block's statistics come from the outputs
of the already-pruned blocks before it."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..arch import decoder_blocks, prunable_linears
from ..allocation import outlier_ratio, owl_sparsities
from ..blocks import BlockCalls, BlockRunner, capture_block_calls
from ..config import PruneConfig
from ..data import calibration_set
from ..evaluate import layer_sparsity, peak_rss_mb, total_sparsity
from ..importance import Pattern, wanda_scores
from ..models import LoadedModel, check_context
from ..offload import check_scratch_space, resident
from ..reconstruct import dense_pass
from .magnitude import MagnitudePruner
from .sparsegpt import SparseGPTPruner
from .wanda import WandaPruner

log = logging.getLogger(__name__)

METHODS = {"magnitude": MagnitudePruner, "wanda": WandaPruner, "sparsegpt": SparseGPTPruner}


class PatternError(ValueError):
    pass


def check_pattern(model: torch.nn.Module, pattern: Pattern) -> None:
    """Raise PatternError, naming the first layer at fault, when an N:M pattern does not tile
    every prunable layer's inputs (checked before any work, for every method)."""
    if not pattern.is_nm:
        return
    names = {id(module): name for name, module in model.named_modules()}
    for block in decoder_blocks(model):
        for layer in prunable_linears(model, block).values():
            if layer.in_features % pattern.m:
                raise PatternError(f"{names[id(layer)]} has {layer.in_features} inputs, not a multiple of "
                                   f"M={pattern.m}: the N:M pattern {pattern} cannot apply to this model; "
                                   f"use an unstructured --sparsity or a pattern whose M divides every width")


@dataclass
class PruneReport:
    method: str
    pattern: str
    nsamples: int
    seqlen: int
    seed: int
    seconds: float
    peak_rss_mb: float
    total_sparsity: float
    layer_sparsity: dict[str, float]
    allocation: str = "uniform"
    block_sparsity: list[float] = field(default_factory=list)  # per block, for a non-uniform allocation

    def to_dict(self) -> dict:
        return asdict(self)


def _prune_block(model, block, pruner_cls, pattern: Pattern, runner: BlockRunner | None,
                 stream: torch.Tensor | None) -> torch.Tensor | None:
    """Prune one block in place from its inputs `stream` (None for magnitude); returns its outputs."""
    pruners = {name: pruner_cls(layer) for name, layer in prunable_linears(model, block).items()}
    if runner is None:
        for p in pruners.values():
            p.layer.weight.data = p.pruned_weight(pattern)
        return None
    runner.collect_input_stats(stream, {p.layer: p for p in pruners.values()})
    solve(list(pruners.values()), pattern)
    return runner.run(stream)


def solve(pruners: list, pattern: Pattern) -> None:
    """Set every pruner's layer to its pruned weight, from the statistics of every process.

    In one process, or for a method cheap to solve, each process reduces the statistics to every
    rank and prunes every layer. A `weight_parallel` method (SparseGPT) under torchrun is solved as
    llm-compressor's distributed oneshot does it: the block's layers are dealt round-robin to the
    ranks, each layer's Hessian is reduced to its owner only, each owner solves its own layers, and
    the pruned weights are broadcast from their owners, so every layer is solved once."""
    world = distributed.world_size()
    if world == 1 or not all(p.weight_parallel for p in pruners):
        for p in pruners:
            p.reduce()
            p.layer.weight.data = p.pruned_weight(pattern)
        return
    owners = [i % world for i in range(len(pruners))]
    for p, owner in zip(pruners, owners):  # every reduction first, so that the owners then solve at once
        p.reduce(owner)
    mine = distributed.rank()
    for p, owner in zip(pruners, owners):
        if owner == mine:
            p.layer.weight.data = p.pruned_weight(pattern)
    for p, owner in zip(pruners, owners):
        # Received into a fresh tensor: a streamed block's weight may be mapped from a read-only file.
        weight = p.layer.weight.data if owner == mine else torch.empty_like(p.layer.weight.data)
        p.layer.weight.data = distributed.broadcast_(weight, owner)


@torch.no_grad()
def prune(
    loaded: LoadedModel,
    calib: str | os.PathLike | torch.Tensor | None,
    config: PruneConfig | None = None,
    progress: bool = True,
    num_blocks: int | None = None,
) -> PruneReport:
    """Prune `loaded.model` in place with one single-sparsity method; `calib` is a text source
    or a (nsamples, seqlen) tensor of calibration windows (None for magnitude, which needs none).
    `num_blocks` prunes only the first blocks (the experiments' cheap proxy)."""
    config = config or PruneConfig()
    if config.method not in METHODS:
        raise ValueError(f"unknown pruning method {config.method!r}: choose one of {', '.join(METHODS)}")
    pruner_cls = METHODS[config.method]
    needs_inputs = pruner_cls.needs_inputs or config.allocation == "owl"
    cc = config.calib
    start = time.perf_counter()
    model = loaded.model
    check_pattern(model, config.pattern)
    check_scratch_space(model, "pruning a streamed model")
    blocks = decoder_blocks(model)[:num_blocks]
    calls = stream = None
    if needs_inputs:
        if calib is None:
            raise ValueError(f"{config.method}{' with OWL allocation' * (config.allocation == 'owl')} needs "
                             f"calibration text")
        check_context(model, cc.seqlen)
        windows = calibration_set(loaded.tokenizer, calib, cc.nsamples, cc.seqlen, cc.seed)
        # Under torchrun each process takes its share of the windows; the statistics are reduced.
        if len(windows) % distributed.world_size():
            raise ValueError(f"{distributed.world_size()} processes need --nsamples ({len(windows)}) to be a multiple "
                             f"of {distributed.world_size()}")
        windows = windows[distributed.shard(len(windows), distributed.world_size())]
        calls = capture_block_calls(model, windows, cc.batch_size)
        stream = calls.hidden
    patterns = [config.pattern] * len(blocks)
    if config.allocation == "owl":
        patterns = [Pattern(sparsity=s) for s in owl_plan(model, blocks, calls, config)]
    for b, block in enumerate(tqdm(blocks, desc=f"{config.method} {config.pattern}", disable=not progress)):
        # A streamed block is loaded, pruned, and kept pruned in a scratch file (`offload.resident`).
        with resident(block, keep=True):
            stream = _prune_block(model, block, pruner_cls, patterns[b],
                                  calls.runner(b, block) if pruner_cls.needs_inputs else None, stream)
    seconds = time.perf_counter() - start
    log.info("%s %s pruned in %.1f s", config.method, config.pattern, seconds)
    return PruneReport(
        method=config.method,
        pattern=str(config.pattern),
        nsamples=cc.nsamples,
        seqlen=cc.seqlen,
        seed=cc.seed,
        seconds=seconds,
        peak_rss_mb=peak_rss_mb(),
        total_sparsity=total_sparsity(model),
        layer_sparsity=layer_sparsity(model),
        allocation=config.allocation,
        block_sparsity=[p.sparsity for p in patterns] if config.allocation != "uniform" else [],
    )


def owl_plan(model: torch.nn.Module, blocks: list[torch.nn.Module], calls: BlockCalls, config: PruneConfig
             ) -> list[float]:
    """OWL's per-block sparsities for `config.pattern`'s global budget: outlier ratios of the Wanda
    scores under the dense model's own activations (one dense pass over the blocks), as the OWL
    reference and llm-compressor compute them; clamped to [0, 0.99]."""
    ratios, stream = [], calls.hidden
    for b, block in enumerate(blocks):
        layers = prunable_linears(model, block)
        with resident(block):
            stream, norms = dense_pass(calls.runner(b, block), layers, stream)
            ratios.append(outlier_ratio([wanda_scores(l.weight, norms[n]) for n, l in layers.items()], config.owl_m))
    sizes = [sum(l.in_features * l.out_features for l in prunable_linears(model, blk).values()) for blk in blocks]
    return owl_sparsities(ratios, config.pattern.sparsity, config.owl_lambda, 0.0, 0.99, sizes)
