"""Block-streamed models: the same numbers as a model in memory, with one block in memory at a time."""

import pytest
import torch

from conftest import FAMILIES, random_windows, tiny_model, tiny_model_folder
from epts.arch import decoder_blocks
from epts.config import CalibConfig, EPTSConfig
from epts.evaluate import mean_nll
from epts.models import fingerprint, load_model
from epts.reconstruct import compress


def resident_blocks(model) -> int:
    return sum(any(not p.is_meta for p in block.parameters()) for block in decoder_blocks(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_compress_equals_the_in_memory_one_with_one_block_resident(tmp_path, family):
    folder = tiny_model_folder(tmp_path / "model", family)
    whole, streamed = load_model(folder), load_model(folder, stream=True)
    assert resident_blocks(streamed.model) == 0 and resident_blocks(whole.model) == 3
    assert fingerprint(streamed.model) == fingerprint(whole.model)
    windows = random_windows(4, 32, vocab=250)
    assert mean_nll(streamed.model, windows) == mean_nll(whole.model, windows)

    most = []
    for block in decoder_blocks(streamed.model):
        block.register_forward_pre_hook(lambda *_: most.append(resident_blocks(streamed.model)))
    config = EPTSConfig(epochs=1, boundaries=(0, .5, .7), ranks=2, mix_weights=(.5, .5),
                        calib=CalibConfig(nsamples=4, seqlen=32))
    expected = compress(whole, windows, config, progress=False)
    got = compress(streamed, windows, config, progress=False)
    assert most and max(most) == 1, "more than one block held in memory at once"
    assert resident_blocks(streamed.model) == 0, "a block was left in memory"
    assert got.base_fingerprint == expected.base_fingerprint
    for mine, theirs in zip(got.blocks, expected.blocks):
        assert mine.adapters.keys() == theirs.adapters.keys() and mine.group1_adapter == theirs.group1_adapter
        for name, (a, b) in mine.adapters.items():
            assert all(torch.equal(x, y) for x, y in zip(a + b, theirs.adapters[name][0] + theirs.adapters[name][1]))
            assert torch.equal(mine.input_norms[name], theirs.input_norms[name])


def test_a_checkpoint_missing_a_block_tensor_is_refused_when_streamed_too(tmp_path):
    from safetensors.torch import load_file, save_file

    from epts.models import ModelLoadError

    folder = tiny_model_folder(tmp_path / "model")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lacks tensors its config needs: model.layers.1.mlp.up_proj.weight"):
        load_model(folder, stream=True)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_streamed_prune_saves_block_by_block_the_same_model(tmp_path, method):
    from safetensors.torch import load_file

    from epts import Pattern, PruneConfig, prune, save_model

    folder = tiny_model_folder(tmp_path / "model", "llama")
    config = PruneConfig(method, Pattern(sparsity=0.5), CalibConfig(nsamples=4, seqlen=32))
    windows = random_windows(4, 32, vocab=250)
    whole, streamed = load_model(folder), load_model(folder, stream=True)
    expected, got = prune(whole, windows, config, progress=False), prune(streamed, windows, config, progress=False)
    assert resident_blocks(streamed.model) == 0
    assert mean_nll(streamed.model, windows) == mean_nll(whole.model, windows)
    assert got.layer_sparsity == expected.layer_sparsity and got.total_sparsity == pytest.approx(0.5, abs=0.01)
    save_model(whole, tmp_path / "whole")
    save_model(streamed, tmp_path / "streamed")
    shards = sorted((tmp_path / "streamed").glob("model-*.safetensors"))
    assert len(shards) == 4  # one per block and one for the rest
    mine = {k: v for shard in shards for k, v in load_file(shard).items()}
    theirs = load_file(tmp_path / "whole" / "model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    reloaded = load_model(tmp_path / "streamed")
    assert mean_nll(reloaded.model, windows) == mean_nll(whole.model, windows)


@pytest.mark.parametrize("allocation", ["uniform", "owl"])
def test_export_streams_the_base_and_writes_the_same_weights_block_by_block(tmp_path, allocation):
    from safetensors.torch import load_file

    from epts import export
    from epts.artifact import ElasticModel

    folder = tiny_model_folder(tmp_path / "model", "llama")
    config = EPTSConfig(epochs=1, boundaries=(0, .5, .7), ranks=2, mix_weights=(.5, .5),
                        calib=CalibConfig(nsamples=4, seqlen=32))
    compress(load_model(folder), random_windows(4, 32, vocab=250), config, out=tmp_path / "art", progress=False)
    meta = export(tmp_path / "art", 0.6, tmp_path / "exp", allocation=allocation, refit="none")
    shards = sorted((tmp_path / "exp").glob("model-*.safetensors"))
    assert len(shards) == 4
    got = {k: v for shard in shards for k, v in load_file(shard).items()}
    plan = dict(enumerate(meta["block_sparsity"]))
    expected = ElasticModel.load(tmp_path / "art").materialize(plan).model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert meta["total_sparsity"] == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize("family", FAMILIES + ["opt-350m-like", "gemma3-softcapped"])
def test_blockwise_window_nll_equals_the_window_by_window_one_and_reads_each_block_once(tmp_path, family):
    """Block-major scoring (the refit's choice) against the model's own forward pass, on models in
    memory and streamed: every family's final modules and head, OPT-350m's shape (no final norm, a
    projection back to a narrower embedding) and Gemma's logit soft-capping included."""
    from epts.evaluate import blockwise_window_nll

    base = {"opt-350m-like": "opt", "gemma3-softcapped": "gemma3"}.get(family, family)
    model = tiny_model(base).model
    if family == "opt-350m-like":
        from transformers import AutoModelForCausalLM, OPTConfig

        torch.manual_seed(0)
        cfg = OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                        max_position_embeddings=512, word_embed_proj_dim=32, do_layer_norm_before=False)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        assert model.model.decoder.final_layer_norm is None and model.model.decoder.project_out is not None
    if family == "gemma3-softcapped":
        model.config.final_logit_softcapping = 0.5  # small enough to change every logit
    windows = random_windows(5, 32, vocab=250)
    expected = mean_nll(model, windows, 1)
    assert float(blockwise_window_nll(model, windows, batch_size=2).sum()) / (5 * 31) == pytest.approx(expected, rel=1e-5)
    # Each window's own sum, as the choice's diagnostics read them (31 predicted tokens a window).
    per_window = blockwise_window_nll(model, windows, batch_size=2)
    assert per_window.dtype == torch.float64 and per_window.shape == (5,)
    assert per_window.tolist() == pytest.approx([31 * mean_nll(model, w[None], 1) for w in windows], rel=1e-5)
    if family == "gemma3-softcapped":
        model.config.final_logit_softcapping = None
        # The cap moves the loss 10x further than the tolerance above: a scorer without it fails.
        assert abs(mean_nll(model, windows, 1) - expected) > 10 * 1e-5 * expected

    if family in FAMILIES:
        streamed = load_model(tiny_model_folder(tmp_path / "model", family), stream=True)
        loads = []
        for block in decoder_blocks(streamed.model):
            block._hf_hook.pre_forward = lambda module, *a, f=block._hf_hook.pre_forward, **k: (loads.append(1), f(module, *a, **k))[1]
        value = float(blockwise_window_nll(streamed.model, windows, batch_size=2).sum()) / (5 * 31)
        # The capture's one-window pass loads every block once; the scoring itself, once more each.
        assert len(loads) == 2 * len(decoder_blocks(streamed.model))
        assert value == pytest.approx(mean_nll(streamed.model, windows, 1), rel=1e-5)
        assert len(loads) > 4 * len(decoder_blocks(streamed.model))  # window by window: once per window
