"""Per-block sparsity for a global budget: uniform; OWL (outlier-weighted layer-wise sparsity,
Yin et al. 2024: blocks with more activation outliers keep more weights); or a search that scores
allocations by the calibration loss of the elastic model itself (any allocation is one in-place
re-merge away, see `runtime.RuntimeModel`).

A plan is {block: sparsity}; its budget is the fraction of all prunable weights that are zero.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from .arch import decoder_blocks, prunable_linears
from .artifact import ElasticModel
from .evaluate import mean_nll
from .importance import kept_per_row
from .models import check_context
from .offload import resident
from .runtime import RuntimeModel

log = logging.getLogger(__name__)


def _layer_shapes(elastic: ElasticModel) -> list[list[tuple[int, int]]]:
    model = elastic.base.model
    return [[(l.out_features, l.in_features) for l in prunable_linears(model, blk).values()]
            for blk in decoder_blocks(model)]


def pruned_fraction(elastic: ElasticModel, plan: dict[int, float]) -> float:
    """Zeros over all prunable weights once `plan` is materialised (blocks left out stay dense)."""
    zeros = total = 0
    for b, shapes in enumerate(_layer_shapes(elastic)):
        for rows, cols in shapes:
            total += rows * cols
            if b in plan:
                zeros += rows * (cols - kept_per_row(cols, plan[b]))
    return zeros / total


def fit_budget(raw: list[float], target: float, lo: float, hi: float, sizes: list[int]) -> list[float]:
    """Shift every block's sparsity by one constant, clamped to [lo, hi], so that the size-weighted
    mean is `target` (bisection: the clamped mean only grows with the shift)."""
    if not lo <= target <= hi:
        raise ValueError(f"global sparsity {target} is outside the trained range [{lo:g}, {hi:g}]")
    weights = torch.tensor(sizes, dtype=torch.float64)
    values = torch.tensor(raw, dtype=torch.float64)

    def mean_at(shift: float) -> float:
        return float((values.add(shift).clamp(lo, hi) * weights).sum() / weights.sum())

    low, high = lo - float(values.max()), hi - float(values.min())
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if mean_at(mid) < target else (low, mid)
    return values.add((low + high) / 2).clamp(lo, hi).tolist()


def outlier_ratio(scores: list[torch.Tensor], m: float = 5.0) -> float:
    """OWL's layer-wise outlier ratio of one block: the share of its weights whose Wanda score
    exceeds `m` times the block's mean score (Yin et al. 2024, section 3)."""
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def outlier_ratios(elastic: ElasticModel, m: float = 5.0) -> list[float]:
    """Per block of an elastic model: `outlier_ratio` of its importance scores (one block resident
    at a time when the base model is block-streamed)."""
    ratios = []
    for b, (state, block) in enumerate(zip(elastic.blocks, decoder_blocks(elastic.base.model))):
        with resident(block):
            ratios.append(outlier_ratio([elastic.scores(b, name) for name in state.adapters], m))
    return ratios


def owl_sparsities(ratios: list[float], target: float, owl_lambda: float, lo: float, hi: float,
                   sizes: list[int]) -> list[float]:
    """OWL's rule: keep ratios spread over [0, 2 lambda] by outlier ratio, centred on 1 - target,
    then shifted so that the size-weighted mean sparsity is exactly `target` within [lo, hi]."""
    d = torch.tensor(ratios, dtype=torch.float64)
    spread = float(d.max() - d.min())
    keep = (d - d.min()) / spread * 2 * owl_lambda if spread > 0 else torch.zeros_like(d)
    raw = (1.0 - (keep - keep.mean() + (1.0 - target))).tolist()
    return fit_budget(raw, target, lo, hi, sizes)


@dataclass
class SearchResult:
    plan: dict[int, float]
    start_loss: float
    loss: float
    evaluations: int
    accepted: int
    seconds: float
    history: list[float] = field(default_factory=list)  # calibration loss after each accepted move


def search(elastic: ElasticModel, target: float, windows: torch.Tensor, start: dict[int, float] | None = None,
           seconds: float = 60.0, max_evaluations: int | None = None, step: float = 0.03, seed: int = 0,
           batch_size: int = 4) -> SearchResult:
    """Greedy pairwise search: move sparsity from one block to another (the budget stays exact up
    to the per-row rounding), keep the move when the calibration loss drops, until the time or
    evaluation budget is spent. Starts from `start` (default: uniform). `windows`: (n, seqlen)
    token ids; raises ValueError when seqlen exceeds the model's context."""
    check_context(elastic.base.model, windows.shape[-1], "--search-seqlen")
    lo, hi = elastic.config.boundaries[0], elastic.config.boundaries[-1]
    sizes = [sum(r * c for r, c in s) for s in _layer_shapes(elastic)]
    plan = dict(start) if start is not None else allocate(elastic, target, "uniform")
    runtime = RuntimeModel(elastic, plan)
    began = time.perf_counter()
    best = first = mean_nll(runtime.model, windows, batch_size)
    gen = torch.Generator().manual_seed(seed)
    evaluations, history = 0, []
    n = len(plan)
    while time.perf_counter() - began < seconds and (max_evaluations is None or evaluations < max_evaluations):
        i, j = torch.randperm(n, generator=gen)[:2].tolist()
        delta = step * (0.5 + 0.5 * torch.rand((), generator=gen).item())
        new_i, new_j = plan[i] + delta, plan[j] - delta * sizes[i] / sizes[j]
        if not (lo <= new_i <= hi and lo <= new_j <= hi):
            continue
        runtime.set_sparsity({i: new_i, j: new_j})
        loss = mean_nll(runtime.model, windows, batch_size)
        evaluations += 1
        if loss < best:
            best, plan[i], plan[j] = loss, new_i, new_j
            history.append(loss)
        else:
            runtime.set_sparsity({i: plan[i], j: plan[j]})
    log.info("search: %d evaluations, %d moves kept, calibration loss %.4f -> %.4f", evaluations, len(history),
             first, best)
    return SearchResult(plan, first, best, evaluations, len(history), time.perf_counter() - began, history)


def allocate(elastic: ElasticModel, target: float, method: str = "uniform", owl_m: float = 5.0,
             owl_lambda: float = 0.08) -> dict[int, float]:
    """{block: sparsity} inside the artifact's trained range whose global budget is `target`
    (uniform or OWL; see `search` for the calibration-driven allocation)."""
    lo, hi = elastic.config.boundaries[0], elastic.config.boundaries[-1]
    shapes = _layer_shapes(elastic)
    sizes = [sum(r * c for r, c in s) for s in shapes]
    if method == "uniform":
        return dict(enumerate(fit_budget([target] * len(shapes), target, lo, hi, sizes)))
    if method == "owl":
        return dict(enumerate(owl_sparsities(outlier_ratios(elastic, owl_m), target, owl_lambda, lo, hi, sizes)))
    raise ValueError(f"unknown allocation {method!r}: choose uniform or owl")
