"""Streams past a RAM budget live in memory-mapped scratch files; the artifact is the same."""

import json
import tempfile
from pathlib import Path

import pytest
import torch

import epts.reconstruct as reconstruct
from conftest import random_windows, tiny_model, tiny_model_folder
from epts.cli import main
from epts.config import CalibConfig, EPTSConfig
from epts.streams import StreamStore


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """TMPDIR for this test: where spilled streams go."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _watch_training(monkeypatch, fail: bool = False) -> list[dict]:
    """Record, at each block's training, the files its streams map and the scratch files then present."""
    seen, real = [], reconstruct.train_block

    def train_block(runner, layers, inputs, targets, *args):
        files = [t.untyped_storage().filename for t in (inputs, targets)]
        seen.append({"files": files, "present": sorted(Path(tempfile.gettempdir()).glob("epts-streams-*/*"))})
        if fail:
            raise RuntimeError("stopped mid-run")
        return real(runner, layers, inputs, targets, *args)

    monkeypatch.setattr(reconstruct, "train_block", train_block)
    return seen


def _compress(budget, tmp_path):
    config = EPTSConfig(epochs=1, calib=CalibConfig(nsamples=4, seqlen=32), stream_memory_mb=budget)
    return reconstruct.compress(tiny_model("llama"), random_windows(4, 32), config, out=tmp_path / f"art-{budget}",
                                progress=False)


def test_a_stream_spills_when_two_of_its_size_exceed_the_budget(scratch):
    shape = (4, 32, 64)  # float32: 32 KiB a stream, 0.0625 MiB for two
    assert not StreamStore(None).spills(shape, torch.float32)
    assert not StreamStore(0.0625).spills(shape, torch.float32)
    assert StreamStore(0.0624).spills(shape, torch.float32)
    assert not StreamStore(0.0624).spills(shape, torch.bfloat16)  # half the bytes
    with StreamStore(0) as store:
        source = torch.randn(shape)
        kept = store.keep(source)
        assert torch.equal(kept, source) and kept.untyped_storage().filename is not None
        file = Path(kept.untyped_storage().filename)
        assert file.parent.parent == scratch and file.stat().st_size == 32 * 1024
        del kept  # a freed stream's file goes at once
        assert not file.exists() and file.parent.is_dir()
    assert not list(scratch.glob("epts-streams-*"))
    with StreamStore(1) as store:
        assert store.keep(source) is source and store.clone(source).untyped_storage().filename is None


def test_streams_past_the_budget_are_mapped_files_and_the_artifact_is_unchanged(tmp_path, scratch, monkeypatch):
    seen = _watch_training(monkeypatch)
    in_ram = _compress(None, tmp_path)
    assert len(seen) == 3 and all(f is None for s in seen for f in s["files"]) and not any(s["present"] for s in seen)
    seen.clear()
    spilled = _compress(0, tmp_path)
    assert len(seen) == 3
    for s in seen:  # elastic inputs and dense targets of every block: files of the scratch folder, there while used
        assert all(f is not None and Path(f).parent.parent == scratch for f in s["files"])
        assert {Path(f) for f in s["files"]} <= set(s["present"])
    assert not list(scratch.glob("epts-streams-*")), "scratch files left after the run"
    # The same arithmetic on tensors that live elsewhere: bit for bit the same artifact.
    for a, b in zip(in_ram.blocks, spilled.blocks):
        assert a.adapters.keys() == b.adapters.keys()
        for name in a.adapters:
            for x, y in zip([*a.adapters[name][0], *a.adapters[name][1]], [*b.adapters[name][0], *b.adapters[name][1]]):
                assert torch.equal(x, y)
            assert torch.equal(a.input_norms[name], b.input_norms[name])
        assert (a.losses, a.group1_adapter) == (b.losses, b.group1_adapter)
    assert max(x.abs().max().item() for s in spilled.blocks for x in s.adapters["mlp.down_proj"][1]) > 0, "trained"


def test_the_scratch_folder_goes_when_the_run_fails(tmp_path, scratch, monkeypatch):
    seen = _watch_training(monkeypatch, fail=True)
    with pytest.raises(RuntimeError, match="stopped mid-run"):
        _compress(0, tmp_path)
    assert len(seen) == 1 and len(seen[0]["present"]) >= 2, "the streams were files while the run went on"
    assert not list(scratch.glob("epts-streams-*"))


def test_compress_stream_memory_flag_sets_the_budget(tmp_path, scratch, text_file, monkeypatch, capsys):
    monkeypatch.setenv("EPTS_CACHE", "off")
    seen = _watch_training(monkeypatch)
    model = tiny_model_folder(tmp_path / "model")
    out = tmp_path / "art"
    assert main(["compress", "--model", str(model), "--calib", str(text_file), "--nsamples", "2", "--seqlen", "32",
                 "--epochs", "1", "--stream-memory", "0", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "manifest.json").read_text())["config"]["stream_memory_mb"] == 0
    assert seen and all(f is not None for s in seen for f in s["files"])
    assert not list(scratch.glob("epts-streams-*"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["compress", "--model", str(model), "--calib", str(text_file), "--out", str(tmp_path / "x"),
              "--stream-memory", "-1"])
    assert exit_.value.code == 2
    assert "argument --stream-memory: must be a number >= 0, got -1" in capsys.readouterr().err


def test_a_run_resumes_under_another_budget():
    from epts.checkpoint import run_key

    windows = random_windows(2, 8)
    assert run_key(EPTSConfig(stream_memory_mb=0), "fp", windows) == run_key(EPTSConfig(), "fp", windows)
    assert run_key(EPTSConfig(epochs=3), "fp", windows) != run_key(EPTSConfig(), "fp", windows)


def test_a_full_scratch_disk_is_a_one_line_error_not_a_crash(scratch, monkeypatch):
    import errno
    import os

    from epts.streams import ScratchSpaceError

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with StreamStore(0) as store:
        with pytest.raises(ScratchSpaceError, match=r"no room for a 2 MiB calibration stream in .*epts-streams-.* "
                                                    r"\(No space left on device\): .*raise --stream-memory"):
            store.empty((8, 256, 256), torch.float32)
        assert not list(store.scratch.iterdir())
    assert not list(scratch.glob("epts-streams-*"))
