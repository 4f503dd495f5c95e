"""Deployment from one artifact: run-time switching time, and perplexity at a global budget for
uniform, OWL and search allocation (PROTOCOL.md quick protocol).

    python -m benchmarks.deploy --artifact runs/bench-epts [--budgets 0.6,0.65] [--search-seconds 120]
        [--sizes 0.5,0.7] [--out-name deploy.json]

Also exports the artifact at each --sizes sparsity, dense and compressed (sparse-bitmask), checks
that the compressed folder loads back to the same weights, and reports both sizes on disk.
Prints Markdown tables and writes --out-name under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.run import DATA, commit
from epts import ElasticModel, RuntimeModel, evaluate_ppl
from epts.allocation import allocate, pruned_fraction, search
from epts.data import calibration_set
from epts.models import load_model, save_model, weights_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default="runs/bench-epts")
    parser.add_argument("--budgets", default="0.6,0.65")
    parser.add_argument("--search-seconds", type=float, default=120.0)
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--sizes", default="0.5,0.7", help="sparsities whose dense and compressed exports are sized")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--out-name", default="deploy.json")
    args = parser.parse_args()
    elastic = ElasticModel.load(args.artifact)
    runtime = RuntimeModel(elastic, 0.3)
    switches = []
    for s in (0.5, 0.7, 0.3, 0.6, 0.4, 0.7, 0.5, 0.3):
        start = time.perf_counter()
        runtime.set_sparsity(s)
        switches.append(time.perf_counter() - start)
    print(f"switch: median {statistics.median(switches):.3f} s, max {max(switches):.3f} s over {len(switches)}",
          flush=True)
    windows = calibration_set(elastic.base.tokenizer, DATA / "wiki.valid.tokens", 8, 256, seed=0)
    rows = []
    for budget in (float(b) for b in args.budgets.split(",")):
        for method in ("uniform", "owl", "search"):
            extra = {}
            if method == "search":
                found = search(elastic, budget, windows, allocate(elastic, budget, "owl"), seconds=args.search_seconds)
                plan = found.plan
                extra = {"search_evaluations": found.evaluations, "search_accepted": found.accepted,
                         "search_loss": [found.start_loss, found.loss]}
            else:
                plan = allocate(elastic, budget, method)
            runtime.set_sparsity(plan)
            ppl = evaluate_ppl(runtime.loaded, DATA / "wiki.test.raw", 512, args.max_windows, progress=False)
            rows.append({"budget": budget, "allocation": method, "ppl": ppl, "achieved": pruned_fraction(elastic, plan),
                         "min_block": min(plan.values()), "max_block": max(plan.values()), **extra})
            print(f"{budget} {method}: ppl {ppl:.3f} (blocks {min(plan.values()):.3f}-{max(plan.values()):.3f})",
                  flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [export_sizes(elastic, float(s)) for s in args.sizes.split(",") if s]
    result = {"commit": commit(), "artifact": args.artifact, "switch_seconds": switches, "rows": rows, "sizes": sizes}
    (out / args.out_name).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| global sparsity | allocation | ppl | block range |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']} | {r['allocation']} | {r['ppl']:.2f} | {r['min_block']:.3f}-{r['max_block']:.3f} |")
    print("\n| sparsity | dense MiB | compressed MiB | ratio | save s (dense / compressed) | load s (compressed) |")
    print("|---|---|---|---|---|---|")
    for r in sizes:
        print(f"| {r['sparsity']} | {r['dense_mb']:.1f} | {r['compressed_mb']:.1f} | "
              f"{r['compressed_mb'] / r['dense_mb']:.3f} | {r['dense_save_s']:.1f} / {r['compressed_save_s']:.1f} | "
              f"{r['compressed_load_s']:.1f} |")


def export_sizes(elastic: ElasticModel, sparsity: float) -> dict:
    """Weights on disk of the dense and the compressed export at `sparsity`, after checking that
    the compressed one loads back to the same tensors."""
    model = elastic.materialize(sparsity)
    row = {"sparsity": sparsity}
    with tempfile.TemporaryDirectory(dir="runs") as tmp:
        for kind in ("dense", "compressed"):
            start = time.perf_counter()
            folder = save_model(model, Path(tmp) / kind, compressed=kind == "compressed")
            row[f"{kind}_save_s"] = time.perf_counter() - start
            row[f"{kind}_mb"] = weights_mib(folder)
        start = time.perf_counter()
        back = load_model(Path(tmp) / "compressed").model.state_dict()
        row["compressed_load_s"] = time.perf_counter() - start
    ref = model.model.state_dict()
    if back.keys() != ref.keys() or not all(torch.equal(back[k], ref[k]) for k in ref):
        raise SystemExit(f"compressed export at {sparsity} did not load back to the same weights")
    print(f"export {sparsity}: dense {row['dense_mb']:.1f} MiB, compressed {row['compressed_mb']:.1f} MiB", flush=True)
    return row


if __name__ == "__main__":
    main()
