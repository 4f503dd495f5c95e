"""Smoke test of the benchmark runner: tiny model, two sparsities, every kind of job."""

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_model_folder
from epts.zeroshot import write_continuation_task

ROOT = Path(__file__).resolve().parents[1]


def run_suite(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "smoke", *args], capture_output=True,
                          text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    from conftest import SAMPLE_TEXT

    text = tmp / "text.txt"
    text.write_text(SAMPLE_TEXT)
    model = tiny_model_folder(tmp / "model")
    # A local zero-shot task: paragraphs of four sentences, so that every choice set has distractors.
    sentences = re.findall(r"The .*? keeps the rest\.", SAMPLE_TEXT)
    paragraphs = tmp / "paragraphs.txt"
    paragraphs.write_text("\n".join(" ".join(sentences[i:i + 4]) for i in range(0, 80, 4)))
    task = write_continuation_task(paragraphs, tmp / "task", num_docs=8)
    args = ["--model", str(model), "--calib", str(text), "--eval", str(text), "--out", str(tmp / "out"),
            "--work", str(tmp / "work"), "--zeroshot-task", str(task)]
    r = run_suite(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "out", args


def test_smoke_suite_writes_every_row_table_and_plot(smoke):
    out, _ = smoke
    rows = json.loads((out / "results.json").read_text())["rows"]
    kinds = {(r["method"], r["sparsity"]) for r in rows}
    expected = {("dense", "0")} | {(m, s) for m in ("magnitude", "wanda", "sparsegpt", "epts") for s in ("0.3", "0.6")}
    assert kinds == expected | {("lora-single", "0.6")}
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in rows)
    assert all(0 <= r["zeroshot_acc"] <= 1 and 0 <= r["zeroshot_acc_norm"] <= 1 for r in rows)
    dense = next(r["ppl"] for r in rows if r["method"] == "dense")
    assert all(r["ppl"] != dense for r in rows if r["method"] != "dense")  # pruning changed the model
    for r in rows:
        if r["method"] != "dense":
            assert r["compress_seconds"] > 0 and r["peak_rss_mb"] > 0 and r["command"].startswith("epts ")
    assert all(r["materialize_seconds"] >= 0 for r in rows if r["method"] in ("epts", "lora-single"))
    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    table = (out / "results.md").read_text()
    assert table.count("\n| epts | ") == 2 and "EPTS against each method" in table and "zero-shot acc" in table
    for png in ("ppl_vs_sparsity.png", "cumulative_time.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_cumulative_time_counts_one_epts_run_then_merges():
    from benchmarks.run import cumulative_seconds

    rows = [{"method": "epts", "sparsity": "0.3", "compress_seconds": 100.0, "materialize_seconds": 0.5},
            {"method": "epts", "sparsity": "0.5", "compress_seconds": 100.0, "materialize_seconds": 0.25},
            {"method": "wanda", "sparsity": "0.3", "compress_seconds": 30.0, "materialize_seconds": None},
            {"method": "wanda", "sparsity": "0.5", "compress_seconds": 40.0, "materialize_seconds": None},
            {"method": "wanda", "sparsity": "2:4", "compress_seconds": 40.0, "materialize_seconds": None}]
    assert cumulative_seconds(rows, "epts") == [100.5, 100.75]
    assert cumulative_seconds(rows, "wanda") == [30.0, 70.0]


def test_resume_skips_finished_jobs(smoke):
    out, args = smoke
    before = json.loads((out / "results.json").read_text())["rows"]
    r = run_suite(*args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("done earlier, skipped") == 9  # dense, 3 methods x 2, epts, lora
    assert json.loads((out / "results.json").read_text())["rows"] == before


def test_the_harness_reads_each_refit_token_and_names_its_rows():
    from benchmarks.experiments import parse_refit, refit_variant_name

    cases = {"auto": "v+refit-auto", "auto:tune_epochs=2": "v+refit-auto-te2",
             "auto:tune_step=0.1": "v+refit-auto-ts0.1", "auto:sparsegpt=0": "v+refit-auto-no-sparsegpt",
             "ridge:1": "v+refit-all-r1", "all:mask=obs": "v+refit-all-mask-obs"}
    for token, name in cases.items():
        assert refit_variant_name("v", parse_refit(token, 10, 0.0)) == name
    tuned = parse_refit("auto:tune_epochs=2", 10, 0.0)
    assert (tuned.tune_epochs, type(tuned.tune_epochs), tuned.tune_step) == (2, int, 0.03)
    assert parse_refit("auto:tune_step=0.1", 10, 0.0).tune_step == pytest.approx(0.1)
    for token, message in (("auto:tune_epochs=x", "--refit token 'auto:tune_epochs=x': config field tune_epochs"),
                           ("auto:tune_epochs=-1", "--refit token 'auto:tune_epochs=-1': refit tune_epochs must be"),
                           ("auto:epochs=2", "--refit token 'auto:epochs=2': expected MODE"),
                           ("auto:tune_step=", "--refit token 'auto:tune_step=': expected MODE")):
        with pytest.raises(ValueError) as raised:
            parse_refit(token, 10, 0.0)
        assert str(raised.value).startswith(message)


def test_the_refit_choice_tool_reports_each_setting(tmp_path, text_file, capsys):
    from benchmarks.refit_choice import main
    from epts.config import CalibConfig, EPTSConfig
    from epts.models import load_model
    from epts.reconstruct import compress

    config = EPTSConfig(epochs=1, boundaries=(0, .5, .7), ranks=2, mix_weights=(.5, .5),
                        calib=CalibConfig(nsamples=2, seqlen=16))
    compress(load_model(tiny_model_folder(tmp_path / "model")), text_file, config, out=tmp_path / "art",
             progress=False)
    main([str(tmp_path / "art"), "0.6:2:4", "0.6:1:1", "0.6:2:4:auto", "--heldout-windows", "3",
          "--eval-seqlen", "32"])
    lines = capsys.readouterr().out.splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["0.6:2:4", "0.6:1:1", "0.6:2:4:auto"]
    for line in lines[:2]:
        _, ppl, choices, seconds, chose = line.split()
        assert math.isfinite(float(ppl)) and len(choices) == 3 and set(choices) <= {"R", "a"} and chose == "-"
    assert lines[0].split()[1] != lines[1].split()[1]  # 1 step instead of 4: another model
    _, ppl, choices, seconds, chose, *scores = lines[2].split()
    losses = {k: float(v) for k, v in (score.split("=") for score in scores)}
    rebuilt = losses.pop("reconstructed")  # the winner reconstructed block-wise, then tuned end to end
    tuned = losses.pop("tuned")
    other = {k: losses.pop(k) for k in ("all+reconstructed", "all+tuned") if k in losses}  # "all" too, where it lost
    winner = min(losses, key=losses.get)
    assert set(losses) == {"bare", "all", "sparsegpt"} and set(other) in (set(), {"all+reconstructed", "all+tuned"})
    assert bool(other) == (winner != "all")
    outcomes = {winner: losses[winner], f"{winner}+reconstructed": rebuilt, f"{winner}+tuned": tuned}
    if other:
        outcomes["all+tuned"] = other["all+tuned"]  # only its tuned model may replace the winner's
    assert chose == min(outcomes, key=outcomes.get)
    assert choices == {"all": "RRR", "bare": "aaa", "sparsegpt": "SSS"}[chose.split("+")[0]]
    for bad in ("0.6", "0.6:2:4:all"):
        with pytest.raises(SystemExit):
            main([str(tmp_path / "art"), bad])


def test_quality_json_labels_the_default_export_and_takes_window_counts_from_the_command(tmp_path):
    command = ("python -m benchmarks.experiments benchmarks/experiments/default.yaml --sparsities 0.5 --test "
               "--test-windows 16 --heldout-windows 8 --other-text X --other-windows 4 --out O")
    rows = [{"variant": v, "sparsity": s, "scope": "blocks=all", "commit": "abc1234", "command": command,
             "ppl_heldout": p, "ppl_other": p + 1, "ppl_test": p + 2}
            for v, s, p in [("dense", 0.0, 10.0), ("sparsegpt", 0.5, 20.0), ("default", 0.5, 19.0),
                            ("default+refit-auto", 0.5, 18.0)]]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "q" / "m.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.quality_json", str(src), "--default", "default+refit-auto",
                        "--model", "m", "--to", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())["rows"]
    assert len(got) == 12
    epts = {(g["text"], g["ppl"], g["windows"]) for g in got if g["method"] == "epts"}
    assert epts == {("heldout", 18.0, 8), ("other-domain", 19.0, 4), ("wikitext2-test", 20.0, 16)}
    assert {g["variant"] for g in got if g["method"] == "epts-variant"} == {"default"}
    bad = subprocess.run([sys.executable, "-m", "benchmarks.quality_json", str(src), "--default", "nope", "--model",
                          "m", "--to", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "no row of variant 'nope'" in bad.stderr


SMALL_VARIANT = "epochs: 1\nboundaries: [0, 0.5, 0.7]\nranks: 2\nmix_weights: [0.5, 0.5]\n"


def run_harness(tmp_path, text_file, variant_text, *args):
    from benchmarks.experiments import main

    variant = tmp_path / "small.yaml"
    variant.write_text(variant_text)
    model = tiny_model_folder(tmp_path / "model")
    main([str(variant), "--model", str(model), "--calib", str(text_file), "--nsamples", "2", "--seqlen", "16",
          "--eval-seqlen", "32", "--heldout-windows", "2", "--sparsities", "0.6", "--quiet", "--out",
          str(tmp_path / "out"), *args])
    return model


def test_the_harness_serves_every_row_at_owls_per_block_sparsities(tmp_path, text_file):
    run_harness(tmp_path, text_file, SMALL_VARIANT, "--baselines", "sparsegpt", "--refit", "auto",
                "--allocation", "owl")
    rows = {r["variant"]: r for r in map(json.loads, (tmp_path / "out" / "rows.jsonl").read_text().splitlines())}
    assert set(rows) == {"dense", "sparsegpt+owl", "small+owl", "small+owl+refit-auto"}
    for name in ("sparsegpt+owl", "small+owl", "small+owl+refit-auto"):
        plan = rows[name]["block_sparsity"]
        assert len(plan) == 3 and abs(sum(plan) / 3 - 0.6) < 1e-6  # the tiny model's 3 blocks are the same size
        assert max(plan) - min(plan) > 0.1  # OWL's spread, 2 x lambda 0.08 between the extreme blocks
    assert rows["small+owl"]["block_sparsity"] == rows["small+owl+refit-auto"]["block_sparsity"]
    assert rows["small+owl+refit-auto"]["refit"]["chosen"] in ("bare", "all", "sparsegpt")
    with pytest.raises(SystemExit):  # a proxy of the first blocks has no global budget to spread
        run_harness(tmp_path, text_file, SMALL_VARIANT, "--allocation", "owl", "--blocks", "1")


def test_the_harness_draws_a_variants_calibration_windows_with_its_own_seed(tmp_path, text_file):
    from epts.artifact import windows_sha256
    from epts.data import calibration_windows, tokenize
    from epts.models import load_model

    model = run_harness(tmp_path, text_file, SMALL_VARIANT + "calib: {seed: 1}\n", "--baselines", "",
                        "--keep-artifacts")
    recorded = json.loads((tmp_path / "out" / "artifacts" / "small" / "manifest.json").read_text())["calibration"]
    tokens = tokenize(load_model(model).tokenizer, text_file, role="calib")
    assert recorded["windows_sha256"] == windows_sha256(calibration_windows(tokens, 2, 16, seed=1))
    assert recorded["windows_sha256"] != windows_sha256(calibration_windows(tokens, 2, 16, seed=0))
