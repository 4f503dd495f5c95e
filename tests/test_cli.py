import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import HANG_GUARD_S, tiny_model_folder
from epts.cli import main


def epts_process(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", EPTS_CACHE="off")
    return subprocess.run([sys.executable, "-m", "epts.cli", *args], capture_output=True, text=True, env=env,
                          timeout=HANG_GUARD_S)


@pytest.fixture
def epts(capsys):
    """`epts ARGS` run in this process, as the command would (`python -m epts` itself is tested in
    test_cli_help.py): no process start per command."""

    def run(*args):
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit:  # argparse's own refusals
            code = exit.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")


def test_prune_end_to_end_writes_a_stock_loadable_folder_and_report(model_dir, text_file, tmp_path, epts):
    out = tmp_path / "pruned"
    r = epts("prune", "--model", str(model_dir), "--method", "sparsegpt", "--sparsity", "0.6", "--calib", str(text_file),
             "--nsamples", "4", "--seqlen", "64", "--eval-data", str(text_file), "--eval-seqlen", "64", "--out", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "epts_report.json").read_text())
    assert report["method"] == "sparsegpt" and report["pattern"] == "0.6"
    assert report["total_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert report["ppl"] > 1.0 and report["ppl_dense"] > 1.0 and report["ppl"] != report["ppl_dense"]
    assert report["seconds"] > 0 and report["peak_rss_mb"] > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.model.layers[0].mlp.down_proj.weight == 0).float().mean().item() == pytest.approx(0.6, abs=0.01)
    # The output exists now: a second run refuses to overwrite it.
    r = epts("prune", "--model", str(model_dir), "--method", "magnitude", "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr


def test_eval_prints_perplexity(model_dir, text_file, epts):
    r = epts("eval", "--model", str(model_dir), "--data", str(text_file), "--seqlen", "64", "--max-windows", "3")
    assert r.returncode == 0, r.stderr
    ppl = float(r.stdout.strip().split()[-1])
    assert 1.0 < ppl < 10 * 300  # a random model: near the vocabulary size, not degenerate


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", "--sparsity", "1.5"], "sparsity 1.5 is outside [0, 1)"),
        (["prune", "--pattern", "4:2"], "N:M pattern 4:2 is invalid"),
        (["prune", "--method", "obs", "--calib", "x"], "invalid choice: 'obs'"),
        (["prune", "--method", "wanda"], "--calib is required"),
        (["prune", "--nsamples", "0"], "must be a positive integer"),
        (["eval", "--model", "/no/such/dir", "--data", "x"], "model path '/no/such/dir' does not exist"),
    ],
)
def test_bad_input_is_one_clear_line_and_nonzero_exit(args, message, epts):
    r = epts(*args)
    assert r.returncode == 2
    assert message in r.stderr, r.stderr


def test_an_unknown_hub_id_offline_is_one_clear_line():
    r = epts_process("eval", "--model", "nobody/no-such-model-xyz", "--data", "x")  # HF_HUB_OFFLINE: read at import
    assert r.returncode == 2 and "could not load model 'nobody/no-such-model-xyz'" in r.stderr, r.stderr


def test_calibration_text_too_short(model_dir, tmp_path, epts):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    r = epts("prune", "--model", model_dir, "--calib", short, "--seqlen", "64", "--nsamples", "2")
    assert r.returncode == 2 and "too short for windows of 64 tokens" in r.stderr, r.stderr


def test_compress_export_and_eval_an_artifact(model_dir, text_file, tmp_path, epts):
    art, out = tmp_path / "art", tmp_path / "export"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("epochs: 3\nranks: 4\nlr: 0.002\ncalib:\n  nsamples: 2\n")
    r = epts("compress", "--model", str(model_dir), "--calib", str(text_file), "--config", str(cfg),
             "--seqlen", "64", "--epochs", "1", "--out", str(art))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((art / "manifest.json").read_text())
    # The flag beats the file, the file beats the defaults.
    assert manifest["config"]["epochs"] == 1 and manifest["config"]["lr"] == 0.002
    assert manifest["config"]["ranks"] == [4] * 7 and manifest["config"]["calib"]["nsamples"] == 2
    r = epts("export", str(art), "--sparsity", "0.6", "--out", str(out))
    assert r.returncode == 0, r.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.model.layers[1].self_attn.q_proj.weight == 0).float().mean().item() == pytest.approx(0.6, abs=0.02)
    assert json.loads((out / "epts_export.json").read_text())["sparsity"] == 0.6
    r = epts("eval", str(art), "--sparsity", "0.3,0.7", "--data", str(text_file), "--seqlen", "64")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| 0.")]
    assert len(rows) == 2 and all(float(row.split("|")[2]) > 1 for row in rows)
    # The refit: export and in-place eval give the same model, hence the same perplexity.
    r = epts("export", str(art), "--sparsity", "0.6", "--refit", "all", "--eval-data", str(text_file),
             "--eval-seqlen", "64", "--out", str(tmp_path / "refit"))
    assert r.returncode == 0, r.stderr
    assert "refit (all): 3 of 3 blocks re-solved" in r.stdout
    meta = json.loads((tmp_path / "refit" / "epts_export.json").read_text())
    r = epts("eval", str(art), "--sparsity", "0.6", "--refit", "all", "--data", str(text_file), "--seqlen", "64")
    assert r.returncode == 0, r.stderr
    row = [line for line in r.stdout.splitlines() if line.startswith("| 0.6")][0]
    assert float(row.split("|")[2]) == pytest.approx(meta["ppl"], abs=2e-3)
    r = epts("export", str(art), "--sparsity", "0.5", "--allocation", "owl", "--out", str(tmp_path / "owl"))
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "owl" / "epts_export.json").read_text())
    assert meta["allocation"] == "owl" and len(meta["block_sparsity"]) == 3
    assert meta["total_sparsity"] == pytest.approx(0.5, abs=0.01)
    r = epts("export", str(art), "--sparsity", "0.5", "--allocation", "search", "--calib", str(text_file),
             "--search-seconds", "3", "--search-samples", "2", "--search-seqlen", "32", "--out", str(tmp_path / "srch"))
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "srch" / "epts_export.json").read_text())
    assert meta["search"]["loss"] <= meta["search"]["start_loss"] and meta["search"]["evaluations"] >= 1
    assert meta["total_sparsity"] == pytest.approx(0.5, abs=0.01)
    r = epts("generate", str(art), "--sparsity", "0.3,0.7", "--prompt", "The model", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    heads = [line for line in r.stdout.splitlines() if line.startswith("--- dense runtime at sparsity")]
    assert [h.split()[5] for h in heads] == ["0.3:", "0.7:"] and all("tokens/s" in h for h in heads)
    r = epts("export", str(art), "--sparsity", "0.8", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "outside the trained range [0, 0.7]" in r.stderr
    r = epts("eval", str(tmp_path), "--sparsity", "0.5", "--data", str(text_file))
    assert r.returncode == 2 and "is not an EPTS artifact" in r.stderr


@pytest.mark.parametrize(
    "content, message",
    [
        ("boundaries: [0, 0.5, 0.4]", "must be strictly increasing"),
        ("boundaries: [0, 0.5, 1.2]\nranks: 8\nmix_weights: [0.5, 0.5]", "must lie in [0, 1)"),
        ("mix_weights: [0.5, 0.5]", "must have 7 entries"),
        ("mix_weights: [0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]", "sum to 1"),
        ("ranks: 0", "positive integers"),
        ("epochs: 0", "epochs must be a positive integer"),
        ("colour: blue", "unknown config fields ['colour']"),
        ("calib:\n  samples: 4", "unknown calib fields ['samples']"),
    ],
)
def test_bad_compress_config_is_refused_before_any_work(content, message, text_file, tmp_path, epts):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(content)
    r = epts("compress", "--model", "/not/loaded", "--calib", text_file, "--config", cfg,
                        "--out", tmp_path / "art")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "art").exists()


def test_preset_paper_is_method_md_and_flags_go_on_top(tmp_path, text_file, model_dir, epts):
    """--preset paper trains METHOD.md's 10 epochs at lr 1e-3; a flag overrides a preset field, and
    the default preset is the recipe of the dataclass defaults."""
    from epts.config import EPTSConfig

    paper = EPTSConfig.preset("paper")
    assert (paper.epochs, paper.lr, paper.lr_reference_rms) == (10, 1e-3, None), "METHOD.md's absolute lr"
    assert EPTSConfig().lr_reference_rms is None
    assert EPTSConfig.preset("default") == EPTSConfig()
    assert EPTSConfig.preset("demo", calib={"seqlen": 32}).calib.nsamples == 16
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        EPTSConfig.preset("fast")
    out = tmp_path / "art"
    r = epts("compress", "--model", str(model_dir), "--calib", str(text_file), "--preset", "paper", "--epochs", "1",
             "--nsamples", "2", "--seqlen", "32", "--groups-per-step", "3", "--top-groups-every-step", "1",
             "--out", str(out))
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert (config["epochs"], config["lr"], config["calib"]["nsamples"], config["groups_per_step"],
            config["top_groups_every_step"]) == (1, 1e-3, 2, 3, 1)
    r = epts("compress", "--model", "/not/loaded", "--calib", str(text_file), "--top-groups-every-step", "2",
             "--out", str(tmp_path / "bad"))
    assert r.returncode != 0 and "top_groups_every_step must be in 0..groups_per_step - 1" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert [b["lr"] for b in json.loads((out / "manifest.json").read_text())["blocks"]] == [1e-3] * 3
    scaled = tmp_path / "scaled"
    r = epts("compress", "--model", str(model_dir), "--calib", str(text_file), "--preset", "paper", "--epochs", "1",
             "--nsamples", "2", "--seqlen", "32", "--lr-reference-rms", "0.5", "--out", str(scaled))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((scaled / "manifest.json").read_text())
    assert manifest["config"]["lr_reference_rms"] == 0.5
    assert all(b["lr"] != 1e-3 for b in manifest["blocks"])
    r = epts("compress", "--model", "/not/loaded", "--calib", str(text_file), "--lr-reference-rms", "0",
             "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "--lr-reference-rms: must be a positive number or none" in r.stderr, r.stderr
    r = epts("compress", "--model", "/not/loaded", "--calib", str(text_file), "--lr-reference-rms", "big",
             "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "must be a positive number or none, got big" in r.stderr, r.stderr


def test_help_shows_defaults_but_not_for_switches(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    # A value flag ends with its default; a switch that turns something off must not read "default: True".
    assert "(default: auto)" in text and "(default: elastic)" in text
    switch = text[text.index("--no-refit-sparsegpt refit auto"):]
    assert "(saves a SparseGPT pass) --" in switch and "default: True" not in switch.split(" --")[0]
