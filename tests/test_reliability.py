"""Resume after a kill, numerical guards, and the refusals that keep a bad run from looking good."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import epts.reconstruct as reconstruct
from epts.checkpoint import save_checkpoint
from conftest import HANG_GUARD_S, random_windows, tiny_model, tiny_model_folder, wait_for_file
from epts.artifact import ArtifactError, ElasticModel
from epts.config import CalibConfig, EPTSConfig


def epts_cmd(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", EPTS_CACHE="off")
    return [sys.executable, "-m", "epts.cli", *args], env


def compress_args(model_dir, text_file, out):
    return ("--threads", "1", "compress", "--model", str(model_dir), "--calib", str(text_file), "--nsamples", "4",
            "--seqlen", "64", "--epochs", "8", "--out", str(out))


def test_sigkill_mid_block_then_resume_equals_an_uninterrupted_run(tmp_path, text_file):
    model_dir = tiny_model_folder(tmp_path / "model")
    cmd, env = epts_cmd(*compress_args(model_dir, text_file, tmp_path / "full"))
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=HANG_GUARD_S).returncode == 0

    out = tmp_path / "killed"
    cmd, env = epts_cmd(*compress_args(model_dir, text_file, out))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for_file(out / "checkpoint.json", proc), "the run ended before its first checkpoint"
    proc.send_signal(signal.SIGKILL)  # the first checkpoint is written: the second block is under way
    proc.wait(timeout=HANG_GUARD_S)
    checkpoint = json.loads((out / "checkpoint.json").read_text())
    assert checkpoint["next_block"] in (1, 2) and not (out / "manifest.json").exists()
    with pytest.raises(ArtifactError, match="unfinished run"):
        ElasticModel.load(out)

    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)  # the same command resumes
    assert r.returncode == 0, r.stderr
    assert "(resumed)" in r.stdout
    assert not list(out.glob("checkpoint*")), "checkpoint left behind after the artifact was written"
    full, resumed = load_file(tmp_path / "full" / "adapters.safetensors"), load_file(out / "adapters.safetensors")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full), "resumed artifact differs from the uninterrupted one"


def test_another_command_on_an_unfinished_folder_is_refused(tmp_path, text_file):
    loaded = tiny_model("llama")
    config = EPTSConfig(epochs=1, calib=CalibConfig(nsamples=2, seqlen=32))
    out = tmp_path / "art"
    # Leave a checkpoint behind, as a killed run would.
    calls = reconstruct.capture_block_calls(loaded.model, random_windows(2, 32), 8)
    streams = reconstruct.Streams(calls.hidden, calls.hidden.clone())
    state, streams = reconstruct.compress_block(loaded.model, 0, calls, streams, config)
    save_checkpoint(out, "some-other-run", [state], streams.dense, streams.elastic)
    with pytest.raises(ArtifactError, match="unfinished run of another compress command"):
        reconstruct.compress(loaded, random_windows(2, 32), config, out=out, progress=False)


class _PoisonFirstCalls:
    """Makes the first `count` block calls return NaN, as a diverging optimisation would."""

    def __init__(self, count):
        self.count = count
        self.real = reconstruct.call_block

    def __call__(self, *args, **kwargs):
        out = self.real(*args, **kwargs)
        if self.count > 0:
            self.count -= 1
            return out * float("nan")
        return out


def test_non_finite_loss_retries_the_block_with_a_lower_lr(monkeypatch, tmp_path):
    monkeypatch.setattr(reconstruct, "call_block", _PoisonFirstCalls(1))
    config = EPTSConfig(epochs=1, lr=1e-3, calib=CalibConfig(nsamples=2, seqlen=32))
    elastic = reconstruct.compress(tiny_model("llama"), random_windows(2, 32), config, out=tmp_path / "a", progress=False)
    retries = elastic.blocks[0].retries
    assert len(retries) == 1 and retries[0]["lr"] == pytest.approx(1e-3) and "non-finite loss" in retries[0]["reason"]
    assert all(not s.retries for s in elastic.blocks[1:])
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["blocks"][0]["retries"] == retries
    for a, b in elastic.blocks[0].adapters.values():
        assert all(torch.isfinite(t).all() for t in a + b)


def test_a_block_that_keeps_diverging_stops_the_run_without_an_artifact(monkeypatch, tmp_path):
    monkeypatch.setattr(reconstruct, "call_block", _PoisonFirstCalls(10**9))
    config = EPTSConfig(epochs=1, lr=1e-3, max_retries=2, calib=CalibConfig(nsamples=2, seqlen=32))
    with pytest.raises(reconstruct.NonFiniteError, match="kept diverging \\(3 tries, last lr 1e-05\\)"):
        reconstruct.compress(tiny_model("llama"), random_windows(2, 32), config, out=tmp_path / "a", progress=False)
    assert not (tmp_path / "a" / "manifest.json").exists()


def test_seqlen_beyond_the_model_context_is_refused():
    config = EPTSConfig(calib=CalibConfig(nsamples=2, seqlen=4096))
    with pytest.raises(ValueError, match="seqlen 4096 is longer than the model's context of 512 tokens"):
        reconstruct.compress(tiny_model("llama"), random_windows(2, 32), config, progress=False)


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder nobody may write to, root included (root ignores permission bits, not the immutable flag)."""
    path = tmp_path / "locked"
    path.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
            pytest.skip("cannot make a folder unwritable for root here (chattr +i failed)")
    else:
        path.chmod(0o500)
    yield path
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o700)


def test_output_rules_of_the_compress_command(tmp_path, text_file, unwritable_dir):
    model_dir = tiny_model_folder(tmp_path / "model")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for args, message in [
        ((*compress_args(model_dir, text_file, other),), "is not an unfinished run of epts compress"),
        ((*compress_args(model_dir, text_file, tmp_path / "fresh"), "--resume"), "holds no unfinished compress run"),
        ((*compress_args(model_dir, text_file, unwritable_dir / "art"),), f"cannot write to {unwritable_dir}"),
    ]:
        cmd, env = epts_cmd(*args)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert (other / "notes.txt").read_text() == "mine"
