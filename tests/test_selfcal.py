"""Self-generated calibration (epts.selfcal) and the demo's choice of text (epts.data.pick_text_source)."""

import contextlib
import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_model, tiny_model_folder
from epts.artifact import windows_sha256
from epts.config import CalibConfig, EPTSConfig
from epts.data import hub_reachable, pick_text_source
from epts.models import load_model
from epts.refit import artifact_calibration
from epts.selfcal import SelfCalConfig, _draw, _ordinary_tokens, _window_generator, generate_windows

ROOT = Path(__file__).resolve().parents[1]
CONFIG = EPTSConfig(epochs=1, boundaries=(0, .5, .7), ranks=2, mix_weights=(.5, .5),
                    calib=CalibConfig(nsamples=3, seqlen=16))


def test_windows_are_seeded_per_window_and_do_not_depend_on_the_batch():
    loaded = tiny_model("llama")
    one = generate_windows(loaded.model, loaded.tokenizer, 5, 20, seed=0, config=SelfCalConfig(batch_size=2),
                           progress=False)
    assert one.shape == (5, 20) and one.dtype == torch.long
    assert torch.equal(one, generate_windows(loaded.model, loaded.tokenizer, 5, 20, seed=0,
                                             config=SelfCalConfig(batch_size=5), progress=False))
    # The first windows of a larger draw are the same windows.
    assert torch.equal(one[:3], generate_windows(loaded.model, loaded.tokenizer, 3, 20, seed=0, progress=False))
    other = generate_windows(loaded.model, loaded.tokenizer, 5, 20, seed=1, progress=False)
    held_out = generate_windows(loaded.model, loaded.tokenizer, 5, 20, seed=0, progress=False, use="evaluation")
    assert (one != other).float().mean() > 0.9 and (one != held_out).float().mean() > 0.9
    assert len({tuple(w) for w in one.tolist()}) == 5


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cached_generation_draws_what_the_whole_context_gives(family):
    """The KV cache is used right: each token is the draw from the logits of its whole prefix."""
    loaded = tiny_model(family)
    windows = generate_windows(loaded.model, loaded.tokenizer, 2, 12, seed=3, progress=False)
    config = SelfCalConfig()
    for i, window in enumerate(windows):
        gen = _window_generator("calibration", 3, i)
        torch.randint(256, (1,), generator=gen)  # the first token's draw
        uniforms = torch.rand(11, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            logits = loaded.model(window[None], use_cache=False).logits[0]
        for t in range(1, 12):
            assert _draw(logits[t - 1 : t], uniforms[t - 1 : t], config).item() == window[t].item(), (i, t)


def test_the_draw_is_an_inverse_cdf_over_the_cut_distribution():
    logits = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).log()  # the last token is impossible
    draw = lambda u, **kw: _draw(logits, torch.tensor([u], dtype=torch.float64), SelfCalConfig(**kw)).item()  # noqa: E731
    assert [draw(u) for u in (0.0, 0.49, 0.51, 0.79, 0.81, 0.999)] == [0, 0, 1, 1, 2, 2]
    # top-k 2 and top-p 0.6 both keep {0, 1}, renormalised: 0.625 / 0.375.
    assert [draw(u, top_k=2) for u in (0.6, 0.65, 0.999)] == [0, 1, 1]
    assert [draw(u, top_p=0.6) for u in (0.6, 0.65, 0.999)] == [0, 1, 1]
    assert {draw(u, top_p=0.5) for u in (0.0, 0.5, 0.999)} == {0}  # the most likely token alone
    assert draw(0.55, temperature=1e-3) == 0  # temperature -> 0: the most likely token
    ties = torch.zeros(1, 6)  # equal logits: tokens in order of id, so draws do not depend on the sort
    assert [_draw(ties, torch.tensor([u], dtype=torch.float64), SelfCalConfig(top_k=3)).item()
            for u in (0.1, 0.5, 0.9)] == [0, 1, 2]
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SelfCalConfig(temperature=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SelfCalConfig(top_p=1.5)


def test_windows_start_with_an_ordinary_token(tmp_path):
    loaded = load_model(tiny_model_folder(tmp_path / "model"))
    starts = _ordinary_tokens(loaded.model, loaded.tokenizer).tolist()
    assert loaded.tokenizer.eos_token_id not in starts and len(starts) == len(loaded.tokenizer) - 1
    windows = generate_windows(loaded.model, loaded.tokenizer, 16, 2, progress=False)
    assert set(windows[:, 0].tolist()) <= set(starts)


@pytest.fixture(scope="module")
def selfcal_artifact(tmp_path_factory):
    """`epts compress` with no --calib: a tiny model folder (real tokenizer) and its artifact."""
    root = tmp_path_factory.mktemp("selfcal")
    folder = tiny_model_folder(root / "model")
    art = root / "art"
    r = _epts("compress", "--model", str(folder), "--nsamples", "3", "--seqlen", "16", "--epochs", "1",
              "--selfcal-top-k", "20", "--out", str(art))
    assert r.returncode == 0, r.stderr
    assert "calibration: self-generated, 3 windows of 16 tokens" in r.stdout
    return folder, art


def _epts(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", EPTS_CACHE="off")
    return subprocess.run([sys.executable, "-m", "epts.cli", *args], capture_output=True, text=True, env=env)


def test_compress_without_calib_records_self_generated_windows(selfcal_artifact):
    folder, art = selfcal_artifact
    record = json.loads((art / "manifest.json").read_text())["calibration"]
    assert record["source"] == "self-generated" and record["seed"] == 0
    assert record["sampling"] == {"temperature": 1.0, "top_k": 20, "top_p": 1.0}
    assert record["torch"] == torch.__version__ and record["device"] == "cpu" and record["dtype"] == "float32"
    loaded = load_model(folder)
    again = generate_windows(loaded.model, loaded.tokenizer, 3, 16, 0, SelfCalConfig(top_k=20), progress=False)
    assert record["windows_sha256"] == windows_sha256(again)
    assert record["windows_sha256"] != windows_sha256(
        generate_windows(loaded.model, loaded.tokenizer, 3, 16, 0, SelfCalConfig(top_k=50), progress=False))


def test_the_refit_regenerates_the_self_generated_windows(selfcal_artifact, tmp_path, caplog):
    from epts.artifact import ElasticModel

    folder, art = selfcal_artifact
    elastic = ElasticModel.load(art)
    with caplog.at_level(logging.WARNING, logger="epts.refit"):
        windows = artifact_calibration(elastic)
    assert windows_sha256(windows) == elastic.calibration["windows_sha256"] and not caplog.records
    elastic.calibration = {**elastic.calibration, "windows_sha256": "0" * 64, "torch": "1.0"}
    with caplog.at_level(logging.WARNING, logger="epts.refit"):
        assert torch.equal(artifact_calibration(elastic), windows)
    assert "differ from those the artifact was trained on (made on cpu, float32, torch 1.0" in caplog.text
    r = _epts("export", str(art), "--sparsity", "0.6", "--refit", "all", "--out", str(tmp_path / "export"))
    assert r.returncode == 0, r.stderr
    assert "refit (all): 3 of 3 blocks re-solved" in r.stdout and "differ" not in r.stderr


def test_selfcal_flags_are_checked_before_any_work(tmp_path, text_file, capsys):
    from epts.cli import main

    missing = str(tmp_path / "no-model")  # never loaded: the flags are refused first
    assert main(["compress", "--model", missing, "--calib", str(text_file), "--selfcal-top-p", "0.9",
                 "--out", str(tmp_path / "a")]) == 2
    assert "--selfcal-* flags" in capsys.readouterr().err
    assert main(["compress", "--model", missing, "--selfcal-temperature", "0", "--out", str(tmp_path / "b")]) == 2
    assert "temperature must be > 0, got 0.0" in capsys.readouterr().err


def test_the_api_compresses_on_self_generated_windows_by_default():
    import epts

    loaded = tiny_model("opt")
    elastic = epts.compress(loaded, config=CONFIG, progress=False)
    record = elastic.calibration
    assert record["source"] == "self-generated" and record["sampling"]["top_k"] == SelfCalConfig.top_k
    windows = generate_windows(loaded.model, loaded.tokenizer, 3, 16, progress=False)
    assert record["windows_sha256"] == windows_sha256(windows)


def test_the_demo_text_is_written_held_out(tmp_path):
    from epts.selfcal import write_text

    loaded = load_model(tiny_model_folder(tmp_path / "model"))
    path = tmp_path / "eval.txt"
    write_text(loaded.model, loaded.tokenizer, path, 3, 24, seed=0)
    text = path.read_text(encoding="utf-8")
    assert text.count("\n\n") == 2 and len(text) > 3 * 24
    calibration = generate_windows(loaded.model, loaded.tokenizer, 3, 24, seed=0, progress=False)
    assert all(loaded.tokenizer.decode(w).strip() not in text for w in calibration.tolist())


# ---- which text the demo uses ----

@pytest.fixture
def no_proxy(monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                 "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@contextlib.contextmanager
def web_server(status=200):
    """An HTTP server on a free local port that answers every GET with `status`; yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the name http.server calls)
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_hub_check_wants_an_answer_and_gives_up_quickly(no_proxy):
    with web_server() as url:
        no_proxy.setenv("HF_ENDPOINT", url)
        assert hub_reachable(timeout=2)
        no_proxy.setenv("HF_HUB_OFFLINE", "1")
        assert not hub_reachable(timeout=2)  # offline mode: not even tried
    no_proxy.delenv("HF_HUB_OFFLINE")
    assert not hub_reachable(timeout=2)  # nothing listens there now
    with web_server(status=403) as url:  # a firewall's refusal page is no hub
        no_proxy.setenv("HF_ENDPOINT", url)
        assert not hub_reachable(timeout=2)
    # A server that takes the connection and never answers: the check ends at its timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        no_proxy.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.perf_counter()
        assert not hub_reachable(timeout=0.5)
        assert time.perf_counter() - start < 1.5


def test_the_demo_uses_local_wikitext_then_the_hub_then_none(tmp_path, no_proxy):
    folder = tmp_path / "wikitext2"
    folder.mkdir()
    (folder / "wiki.valid.tokens").write_text("valid")
    no_proxy.setenv("HF_HUB_OFFLINE", "1")
    assert pick_text_source(folder) == "none"  # one of the two files only
    (folder / "wiki.test.raw").write_text("test")
    assert pick_text_source(folder) == "local"
    no_proxy.delenv("HF_HUB_OFFLINE")
    with web_server() as url:
        no_proxy.setenv("HF_ENDPOINT", url)
        assert pick_text_source(tmp_path / "missing") == "hub"
    # As scripts/demo.sh asks: one word on stdout.
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for where, word in ((folder, "local"), (tmp_path / "missing", "none")):
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_text.py"), "source", str(where)],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0 and r.stdout == f"{word}\n" and not r.stderr, r.stderr
