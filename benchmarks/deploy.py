"""Deployment from one artifact: run-time switching time, and perplexity at a global budget for
uniform, OWL and search allocation (PROTOCOL.md quick protocol).

    python -m benchmarks.deploy --artifact runs/bench-epts [--budgets 0.6,0.65] [--search-seconds 120]

Prints a Markdown table and writes deploy.json under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.baselines import DATA, commit
from epts import ElasticModel, evaluate_ppl
from epts.allocation import allocate, pruned_fraction, search
from epts.data import calibration_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", default="runs/bench-epts")
    parser.add_argument("--budgets", default="0.6,0.65")
    parser.add_argument("--search-seconds", type=float, default=120.0)
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    elastic = ElasticModel.load(args.artifact)
    runtime = elastic.to_runtime(0.3)
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
    result = {"commit": commit(), "artifact": args.artifact, "switch_seconds": switches, "rows": rows}
    (out / "deploy.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n| global sparsity | allocation | ppl | block range |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']} | {r['allocation']} | {r['ppl']:.2f} | {r['min_block']:.3f}-{r['max_block']:.3f} |")


if __name__ == "__main__":
    main()
