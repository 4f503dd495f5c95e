"""Real users' inputs and files: N:M widths, windows beyond the
context, damaged calibration and model files, degenerate layers, inputs never overwritten, and
the permissions of what epts writes. CLI cases run in-process through `epts.cli.main` and assert
the exit code 2, one `epts CMD: error:` line naming the input, and that no input changed."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import ByteTokenizer, random_windows, tiny_model_folder
from epts.arch import decoder_blocks, prunable_linears
from epts.baselines import PatternError, prune
from epts.baselines.sparsegpt import SparseGPTPruner
from epts.cli import main
from epts.config import CalibConfig, EPTSConfig, PruneConfig, RefitConfig
from epts.data import DataError, calibration_windows, eval_windows, read_text
from epts.importance import Pattern, kept_per_row
from epts.models import LoadedModel, load_model
from epts.reconstruct import compress

CALIB = CalibConfig(nsamples=4, seqlen=32, batch_size=2)


def digest(*paths: Path) -> str:
    """sha256 over every file's relative path, mode and bytes under `paths` (files or folders)."""
    h = hashlib.sha256()
    for root in paths:
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for f in files:
            h.update(f"{f.relative_to(root.parent)}|{f.lstat().st_mode}".encode())
            if f.is_file() and not f.is_symlink():
                h.update(f.read_bytes())
    return h.hexdigest()


def cli_error(capsys, *args) -> str:
    """Run the CLI, assert a user error (exit 2, one line, no traceback) and return the message."""
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("epts ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    assert errors[0].startswith(f"epts {args[0]}: error: ")
    return errors[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, model_dir) -> Path:
    out = tmp_path_factory.mktemp("art") / "artifact"
    compress(load_model(model_dir), random_windows(4, 32), EPTSConfig(epochs=1, calib=CALIB), out=out, progress=False)
    return out


def llama(intermediate: int = 128, hidden: int = 64, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = "eager"
    return LoadedModel(AutoModelForCausalLM.from_config(cfg).eval(), ByteTokenizer(), "tiny-llama")


def weights(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    return {f"{b}.{n}": layer.weight.detach().clone() for b, blk in enumerate(decoder_blocks(loaded.model))
            for n, layer in prunable_linears(loaded.model, blk).items()}


# ---- N:M on an input width that M does not divide ------------------------------------------------

@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("width", [129, 130])
def test_nm_pattern_on_a_width_m_does_not_divide_is_refused_before_any_work(method, width):
    loaded = llama(intermediate=width)
    before = weights(loaded)
    config = PruneConfig(method=method, pattern=Pattern.parse("2:4"), calib=CALIB)
    with pytest.raises(PatternError, match=rf"^model\.layers\.0\.mlp\.down_proj has {width} inputs, not a multiple "
                                           rf"of M=4"):
        prune(loaded, random_windows(4, 32), config, progress=False)
    after = weights(loaded)
    assert all(torch.equal(before[k], after[k]) for k in before)  # refused before any layer changed


def test_nm_width_error_through_the_cli_names_the_layer(capsys, tmp_path, model_dir, text_file):
    folder = tmp_path / "odd"
    shutil.copytree(model_dir, folder)
    cfg = LlamaConfig.from_pretrained(folder)
    cfg.intermediate_size = 130
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    before = digest(folder, text_file)
    message = cli_error(capsys, "prune", "--model", folder, "--method", "sparsegpt", "--pattern", "2:4", "--calib",
                        text_file, "--nsamples", "2", "--seqlen", "32", "--out", tmp_path / "out")
    assert "model.layers.0.mlp.down_proj has 130 inputs, not a multiple of M=4" in message
    assert not (tmp_path / "out").exists() and digest(folder, text_file) == before


def test_sparsegpt_nm_with_m_not_dividing_its_blocksize_is_exact():
    torch.manual_seed(0)
    layer = torch.nn.Linear(129, 8, bias=False)
    pruner = SparseGPTPruner(layer)
    pruner.add_batch(torch.randn(2, 64, 129))
    w = pruner.pruned_weight(Pattern.parse("1:3"))
    assert torch.isfinite(w).all()
    assert ((w.reshape(8, 43, 3) == 0).sum(-1) == 1).all()  # one zero in every group of 3, across block edges
    with pytest.raises(ValueError, match=r"input size \(129\) to be a multiple of 4"):
        pruner.pruned_weight(Pattern.parse("2:4"))


# ---- windows beyond the model's context ----------------------------------------------------------

def test_export_search_seqlen_beyond_the_context_is_refused(capsys, tmp_path, artifact, text_file):
    before = digest(artifact, text_file)
    message = cli_error(capsys, "export", artifact, "--sparsity", "0.5", "--out", tmp_path / "out", "--allocation",
                        "search", "--calib", text_file, "--search-seqlen", "1024", "--search-seconds", "1")
    assert "--search-seqlen 1024 is longer than the model's context of 512 tokens: use --search-seqlen 512" in message
    assert list(tmp_path.iterdir()) == [text_file] and digest(artifact, text_file) == before  # nothing left behind


def test_search_itself_refuses_windows_beyond_the_context(artifact):
    from epts.allocation import search
    from epts.artifact import ElasticModel

    elastic = ElasticModel.load(artifact)
    with pytest.raises(ValueError, match="1024 is longer than the model's context of 512"):
        search(elastic, 0.5, random_windows(1, 1024), max_evaluations=1)


@pytest.mark.parametrize("flags, name", [(["--seqlen", "600"], "--seqlen 600"),
                                         (["--eval-data", "TEXT", "--eval-seqlen", "600"], "--eval-seqlen 600")])
def test_prune_checks_every_window_length_before_any_work(capsys, model_dir, text_file, flags, name):
    flags = [str(text_file) if f == "TEXT" else f for f in flags]
    message = cli_error(capsys, "prune", "--model", model_dir, "--method", "wanda", "--calib", text_file, *flags)
    assert f"{name} is longer than the model's context of 512 tokens" in message
    assert "perplexity" not in capsys.readouterr().out  # refused before the dense evaluation


def test_eval_of_an_artifact_checks_the_window_length(capsys, artifact, text_file):
    message = cli_error(capsys, "eval", artifact, "--sparsity", "0.5", "--data", text_file, "--seqlen", "513")
    assert "513 is longer than the model's context of 512 tokens" in message


# ---- calibration and evaluation text files -------------------------------------------------------

@pytest.mark.parametrize("name, content, message", [
    ("null.jsonl", '{"text": "ok"}\n\n{"text": null}\n', r"null\.jsonl: line 3 has a 'text' of type NoneType, not a string"),
    ("number.jsonl", '{"text": 7}\n', r"number\.jsonl: line 1 has a 'text' of type int, not a string"),
    ("list.json", '[{"text": "a"}, {"text": ["b"]}]', r"list\.json: item 2 has a 'text' of type list"),
    ("broken.jsonl", '{"text": "a"}\n{"text": "b\n', r"broken\.jsonl: line 2 is not valid JSON"),
    ("notext.jsonl", '{"body": "a"}\n', r"notext\.jsonl: line 1 has no 'text' field"),
    ("data.json", '{\n  "data": [{"text": "a"}]\n}\n', r"data\.json holds one JSON object \(keys: data\); expected JSON "
                                                       r"lines \(one \{\"text\": \.\.\.\} object per line\)"),
    ("data1.json", '{"data": [{"text": "a"}]}', r"data1\.json: line 1 has no 'text' field"),
    ("damaged.json", '[\n  {"text": "a"},\n  {"text": \n', r"damaged\.json: not valid JSON at line 4"),
])
def test_every_json_text_error_names_the_file_and_the_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_text(path)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffhello world".encode("utf-8"))
    (tmp_path / "bom.jsonl").write_bytes('\ufeff{"text": "hello"}\n{"text": "world"}\n'.encode("utf-8"))
    assert read_text(tmp_path / "bom.txt") == "hello world"
    assert read_text(tmp_path / "bom.jsonl") == "hello\n\nworld"


def test_latin1_and_binary_files_are_refused_naming_the_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8 text \(byte 0xe9 at byte offset 3\)"):
        read_text(tmp_path / "latin1.txt")
    (tmp_path / "nul.txt").write_bytes(b"text\x00\x00\x00more")
    with pytest.raises(DataError, match=r"nul\.txt is not a text file \(a NUL byte at character 4\)"):
        read_text(tmp_path / "nul.txt")


def test_calibration_file_errors_reach_the_cli_as_one_line(capsys, tmp_path, model_dir):
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "a"}\n{"text": null}\n')
    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(bytes(range(128, 256)) * 8)
    before = digest(model_dir, bad, garbage)
    message = cli_error(capsys, "compress", "--model", model_dir, "--calib", bad, "--out", tmp_path / "art")
    assert f"{bad}: line 2 has a 'text' of type NoneType" in message
    message = cli_error(capsys, "eval", "--model", model_dir, "--data", garbage, "--seqlen", "32")
    assert f"{garbage} is not UTF-8 text (byte 0x80 at byte offset 0)" in message
    assert not (tmp_path / "art").exists() and digest(model_dir, bad, garbage) == before


def test_more_windows_than_the_text_holds_is_refused_and_repeats_are_warned(caplog):
    tokens = torch.arange(100)
    with pytest.raises(DataError, match="100 tokens, so only 50 distinct windows of 50 tokens, fewer than the 51 asked"):
        calibration_windows(tokens, nsamples=51, seqlen=50)
    with caplog.at_level(logging.WARNING, logger="epts.data"):
        windows = calibration_windows(tokens, nsamples=50, seqlen=50)
    repeats = 50 - len({int(w[0]) for w in windows})
    assert repeats > 0 and f"{repeats} of the 50 windows drawn repeat another" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="epts.data"):
        calibration_windows(torch.arange(100_000), nsamples=4, seqlen=50)
    assert caplog.text == ""


def test_fewer_evaluation_windows_than_asked_are_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="epts.data"):
        assert eval_windows(torch.arange(250), 50, max_windows=8).shape == (5, 50)
    assert "only 5 windows of 50 tokens, fewer than the 8 asked" in caplog.text


def test_too_few_distinct_windows_through_the_cli(capsys, tmp_path, model_dir):
    short = tmp_path / "short.txt"
    short.write_text("word " * 60)
    message = cli_error(capsys, "prune", "--model", model_dir, "--calib", short, "--seqlen", "32", "--nsamples", "1000")
    assert "distinct windows of 32 tokens, fewer than the 1000 asked" in message


# ---- damaged and truncated files -----------------------------------------------------------------

def test_a_truncated_weight_file_is_named(capsys, tmp_path, model_dir, text_file):
    folder = tmp_path / "cut"
    shutil.copytree(model_dir, folder)
    weights_file = folder / "model.safetensors"
    os.truncate(weights_file, weights_file.stat().st_size // 2)
    before = digest(folder)
    message = cli_error(capsys, "prune", "--model", folder, "--method", "magnitude", "--out", tmp_path / "out")
    assert f"weight file {weights_file} is damaged or truncated" in message
    assert not (tmp_path / "out").exists() and digest(folder) == before


def test_a_damaged_config_is_named(capsys, tmp_path, model_dir, text_file):
    folder = tmp_path / "cut"
    shutil.copytree(model_dir, folder)
    os.truncate(folder / "config.json", 30)
    message = cli_error(capsys, "eval", "--model", folder, "--data", text_file, "--seqlen", "32")
    assert f"{folder / 'config.json'} is damaged" in message
    config = tmp_path / "epts.yaml"
    config.write_text("epochs: [1\nranks: {")
    message = cli_error(capsys, "compress", "--model", model_dir, "--calib", text_file, "--config", config, "--out",
                        tmp_path / "art")
    assert f"config file {config} is not valid YAML" in message and not (tmp_path / "art").exists()


@pytest.mark.parametrize("content", [
    b"GGUF" + struct.pack("<I", 3) + b"\x01\x00",  # cut inside the header
    b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", 40) + b"general.arch",  # cut inside a key
    b"not a gguf file at all, but long enough to have a header",
])
def test_a_truncated_gguf_file_is_named(capsys, tmp_path, monkeypatch, content):
    monkeypatch.setenv("EPTS_CACHE", "off")
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    message = cli_error(capsys, "eval", "--model", path, "--data", path, "--seqlen", "8")
    assert f"could not read GGUF file {path}" in message
    assert path.read_bytes() == content


def test_a_damaged_artifact_is_named(capsys, tmp_path, artifact, text_file):
    for name, cut in (("adapters.safetensors", 100), ("manifest.json", 50)):
        copy = tmp_path / f"art-{name}"
        shutil.copytree(artifact, copy)
        os.truncate(copy / name, cut)
        message = cli_error(capsys, "export", copy, "--sparsity", "0.5", "--out", tmp_path / "out")
        assert str(copy / name) in message
        assert not (tmp_path / "out").exists()


# ---- degenerate layers: dead input channels, rank-deficient Hessians -----------------------------

def dead_channel_model() -> LoadedModel:
    """Layer 0 reads two dead hidden dimensions (zero embedding columns: dead q/k/v/gate/up inputs
    in block 0 until attention writes them) and 100 dead MLP channels (zero up_proj rows: 100 of
    down_proj's 128 inputs are zero on every token, more than a 50 % row quota)."""
    loaded = llama()
    with torch.no_grad():
        loaded.model.model.embed_tokens.weight[:, [3, 17]] = 0.0
        loaded.model.model.layers[0].mlp.up_proj.weight[:100] = 0.0
    return loaded


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["0.5", "0.3", "2:4"])
def test_baselines_stay_exact_and_finite_on_dead_input_channels(method, pattern):
    loaded = dead_channel_model()
    zero_rows = {k: (w == 0).all(1) for k, w in weights(loaded).items()}  # up_proj rows zeroed on purpose
    p = Pattern.parse(pattern)
    prune(loaded, random_windows(4, 32), PruneConfig(method=method, pattern=p, calib=CALIB), progress=False)
    down = loaded.model.model.layers[0].mlp.down_proj.weight
    for name, w in weights(loaded).items():
        assert torch.isfinite(w).all(), name
        w = w[~zero_rows[name]]
        rows, cols = w.shape
        if p.is_nm:
            assert ((w.reshape(rows, cols // 4, 4) == 0).sum(-1) == 2).all(), name
        else:
            assert ((w == 0).sum(1) == cols - kept_per_row(cols, p.sparsity)).all(), name
    # The dead channels are pruned first: with 100 of 128 dead, all kept weights of a 50 % row
    # lie in dead channels or the live ones, but the row still keeps exactly 64.
    assert ((down != 0).sum(1) == kept_per_row(128, p.sparsity if not p.is_nm else 0.5)).all()


def test_sparsegpt_on_a_rank_deficient_hessian_is_exact_and_finite():
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 16, bias=False)
    pruner = SparseGPTPruner(layer)
    x = torch.randn(1, 8, 96)  # 8 tokens for 96 inputs: rank 8
    x[..., 50] = x[..., 49]  # and two identical channels
    pruner.add_batch(x)
    for pattern in ("0.5", "0.7", "2:4"):
        w = pruner.pruned_weight(Pattern.parse(pattern))
        assert torch.isfinite(w).all()
        if pattern == "2:4":
            assert ((w.reshape(16, 24, 4) == 0).sum(-1) == 2).all()
        else:
            assert ((w == 0).sum(1) == 96 - kept_per_row(96, float(pattern))).all()


def test_sparsegpt_on_an_all_dead_layer_keeps_its_share():
    layer = torch.nn.Linear(64, 4, bias=False)
    pruner = SparseGPTPruner(layer)
    pruner.add_batch(torch.zeros(1, 16, 64))
    w = pruner.pruned_weight(Pattern.parse("0.5"))
    assert ((w != 0).sum(1) == 32).all()
    kept = w != 0  # untouched values: no calibration signal, so no update
    assert torch.equal(w[kept], layer.weight.detach()[kept])


# ---- never delete or overwrite an input ----------------------------------------------------------

def test_compress_out_onto_the_model_folder_is_refused(capsys, tmp_path, model_dir, text_file):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    calib = tmp_path / "calib.txt"
    shutil.copy(text_file, calib)
    before = digest(folder, calib)
    for out in (folder, tmp_path, folder / ".." / "model"):
        message = cli_error(capsys, "compress", "--model", folder, "--calib", calib, "--out", out, "--overwrite")
        assert "would replace the input --model" in message
    assert digest(folder, calib) == before


def test_compress_out_onto_the_model_folder_in_a_real_process(tmp_path, model_dir, text_file):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    before = digest(folder)
    env = dict(os.environ, HF_HUB_OFFLINE="1", EPTS_CACHE="off")
    r = subprocess.run([sys.executable, "-m", "epts.cli", "compress", "--model", str(folder), "--calib", str(text_file),
                        "--out", str(folder), "--overwrite"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"epts compress: error: --out {folder} would replace the input "
                                                 f"--model {folder}: choose another --out")
    assert digest(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model", "text.txt"]


def test_compress_out_holding_the_calibration_file_is_refused(capsys, tmp_path, model_dir):
    calib = tmp_path / "data" / "calib.txt"
    calib.parent.mkdir()
    calib.write_text("word " * 500)
    message = cli_error(capsys, "compress", "--model", model_dir, "--calib", calib, "--out", calib.parent,
                        "--overwrite")
    assert "would replace the input --calib" in message and calib.is_file()


def test_prune_out_onto_the_model_folder_is_refused(capsys, tmp_path, model_dir):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    before = digest(folder)
    message = cli_error(capsys, "prune", "--model", folder, "--method", "magnitude", "--out", folder, "--overwrite")
    assert f"--out {folder} would replace the input --model" in message
    assert digest(folder) == before


def test_export_out_onto_the_artifact_or_its_base_is_refused(capsys, tmp_path, artifact, model_dir):
    before = digest(artifact, model_dir)
    message = cli_error(capsys, "export", artifact, "--sparsity", "0.5", "--out", artifact, "--overwrite")
    assert "would replace the input artifact" in message
    message = cli_error(capsys, "export", artifact, "--sparsity", "0.5", "--out", model_dir, "--overwrite")
    assert "would replace the input base model" in message
    assert digest(artifact, model_dir) == before


@pytest.mark.parametrize("kind", ["symlink", "folder", "device", "input", "inside"])
def test_report_only_onto_a_regular_file_or_a_new_path(capsys, tmp_path, model_dir, text_file, kind):
    target = tmp_path / "target.json"
    target.write_text("keep me")
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    report = {"symlink": tmp_path / "link.json", "folder": tmp_path, "device": Path(os.devnull),
              "input": text_file, "inside": folder / "config.json"}[kind]
    if kind == "symlink":
        report.symlink_to(target)
    before = digest(text_file, target, folder)
    message = cli_error(capsys, "eval", "--model", folder, "--data", text_file, "--seqlen", "32", "--report", report)
    expected = {"input": "would replace the input --data", "inside": "is a file inside the input --model"}
    assert expected.get(kind, "not a regular file") in message
    assert digest(text_file, target, folder) == before and (kind != "symlink" or report.is_symlink())


def test_out_that_is_a_file_is_refused_even_with_overwrite(capsys, tmp_path, model_dir):
    out = tmp_path / "out"
    out.write_text("a file")
    message = cli_error(capsys, "prune", "--model", model_dir, "--method", "magnitude", "--out", out, "--overwrite")
    assert "exists and is not a folder" in message and out.read_text() == "a file"


# ---- permissions of written files ----------------------------------------------------------------

def test_written_files_get_the_umasks_permissions(tmp_path, model_dir, text_file, artifact, capsys):
    old = os.umask(0o022)
    try:
        assert main(["prune", "--model", str(model_dir), "--method", "magnitude", "--out", str(tmp_path / "pruned"),
                     "--report", str(tmp_path / "report.json")]) == 0
        assert main(["export", str(artifact), "--sparsity", "0.5", "--out", str(tmp_path / "export"), "--format",
                     "compressed", "--refit", "none"]) == 0
        compress(load_model(model_dir), random_windows(4, 32), EPTSConfig(epochs=1, calib=CALIB),
                 out=tmp_path / "art", progress=False)
    finally:
        os.umask(old)
    capsys.readouterr()
    written = [p for p in tmp_path.rglob("*")]
    assert any(p.suffix == ".safetensors" for p in written)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written}
    assert all(m == (oct(0o755) if (tmp_path / p).is_dir() else oct(0o644)) for p, m in modes.items()), modes


def test_a_refit_margin_without_the_per_block_choice_is_refused(capsys, tmp_path, artifact):
    message = cli_error(capsys, "export", artifact, "--sparsity", "0.5", "--out", tmp_path / "out",
                        "--refit-margin", "0.1")
    assert "--refit-margin sets the per-block choice of --refit block, but --refit is auto" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, expected", [
    (("--refit-ridge", "1", "--refit-mask", "obs"), "a refit ridge pulls toward the weights on the elastic masks, "
                                                    "which refit mask 'obs' replaces: drop one of the two"),
    (("--refit", "none", "--refit-mask", "obs"), "--refit-mask sets the masks of the blocks a refit re-solves, "
                                                 "but --refit is none"),
    (("--refit", "all", "--no-refit-sparsegpt"), "--no-refit-sparsegpt sets a candidate of --refit auto's choice, "
                                                 "but --refit is all"),
    (("--refit", "block", "--no-refit-block"), "--no-refit-block sets a candidate of --refit auto's choice, "
                                               "but --refit is block"),
    (("--no-refit-sparsegpt", "--refit-sparsegpt-se", "2"), "--refit-sparsegpt-se sets how --refit auto weighs "
                                                           "SparseGPT's solution, which is not scored here (--refit "
                                                           "auto, --no-refit-sparsegpt)"),
    (("--refit-sparsegpt-se", "-1"), "refit sparsegpt_se must be a number of standard errors >= 0, got -1.0"),
    (("--refit-sparsegpt-se", "nan"), "refit sparsegpt_se must be a number of standard errors >= 0, got nan"),
    (("--refit", "all", "--refit-reconstruct-epochs", "1"), "--refit-reconstruct-epochs sets the reconstruction of "
                                                            "--refit auto's choice, but --refit is all"),
    (("--refit", "bare", "--refit-reconstruct-step", "1e-2"), "--refit-reconstruct-step sets the reconstruction of "
                                                              "--refit auto's choice, but --refit is bare"),
    (("--refit", "all", "--refit-reconstruct-rank", "4"), "--refit-reconstruct-rank sets the reconstruction of "
                                                          "--refit auto's choice, but --refit is all"),
    (("--refit-reconstruct-step", "0"), "reconstruct_step a number > 0 and reconstruct_rank >= 0 (0: every kept "
                                        f"weight), got {RefitConfig.reconstruct_epochs}, 0.0 and "
                                        f"{RefitConfig.reconstruct_rank}"),
    (("--refit-reconstruct-step", "inf"), f"got {RefitConfig.reconstruct_epochs}, inf and "
                                          f"{RefitConfig.reconstruct_rank}"),
    (("--refit", "all", "--refit-tune-epochs", "2"), "--refit-tune-epochs sets the reconstruction of --refit auto's "
                                                     "choice, but --refit is all"),
    (("--refit-reconstruct-epochs", "0", "--refit-tune-step", "1e-2"),
     "--refit-tune-step sets the end-to-end tuning that follows the reconstruction, but --refit-reconstruct-epochs "
     "is 0: drop --refit-tune-step, or give the reconstruction epochs"),
    (("--refit", "block", "--no-refit-reconstruct-all"), "--no-refit-reconstruct-all sets the reconstruction of "
                                                         "--refit auto's choice, but --refit is block"),
    (("--refit-reconstruct-epochs", "0", "--no-refit-reconstruct-all"),
     "--no-refit-reconstruct-all sets which candidates are reconstructed and tuned, but --refit-reconstruct-epochs "
     "is 0: drop --no-refit-reconstruct-all, or give refit reconstruct epochs"),
    (("--refit-tune-epochs", "0", "--no-refit-reconstruct-all"),
     "--no-refit-reconstruct-all sets which candidates are reconstructed and tuned, but --refit-tune-epochs is 0: "
     "drop --no-refit-reconstruct-all, or give refit tune epochs"),
    (("--refit-tune-step", "-1"), f"refit tune_epochs must be >= 0 (0: no end-to-end tuning) and tune_step a number "
                                  f"> 0, got {RefitConfig.tune_epochs} and -1.0"),
    (("--refit-tune-step", "nan"), f"got {RefitConfig.tune_epochs} and nan"),
])
def test_a_refit_mask_that_cannot_apply_is_refused(capsys, tmp_path, artifact, flags, expected):
    message = cli_error(capsys, "export", artifact, "--sparsity", "0.5", "--out", tmp_path / "out", *flags)
    assert expected in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, expected", [("--groups-per-step", "two", "must be a positive integer, got 'two'"),
                                                   ("--top-groups-every-step", "1.5", "must be an integer >= 0, got '1.5'"),
                                                   ("--top-groups-every-step", "-1", "must be an integer >= 0, got -1")])
def test_a_compress_group_count_that_is_not_an_integer_is_refused_by_the_parser(capsys, tmp_path, flag, value, expected):
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "--model", "smollm2-135m", "--calib", "c.txt", "--out", str(tmp_path / "out"), flag, value])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"epts compress: error: argument {flag}: {expected}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, expected", [("-1", "must be an integer >= 0, got -1"),
                                             ("two", "must be an integer >= 0, got 'two'")])
@pytest.mark.parametrize("flag", ["--refit-reconstruct-epochs", "--refit-reconstruct-rank", "--refit-tune-epochs"])
def test_a_reconstruction_epoch_count_or_rank_that_is_not_one_is_refused_by_the_parser(capsys, tmp_path, artifact,
                                                                                       value, expected, flag):
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(artifact), "--sparsity", "0.5", "--out", str(tmp_path / "out"), flag, value])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"epts export: error: argument {flag}: {expected}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, expected", [
    (("--owl-m", "7"), "--owl-m only applies with --allocation owl (or search starting from owl): drop it"),
    (("--allocation", "search", "--search-start", "uniform", "--owl-lambda", "0.2", "--calib", "x.txt"),
     "--owl-lambda only applies with --allocation owl (or search starting from owl)"),
    (("--search-seconds", "5", "--search-samples", "2"),
     "--search-seconds, --search-samples only apply with --allocation search: drop them"),
    (("--allocation", "owl", "--search-start", "uniform"), "--search-start only applies with --allocation search"),
])
def test_an_export_option_its_allocation_would_ignore_is_refused(capsys, tmp_path, artifact, flags, expected):
    message = cli_error(capsys, "export", artifact, "--sparsity", "0.5", "--out", tmp_path / "out", *flags)
    assert expected in message
    assert not (tmp_path / "out").exists()


def test_prune_refuses_owl_options_without_owl(capsys, tmp_path, model_dir):
    message = cli_error(capsys, "prune", "--model", model_dir, "--method", "magnitude", "--owl-lambda", "0.1",
                        "--out", tmp_path / "out")
    assert "--owl-lambda only applies with --allocation owl: drop it, or add --allocation owl" in message
    assert not (tmp_path / "out").exists()
