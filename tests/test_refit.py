"""The fixed-mask least-squares refit at export (epts.refit): the elastic masks kept, the kept weights re-solved."""

import json
import math

import pytest
import torch

from conftest import random_windows, tiny_model, tiny_model_folder
from epts.arch import decoder_blocks, prunable_linears
from epts.baselines.sparsegpt import SparseGPTPruner
from epts.blocks import BlockRunner
from epts.config import CalibConfig, EPTSConfig, RefitConfig
from epts.importance import Pattern, mask_from_ranks
from epts.models import load_model
from epts.reconstruct import compress
from epts.refit import artifact_calibration, masked_least_squares, refit, refit_calibration

CONFIG = EPTSConfig(epochs=1, boundaries=(0, .5, .7), ranks=2, mix_weights=(.5, .5),
                    calib=CalibConfig(nsamples=4, seqlen=32))


def _pruner(seed=0, d_out=24, d_in=64, tokens=256):
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(d_in, d_out, bias=False)
    layer.weight.data = torch.randn(d_out, d_in, generator=g)
    # Correlated inputs, so that the OBS update has something to compensate.
    x = torch.randn(tokens, d_in, generator=g) @ (torch.eye(d_in) + 0.5 * torch.randn(d_in, d_in, generator=g))
    pruner = SparseGPTPruner(layer, blocksize=16)
    pruner.add_batch(x)
    return pruner, x


def test_the_least_squares_refit_keeps_the_mask_and_reaches_the_optimum():
    pruner, x = _pruner(seed=1)
    w = pruner.layer.weight.data
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) < 0.6  # True = pruned
    hessian, inverse, _ = pruner.inverse_hessian()
    error = lambda v: ((w - v) @ hessian * (w - v)).sum().item()  # noqa: E731  the objective, dampened H
    bare = w.masked_fill(mask, 0.0)
    few = masked_least_squares(w, hessian, inverse, mask, iters=3)
    solved = masked_least_squares(w, hessian, inverse, mask, iters=20)
    assert torch.equal(solved == 0, mask) and torch.equal(few == 0, mask)
    # Monotone towards the optimum, and there (measured: 0.70, 0.061 and 0 relative excess).
    assert error(_optimum(w, hessian, mask)) == pytest.approx(error(solved), rel=1e-5)
    assert error(solved) < error(few) < 0.9 * error(bare)
    # The output error on the calibration inputs follows: below SparseGPT's own sweep at its own mask.
    output_error = lambda v: (x @ (w - v).t()).pow(2).mean().item()  # noqa: E731
    sparsegpt = pruner.pruned_weight(Pattern(sparsity=0.6))
    refit_own = masked_least_squares(w, hessian, inverse, sparsegpt == 0, iters=20)
    assert output_error(refit_own) < output_error(sparsegpt)


def test_the_inverse_hessian_preconditioner_converges_where_a_diagonal_one_does_not():
    # Inputs dominated by a few shared directions, as LLM activations are: an ill-conditioned Hessian.
    g = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(64, 24, bias=False)
    layer.weight.data = torch.randn(24, 64, generator=g)
    x = torch.randn(512, 4, generator=g) @ torch.randn(4, 64, generator=g) + 0.05 * torch.randn(512, 64, generator=g)
    pruner = SparseGPTPruner(layer)
    pruner.add_batch(x)
    w = layer.weight.data
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) < 0.6
    hessian, inverse, _ = pruner.inverse_hessian()
    error = lambda v: ((w - v) @ hessian * (w - v)).sum().item()  # noqa: E731
    best = error(_optimum(w, hessian, mask))
    excess = lambda v: error(v) / best - 1  # noqa: E731
    # Measured after 5 steps: 1e-6 with H^-1, 3e-2 with the diagonal.
    assert excess(masked_least_squares(w, hessian, inverse, mask, iters=5)) < 1e-4
    assert excess(masked_least_squares(w, hessian, torch.diag(1 / torch.diag(hessian)), mask, iters=5)) > 1e-2


def _optimum(w, hessian, mask):
    """The exact least-squares weights of each row on its mask (True = pruned)."""
    optimum = torch.zeros_like(w)
    for i, row in enumerate(~mask):
        optimum[i, row] = torch.linalg.solve(hessian[row][:, row], hessian[row] @ w[i])
    return optimum


@pytest.fixture(scope="module")
def elastic_tiny():
    windows = random_windows(4, 32, vocab=250)
    return compress(tiny_model("llama"), windows, CONFIG, progress=False), windows


@pytest.mark.parametrize("mode", ["all", "block"])
def test_refit_keeps_the_elastic_masks_and_chooses_the_lower_error(elastic_tiny, mode):
    elastic, windows = elastic_tiny
    plan = {0: 0.6, 1: 0.3, 2: 0.0}
    model = elastic.materialize(plan)
    merged = {(b, n): l.weight.detach().clone() for b, blk in enumerate(decoder_blocks(model.model))
              for n, l in prunable_linears(model.model, blk).items()}
    report = refit(elastic, model, plan, windows, RefitConfig(mode, mask="elastic"), progress=False)
    assert report.choices[2] == "dense"
    if mode == "all":
        assert report.choices[:2] == ["refit", "refit"]
    else:
        for b, (choice, (err_merged, err_refit)) in enumerate(zip(report.choices[:2], report.errors[:2])):
            if not elastic.blocks[b].group1_adapter and plan[b] <= 0.5:  # bare masks: always refit
                assert choice == "refit" and err_merged != err_merged  # not compared: NaN
            else:
                assert choice == ("refit" if err_refit < err_merged else "adapters")
    for b, blk in enumerate(decoder_blocks(model.model)):
        for n, layer in prunable_linears(model.model, blk).items():
            if plan[b] == 0:
                assert torch.equal(layer.weight, merged[(b, n)])
                continue
            pruned = ~mask_from_ranks(elastic.ranks(b, n), plan[b])
            assert torch.equal(layer.weight == 0, pruned), f"block {b} {n}: the refit changed the mask"
            assert torch.equal(layer.weight, merged[(b, n)]) == (report.choices[b] == "adapters")


def _weights(model):
    return [l.weight.detach().clone() for blk in decoder_blocks(model.model)
            for l in prunable_linears(model.model, blk).values()]


def _auto_scored(elastic, plan, windows, monkeypatch, losses, block_candidate=True, reconstruct_epochs=0,
                 reconstruct_all=True):
    """"auto" without SparseGPT's candidate (and without the reconstruction unless `reconstruct_epochs`)
    on the elastic model materialised at `plan`, its candidates scored `losses` in the order it scores
    them; returns the model and the report."""
    import epts.refit as refit_module

    scores = iter(losses)
    monkeypatch.setattr(refit_module, "_window_losses",
                        lambda model, w, batch_size, store: torch.full((len(w),), next(scores), dtype=torch.float64))
    model = elastic.materialize(plan)
    config = RefitConfig("auto", sparsegpt=False, block_candidate=block_candidate, reconstruct_epochs=reconstruct_epochs,
                         reconstruct_all=reconstruct_all)
    report = refit(elastic, model, plan, windows, config, progress=False, heldout=windows[:2])
    return model, report


def _refit_then_steps(elastic, plan, windows, mode):
    """The weights of `mode`'s refit at `plan`, then reconstructed for one epoch, then tuned end to end."""
    from epts.reconstruct import reconstruct_pruned, tune_end_to_end

    model = elastic.materialize(plan)
    refit(elastic, model, plan, windows, mode, progress=False)
    weights = [_weights(model)]
    reconstruct_pruned(model.model, elastic.base.model, windows, 1, RefitConfig.reconstruct_step, progress=False,
                       rank=RefitConfig.reconstruct_rank)
    weights.append(_weights(model))
    tune_end_to_end(model.model, elastic.base.model, windows, RefitConfig.tune_epochs, RefitConfig.tune_step,
                    RefitConfig.reconstruct_rank, progress=False)
    return weights + [_weights(model)]


@pytest.mark.parametrize("streamed", [False, True])  # the reconstruction undone from RAM or from scratch files
@pytest.mark.parametrize("rebuilt_loss, tuned_loss, kept", [(0.5, 0.4, "tuned"), (0.5, 0.6, "reconstructed"),
                                                           (1.5, 1.6, "all"), (1.5, 0.9, "tuned")])
def test_refit_auto_keeps_the_reconstruction_of_its_winner_only_where_it_scores_lower(elastic_tiny, monkeypatch,
                                                                                      rebuilt_loss, tuned_loss, kept,
                                                                                      streamed):
    import epts.refit as refit_module

    monkeypatch.setattr(refit_module, "is_streamed", lambda block: streamed)
    elastic, windows = elastic_tiny
    plan = {0: 0.6, 1: 0.6, 2: 0.6}
    chosen, blockwise, tuned = _refit_then_steps(elastic, plan, windows, "all")
    assert all(torch.equal(x == 0, y == 0) for x, y in zip(tuned, blockwise))
    assert any(not torch.equal(x, y) for x, y in zip(tuned, blockwise))
    model, report = _auto_scored(elastic, plan, windows, monkeypatch, (2.0, 1.0, rebuilt_loss, tuned_loss),
                                 block_candidate=False, reconstruct_epochs=1)
    assert report.chosen == "all"
    assert report.losses == {"bare": 2.0, "all": 1.0, "reconstructed": rebuilt_loss, "tuned": tuned_loss}
    assert report.reconstructed is (kept != "all") and report.to_dict()["reconstructed"] is (kept != "all")
    assert report.tuned is (kept == "tuned") and report.to_dict()["tuned"] is (kept == "tuned")
    assert report.reconstruct_seconds > report.tune_seconds > 0 and report.choices == ["refit"] * 3
    assert report.tune_loss > 0 and report.tune_skipped is None and report.to_dict()["tune_loss"] == report.tune_loss
    # Exactly the one kept of the winner, its reconstruction and that tuned; the masks are the winner's.
    expected = {"all": chosen, "reconstructed": blockwise, "tuned": tuned}[kept]
    assert all(torch.equal(x, y) for x, y in zip(_weights(model), expected))
    assert all(torch.equal(x == 0, y == 0) for x, y in zip(tuned, chosen))
    assert any(not torch.equal(x, y) for x, y in zip(blockwise, chosen))


@pytest.mark.parametrize("streamed", [False, True])  # the copies in RAM or in scratch files
@pytest.mark.parametrize("rebuilt, tuned, other, other_tuned, kept, start", [
    (0.8, 0.7, 0.6, 0.65, "tuned", "bare"),  # all's reconstruction scores lowest: not kept without its tuning
    (0.8, 0.7, 0.6, 0.5, "tuned", "all"), (0.8, 0.5, 0.6, 0.55, "tuned", "bare"),
    (0.8, 0.85, 0.9, 0.95, "reconstructed", "bare"), (1.2, 1.3, 1.1, 1.05, "bare", "bare")])
def test_refit_auto_reconstructs_and_tunes_the_least_squares_candidate_too_where_another_won(
        elastic_tiny, monkeypatch, rebuilt, tuned, other, other_tuned, kept, start, streamed):
    import epts.refit as refit_module

    monkeypatch.setattr(refit_module, "is_streamed", lambda block: streamed)
    elastic, windows = elastic_tiny
    plan = {0: 0.6, 1: 0.6, 2: 0.6}
    weights = {}
    for mode in ("bare", "all"):
        weights[mode], weights[mode, "reconstructed"], weights[mode, "tuned"] = _refit_then_steps(elastic, plan,
                                                                                                  windows, mode)
    assert any(not torch.equal(x, y) for x, y in zip(weights["bare"], weights["all"]))
    # Scored in this order: bare wins the choice (1.0 against 2.0), then its two steps, then all's.
    model, report = _auto_scored(elastic, plan, windows, monkeypatch, (1.0, 2.0, rebuilt, tuned, other, other_tuned),
                                 block_candidate=False, reconstruct_epochs=1)
    assert report.losses == {"bare": 1.0, "all": 2.0, "reconstructed": rebuilt, "tuned": tuned,
                             "all reconstructed": other, "all tuned": other_tuned}
    assert report.first_choice == "bare" and report.chosen == start
    assert report.to_dict()["first_choice"] == "bare" and report.to_dict()["chosen"] == start
    assert report.choices == ["refit" if start == "all" else "adapters"] * 3
    assert report.reconstructed is (kept != "bare") and report.tuned is (kept == "tuned")
    assert report.reconstruct_seconds > report.tune_seconds > 0
    expected = weights[start] if kept == "bare" else weights[start, kept]
    assert all(torch.equal(x, y) for x, y in zip(_weights(model), expected))
    without = _auto_scored(elastic, plan, windows, monkeypatch, (1.0, 2.0, rebuilt, tuned), block_candidate=False,
                           reconstruct_epochs=1, reconstruct_all=False)[1]
    assert set(without.losses) == {"bare", "all", "reconstructed", "tuned"} and without.chosen == "bare"


@pytest.mark.parametrize("streamed", [False, True])  # the loser undone from a copy, or made again
@pytest.mark.parametrize("losses, chosen", [((1.0, 2.0), "bare"), ((2.0, 1.0), "all")])
def test_refit_auto_gives_exactly_the_candidate_with_the_lower_heldout_loss(elastic_tiny, monkeypatch, losses,
                                                                              chosen, streamed):
    import epts.refit as refit_module

    monkeypatch.setattr(refit_module, "is_streamed", lambda block: streamed)
    elastic, windows = elastic_tiny
    # Block 0 serves with bare masks (refit by both candidates, on the same stream), block 1 onward
    # with adapters: "bare" refits block 0 alone, "all" every block.
    monkeypatch.setattr(elastic.blocks[0], "group1_adapter", False)
    plan = {0: 0.3, 1: 0.6, 2: 0.6}
    candidates = {}
    for mode in ("bare", "all"):
        model = elastic.materialize(plan)
        refit(elastic, model, plan, windows, mode, progress=False)
        candidates[mode] = _weights(model)
    assert any(not torch.equal(x, y) for x, y in zip(candidates["bare"], candidates["all"]))
    model, report = _auto_scored(elastic, plan, windows, monkeypatch, losses)
    assert report.choices[0] == "refit" and report.chosen == chosen and report.losses == {"bare": losses[0], "all": losses[1]}
    assert report.scored_on == "heldout" and report.mode == "auto" and report.mask == "elastic"
    # The loser is undone exactly, the restore included.
    assert all(torch.equal(x, y) for x, y in zip(_weights(model), candidates[chosen]))
    assert report.choices[1:] == (["adapters", "adapters"] if chosen == "bare" else ["refit", "refit"])


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("losses, chosen", [((2.0, 1.0, 3.0), "block"), ((2.0, 3.0, 1.0), "all"),
                                            ((1.0, 2.0, 3.0), "bare"), ((2.0, 1.0, 1.0), "block")])
def test_refit_auto_scores_the_per_block_choice_as_a_candidate(elastic_tiny, monkeypatch, losses, chosen, streamed):
    """Block 1's refit made worse than its adapters, block 2's left as it is: the per-block choice
    keeps block 1's adapters and refits block 2 (on the stream of block 1's adapters), a third model
    besides keeping both ("bare") and refitting both ("all"); auto gives exactly the one scored lowest
    (a tie to the earlier-scored one: bare, block, all)."""
    import epts.refit as refit_module

    monkeypatch.setattr(refit_module, "is_streamed", lambda block: streamed)
    elastic, windows = elastic_tiny
    monkeypatch.setattr(elastic.blocks[0], "group1_adapter", False)
    solve = refit_module._refit_block

    def block1_spoilt(elastic, index, *args, **kwargs):
        weights = solve(elastic, index, *args, **kwargs)
        return {name: w * 3 for name, w in weights.items()} if index == 1 else weights

    monkeypatch.setattr(refit_module, "_refit_block", block1_spoilt)
    plan = {0: 0.3, 1: 0.6, 2: 0.6}
    candidates = {}
    for mode in ("bare", "block", "all"):
        model = elastic.materialize(plan)
        report = refit(elastic, model, plan, windows, mode, progress=False)
        candidates[mode] = _weights(model), report.choices
    assert candidates["block"][1] == ["refit", "adapters", "refit"]
    assert all(not torch.equal(x, y) for x, y in zip(candidates["block"][0][-7:], candidates["all"][0][-7:]))
    model, report = _auto_scored(elastic, plan, windows, monkeypatch, losses)
    assert report.losses == dict(zip(("bare", "block", "all"), losses))
    assert report.chosen == chosen and report.choices == candidates[chosen][1]
    assert all(torch.equal(x, y) for x, y in zip(_weights(model), candidates[chosen][0]))
    # Without the candidate, "auto" chooses between the other two only.
    model, report = _auto_scored(elastic, plan, windows, monkeypatch, losses[::2], block_candidate=False)
    assert report.losses == {"bare": losses[0], "all": losses[2]}
    assert report.chosen == ("bare" if losses[0] <= losses[2] else "all")
    assert all(torch.equal(x, y) for x, y in zip(_weights(model), candidates[report.chosen][0]))


def test_sparsegpts_solution_stays_unless_beaten_by_more_than_the_standard_errors():
    from epts.refit import prefers_sparsegpt

    sparsegpt = torch.tensor([3.0, 3.2, 2.8, 3.1], dtype=torch.float64)
    noise = torch.tensor([0.05, -0.05, 0.05, -0.05], dtype=torch.float64)  # std 0.0577: se 0.0289 over 4 windows
    for shift, margin, expected in [(-0.02, 1.0, True), (-0.04, 1.0, False), (-0.04, 2.0, True),
                                    (-0.02, 0.0, False), (0.01, 0.0, True), (0.0, 0.0, False)]:
        keep, se = prefers_sparsegpt(sparsegpt + shift + noise, sparsegpt, margin)
        assert se == pytest.approx(float(noise.std()) / 2) and keep == expected, (shift, margin)
    # One window has no standard error: SparseGPT's solution stays unless the rule is the plain mean.
    assert prefers_sparsegpt(sparsegpt[:1] - 1, sparsegpt[:1], 1.0) == (True, math.inf)
    assert prefers_sparsegpt(sparsegpt[:1] - 1, sparsegpt[:1], 0.0)[0] is False


def _sparsegpt_model(plan: dict[int, float], windows):
    """SparseGPT itself on the tiny model, every block at its sparsity of `plan` (one sparsity)."""
    from epts.baselines import prune
    from epts.config import PruneConfig

    (sparsity,) = set(plan.values())
    model = tiny_model("llama")
    prune(model, windows, PruneConfig(method="sparsegpt", pattern=Pattern(sparsity=sparsity),
                                      calib=CalibConfig(nsamples=4, seqlen=32)), progress=False)
    return model


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("losses", [(1.0, 2.0, 3.0), (2.0, 1.0, 3.0), (2.0, 3.0, 0.5), (3.0, 2.0, 1.5)])
def test_refit_auto_scores_sparsegpts_solution_for_every_block(elastic_tiny, monkeypatch, losses, streamed):
    import epts.refit as refit_module

    monkeypatch.setattr(refit_module, "is_streamed", lambda block: streamed)
    elastic, windows = elastic_tiny
    monkeypatch.setattr(elastic.blocks[0], "group1_adapter", False)
    plan = {0: 0.3, 1: 0.3, 2: 0.3}
    monkeypatch.setattr(elastic.blocks[1], "group1_adapter", True)
    monkeypatch.setattr(elastic.blocks[2], "group1_adapter", True)
    candidates = {}
    for mode in ("bare", "all"):
        model = elastic.materialize(plan)
        refit(elastic, model, plan, windows, mode, progress=False)
        candidates[mode] = _weights(model)
    candidates["sparsegpt"] = _weights(_sparsegpt_model(plan, windows))
    scores = iter(losses)
    monkeypatch.setattr(refit_module, "_window_losses",
                        lambda model, w, batch_size, store: torch.full((len(w),), next(scores), dtype=torch.float64))
    model = elastic.materialize(plan)
    report = refit(elastic, model, plan, windows, RefitConfig("auto", reconstruct_epochs=0), progress=False,
                   heldout=windows[:2])
    assert report.losses == dict(zip(("bare", "all", "sparsegpt"), losses))
    chosen = min(report.losses, key=report.losses.get)
    assert report.chosen == chosen and report.to_dict()["chosen"] == chosen
    assert report.choices == {"bare": ["refit", "adapters", "adapters"], "all": ["refit"] * 3,
                              "sparsegpt": ["sparsegpt"] * 3}[chosen]
    assert report.to_dict()["refit_blocks"] == (1 if chosen == "bare" else 3)
    assert report.mask == ("obs" if chosen == "sparsegpt" else "elastic")
    # Exactly the winner: SparseGPT's model itself, or the other candidates with the losers undone.
    for x, y in zip(_weights(model), candidates[chosen]):
        if chosen == "sparsegpt":
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(x, y)


@pytest.mark.parametrize("margin, chosen", [(1.0, "sparsegpt"), (0.0, "bare"), (None, "bare")])
def test_refit_auto_keeps_sparsegpts_solution_where_the_windows_cannot_tell(elastic_tiny, monkeypatch, margin, chosen):
    """The adapters' candidate has the lower mean (1.5 against 1.6 nats) but its per-window
    difference to SparseGPT's solution (-0.6, +0.4) has a standard error of 0.5: by the
    one-standard-error rule (sparsegpt_se 1) the export is SparseGPT's model, by the plain mean (the
    default, None here) the adapters'."""
    import epts.refit as refit_module

    elastic, windows = elastic_tiny
    plan = {b: 0.6 for b in range(3)}
    per_window = iter([[1.0, 2.0], [3.0, 3.0], [1.6, 1.6]])  # bare, all, sparsegpt
    monkeypatch.setattr(refit_module, "_window_losses",
                        lambda model, w, batch_size, store: torch.tensor(next(per_window), dtype=torch.float64))
    config = RefitConfig("auto", reconstruct_epochs=0, sparsegpt_se=0.0 if margin is None else margin)
    report = refit(elastic, elastic.materialize(plan), plan, windows, config, progress=False, heldout=windows[:2])
    assert report.losses == pytest.approx({"bare": 1.5, "all": 3.0, "sparsegpt": 1.6})
    assert report.chosen == chosen and report.difference_se == pytest.approx(0.5)
    assert report.to_dict()["difference_se"] == pytest.approx(0.5)


def test_refit_auto_on_one_choice_window_records_no_standard_error(elastic_tiny, monkeypatch):
    """One window has no standard error: the plain mean still chooses, and the report holds None."""
    import epts.refit as refit_module

    elastic, windows = elastic_tiny
    plan = {b: 0.6 for b in range(3)}
    per_window = iter([[1.5], [3.0], [1.6]])  # bare, all, sparsegpt
    monkeypatch.setattr(refit_module, "_window_losses",
                        lambda model, w, batch_size, store: torch.tensor(next(per_window), dtype=torch.float64))
    report = refit(elastic, elastic.materialize(plan), plan, windows, RefitConfig("auto", reconstruct_epochs=0),
                   progress=False, heldout=windows[:1])
    assert report.chosen == "bare" and report.difference_se is None and report.to_dict()["difference_se"] is None


def test_refit_auto_scores_the_real_loss_and_says_when_it_has_no_heldout_text(elastic_tiny, caplog):
    from epts.evaluate import mean_nll
    from epts.reconstruct import reconstruct_pruned, tune_end_to_end

    elastic, windows = elastic_tiny
    plan = {b: 0.6 for b in range(3)}
    heldout = random_windows(2, 32, vocab=250, seed=7)
    expected, models = {}, {}
    for mode in ("bare", "all"):
        models[mode] = elastic.materialize(plan)
        refit(elastic, models[mode], plan, windows, mode, progress=False)
    models["sparsegpt"] = _sparsegpt_model(plan, windows)
    expected = {mode: mean_nll(model.model, heldout, 8) for mode, model in models.items()}
    winner = min(expected, key=expected.get)
    plain = refit(elastic, elastic.materialize(plan), plan, windows, RefitConfig("auto", reconstruct_epochs=0),
                  progress=False, heldout=heldout)
    assert plain.losses == pytest.approx(expected, rel=1e-4) and plain.reconstructed is None
    reconstruct_pruned(models[winner].model, elastic.base.model, windows, RefitConfig.reconstruct_epochs,
                       RefitConfig.reconstruct_step, progress=False, rank=RefitConfig.reconstruct_rank)
    expected["reconstructed"] = mean_nll(models[winner].model, heldout, 8)
    tune_end_to_end(models[winner].model, elastic.base.model, windows, RefitConfig.tune_epochs, RefitConfig.tune_step,
                    RefitConfig.reconstruct_rank, progress=False)
    expected["tuned"] = mean_nll(models[winner].model, heldout, 8)
    report = refit(elastic, elastic.materialize(plan), plan, windows, "auto", progress=False, heldout=heldout)
    assert report.losses == pytest.approx(expected, rel=1e-4)
    best = min(("reconstructed", "tuned"), key=expected.get)
    assert report.chosen == winner and report.reconstructed == (expected[best] < expected[winner])
    assert report.tuned == (expected["tuned"] < min(expected["reconstructed"], expected[winner]))
    with caplog.at_level("WARNING"):
        fallback = refit(elastic, elastic.materialize(plan), plan, windows, "auto", progress=False)
    assert fallback.scored_on == "calibration" and "no held-out text" in caplog.text


def test_refit_auto_with_no_adapter_served_runs_one_pass(elastic_tiny):
    elastic, windows = elastic_tiny
    marks = [b.group1_adapter for b in elastic.blocks]
    for state in elastic.blocks:
        state.group1_adapter = False
    try:
        plan = {b: 0.3 for b in range(3)}
        report = refit(elastic, elastic.materialize(plan), plan, windows,
                       RefitConfig("auto", sparsegpt=False, reconstruct_epochs=0), progress=False, heldout=windows)
        scored = refit(elastic, elastic.materialize(plan), plan, windows, RefitConfig("auto", reconstruct_epochs=0),
                       progress=False, heldout=windows)
        rebuilt = refit(elastic, elastic.materialize(plan), plan, windows,
                        RefitConfig("auto", sparsegpt=False, reconstruct_epochs=2), progress=False, heldout=windows)
    finally:
        for state, mark in zip(elastic.blocks, marks):
            state.group1_adapter = mark
    assert report.chosen == "bare" and report.losses == {} and report.choices == ["refit"] * 3
    assert report.scored_on is None  # nothing to choose: both candidates are this model
    # With SparseGPT's solution as a candidate there is a choice, and no pass for blocks with adapters.
    assert set(scored.losses) == {"bare", "sparsegpt"} and scored.scored_on == "heldout"
    won = "sparsegpt" if scored.losses["sparsegpt"] < scored.losses["bare"] else "bare"
    assert scored.choices == [{"sparsegpt": "sparsegpt", "bare": "refit"}[won]] * 3 and scored.chosen == won
    # The reconstruction alone also makes a choice: the refit, against it reconstructed.
    assert set(rebuilt.losses) == {"bare", "reconstructed", "tuned"} and rebuilt.scored_on == "heldout"
    assert rebuilt.reconstructed == (min(rebuilt.losses["reconstructed"], rebuilt.losses["tuned"]) < rebuilt.losses["bare"])


def test_refit_bare_touches_only_the_blocks_served_without_an_adapter(elastic_tiny, monkeypatch):
    elastic, windows = elastic_tiny
    marks = [b.group1_adapter for b in elastic.blocks]
    elastic.blocks[0].group1_adapter, elastic.blocks[1].group1_adapter = False, True
    try:
        plan = {0: 0.3, 1: 0.3, 2: 0.6}  # group 1, group 1, group 2 of boundaries (0, .5, .7)
        model = elastic.materialize(plan)
        before = [[l.weight.detach().clone() for l in prunable_linears(model.model, blk).values()]
                  for blk in decoder_blocks(model.model)]
        ran = []  # the blocks after the last one re-solved change nothing, so the pass does not run them
        run = BlockRunner.run
        monkeypatch.setattr(BlockRunner, "run", lambda self, stream: ran.append(self.name) or run(self, stream))
        report = refit(elastic, model, plan, windows, RefitConfig("bare", mask="elastic"), progress=False)
        assert set(ran) == {"block 1 of 3"}
        after = [[l.weight for l in prunable_linears(model.model, blk).values()] for blk in decoder_blocks(model.model)]
    finally:
        for state, mark in zip(elastic.blocks, marks):
            state.group1_adapter = mark
    assert report.choices == ["refit", "adapters", "adapters"]
    assert not any(torch.equal(x, y) for x, y in zip(before[0], after[0]))
    assert all(torch.equal(x, y) for b in (1, 2) for x, y in zip(before[b], after[b]))
    assert all(torch.equal(x == 0, y == 0) for x, y in zip(before[0], after[0]))


def test_refit_none_leaves_the_model_alone_and_a_bad_mode_is_refused(elastic_tiny):
    elastic, windows = elastic_tiny
    model = elastic.materialize(0.5)
    before = [p.detach().clone() for p in model.model.parameters()]
    assert refit(elastic, model, {b: 0.5 for b in range(3)}, windows, "none").choices == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.model.parameters()))
    with pytest.raises(ValueError, match="refit mode 'best' is not one of none, bare, block, auto, all"):
        refit(elastic, model, {0: 0.5}, windows, "best")


def test_the_artifact_calibration_is_reread_and_checked(tmp_path, text_file):
    folder = tiny_model_folder(tmp_path / "model")
    art = tmp_path / "art"
    config = EPTSConfig(epochs=1, boundaries=(0, .5, .7), ranks=2, mix_weights=(.5, .5),
                        calib=CalibConfig(nsamples=2, seqlen=16))
    elastic = compress(load_model(folder), text_file, config, out=art, progress=False)
    windows = artifact_calibration(elastic)
    assert windows.shape == (2, 16)
    assert json.loads((art / "manifest.json").read_text())["calibration"]["source"] == str(text_file.resolve())
    text_file.write_text("other words entirely, " * 400)
    with pytest.raises(ValueError, match="no longer gives the windows the artifact was trained on"):
        artifact_calibration(elastic)
    assert torch.equal(artifact_calibration(elastic, windows), windows)  # given windows are used as they are
    elastic.calibration = {"source": "tensor", "sha256": None}
    with pytest.raises(ValueError, match="calibrated on windows passed as a tensor"):
        artifact_calibration(elastic)


def test_the_refit_holds_out_windows_of_its_text_and_says_when_there_are_few(tmp_path, text_file, caplog):
    config = EPTSConfig(epochs=1, boundaries=(0, .5, .7), ranks=2, mix_weights=(.5, .5),
                        calib=CalibConfig(nsamples=2, seqlen=16))
    elastic = compress(load_model(tiny_model_folder(tmp_path / "model")), text_file, config, progress=False)
    text = refit_calibration(elastic, heldout=4, progress=False)
    assert text.heldout.shape == (4, 16) and torch.equal(text.windows, artifact_calibration(elastic))
    tokens = elastic.base.tokenizer(text_file.read_text(), return_tensors="pt").input_ids.reshape(-1)
    assert torch.equal(text.heldout[0], tokens[:16]) or torch.equal(text.heldout[0], tokens[16:32])  # from the start
    with caplog.at_level("WARNING"):
        many = refit_calibration(elastic, heldout=10**6, progress=False)
    assert 4 < len(many.heldout) < 10**6 and "fewer than the 1000000 its choice is scored on" in caplog.text
    assert refit_calibration(elastic, heldout=0, progress=False).heldout is None
    assert refit_calibration(elastic, text.windows, progress=False).heldout is None  # ready windows: nothing to hold out


def test_export_with_refit_records_it_and_keeps_exact_sparsity(tmp_path, text_file):
    from epts.api import export

    folder = tiny_model_folder(tmp_path / "model")
    config = EPTSConfig(epochs=1, boundaries=(0, .5, .7), ranks=2, mix_weights=(.5, .5),
                        calib=CalibConfig(nsamples=2, seqlen=16))
    compress(load_model(folder), text_file, config, out=tmp_path / "art", progress=False)
    meta = export(tmp_path / "art", 0.5, tmp_path / "out", refit=RefitConfig("all", mask="elastic"), progress=False)
    assert meta["refit"]["choices"] == ["refit"] * 3 and meta["refit"]["refit_blocks"] == 3
    plain = export(tmp_path / "art", 0.5, tmp_path / "plain", progress=False, refit="none")
    assert "refit" not in plain
    assert meta["total_sparsity"] == pytest.approx(plain["total_sparsity"], abs=1e-12)
    a, b = load_model(tmp_path / "out"), load_model(tmp_path / "plain")
    for (name, x), (_, y) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(x == 0, y == 0) or "proj" not in name, name
    assert any(not torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))
    assert "| refit (kept weights re-solved on the calibration) | all: 3 of 3 blocks, on elastic masks |" in (
        tmp_path / "out" / "README.md").read_text()
    # OBS masks: other masks at exactly the same sparsity, and the card says so.
    obs = export(tmp_path / "art", 0.5, tmp_path / "obs", refit=RefitConfig("all", mask="obs"), progress=False)
    assert obs["refit"]["mask"] == "obs" and obs["total_sparsity"] == pytest.approx(plain["total_sparsity"], abs=1e-12)
    c = load_model(tmp_path / "obs")
    assert any(not torch.equal(x == 0, y == 0) for (name, x), (_, y)
               in zip(c.model.named_parameters(), b.model.named_parameters()) if "proj" in name)
    assert "all: 3 of 3 blocks, on obs masks |" in (tmp_path / "obs" / "README.md").read_text()
    default = export(tmp_path / "art", 0.5, tmp_path / "default", progress=False)["refit"]
    assert default["mode"] == "auto" and default["scored_on"] == "heldout"
    losses = default["losses"]
    assert set(losses) >= {"all", "sparsegpt"} and default["chosen"] == min(losses, key=losses.get)
    card = (tmp_path / "default" / "README.md").read_text()
    assert f"| refit (kept weights re-solved on the calibration) | auto (chose {default['chosen']}):" in card
    assert ("(SparseGPT's solution)" in card) == (default["chosen"] == "sparsegpt")


def test_the_block_margin_keeps_adapters_unless_the_refit_clearly_wins(elastic_tiny):
    elastic, windows = elastic_tiny
    plan = {b: 0.6 for b in range(3)}  # group 2: every block serves it with adapters
    strict = refit(elastic, elastic.materialize(plan), plan, windows, RefitConfig("block", margin=0.999), progress=False)
    assert strict.choices == ["adapters"] * 3
    loose = refit(elastic, elastic.materialize(plan), plan, windows, RefitConfig("block", margin=0.0), progress=False)
    assert loose.choices == ["refit" if r < m else "adapters" for m, r in loose.errors]
    with pytest.raises(ValueError, match="margin in"):
        RefitConfig("block", margin=1.0)


def test_the_ridge_refit_moves_from_the_least_squares_optimum_toward_the_anchor():
    # Issue 19: min ||(w - x) H^1/2||^2 + lambda ||x - a||^2 on the mask, lambda = ridge * mean(diag H).
    pruner, _ = _pruner(seed=3)
    w = pruner.layer.weight.data
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(4)) < 0.6  # True = pruned
    hessian, inverse, _ = pruner.inverse_hessian()
    anchor = (w + 0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(5))).masked_fill(mask, 0.0)
    optimum = _optimum(w, hessian, mask)
    assert torch.equal(masked_least_squares(w, hessian, inverse, mask, 20, ridge=0.0, anchor=anchor),
                       masked_least_squares(w, hessian, inverse, mask, 20))  # ridge 0: today's refit exactly
    distances, previous = [], None
    for ridge in (0.01, 0.1, 1.0, 10.0, 1e4):
        x = masked_least_squares(w, hessian, inverse, mask, 30, ridge=ridge, anchor=anchor)
        assert torch.equal(x == 0, mask)
        lam = ridge * torch.diagonal(hessian).mean()
        # The exact ridge solution, row by row on the kept weights.
        exact = torch.zeros_like(w)
        for i, row in enumerate(~mask):
            hk = hessian[row][:, row]
            exact[i, row] = torch.linalg.solve(hk + lam * torch.eye(int(row.sum())), hessian[row] @ w[i] + lam * anchor[i, row])
        assert torch.allclose(x, exact, atol=1e-4, rtol=1e-4)
        distances.append(((x - anchor).norm() / (optimum - anchor).norm()).item())
        if previous is not None:
            assert (x - optimum).norm() > (previous - optimum).norm()
        previous = x
    assert all(a > b for a, b in zip(distances, distances[1:]))
    assert distances[0] > 0.9 and distances[-1] < 1e-2
    with pytest.raises(ValueError, match="anchor"):
        masked_least_squares(w, hessian, inverse, mask, 5, ridge=1.0)


def test_refit_with_ridge_zero_is_the_refit_and_a_ridge_keeps_the_masks(elastic_tiny):
    elastic, windows = elastic_tiny
    plan = {0: 0.6, 1: 0.3, 2: 0.0}
    weights = {}
    configs = {"plain": RefitConfig("all", mask="elastic"), "zero": RefitConfig("all", ridge=0.0, mask="elastic"),
               "ridge": RefitConfig("all", ridge=1.0, mask="elastic"), "merged": RefitConfig("none")}
    for key, config in configs.items():
        model = elastic.materialize(plan)
        refit(elastic, model, plan, windows, config, progress=False)
        weights[key] = [l.weight.detach().clone() for blk in decoder_blocks(model.model)
                        for l in prunable_linears(model.model, blk).values()]
    assert all(torch.equal(a, b) for a, b in zip(weights["plain"], weights["zero"]))
    for x, p, m in zip(weights["ridge"], weights["plain"], weights["merged"]):
        assert torch.equal(x == 0, m == 0)
    # Between the merged weights and the plain refit in blocks 0-1 (block 2 is dense and untouched).
    moved = [((x - m).norm() / (p - m).norm().clamp_min(1e-12)).item()
             for x, p, m in zip(weights["ridge"], weights["plain"], weights["merged"]) if not torch.equal(p, m)]
    assert moved and all(0 < d < 1 for d in moved)
    with pytest.raises(ValueError, match="ridge"):
        RefitConfig("all", ridge=-1.0)


def test_sparsegpt_reports_the_mask_it_chose_and_a_refit_from_its_solution_reaches_the_optimum():
    pruner, x = _pruner(seed=3)
    w = pruner.layer.weight.data.clone()
    solution, pruned = pruner.prune(Pattern(sparsity=0.5))
    assert torch.equal(solution, pruner.pruned_weight(Pattern(sparsity=0.5)))
    assert torch.equal(pruned.sum(1), torch.full((w.shape[0],), w.shape[1] // 2))
    assert not solution[pruned].any()
    hessian, inverse, _ = pruner.inverse_hessian()
    error = lambda v: ((w - v) @ hessian * (w - v)).sum().item()  # noqa: E731
    best = error(_optimum(w, hessian, pruned))
    from_bare = masked_least_squares(w, hessian, inverse, pruned, iters=2)
    from_obs = masked_least_squares(w, hessian, inverse, pruned, iters=2, start=solution)
    assert torch.equal(from_obs == 0, pruned)
    # OBS's sweep is a good start: two steps from it land nearer the optimum than from the bare mask.
    assert best <= error(from_obs) < error(from_bare) and error(from_obs) < error(solution)


@pytest.mark.parametrize("mode", ["bare", "all"])
def test_refit_mask_obs_rechooses_the_masks_of_the_blocks_it_resolves(elastic_tiny, monkeypatch, mode):
    elastic, windows = elastic_tiny
    monkeypatch.setattr(elastic.blocks[0], "group1_adapter", False)
    monkeypatch.setattr(elastic.blocks[1], "group1_adapter", True)
    plan = {0: 0.3, 1: 0.3, 2: 0.6}  # bare masks, then adapters in blocks 1-2
    chosen, factored = [], []
    real, factor = SparseGPTPruner.prune, SparseGPTPruner._factor
    monkeypatch.setattr(SparseGPTPruner, "prune",
                        lambda self, *a: chosen.append(real(self, *a)) or chosen[-1])
    monkeypatch.setattr(SparseGPTPruner, "_factor", lambda self, *a: factored.append(self) or factor(self, *a))
    model = elastic.materialize(plan)
    report = refit(elastic, model, plan, windows, RefitConfig(mode, mask="obs"), progress=False)
    resolved = [0] if mode == "bare" else [0, 1, 2]
    assert [b for b, c in enumerate(report.choices) if c == "refit"] == resolved and report.mask == "obs"
    # One factorisation per distinct input (q/k/v, o, gate/up, down), for the OBS mask and the solve alike.
    assert len(factored) == 4 * len(resolved)
    layers = [(b, name, layer) for b, blk in enumerate(decoder_blocks(model.model))
              for name, layer in prunable_linears(model.model, blk).items()]
    obs = iter(chosen)
    for b, name, layer in layers:
        elastic_pruned = ~mask_from_ranks(elastic.ranks(b, name), plan[b])
        if b in resolved:  # SparseGPT's mask, in the order the refit solved them, at the same count per row
            _, pruned = next(obs)
            assert torch.equal(layer.weight == 0, pruned) and not torch.equal(pruned, elastic_pruned)
            assert torch.equal(pruned.sum(1), elastic_pruned.sum(1))
        else:
            assert torch.equal(layer.weight == 0, elastic_pruned)
    assert next(obs, None) is None
    with pytest.raises(ValueError, match="refit mask 'wanda' is not one of elastic, obs"):
        RefitConfig(mask="wanda")
    with pytest.raises(ValueError, match="ridge"):
        RefitConfig(mask="obs", ridge=0.5)
