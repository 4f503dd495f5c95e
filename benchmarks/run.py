"""The benchmark suite: EPTS against single-sparsity methods on PROTOCOL.md's protocol.

    python -m benchmarks.run --suite quick       # ~53 min here; results in benchmarks/results/
    python -m benchmarks.run --suite standard    # --preset paper (METHOD.md, 10 epochs), every eval window; long
    python -m benchmarks.run --suite smoke --model DIR --calib FILE --eval FILE --out DIR   # CI

Runs dense; magnitude, Wanda and SparseGPT once per sparsity (and 2:4); one EPTS compress run
evaluated at every sparsity; single-sparsity block-wise LoRA reconstruction (the EPTS machinery
with one group) at 0.5 and 0.7; and with --peer, llm-compressor's Wanda and SparseGPT in the venv
of benchmarks/peer/setup.sh (minutes per run here, so not part of the quick suite by default).
Every job is a fresh process (its peak RSS is its own) whose log goes to OUT/logs/. Rows are appended to OUT/rows.jsonl as jobs finish, so `--resume` skips
finished jobs after an interruption; at the end results.json, results.csv, results.md and the
two plots are written to OUT.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext2"
PEER_PYTHON = ROOT / "benchmarks" / "peer" / ".venv" / "bin" / "python"
PEER_SCRIPT = ROOT / "benchmarks" / "peer" / "llmcompressor_check.py"
COLUMNS = ["method", "sparsity", "ppl", "zeroshot_acc", "zeroshot_acc_norm", "compress_seconds", "materialize_seconds",
           "peak_rss_mb", "commit", "command"]

log = logging.getLogger("benchmarks.run")


@dataclass(frozen=True)
class Suite:
    sparsities: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
    patterns: tuple[str, ...] = ("2:4",)  # N:M patterns for the single-sparsity baselines
    methods: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")
    single: tuple[float, ...] = (0.5, 0.7)  # single-sparsity LoRA reconstruction targets
    epochs: int = 2
    preset: str = "default"  # epts compress --preset: the recipe of docs/RECIPE.md, or "paper" (METHOD.md)
    nsamples: int = 32
    seqlen: int = 256
    eval_seqlen: int = 512
    max_windows: int | None = 64


SUITES = {
    "quick": Suite(),
    "standard": Suite(epochs=10, preset="paper", max_windows=None),  # METHOD.md as written, PROTOCOL.md's full evaluation
    "smoke": Suite(sparsities=(0.3, 0.6), patterns=(), single=(0.6,), epochs=1, nsamples=4, seqlen=64,
                   eval_seqlen=64, max_windows=4),
}


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT)
    return (r.stdout.strip() or "unknown") + ("-dirty" if dirty.stdout.strip() else "")


class Runner:
    """Runs each job once, in its own process, and keeps its rows in OUT/rows.jsonl."""

    def __init__(self, out: Path, resume: bool):
        self.out = out
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.rows_file = out / "rows.jsonl"
        if not resume:
            self.rows_file.unlink(missing_ok=True)
        self.done: dict[str, list[dict]] = {}
        if self.rows_file.is_file():
            for line in self.rows_file.read_text().splitlines():
                entry = json.loads(line)
                self.done[entry["job"]] = entry["rows"]

    def process(self, job: str, argv: list[str]) -> None:
        """Run argv with its output in OUT/logs/JOB.log."""
        with (self.out / "logs" / f"{job}.log").open("w") as logf:
            r = subprocess.run(argv, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
        if r.returncode:
            raise RuntimeError(f"job {job} failed (exit {r.returncode}): see {self.out / 'logs' / f'{job}.log'}")

    def job(self, name: str, make_rows) -> list[dict]:
        if name in self.done:
            log.info("%s: done earlier, skipped", name)
            return self.done[name]
        log.info("%s: running", name)
        start = time.perf_counter()
        rows = make_rows()
        with self.rows_file.open("a") as f:
            f.write(json.dumps({"job": name, "rows": rows}) + "\n")
        self.done[name] = rows
        for row in rows:
            log.info("%s: %s %s ppl %.3f (%.0f s)", name, row["method"], row["sparsity"], row["ppl"],
                     time.perf_counter() - start)
        return rows


def epts_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "epts.cli", *args]


def run_suite(suite: Suite, model: str, calib: Path, eval_data: Path, out: Path, work: Path, resume: bool,
              peer: list[float], zeroshot: list[str] | None = None) -> list[dict]:
    """`zeroshot`: `epts eval` arguments (--tasks LOCAL_TASK [--limit N]) that add the zero-shot
    accuracy of every model to its row; the single-sparsity baselines are then saved and evaluated
    in a second process each."""
    zeroshot = zeroshot or []
    runner = Runner(out, resume)
    rev = commit()
    calib_args = ["--calib", str(calib), "--nsamples", str(suite.nsamples), "--seqlen", str(suite.seqlen), "--seed", "0"]
    windows = ["--max-windows", str(suite.max_windows)] if suite.max_windows else []
    eval_args = ["--eval-seqlen", str(suite.eval_seqlen), *windows]  # for prune
    eval_model_args = ["--data", str(eval_data), "--seqlen", str(suite.eval_seqlen), *windows]  # for eval
    report = work / "report.json"
    work.mkdir(parents=True, exist_ok=True)

    def row(method, sparsity, ppl, command, compress=None, materialize=None, rss=None, accuracy=None) -> dict:
        return {"method": method, "sparsity": str(sparsity), "ppl": ppl,
                "zeroshot_acc": (accuracy or {}).get("acc"), "zeroshot_acc_norm": (accuracy or {}).get("acc_norm"),
                "compress_seconds": compress, "materialize_seconds": materialize, "peak_rss_mb": rss, "commit": rev,
                "command": " ".join(command)}

    def dense():
        cmd = ["eval", "--model", model, *eval_model_args, *zeroshot, "--report", str(report)]
        runner.process("dense", epts_argv(*cmd))
        rep = json.loads(report.read_text())
        return [row("dense", 0, rep["rows"][0]["ppl"], ["epts", *cmd[:-2]], rss=rep["peak_rss_mb"],
                    accuracy=next(iter(rep["zeroshot"]), None))]

    rows = runner.job("dense", dense)

    for method in suite.methods:
        for target in [str(s) for s in suite.sparsities] + list(suite.patterns):
            def baseline(method=method, target=target):
                flag = "--pattern" if ":" in target else "--sparsity"
                cmd = ["prune", "--model", model, "--method", method, flag, target, *calib_args,
                       "--eval-data", str(eval_data), "--no-dense-eval", *eval_args, "--report", str(report)]
                pruned = work / f"{method}-{target.replace(':', 'of')}"
                saved = ["--out", str(pruned), "--overwrite"] if zeroshot else []
                runner.process(f"{method}-{target}", epts_argv(*cmd, *saved))
                rep = json.loads(report.read_text())
                accuracy = None
                if zeroshot:
                    zeroshot_report = work / "zeroshot.json"
                    runner.process(f"{method}-{target}-zeroshot", epts_argv(
                        "eval", "--model", str(pruned), *zeroshot, "--report", str(zeroshot_report)))
                    accuracy = json.loads(zeroshot_report.read_text())["zeroshot"][0]
                    shutil.rmtree(pruned)
                return [row(method, target, rep["ppl"], ["epts", *cmd[:-2]], compress=rep["seconds"],
                            rss=rep["peak_rss_mb"], accuracy=accuracy)]

            rows += runner.job(f"{method}-{target.replace(':', 'of')}", baseline)

    def elastic(name: str, method: str, sparsities, config: Path | None):
        artifact = work / name
        cmd = ["compress", "--model", model, *calib_args, "--preset", suite.preset, "--epochs", str(suite.epochs),
               "--out", str(artifact),
               "--overwrite", *(["--config", str(config)] if config else [])]
        runner.process(f"{name}-compress", epts_argv(*cmd))
        stats = json.loads((artifact / "manifest.json").read_text())["stats"]
        ev = ["eval", str(artifact), "--sparsity", ",".join(str(s) for s in sparsities), *eval_model_args,
              *zeroshot, "--report", str(report)]
        runner.process(f"{name}-eval", epts_argv(*ev))
        rep = json.loads(report.read_text())
        accuracy = {r["sparsity"]: r for r in rep["zeroshot"]}
        return [row(method, r["sparsity"], r["ppl"], ["epts", *cmd], compress=stats["compress_seconds"],
                    materialize=r["switch_seconds"], rss=stats["peak_rss_mb"], accuracy=accuracy.get(r["sparsity"]))
                for r in rep["rows"]]

    rows += runner.job("epts", lambda: elastic("epts", "epts", suite.sparsities, None))
    for s in suite.single:
        config = work / f"single-{s}.json"
        # One group holding only s: draws in (s - 1e-6, s] keep exactly the same weights as s.
        config.write_text(json.dumps({"boundaries": [s - 1e-6, s], "ranks": 8, "mix_weights": [1.0],
                                      "group1_check": False}))
        rows += runner.job(f"lora-{s}", lambda s=s, config=config: elastic(f"lora-{s}", "lora-single", [s], config))

    if peer:
        if not PEER_PYTHON.is_file():
            raise SystemExit(f"--peer needs {PEER_PYTHON}: run bash benchmarks/peer/setup.sh first")
        rows += runner.job("llmcompressor", lambda: peer_rows(runner, suite, peer, model, calib, eval_data, work, rev))
    return rows


def peer_rows(runner: Runner, suite: Suite, sparsities: list[float], model: str, calib: Path, eval_data: Path,
              work: Path, rev: str) -> list[dict]:
    """llm-compressor's Wanda and SparseGPT on the same windows, in the peer venv."""
    inputs = work / "peer-inputs"
    runner.process("peer-inputs", [
        sys.executable, "-m", "benchmarks.peer.inputs", "--model", model, "--calib", str(calib), "--eval", str(eval_data),
        "--nsamples", str(suite.nsamples), "--seqlen", str(suite.seqlen), "--eval-seqlen", str(suite.eval_seqlen),
        "--max-windows", str(suite.max_windows or 0), "--out", str(inputs)])
    result = work / "peer.json"
    cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), "--inputs", str(inputs), "--methods", "wanda,sparsegpt",
           "--sparsities", ",".join(str(s) for s in sparsities), "--skip-dense", "--out", str(result)]
    runner.process("llmcompressor", cmd)
    command = " ".join(["python", str(PEER_SCRIPT.relative_to(ROOT)), *cmd[2:]])
    return [{"method": f"llmcompressor-{r['method']}", "sparsity": str(r["sparsity"]), "ppl": r["ppl"],
             "compress_seconds": r["oneshot_seconds"], "materialize_seconds": None, "peak_rss_mb": None,
             "commit": rev, "command": command} for r in json.loads(result.read_text())["runs"]]


def write_results(rows: list[dict], out: Path, suite_name: str) -> None:
    from epts.io import write_json_atomic

    write_json_atomic(out / "results.json", {"suite": suite_name, "rows": rows})
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(markdown_table(rows))
    plot_ppl(rows, out / "ppl_vs_sparsity.png")
    plot_cumulative_time(rows, out / "cumulative_time.png")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    accuracy = any(r.get("zeroshot_acc") is not None for r in rows)  # the column only when a task was run
    extra = (" zero-shot acc / acc_norm |", "---|") if accuracy else ("", "")
    lines = [f"| method | sparsity | WikiText-2 ppl |{extra[0]} compress s | materialise s | peak RSS MiB |",
             f"|---|---|---|{extra[1]}---|---|---|"]
    for r in rows:
        cell = f" {_fmt(r.get('zeroshot_acc'), '.3f')} / {_fmt(r.get('zeroshot_acc_norm'), '.3f')} |" if accuracy else ""
        lines.append(f"| {r['method']} | {r['sparsity']} | {r['ppl']:.2f} |{cell} {_fmt(r['compress_seconds'], '.1f')} | "
                     f"{_fmt(r['materialize_seconds'], '.2f')} | {_fmt(r['peak_rss_mb'], '.0f')} |")
    dense = next((r["ppl"] for r in rows if r["method"] == "dense"), None)
    by = {(r["method"], r["sparsity"]): r["ppl"] for r in rows}
    sparsities = sorted({r["sparsity"] for r in rows if r["method"] == "epts"}, key=float)
    others = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in ("dense", "epts")]
    if sparsities:
        lines += ["", "EPTS against each method at the same sparsity (negative: EPTS is better):", "",
                  "| sparsity | EPTS | " + " | ".join(others) + " |", "|---|---|" + "---|" * len(others)]
        for s in sparsities:
            e = by[("epts", s)]
            cells = [f"{by[(m, s)]:.2f} ({100 * (e / by[(m, s)] - 1):+.1f} %)" if (m, s) in by else "-" for m in others]
            lines.append(f"| {s} | {e:.2f} | " + " | ".join(cells) + " |")
    if dense is not None:
        lines += ["", f"Dense: {dense:.2f}."]
    return "\n".join(lines) + "\n"


def plot_ppl(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((float(r["sparsity"]), r["ppl"]) for r in rows
                        if r["method"] == method and ":" not in r["sparsity"])
        if method == "dense":
            ax.axhline(points[0][1], color="grey", linestyle=":", label="dense")
            continue
        style = {"epts": dict(linewidth=2.5, color="black", marker="o")}.get(method, dict(marker="."))
        if method.startswith("llmcompressor"):
            style = dict(marker="x", linestyle="--")
        if method == "lora-single":  # separate runs, one per point: no line between them
            style = dict(marker="s", linestyle="none", color="tab:red")
        ax.plot(*zip(*points), label=method, **style)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (fraction of prunable weights set to zero)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title("Perplexity against sparsity: one EPTS run vs one run per sparsity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cumulative_seconds(rows: list[dict], method: str) -> list[float]:
    """Total compression time to serve the first 1, 2, ... target sparsities (in the suite's order)."""
    mine = [r for r in rows if r["method"] == method and ":" not in r["sparsity"]]
    if method == "epts":
        total, out = mine[0]["compress_seconds"], []
        for r in mine:
            total += r["materialize_seconds"]
            out.append(total)
        return out
    total, out = 0.0, []
    for r in mine:
        total += r["compress_seconds"]
        out.append(total)
    return out


def plot_cumulative_time(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        if method in ("dense", "lora-single"):
            continue
        seconds = cumulative_seconds(rows, method)
        if not seconds or None in seconds:
            continue
        style = dict(linewidth=2.5, color="black", marker="o") if method == "epts" else dict(marker=".")
        ax.plot(range(1, len(seconds) + 1), seconds, label=method, **style)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("number of target sparsities served")
    ax.set_ylabel("cumulative compression seconds")
    ax.set_title("EPTS: one run, then a merge per target; others: one run per target")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", type=Path, default=DATA / "wiki.valid.tokens")
    parser.add_argument("--eval", type=Path, default=DATA / "wiki.test.raw")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results, or .../SUITE)")
    parser.add_argument("--work", type=Path, help="artifacts and temporary files (default runs/bench-SUITE)")
    parser.add_argument("--resume", action="store_true", help="keep the jobs already finished in OUT/rows.jsonl")
    parser.add_argument("--peer", action="store_true", help="also run the llm-compressor peer check")
    parser.add_argument("--peer-sparsities", help="comma-separated sparsities for the peer check (default: the suite's)")
    parser.add_argument("--zeroshot-task", type=Path,
                        help="a local lm-eval task YAML (epts.zeroshot.write_continuation_task makes one): adds "
                             "every model's zero-shot accuracy on it to the results")
    parser.add_argument("--zeroshot-limit", type=int, help="with --zeroshot-task: its first N documents only")
    args = parser.parse_args(argv)
    for path in (args.calib, args.eval):
        if not path.exists():
            parser.error(f"{path} does not exist (PROTOCOL.md's data lives in ../shared/data)")
    out = args.out or ROOT / "benchmarks" / "results" / ("" if args.suite == "quick" else args.suite)
    work = args.work or ROOT / "runs" / f"bench-{args.suite}"
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(), logging.FileHandler(out / "run.log")])
    suite = SUITES[args.suite]
    log.info("suite %s: %s", args.suite, dataclasses.asdict(suite))
    start = time.perf_counter()
    peer = [float(x) for x in args.peer_sparsities.split(",")] if args.peer_sparsities else list(suite.sparsities)
    zeroshot = []
    if args.zeroshot_task:
        if not args.zeroshot_task.is_file():
            parser.error(f"--zeroshot-task {args.zeroshot_task} does not exist")
        zeroshot = ["--tasks", str(args.zeroshot_task.resolve())]
        zeroshot += ["--limit", str(args.zeroshot_limit)] if args.zeroshot_limit else []
    rows = run_suite(suite, args.model, args.calib.resolve(), args.eval.resolve(), out, work.resolve(), args.resume,
                     peer if args.peer else [], zeroshot)
    write_results(rows, out, args.suite)
    log.info("suite %s finished in %.1f min; results in %s", args.suite, (time.perf_counter() - start) / 60, out)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
