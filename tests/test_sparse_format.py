import json

import pytest
import torch
from safetensors import safe_open

from conftest import random_windows, tiny_model_folder
from epts import Pattern, PruneConfig, load_model, prune, save_model
from epts.arch import prunable_weight_names
from epts.config import CalibConfig
from epts.sparse.format import bitmask_compress, bitmask_decompress, load_state_dict


def test_bitmask_layout_is_compressed_tensors_little_endian_rows():
    # Row 0 keeps inputs 1 and 8; row 1 keeps input 0. Bit i of byte j flags input 8*j + i.
    w = torch.zeros(2, 9)
    w[0, 1], w[0, 8], w[1, 0] = 1.5, -2.0, 3.0
    parts = bitmask_compress(w)
    assert parts["bitmask"].dtype == torch.uint8
    assert parts["bitmask"].tolist() == [[0b00000010, 0b00000001], [0b00000001, 0]]
    assert parts["compressed"].tolist() == [1.5, -2.0, 3.0]
    assert parts["row_offsets"].tolist() == [0, 2]
    assert parts["shape"].tolist() == [2, 9]
    assert torch.equal(bitmask_decompress(parts), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitmask_round_trip_is_exact(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 45, generator=g).to(dtype)
    w[torch.rand(37, 45, generator=g) < 0.6] = 0
    parts = bitmask_compress(w)
    assert parts["compressed"].numel() == int((w != 0).sum())
    assert torch.equal(bitmask_decompress(parts), w)


def test_damaged_bitmask_is_refused():
    parts = bitmask_compress(torch.eye(8))
    parts["compressed"] = parts["compressed"][:-1]
    with pytest.raises(ValueError, match="bitmask marks 8 weights but 7 values"):
        bitmask_decompress(parts)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_compressed_export_round_trips_and_is_smaller(family, tmp_path):
    loaded = load_model(tiny_model_folder(tmp_path / "model", family))
    prune(loaded, random_windows(4, 32), PruneConfig("wanda", Pattern(sparsity=0.7), CalibConfig(4, 32)), progress=False)
    dense = save_model(loaded, tmp_path / "dense")
    packed = save_model(loaded, tmp_path / "packed", compressed=True)

    config = json.loads((packed / "config.json").read_text())
    qc = config["quantization_config"]
    if family == "llama":  # transformers 4 readers need these at the top level
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] and config["torch_dtype"] == "float32"
    with safe_open(packed / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    # Parts are keyed by the module, as compressed-tensors' BitmaskCompressor reads them.
    first = prunable_weight_names(loaded.model)[0].removesuffix(".weight")
    assert {f"{first}.{p}" for p in ("shape", "compressed", "bitmask", "row_offsets")} <= keys
    assert f"{first}.weight" not in keys
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["sparsity_config"]["format"] == "sparse-bitmask"
    assert qc["sparsity_config"]["global_sparsity"] == pytest.approx(0.7, abs=0.01)
    names = prunable_weight_names(loaded.model)
    state = load_state_dict(packed)
    assert all(torch.equal(state[n], loaded.model.state_dict()[n]) for n in names)

    reloaded = load_model(packed, runtime="dense")
    before, after = loaded.model.state_dict(), reloaded.model.state_dict()
    assert before.keys() == after.keys()
    # torch.equal, not bytes: a pruned negative weight is -0.0 in memory and +0.0 once decompressed.
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert not hasattr(reloaded.model.config, "quantization_config")
    ids = random_windows(2, 20, seed=5)
    with torch.no_grad():
        assert torch.equal(reloaded.model(ids).logits, loaded.model(ids).logits)
    size = {p: (p / "model.safetensors").stat().st_size for p in (dense, packed)}
    # Prunable weights are most of a tiny model: at 70 % they shrink to 30 % values + 1/32 bitmask.
    assert size[packed] < 0.75 * size[dense]


def test_cli_prune_writes_a_compressed_folder_that_epts_reads_back(tmp_path, text_file):
    from test_cli import epts_process as epts

    model_dir = tiny_model_folder(tmp_path / "model")
    out = tmp_path / "pruned"
    r = epts("prune", "--model", str(model_dir), "--method", "magnitude", "--pattern", "2:4", "--format", "compressed",
             "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "compressed" in r.stdout and "MiB of weights" in r.stdout
    sc = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sc["sparsity_structure"] == "2:4" and sc["global_sparsity"] == pytest.approx(0.5)
    r = epts("eval", "--model", str(out), "--data", str(text_file), "--seqlen", "64")
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split()[-1]) > 1
