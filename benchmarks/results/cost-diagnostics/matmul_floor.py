"""How close can the default compress come to the cost bar (8 SparseGPT runs)? The float32 matmuls
that METHOD.md's training does, measured in the real compress, against SparseGPT in the same process.

Run from the repository root, alone on the machine:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/results/cost-diagnostics/matmul_floor.py --blocks 3 \
        --out benchmarks/results/cost-diagnostics/matmul_floor.json

SparseGPT (one target, 0.5, every block) runs twice before the compress and once after; the first run
is a warm-up, left out of the comparison (37.6 s against 26.0 s for the next, in a first try). The compress of the first `--blocks` blocks runs once as it is and once
under a dispatch mode that counts every matmul operator's call by shapes (aten::mm, addmm, bmm,
baddbmm: the token matmuls forward and backward, the adapters' merges and gradients, the mixer's and
the dense pass's; torch.profiler with shapes ran out of 24 GB). Each distinct call is then replayed
alone on random float32 operands of its shapes, and its time multiplied by its count: the matmul time
of the compress, the part no reordering of the rest can remove in float32 (the replay's operands are
contiguous; the backward's are often transposed, which BLAS handles at about the same speed). Every
SmolLM2 block has the same shapes, so a block's cost times the block count is the whole model's.
"""
import argparse
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from epts.arch import decoder_blocks
from epts.baselines import prune
from epts.config import EPTSConfig, PruneConfig
from epts.io import write_json_atomic
from epts.models import load_model
from epts.reconstruct import compress

MATMULS = ("mm", "addmm", "bmm", "baddbmm")
TEXT = "../shared/data/wikitext2/wiki.valid.tokens"


class MatmulCounter(TorchDispatchMode):
    """Counts the matmul operators' calls by (name, operand shapes); tensors only, scalars left out."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMULS:
            self.calls[(name, tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))] += 1
        return func(*args, **(kwargs or {}))


def replayed_seconds(calls: Counter) -> float:
    """The time of every counted matmul call, each distinct one replayed alone on random float32
    operands and multiplied by its count."""
    total = 0.0
    for (name, shapes), count in calls.items():
        operands = [torch.randn(shape) for shape in shapes]
        op = getattr(torch.ops.aten, name)
        for _ in range(2):
            op(*operands)
        reps, start = 0, time.perf_counter()
        while reps < 5 or time.perf_counter() - start < 0.05:
            op(*operands)
            reps += 1
        total += (time.perf_counter() - start) / reps * count
    return total


def sparsegpt_seconds(model: str) -> float:
    return prune(load_model(model), TEXT, PruneConfig(method="sparsegpt", pattern=0.5), progress=False).seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    loaded = load_model(args.model)
    n_blocks = len(decoder_blocks(loaded.model))
    if not 1 <= args.blocks <= n_blocks:  # the per-block figures divide by it
        parser.error(f"--blocks must be in 1..{n_blocks} ({args.model}'s blocks), got {args.blocks}")
    sparsegpt = [sparsegpt_seconds(args.model) for _ in range(2)]
    start = time.perf_counter()
    plain = compress(loaded, TEXT, EPTSConfig(), progress=False, num_blocks=args.blocks)
    plain_seconds = time.perf_counter() - start
    with MatmulCounter() as counter:
        compress(loaded, TEXT, EPTSConfig(), progress=False, num_blocks=args.blocks)
    sparsegpt.append(sparsegpt_seconds(args.model))
    calls = sum(counter.calls.values())
    per_block = {
        "compress": sum(b.seconds for b in plain.blocks) / args.blocks,
        "matmul_replayed": replayed_seconds(counter.calls) / args.blocks,
    }
    sg = sum(sparsegpt[1:]) / len(sparsegpt[1:])  # the first run is a warm-up
    result = {"model": args.model, "blocks_measured": args.blocks, "blocks": n_blocks, "threads": 2,
              "sparsegpt_seconds": sparsegpt, "sparsegpt_seconds_compared": sg,
              "compress_seconds_measured_blocks": plain_seconds, "matmul_calls_per_block": calls / args.blocks,
              "per_block_seconds": per_block,
              "whole_model_in_sparsegpt_runs": {k: v * n_blocks / sg for k, v in per_block.items()}}
    print(f"SparseGPT, one target, {n_blocks} blocks: " + " / ".join(f"{s:.1f} s" for s in sparsegpt)
          + f" (the first a warm-up; compared: {sg:.1f} s)")
    print(f"| per block ({args.blocks} measured) | seconds | x {n_blocks} blocks, in SparseGPT runs |")
    print("|---|---|---|")
    for name, seconds in per_block.items():
        print(f"| {name} | {seconds:.2f} | {seconds * n_blocks / sg:.1f} |")
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
