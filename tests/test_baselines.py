import copy

import pytest
import torch

from conftest import random_windows, tiny_model
from epts import Pattern, PruneConfig, prune
from epts.arch import decoder_blocks, prunable_linears
from epts.baselines import METHODS
from epts.config import CalibConfig
from epts.importance import kept_per_row

CALIB = CalibConfig(nsamples=4, seqlen=32, batch_size=2)


def layers(model):
    for block in decoder_blocks(model):
        yield from prunable_linears(model, block).values()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_unstructured_sparsity_is_exact_per_row(method, family):
    loaded = tiny_model(family)
    report = prune(loaded, random_windows(4, 32), PruneConfig(method, Pattern(sparsity=0.6), CALIB), progress=False)
    for layer in layers(loaded.model):
        zeros = (layer.weight == 0).sum(1)
        assert torch.all(zeros == layer.in_features - kept_per_row(layer.in_features, 0.6))
    assert report.total_sparsity == pytest.approx(0.6, abs=0.01)
    assert set(report.layer_sparsity) and all(v == pytest.approx(0.6, abs=0.01) for v in report.layer_sparsity.values())


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_pattern_is_exact(method, nm):
    n, m = nm
    loaded = tiny_model("llama")
    prune(loaded, random_windows(4, 32), PruneConfig(method, Pattern(n=n, m=m), CALIB), progress=False)
    for layer in layers(loaded.model):
        groups = (layer.weight == 0).reshape(layer.out_features, -1, m)
        assert torch.all(groups.sum(-1) == n)


def _layer_inputs(d_in=96, tokens=2048, seed=0):
    """Inputs with uneven channel scales and correlated channels, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5 + torch.eye(d_in)
    scales = torch.exp(torch.randn(d_in, generator=g))
    return (torch.randn(tokens, d_in, generator=g) @ mix) * scales


@pytest.mark.parametrize("pattern", [Pattern(sparsity=0.5), Pattern(sparsity=0.7), Pattern(n=2, m=4)])
def test_sparsegpt_has_the_lowest_layer_output_error(pattern):
    torch.manual_seed(0)
    base = torch.nn.Linear(96, 48, bias=False)
    x = _layer_inputs()
    errors = {}
    for name, cls in METHODS.items():
        layer = copy.deepcopy(base)
        pruner = cls(layer)
        for chunk in x.split(256):
            pruner.add_batch(chunk.unsqueeze(0))
        w = pruner.pruned_weight(pattern)
        errors[name] = ((x @ base.weight.T - x @ w.T) ** 2).mean().item()
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown pruning method 'obs'"):
        prune(tiny_model("llama"), random_windows(2, 16), PruneConfig("obs"), progress=False)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_allocation_spends_the_global_budget_and_spares_the_outlier_block(method):
    """OWL for the single-sparsity baselines: block sparsities differ, the global budget holds,
    every row is exact at its block's sparsity, and the block given large outlier weights keeps
    the most (the lowest sparsity)."""
    loaded = tiny_model("llama")
    blocks = decoder_blocks(loaded.model)
    with torch.no_grad():
        # 1 % of the last block's weights made very large (no block after it sees their outputs).
        blocks[-1].self_attn.q_proj.weight.view(-1)[:400] *= 30.0
    config = PruneConfig(method, Pattern(sparsity=0.5), CALIB, allocation="owl", owl_lambda=0.08)
    report = prune(loaded, random_windows(4, 32), config, progress=False)
    assert len(report.block_sparsity) == len(blocks)
    assert min(report.block_sparsity) == report.block_sparsity[-1] < 0.5 < max(report.block_sparsity)
    assert max(report.block_sparsity) - min(report.block_sparsity) == pytest.approx(0.16, abs=1e-6)
    assert report.total_sparsity == pytest.approx(0.5, abs=0.01)
    for b, block in enumerate(blocks):
        for layer in prunable_linears(loaded.model, block).values():
            zeros = (layer.weight == 0).sum(1)
            assert torch.all(zeros == layer.in_features - kept_per_row(layer.in_features, report.block_sparsity[b]))


def test_owl_allocation_refuses_an_nm_pattern():
    with pytest.raises(ValueError, match="OWL allocation needs an unstructured sparsity"):
        PruneConfig("wanda", Pattern(n=2, m=4), CALIB, allocation="owl")


@pytest.mark.parametrize("family", ["llama", "opt", "gemma3"])
def test_layers_fed_one_input_share_one_hessian_equal_to_their_own(family):
    """q, k and v (and gate and up) see the same input tensor: one Hessian is accumulated for them,
    bit-identical to the one each would accumulate alone."""
    from epts.baselines.sparsegpt import SparseGPTPruner
    from epts.blocks import capture_block_calls

    loaded = tiny_model(family)
    calls = capture_block_calls(loaded.model, random_windows(6, 32, vocab=250), batch_size=2)
    block = decoder_blocks(loaded.model)[0]
    layers = prunable_linears(loaded.model, block)
    shared = {name: SparseGPTPruner(layer) for name, layer in layers.items()}
    fed = []
    for p in shared.values():
        p.add_batch = lambda x, p=p, f=p.add_batch: (fed.append(p), f(x))[1]
    calls.runner(0, block).run_with_input_stats(calls.hidden, {p.layer: p for p in shared.values()})
    alone = {name: SparseGPTPruner(layer) for name, layer in layers.items()}
    handles = [p.layer.register_forward_hook(lambda m, inp, out, p=p: p.add_batch(inp[0])) for p in alone.values()]
    calls.runner(0, block).run(calls.hidden)
    for h in handles:
        h.remove()
    for name in layers:
        assert torch.equal(shared[name].hessian, alone[name].hessian) and shared[name].tokens == alone[name].tokens
    q, k, v = (shared[f"self_attn.{n}_proj"] for n in "qkv")
    assert k.hessian is q.hessian and v.hessian is q.hessian
    if family != "opt":  # OPT's MLP has no gate
        assert shared["mlp.up_proj"].hessian is shared["mlp.gate_proj"].hessian
    # Four inputs: q/k/v's, o's, gate/up's and down's (OPT: q/k/v's, out_proj's, fc1's, fc2's).
    assert len(fed) == 4 * 3  # three batches of two windows
    assert len({id(p.hessian) for p in shared.values()}) == 4


@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_compiled_obs_sweep_gives_the_python_sweeps_bits(sparsity, monkeypatch):
    """SparseGPT's column sweep, compiled (csrc/obs_sweep.cpp) and in Python: the same pruned weights
    and masks to the last bit, dead input channels and a last block narrower than 128 included."""
    from epts.baselines.sparsegpt import SparseGPTPruner
    from epts.sparse import kernels

    if not kernels.available():
        pytest.skip(f"compiled kernels absent: {kernels.unavailable_reason()}")
    torch.manual_seed(1)
    layer = torch.nn.Linear(300, 70, bias=False)
    pruner = SparseGPTPruner(layer)
    x = torch.randn(512, 300) * torch.rand(300) * 3
    x[:, :5] = 0  # dead channels
    pruner.add_batch(x)
    compiled = pruner.prune(Pattern(sparsity=sparsity))
    calls = []
    monkeypatch.setattr(kernels, "obs_sweep", lambda *a: calls.append(1) or pytest.fail("compiled sweep used"))
    monkeypatch.setattr(kernels, "available", lambda: False)
    python = pruner.prune(Pattern(sparsity=sparsity))
    assert torch.equal(compiled[0].view(torch.int32), python[0].view(torch.int32))  # bits, signed zeros too
    assert torch.equal(compiled[1], python[1]) and not calls
    assert (compiled[0] == 0).sum(1).eq(300 - kept_per_row(300, sparsity)).all()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_input_stats_without_outputs_are_the_same_bits_and_stop_each_batch_early(family):
    """`collect_input_stats` feeds the statistics `run_with_input_stats` feeds, bit for bit, and
    after the first batch ends each forward once the last prunable layer's input is fed, before
    that layer computes: it and the block complete once, not once per batch."""
    from epts.baselines.sparsegpt import SparseGPTPruner
    from epts.blocks import capture_block_calls

    loaded = tiny_model(family)
    calls = capture_block_calls(loaded.model, random_windows(6, 32, vocab=250), batch_size=2)
    block = decoder_blocks(loaded.model)[0]
    layers = prunable_linears(loaded.model, block)
    full = {name: SparseGPTPruner(layer) for name, layer in layers.items()}
    calls.runner(0, block).run_with_input_stats(calls.hidden, {p.layer: p for p in full.values()})
    early = {name: SparseGPTPruner(layer) for name, layer in layers.items()}
    completed, last_layer = [], list(layers.values())[-1]  # the down projection (OPT: fc2)
    handles = [m.register_forward_hook(lambda m, *args: completed.append(m)) for m in (block, last_layer)]
    calls.runner(0, block).collect_input_stats(calls.hidden, {p.layer: p for p in early.values()})
    for h in handles:
        h.remove()
    assert completed.count(block) == 1 and completed.count(last_layer) == 1  # of three batches: the first
    for name in layers:
        assert torch.equal(early[name].hessian, full[name].hessian) and early[name].tokens == full[name].tokens == 6 * 32
    assert early["self_attn.k_proj"].hessian is early["self_attn.q_proj"].hessian


def test_input_stats_without_outputs_name_the_block_whose_activations_overflow():
    from epts.baselines.sparsegpt import SparseGPTPruner
    from epts.blocks import NonFiniteActivationError, capture_block_calls

    loaded = tiny_model("llama")
    calls = capture_block_calls(loaded.model, random_windows(4, 16, vocab=250), batch_size=2)
    block = decoder_blocks(loaded.model)[0]
    layers = prunable_linears(loaded.model, block)
    with torch.no_grad():
        layers["mlp.up_proj"].weight[0, 0] = float("inf")
    pruners = {name: SparseGPTPruner(layer) for name, layer in layers.items()}
    with pytest.raises(NonFiniteActivationError, match="block 1 of"):
        calls.runner(0, block).collect_input_stats(calls.hidden, {p.layer: p for p in pruners.values()})


def test_layers_sharing_a_hessian_factor_it_once_and_prune_to_the_bits_of_their_own(monkeypatch):
    """q, k and v share one Hessian (`share`): the first to prune factors it, the others take the
    same factors; each pruned weight is bit-identical to that of a pruner with its own Hessian, and
    more calibration tokens for the shared Hessian are factored anew."""
    from epts.baselines.sparsegpt import SparseGPTPruner

    torch.manual_seed(3)
    layers = [torch.nn.Linear(48, d_out, bias=False) for d_out in (20, 12, 12)]
    x, more = torch.randn(2, 256, 48) * torch.rand(48) * 2
    shared = [SparseGPTPruner(layer) for layer in layers]
    shared[0].add_batch(x)
    for p in shared[1:]:
        p.share(shared[0])
    factored = []
    factor = SparseGPTPruner._factor
    monkeypatch.setattr(SparseGPTPruner, "_factor", lambda self, *a: factored.append(self) or factor(self, *a))
    pattern = Pattern(sparsity=0.6)
    for rounds in (1, 2):
        if rounds == 2:
            shared[0].add_batch(more)
        alone = [SparseGPTPruner(layer) for layer in layers]
        for p in alone:
            p.add_batch(x)
            if rounds == 2:
                p.add_batch(more)
        before = len(factored)
        solved = [p.prune(pattern) for p in shared]
        assert len(factored) - before == 1
        for (w, mask), p in zip(solved, alone):
            w_alone, mask_alone = p.prune(pattern)
            assert torch.equal(w.view(torch.int32), w_alone.view(torch.int32)) and torch.equal(mask, mask_alone)
    assert not torch.equal(solved[0][0], layers[0].weight.data)
