"""Half precision end to end, and the model and artifact inputs real users hand epts."""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SAMPLE_TEXT, tiny_model_folder
from epts.arch import decoder_blocks, prunable_linears
from epts.artifact import ArtifactError, ElasticModel
from epts.cli import main
from epts.hilora import ElasticLinear, effective_weight
from epts.importance import float_mask, kept_per_row, row_ranks
from epts.models import ModelLoadError, load_model, weights_mib

SPARSITIES = (0.1, 0.3, 0.5, 0.7)


def precision_folder(path, dtype, intermediate=2080, tie=True):
    """A tiny LLaMA folder with a real tokenizer, stored in `dtype`: hidden 32, and an MLP whose
    down_proj has `intermediate` inputs (2080 is past both 256, bfloat16's last exact integer, and
    2048, float16's)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tiny_model_folder(path)  # for its tokenizer; the model files are replaced below
    vocab = len(AutoTokenizer.from_pretrained(path))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie)
    LlamaForCausalLM(cfg).to(getattr(torch, dtype)).save_pretrained(path)
    return path


def run(capsys, *args):
    """`epts ARGS` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err, command, message):
    """stderr ends with one `epts CMD: error: ...` line holding `message`, and holds no traceback
    (progress bars, also on stderr, may come before it)."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("epts ")]
    return errors == lines[-1:] and errors[0].startswith(f"epts {command}: error: ") and message in errors[0] \
        and "Traceback" not in err


def linears(model):
    return {f"{b}.{n}": layer for b, blk in enumerate(decoder_blocks(model))
            for n, layer in prunable_linears(model, blk).items()}


# ---- masks and adapters ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_masks_are_exact_and_nested_in_every_dtype(dtype):
    ranks = row_ranks(torch.randn(4, 1536, generator=torch.Generator().manual_seed(0)))
    mask = float_mask(ranks, 0.5, dtype)
    assert mask.dtype == dtype and mask.sum(1).tolist() == [768] * 4
    ranks = row_ranks(torch.randn(8, 2080, generator=torch.Generator().manual_seed(1)))
    weight = torch.randn(8, 2080, dtype=dtype)
    a = [torch.randn(4, 2080) * 0.01]
    b = [torch.randn(8, 4) * 0.01]
    previous = None
    for s in SPARSITIES:
        w = effective_weight(weight, ranks, s, a, b)
        assert w.dtype == dtype
        assert (w != 0).sum(1).tolist() == [kept_per_row(2080, s)] * 8
        if previous is not None:
            assert not ((w != 0) & ~previous).any()  # the kept set only shrinks as s grows
        previous = w != 0


def test_adapters_and_adam_state_stay_float32_on_a_bfloat16_layer():
    torch.manual_seed(0)
    base = torch.nn.Linear(300, 16, bias=False).to(torch.bfloat16)
    layer = ElasticLinear(base, row_ranks(base.weight.float().abs()), [4])
    layer.set_state(0.5, 0)
    with torch.no_grad():
        layer.B[0].fill_(0.01)  # so that A gets gradients
    opt = torch.optim.Adam(layer.parameters(), lr=1e-5)
    a_before = layer.A[0].detach().clone()
    out = layer(torch.randn(3, 300, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in layer.parameters())
    opt.step()
    assert all(v.dtype == torch.float32 for st in opt.state.values() for v in st.values() if v.dim())
    # Adam's first step moves every entry by ~lr = 1e-5: kept in float32; added to a bfloat16 A
    # (8 bits of mantissa, entries of up to 0.058) most entries would not have moved at all.
    delta = layer.A[0].detach() - a_before
    assert (delta.abs() - 1e-5).abs().max() < 1e-6
    stuck = (a_before.bfloat16() + delta.bfloat16()) == a_before.bfloat16()
    assert stuck.float().mean() > 0.75
    merged = layer.merge()
    assert merged.weight.dtype == torch.bfloat16
    assert (merged.weight != 0).sum(1).tolist() == [150] * 16


# ---- bfloat16 and float16 models end to end ------------------------------------------------------

@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def half(request, tmp_path_factory):
    """A half-precision model folder, a text file, and an artifact compressed from them by the CLI
    with default flags (so in the checkpoint's dtype)."""
    root = tmp_path_factory.mktemp(request.param)
    model = precision_folder(root / "model", request.param)
    text = root / "text.txt"
    text.write_text(SAMPLE_TEXT)
    art = root / "art"
    assert main(["compress", "--model", str(model), "--calib", str(text), "--nsamples", "2", "--seqlen", "16",
                 "--epochs", "1", "--batch-size", "2", "--out", str(art)]) == 0
    return request.param, model, text, art


def test_artifact_records_its_dtype_and_provenance(half):
    dtype, model, text, art = half
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["base_model"]["dtype"] == dtype and manifest["base_model"]["spec"] == str(model)
    assert manifest["calibration"]["source"] == str(text)
    assert manifest["calibration"]["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert set(manifest["versions"]) == {"epts", "torch", "transformers"}
    assert manifest["versions"]["torch"] == torch.__version__
    assert all(not block["retries"] for block in manifest["blocks"])  # no numerical trouble in half precision
    adapters = load_file(art / "adapters.safetensors")
    assert {t.dtype for t in adapters.values()} == {torch.float32}


def test_artifact_reloads_in_its_dtype_with_exact_nested_masks(half):
    dtype, _, _, art = half
    elastic = ElasticModel.load(art)
    assert elastic.base.dtype == dtype
    base = {k: v.clone() for k, v in elastic.base.model.state_dict().items()}
    kept = {}
    for s in SPARSITIES:
        layers = linears(elastic.materialize(s).model)
        assert layers["1.mlp.down_proj"].in_features == 2080
        for name, layer in layers.items():
            assert layer.weight.dtype == getattr(torch, dtype)
            nonzero = layer.weight != 0
            assert nonzero.sum(1).tolist() == [kept_per_row(layer.in_features, s)] * layer.out_features, (name, s)
            if name in kept:
                assert not (nonzero & ~kept[name]).any(), (name, s)
            kept[name] = nonzero
    # Sparsity 0 is the base model itself, bit for bit: no group-1 adapter merged.
    dense = elastic.materialize(0.0).model.state_dict()
    assert dense.keys() == base.keys() and all(torch.equal(dense[k], base[k]) for k in base)


def test_a_wrong_dtype_is_named_on_both_sides(half):
    dtype, _, _, art = half
    with pytest.raises(ArtifactError, match=f"is loaded in float32, but the artifact was made from it in {dtype}"):
        ElasticModel.load(art, dtype="float32")


def test_exports_keep_the_dtype_and_size_in_both_formats(half, tmp_path, capsys):
    dtype, model, _, art = half
    folders = {}
    for fmt in ("dense", "compressed"):
        out = tmp_path / fmt
        code, _, err = run(capsys, "export", art, "--sparsity", "0.6", "--format", fmt, "--out", out)
        assert code == 0, err
        assert json.loads((out / "config.json").read_text())["dtype"] == dtype
        folders[fmt] = load_model(out, runtime="dense")  # plain weights, to compare them
        assert folders[fmt].dtype == dtype
    dense, compressed = linears(folders["dense"].model), linears(folders["compressed"].model)
    for name, layer in dense.items():
        assert torch.equal(layer.weight, compressed[name].weight)
        kept, per_row = kept_per_row(layer.in_features, 0.6), (layer.weight != 0).sum(1)
        # A kept weight the refit solves to below half precision's smallest step is stored as 0 (seen
        # with one thread), which can only lower a row's count.
        assert int(per_row.max()) == kept and per_row.sum() >= 0.999 * kept * layer.out_features
    # A half-precision export is the size of the half-precision base, not twice it.
    assert weights_mib(tmp_path / "dense") == pytest.approx(weights_mib(model), rel=0.02)
    assert weights_mib(tmp_path / "compressed") < weights_mib(tmp_path / "dense")


def test_eval_and_generate_run_in_half_precision(half, capsys):
    _, _, text, art = half
    code, out, err = run(capsys, "eval", art, "--sparsity", "0,0.5,0.7", "--data", text, "--seqlen", "32",
                         "--max-windows", "2")
    assert code == 0, err
    ppl = [float(line.split("|")[2]) for line in out.splitlines() if line.startswith("| 0")]
    assert len(ppl) == 3 and all(1 < p < 1e4 for p in ppl)
    code, out, err = run(capsys, "generate", art, "--sparsity", "0.5", "--prompt", "The model", "--max-new-tokens", "4")
    assert code == 0, err
    assert [line.split()[5] for line in out.splitlines() if line.startswith("--- dense runtime at sparsity")] == ["0.5:"]


def test_prune_with_default_flags_keeps_the_checkpoint_dtype(half, tmp_path, capsys):
    dtype, model, _, _ = half
    code, _, err = run(capsys, "prune", "--model", model, "--method", "magnitude", "--out", tmp_path / "pruned")
    assert code == 0, err
    assert load_model(tmp_path / "pruned").dtype == dtype
    assert weights_mib(tmp_path / "pruned") == pytest.approx(weights_mib(model), rel=0.02)


# ---- non-finite activations ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    """A float16 model whose second block overflows: its MLP input is scaled by 1e4, so the MLP's
    products pass float16's 65504 (bfloat16 and float32 hold them)."""
    root = tmp_path_factory.mktemp("overflow")
    path = precision_folder(root / "model", "float16", intermediate=64)
    weights = load_file(path / "model.safetensors")
    weights["model.layers.1.post_attention_layernorm.weight"] *= 1e4
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    text = root / "text.txt"
    text.write_text(SAMPLE_TEXT)
    return path, text


@pytest.mark.parametrize("command", [["compress", "--epochs", "1"], ["prune", "--method", "wanda"],
                                     ["prune", "--method", "sparsegpt"]])
def test_non_finite_activations_are_one_error_naming_the_block(overflowing, command, tmp_path, capsys, monkeypatch):
    model, text = overflowing
    # Progress bars on (an earlier --quiet command in this process sets TQDM_DISABLE): the bar of the
    # failed block must not redraw below the error.
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    args = [*command, "--model", model, "--calib", text, "--nsamples", "2", "--seqlen", "16"]
    code, out, err = run(capsys, *args, "--out", tmp_path / "out")
    assert code == 2
    assert one_line_error(err, command[0], "block 2 of 2 produced non-finite activations (inf or NaN) in float16: "
                                           "load the model with --dtype bfloat16 or --dtype float32"), err
    assert not (tmp_path / "out" / "manifest.json").exists() and not (tmp_path / "out" / "config.json").exists()
    if command[0] == "prune":  # the advice works
        code, out, err = run(capsys, *args, "--dtype", "bfloat16")
        assert code == 0, err
        assert "total sparsity 0.5" in out


# ---- model folders and artifacts that real users hand over ----------------------------------

def test_a_checkpoint_missing_a_tensor_is_refused_naming_it(tmp_path, capsys):
    path = precision_folder(tmp_path / "model", "float32", intermediate=64, tie=False)
    weights = load_file(path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lacks tensors its config needs: lm_head\.weight \(transformers"):
        load_model(path)
    code, _, err = run(capsys, "prune", "--model", path, "--method", "magnitude", "--out", tmp_path / "out")
    assert code == 2 and one_line_error(err, "prune", "lm_head.weight"), err
    assert not (tmp_path / "out").exists()


def test_a_folder_without_tokenizer_prunes_by_magnitude_and_names_the_gap_otherwise(tmp_path, capsys):
    path = precision_folder(tmp_path / "model", "float32", intermediate=64)
    for file in path.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            file.unlink()
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT)
    code, out, err = run(capsys, "prune", "--model", path, "--method", "magnitude", "--sparsity", "0.5",
                         "--out", tmp_path / "pruned")
    assert code == 0, err
    pruned = linears(load_model(tmp_path / "pruned").model)["0.mlp.up_proj"].weight
    assert (pruned != 0).sum(1).tolist() == [16] * 64
    code, _, err = run(capsys, "prune", "--model", path, "--method", "wanda", "--calib", text, "--nsamples", "2",
                       "--seqlen", "16")
    assert code == 2
    assert one_line_error(err, "prune", f"model folder '{path}' has no tokenizer"), err
    assert "copy the tokenizer files of the model it came from" in err and "sentencepiece" not in err


def test_an_artifact_of_a_relative_model_path_works_from_anywhere(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    precision_folder(work / "model", "bfloat16", intermediate=64)
    (work / "text.txt").write_text(SAMPLE_TEXT)
    monkeypatch.chdir(work)
    code, _, err = run(capsys, "compress", "--model", "model", "--calib", "text.txt", "--nsamples", "2", "--seqlen",
                       "16", "--epochs", "1", "--out", "art")
    assert code == 0, err
    assert json.loads((work / "art" / "manifest.json").read_text())["base_model"]["spec"] == str(work / "model")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run(capsys, "export", "../work/art", "--sparsity", "0.5", "--out", "exported")
    assert code == 0, err
    assert load_model(elsewhere / "exported").dtype == "bfloat16"
    # Artifact and base moved to another machine: the recorded path is gone, --base names the new one.
    shutil.copytree(work / "art", elsewhere / "art")
    shutil.move(work / "model", elsewhere / "base")
    code, _, err = run(capsys, "export", "art", "--sparsity", "0.5", "--out", "again")
    assert code == 2 and one_line_error(err, "export", "pass --base"), err
    code, _, err = run(capsys, "export", "art", "--sparsity", "0.5", "--out", "again", "--base", "base")
    assert code == 0, err
    code, out, err = run(capsys, "eval", "art", "--sparsity", "0.5", "--data", work / "text.txt", "--seqlen", "16",
                         "--max-windows", "1", "--base", "base")
    assert code == 0 and out.count("| 0.5 |") == 1, err
    code, out, err = run(capsys, "generate", "art", "--sparsity", "0.5", "--prompt", "The", "--max-new-tokens", "2",
                         "--base", "base")
    assert code == 0 and "--- dense runtime at sparsity 0.5:" in out, err
