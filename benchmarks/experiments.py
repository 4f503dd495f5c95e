"""Experiment harness for elastic quality: named variants, each a config file, compared
with SparseGPT and Wanda on the same blocks and the same held-out text.

    python -m benchmarks.experiments benchmarks/experiments/*.yaml --blocks 6     # cheap proxy
    python -m benchmarks.experiments benchmarks/experiments/default.yaml          # every block
    python -m benchmarks.experiments ... --test     # also WikiText-2 test (final report only)
    python -m benchmarks.experiments ... --other-text OTHER.txt   # also a held-out text of another domain

Variants are chosen on held-out windows of the calibration file (`wiki.valid.tokens`) that no
calibration window overlaps, never on WikiText-2 test. `--blocks N` compresses (and prunes, for
the baselines) only the first N blocks and leaves the rest dense: the cheap proxy. Each variant
file holds EPTSConfig fields (see epts/config.py), an optional `description` and an optional
`calibration: self-generated` (windows the model writes itself, `epts.selfcal`, instead of windows of
the calibration file; the held-out windows stay the same). Rows are appended
to OUT/rows.jsonl as they finish (a rerun skips what is there); OUT/results.md is the table, each
row with its command and commit.

`--other-text PATH` also scores every variant and baseline on the first `--other-windows`
non-overlapping windows of another text (`benchmarks/other_domain.py` builds one that is not
Wikipedia), the column `other` beside `heldout`. `--refit` takes modes (none, bare, block, auto, all), a
mode with a ridge toward the merged weights (`all:ridge=1`, `RefitConfig.ridge`), a mode with the
masks of the blocks it re-solves (`auto:mask=obs`, `RefitConfig.mask`), auto without SparseGPT's
solution for every block as a candidate (`auto:sparsegpt=0`, `RefitConfig.sparsegpt`), auto with
another end-to-end tuning (`auto:tune_epochs=2`, `auto:tune_step=0.1`), or `ridge:X`, short for `all:ridge=X`. `--allocation owl` spreads each global sparsity over the blocks
by OWL's outlier ratios (`epts.allocation.allocate`, the baselines' `PruneConfig.allocation`) for every
row, in place, exported and baseline alike; its rows are named NAME+owl.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from benchmarks.run import DATA, commit
from epts.config import RefitConfig
from epts.data import heldout_windows

log = logging.getLogger("benchmarks.experiments")

BASELINES = ("sparsegpt", "wanda")


def heldout_text(tokens: torch.Tensor, nsamples: int, seqlen: int, seeds: int | list[int], eval_seqlen: int,
                 count: int) -> torch.Tensor:
    """`count` windows of `eval_seqlen` tokens free of the calibration windows of every seed in
    `seeds`, from the end of the file backwards (`data.heldout_windows`; the export's refit choice
    takes its own from the start)."""
    windows = heldout_windows(tokens, nsamples, seqlen, seeds, count, eval_seqlen, from_end=True)
    if len(windows) < count:
        raise ValueError(f"only {len(windows)} held-out windows of {eval_seqlen} tokens are free of calibration")
    return windows


def load_variant(path: Path) -> tuple[str, str, str, dict]:
    """(name, description, calibration: "file" or "self-generated", EPTSConfig fields)."""
    import yaml

    fields = yaml.safe_load(path.read_text()) or {}
    description = fields.pop("description", "")
    calibration = fields.pop("calibration", "file")
    if calibration not in ("file", "self-generated"):
        raise ValueError(f"{path}: calibration {calibration!r} is not file or self-generated")
    return path.stem, description, calibration, fields


class Store:
    """Rows by key in OUT/rows.jsonl, appended as they are made."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.file = out / "rows.jsonl"
        self.rows = [json.loads(x) for x in self.file.read_text().splitlines()] if self.file.is_file() else []

    def has(self, key: str) -> bool:
        return any(r["key"] == key for r in self.rows)

    def add(self, rows: list[dict]) -> None:
        with self.file.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        self.rows += rows


def evaluate(loaded, texts: dict[str, torch.Tensor]) -> dict[str, float]:
    from epts.evaluate import mean_nll

    return {name: math.exp(mean_nll(loaded.model, windows)) for name, windows in texts.items()}


def run(args) -> None:
    from epts.baselines import prune
    from epts.config import CalibConfig, EPTSConfig, PruneConfig
    from epts.data import calibration_windows, eval_windows, tokenize
    from epts.importance import Pattern
    from epts.models import LoadedModel, load_model
    from epts.allocation import allocate
    from epts.artifact import ElasticModel
    from epts.runtime import RuntimeModel
    from epts.reconstruct import compress
    from epts.refit import refit
    from epts.selfcal import generate_windows

    torch.set_num_threads(args.threads or torch.get_num_threads())
    store = Store(args.out)
    sha = commit()
    command = shlex.join(["python", "-m", "benchmarks.experiments", *sys.argv[1:]])
    base = load_model(args.model)
    cc = CalibConfig(nsamples=args.nsamples, seqlen=args.seqlen)
    valid = tokenize(base.tokenizer, args.calib, role="calib")
    variants = [load_variant(path) for path in args.variants]
    counts = {name: (fields.get("calib") or {}).get("nsamples", cc.nsamples) for name, _, _, fields in variants}
    # Held-out windows avoid every window any variant here calibrates on (the sampler's windows for
    # n samples are the first n of those for more), so a 64-window variant is not scored on its own data.
    exclude = max([cc.nsamples, *counts.values()])
    # ... nor on the windows of another seed (a variant's `calib: {seed: ...}` draws other windows).
    seeds = sorted({cc.seed, *((fields.get("calib") or {}).get("seed", cc.seed) for _, _, _, fields in variants)})
    texts = {"heldout": heldout_text(valid, exclude, cc.seqlen, seeds, args.eval_seqlen, args.heldout_windows)}
    if args.other_text:
        texts["other"] = eval_windows(tokenize(base.tokenizer, args.other_text), args.eval_seqlen, args.other_windows)
    if args.test:
        texts["test"] = eval_windows(tokenize(base.tokenizer, args.test_data), args.eval_seqlen, args.test_windows)
    scope = f"blocks={args.blocks or 'all'}" + (f",heldout-excludes={exclude}" if exclude != cc.nsamples else "") \
        + (f",heldout-seeds={'+'.join(map(str, seeds))}" if seeds != [cc.seed] else "")

    def row(variant, sparsity, ppl, seconds, extra=None):
        return {"key": f"{variant}|{scope}|{sparsity}|{','.join(sorted(texts))}", "variant": variant, "scope": scope,
                "sparsity": sparsity, **{f"ppl_{k}": v for k, v in ppl.items()}, "compress_seconds": seconds,
                "commit": sha, "command": command, **(extra or {})}

    if not store.has(row("dense", 0.0, {}, None)["key"]):
        store.add([row("dense", 0.0, evaluate(base, texts), None)])
    owl = "+owl" if args.allocation == "owl" else ""
    for method in args.baselines:
        for s in args.sparsities:
            if store.has(row(method + owl, s, {}, None)["key"]):
                continue
            pruned = LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.spec)
            report = prune(pruned, calibration_windows(valid, cc.nsamples, cc.seqlen, cc.seed),
                           PruneConfig(method, Pattern(sparsity=s), cc, allocation=args.allocation),
                           num_blocks=args.blocks)
            store.add([row(method + owl, s, evaluate(pruned, texts), report.seconds,
                           {"block_sparsity": report.block_sparsity} if owl else None)])
            log.info("%s %g: %s", method + owl, s, store.rows[-1])
            del pruned
    for name, description, calibration, fields in variants:
        refits = [parse_refit(token, args.refit_iters, args.refit_margin) for token in args.refit]
        names = [name + owl] + [refit_variant_name(name + owl, r) for r in refits]
        if all(store.has(row(n, s, {}, None)["key"]) for n in names for s in args.sparsities):
            continue
        config = EPTSConfig.from_dict({**fields, "calib": {"seqlen": cc.seqlen, **(fields.get("calib") or {}),
                                                            "nsamples": counts[name]}})
        # The variant's own seed (`calib: {seed: ...}`) draws its windows, as `epts compress --seed` does, so that
        # the artifact's recorded calibration is the one it trained on.
        seed = config.calib.seed
        if calibration == "self-generated":
            windows = generate_windows(base.model, base.tokenizer, counts[name], cc.seqlen, seed,
                                       progress=not args.quiet)
        else:
            windows = calibration_windows(valid, counts[name], cc.seqlen, seed)
        # What `epts export` holds out for its refit choice: windows of the calibration text from its
        # start (the scores' held-out windows come from its end); none for self-generated windows.
        choice = None if calibration == "self-generated" else heldout_windows(
            valid, counts[name], cc.seqlen, seed, RefitConfig.compare_windows)
        kept = args.out / "artifacts" / name
        if args.keep_artifacts and (kept / "manifest.json").is_file():
            elastic = ElasticModel.load(kept, base=base)  # a rerun (e.g. with --refit) reuses the kept artifact
            seconds = elastic.stats["compress_seconds"]
        else:
            start = time.perf_counter()
            elastic = compress(base, windows, config, progress=not args.quiet, num_blocks=args.blocks)
            seconds = time.perf_counter() - start
            if args.keep_artifacts:
                elastic.save(kept)
        runtime = RuntimeModel(elastic)
        marks = sum(b.group1_adapter for b in elastic.blocks)
        extra = {"description": description, "config": fields, "calibration": calibration, "group1_kept": marks,
                 "losses": [b.losses for b in elastic.blocks]}
        # OWL's plan depends on the artifact and the budget alone: made once per sparsity, not per row.
        plans = {s: allocate(elastic, s, "owl") if owl else s for s in args.sparsities}
        for variant, refit_config in zip(names, [None, *refits]):
            rows = []
            for s in args.sparsities:
                if store.has(row(variant, s, {}, None)["key"]):
                    continue
                runtime.set_sparsity(plans[s])
                info = {"block_sparsity": [runtime.sparsity[b] for b in sorted(runtime.sparsity)]} if owl else {}
                if refit_config is not None:
                    report = refit(elastic, runtime.loaded, runtime.sparsity, windows, refit_config,
                                   progress=not args.quiet, heldout=choice)
                    info["refit"] = report.to_dict()
                rows.append(row(variant, s, evaluate(runtime.loaded, texts), seconds, {**extra, **info}))
                log.info("%s %g: %s", variant, s, {k: v for k, v in rows[-1].items() if k.startswith("ppl")})
            store.add(rows)
        del runtime, elastic
    write_table(store.rows, args.out / "results.md", args.sparsities)


def refit_variant_name(name: str, r: RefitConfig) -> str:
    """The row name of variant `name` exported with `r`: its mode, then each setting off the default."""
    return (f"{name}+refit-{r.mode}" + (f"-i{r.iters}" if r.iters != RefitConfig.iters else "")
            + (f"-m{r.margin:g}" if r.mode == "block" and r.margin else "")
            + (f"-r{r.ridge:g}" if r.ridge else "")
            + (f"-mask-{r.mask}" if r.mask != RefitConfig.mask else "")
            + ("-no-sparsegpt" if r.mode == "auto" and not r.sparsegpt else "")
            + (f"-te{r.tune_epochs}" if r.tune_epochs != RefitConfig.tune_epochs else "")
            + (f"-ts{r.tune_step:g}" if r.tune_step != RefitConfig.tune_step else ""))


def parse_refit(token: str, iters: int, margin: float) -> RefitConfig:
    """A `--refit` token: MODE, MODE:ridge=X, MODE:mask=M (`RefitConfig.mask`), auto:sparsegpt=0
    (`RefitConfig.sparsegpt` off), auto:tune_epochs=N or auto:tune_step=X (the end-to-end tuning's
    `RefitConfig.tune_epochs` / `tune_step`), or ridge:X (= all:ridge=X). Raises ValueError on another form."""
    mode, _, option = token.partition(":")
    if mode == "ridge":
        return RefitConfig("all", iters, margin, ridge=option)
    fields = {}
    if option:
        key, _, value = option.partition("=")
        if key not in ("ridge", "mask", "sparsegpt", "tune_epochs", "tune_step") or not value:
            raise ValueError(f"--refit token {token!r}: expected MODE, MODE:ridge=X, MODE:mask=M, auto:sparsegpt=0, "
                             f"auto:tune_epochs=N, auto:tune_step=X or ridge:X")
        fields[key] = value
    try:
        return RefitConfig(mode, iters, margin, **fields)  # it converts each value to its field's type
    except ValueError as e:
        raise ValueError(f"--refit token {token!r}: {e}") from None


def write_table(rows: list[dict], path: Path, sparsities: list[float]) -> None:
    by = {}
    for r in rows:
        by.setdefault((r["variant"], r["scope"]), {})[r["sparsity"]] = r
    lines = []
    for text in ("heldout", "other", "test"):
        if not any(f"ppl_{text}" in r for r in rows):
            continue
        lines += [f"### perplexity on {text}", "",
                  "| variant | scope | " + " | ".join(f"{s:g}" for s in sparsities) + " | compress s | commit |",
                  "|---|---|" + "---|" * (len(sparsities) + 2)]
        for (variant, scope), cells in by.items():
            if variant == "dense":
                continue
            ref = by.get(("sparsegpt", scope), {})
            vals = []
            for s in sparsities:
                r = cells.get(s)
                if r is None or f"ppl_{text}" not in r:
                    vals.append("-")
                    continue
                v = r[f"ppl_{text}"]
                rv = ref.get(s, {}).get(f"ppl_{text}")
                vals.append(f"{v:.2f}" + (f" ({100 * (v / rv - 1):+.1f} %)" if rv and variant != "sparsegpt" else ""))
            first = next(iter(cells.values()))
            secs = first.get("compress_seconds")
            if variant in BASELINES:
                secs = sum(c.get("compress_seconds") or 0 for c in cells.values())
            secs_text = "-" if secs is None else f"{secs:.0f}"
            lines.append(f"| {variant} | {scope} | " + " | ".join(vals) + f" | {secs_text} | {first['commit']} |")
        dense = [r for r in rows if r["variant"] == "dense" and f"ppl_{text}" in r]
        if dense:
            lines.append(f"\ndense: {dense[-1][f'ppl_{text}']:.2f}\n")
    if any("ppl_other" in r for r in rows):  # the two held-out texts side by side
        lines += ["### perplexity on heldout / other", "",
                  "| variant | scope | " + " | ".join(f"{s:g}" for s in sparsities) + " |",
                  "|---|---|" + "---|" * len(sparsities)]
        for (variant, scope), cells in by.items():
            vals = []
            for s in sparsities:
                r = cells.get(0.0 if variant == "dense" else s) or {}
                pair = [r.get(f"ppl_{t}") for t in ("heldout", "other")]
                vals.append(" / ".join("-" if v is None else f"{v:.2f}" for v in pair))
            lines.append(f"| {variant} | {scope} | " + " | ".join(vals) + " |")
        lines.append("")
    commands = dict.fromkeys(r["command"] for r in rows)
    lines += ["commands:", "", *[f"    {c}" for c in commands]]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive count")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", type=Path, help="variant config files (EPTSConfig fields)")
    p.add_argument("--blocks", type=int, default=None, help="compress only the first N blocks (proxy)")
    p.add_argument("--sparsities", type=lambda t: [float(x) for x in t.split(",")], default=[0.3, 0.4, 0.5, 0.6, 0.7])
    p.add_argument("--baselines", type=lambda t: [x for x in t.split(",") if x], default=list(BASELINES))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", type=Path, default=DATA / "wiki.valid.tokens")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--heldout-windows", type=positive_int, default=32)
    p.add_argument("--other-text", type=Path, default=None,
                   help="also evaluate on this text of another domain (benchmarks/other_domain.py builds one)")
    p.add_argument("--other-windows", type=positive_int, default=64, help="windows of --other-text, from its start")
    p.add_argument("--test", action="store_true", help="also evaluate on WikiText-2 test (final table only)")
    p.add_argument("--test-data", type=Path, default=DATA / "wiki.test.raw")
    p.add_argument("--keep-artifacts", action="store_true",
                   help="save each variant's artifact in OUT/artifacts/NAME (and reuse it when it is there)")
    p.add_argument("--test-windows", type=positive_int, default=64,
                   help="windows of --test-data, from its start (64 is the protocol; fewer for a slow vocabulary)")
    p.add_argument("--refit", type=lambda t: [x for x in t.split(",") if x and x != "none"], default=[],
                   help="also evaluate each variant exported with these refit modes (auto,all: epts.refit)")
    p.add_argument("--refit-iters", type=int, default=RefitConfig.iters, help="refit: least-squares steps")
    p.add_argument("--refit-margin", type=float, default=0.0, help="refit auto: error drop to replace adapters")
    p.add_argument("--allocation", choices=("uniform", "owl"), default="uniform",
                   help="spread each global sparsity over the blocks: uniform, or by OWL's outlier ratios "
                        "(rows NAME+owl; not with --blocks)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/experiments"))
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.allocation == "owl" and args.blocks:
        p.error("--allocation owl spreads the budget over every block of the model; a --blocks proxy leaves the "
                "rest dense: drop one of the two")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run(args)


if __name__ == "__main__":
    main()
