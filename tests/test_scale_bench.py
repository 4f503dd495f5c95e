"""benchmarks.scale: the real-shape table, the extrapolation arithmetic, and one tiny measurement."""

import argparse
import math

import pytest

from benchmarks import scale as sc


@pytest.mark.parametrize("name, block, total", [
    # Two RMSNorms per block included; totals are the published 6.74 B, 8.03 B and 70.55 B.
    ("llama-7b", 202_383_360, 6_738_415_616),
    ("llama-3-8b", 218_112_000, 8_030_261_248),
    ("llama-3-70b", 855_654_400, 70_553_706_496),
])
def test_shape_table_counts_real_llama_sizes_without_allocating(name, block, total):
    shapes = sc.shape_table(sc.llama_config(name))
    assert shapes["block_params"] == block
    assert shapes["total_params"] == total
    assert shapes["head_params"] == shapes["embed_params"] == sc.SHAPES[name]["vocab_size"] * shapes["hidden"]
    linears = dict((n, (o, i)) for n, o, i in shapes["linears"])
    assert linears["mlp.down_proj"] == (shapes["hidden"], sc.SHAPES[name]["intermediate_size"])
    assert sum(o * i for o, i in linears.values()) == block - 2 * shapes["hidden"]


def test_stream_and_hessian_sizes():
    # LLaMA-7B at the paper's 128 x 2048 in float32: 4 GiB per stream.
    assert sc.stream_bytes(sc.Setting.parse("paper=128x2048x10"), 4096, 4) == 4 * 2**30
    assert sc.hessian_bytes([("a", 10, 3), ("b", 3, 5)]) == 4 * (9 + 25)


def test_setting_parse_rejects_malformed():
    assert sc.Setting.parse("quick=32x256x2") == sc.Setting("quick", 32, 256, 2)
    with pytest.raises(ValueError, match="WINDOWSxTOKENSxEPOCHS"):
        sc.Setting.parse("quick=32x256")


def test_epts_fit_recovers_the_cost_model_and_scales_as_stated():
    P, d = 1_000_000, 256
    a, b, c, e, ranks = 0.5, 1e-3, 0.2, 2e-4, 3.0

    def run(n, T):
        u = sc.effective_tokens(T, d, P)
        step = a + b * u
        fwd = c * math.ceil(n / sc.FORWARD_BATCH) + e * n * u
        return {"seqlen": T, "nsamples": n, "step_s": [9.0] + [step] * (n - 1), "train_s": n * step,
                "ranks_s": ranks, "block_s": ranks + n * step + fwd}

    fit = sc.epts_fit([run(4, 128), run(4, 32)], P, d)
    assert fit.step_fixed_s == pytest.approx(a) and fit.step_per_token_s == pytest.approx(b)
    assert fit.forward_per_batch_s == pytest.approx(c) and fit.forward_per_token_s == pytest.approx(e)
    s = sc.Setting("x", 32, 2048, 2)
    u = 2048 * (1 + 2 * 2048 * d / P)  # attention's share at 2048 tokens
    expected = ranks + 2 * 32 * (a + b * u) + 4 * c + 32 * u * e
    assert fit.block_seconds(s) == pytest.approx(expected)
    # Five times the epochs: five times the training part, the rest unchanged.
    longer = fit.block_seconds(sc.Setting("y", 32, 2048, 10))
    assert longer - fit.block_seconds(s) == pytest.approx(8 * 32 * (a + b * u))
    assert sc.whole_model_seconds(fit.block_seconds(s), 32, 7.0) == pytest.approx(32 * expected + 7.0)
    doubled = fit.scaled(2 * P, d)
    assert doubled.step_fixed_s == pytest.approx(2 * a) and doubled.ranks_s == pytest.approx(2 * ranks)


def test_step_cost_per_token_from_the_forward_passes_and_a_long_run():
    P, d = 1_000_000, 256
    a, b, c, e = 0.5, 1e-3, 0.2, 4e-4

    def run(n, T, epochs=1):
        u = sc.effective_tokens(T, d, P)
        # A stalled step (others' work) among them: the median ignores it.
        steps = [9.0] + [a + b * u] * (epochs * n - 2) + [50.0]
        fwd = c * math.ceil(n / sc.FORWARD_BATCH) + e * n * u
        return {"seqlen": T, "nsamples": n, "step_s": steps, "train_s": sum(steps), "ranks_s": 1.0,
                "block_s": 1.0 + sum(steps) + fwd}

    short = [run(4, 32), run(4, 128)]
    rho = sc.train_forward_ratio(short, run(32, 256, 2), P, d)
    assert rho == pytest.approx(b / e)
    fit = sc.epts_fit(short, P, d, rho)
    assert fit.step_per_token_s == pytest.approx(b) and fit.step_fixed_s == pytest.approx(a)
    # Another shape: its own forward cost per token, times the same ratio.
    wide = [dict(r, block_s=r["block_s"] + 3 * e * r["nsamples"] * sc.effective_tokens(r["seqlen"], d, P))
            for r in short]
    assert sc.epts_fit(wide, P, d, rho).step_per_token_s == pytest.approx(4 * b)


def test_fit_two_clamps_noise_to_non_negative_costs():
    assert sc.fit_two(1, 2.0, 3, 6.0) == pytest.approx((0.0, 2.0))
    assert sc.fit_two(1, 5.0, 3, 4.0) == (4.0, 0.0)  # a longer window measured faster: noise, no negative slope


def test_fit_solve_recovers_the_cubic_law():
    alpha, beta = 2e-11, 5e-10
    layers = [(o, i, alpha * i**3 + beta * o * i**2) for o, i in [(4096, 4096), (1024, 4096), (11008, 4096),
                                                                  (4096, 11008), (576, 1536)]]
    fa, fb = sc.fit_solve(layers)
    assert fa == pytest.approx(alpha, rel=1e-6) and fb == pytest.approx(beta, rel=1e-6)
    wide = [("mlp.down_proj", 8192, 28672)]
    assert sc.solve_seconds(fa, fb, wide) == pytest.approx(alpha * 28672**3 + beta * 8192 * 28672**2, rel=1e-6)


def test_sparsegpt_token_part_scales_with_windows_and_the_solve_does_not():
    measured = sc.Setting("m", 4, 128, 1)
    base = sc.sparsegpt_block_seconds(10.0, 2.0, measured, sc.Setting("a", 4, 128, 1), 64, 10**9)
    assert base == pytest.approx(12.0)
    assert sc.sparsegpt_block_seconds(10.0, 2.0, measured, sc.Setting("b", 32, 128, 1), 64, 10**9) == \
        pytest.approx(10.0 + 16.0, rel=1e-6)


def test_peak_memory_adds_the_stated_parts():
    s = sc.Setting("q", 32, 256, 2)
    stream = sc.stream_bytes(s, 576, 4)
    got = sc.epts_peak_bytes(100, 200, 300, 400, 2.0, 32, s, stream)
    assert got == 100 + 200 + 300 + 400 + 2.0 * (256 - 32) + sc.STREAMS_EPTS * stream
    assert sc.sparsegpt_peak_bytes(1, 2, 3, 4, 2.0, 10, 5) == 1 + 2 + 3 + 4 + 2.0 * 4 * 100 + sc.STREAMS_SPARSEGPT * 5


def test_one_tiny_measurement_through_the_real_paths(monkeypatch):
    monkeypatch.setitem(sc.SHAPES, "tiny", dict(hidden_size=64, intermediate_size=160, num_attention_heads=4,
                                                num_key_value_heads=2, num_hidden_layers=6, vocab_size=500))
    monkeypatch.setattr(sc, "SEQLENS", (8, 16))
    args = argparse.Namespace(job="tiny", dtype="float32", device="cpu", windows=3, validate="",
                              ram_budget_gb=100.0, sparsegpt_max_width=10**6)
    job = sc.run_job(args)
    assert job["measured_layers"] == 1 and job["measured_vocab"] == sc.MEASURE_VOCAB
    assert job["shapes"]["layers"] == 6 and job["shapes"]["vocab"] == 500
    assert [r["seqlen"] for r in job["epts"]] == [8, 16]
    assert all(len(r["step_s"]) == 3 for r in job["epts"])  # one epoch, batch 1: one step per window
    assert sorted((o, i) for o, i, _ in job["sparsegpt"]["solves"]) == sorted(
        (o, i) for _, o, i in job["shapes"]["linears"])
    rows, _ = sc.extrapolate({"tiny": job}, [sc.Setting("q", 32, 256, 2)], 4)
    q = rows[0]["settings"]["q"]
    assert q["stream_bytes"] == 32 * 256 * 64 * 4
    assert q["epts_model_s"] == pytest.approx(6 * q["epts_block_s"] + rows[0]["fingerprint_s"])
