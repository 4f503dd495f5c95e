"""A CLI that explains itself: every flag documented with its default, `python -m epts`, quiet
runs, a clean Ctrl-C with the resume hint, and a closing summary after compress."""

import argparse
import os
import signal
import subprocess
import sys

import pytest

from conftest import HANG_GUARD_S, SAMPLE_TEXT, tiny_model_folder, wait_for_file
from epts.cli import build_parser

ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", EPTS_CACHE="off")
ENV.pop("TQDM_DISABLE", None)


def epts(*args, env=ENV, **kwargs):
    return subprocess.run([sys.executable, "-m", "epts", *args], capture_output=True, text=True, env=env,
                          timeout=HANG_GUARD_S, **kwargs)


def parsers():
    top = build_parser()
    yield "epts", top
    (sub,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    yield from ((f"epts {name}", p) for name, p in sub.choices.items())


def test_every_flag_of_every_subcommand_has_help_and_shows_its_default():
    # A switch (nargs 0, e.g. --no-refit-sparsegpt) has no value to show; test_cli checks it shows none.
    undocumented, default_hidden = [], []
    for name, parser in parsers():
        shown = " ".join(parser.format_help().split())
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            flag = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not action.help or action.help == argparse.SUPPRESS:
                undocumented.append(flag)
            elif (action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0
                  and f"(default: {action.default})" not in shown):
                default_hidden.append(f"{flag} (default {action.default})")
    assert not undocumented, f"flags without help: {undocumented}"
    assert not default_hidden, f"flags whose help does not show the default: {default_hidden}"


def test_python_dash_m_epts_is_the_epts_command():
    r = epts("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("compress", "export", "eval", "prune", "generate"))
    r = epts("eval")
    assert r.returncode == 2 and "epts eval: error: nothing to evaluate" in r.stderr


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def eval_args(model_dir, tmp_path_factory):
    text = tmp_path_factory.mktemp("text") / "text.txt"
    text.write_text(SAMPLE_TEXT)
    return ["eval", "--model", str(model_dir), "--data", str(text), "--seqlen", "64", "--max-windows", "4"]


@pytest.fixture(scope="module")
def loud(eval_args):
    """The run with progress bars that both quiet runs are compared with."""
    loud = epts(*eval_args)
    assert loud.returncode == 0 and "perplexity: " in loud.stdout and "it/s" in loud.stderr
    return loud


@pytest.mark.parametrize("quiet", [["--quiet"], "TQDM_DISABLE"])
def test_quiet_and_tqdm_disable_silence_the_progress_bars(eval_args, loud, quiet):
    if quiet == "TQDM_DISABLE":
        r = epts(*eval_args, env=dict(ENV, TQDM_DISABLE="1"))
    else:
        r = epts(*eval_args, *quiet)
    assert r.returncode == 0 and r.stdout == loud.stdout and "it/s" not in r.stderr, r.stderr


# `python -m epts` whose compress waits after its first checkpoint for the Ctrl-C, so that the run cannot
# finish before the test interrupts it, however slow or busy the machine is.
HOLD_AFTER_THE_FIRST_CHECKPOINT = """
import signal, sys, time
import epts.reconstruct as reconstruct
from epts.cli import main

# Ctrl-C raises KeyboardInterrupt even where this process was started with SIGINT ignored (a background job).
signal.signal(signal.SIGINT, signal.default_int_handler)
save = reconstruct.save_checkpoint


def save_then_wait(*args, **kwargs):
    save(*args, **kwargs)
    reconstruct.save_checkpoint = save
    # The test's SIGINT raises KeyboardInterrupt here. Not signal.pause(): a SIGINT landing between the
    # checkpoint's rename and the pause() call would be handled before it, and pause() would then wait forever.
    while True:
        time.sleep(0.05)


reconstruct.save_checkpoint = save_then_wait
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_during_compress_exits_130_with_the_resume_hint_then_the_rerun_resumes(model_dir, text_file, tmp_path):
    out = tmp_path / "art"
    args = ["compress", "--model", str(model_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "64",
            "--epochs", "2", "--out", str(out), "--quiet"]
    proc = subprocess.Popen([sys.executable, "-c", HOLD_AFTER_THE_FIRST_CHECKPOINT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    assert wait_for_file(out / "checkpoint.json", proc), proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert "1 finished blocks are checkpointed" in stderr and "rerun the same command" in stderr, stderr
    assert "--resume" in stderr, stderr
    r = epts(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(resumed)" in r.stdout
    assert "trained sparsity range: 0 to 0.7" in r.stdout
    kept = [line for line in r.stdout.splitlines() if "group-1 adapters kept:" in line]
    assert len(kept) == 1 and "/3 blocks" in kept[0]
    assert f"epts eval {out} --sparsity" in r.stdout and f"epts export {out} --sparsity" in r.stdout
    # eval on an exported folder says what it is; on an artifact given as --model, what to run instead.
    r = epts("export", str(out), "--sparsity", "0.5", "--out", str(tmp_path / "x"), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    r = epts("eval", "--model", str(tmp_path / "x"), "--data", str(text_file), "--seqlen", "64", "--max-windows", "2")
    assert r.returncode == 0 and r.stdout.startswith(f"{tmp_path / 'x'}: exported by epts export from the artifact "
                                                     f"{out} at sparsity 0.5 (uniform allocation"), r.stdout
    r = epts("eval", "--model", str(out), "--data", str(text_file))
    assert r.returncode == 2 and "is an EPTS artifact, not a model folder: evaluate it" in r.stderr


def test_ctrl_c_before_the_first_block_says_nothing_was_saved(model_dir, text_file, tmp_path, monkeypatch, capsys):
    import epts.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(epts.cli, "compress", interrupted)
    code = epts.cli.main(["compress", "--model", str(model_dir), "--calib", str(text_file), "--out",
                          str(tmp_path / "art"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted before the first block finished" in err and "Traceback" not in err
