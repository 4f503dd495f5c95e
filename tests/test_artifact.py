import json

import pytest
import torch

from conftest import random_windows, tiny_model
from epts.arch import decoder_blocks, prunable_linears
from epts.artifact import ArtifactError, ElasticModel
from epts.runtime import RuntimeModel
from epts.config import CalibConfig, EPTSConfig
from epts.importance import kept_per_row
from epts.reconstruct import compress


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    elastic = compress(tiny_model("llama"), random_windows(4, 32),
                       EPTSConfig(epochs=1, calib=CalibConfig(nsamples=4, seqlen=32, batch_size=2)), progress=False)
    # Force one group-1 mark, to check it survives the round trip and disables the adapter.
    elastic.blocks[1].group1_adapter = False
    return elastic, elastic.save(tmp_path_factory.mktemp("art") / "artifact")


def weights(loaded):
    return {f"{b}.{n}": l.weight.clone() for b, blk in enumerate(decoder_blocks(loaded.model))
            for n, l in prunable_linears(loaded.model, blk).items()}


def test_reload_materialises_identical_weights(saved):
    elastic, path = saved
    reloaded = ElasticModel.load(path, base=tiny_model("llama"))
    for s in (0.0, 0.35, 0.5, 0.7):
        a, b = weights(elastic.materialize(s)), weights(reloaded.materialize(s))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert reloaded.blocks[1].group1_adapter is False


def test_materialised_model_is_plain_and_exactly_sparse(saved):
    elastic, _ = saved
    model = elastic.materialize(0.6).model
    for blk in decoder_blocks(model):
        for layer in prunable_linears(model, blk).values():
            assert type(layer) is torch.nn.Linear
            assert torch.all((layer.weight == 0).sum(1) == layer.in_features - kept_per_row(layer.in_features, 0.6))
    assert not any("lora" in n or ".A." in n for n, _ in model.named_parameters())


def test_group1_mark_disables_the_adapter(saved):
    elastic, _ = saved
    base = elastic.base.model
    s = 0.3
    for b in (0, 1):
        layer = prunable_linears(base, decoder_blocks(base)[b])["mlp.up_proj"]
        masked_base = layer.weight * (elastic.ranks(b, "mlp.up_proj") < kept_per_row(layer.in_features, s))
        merged = elastic.merged_weight(b, "mlp.up_proj", layer, s)
        if elastic.blocks[b].group1_adapter:
            assert not torch.equal(merged, masked_base)
        else:
            assert torch.equal(merged, masked_base)


def test_non_uniform_materialisation(saved):
    elastic, _ = saved
    w = weights(elastic.materialize({0: 0.7, 2: 0.4}))
    assert (w["0.mlp.up_proj"] == 0).float().mean().item() == pytest.approx(0.7, abs=0.02)
    assert torch.count_nonzero(w["1.mlp.up_proj"] == 0) == 0  # left out: dense
    assert (w["2.mlp.up_proj"] == 0).float().mean().item() == pytest.approx(0.4, abs=0.02)


def test_out_of_range_sparsity_is_refused(saved):
    elastic, _ = saved
    with pytest.raises(ValueError, match=r"sparsity 0.8 is outside the trained range \[0, 0.7\]"):
        elastic.materialize(0.8)
    with pytest.raises(ValueError, match="block indices \\[9\\] do not exist"):
        elastic.materialize({9: 0.5})


def test_artifact_is_small_and_refuses_another_base(saved):
    elastic, path = saved
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and len(manifest["blocks"]) == 3
    assert not (path / "model.safetensors").exists()
    with pytest.raises(ArtifactError, match="fingerprint"):
        ElasticModel.load(path, base=tiny_model("llama", seed=1))


def test_damaged_tensor_file_is_named(saved, tmp_path):
    import shutil

    _, path = saved
    copy = shutil.copytree(path, tmp_path / "copy")
    data = (copy / "adapters.safetensors").read_bytes()
    (copy / "adapters.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="adapters.safetensors is missing or damaged"):
        ElasticModel.load(copy, base=tiny_model("llama"))


def test_newer_format_version_is_refused(saved, tmp_path):
    import shutil

    _, path = saved
    copy = shutil.copytree(path, tmp_path / "newer")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="has artifact format 99; this epts reads up to 1: upgrade epts"):
        ElasticModel.load(copy, base=tiny_model("llama"))


def test_runtime_switching_equals_a_fresh_materialisation(saved):
    elastic, _ = saved
    runtime = RuntimeModel(elastic, 0.7)
    ids = random_windows(2, 16, seed=3)
    for target in (0.3, {0: 0.6, 2: 0.45}, 0.55, 0.7):
        runtime.set_sparsity(target)
        # Blocks a mapping leaves out keep their sparsity (block 1 stays at 0.3 here).
        fresh = elastic.materialize(target if not isinstance(target, dict) else {1: 0.3, **target})
        with torch.no_grad():
            torch.testing.assert_close(runtime.model(ids).logits, fresh.model(ids).logits, rtol=0, atol=0)
    assert runtime.sparsity == {0: 0.7, 1: 0.7, 2: 0.7}
    # The base model is never touched by a switch.
    base_w = prunable_linears(elastic.base.model, decoder_blocks(elastic.base.model)[0])["mlp.up_proj"].weight
    assert torch.count_nonzero(base_w == 0) == 0


def test_save_pretrained_and_from_pretrained_round_trip(saved, tmp_path):
    elastic, _ = saved
    path = elastic.save_pretrained(tmp_path / "again")
    reloaded = ElasticModel.from_pretrained(path, base=tiny_model("llama"))
    a, b = weights(elastic.materialize(0.55)), weights(reloaded.materialize(0.55))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_artifact_keeps_the_masks_of_its_criterion(tmp_path):
    """Trained with RIA's importance, the artifact reloads with RIA's ranks (not Wanda's), so the
    served masks are those the adapters were trained under."""
    from epts.importance import importance_scores, row_ranks

    config = EPTSConfig(epochs=1, boundaries=(0, .5, .7), ranks=2, mix_weights=(.5, .5), criterion="ria",
                        calib=CalibConfig(nsamples=4, seqlen=32))
    loaded = tiny_model("llama")
    compress(loaded, random_windows(4, 32, vocab=250), config, out=tmp_path / "art", progress=False)
    elastic = ElasticModel.load(tmp_path / "art", base=loaded)
    assert elastic.config.criterion == "ria"
    layer = prunable_linears(loaded.model, decoder_blocks(loaded.model)[1])["mlp.down_proj"]
    norms = elastic.blocks[1].input_norms["mlp.down_proj"]
    ria, wanda = (row_ranks(importance_scores(layer.weight, norms, c)) for c in ("ria", "wanda"))
    assert not torch.equal(ria, wanda)
    assert torch.equal(elastic.ranks(1, "mlp.down_proj").long(), ria.long())
