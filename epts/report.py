"""Table and plot of perplexity against sparsity from an `epts eval ARTIFACT --report` JSON.

    epts report runs/demo/eval.json --table runs/demo/table.md --plot runs/demo/ppl.png

Sparsity 0 of an elastic artifact is the dense base model, so its row is the reference.
"""

from __future__ import annotations

import os
from pathlib import Path

from .io import atomic_path


def ppl_rows(report: dict) -> list[dict]:
    """The perplexity rows of an artifact's eval report, by sparsity; ValueError if there are none."""
    rows = sorted((r for r in report.get("rows", []) if "sparsity" in r), key=lambda r: r["sparsity"])
    if not rows:
        raise ValueError("the report holds no perplexity rows of an artifact: write it with "
                         "`epts eval ARTIFACT --sparsity ... --data TEXT --report FILE`")
    return rows


def table(report: dict) -> str:
    """Markdown: sparsity, perplexity, change against the dense row (sparsity 0), switch time."""
    rows = ppl_rows(report)
    dense = next((r["ppl"] for r in rows if r["sparsity"] == 0), None)
    spec = report.get("eval", {})
    windows = spec.get("max_windows") or "all"
    lines = [f"Perplexity on {spec.get('data')} ({windows} windows of {spec.get('seqlen')} tokens); "
             f"one elastic model switched in place between sparsities (sparsity 0 = the dense base model).", "",
             "| sparsity | perplexity | vs dense | switch s |", "|---|---|---|---|"]
    for r in rows:
        change = "-" if dense is None or r["sparsity"] == 0 else f"{100 * (r['ppl'] / dense - 1):+.1f} %"
        label = "0 (dense)" if r["sparsity"] == 0 else f"{r['sparsity']:g}"
        lines.append(f"| {label} | {r['ppl']:.2f} | {change} | {r['switch_seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str | os.PathLike, title: str | None = None) -> Path:
    """A PNG of perplexity against sparsity, the dense perplexity as a dotted line.
    Needs matplotlib (`pip install 'epts[plot]'`); raises ValueError naming it when missing."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("the plot needs matplotlib, which is not installed: pip install 'epts[plot]'") from None
    matplotlib.use("Agg")  # files only: no display is needed or assumed
    import matplotlib.pyplot as plt

    rows = ppl_rows(report)
    points = [(r["sparsity"], r["ppl"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    dense = next((r["ppl"] for r in rows if r["sparsity"] == 0), None)
    if dense is not None:
        ax.axhline(dense, color="grey", linestyle=":", label=f"dense ({dense:.1f})")
    ax.plot(*zip(*points), marker="o", linewidth=2, color="black", label="EPTS, one elastic model")
    for s, ppl in points:
        ax.annotate(f"{ppl:.1f}", (s, ppl), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    values = [ppl for _, ppl in points]
    log = max(values) > 3 * min(values)  # a log axis only where perplexity grows manyfold
    if log:
        ax.set_yscale("log")
        ticker = matplotlib.ticker
        plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 50, not 5 x 10^1
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(plain)
        # Labelled minor ticks only where the majors are few (a narrow range); else they crowd.
        ax.yaxis.set_minor_formatter(plain if max(values) < 5 * min(values) else ticker.NullFormatter())
    ax.set_xlabel("sparsity (fraction of prunable weights set to zero)")
    ax.set_ylabel("perplexity" + (" (log scale)" if log else ""))
    ax.set_title(title or "Perplexity against sparsity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path

