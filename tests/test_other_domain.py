"""The other-domain held-out text (benchmarks/other_domain.py): docstring prose kept, code dropped."""

import hashlib
import json

from benchmarks.other_domain import build, prose_paragraphs

MODULE = '''"""Utilities for measuring the weather in small gardens, written for people who like plants a lot.

This module explains how rain gauges are read every morning and why the readings should be kept in a
notebook, so that the gardener can compare one season with the next without guessing.

Example::

    >>> gauge = Gauge()
    >>> gauge.read()
    3.2
"""


def read(gauge, unit="mm"):
    """Read the gauge and return the amount of rain that fell since it was last emptied by the gardener.

    The reading is taken at the bottom of the curved surface of the water, which is what most people
    forget when they look at the gauge from above in a hurry on a cold morning.

    Args:
        gauge (Gauge): the gauge to read, which must have been emptied at least once before.
        unit (str): the unit of the result.

    Returns:
        float: the rain since the gauge was emptied last, in the unit asked for by the caller.
    """
    x = {"a": 1}
    return x


class Gauge:
    """A rain gauge.

    Parameters
    ----------
    size : int
        The size of the funnel, which decides how much rain the gauge can collect before it overflows.
    """
'''

OTHER = '''def helper():
    """Read the gauge and return the amount of rain that fell since it was last emptied by the gardener."""
'''


def _package(root):
    pkg = root / "garden"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "weather.py").write_text(MODULE)
    (pkg / "sub" / "copy.py").write_text(OTHER)  # the same paragraph again: dropped
    (pkg / "broken.py").write_text("def f(:\n")  # does not parse: skipped
    return pkg


def test_the_extractor_keeps_prose_and_drops_code_deterministically(tmp_path):
    pkg = _package(tmp_path)
    info = build([("garden", pkg)], tmp_path / "a" / "other.txt")
    text = (tmp_path / "a" / "other.txt").read_text(encoding="utf-8")
    paragraphs = text.strip().split("\n\n")
    assert sorted(paragraphs) == sorted([
        "Utilities for measuring the weather in small gardens, written for people who like plants a lot.",
        "This module explains how rain gauges are read every morning and why the readings should be kept in a "
        "notebook, so that the gardener can compare one season with the next without guessing.",
        "Read the gauge and return the amount of rain that fell since it was last emptied by the gardener.",
        "The reading is taken at the bottom of the curved surface of the water, which is what most people "
        "forget when they look at the gauge from above in a hurry on a cold morning.",
    ])
    for code in (">>>", "Gauge()", "Args", "Returns", "float:", "Parameters", "----", "size : int", "funnel",
                 "return x", "A rain gauge."):  # the last: too short to be a sentence of prose
        assert code not in text
    record = json.loads((tmp_path / "a" / "other.json").read_text())
    assert record == info
    assert record["sha256"] == hashlib.sha256((tmp_path / "a" / "other.txt").read_bytes()).hexdigest()
    assert record["sources"][0]["name"] == "garden" and record["sources"][0]["files"] == 3
    assert record["sources"][0]["paragraphs"] == 4
    # Deterministic: the same bytes again.
    again = build([("garden", pkg)], tmp_path / "b" / "other.txt")
    assert (tmp_path / "b" / "other.txt").read_bytes() == (tmp_path / "a" / "other.txt").read_bytes()
    assert again["sha256"] == info["sha256"]


def test_prose_paragraphs_stop_at_the_first_section():
    doc = ("Compute the thing for the caller in a way that is easy to follow for anyone reading it.\n\n"
           "Notes:\n    More words here that read like a sentence of prose but are under a section header.\n")
    assert prose_paragraphs(doc) == [
        "Compute the thing for the caller in a way that is easy to follow for anyone reading it."]


def test_the_harness_reads_ridge_refits_and_tables_the_other_text(tmp_path):
    import pytest

    from benchmarks.experiments import parse_refit as refit_config, write_table

    assert refit_config("auto", 10, 0.0).ridge == 0 and refit_config("auto", 10, 0.0).mode == "auto"
    r = refit_config("ridge:1", 10, 0.0)
    assert (r.mode, r.ridge, r.mask) == ("all", 1.0, "elastic")
    r = refit_config("bare:ridge=0.1", 20, 0.0)
    assert (r.mode, r.ridge, r.iters) == ("bare", 0.1, 20)
    assert refit_config("auto:mask=obs", 10, 0.0).mask == "obs"
    assert refit_config("auto:sparsegpt=0", 10, 0.0).sparsegpt is False and refit_config("auto", 10, 0.0).sparsegpt
    for bad in ("all:lambda=1", "auto:mask=wanda", "auto:mask=", "auto:sparsegpt=maybe"):
        with pytest.raises(ValueError):
            refit_config(bad, 10, 0.0)
    rows = [{"variant": "dense", "scope": "blocks=6", "sparsity": 0.0, "ppl_heldout": 30.0, "ppl_other": 20.0,
             "commit": "c", "command": "cmd", "compress_seconds": None},
            {"variant": "sparsegpt", "scope": "blocks=6", "sparsity": 0.5, "ppl_heldout": 35.0, "ppl_other": 25.0,
             "commit": "c", "command": "cmd", "compress_seconds": 3.0},
            {"variant": "default+refit-all-r1", "scope": "blocks=6", "sparsity": 0.5, "ppl_heldout": 34.0,
             "ppl_other": 26.0, "commit": "c", "command": "cmd", "compress_seconds": 9.0}]
    write_table(rows, tmp_path / "results.md", [0.5])
    table = (tmp_path / "results.md").read_text()
    assert "### perplexity on other" in table and "### perplexity on heldout / other" in table
    assert "| default+refit-all-r1 | blocks=6 | 34.00 / 26.00 |" in table
    assert "| default+refit-all-r1 | blocks=6 | 26.00 (+4.0 %) |" in table
