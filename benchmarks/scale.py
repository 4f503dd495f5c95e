"""Measured scale: per-block time and memory of EPTS and SparseGPT at real LLaMA shapes,
and the whole-model cost extrapolated from them.

    python -m benchmarks.scale [--models smollm2-135m,llama-7b,llama-3-8b,llama-3-70b]
        [--dtype float32|bfloat16] [--device cpu|cuda] [--out runs/scale]

SmolLM2-135M is the real model; the others are randomly initialised from transformers'
LlamaConfig with the real widths but one decoder block and a small vocabulary (the embeddings and
output head are counted from the full config on the meta device, never allocated). Every model is
measured in a fresh process (its peak RSS is its own) through the real code paths:
`epts.reconstruct.compress(..., num_blocks=1)` at two window lengths (to separate the per-step
cost that depends on the weights only from the per-token cost) and
`epts.baselines.prune(method="sparsegpt", num_blocks=1)`; the phases are timed by wrapping the
functions the pipeline calls (nothing is re-implemented). Blocks too wide or too large for this
machine are extrapolated (see `extrapolate`), and say so.

Scaling assumed (all stated in the output):
- EPTS training step = a + b * u(T): a, the weight-sized work (mask, adapter merge and its
  gradient), fixed per step; u(T) = T (1 + 2 T d / P) tokens, the linear layers' FLOPs plus the
  attention's T-proportional share (d: attention width, P: block parameters). Steps =
  epochs x windows (batch 1). The forward passes (dense pass, group-1 check, mixer) = c per batch
  of 8 windows + e * windows * u(T). Rank computation: once per block. b = rho * e, rho measured
  on SmolLM2's one block at the quick setting (`train_forward_ratio`): at 32-128 tokens a step's
  token cost drowns in the weight-sized work and the noise.
- SparseGPT block = the solve (fit over the measured layers: alpha d_in^3 + beta d_out d_in^2)
  + the Hessian and forward passes, linear in windows x u(T).
- Whole model = layers x block + the fingerprint (linear in weight bytes).
- Peak memory of the block-streamed path = fixed overhead + embeddings/head + one block + the
  training working set (measured, plus activations linear in T) + the streams (EPTS holds 6
  stream-sized tensors at its peak, SparseGPT 4: see STREAMS_*).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30

# Real shapes (LlamaConfig fields). Measured with MEASURE_LAYERS blocks and MEASURE_VOCAB tokens.
SHAPES: dict[str, dict] = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                     num_hidden_layers=32, vocab_size=32000),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       num_hidden_layers=32, vocab_size=128256),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                        num_hidden_layers=80, vocab_size=128256),
}
REAL = "smollm2-135m"
MEASURE_LAYERS = 1
MEASURE_VOCAB = 1024
# Windows per measurement; blocks over BIG_BLOCK parameters take fewer (their steps cost minutes here).
WINDOWS, BIG_WINDOWS, BIG_BLOCK = 4, 2, 500_000_000
SEQLENS = (32, 128)  # the two window lengths of the EPTS measurement
FORWARD_BATCH = 8  # CalibConfig.batch_size: windows per forward pass
# Stream-sized tensors alive at the peak. EPTS, blocks after the first: the captured first input
# (BlockCalls.hidden), the dense and elastic streams in, the targets and the mixed stream out, and
# one block output being added into the mix. SparseGPT: the captured input, the stream in, the
# output of the statistics pass and that of the output pass.
STREAMS_EPTS, STREAMS_SPARSEGPT = 6, 4


@dataclass(frozen=True)
class Setting:
    name: str
    nsamples: int
    seqlen: int
    epochs: int

    @classmethod
    def parse(cls, text: str) -> "Setting":
        """NAME=NxTxE, e.g. quick=32x256x2."""
        m = re.fullmatch(r"([\w.-]+)=(\d+)x(\d+)x(\d+)", text.strip())
        if not m:
            raise ValueError(f"setting {text!r} is not NAME=WINDOWSxTOKENSxEPOCHS like quick=32x256x2")
        return cls(m[1], int(m[2]), int(m[3]), int(m[4]))


# quick: PROTOCOL.md's calibration (32 x 256, the benchmark suite's 2 epochs); quick-512 the same
# at 512 tokens; paper: METHOD.md's 128 x 2048 for 10 epochs.
DEFAULT_SETTINGS = "quick=32x256x2,quick-512=32x512x2,paper=128x2048x10"


# ---------------------------------------------------------------- shapes and sizes (no allocation)

def shape_table(config) -> dict:
    """Parameter counts of a causal LM config, from a one-block model on the meta device: one
    block (its linears and norms), the embeddings, the output head (0 when tied), the rest (final
    norm), the total, and the prunable linears as (name, d_out, d_in)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from epts.arch import decoder_blocks, prunable_linears

    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(one)
    block = decoder_blocks(model)[0]
    block_params = sum(p.numel() for p in block.parameters())
    embed = model.get_input_embeddings().weight.numel()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head = 0 if tied else model.get_output_embeddings().weight.numel()
    rest = sum(p.numel() for p in model.parameters()) - block_params - embed - head
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    attn_width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    return {"layers": layers, "hidden": config.hidden_size, "attn_width": attn_width, "vocab": config.vocab_size,
            "block_params": block_params, "embed_params": embed, "head_params": head, "other_params": rest,
            "total_params": layers * block_params + embed + head + rest, "tied": tied,
            "linears": [(n, l.out_features, l.in_features) for n, l in prunable_linears(model, block).items()]}


def llama_config(name: str, **overrides):
    from transformers import LlamaConfig

    fields = {**SHAPES[name], "max_position_embeddings": 4096, **overrides}
    return LlamaConfig(**fields)


def stream_bytes(setting: Setting, hidden: int, dtype_bytes: int) -> int:
    """One stream of hidden states: windows x tokens x hidden in the model's dtype."""
    return setting.nsamples * setting.seqlen * hidden * dtype_bytes


def effective_tokens(seqlen: int, attn_width: int, block_params: int) -> float:
    """u(T) = T (1 + 2 T d / P): tokens weighted by the block's FLOPs per token at this length, the
    linear layers' 2P (fwd) / 6P (fwd+bwd) plus attention's 4Td / 12Td, so u is linear in T for
    wide blocks and bends upwards where attention matters."""
    return seqlen * (1.0 + 2.0 * seqlen * attn_width / block_params)


# ---------------------------------------------------------------- extrapolation (pure arithmetic)

def fit_two(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float]:
    """(intercept, slope) of the line through two measurements, both clamped at >= 0 (timings are
    noisy: a negative fixed cost or slope would be noise, not a cost)."""
    slope = max((y2 - y1) / (x2 - x1), 0.0)
    return max(y2 - slope * x2, 0.0), slope


@dataclass
class EptsFit:
    """One block's EPTS cost model, from two measurements (see the module docstring)."""

    ranks_s: float  # rank computation, once per block
    step_fixed_s: float  # a: per optimiser step, independent of the tokens
    step_per_token_s: float  # b: per effective token of a step
    forward_per_batch_s: float  # c: per forward batch (FORWARD_BATCH windows), over all forward passes
    forward_per_token_s: float  # e: per effective token, over all forward passes
    block_params: int
    attn_width: int

    def block_seconds(self, s: Setting) -> float:
        u = effective_tokens(s.seqlen, self.attn_width, self.block_params)
        steps = s.epochs * s.nsamples  # batch size 1 (EPTSConfig.batch_size)
        return (self.ranks_s + steps * (self.step_fixed_s + self.step_per_token_s * u)
                + math.ceil(s.nsamples / FORWARD_BATCH) * self.forward_per_batch_s
                + s.nsamples * u * self.forward_per_token_s)

    def scaled(self, block_params: int, attn_width: int) -> "EptsFit":
        """The same costs per parameter for a block of `block_params` (a shape not measured here)."""
        r = block_params / self.block_params
        return EptsFit(self.ranks_s * r, self.step_fixed_s * r, self.step_per_token_s * r, self.forward_per_batch_s * r,
                       self.forward_per_token_s * r, block_params, attn_width)


def steady_step(step_s: list[float]) -> float:
    """Median step time without the first step (which pays one-time allocations and kernel
    set-up), unless it is the only one: the median, as a step now and then is slowed by others."""
    import statistics

    return statistics.median(step_s[1:]) if len(step_s) > 1 else step_s[0]


def _forward_fit(lo: dict, hi: dict, u: list[float]) -> tuple[float, float]:
    fwd = [r["block_s"] - r["train_s"] - r["ranks_s"] for r in (lo, hi)]
    return fit_two(lo["nsamples"] * u[0], fwd[0], hi["nsamples"] * u[1], fwd[1])


def epts_fit(runs: list[dict], block_params: int, attn_width: int, train_per_forward: float | None = None) -> EptsFit:
    """The cost model from two EPTS runs (same windows, two lengths): each run holds seqlen,
    nsamples, step_s (each optimiser step), ranks_s, train_s and block_s (compress_block's whole time).

    The forward passes' per-token cost e comes from the two runs (many tokens: well measured). The
    step's per-token cost b is `train_per_forward` x e when given (`train_forward_ratio`, measured
    on a long run), else the slope between the two runs' steps; the step's fixed cost a is the short
    run's step less its tokens' share."""
    lo, hi = sorted(runs, key=lambda r: r["seqlen"])
    u = [effective_tokens(r["seqlen"], attn_width, block_params) for r in (lo, hi)]
    c, e = _forward_fit(lo, hi, u)
    if train_per_forward is None:
        a, b = fit_two(u[0], steady_step(lo["step_s"]), u[1], steady_step(hi["step_s"]))
    else:
        b = train_per_forward * e
        a = max(steady_step(lo["step_s"]) - b * u[0], 0.0)
    batches = math.ceil(hi["nsamples"] / FORWARD_BATCH)
    return EptsFit((lo["ranks_s"] + hi["ranks_s"]) / 2, a, b, c / batches, e, block_params, attn_width)


def train_forward_ratio(runs: list[dict], long_run: dict, block_params: int, attn_width: int) -> float:
    """b / e: a training step's cost per token over the forward passes' cost per window-token, from
    the short runs' steps and a long run's (many steps of long windows), where the tokens' share of
    a step is large enough to measure. The ratio is taken as the same for every block shape."""
    lo, hi = sorted(runs, key=lambda r: r["seqlen"])
    u = [effective_tokens(r["seqlen"], attn_width, block_params) for r in (lo, hi, long_run)]
    _, e = _forward_fit(lo, hi, u)
    _, b = fit_two(u[0], steady_step(lo["step_s"]), u[2], steady_step(long_run["step_s"]))
    return b / e if e > 0 else 0.0


def fit_solve(layers: list[tuple[int, int, float]]) -> tuple[float, float]:
    """(alpha, beta) of seconds = alpha d_in^3 + beta d_out d_in^2 over measured SparseGPT layer
    solves (d_out, d_in, seconds): the Cholesky factorisations and the inverse are O(d_in^3), the
    OBS sweep O(d_out d_in^2). Least squares on relative error (every layer counts alike), clamped >= 0."""
    import torch

    x = torch.tensor([[i**3, o * i**2] for o, i, _ in layers], dtype=torch.float64)
    y = torch.tensor([s for *_, s in layers], dtype=torch.float64)
    sol = torch.linalg.lstsq(x / y.unsqueeze(1), torch.ones_like(y).unsqueeze(1)).solution.squeeze(1)
    if (sol < 0).any():  # one term alone fits better than a negative mix
        singles = [(y * x[:, j]).sum() / (x[:, j] ** 2).sum() for j in range(2)]
        errors = [((x[:, j] * singles[j] - y) / y).pow(2).sum() for j in range(2)]
        j = int(errors[1] < errors[0])
        sol = torch.zeros(2, dtype=torch.float64)
        sol[j] = singles[j]
    return float(sol[0]), float(sol[1])


def solve_seconds(alpha: float, beta: float, linears: list[tuple[str, int, int]]) -> float:
    return sum(alpha * i**3 + beta * o * i**2 for _, o, i in linears)


def sparsegpt_block_seconds(solve_s: float, token_s: float, measured: Setting, s: Setting, attn_width: int,
                            block_params: int) -> float:
    """The solve, plus the Hessian and forward passes scaled by windows x u(T)."""
    u = effective_tokens(s.seqlen, attn_width, block_params)
    u0 = effective_tokens(measured.seqlen, attn_width, block_params)
    return solve_s + token_s * (s.nsamples * u) / (measured.nsamples * u0)


def whole_model_seconds(block_s: float, layers: int, fingerprint_s: float = 0.0) -> float:
    return layers * block_s + fingerprint_s


def hessian_bytes(linears: list[tuple[str, int, int]]) -> int:
    """float32 d_in x d_in per prunable linear (SparseGPT keeps every layer's Hessian of a block)."""
    return sum(4 * i * i for _, _, i in linears)


def epts_peak_bytes(fixed: float, embed: float, block: float, workset_lo: float, act_per_token: float,
                    seqlen_lo: int, s: Setting, stream: float) -> float:
    """Block-streamed EPTS: fixed + embeddings/head + one block + its training working set
    (measured at seqlen_lo, plus activations per token of the step's window) + the streams."""
    return fixed + embed + block + workset_lo + act_per_token * max(s.seqlen - seqlen_lo, 0) + STREAMS_EPTS * stream


def sparsegpt_peak_bytes(fixed: float, embed: float, block: float, hessians: float, solve_factor: float,
                         widest: int, stream: float) -> float:
    """Block-streamed SparseGPT: fixed + embeddings/head + one block + every Hessian of the block +
    the solve's working set (solve_factor float32 d x d matrices of the widest layer) + the streams."""
    return fixed + embed + block + hessians + solve_factor * 4 * widest**2 + STREAMS_SPARSEGPT * stream


# ---------------------------------------------------------------- measurement (one process per model)

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """VmHWM: the peak RSS since the process started or since `reset_peak_rss`."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read())[1]) * 1024


def reset_peak_rss() -> None:
    """Hand freed heap memory back to the system (else a phase reusing it would look free), then
    reset VmHWM to the current RSS (Linux: 5 to clear_refs), so each phase's peak is its own."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the phase peaks then include reused free memory
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@contextmanager
def patched(owner, name: str, replacement):
    """`owner.name` replaced for the duration (where the caller looks it up at call time)."""
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield original
    finally:
        setattr(owner, name, original)


class Probe:
    """Times the functions the real pipeline calls, by wrapping them where the caller looks them
    up; `memory` also records the RSS before each call and the peak during it."""

    def __init__(self, device):
        self.device = device
        self.calls: dict[str, list[dict]] = defaultdict(list)

    @contextmanager
    def wrap(self, owner, name: str, memory: bool = False, describe=None):
        import torch

        original = getattr(owner, name)
        cuda = self.device.type == "cuda"

        def wrapper(*args, **kwargs):
            record = describe(*args) if describe else {}
            if memory:
                reset_peak_rss()
                record["rss_before"] = rss_bytes()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    record["device_before"] = torch.cuda.memory_allocated()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if cuda:
                    torch.cuda.synchronize()
                record["seconds"] = time.perf_counter() - start
                if memory:
                    record["rss_peak"] = peak_rss_bytes()
                    if cuda:
                        record["device_peak"] = torch.cuda.max_memory_allocated()
                self.calls[name].append(record)

        with patched(owner, name, wrapper):
            yield

    def total(self, name: str) -> float:
        return sum(r["seconds"] for r in self.calls[name])


def build(name: str, dtype: str, device):
    """(loaded model, full-size shape table, windows source). The real SmolLM2, or a random model of
    a real shape with MEASURE_LAYERS blocks and MEASURE_VOCAB tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from epts.models import LoadedModel, load_model

    if name == REAL:
        loaded = load_model(REAL, dtype=dtype, device=str(device))
        return loaded, shape_table(loaded.model.config)
    torch.manual_seed(0)
    shapes = shape_table(llama_config(name))
    model = AutoModelForCausalLM.from_config(llama_config(name, num_hidden_layers=MEASURE_LAYERS,
                                                          vocab_size=MEASURE_VOCAB), dtype=getattr(torch, dtype))
    return LoadedModel(model.to(device).eval(), None, name), shapes


def windows_for(loaded, name: str, nsamples: int, seqlen: int):
    import torch

    from epts.data import calibration_set

    if name == REAL:
        data = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.valid.tokens"
        if data.is_file():
            return calibration_set(loaded.tokenizer, data, nsamples, seqlen, seed=0)
    vocab = loaded.model.config.vocab_size
    return torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))


def measure_epts(loaded, name: str, nsamples: int, seqlen: int, epochs: int, device) -> dict:
    """One `compress(num_blocks=1)` through the real path, its phases timed, and each optimiser
    step (from the first `hilora.set_state` of one step to that of the next)."""
    import epts.hilora as hl
    import epts.reconstruct as rc
    from epts.config import EPTSConfig

    probe = Probe(device)
    config = EPTSConfig.preset("default", epochs=epochs, calib={"nsamples": nsamples, "seqlen": seqlen})
    windows = windows_for(loaded, name, nsamples, seqlen)
    marks, training = [], [False]

    def set_state(*args, **kwargs):
        if training[0]:
            marks.append(time.perf_counter())
        return original_set_state(*args, **kwargs)

    def train_block(*args, **kwargs):
        training[0] = True
        try:
            return original_train_block(*args, **kwargs)
        finally:
            training[0] = False
            marks.append(time.perf_counter())

    with probe.wrap(rc, "fingerprint"), probe.wrap(rc, "capture_block_calls"), \
            probe.wrap(rc, "compress_block", memory=True), probe.wrap(rc, "layer_ranks"), \
            patched(hl, "set_state", set_state) as original_set_state, \
            patched(rc, "train_block", train_block) as original_train_block, probe.wrap(rc, "train_block"):
        start = time.perf_counter()
        rc.compress(loaded, windows, config, progress=False, num_blocks=1)
        total = time.perf_counter() - start
    block = probe.calls["compress_block"][0]
    starts = marks[::config.num_groups]  # K set_state calls per step, then the end of training
    steps = [b - a for a, b in zip(starts, starts[1:])]
    return {"nsamples": nsamples, "seqlen": seqlen, "epochs": epochs, "steps": epochs * nsamples, "step_s": steps,
            "total_s": total, "fingerprint_s": probe.total("fingerprint"),
            "capture_s": probe.total("capture_block_calls"),
            "block_s": block["seconds"], "train_s": probe.total("train_block"), "ranks_s": probe.total("layer_ranks"),
            "rss_before": block["rss_before"], "rss_peak": block["rss_peak"],
            "workset": block["rss_peak"] - block["rss_before"],
            **({"device_peak": block["device_peak"]} if "device_peak" in block else {})}


def measure_sparsegpt(loaded, name: str, nsamples: int, seqlen: int, device) -> dict:
    """One `prune(method="sparsegpt", num_blocks=1)`, the per-layer solves timed."""
    import epts.baselines as bl
    from epts.baselines.sparsegpt import SparseGPTPruner
    from epts.config import CalibConfig, PruneConfig
    from epts.importance import Pattern

    probe = Probe(device)
    config = PruneConfig(method="sparsegpt", pattern=Pattern(sparsity=0.5),
                         calib=CalibConfig(nsamples=nsamples, seqlen=seqlen))
    windows = windows_for(loaded, name, nsamples, seqlen)

    def describe(pruner, *rest):
        return {"d_out": pruner.layer.out_features, "d_in": pruner.layer.in_features}

    with probe.wrap(bl, "_prune_block", memory=True), probe.wrap(SparseGPTPruner, "pruned_weight", describe=describe), \
            probe.wrap(SparseGPTPruner, "add_batch"):
        bl.prune(loaded, windows, config, progress=False, num_blocks=1)
    block = probe.calls["_prune_block"][0]
    solves = [(r["d_out"], r["d_in"], r["seconds"]) for r in probe.calls["pruned_weight"]]
    return {"nsamples": nsamples, "seqlen": seqlen, "block_s": block["seconds"],
            "solve_s": sum(s for *_, s in solves), "hessian_s": probe.total("add_batch"), "solves": solves,
            "rss_before": block["rss_before"], "rss_peak": block["rss_peak"],
            "workset": block["rss_peak"] - block["rss_before"],
            **({"device_peak": block["device_peak"]} if "device_peak" in block else {})}


def run_job(args) -> dict:
    """Everything measured for one model, in this process."""
    import torch

    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401 (their import is overhead)

    import epts.baselines  # noqa: F401
    import epts.reconstruct  # noqa: F401
    from epts.arch import decoder_blocks
    from epts.models import resolve_device

    fixed = rss_bytes()  # after importing torch, transformers and epts: the fixed overhead
    device = resolve_device(args.device)
    dtype_bytes = torch.finfo(getattr(torch, args.dtype)).bits // 8
    start = time.perf_counter()
    loaded, shapes = build(args.job, args.dtype, device)
    build_s = time.perf_counter() - start
    block_params = shapes["block_params"]
    nsamples = args.windows or (BIG_WINDOWS if block_params > BIG_BLOCK else WINDOWS)
    out = {"model": args.job, "dtype": args.dtype, "device": str(device), "threads": torch.get_num_threads(),
           "shapes": shapes, "fixed_rss": fixed, "build_s": build_s, "rss_built": rss_bytes(),
           "measured_layers": len(decoder_blocks(loaded.model)), "measured_vocab": loaded.model.config.vocab_size,
           "measured_bytes": sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values()),
           "epts": [], "sparsegpt": None, "skipped": []}
    # EPTS's working set is ~ the block x (weights + int16 ranks + float32 ranks + float32 mask +
    # effective weight, the last two saved for the backward pass) + the widest layer's transients
    # (merged weight, gradients): refuse to measure what would not fit (extrapolated instead).
    widest = max(o * i for _, o, i in shapes["linears"])
    need = block_params * (2 * dtype_bytes + 10) + 12 * widest
    if need > args.ram_budget_gb * GiB:
        out["skipped"].append(f"epts: needs ~{need / GiB:.1f} GiB over the {args.ram_budget_gb:.1f} GiB budget")
    else:
        if block_params <= BIG_BLOCK:  # one-time set-up (threads, kernels) out of the measured runs
            measure_epts(loaded, args.job, 1, 8, 1, device)
        for seqlen in SEQLENS:
            out["epts"].append(measure_epts(loaded, args.job, nsamples, seqlen, 1, device))
            print(f"{args.job} epts {nsamples}x{seqlen}: block {out['epts'][-1]['block_s']:.1f} s", flush=True)
        if args.job == REAL and args.validate:
            q = Setting.parse(args.validate)
            out["validation"] = measure_epts(loaded, args.job, q.nsamples, q.seqlen, q.epochs, device)
            print(f"{args.job} epts validation {args.validate}: block {out['validation']['block_s']:.1f} s", flush=True)
    widest_in = max(i for *_, i in shapes["linears"])
    if widest_in > args.sparsegpt_max_width:
        out["skipped"].append(f"sparsegpt: a {widest_in}-input layer is over --sparsegpt-max-width "
                              f"{args.sparsegpt_max_width} (its O(d^3) solve is extrapolated)")
    else:
        out["sparsegpt"] = measure_sparsegpt(loaded, args.job, nsamples, SEQLENS[-1], device)
        print(f"{args.job} sparsegpt {nsamples}x{SEQLENS[-1]}: block {out['sparsegpt']['block_s']:.1f} s", flush=True)
    out["peak_rss"] = peak_rss_bytes()  # since the last phase reset: see the per-phase peaks
    return out


# ---------------------------------------------------------------- the report

def extrapolate(jobs: dict[str, dict], settings: list[Setting], dtype_bytes: int) -> tuple[list[dict], dict]:
    """Per model: measured per-block costs, and the whole-model time and peak memory per setting.
    A model whose EPTS block was not measured takes the per-parameter costs of the largest measured
    random-shape block; SparseGPT's solve for an unmeasured model comes from the O(d^3) fit over
    every measured random-shape layer."""
    real = jobs.get(REAL)
    ratio = None
    if real and real["epts"] and "validation" in real:
        ratio = train_forward_ratio(real["epts"], real["validation"], real["shapes"]["block_params"],
                                    real["shapes"]["attn_width"])
    measured = {n: j for n, j in jobs.items() if j["epts"]}
    random_shapes = [n for n in measured if n != REAL]
    reference = max(random_shapes or measured, key=lambda n: measured[n]["shapes"]["block_params"], default=None)
    layers = [tuple(l) for n, j in jobs.items() if n != REAL and j["sparsegpt"] for l in j["sparsegpt"]["solves"]]
    alpha, beta = fit_solve(layers) if len(layers) >= 2 else (0.0, 0.0)
    sgpt_ref = max((n for n in jobs if n != REAL and jobs[n]["sparsegpt"]),
                   key=lambda n: jobs[n]["shapes"]["block_params"], default=None)
    rows = []
    for name, job in jobs.items():
        sh = job["shapes"]
        P, d, L = sh["block_params"], sh["attn_width"], sh["layers"]
        block_b = P * dtype_bytes
        embed_b = (sh["embed_params"] + sh["head_params"] + sh["other_params"]) * dtype_bytes
        notes = list(job["skipped"])
        if job["epts"]:
            fit = epts_fit(job["epts"], P, d, ratio)
            lo = min(job["epts"], key=lambda r: r["seqlen"])
            hi = max(job["epts"], key=lambda r: r["seqlen"])
            # The measured model's embeddings, head and captured stream are in rss_before already.
            workset_lo = lo["workset"]
            act = max((hi["workset"] - lo["workset"]) / (hi["seqlen"] - lo["seqlen"]), 0.0)
            epts_measured = f"{lo['nsamples']}x{lo['seqlen']}, {lo['nsamples']}x{hi['seqlen']} (1 epoch)"
            fp_per_byte = hi["fingerprint_s"] / job["measured_bytes"]
            epts_block_measured = hi["block_s"]
            epts_rss = max(r["rss_peak"] for r in job["epts"])
        elif reference is None:  # nothing measured to scale from: no EPTS figures
            fit = workset_lo = act = epts_block_measured = epts_rss = None
            fp_per_byte = 0.0
            epts_measured = "not measured, and no measured block to scale from"
        else:
            ref = measured[reference]
            fit = epts_fit(ref["epts"], ref["shapes"]["block_params"], ref["shapes"]["attn_width"], ratio).scaled(P, d)
            scale = P / ref["shapes"]["block_params"]
            lo = min(ref["epts"], key=lambda r: r["seqlen"])
            hi = max(ref["epts"], key=lambda r: r["seqlen"])
            workset_lo = lo["workset"] * scale
            # Activations per token grow with the widths, i.e. with the square root of the parameters.
            act = max((hi["workset"] - lo["workset"]) / (hi["seqlen"] - lo["seqlen"]), 0.0) * math.sqrt(scale)
            epts_measured = f"not measured: scaled from {reference} per parameter"
            fp_per_byte = hi["fingerprint_s"] / ref["measured_bytes"]
            epts_block_measured = None
            epts_rss = None
        sg = job["sparsegpt"]
        if sg:
            solve_s, token_s = sg["solve_s"], sg["block_s"] - sg["solve_s"]
            sg_setting = Setting("measured", sg["nsamples"], sg["seqlen"], 1)
            widest = max(i for *_, i in sh["linears"])
            solve_factor = max(sg["workset"] - hessian_bytes(sh["linears"]), 0) / (4 * widest**2)
            sg_block_measured, sg_rss = sg["block_s"], sg["rss_peak"]
            sg_note = f"{sg['nsamples']}x{sg['seqlen']}"
        elif sgpt_ref is None:
            solve_s = token_s = sg_setting = solve_factor = sg_block_measured = sg_rss = None
            widest = max(i for *_, i in sh["linears"])
            sg_note = "not measured, and no measured random-shape block to scale from"
        else:
            ref = jobs[sgpt_ref]["sparsegpt"]
            rsh = jobs[sgpt_ref]["shapes"]
            solve_s = solve_seconds(alpha, beta, sh["linears"])
            # Hessians (2 d_in^2 per token per layer) and forward passes (4 P per token) scale together.
            work = lambda s: 2 * sum(i * i for *_, i in s["linears"]) + 4 * s["block_params"]  # noqa: E731
            token_s = (ref["block_s"] - ref["solve_s"]) * work(sh) / work(rsh)
            sg_setting = Setting("measured", ref["nsamples"], ref["seqlen"], 1)
            rw = max(i for *_, i in rsh["linears"])
            solve_factor = max(ref["workset"] - hessian_bytes(rsh["linears"]), 0) / (4 * rw**2)
            widest = max(i for *_, i in sh["linears"])
            sg_block_measured, sg_rss = None, None
            sg_note = f"not measured: solve from the O(d^3) fit, the rest scaled from {sgpt_ref}"
        fixed = job["fixed_rss"]
        total_bytes = sh["total_params"] * dtype_bytes
        fp_s = fp_per_byte * total_bytes
        row = {"model": name, "dtype": job["dtype"], "device": job["device"], "threads": job["threads"],
               "layers": L, "block_params": P, "total_params": sh["total_params"], "block_bytes": block_b,
               "embed_head_bytes": embed_b, "dense_bytes": total_bytes, "dense_bf16_bytes": sh["total_params"] * 2,
               "fixed_rss": fixed, "epts_measured_at": epts_measured, "epts_block_s": epts_block_measured,
               "epts_fit": asdict(fit) if fit else None, "epts_workset": workset_lo, "epts_act_per_token": act,
               "epts_peak_rss_measured": epts_rss, "sparsegpt_measured_at": sg_note,
               "sparsegpt_block_s": sg_block_measured, "sparsegpt_solve_s": solve_s,
               "sparsegpt_peak_rss_measured": sg_rss, "sparsegpt_solve_factor": solve_factor,
               "fingerprint_s": fp_s, "notes": notes, "settings": {}}
        for s in settings:
            stream = stream_bytes(s, sh["hidden"], dtype_bytes)
            x = row["settings"][s.name] = {"setting": asdict(s), "stream_bytes": stream, "epts_block_s": None,
                                           "epts_model_s": None, "epts_peak_bytes": None, "sparsegpt_block_s": None,
                                           "sparsegpt_model_s": None, "sparsegpt_peak_bytes": None}
            if fit is not None:
                x["epts_block_s"] = fit.block_seconds(s)
                x["epts_model_s"] = whole_model_seconds(x["epts_block_s"], L, fp_s)
                x["epts_peak_bytes"] = epts_peak_bytes(fixed, embed_b, block_b, workset_lo, act, SEQLENS[0], s, stream)
            if solve_s is not None:
                x["sparsegpt_block_s"] = sparsegpt_block_seconds(solve_s, token_s, sg_setting, s, d, P)
                x["sparsegpt_model_s"] = whole_model_seconds(x["sparsegpt_block_s"], L, 0.0)
                x["sparsegpt_peak_bytes"] = sparsegpt_peak_bytes(fixed, embed_b, block_b, hessian_bytes(sh["linears"]),
                                                                 solve_factor, widest, stream)
        if "validation" in job:
            v = job["validation"]
            vs = Setting("validation", v["nsamples"], v["seqlen"], v["epochs"])
            median = steady_step(v["step_s"])
            row["validation"] = {"setting": asdict(vs), "measured_block_s": v["block_s"],
                                 "steady_block_s": v["block_s"] - v["train_s"] + len(v["step_s"]) * median,
                                 "stalled_steps": sum(t > 3 * median for t in v["step_s"]),
                                 "predicted_block_s": fit.block_seconds(vs),
                                 "two_point_block_s": epts_fit(job["epts"], P, d).block_seconds(vs)}
        rows.append(row)
    return rows, {"solve_alpha": alpha, "solve_beta": beta, "solve_layers": len(layers), "epts_reference": reference,
                  "train_per_forward": ratio}


def _gib(x) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def _dur(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def markdown(rows: list[dict], fits: dict, settings: list[Setting], meta: dict) -> str:
    lines = [f"Commit {meta['commit']}, {meta['dtype']} on {meta['device']} ({meta['threads']} threads), "
             f"{meta['when']}:", "", f"    {meta['command']}", "",
             "Per block, measured (random-shape models: one block, real widths):", "",
             "| model | dtype | params / block | EPTS s / block (measured at) | SparseGPT s / block (measured at) | "
             "peak RSS GiB EPTS / SparseGPT | fixed overhead GiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['block_params'] / 1e6:.1f} M | {_dur(r['epts_block_s'])} "
            f"({r['epts_measured_at']}) | {_dur(r['sparsegpt_block_s'])} ({r['sparsegpt_measured_at']}) | "
            f"{_gib(r['epts_peak_rss_measured'])} / {_gib(r['sparsegpt_peak_rss_measured'])} | "
            f"{_gib(r['fixed_rss'])} |")
    lines += ["", "Sizes that drive memory (GiB, in the run's dtype; dense bf16 = the whole model in bfloat16):", "",
              "| model | layers | params | one block | embeddings + head | dense | dense bf16 | "
              + " | ".join(f"one stream {s.name} ({s.nsamples}x{s.seqlen})" for s in settings) + " |",
              "|---|---|---|---|---|---|---|" + "---|" * len(settings)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layers']} | {r['total_params'] / 1e9:.2f} B | {_gib(r['block_bytes'])} | "
                     f"{_gib(r['embed_head_bytes'])} | {_gib(r['dense_bytes'])} | {_gib(r['dense_bf16_bytes'])} | "
                     + " | ".join(_gib(r["settings"][s.name]["stream_bytes"]) for s in settings) + " |")
    lines += ["", "Whole model, extrapolated (block-streamed path; time on this machine's cores):", "",
              "| model | dtype | setting | EPTS time | EPTS peak GiB | SparseGPT time | SparseGPT peak GiB |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        for s in settings:
            x = r["settings"][s.name]
            lines.append(f"| {r['model']} | {r['dtype']} | {s.name}: {s.nsamples}x{s.seqlen}, {s.epochs} ep | "
                         f"{_dur(x['epts_model_s'])} | {_gib(x['epts_peak_bytes'])} | {_dur(x['sparsegpt_model_s'])} | "
                         f"{_gib(x['sparsegpt_peak_bytes'])} |")
    val = [r for r in rows if "validation" in r]
    for r in val:
        v = r["validation"]
        s = v["setting"]
        rel = lambda x: f"{100 * (x / v['steady_block_s'] - 1):+.0f} %"  # noqa: E731
        lines += ["", f"EPTS scaling on {r['model']}: one block at {s['nsamples']}x{s['seqlen']}, {s['epochs']} epochs "
                      f"measured {v['measured_block_s']:.1f} s, {v['steady_block_s']:.1f} s at its median step "
                      f"({v['stalled_steps']} of its steps took over 3x the median: other work on the machine). "
                      f"The short runs alone (two-point step fit) predict {v['two_point_block_s']:.1f} s "
                      f"({rel(v['two_point_block_s'])}); but at 32-128 tokens a step's token cost is too small "
                      f"against its weight-sized work and the noise to measure on wide blocks, so it is taken as "
                      f"{fits['train_per_forward']:.2f} x the forward passes' cost per token, the ratio of this run, "
                      f"for every shape ({rel(v['predicted_block_s'])} here, its steps matching by construction)."]
    lines += ["", f"SparseGPT solve fit over {fits['solve_layers']} measured layers: "
                  f"{fits['solve_alpha']:.3g} d_in^3 + {fits['solve_beta']:.3g} d_out d_in^2 seconds.",
              "GPU: " + meta["gpu"]]
    notes = sorted({n for r in rows for n in r["notes"]})
    if notes:
        lines += ["", "Not measured here: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join([REAL, *SHAPES]))
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (not measured when no CUDA device is present)")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="NAME=WINDOWSxTOKENSxEPOCHS,... to extrapolate to")
    parser.add_argument("--windows", type=int, help=f"windows per measurement (default {WINDOWS}, "
                                                     f"{BIG_WINDOWS} for blocks over {BIG_BLOCK:,} parameters)")
    parser.add_argument("--validate", default="quick=32x256x2",
                        help="also run one SmolLM2 block at this setting to check the extrapolation ('' to skip)")
    parser.add_argument("--sparsegpt-max-width", type=int, default=16384,
                        help="SparseGPT is measured only on blocks whose widest layer input is at most this")
    parser.add_argument("--ram-budget-gb", type=float, help="skip EPTS measurements needing more (default: 75 %% of "
                                                            "MemAvailable: the machine is shared)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "scale")
    parser.add_argument("--resume", action="store_true", help="keep the models already measured in OUT/job-*.json")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--job-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ram_budget_gb is None:
        available = int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())[1]) * 1024
        args.ram_budget_gb = 0.75 * available / GiB
    try:
        settings = [Setting.parse(s) for s in args.settings.split(",") if s.strip()]
        if args.validate:
            Setting.parse(args.validate)
    except ValueError as err:
        parser.error(str(err))
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n != REAL and n not in SHAPES]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}: choose from {REAL}, {', '.join(SHAPES)}")
    if args.job:
        args.job_out.write_text(json.dumps(run_job(args), indent=2) + "\n")
        return
    run_all(args, names, settings)


def run_all(args, names: list[str], settings: list[Setting]) -> None:
    import torch

    from benchmarks.run import commit
    from epts.io import write_json_atomic

    out = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.scale " + " ".join(a for a in sys.argv[1:])
    gpu = "not measured, no device lent" if args.device == "cpu" else "measured"
    meta = {"commit": commit(), "command": command.strip(), "dtype": args.dtype, "device": args.device,
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": gpu, "threads": torch.get_num_threads()}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        meta["gpu"] = "not measured: no CUDA device present"
        write_json_atomic(out / "scale.json", {**meta, "rows": [], "fits": {}})
        (out / "scale.md").write_text(f"GPU ({args.device}): not measured, no CUDA device present.\n")
        print(f"--device {args.device}: no CUDA device present; GPU rows not measured", flush=True)
        return
    jobs = {}
    start = time.perf_counter()
    for name in names:
        job_file = out / f"job-{name}.json"
        if args.resume and job_file.is_file():
            jobs[name] = json.loads(job_file.read_text())
            print(f"{name}: measured earlier, kept", flush=True)
            continue
        argv = [sys.executable, "-m", "benchmarks.scale", "--job", name, "--job-out", str(job_file),
                "--dtype", args.dtype, "--device", args.device, "--validate", args.validate,
                "--sparsegpt-max-width", str(args.sparsegpt_max_width), "--ram-budget-gb", str(args.ram_budget_gb),
                *(["--windows", str(args.windows)] if args.windows else [])]
        job_start = time.perf_counter()
        with (out / "logs" / f"{name}.log").open("w") as log:
            r = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if r.returncode:
            raise SystemExit(f"benchmarks.scale: error: the {name} job failed (exit {r.returncode}): see "
                             f"{out / 'logs' / f'{name}.log'}")
        jobs[name] = json.loads(job_file.read_text())
        print(f"{name}: measured in {time.perf_counter() - job_start:.0f} s", flush=True)
    meta["seconds"] = time.perf_counter() - start
    meta["threads"] = ",".join(sorted({str(j["threads"]) for j in jobs.values()}))  # the jobs' own, under --resume too
    dtype_bytes = torch.finfo(getattr(torch, args.dtype)).bits // 8
    rows, fits = extrapolate(jobs, settings, dtype_bytes)
    write_json_atomic(out / "scale.json", {**meta, "settings": [asdict(s) for s in settings], "fits": fits,
                                           "rows": rows, "jobs": jobs})
    text = markdown(rows, fits, settings, meta)
    (out / "scale.md").write_text(text)
    print(text)
    print(f"benchmark took {meta['seconds'] / 60:.1f} min; results in {out}", flush=True)


if __name__ == "__main__":
    main()
