import torch

from conftest import random_windows, tiny_model
from epts import hilora
from epts.arch import decoder_blocks, prunable_linears
from epts.blocks import capture_block_calls
from epts.importance import row_ranks
from epts.mixer import draw_mix_sparsities, mix_features


def test_msfm_output_is_the_weighted_sum_of_each_group_output():
    loaded = tiny_model("llama")
    calls = capture_block_calls(loaded.model, random_windows(3, 16))
    block = decoder_blocks(loaded.model)[0]
    runner = calls.runner(0, block)
    originals = prunable_linears(loaded.model, block)
    layers = hilora.attach(block, originals, {n: row_ranks(l.weight.abs()) for n, l in originals.items()}, (2, 2, 2))
    with torch.no_grad():
        for layer in layers.values():
            for b in layer.B:
                b.normal_(std=0.1)
    sparsities, weights, uses = [0.2, 0.5, 0.7], (0.2, 0.3, 0.5), [False, True, True]
    mixed = mix_features(runner, layers, calls.hidden, sparsities, weights, group1_adapter=False)
    expected = torch.zeros_like(mixed)
    for k in range(3):
        hilora.set_state(layers, sparsities[k], k, uses[k])
        expected += weights[k] * runner.run(calls.hidden)
    torch.testing.assert_close(mixed, expected)
    # Mixing really mixes: it differs from any single group's output.
    hilora.set_state(layers, 0.7, 2)
    assert (mixed - runner.run(calls.hidden)).abs().max() > 1e-4
    hilora.detach(block, originals)


def test_mix_sparsities_fall_in_their_groups():
    groups = [(0.0, 0.4), (0.4, 0.45), (0.65, 0.7)]
    draws = draw_mix_sparsities(groups, torch.Generator().manual_seed(0))
    assert all(lo < s <= hi for s, (lo, hi) in zip(draws, groups))
