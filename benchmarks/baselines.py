"""Single-sparsity baselines on PROTOCOL.md's protocol: dense, then magnitude / Wanda / SparseGPT at
every sparsity and 2:4. Each run is a fresh `epts` process, so its peak memory is its own.

    python -m benchmarks.baselines [--model smollm2-135m] [--max-windows 64] [--out benchmarks/results]

Prints a Markdown table and writes baselines.json and baselines.csv under --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2"
PATTERNS = ["0.3", "0.4", "0.5", "0.6", "0.7", "2:4"]
METHODS = ["magnitude", "wanda", "sparsegpt"]


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return r.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def epts(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "epts.cli", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"epts {' '.join(args)} failed:\n{r.stderr}")
    return r.stdout


def prune_report(*args: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        epts(*args, "--report", str(report))
        return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-windows", type=int, default=64, help="64 = quick protocol; 0 = every window")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense row (keep the stored one)")
    args = parser.parse_args()
    eval_args = ["--eval-seqlen", "512"] + (["--max-windows", str(args.max_windows)] if args.max_windows else [])
    calib = ["--calib", str(DATA / "wiki.valid.tokens"), "--nsamples", "32", "--seqlen", "256", "--seed", "0"]
    rev = commit()
    rows = []
    if not args.no_dense:
        dense_cmd = ["eval", "--model", args.model, "--data", str(DATA / "wiki.test.raw"), "--seqlen", "512",
                     *eval_args[2:]]
        dense_ppl = float(epts(*dense_cmd).split()[-1])
        rows.append({"method": "dense", "sparsity": "0", "ppl": dense_ppl, "seconds": 0.0, "peak_rss_mb": None,
                     "commit": rev, "command": "epts " + " ".join(dense_cmd)})
        print(f"dense: {dense_ppl:.3f}", flush=True)
    for method in args.methods.split(","):
        for pattern in args.patterns.split(","):
            target = ["--pattern", pattern] if ":" in pattern else ["--sparsity", pattern]
            cmd = ["prune", "--model", args.model, "--method", method, *target, *calib,
                   "--eval-data", str(DATA / "wiki.test.raw"), "--no-dense-eval", *eval_args]
            rep = prune_report(*cmd)
            rows.append({"method": method, "sparsity": pattern, "ppl": rep["ppl"], "seconds": rep["seconds"],
                         "peak_rss_mb": rep["peak_rss_mb"], "commit": rev, "command": "epts " + " ".join(cmd)})
            print(f"{method} {pattern}: ppl {rep['ppl']:.3f}, {rep['seconds']:.1f} s, "
                  f"{rep['peak_rss_mb']:.0f} MiB", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Rows measured now replace the same (method, sparsity) rows of an earlier run; the others stay.
    previous = json.loads((out / "baselines.json").read_text()) if (out / "baselines.json").is_file() else []
    fresh = {(r["method"], r["sparsity"]) for r in rows}
    rows = [r for r in previous if (r["method"], r["sparsity"]) not in fresh] + rows
    (out / "baselines.json").write_text(json.dumps(rows, indent=2) + "\n")
    with (out / "baselines.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n| method | sparsity | WikiText-2 ppl | prune s | peak RSS MiB |\n|---|---|---|---|---|")
    for r in rows:
        mem = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] else "-"
        print(f"| {r['method']} | {r['sparsity']} | {r['ppl']:.2f} | {r['seconds']:.1f} | {mem} |")


if __name__ == "__main__":
    main()
