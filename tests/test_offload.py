"""Block-streamed models: the same numbers as a model in memory, with one block in memory at a time."""

import pytest
import torch

from conftest import FAMILIES, random_windows, tiny_model_folder
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
