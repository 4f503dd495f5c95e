"""The quality rows of a `benchmarks.experiments` run in the shape BENCHMARKS.md's tables cite:
`benchmarks/results/quality/<model>.json`, a list `rows` of {method, variant, sparsity, text, ppl,
windows, commit}, where method "epts" is what the default `epts export` writes (the variant named
by --default), "sparsegpt" the baseline, and "epts-variant" every other epts row (in place, other
refit modes, other recipes).

    python -m benchmarks.quality_json OUT/rows.jsonl --default default+refit-auto \
        --model smollm2-135m --to benchmarks/results/quality/smollm2-135m.json

Window counts come from each row's recorded command (the harness's own flags).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import tempfile
from pathlib import Path

TEXTS = {"heldout": "heldout", "other": "other-domain", "test": "wikitext2-test"}


def window_counts(command: str) -> dict[str, int]:
    """Windows per text that the harness command evaluated on."""
    from benchmarks.experiments import parser

    args = parser().parse_args(shlex.split(command)[3:])
    return {"heldout": args.heldout_windows, "other": args.other_windows, "test": args.test_windows}


def convert(rows: list[dict], default: str) -> list[dict]:
    out = []
    for r in rows:
        if r["variant"] == "dense":
            method = "dense"
        elif r["variant"] == "sparsegpt":
            method = "sparsegpt"
        else:
            method = "epts" if r["variant"] == default else "epts-variant"
        counts = window_counts(r["command"])
        for key, text in TEXTS.items():
            if f"ppl_{key}" in r:
                out.append({"method": method, "variant": r["variant"], "sparsity": r["sparsity"], "text": text,
                            "ppl": r[f"ppl_{key}"], "windows": counts[key], "commit": r["commit"],
                            "scope": r["scope"]})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rows", type=Path, help="a harness run's rows.jsonl")
    p.add_argument("--default", required=True, help="the variant that is the default export")
    p.add_argument("--model", required=True)
    p.add_argument("--to", type=Path, required=True)
    args = p.parse_args(argv)
    if not args.rows.is_file():
        raise SystemExit(f"{args.rows}: no such rows file; pass the rows.jsonl a benchmarks.experiments run wrote")
    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    if not any(r["variant"] == args.default for r in rows):
        raise SystemExit(f"{args.rows}: no row of variant {args.default!r}; pass one of "
                         f"{', '.join(sorted({r['variant'] for r in rows}))}")
    payload = {"model": args.model, "default": args.default, "rows": convert(rows, args.default)}
    args.to.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.to.parent, suffix=".tmp", delete=False) as f:
        json.dump(payload, f, indent=1)
    os.replace(f.name, args.to)


if __name__ == "__main__":
    main()
