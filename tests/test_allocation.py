import pytest
import torch

from conftest import tiny_model
from epts.allocation import allocate, fit_budget, outlier_ratios, pruned_fraction
from epts.arch import decoder_blocks, prunable_linears
from epts.artifact import BlockState, ElasticModel
from epts.config import EPTSConfig
from epts.models import fingerprint


def elastic_with_outliers(block_with_outliers: int | None = 1, layers: int = 4) -> ElasticModel:
    """An elastic model whose block `block_with_outliers` has a few very large weights (adapters
    are zero: allocation looks only at importance)."""
    loaded = tiny_model("llama")
    model = loaded.model
    config = EPTSConfig()
    states = []
    g = torch.Generator().manual_seed(0)
    for b, blk in enumerate(decoder_blocks(model)):
        named = prunable_linears(model, blk)
        if b == block_with_outliers:
            with torch.no_grad():
                for layer in named.values():
                    hit = torch.rand(layer.weight.shape, generator=g) < 0.03
                    layer.weight[hit] *= 40
        states.append(BlockState(
            adapters={n: ([torch.zeros(r, l.in_features) for r in config.ranks],
                          [torch.zeros(l.out_features, r) for r in config.ranks]) for n, l in named.items()},
            input_norms={n: torch.ones(l.in_features) for n, l in named.items()},
            group1_adapter=True,
        ))
    return ElasticModel(loaded, config, states, fingerprint(model))


@pytest.mark.parametrize("method", ["uniform", "owl"])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.6, 0.65])
def test_global_budget_is_met_within_one_weight_per_row(method, target):
    elastic = elastic_with_outliers()
    plan = allocate(elastic, target, method)
    assert all(0.0 <= s <= 0.7 for s in plan.values())
    rows = sum(l.out_features for blk in decoder_blocks(elastic.base.model)
               for l in prunable_linears(elastic.base.model, blk).values())
    total = sum(l.weight.numel() for blk in decoder_blocks(elastic.base.model)
                for l in prunable_linears(elastic.base.model, blk).values())
    assert abs(pruned_fraction(elastic, plan) - target) * total <= rows
    # and the materialised model really has that many zeros
    model = elastic.materialize(plan).model
    zeros = sum((l.weight == 0).sum().item() for blk in decoder_blocks(model)
                for l in prunable_linears(model, blk).values())
    assert zeros / total == pytest.approx(pruned_fraction(elastic, plan), abs=1e-9)


def test_owl_gives_the_outlier_block_the_lowest_sparsity():
    elastic = elastic_with_outliers(block_with_outliers=1)
    ratios = outlier_ratios(elastic)
    assert ratios[1] > max(ratios[0], ratios[2])
    plan = allocate(elastic, 0.5, "owl", owl_lambda=0.08)
    assert plan[1] < min(plan[0], plan[2])
    assert max(plan.values()) - min(plan.values()) == pytest.approx(0.16, abs=1e-6)  # 2 lambda, no clamping


def test_budget_fit_clamps_to_the_trained_range():
    shifted = fit_budget([0.5, 0.7, 0.9], 0.68, 0.0, 0.7, [1, 1, 1])
    assert max(shifted) <= 0.7 and sum(shifted) / 3 == pytest.approx(0.68)
    assert fit_budget([0.6, 0.8], 0.7, 0.0, 0.7, [1, 1]) == pytest.approx([0.7, 0.7])
    with pytest.raises(ValueError, match="outside the trained range"):
        fit_budget([0.5], 0.75, 0.0, 0.7, [1])


def test_search_never_raises_the_calibration_loss_and_keeps_the_budget():
    from conftest import random_windows
    from epts.allocation import search
    from epts.evaluate import mean_nll

    elastic = elastic_with_outliers()
    windows = random_windows(3, 24, seed=7)
    result = search(elastic, 0.5, windows, seconds=60, max_evaluations=25, step=0.1, seed=0)
    assert result.evaluations == 25
    assert result.loss <= result.start_loss
    assert result.loss == pytest.approx(mean_nll(elastic.materialize(result.plan).model, windows), rel=1e-6)
    if result.accepted:
        assert result.loss < result.start_loss and result.history == sorted(result.history, reverse=True)
    assert sum(result.plan.values()) / 3 == pytest.approx(0.5, abs=1e-9)
    assert all(0 <= s <= 0.7 for s in result.plan.values())
    again = search(elastic, 0.5, windows, seconds=60, max_evaluations=25, step=0.1, seed=0)
    assert again.plan == result.plan
