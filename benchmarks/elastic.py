"""One EPTS compress run on PROTOCOL.md's protocol, materialised at every sparsity, beside the
single-sparsity baselines of `benchmarks.baselines` (read from --out if present).

    python -m benchmarks.elastic [--epochs 2] [--max-windows 64] [--out benchmarks/results]

Prints a Markdown table and writes elastic-e{epochs}.json under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.baselines import DATA, commit

SPARSITIES = [0.3, 0.4, 0.5, 0.6, 0.7]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-windows", type=int, default=64, help="64 = quick protocol; 0 = every window")
    parser.add_argument("--artifact", default="runs/bench-epts", help="where the artifact is written")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    rev = commit()
    cmd = ["compress", "--model", args.model, "--calib", str(DATA / "wiki.valid.tokens"), "--nsamples", "32",
           "--seqlen", "256", "--epochs", str(args.epochs), "--seed", "0", "--out", args.artifact, "--overwrite"]
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "epts.cli", *cmd], stderr=subprocess.DEVNULL)
    if r.returncode:
        sys.exit(f"epts {' '.join(cmd)} failed")
    wall = time.perf_counter() - start
    manifest = json.loads((Path(args.artifact) / "manifest.json").read_text())
    print(f"compress: {wall:.0f} s wall ({manifest['stats']['compress_seconds']:.0f} s optimisation), "
          f"peak RSS {manifest['stats']['peak_rss_mb']:.0f} MiB", flush=True)

    from epts import ElasticModel, evaluate_ppl

    elastic = ElasticModel.load(args.artifact)
    rows = []
    for s in SPARSITIES:
        t0 = time.perf_counter()
        model = elastic.materialize(s)
        seconds = time.perf_counter() - t0
        ppl = evaluate_ppl(model, DATA / "wiki.test.raw", 512, args.max_windows or None, progress=False)
        rows.append({"method": "epts", "sparsity": str(s), "ppl": ppl, "materialize_seconds": seconds,
                     "compress_seconds": manifest["stats"]["compress_seconds"], "compress_wall": wall,
                     "peak_rss_mb": manifest["stats"]["peak_rss_mb"], "epochs": args.epochs, "commit": rev,
                     "command": "epts " + " ".join(cmd)})
        print(f"epts {s}: ppl {ppl:.3f} (materialised in {seconds:.2f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"elastic-e{args.epochs}.json").write_text(json.dumps(rows, indent=2) + "\n")

    baselines = out / "baselines.json"
    ref = {}
    if baselines.is_file():
        for row in json.loads(baselines.read_text()):
            ref[(row["method"], row["sparsity"])] = row["ppl"]
    print("\n| sparsity | EPTS | Wanda | SparseGPT | magnitude |\n|---|---|---|---|---|")
    for row in rows:
        cells = [f"{ref[(m, row['sparsity'])]:.2f}" if (m, row["sparsity"]) in ref else "-"
                 for m in ("wanda", "sparsegpt", "magnitude")]
        print(f"| {row['sparsity']} | {row['ppl']:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
