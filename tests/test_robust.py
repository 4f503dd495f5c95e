"""Nothing lost, nothing silently wrong: overwrite and resume, concurrent writers, model
folders as download tools leave them, signals and scratch space, config types, clean errors."""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import epts
import epts.offload as offload
from conftest import SAMPLE_TEXT, random_windows, tiny_model, tiny_model_folder
from epts import cli, distributed
from epts.artifact import ArtifactError, ElasticModel
from epts.checkpoint import CHECKPOINT, run_key, run_settings, save_checkpoint
from epts.config import CalibConfig, EPTSConfig, RefitConfig
from epts.io import LOCK, folder_lock, publish_folder
from epts.models import ModelLoadError, fingerprint, load_model, save_model
from epts.reconstruct import Streams, capture_block_calls, compress, compress_block, decoder_blocks
from epts.streams import ScratchSpaceError, StreamStore, scratch_prefix, sweep_scratch

CONFIG = EPTSConfig(epochs=1, boundaries=(0, .5, .7), ranks=2, mix_weights=(.5, .5),
                    calib=CalibConfig(nsamples=4, seqlen=32))


def epts_cli(*args, env=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", EPTS_CACHE="off", **(env or {}))
    return subprocess.run([sys.executable, "-m", "epts.cli", *args], capture_output=True, text=True, env=env)


def one_line_error(r, message):
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]  # progress bars of the loading may come before it
    assert last.startswith("epts ") and ": error: " in last and message in last, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("error:") == 1, r.stderr


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(SAMPLE_TEXT)
    return path


@pytest.fixture(scope="module")
def artifact(model_dir, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "art"
    compress(load_model(model_dir), calib_file, CONFIG, out=out, progress=False)
    return out


# ---- losing work or data -------------------------------------------------------------------------

def _unfinished_run(out: Path, config: EPTSConfig) -> None:
    """A checkpoint after block 1, as a pre-empted run of `config` on the tiny llama leaves it."""
    loaded = tiny_model("llama")
    windows = random_windows(config.calib.nsamples, config.calib.seqlen)
    calls = capture_block_calls(loaded.model, windows, 8)
    state, streams = compress_block(loaded.model, 0, calls, Streams(calls.hidden, calls.hidden.clone()), config)
    fp = fingerprint(loaded.model)
    save_checkpoint(out, run_key(config, fp, windows), [state], streams.dense, streams.elastic,
                    run_settings(config, fp, windows))


def test_resume_with_overwrite_is_refused_and_keeps_the_checkpoint(tmp_path, model_dir, calib_file):
    out = tmp_path / "art"
    _unfinished_run(out, CONFIG)
    before = sorted(p.name for p in out.iterdir())
    r = epts_cli("compress", "--model", str(model_dir), "--calib", str(calib_file), "--out", str(out), "--resume",
                 "--overwrite")
    one_line_error(r, "--resume continues the run checkpointed in --out, --overwrite deletes it: pass only one")
    assert sorted(p.name for p in out.iterdir()) == before
    # The hint after an interrupted --overwrite run cannot be read as "add --resume to the same command".
    hint = cli._resume_hint(argparse.Namespace(command="compress", out=str(out), overwrite=True))
    assert "rerun the command with --resume in place of --overwrite" in hint and "block 2" in hint


def test_a_second_compress_into_a_folder_being_written_is_refused(tmp_path, model_dir, calib_file):
    out = tmp_path / "art"
    _unfinished_run(out, CONFIG)
    before = sorted(p.name for p in out.iterdir())
    with folder_lock(out, "--out"):  # as the first run holds it for its whole run
        for extra in ([], ["--overwrite"]):
            r = epts_cli("compress", "--model", str(model_dir), "--calib", str(calib_file), "--out", str(out), *extra)
            one_line_error(r, f"{out} is being written by another epts run: wait for it to end, or choose another "
                              f"--out")
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, LOCK])


def test_a_resume_refusal_names_the_setting_that_differs(tmp_path):
    out = tmp_path / "art"
    _unfinished_run(out, CONFIG)
    other = EPTSConfig(epochs=2, boundaries=(0, .5, .7), ranks=2, mix_weights=(.5, .5),
                       calib=CalibConfig(nsamples=4, seqlen=32))
    with pytest.raises(ArtifactError, match=r"another compress command \(epochs: 1 in the checkpoint, 2 now\)"):
        compress(tiny_model("llama"), random_windows(4, 32), other, out=out, progress=False)
    with pytest.raises(ArtifactError, match="the calibration windows"):
        compress(tiny_model("llama"), random_windows(4, 32, seed=1), CONFIG, out=out, progress=False)
    assert (out / CHECKPOINT).is_file()


def _as_an_older_epts_left_it(out: Path, missing: str) -> None:
    """The checkpoint as an epts without the config field `missing` wrote it: another key, no such setting."""
    meta = json.loads((out / CHECKPOINT).read_text())
    del meta["settings"]["config"][missing]
    meta["run_key"] = "the key of an older epts"
    (out / CHECKPOINT).write_text(json.dumps(meta))


def test_a_run_checkpointed_before_a_new_config_field_resumes_where_it_is_at_its_default(tmp_path, monkeypatch):
    import epts.reconstruct as reconstruct

    out = tmp_path / "art"
    _unfinished_run(out, CONFIG)
    _as_an_older_epts_left_it(out, "top_groups_every_step")
    trained = []
    real = reconstruct.compress_block
    monkeypatch.setattr(reconstruct, "compress_block",
                        lambda model, b, *args, **kw: trained.append(b) or real(model, b, *args, **kw))
    compress(tiny_model("llama"), random_windows(4, 32), CONFIG, out=out, progress=False)
    assert trained == [1, 2], "block 1 came from the checkpoint"
    # A field the checkpoint lacks but that is not at its default now: another run, refused by name.
    again = tmp_path / "again"
    _unfinished_run(again, CONFIG)
    _as_an_older_epts_left_it(again, "epochs")
    with pytest.raises(ArtifactError, match=r"\(epochs: None in the checkpoint, 1 now\)"):
        compress(tiny_model("llama"), random_windows(4, 32), CONFIG, out=again, progress=False)


def test_a_folder_that_appears_meanwhile_is_never_removed(tmp_path, monkeypatch):
    import epts.models as models

    loaded = tiny_model("llama")
    out = tmp_path / "export"
    real = models.unprivate_tree

    def another_run_finishes_first(folder):  # the other writer renames its folder in while ours is written
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
        real(folder)

    monkeypatch.setattr(models, "unprivate_tree", another_run_finishes_first)
    with pytest.raises(FileExistsError, match="appeared while this run was writing it"):
        save_model(loaded, out)
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # our temporary folder is gone too
    monkeypatch.setattr(models, "unprivate_tree", real)
    save_model(loaded, out, overwrite=True)  # only on request
    assert (out / "config.json").is_file() and not (out / "theirs.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_publish_folder_replaces_only_with_overwrite(tmp_path):
    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    with pytest.raises(FileExistsError):
        publish_folder(new, out)
    assert (out / "old.txt").is_file() and (new / "new.txt").is_file()
    publish_folder(new, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["new.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- model folders as download tools leave them ----------------------------------------------------

def _sharded_folder(tmp_path) -> Path:
    folder = tiny_model_folder(tmp_path / "model")
    model = load_model(folder).model
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def test_block_streaming_follows_the_shard_index_past_an_older_revision(tmp_path):
    folder = _sharded_folder(tmp_path)
    expected = fingerprint(load_model(folder).model)
    # An older revision's shards, as a download tool leaves them: other values under the same names.
    for shard in sorted(folder.glob("model-*.safetensors")):
        old = {k: v + 1 for k, v in load_file(shard).items()}
        save_file(old, folder / shard.name.replace("model-", "old-model-"), metadata={"format": "pt"})
    streamed = load_model(folder, stream=True)
    assert offload.is_streamed(decoder_blocks(streamed.model)[0])
    assert fingerprint(streamed.model) == expected == fingerprint(load_model(folder).model)


def test_two_revisions_or_a_tensor_stored_twice_are_refused(tmp_path):
    folder = _sharded_folder(tmp_path)
    first = sorted(folder.glob("model-*.safetensors"))[0]
    shutil.copy(first, folder / "model.safetensors")  # transformers would read this one, the index names others
    with pytest.raises(ModelLoadError, match="two revisions of the model side by side"):
        load_model(folder, stream=True)
    plain = tiny_model_folder(tmp_path / "plain")
    (plain / "model.safetensors").rename(plain / "weights-a.safetensors")
    shutil.copy(plain / "weights-a.safetensors", plain / "weights-b.safetensors")
    with pytest.raises(ModelLoadError, match="is stored twice, in weights-a.safetensors and weights-b.safetensors"):
        load_model(plain, stream=True)


def test_an_unsafe_pickle_is_one_line_naming_the_file(tmp_path):
    folder = tiny_model_folder(tmp_path / "model")
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**weights, "extra": argparse.Namespace(x=1)}, folder / "pytorch_model.bin")  # refers to code
    r = epts_cli("eval", "--model", str(folder), "--data", str(folder / "config.json"))
    one_line_error(r, f"{folder / 'pytorch_model.bin'} holds a pickle that refers to code (nothing was run)")
    assert "weights_only" not in r.stderr


# ---- remote code ------------------------------------------------------------------------------------

_CONFIG_CODE = """from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    pass
"""
_MODEL_CODE = """from transformers import LlamaForCausalLM

from .configuration_tiny import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
"""


@pytest.fixture
def remote_code_folder(tmp_path):
    folder = tiny_model_folder(tmp_path / "remote")
    (folder / "configuration_tiny.py").write_text(_CONFIG_CODE)
    (folder / "modeling_tiny.py").write_text(_MODEL_CODE)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_tiny.TinyRemoteConfig",
                          "AutoModelForCausalLM": "modeling_tiny.TinyRemoteForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_trust_remote_code_is_recorded_honoured_and_its_code_exported(remote_code_folder, calib_file, tmp_path):
    loaded = load_model(remote_code_folder, trust_remote_code=True)
    assert type(loaded.model).__name__ == "TinyRemoteForCausalLM"
    art = tmp_path / "art"
    compress(loaded, calib_file, CONFIG, out=art, progress=False)
    assert json.loads((art / "manifest.json").read_text())["base_model"]["trust_remote_code"] is True
    with pytest.raises(ArtifactError, match="pass --trust-remote-code"):
        ElasticModel.load(art)
    r = epts_cli("generate", str(art), "--sparsity", "0.5", "--prompt", "The model", "--max-new-tokens", "2")
    one_line_error(r, "pass --trust-remote-code")
    out = tmp_path / "export"
    r = epts_cli("export", str(art), "--sparsity", "0.5", "--refit", "none", "--out", str(out), "--trust-remote-code")
    assert r.returncode == 0, r.stderr
    assert (out / "modeling_tiny.py").is_file() and (out / "configuration_tiny.py").is_file()
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(exported).__name__ == "TinyRemoteForCausalLM"
    assert (exported.model.layers[0].mlp.up_proj.weight == 0).float().mean() == pytest.approx(0.5, abs=0.02)


# ---- the refit's text, memory and scratch space -----------------------------------------------------

def test_the_search_text_is_not_the_refit_text_and_the_refit_text_is_recorded(artifact, tmp_path):
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(SAMPLE_TEXT[::-1])
    meta = epts.export(artifact, 0.5, tmp_path / "search", allocation="search", calib=heldout, search_seconds=1,
                       search_samples=2, search_seqlen=32, refit="all", progress=False)
    used = meta["refit"]["calibration"]
    assert used["artifact_windows"] and used["source"] == json.loads(
        (artifact / "manifest.json").read_text())["calibration"]["source"]
    meta = epts.export(artifact, 0.5, tmp_path / "other", calib=heldout, refit="all", progress=False)
    assert meta["refit"]["calibration"] == {**meta["refit"]["calibration"], "source": str(heldout),
                                            "artifact_windows": False}
    card = (tmp_path / "other" / "README.md").read_text()
    assert f"{heldout} (not the windows the artifact was trained on)" in card


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for file in sorted(folder.glob("*.safetensors")) for k, v in load_file(file).items()}


@pytest.mark.parametrize("mode", ["all", RefitConfig("auto", reconstruct_epochs=2)])  # auto: its copies and the
# reconstruction's streams too
def test_export_refit_streams_spill_under_stream_memory_with_the_same_result(artifact, tmp_path, monkeypatch, mode):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    spilled = []
    real = StreamStore.empty

    def empty(self, shape, dtype):
        spilled.append(self.spills(shape, dtype))
        return real(self, shape, dtype)

    monkeypatch.setattr(StreamStore, "empty", empty)
    meta = epts.export(artifact, 0.5, tmp_path / "ram", refit=mode, progress=False)
    # Only auto's copies of a streamed model's weights (what undoes a losing candidate) go to scratch files.
    assert spilled and not any(spilled[:1]) and (mode != "all" or not any(spilled))
    assert (meta["refit"]["reconstructed"] is not None) == (mode != "all")
    spilled.clear()
    epts.export(artifact, 0.5, tmp_path / "disk", refit=mode, progress=False, stream_memory_mb=0)
    assert spilled and all(spilled)
    ram, disk = _weights(tmp_path / "ram"), _weights(tmp_path / "disk")
    assert ram.keys() == disk.keys() and all(torch.equal(ram[k], disk[k]) for k in ram)
    assert not list(scratch.iterdir())


def test_a_tmpdir_without_room_is_refused_before_the_work(artifact, model_dir, tmp_path, monkeypatch):
    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(offload.shutil, "disk_usage", lambda path: free._replace(free=1024))
    with pytest.raises(ScratchSpaceError, match=r"in TMPDIR \(.*\): \d+ MiB needed, 0 MiB free there"):
        epts.export(artifact, 0.5, tmp_path / "out", refit="none", progress=False)
    loaded = load_model(model_dir, stream=True)
    with pytest.raises(ScratchSpaceError, match="pruning a streamed model keeps the changed decoder blocks"):
        epts.prune(loaded, None, epts.PruneConfig(method="magnitude"), progress=False)
    assert not (tmp_path / "out").exists()


def test_the_scratch_check_counts_the_copies_that_undo_a_refit_candidate(artifact, model_dir, tmp_path, monkeypatch):
    from epts.arch import prunable_linears

    model = load_model(model_dir, stream=True).model
    blocks = sum(t.numel() * t.element_size() for b in decoder_blocks(model) for t in b.state_dict().values())
    copies = sum(l.weight.numel() * l.weight.element_size()
                 for b in decoder_blocks(model) for l in prunable_linears(model, b).values())
    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(offload.shutil, "disk_usage", lambda path: free._replace(free=blocks + copies // 2))
    offload.check_scratch_space(model, "exporting")  # room for the blocks alone
    with pytest.raises(ScratchSpaceError, match=r"keeps the changed decoder blocks and a copy of their weights in "):
        offload.check_scratch_space(model, "exporting", copies=True)
    # The default export chooses between refit candidates, so it is refused before the work.
    with pytest.raises(ScratchSpaceError, match="a copy of their weights"):
        epts.export(artifact, 0.5, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_full_tmpdir_while_keeping_a_block_is_one_error(model_dir, monkeypatch):
    from safetensors import SafetensorError
    import safetensors.torch

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    loaded = load_model(model_dir, stream=True)
    with pytest.raises(ScratchSpaceError, match="set TMPDIR to a disk with room for the whole decoder"):
        epts.prune(loaded, None, epts.PruneConfig(method="magnitude"), progress=False)


# ---- signals and scratch folders --------------------------------------------------------------------

def test_sigterm_stops_compress_like_ctrl_c_and_leaves_nothing_in_tmpdir(tmp_path, model_dir, calib_file):
    scratch, out = tmp_path / "scratch", tmp_path / "art"
    scratch.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", EPTS_CACHE="off", TMPDIR=str(scratch))
    proc = subprocess.Popen([sys.executable, "-m", "epts.cli", "--threads", "1", "compress", "--model", str(model_dir),
                             "--calib", str(calib_file), "--nsamples", "4", "--seqlen", "64", "--epochs", "50",
                             "--stream-memory", "0", "--out", str(out), "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not list(scratch.glob("epts-streams-*/stream-*.bin")):  # the spilled streams are in TMPDIR
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # during block 1 (50 epochs)
    stderr = proc.communicate()[1]
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "terminated (SIGTERM); interrupted before the first block finished" in stderr
    assert "Traceback" not in stderr
    assert not list(scratch.iterdir())


_TERM_AT_KEEP = """
import os, signal, sys
import epts.offload as offload
from epts.cli import main

real, calls = offload._keep_weights, []


def keep_then_term(block, hook):  # SIGTERM once the Nth changed block is in its scratch file
    real(block, hook)
    calls.append(1)
    if len(calls) == int(os.environ["TERM_AT"]):
        os.kill(os.getpid(), signal.SIGTERM)


offload._keep_weights = keep_then_term
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command, term_at", [("prune", 1), ("export", 4)])  # export: in the refit, streams spilled
def test_sigterm_during_prune_or_export_leaves_nothing_behind(command, term_at, tmp_path, model_dir, artifact):
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()
    args = {"prune": ["prune", "--model", str(model_dir), "--method", "magnitude", "--out", str(out)],
            "export": ["export", str(artifact), "--sparsity", "0.5", "--refit", "all", "--stream-memory", "0",
                       "--out", str(out)]}[command]
    env = dict(os.environ, HF_HUB_OFFLINE="1", EPTS_CACHE="off", TMPDIR=str(scratch), TERM_AT=str(term_at))
    r = subprocess.run([sys.executable, "-c", _TERM_AT_KEEP, *args, "--quiet"], env=env, capture_output=True, text=True)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert f"epts {command}: terminated (SIGTERM)" in r.stderr and "Traceback" not in r.stderr
    assert not list(scratch.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scratch"]  # no output, no temporary folder beside it


def test_scratch_folders_of_dead_processes_are_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    leftovers = [tmp_path / f"epts-streams-{host}-{dead.pid}-abc123", tmp_path / f"epts-block-{host}-{dead.pid}-x_9"]
    mine = tmp_path / f"{scratch_prefix('streams')}live01"
    elsewhere = tmp_path / f"epts-streams-another-host-{dead.pid}-abc123"
    for folder in [*leftovers, mine, elsewhere]:
        folder.mkdir()
        (folder / "stream-1.bin").write_bytes(b"0" * 16)
    assert sorted(sweep_scratch(tmp_path)) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, elsewhere.name])


# ---- config types and clean errors --------------------------------------------------------------------

def test_config_values_are_coerced_where_nothing_is_lost():
    config = EPTSConfig.from_dict({"lr": "1e-3", "groups_per_step": "3", "calib": {"nsamples": 4.0},
                                   "group1_check": "false", "ranks": 4.0})
    assert (config.lr, config.groups_per_step, config.calib.nsamples, config.group1_check, config.ranks[0]) == \
        (1e-3, 3, 4, False, 4)
    assert type(config.calib.nsamples) is int and type(config.ranks[0]) is int


def test_prune_config_takes_a_pattern_as_text_and_calib_as_a_mapping():
    config = epts.PruneConfig(pattern="2:4", calib={"nsamples": "8"})
    assert (config.pattern.n, config.pattern.m, config.calib.nsamples) == (2, 4, 8)
    assert epts.PruneConfig(pattern=0.6).pattern.sparsity == 0.6
    with pytest.raises(ValueError, match="PruneConfig needs a Pattern"):
        epts.PruneConfig(pattern=[2, 4])


@pytest.mark.parametrize("content, message", [
    ("epochs: 1.5", "config field epochs must be a whole number, got 1.5"),
    ("lr: fast", "config field lr must be a number, got the string 'fast'"),
    ("calib:\n  nsamples: 4.5", "config field nsamples must be a whole number, got 4.5"),
    ("calib: 32", "calib must be a mapping"),
    ("group1_check: maybe", "config field group1_check must be true or false"),
    ("ranks: [8, 8, 8, 8, 8, 8, 2.5]", "config field ranks[6] must be a whole number"),
])
def test_config_values_of_the_wrong_type_are_one_line_before_loading(content, message, tmp_path, calib_file):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(content)
    r = epts_cli("compress", "--model", "/not/loaded", "--calib", str(calib_file), "--config", str(cfg),
                 "--out", str(tmp_path / "art"))
    one_line_error(r, message)


def test_generate_refuses_an_empty_prompt_and_a_run_past_the_context(artifact):
    r = epts_cli("generate", str(artifact), "--sparsity", "0.5", "--prompt", "")
    one_line_error(r, "--prompt is empty")
    r = epts_cli("generate", str(artifact), "--sparsity", "0.5", "--prompt", "The model", "--max-new-tokens", "600")
    one_line_error(r, "--max-new-tokens 600 run past the model's context of 512 tokens")


def test_api_arguments(artifact, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        epts.export(artifact, 0.5, a_file, overwrite=True, refit="none", progress=False)
    assert a_file.read_text() == "mine"
    with pytest.raises(ValueError, match="sparsity must be a number, e.g. 0.5, not 'half'"):
        epts.export(artifact, "half", tmp_path / "x", refit="none", progress=False)
    meta = epts.export(artifact, "0.5", tmp_path / "half", refit="none", progress=False)
    assert meta["sparsity"] == 0.5
    assert ElasticModel.from_pretrained(artifact, dtype=torch.float32).base.dtype == "float32"
    assert ElasticModel.from_pretrained(artifact, torch_dtype=torch.float32).base.dtype == "float32"
    with pytest.raises(ModelLoadError, match="dtype 'float64' is not one of") as err:
        ElasticModel.from_pretrained(artifact, dtype="float64")
    assert "--base" not in str(err.value)


def test_an_in_memory_model_that_differs_from_its_folder_is_refused(model_dir, calib_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.01)  # a merged LoRA, say
    with pytest.raises(ValueError, match=f"differs from its folder {model_dir}"):
        epts.compress(model, calib_file, CONFIG, out=tmp_path / "art", tokenizer=tokenizer, progress=False)
    assert not (tmp_path / "art").exists()
    model.config._name_or_path = ""
    with pytest.raises(ValueError, match="has no folder or hub id to reload it from"):
        epts.compress(model, calib_file, CONFIG, tokenizer=tokenizer, progress=False)


def test_torchrun_without_batch_size_takes_the_smallest_batch_that_splits(monkeypatch, capsys):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    config = EPTSConfig()
    cli._split_batch(config, {})
    assert config.batch_size == 2 and "2 processes: --batch-size 2" in capsys.readouterr().out
    config = EPTSConfig(batch_size=3)
    cli._split_batch(config, {"batch_size": 3})  # the user's own choice is kept (and refused later)
    assert config.batch_size == 3


def test_flags_that_contradict_are_refused(artifact, model_dir, calib_file):
    r = epts_cli("eval", "--model", str(model_dir), "--data", str(calib_file), "--refit", "all")
    one_line_error(r, "--refit needs an artifact folder")
    r = epts_cli("eval", str(artifact), "--sparsity", "0.5", "--data", str(calib_file), "--calib", str(calib_file))
    one_line_error(r, "--calib is the refit's text, but --refit none")
    r = epts_cli("export", str(artifact), "--sparsity", "0.5", "--refit", "none", "--calib", str(calib_file),
                 "--out", "/tmp/never")
    one_line_error(r, "--refit none runs no refit")


def test_a_moved_task_folder_names_the_missing_documents(tmp_path, calib_file):
    pytest.importorskip("lm_eval")
    from epts.zeroshot import ZeroShotError, parse_tasks, write_continuation_task

    text = tmp_path / "text.txt"
    text.write_text("\n".join(" ".join(f"Sentence {i} of paragraph {p} talks about the weights of a model."
                                        for i in range(4)) for p in range(40)))
    write_continuation_task(text, tmp_path / "tasks", num_docs=5)
    with pytest.raises(FileExistsError, match="epts_next_sentence.jsonl exists: choose another folder, or pass "
                                              "--overwrite"):
        write_continuation_task(text, tmp_path / "tasks", num_docs=6)
    assert len((tmp_path / "tasks" / "epts_next_sentence.jsonl").read_text().splitlines()) == 5
    write_continuation_task(text, tmp_path / "tasks", num_docs=6, overwrite=True)
    assert len((tmp_path / "tasks" / "epts_next_sentence.jsonl").read_text().splitlines()) == 6
    (tmp_path / "tasks").rename(tmp_path / "moved")
    with pytest.raises(ZeroShotError, match="which does not exist \\(was the task folder moved\\?\\)"):
        parse_tasks(str(tmp_path / "moved"))


@pytest.mark.parametrize("signum, status, said", [(signal.SIGTERM, 128 + signal.SIGTERM, "terminated (SIGTERM)"),
                                                  (signal.SIGINT, 130, "interrupted")])
def test_a_signal_a_library_turns_into_another_error_still_stops_like_ctrl_c(monkeypatch, capsys, tmp_path, signum,
                                                                             status, said):
    import epts.cli as cli

    def swallowing(args):
        try:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises here, at once
        except BaseException:  # as torch does when a signal lands while it builds a tensor from a storage
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None

    monkeypatch.setitem(cli.COMMANDS, "eval", swallowing)
    assert cli.main(["eval", str(tmp_path / "model"), "--quiet"]) == status
    err = capsys.readouterr().err
    assert f"epts eval: {said}" in err and "could not determine" not in err
    # A real error with no signal behind it is still the one-line user error.
    monkeypatch.setitem(cli.COMMANDS, "eval", lambda args: (_ for _ in ()).throw(ValueError("bad --data")))
    assert cli.main(["eval", str(tmp_path / "model"), "--quiet"]) == 2
    assert "epts eval: error: bad --data" in capsys.readouterr().err
