import pytest
import torch

from epts.importance import (
    InputNormStats,
    Pattern,
    kept_per_row,
    mask_from_ranks,
    nm_mask,
    importance_scores,
    ria_scores,
    row_ranks,
    wanda_scores,
)


def test_unstructured_mask_has_exact_per_row_sparsity():
    scores = torch.rand(37, 100, generator=torch.Generator().manual_seed(0))
    ranks = row_ranks(scores)
    for s in (0.0, 0.3, 0.5, 0.55, 0.7, 0.99):
        kept = mask_from_ranks(ranks, s).sum(1)
        assert torch.all(kept == kept_per_row(100, s)), s
    assert kept_per_row(1000, 0.3) == 700 and kept_per_row(576, 0.7) == 172


def test_mask_keeps_the_highest_scores_of_each_row():
    scores = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    mask = mask_from_ranks(row_ranks(scores), 0.6)
    for i in range(8):
        assert scores[i][mask[i]].min() > scores[i][~mask[i]].max()


def test_masks_from_one_score_are_nested():
    scores = torch.rand(16, 64, generator=torch.Generator().manual_seed(2))
    ranks = row_ranks(scores)
    sparsities = [0.0, 0.1, 0.35, 0.4, 0.41, 0.5, 0.65, 0.7, 0.9]
    masks = [mask_from_ranks(ranks, s) for s in sparsities]
    for lo, hi in zip(masks, masks[1:]):
        assert torch.all(lo | ~hi), "a weight kept at higher sparsity was dropped at lower sparsity"
        assert lo.sum() >= hi.sum()


def test_ties_break_deterministically_towards_lower_index():
    scores = torch.ones(3, 10)
    mask = mask_from_ranks(row_ranks(scores), 0.5)
    assert torch.equal(mask, torch.tensor([[True] * 5 + [False] * 5] * 3))


def test_nm_mask_is_exact():
    scores = torch.rand(12, 64, generator=torch.Generator().manual_seed(3))
    for n, m in ((2, 4), (4, 8), (1, 4)):
        keep = nm_mask(scores, n, m).reshape(12, 64 // m, m)
        assert torch.all((~keep).sum(-1) == n)
        # The pruned ones are the lowest of their group.
        g = scores.reshape(12, 64 // m, m)
        assert torch.all(g.masked_fill(~keep, float("inf")).min(-1).values >= g.masked_fill(keep, -1).max(-1).values)
    with pytest.raises(ValueError, match="multiple of 8"):
        nm_mask(torch.rand(2, 12), 4, 8)


def test_wanda_scores_weight_input_norms():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    stats = InputNormStats(2)
    stats.add_batch(torch.tensor([[[3.0, 0.0], [4.0, 1.0]]]))
    assert torch.allclose(stats.norm(), torch.tensor([5.0, 1.0]))
    assert torch.allclose(wanda_scores(w, stats.norm()), torch.tensor([[5.0, 2.0], [15.0, 0.5]]))


def test_ria_scores_weigh_each_weight_against_its_row_and_its_input_channel():
    w = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.5, 0.0]])
    norms = torch.tensor([4.0, 1.0, 9.0])
    # rows sum to 3 and 3.5, columns to 4, 2.5 and 0 (an all-zero column scores 0, not NaN)
    expected = torch.tensor([[(1 / 3 + 1 / 4) * 2, (2 / 3 + 2 / 2.5) * 1, 0.0],
                             [(3 / 3.5 + 3 / 4) * 2, (0.5 / 3.5 + 0.5 / 2.5) * 1, 0.0]])
    assert torch.allclose(ria_scores(w, norms), expected)
    assert torch.equal(importance_scores(w, norms, "ria"), ria_scores(w, norms))
    # Within row 0 Wanda ranks channel 0 first (4 against 2), RIA channel 1 (1.47 against 1.17): the
    # column term can reorder a row.
    assert row_ranks(wanda_scores(w, norms))[0, 0] == 0 and row_ranks(ria_scores(w, norms))[0, 1] == 0
    assert torch.equal(importance_scores(w, None, "ria"), w.abs())  # no norms recorded: magnitude
    with pytest.raises(ValueError, match="criterion 'obs' is not one of wanda, magnitude, ria"):
        importance_scores(w, norms, "obs")


@pytest.mark.parametrize("text", ["1.0", "-0.1", "2:2", "0:4", "a:b", "x", "3:2"])
def test_bad_patterns_are_rejected(text):
    with pytest.raises(ValueError):
        Pattern.parse(text)


def test_patterns_parse():
    assert Pattern.parse("2:4") == Pattern(n=2, m=4) and str(Pattern.parse("2:4")) == "2:4"
    assert Pattern.parse("0.7").sparsity == 0.7 and str(Pattern.parse("0.7")) == "0.7"
