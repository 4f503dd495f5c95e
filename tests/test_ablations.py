"""The paper's two structural ablations as config options: independent per-group adapters
(EPTSConfig.inherit_adapters False) and dense-feature propagation (EPTSConfig.propagate "dense");
two variants of group 1: an adapter the groups above do not inherit (group1_inherited False),
trained on the dense stream (group1_stream "dense"); and adapters ramped over their group's interval
(adapter_ramp)."""

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import random_windows, tiny_model
from epts import reconstruct
from epts.arch import decoder_blocks, prunable_linears
from epts.artifact import ElasticModel
from epts.runtime import RuntimeModel
from epts.config import CalibConfig, EPTSConfig
from epts.hilora import ElasticLinear, active_adapters, adapter_scales
from epts.importance import kept_per_row, row_ranks

GROUP3 = 0.48  # in (0.45, 0.50]: group 3 of the default groups, 0-based index 2


def small_config(**kw):
    return EPTSConfig(epochs=1, calib=CalibConfig(nsamples=4, seqlen=32, batch_size=2), **kw)


def test_active_adapters_hierarchy_by_default_own_adapter_when_independent():
    assert [list(active_adapters(k)) for k in range(3)] == [[0], [0, 1], [0, 1, 2]]
    assert [list(active_adapters(k, inherit=False)) for k in range(3)] == [[0], [1], [2]]
    # A dropped group-1 adapter leaves group 1 bare either way, and does not touch the groups above.
    for inherit in (True, False):
        assert list(active_adapters(0, False, inherit)) == []
    assert list(active_adapters(2, False)) == [0, 1, 2]
    assert list(active_adapters(2, False, inherit=False)) == [2]
    # group1_inherited False: group 1 keeps its own adapter, the hierarchy starts at group 2.
    assert [list(active_adapters(k, group1_inherited=False)) for k in range(3)] == [[0], [1], [1, 2]]
    assert list(active_adapters(0, False, group1_inherited=False)) == []


def test_independent_layer_computes_and_trains_only_its_own_adapter():
    torch.manual_seed(0)
    base = nn.Linear(40, 24)
    layer = ElasticLinear(base, row_ranks(base.weight.abs()), [3, 2, 4], inherit=False)
    with torch.no_grad():
        for b in layer.B:
            b.normal_()
    layer.set_state(0.5, 2)
    mask = layer.ranks < kept_per_row(40, 0.5)
    torch.testing.assert_close(layer.effective_weight(), (base.weight + layer.B[2] @ layer.A[2]) * mask)
    layer(torch.randn(5, 40)).pow(2).sum().backward()
    assert layer.A[2].grad.abs().sum() > 0 and layer.B[2].grad.abs().sum() > 0
    assert all(layer.A[j].grad is None and layer.B[j].grad is None for j in (0, 1))


def merged_and_expected(elastic, block, name, sparsity):
    """The artifact's merged weight and M(s) * (W + [sum of] the listed adapters), for adapters 0..2 and 2."""
    layer = prunable_linears(elastic.base.model, decoder_blocks(elastic.base.model)[block])[name]
    a, b = elastic.blocks[block].adapters[name]
    mask = elastic.ranks(block, name) < kept_per_row(layer.in_features, sparsity)
    inherited = (layer.weight + sum(b[j] @ a[j] for j in range(3))) * mask
    own = (layer.weight + b[2] @ a[2]) * mask
    return elastic.merged_weight(block, name, layer, sparsity), inherited, own


@pytest.fixture(scope="module")
def independent(tmp_path_factory):
    elastic = reconstruct.compress(tiny_model("llama"), random_windows(4, 32), small_config(inherit_adapters=False),
                                   progress=False)
    return ElasticModel.load(elastic.save(tmp_path_factory.mktemp("art") / "independent"), base=tiny_model("llama"))


def test_independent_artifact_merges_only_the_group3_adapter(independent):
    assert independent.config.inherit_adapters is False  # stored in the manifest, read back
    for block in range(3):
        merged, inherited, own = merged_and_expected(independent, block, "mlp.up_proj", GROUP3)
        torch.testing.assert_close(merged, own, rtol=1e-6, atol=1e-6)
        assert (merged - inherited).abs().max() > 1e-4, "adapters 1 and 2 must be left out"
    # The runtime (in-place switching) merges by the same rule.
    runtime = RuntimeModel(independent, GROUP3)
    served = prunable_linears(runtime.model, decoder_blocks(runtime.model)[1])["mlp.up_proj"].weight
    torch.testing.assert_close(served, merged_and_expected(independent, 1, "mlp.up_proj", GROUP3)[2],
                               rtol=1e-6, atol=1e-6)


def test_default_artifact_still_inherits():
    elastic = reconstruct.compress(tiny_model("llama"), random_windows(4, 32), small_config(), progress=False)
    assert elastic.config.inherit_adapters is True and elastic.config.propagate == "msfm"
    merged, inherited, own = merged_and_expected(elastic, 1, "mlp.up_proj", GROUP3)
    torch.testing.assert_close(merged, inherited, rtol=1e-6, atol=1e-6)
    assert (merged - own).abs().max() > 1e-4


COMPRESS_BLOCK = reconstruct.compress_block


def streams_of(config, monkeypatch):
    """compress with `config`; returns per block the (adapters, next dense stream, next elastic stream)."""
    seen = []
    original = COMPRESS_BLOCK

    def spy(*args, **kwargs):
        state, streams = original(*args, **kwargs)
        seen.append((state.adapters, streams.dense, streams.elastic))
        return state, streams

    monkeypatch.setattr(reconstruct, "compress_block", spy)
    reconstruct.compress(tiny_model("llama"), random_windows(4, 32), config, progress=False)
    return seen


def test_dense_propagation_feeds_the_next_block_the_dense_stream(monkeypatch):
    msfm = streams_of(small_config(), monkeypatch)
    dense = streams_of(small_config(propagate="dense"), monkeypatch)
    for _, h, p in dense:
        assert torch.equal(p, h)
    for _, h, p in msfm:  # the mixer's stream is not the dense one
        assert (p - h).abs().max() > 1e-5
    # Block 1 sees the same input (both streams start as the embeddings) and learns the same adapters;
    # from block 2 on its input differs, and so do its adapters.
    def same_adapters(b):
        return all(torch.equal(x, y) for n in msfm[b][0] for x, y in zip(sum(msfm[b][0][n], []), sum(dense[b][0][n], [])))

    assert same_adapters(0) and not same_adapters(1) and not same_adapters(2)


def test_group1_not_inherited_artifact_merges_adapters_2_and_3_only():
    elastic = reconstruct.compress(tiny_model("llama"), random_windows(4, 32), small_config(group1_inherited=False),
                                   progress=False)
    layer = prunable_linears(elastic.base.model, decoder_blocks(elastic.base.model)[1])["mlp.up_proj"]
    a, b = elastic.blocks[1].adapters["mlp.up_proj"]
    mask = elastic.ranks(1, "mlp.up_proj") < kept_per_row(layer.in_features, GROUP3)
    torch.testing.assert_close(elastic.merged_weight(1, "mlp.up_proj", layer, GROUP3),
                               (layer.weight + b[1] @ a[1] + b[2] @ a[2]) * mask, rtol=1e-6, atol=1e-6)
    assert (b[0] @ a[0]).abs().max() > 1e-4, "group 1's adapter trained, and is left out above group 1"


def test_group1_stream_dense_trains_group1_on_the_dense_stream(monkeypatch):
    """Every gradient-taking group-1 call of block 3 gets windows of the dense stream entering it,
    every other group's training call windows of the elastic stream; in the default, group 1 too."""
    def calls_of(config):
        entering, seen = [], []
        original_block, original_call = reconstruct.compress_block, reconstruct.call_block

        def spy_block(model, b, calls, streams, *args, **kwargs):
            entering.append(streams)
            return original_block(model, b, calls, streams, *args, **kwargs)

        def spy_call(runner, hidden):
            layer = next(m for m in runner.block.modules() if isinstance(m, ElasticLinear))
            if torch.is_grad_enabled() and runner.name.startswith("block 3 "):
                seen.append((layer.adapters.stop == 1, hidden.clone()))
            return original_call(runner, hidden)

        monkeypatch.setattr(reconstruct, "compress_block", spy_block)
        monkeypatch.setattr(reconstruct, "call_block", spy_call)
        reconstruct.compress(tiny_model("llama"), random_windows(4, 32), config, progress=False)
        monkeypatch.undo()
        return entering[2], seen

    def source(hidden, streams):
        if any(torch.equal(hidden[0], w) for w in streams.dense):
            return "dense"
        return "elastic" if any(torch.equal(hidden[0], w) for w in streams.elastic) else "neither"

    for stream in ("dense", "elastic"):
        streams, seen = calls_of(small_config(group1_stream=stream))
        assert (streams.dense - streams.elastic).abs().max() > 1e-5, "block 3's two streams differ"
        group1 = {source(h, streams) for first, h in seen if first}
        others = {source(h, streams) for first, h in seen if not first}
        assert group1 == {stream} and others == {"elastic"}, (stream, group1, others)


def test_train_block_refuses_a_dense_group1_without_the_dense_stream():
    x = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="group1_stream 'dense' needs the dense stream"):
        reconstruct.train_block(None, {}, x, x, small_config(group1_stream="dense"), torch.Generator(), 1e-3, False)


def test_unknown_group1_stream_is_refused():
    with pytest.raises(ValueError, match="group1_stream 'mixed' is not elastic, dense or alternate"):
        EPTSConfig(group1_stream="mixed")


def test_group1_detached_groups_above_compute_with_group1_adapter_but_do_not_train_it():
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=False)
    ranks = row_ranks(torch.rand(12, 16))

    def grads(detached, group):
        layer = ElasticLinear(base, ranks, (2, 2, 2), torch.Generator().manual_seed(0), group1_detached=detached)
        with torch.no_grad():
            for b in layer.B:
                b.normal_(generator=torch.Generator().manual_seed(1))
        layer.set_state(0.3, group)
        out = layer(torch.randn(5, 16, generator=torch.Generator().manual_seed(2)))
        out.square().sum().backward()
        return out.detach(), [p.grad for p in (*layer.A, *layer.B)]

    for group in (1, 2):
        out, plain = grads(False, group)
        out_detached, detached = grads(True, group)
        torch.testing.assert_close(out_detached, out, rtol=0, atol=0)  # the same forward: group 1 is inherited
        assert detached[0] is None and detached[3] is None, "group 1's A and B get no gradient from a group above"
        assert plain[0].abs().max() > 0 and plain[3].abs().max() > 0
        for i in (1, 4, group, group + 3):  # the group's own adapters (and those between) train as before
            torch.testing.assert_close(detached[i], plain[i], rtol=0, atol=0)
    _, own = grads(True, 0)
    assert own[0].abs().max() > 0 and own[3].abs().max() > 0, "group 1 itself still trains its adapter"


def test_group1_detached_needs_inheritance():
    for fields in ({"group1_inherited": False}, {"inherit_adapters": False}):
        with pytest.raises(ValueError, match="group1_detached needs the groups above to inherit"):
            EPTSConfig(group1_detached=True, **fields)


def test_unknown_propagation_is_refused():
    with pytest.raises(ValueError, match="propagate 'lowest' is not msfm or dense"):
        EPTSConfig(propagate="lowest")


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "benchmarks" / "experiments").rglob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_variant_file_is_a_valid_config(path):
    from benchmarks.experiments import load_variant

    name, description, calibration, fields = load_variant(path)
    assert name == path.stem and description, "every variant says what it changes"
    assert calibration in ("file", "self-generated")
    EPTSConfig.from_dict(fields)


BOUNDS = (0.0, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)


def test_adapter_scales_ramp_each_adapter_over_its_own_group():
    assert adapter_scales(range(3), 0.47, BOUNDS, "none") == [1.0, 1.0, 1.0]
    # group1: only adapter 1 ramps, s / 0.4 inside group 1, full size above it.
    assert adapter_scales(range(1), 0.1, BOUNDS, "group1") == pytest.approx([0.25])
    assert adapter_scales(range(3), 0.47, BOUNDS, "group1") == [1.0, 1.0, 1.0]
    # all: adapter j at (s - lo_j) / (hi_j - lo_j), the inherited ones at 1.
    assert adapter_scales(range(3), 0.47, BOUNDS, "all") == pytest.approx([1.0, 1.0, 0.4])
    assert adapter_scales(range(1), 0.4, BOUNDS, "all") == [1.0]
    assert adapter_scales(range(1, 3), 0.47, BOUNDS, "all") == pytest.approx([1.0, 0.4])  # group1_inherited False
    with pytest.raises(ValueError, match="adapter_ramp .linear. is not one of"):
        adapter_scales(range(1), 0.3, BOUNDS, "linear")


def test_ramped_group1_adapter_enters_and_trains_at_s_over_0_4():
    torch.manual_seed(0)
    base = nn.Linear(40, 24)
    ranks = row_ranks(base.weight.abs())
    layers = {ramp: ElasticLinear(base, ranks, (2, 2), torch.Generator().manual_seed(0), boundaries=(0.0, 0.4, 0.7),
                                  ramp=ramp) for ramp in ("none", "group1")}
    with torch.no_grad():
        for layer in layers.values():
            layer.B[0].copy_(torch.randn(24, 2, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(6, 40)
    for layer in layers.values():
        layer.set_state(0.1, 0)
        layer(x).pow(2).sum().backward()
    mask = ranks < kept_per_row(40, 0.1)
    update = layers["none"].B[0] @ layers["none"].A[0]
    torch.testing.assert_close(layers["group1"].effective_weight(), (base.weight + 0.25 * update) * mask)
    # The gradient reaching B_1 is 0.25 x the masked weight gradient times A_1^T, at the ramped weight.
    ramped = layers["group1"]
    weight_grad = 2 * ramped(x).detach().T @ x  # d sum(out^2) / d W_eff
    torch.testing.assert_close(ramped.B[0].grad, 0.25 * (weight_grad * mask) @ ramped.A[0].detach().T,
                               rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ramped.B[0].grad, layers["none"].B[0].grad)
    with pytest.raises(ValueError, match="adapter_ramp 'group1' needs the 3 group boundaries"):
        ElasticLinear(base, ranks, (2, 2), ramp="group1")


def test_unknown_adapter_ramp_is_refused():
    with pytest.raises(ValueError, match="adapter_ramp 'linear' is not none, group1 or all"):
        EPTSConfig(adapter_ramp="linear")


@pytest.mark.parametrize("ramp", ["none", "all"])
def test_ramped_artifact_merges_as_trained_and_is_continuous_across_a_group_edge(ramp):
    """The artifact's merge applies the ramp the training used; with every adapter ramped the merged
    weight just above a group's upper edge equals the one at the edge (same mask), without it it jumps
    by the upper group's whole adapter."""
    elastic = reconstruct.compress(tiny_model("llama"), random_windows(4, 32), small_config(adapter_ramp=ramp),
                                   progress=False)
    name = "mlp.up_proj"
    layer = prunable_linears(elastic.base.model, decoder_blocks(elastic.base.model)[1])[name]
    a, b = elastic.blocks[1].adapters[name]
    mask = elastic.ranks(1, name) < kept_per_row(layer.in_features, GROUP3)
    c = 0.6 if ramp == "all" else 1.0  # GROUP3 = 0.48 is 60 % through (0.45, 0.5]
    torch.testing.assert_close(elastic.merged_weight(1, name, layer, GROUP3),
                               (layer.weight + b[0] @ a[0] + b[1] @ a[1] + c * b[2] @ a[2]) * mask, rtol=1e-5, atol=1e-6)
    edge, above = 0.45, 0.45 + 1e-6
    assert kept_per_row(layer.in_features, edge) == kept_per_row(layer.in_features, above)
    jump = (elastic.merged_weight(1, name, layer, above) - elastic.merged_weight(1, name, layer, edge)).abs().max()
    if ramp == "all":
        assert jump < 1e-5
    else:
        assert jump > 1e-4, "group 3's adapter trained, and enters whole above the edge"
