"""The sparse runtime: bitmask kernels against F.linear on every path and dtype, packed loading,
packed serving of an artifact, and the CLI's --runtime sparse."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import random_windows, tiny_model, tiny_model_folder
from epts import EPTSConfig, RuntimeModel, load_model, save_model
from epts.arch import decoder_blocks, prunable_linears
from epts.config import CalibConfig
from epts.evaluate import generate_timed, mean_nll
from epts.reconstruct import compress
from epts.sparse import SparseLinear, kernels, packed_bytes, packed_layers
from epts.sparse import linear as sparse_linear

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"sparse runtime unavailable: "
                                                                f"{kernels.unavailable_reason()}")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def pruned(rows: int, cols: int, sparsity: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A random weight with `sparsity` of each row zeroed, row 0 empty and row 1 fully kept."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < sparsity] = 0
    w[0] = 0
    if rows > 1:
        w[1] = torch.randn(cols, generator=g)
    return w.to(dtype)


@pytest.mark.parametrize("path", kernels.paths())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, cols", [(3, 5), (37, 77), (64, 576), (130, 1000), (17, 1037)])
def test_kernel_equals_dense_linear_on_odd_shapes(path, dtype, rows, cols):
    w = pruned(rows, cols, 0.6, dtype)
    layer = SparseLinear.from_dense(w, path=path)
    assert torch.equal(layer.dense_weight(), w)
    for tokens in (1, 2, 5, 8, 9, 20):  # 9 and 20 go through the decompressed tiles
        x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens)).to(dtype)
        expected = x.float() @ w.float().T
        got = layer(x)
        assert got.dtype == dtype and got.shape == (tokens, rows)
        scale = expected.abs().max().clamp_min(1)
        assert (got.float() - expected).abs().max() / scale < TOLERANCE[dtype], (path, tokens)
        assert torch.all(got[:, 0] == 0)  # the empty row


@pytest.mark.parametrize("path", kernels.paths())
def test_the_kernel_path_itself_is_checked_past_the_decode_limit(path, monkeypatch):
    # Force the packed kernel (not the tiles) for 20 tokens: more than one pass of 8 tokens.
    monkeypatch.setattr(sparse_linear, "DECODE_TOKENS", 64)
    w = pruned(33, 200, 0.7, torch.float32)
    x = torch.randn(20, 200)
    # float32 sums in another order than F.linear's: a few ulps of the largest outputs apart.
    torch.testing.assert_close(SparseLinear.from_dense(w, path=path)(x), F.linear(x, w), rtol=1e-4, atol=1e-4)


def test_bias_leading_dimensions_and_repack():
    w, b = pruned(24, 40, 0.5, torch.float32), torch.randn(24)
    layer = SparseLinear.from_dense(w, b)
    x = torch.randn(2, 3, 40)
    torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    w2 = pruned(24, 40, 0.8, torch.float32, seed=1)
    layer.repack_(w2)
    assert layer.nnz == int((w2 != 0).sum())
    torch.testing.assert_close(layer(x), F.linear(x, w2, b), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="repack needs a torch.float32 weight of shape"):
        layer.repack_(torch.zeros(3, 3))
    with pytest.raises(TypeError, match="input is torch.bfloat16 but the packed weight is torch.float32"):
        layer(x.bfloat16())


def test_packed_bytes_follow_the_bytes_limit():
    w = pruned(256, 512, 0.7, torch.bfloat16)
    layer = SparseLinear.from_dense(w)
    kept = int((w != 0).sum())
    assert layer.packed_bytes() == kept * 2 + 256 * 512 // 8 + 256 * 8


def test_damaged_parts_are_refused():
    w = pruned(8, 16, 0.5, torch.float32)
    layer = SparseLinear.from_dense(w)
    with pytest.raises(RuntimeError, match="padding"):
        kernels.bitmask_linear(torch.randn(1, 16), layer.values[:3], layer.bitmask, layer.row_offsets, 16)
    with pytest.raises(RuntimeError, match="path must be"):
        kernels.bitmask_linear(torch.randn(1, 16), layer.values, layer.bitmask, layer.row_offsets, 16, "sse9")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model pruned to 60 %, saved dense and compressed."""
    from epts import Pattern, PruneConfig, prune

    root = tmp_path_factory.mktemp("packed")
    loaded = load_model(tiny_model_folder(root / "model"), runtime="dense")
    prune(loaded, random_windows(4, 32), PruneConfig("wanda", Pattern(sparsity=0.6), CalibConfig(4, 32)),
          progress=False)
    return save_model(loaded, root / "dense"), save_model(loaded, root / "compressed", compressed=True)


def test_packed_greedy_generation_and_perplexity_equal_the_dense_export(exported):
    dense_dir, packed_dir = exported
    dense = load_model(dense_dir)
    packed = load_model(packed_dir)
    assert not packed_layers(dense.model) and len(packed_layers(packed.model)) == 3 * 7
    prompt = random_windows(1, 12, vocab=300, seed=2)
    a = generate_timed(dense.model, prompt, 24, ignore_eos=True)
    b = generate_timed(packed.model, prompt, 24, ignore_eos=True)
    assert len(a.ids) == 24 and torch.equal(a.ids, b.ids)
    windows = random_windows(4, 64, vocab=300, seed=3)
    nll_dense, nll_packed = mean_nll(dense.model, windows), mean_nll(packed.model, windows)
    assert abs(nll_packed - nll_dense) < 1e-4 * nll_dense  # perplexity within 1e-4 relative, and more
    # Packed, the pruned layers hold (1 - 0.6) x 4 + 1/8 bytes a weight instead of 4, plus the offsets.
    dense_bytes = sum(t.numel() * t.element_size() for t in dense.model.state_dict().values())
    assert packed_bytes(packed.model) < 0.6 * dense_bytes


def test_runtime_dense_and_sparse_on_one_folder(exported):
    dense_dir, packed_dir = exported
    assert not packed_layers(load_model(packed_dir, runtime="dense").model)
    assert len(packed_layers(load_model(dense_dir, runtime="sparse").model)) == 21


def test_unavailable_kernels_fall_back_to_dense_with_one_line(exported, monkeypatch, caplog):
    _, packed_dir = exported
    reason = "the bitmask kernels could not be built in X: no compiler"
    monkeypatch.setattr(kernels, "_load", lambda: reason)
    with caplog.at_level("WARNING"):
        loaded = load_model(packed_dir)
    assert not packed_layers(loaded.model)
    assert "the sparse runtime is unavailable: " + reason in caplog.text
    with pytest.raises(kernels.SparseRuntimeUnavailable, match="no compiler; use --runtime dense"):
        load_model(packed_dir, runtime="sparse")


@pytest.fixture(scope="module")
def elastic():
    return compress(tiny_model("llama"), random_windows(4, 32),
                    EPTSConfig(epochs=1, calib=CalibConfig(nsamples=4, seqlen=32, batch_size=2)), progress=False)


def test_packed_runtime_switches_and_stays_exact(elastic):
    served = RuntimeModel(elastic, 0.7, packed=True)
    dense = RuntimeModel(elastic, 0.7)
    ids = random_windows(2, 6, seed=4)  # 6 tokens a row: the decode kernel, not the tiles
    base_embed = elastic.base.model.get_input_embeddings().weight
    assert served.model.get_input_embeddings().weight is base_embed  # shared, not copied
    for target in (0.7, 0.3, {0: 0.6, 2: 0.45}, 0.0, 0.55):
        served.set_sparsity(target)
        dense.set_sparsity(target)
        for b, block in enumerate(decoder_blocks(served.model)):
            for name, layer in prunable_linears(dense.model, decoder_blocks(dense.model)[b]).items():
                assert torch.equal(block.get_submodule(name).dense_weight(), layer.weight)
        with torch.no_grad():
            torch.testing.assert_close(served.model(ids).logits, dense.model(ids).logits, rtol=1e-5, atol=1e-5)
    assert served.sparsity == dense.sparsity == {0: 0.55, 1: 0.55, 2: 0.55}


def test_cli_generate_and_eval_on_the_sparse_runtime(exported, tmp_path, text_file):
    from test_cli import epts_process as epts

    _, packed_dir = exported
    r = epts("generate", "--model", str(packed_dir), "--prompt", "The model", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert "--- sparse runtime:" in r.stdout and "tokens/s decoding" in r.stdout
    report = tmp_path / "eval.json"
    for runtime in ("sparse", "dense"):
        r = epts("eval", "--model", str(packed_dir), "--runtime", runtime, "--data", str(text_file), "--seqlen", "64",
                 "--max-windows", "2", "--report", str(report))
        assert r.returncode == 0, r.stderr
        ppl = json.loads(report.read_text())["rows"][0]["ppl"]
        if runtime == "sparse":
            packed_ppl = ppl
    assert ppl == pytest.approx(packed_ppl, rel=1e-4)


def test_cli_refuses_refit_on_the_sparse_runtime(tmp_path, elastic):
    from test_cli import epts_process as epts

    art = elastic.save(tmp_path / "art")
    r = epts("eval", str(art), "--sparsity", "0.5", "--runtime", "sparse", "--refit", "auto", "--data", "x")
    assert r.returncode == 2 and "--refit re-solves dense weights: use it with --runtime dense" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("family", ["opt", "gemma3"])
def test_packed_loading_of_other_families_gives_the_dense_logits(family, tmp_path):
    from epts import Pattern, PruneConfig, prune

    loaded = load_model(tiny_model_folder(tmp_path / "model", family), runtime="dense")
    prune(loaded, None, PruneConfig("magnitude", Pattern(sparsity=0.5)), progress=False)
    packed = load_model(save_model(loaded, tmp_path / "compressed", compressed=True))
    assert len(packed_layers(packed.model)) == 3 * (6 if family == "opt" else 7)
    ids = random_windows(2, 12, vocab=300, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(packed.model(ids).logits, loaded.model(ids).logits, rtol=1e-5, atol=1e-5)


def test_packed_runtime_of_a_streamed_base_and_the_generate_dial(tmp_path):
    from test_cli import epts_process as epts

    from epts import ElasticModel

    base = load_model(tiny_model_folder(tmp_path / "model"), runtime="dense")
    elastic = compress(base, random_windows(4, 32, vocab=300),
                       EPTSConfig(epochs=1, calib=CalibConfig(nsamples=4, seqlen=32, batch_size=2)), progress=False)
    art = elastic.save(tmp_path / "art")
    served = RuntimeModel(ElasticModel.load(art, stream=True), 0.6, packed=True)
    ids = random_windows(2, 6, vocab=300, seed=1)
    for s in (0.6, 0.3, 0.7):
        served.set_sparsity(s)
        with torch.no_grad():
            torch.testing.assert_close(served.model(ids).logits, elastic.materialize(s).model(ids).logits,
                                       rtol=1e-5, atol=1e-5)
    r = epts("generate", str(art), "--runtime", "sparse", "--sparsity", "0,0.7", "--prompt", "The model",
             "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("--- sparse runtime at sparsity")]
    assert len(lines) == 2 and all("tokens/s decoding" in line and "MiB of weights" in line for line in lines)
    sizes = [float(line.split(" MiB of weights")[0].rsplit(" ", 1)[1]) for line in lines]
    assert sizes[1] < sizes[0]  # sparser is smaller


def test_a_runtime_starts_dense_whatever_the_trained_range(tmp_path):
    # A single-sparsity artifact (one group, 0.6) still starts as its dense base, packed or not.
    narrow = compress(tiny_model("llama"), random_windows(4, 32),
                      EPTSConfig(epochs=1, boundaries=(0.599999, 0.6), ranks=(4,), mix_weights=(1.0,),
                                 calib=CalibConfig(nsamples=4, seqlen=32, batch_size=2)), progress=False)
    for packed in (False, True):
        served = RuntimeModel(narrow, packed=packed)
        assert served.sparsity == {0: 0.0, 1: 0.0, 2: 0.0}
        served.set_sparsity(0.6)
        with pytest.raises(ValueError, match="outside the trained range"):
            served.set_sparsity(0.3)


def test_a_compressed_folder_loads_packed_by_default_with_the_same_weights(exported):
    dense_dir, packed_dir = exported
    dense = load_model(dense_dir).model.state_dict()
    layers = packed_layers(load_model(packed_dir).model)
    assert len(layers) == 21
    assert all(torch.equal(layer.dense_weight(), dense[f"{name}.weight"]) for name, layer in layers.items())
