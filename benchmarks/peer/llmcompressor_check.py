"""Peer check: llm-compressor's Wanda and SparseGPT on our model, calibration and eval windows.

Runs INSIDE benchmarks/peer/.venv (made by setup.sh), never in the project's own .venv:

    benchmarks/peer/.venv/bin/python benchmarks/peer/llmcompressor_check.py \
        --inputs /tmp/peer-inputs --methods wanda,sparsegpt --sparsities 0.5 --out results.json

DIR (--inputs) holds `model/` (a Hugging Face causal LM folder) and `windows.safetensors`
with int64 tensors `calib` [N, T] (calibration windows) and `eval` [M, L] (evaluation windows).

For each (method, sparsity) a fresh float32 CPU model is pruned by llmcompressor's `oneshot`
(sequential pipeline, one decoder layer at a time, pruned activations propagated, which is
llmcompressor's default) on exactly the `calib` windows in their stored order, then scored by
perplexity on `eval`. The dense perplexity is measured once. Results go to --out as JSON,
written atomically.

Verified with llmcompressor 0.14.0.1 / transformers 5.17.0 / torch 2.13.0+cpu on SmolLM2-135M,
32x256 calib, 64x512 eval: dense 29.53, Wanda 0.5 63.30, SparseGPT 0.5 52.66 (zeros 0.5000).
SparseGPT differs from epts (51.27) mainly by its mask comparison group: llmcompressor, like
the reference code, thresholds w^2/[H^-1]_jj^2 over a whole 128-column block (all rows together),
epts picks per output row; with a per-row mask patched in, llmcompressor gives 50.93.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# The hub is never needed: everything is loaded from local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

log = logging.getLogger("llmcompressor_check")

# Decoder linear layers that are pruned (LLaMA naming); lm_head and embeddings stay dense.
TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = ["re:.*\\.(" + "|".join(TARGET_SUFFIXES) + ")$"]
IGNORE = ["re:.*lm_head"]
EVAL_BATCH = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", type=Path, required=True, help="folder with model/ and windows.safetensors")
    p.add_argument("--methods", default="wanda,sparsegpt", help="comma list of wanda,sparsegpt")
    p.add_argument("--sparsities", default="0.3,0.4,0.5,0.6,0.7", help="comma list of unstructured sparsities")
    p.add_argument(
        "--pattern",
        default="0:0",
        help="mask structure: '0:0' (unstructured, default) or N:M such as 2:4; "
        "with N:M the --sparsities are ignored and one run per method is made at N/M",
    )
    p.add_argument("--out", type=Path, required=True, help="JSON results file")
    p.add_argument("--skip-dense", action="store_true", help="do not measure the dense perplexity")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = p.parse_args(argv)
    args.methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    for m in args.methods:
        if m not in ("wanda", "sparsegpt"):
            p.error(f"unknown method {m!r}")
    args.sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    n, m = (int(x) for x in args.pattern.split(":"))
    if (n, m) != (0, 0):
        if not 0 < n < m:
            p.error(f"bad pattern {args.pattern!r}")
        args.sparsities = [1.0 - n / m]
    return args


def load_windows(inputs: Path) -> tuple[torch.Tensor, torch.Tensor]:
    t = load_file(str(inputs / "windows.safetensors"))
    calib, evalw = t["calib"].long(), t["eval"].long()
    log.info("windows: calib %s, eval %s", tuple(calib.shape), tuple(evalw.shape))
    return calib, evalw


def load_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.to("cpu").eval()
    return model


def pruned_linears(model) -> dict[str, torch.nn.Linear]:
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in TARGET_SUFFIXES
    }


def zero_fraction(model) -> tuple[float, int]:
    zeros = total = 0
    for mod in pruned_linears(model).values():
        w = mod.weight.detach()
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total, total


# This and write_json_atomic mirror epts.evaluate.mean_nll and epts.io on purpose: the peer venv holds
# only llmcompressor's pinned stack, without epts or its dependencies.
@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = EVAL_BATCH) -> float:
    nll, tokens = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        x = windows[i : i + batch]
        logits = model(x).logits[:, :-1].float()
        target = x[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        tokens += target.numel()
    return math.exp(nll / tokens)


def calib_dataset(calib: torch.Tensor):
    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()}
    )


def make_modifier(method: str, sparsity: float, pattern: str):
    common = dict(sparsity=sparsity, mask_structure=pattern, targets=TARGETS, ignore=IGNORE)
    if method == "wanda":
        from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

        return WandaPruningModifier(**common)
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    # block_size=128 and dampening_frac=0.01 are llmcompressor's defaults; stated for the record.
    return SparseGPTModifier(**common, block_size=128, dampening_frac=0.01)


def run_one(method: str, sparsity: float, pattern: str, model_dir: Path, calib: torch.Tensor, evalw: torch.Tensor, tokenizer) -> dict:
    from llmcompressor import oneshot
    from llmcompressor.core import reset_session

    model = load_model(model_dir)
    modifier = make_modifier(method, sparsity, pattern)
    log.info("%s sparsity=%.2f pattern=%s: oneshot on %d windows", method, sparsity, pattern, calib.shape[0])
    reset_session()
    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        recipe=[modifier],
        dataset=calib_dataset(calib),
        num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False,
        batch_size=1,
        pipeline="sequential",
    )
    seconds = time.perf_counter() - t0
    reset_session()
    zeros, n_params = zero_fraction(model)
    ppl = perplexity(model, evalw)
    row = {
        "method": method,
        "sparsity": sparsity,
        "pattern": pattern,
        "ppl": ppl,
        "zero_fraction": zeros,
        "pruned_params": n_params,
        "oneshot_seconds": seconds,
    }
    if method == "sparsegpt":
        row.update(block_size=modifier.block_size, dampening_frac=modifier.dampening_frac)
    log.info("%s %.2f: ppl %.3f, zeros %.4f, oneshot %.1f s", method, sparsity, ppl, zeros, seconds)
    del model
    return row


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("llmcompressor", "transformers", "compressed-tensors", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def summary(payload: dict) -> str:
    lines = [f"{'method':<10} {'sparsity':>8} {'pattern':>7} {'ppl':>10} {'zeros':>7} {'oneshot_s':>9}"]
    if payload.get("dense") is not None:
        d = payload["dense"]
        lines.append(f"{'dense':<10} {0.0:>8.2f} {'-':>7} {d['ppl']:>10.3f} {d['zero_fraction']:>7.4f} {'-':>9}")
    for r in payload["runs"]:
        lines.append(
            f"{r['method']:<10} {r['sparsity']:>8.2f} {r['pattern']:>7} {r['ppl']:>10.3f} "
            f"{r['zero_fraction']:>7.4f} {r['oneshot_seconds']:>9.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    model_dir = args.inputs / "model"
    calib, evalw = load_windows(args.inputs)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    payload: dict = {
        "inputs": str(args.inputs.resolve()),
        "calib_shape": list(calib.shape),
        "eval_shape": list(evalw.shape),
        "eval_batch": EVAL_BATCH,
        "targets": TARGETS,
        "ignore": IGNORE,
        "pipeline": "sequential (llmcompressor default; pruned activations propagated)",
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "dense": None,
        "runs": [],
    }
    log.info("versions: %s", payload["versions"])

    if not args.skip_dense:
        model = load_model(model_dir)
        zeros, n_params = zero_fraction(model)
        t0 = time.perf_counter()
        ppl = perplexity(model, evalw)
        payload["dense"] = {"ppl": ppl, "zero_fraction": zeros, "pruned_params": n_params, "eval_seconds": time.perf_counter() - t0}
        log.info("dense: ppl %.3f", ppl)
        del model
        write_json_atomic(args.out, payload)

    for method in args.methods:
        for sparsity in args.sparsities:
            payload["runs"].append(run_one(method, sparsity, args.pattern, model_dir, calib, evalw, tokenizer))
            write_json_atomic(args.out, payload)  # keep partial results if a later run fails

    write_json_atomic(args.out, payload)
    print(summary(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
