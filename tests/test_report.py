"""The demo's table and plot from an `epts eval --report` JSON."""

import json
import sys

import pytest

from epts.cli import main as cli_main
from epts.report import table


def main(argv):
    return cli_main(["report", *argv])


REPORT = {
    "rows": [{"artifact": "a", "sparsity": 0.7, "ppl": 60.0, "switch_seconds": 1.5},
             {"artifact": "a", "sparsity": 0.0, "ppl": 20.0, "switch_seconds": 0.5},
             {"artifact": "a", "sparsity": 0.3, "ppl": 25.0, "switch_seconds": 1.25}],
    "eval": {"data": "wiki.test.raw", "seqlen": 512, "max_windows": 32},
}


def test_table_is_sorted_by_sparsity_and_compares_with_the_dense_row():
    lines = [line for line in table(REPORT).splitlines() if line.startswith("| 0")]
    assert lines == ["| 0 (dense) | 20.00 | - | 0.50 |", "| 0.3 | 25.00 | +25.0 % | 1.25 |",
                     "| 0.7 | 60.00 | +200.0 % | 1.50 |"]
    assert "32 windows of 512 tokens" in table(REPORT)


def test_main_writes_table_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib absent: pip install 'epts[plot]'")
    report = tmp_path / "eval.json"
    report.write_text(json.dumps(REPORT))
    assert main([str(report), "--table", str(tmp_path / "t.md"), "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "t.md").read_text() == capsys.readouterr().out == table(REPORT)
    data = (tmp_path / "p.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_report_without_artifact_rows_and_a_missing_matplotlib_are_clear_errors(tmp_path, capsys, monkeypatch):
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"rows": [{"model": "m", "ppl": 3.0}], "eval": {}}))
    assert main([str(report)]) == 2
    assert "no perplexity rows of an artifact" in capsys.readouterr().err
    report.write_text(json.dumps(REPORT))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main([str(report), "--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install 'epts[plot]'" in capsys.readouterr().err and not (tmp_path / "p.png").exists()
