"""Batch-1 decode on the sparse runtime against dense PyTorch, side by side in one run.

    python -m benchmarks.decode                                   # layers, then SmolLM2, Gemma-3, LLaMA-7B shape
    python -m benchmarks.decode --models none --threads 1,2       # per-layer GEMV only (~3 min)
    python -m benchmarks.decode --layers none --models smollm2-135m --new-tokens 32

Layers: y = W x for LLaMA-7B's shapes, bfloat16 values, the sparse kernel at 0.5 / 0.6 / 0.7
against PyTorch's dense bfloat16 and dense float32 (`F.linear`), each timed in turn within one loop
so that the machine's noise falls on all of them alike; the bytes-read limit (dense bfloat16 bytes
over packed bytes) beside each row. Each candidate cycles through copies of its weight past
`--stream-mib` (1 GiB), so the weights come from DRAM as in a 7B decode step, not from the cache.

Models: every row is a fresh process (its peak RSS is its own): greedy decode of `--new-tokens`
tokens after a `--prompt-tokens` prompt (WikiText-2 test text where ../shared/data has it, else
seeded random ids), dense in float32 and bfloat16 and packed in bfloat16 at each sparsity. The
real models are pruned per row by magnitude (speed and size depend on the sparsity, not on which
weights are kept), saved with `--format compressed`, and the packed rows load that folder with
`epts.load_model` (never holding a dense weight); the LLaMA-7B-shaped model (random weights, about
13.5 GB dense in bfloat16) is built layer by layer in the process that runs it, packed as it is
made, with fewer tokens (`--big-prompt-tokens`, `--big-new-tokens`). Rows go to OUT/decode.json
(`rows`: kind, model or shape, dtype, sparsity, threads, timings, RSS) and a table to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.run import DATA, commit

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
SPARSITIES = (0.5, 0.6, 0.7)
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048)


def bytes_limit(sparsity: float, value_bytes: int = 2) -> float:
    """Dense bytes over packed bytes a weight: b / ((1 - s) b + 1/8)."""
    return value_bytes / ((1 - sparsity) * value_bytes + 1 / 8)


def random_pruned(rows: int, cols: int, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """Random float32 weight with exactly floor((1 - s) cols) kept a row (the largest magnitudes)."""
    w = torch.randn(rows, cols, generator=generator)
    keep = math.floor((1 - sparsity) * cols)
    idx = w.abs().topk(keep, dim=1).indices
    return torch.zeros_like(w).scatter_(1, idx, w.gather(1, idx))


def layer_rows(threads: list[int], repeats: int, stream_mib: int) -> list[dict]:
    """Per-layer rows. Each candidate cycles through copies of its weight that together exceed
    `stream_mib` MiB (past the last-level cache), so that every call reads its weight from DRAM, as a
    decode step does; `stream_mib` 0 times one cache-resident copy."""
    import copy

    from epts.sparse import SparseLinear

    rows = []
    g = torch.Generator().manual_seed(0)
    for out_f, in_f in SHAPES:
        dense32 = torch.randn(out_f, in_f, generator=g)
        dense16 = dense32.bfloat16()
        packed = {s: SparseLinear.from_dense(random_pruned(out_f, in_f, s, g).bfloat16()) for s in SPARSITIES}
        x32 = torch.randn(1, in_f, generator=g)
        x16 = x32.bfloat16()

        def copies(thing, nbytes):
            n = max(1, math.ceil(stream_mib * 2**20 / nbytes))
            return [thing] + [copy.deepcopy(thing) for _ in range(n - 1)]

        weights = {"dense_fp32": (copies(dense32, dense32.numel() * 4), x32),
                   "dense_bf16": (copies(dense16, dense16.numel() * 2), x16),
                   **{s: (copies(layer, layer.packed_bytes()), x16) for s, layer in packed.items()}}

        def run(key):
            many, x = weights[key]
            for w in many:
                F.linear(x, w) if isinstance(w, torch.Tensor) else w(x)
            return len(many)

        for n in threads:
            torch.set_num_threads(n)
            times: dict = {k: [] for k in weights}
            for key in weights:  # warm-up
                run(key)
            for _ in range(repeats):  # in turn: every candidate sees the same noise
                for key in weights:
                    start = time.perf_counter()
                    calls = run(key)
                    times[key].append((time.perf_counter() - start) / calls)
            med = {k: sorted(v)[len(v) // 2] * 1e6 for k, v in times.items()}
            dense_us = min(med["dense_fp32"], med["dense_bf16"])
            for s, layer in packed.items():
                rows.append({"kind": "layer", "shape": f"{out_f}x{in_f}", "dtype": "bfloat16", "sparsity": s,
                             "threads": n, "dense_us": dense_us, "dense_bf16_us": med["dense_bf16"],
                             "dense_fp32_us": med["dense_fp32"], "sparse_us": med[s],
                             "speedup": dense_us / med[s], "bytes_limit": bytes_limit(s), "stream_mib": stream_mib,
                             "dense_rss_mib": dense16.numel() * 2 / 2**20,
                             "sparse_rss_mib": layer.packed_bytes() / 2**20})
                print(f"layer {out_f}x{in_f} threads {n} s {s}: dense bf16 {med['dense_bf16']:.0f} us, fp32 "
                      f"{med['dense_fp32']:.0f} us, sparse {med[s]:.0f} us: {dense_us / med[s]:.2f}x "
                      f"(bytes limit {bytes_limit(s):.2f}x)", flush=True)
        del weights
    return rows


def prompt_ids(tokenizer, count: int, vocab: int) -> torch.Tensor:
    text = DATA / "wiki.test.raw"
    if tokenizer is not None and text.is_file():
        ids = tokenizer(text.read_text(encoding="utf-8")[:20000], return_tensors="pt")["input_ids"][:, :count]
        if ids.shape[1] == count:
            return ids
    return torch.randint(0, vocab, (1, count), generator=torch.Generator().manual_seed(0))


def run_one(spec: dict) -> dict:
    """One model row in this process: load or build, decode, measure (see the module docstring)."""
    from epts.evaluate import generate_timed, peak_rss_mb
    from epts.models import load_model
    from epts.sparse import packed_bytes

    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    if spec["model"] == "llama-7b":
        model, tokenizer = build_llama_7b(spec["sparsity"]), None
    else:
        loaded = load_model(spec["folder"], spec["dtype"], runtime="sparse" if spec["sparsity"] else "dense")
        model, tokenizer = loaded.model, loaded.tokenizer
    load_s = time.perf_counter() - start
    ids = prompt_ids(tokenizer, spec["prompt_tokens"], model.config.vocab_size)
    done = generate_timed(model, ids, spec["new_tokens"], ignore_eos=True)
    return {"kind": "model", "model": spec["model"], "dtype": spec["dtype"], "sparsity": spec["sparsity"],
            "threads": spec["threads"], "runtime": "sparse" if spec["sparsity"] else "dense",
            "tokens_per_s": done.decode_tokens_per_s, "prefill_s": done.prefill_seconds,
            "prompt_tokens": spec["prompt_tokens"], "new_tokens": spec["new_tokens"], "load_s": load_s,
            "peak_rss_mib": peak_rss_mb(), "weights_mib": packed_bytes(model) / 2**20}


@torch.no_grad()
def build_llama_7b(sparsity: float) -> torch.nn.Module:
    """LLaMA-7B's shapes with random bfloat16 weights, made one tensor at a time (never two dense
    copies); at a sparsity > 0 each prunable linear is packed as it is made."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM, LlamaConfig

    from epts.arch import arch_spec, decoder_blocks
    from epts.sparse import SparseLinear

    config = LlamaConfig(**LLAMA_7B)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prunable = tuple(f"{p}.weight" for p in arch_spec(model).prunable)
    names = {id(m): n for n, m in model.named_modules()}
    for block in decoder_blocks(model):
        prefix = names[id(block)]
        for name in arch_spec(model).prunable:
            layer = block.get_submodule(name)
            shape = (layer.out_features, layer.in_features)
            if sparsity:  # packed parts drawn directly: no dense weight, no top-k over 7B-sized rows
                block.set_submodule(name, random_packed(shape, sparsity, g))
            else:
                w = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
                set_module_tensor_to_device(model, f"{prefix}.{name}.weight", "cpu", value=w)
    for name, tensor in model.named_parameters():
        if tensor.is_meta and not name.endswith(prunable):
            value = torch.ones(tensor.shape, dtype=torch.bfloat16) if "norm" in name else \
                torch.empty(tensor.shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
            set_module_tensor_to_device(model, name, "cpu", value=value)
    return model.eval()


def random_packed(shape: tuple[int, int], sparsity: float, generator: torch.Generator):
    """A SparseLinear of random bfloat16 values behind a random mask keeping each weight with
    probability 1 - sparsity."""
    import numpy as np

    from epts.sparse import SparseLinear

    keep = torch.rand(shape, generator=generator) >= sparsity
    counts = keep.sum(dim=1)
    values = torch.randn(int(counts.sum()), generator=generator).mul_(0.02).bfloat16()
    bitmask = torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little"))
    return SparseLinear(shape[1], shape[0], values, bitmask, torch.cumsum(counts, 0) - counts)


def prepare_folders(model: str, work: Path) -> dict:
    """The real model's dense float32 folder and, per sparsity, its magnitude-pruned bfloat16
    compressed folder: {0: dense folder, s: compressed folder}."""
    from epts import Pattern, PruneConfig, load_model, prune, save_model

    folders = {0.0: work / "dense"}
    base = load_model(model, "float32", runtime="dense")
    save_model(base, folders[0.0])
    for s in SPARSITIES:
        loaded = load_model(str(folders[0.0]), "bfloat16", runtime="dense")
        prune(loaded, None, PruneConfig("magnitude", Pattern(sparsity=s)), progress=False)
        folders[s] = save_model(loaded, work / f"packed-{s}", compressed=True)
    return folders


def model_rows(models: list[str], threads: list[int], args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="epts-decode-", dir=args.work) as tmp:
        for model in models:
            big = model == "llama-7b"
            folders = {} if big else prepare_folders(model, Path(tmp) / model)
            # Dense first and last: the faster of the two is the baseline, so a drift of the machine
            # during the run cannot favour the packed rows.
            variants = [("bfloat16", 0.0)] + ([] if big else [("float32", 0.0)]) + \
                [("bfloat16", s) for s in SPARSITIES] + [("bfloat16", 0.0)]
            for n in threads:
                for dtype, s in variants:
                    spec = {"model": model, "dtype": dtype, "sparsity": s, "threads": n,
                            "folder": str(folders.get(s, "")),
                            "prompt_tokens": args.big_prompt_tokens if big else args.prompt_tokens,
                            "new_tokens": args.big_new_tokens if big else args.new_tokens}
                    r = subprocess.run([sys.executable, "-m", "benchmarks.decode", "--one", json.dumps(spec)],
                                       capture_output=True, text=True)
                    if r.returncode != 0:
                        print(f"{model} {dtype} {s} failed:\n{r.stderr[-2000:]}", file=sys.stderr, flush=True)
                        continue
                    row = json.loads(r.stdout.strip().splitlines()[-1])
                    rows.append(row)
                    print(f"model {model} {dtype} s {s} threads {n}: {row['tokens_per_s']:.2f} tokens/s, peak RSS "
                          f"{row['peak_rss_mib']:.0f} MiB, weights {row['weights_mib']:.0f} MiB", flush=True)
    for row in rows:  # each model row against the fastest dense row of its model and threads
        dense = [r for r in rows if r["model"] == row["model"] and r["threads"] == row["threads"] and not r["sparsity"]]
        best = max(dense, key=lambda r: r["tokens_per_s"], default=None)
        bf16 = min((r for r in dense if r["dtype"] == "bfloat16"), key=lambda r: r["peak_rss_mib"], default=None)
        if best:
            row["dense_tokens_per_s"], row["sparse_tokens_per_s"] = best["tokens_per_s"], row["tokens_per_s"]
            row["speedup"] = row["tokens_per_s"] / best["tokens_per_s"]
        if bf16:
            row["dense_rss_mib"], row["sparse_rss_mib"] = bf16["peak_rss_mib"], row["peak_rss_mib"]
            row["rss_ratio"] = row["peak_rss_mib"] / bf16["peak_rss_mib"]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| kind | what | sparsity | threads | dense | sparse | speedup | limit / RSS ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "layer":
            lines.append(f"| layer | {r['shape']} bf16 | {r['sparsity']:g} | {r['threads']} | {r['dense_us']:.0f} us | "
                         f"{r['sparse_us']:.0f} us | {r['speedup']:.2f}x | {r['bytes_limit']:.2f}x |")
        elif r["sparsity"]:
            lines.append(f"| model | {r['model']} {r['dtype']} | {r['sparsity']:g} | {r['threads']} | "
                         f"{r.get('dense_tokens_per_s', float('nan')):.2f} tok/s | {r['tokens_per_s']:.2f} tok/s | "
                         f"{r.get('speedup', float('nan')):.2f}x | RSS {r.get('rss_ratio', float('nan')):.2f}x "
                         f"({r['peak_rss_mib']:.0f} MiB) |")
        else:
            lines.append(f"| model | {r['model']} {r['dtype']} | 0 (dense) | {r['threads']} | {r['tokens_per_s']:.2f} "
                         f"tok/s | - | - | RSS {r['peak_rss_mib']:.0f} MiB |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="all", help="all, or none")
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m,llama-7b",
                        help="comma-separated: smollm2-135m, gemma3-270m, llama-7b; or none")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--repeats", type=int, default=15, help="timed passes per layer candidate")
    parser.add_argument("--stream-mib", type=int, default=1024,
                        help="layers: copies of each weight past this many MiB, read from DRAM as in decode "
                             "(0: one cache-resident copy)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--big-prompt-tokens", type=int, default=32, help="LLaMA-7B shape: prompt tokens")
    parser.add_argument("--big-new-tokens", type=int, default=16, help="LLaMA-7B shape: new tokens")
    parser.add_argument("--work", default=None, help="scratch folder for the pruned real models (default TMPDIR)")
    parser.add_argument("--out", default="benchmarks/results/decode")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one model row, in a child process
    args = parser.parse_args(argv)
    if args.stream_mib < 0:
        parser.error(f"--stream-mib {args.stream_mib}: pass 0 (one cache-resident copy) or a positive size in MiB")
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0
    threads = [int(t) for t in args.threads.split(",")]
    rows = layer_rows(threads, args.repeats, args.stream_mib) if args.layers != "none" else []
    models = [] if args.models == "none" else args.models.split(",")
    rows += model_rows(models, threads, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"commit": commit(), "command": " ".join(["python -m benchmarks.decode", *(argv or sys.argv[1:])]),
              "torch": torch.__version__, "rows": rows}
    (out / "decode.json").write_text(json.dumps(result, indent=1))
    text = table(rows)
    (out / "decode.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
