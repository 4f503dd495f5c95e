"""What pyproject.toml declares is what epts imports; optional packages fail with an install hint."""

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"yaml": "pyyaml", "lm_eval": "lm-eval"}
# Declared but never imported by epts itself: transformers needs gguf to read GGUF files, torch's
# extension loader runs ninja to build the sparse kernels.
RUNTIME_ONLY = {"gguf", "ninja"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(requirements: list[str]) -> set[str]:
    return {_norm(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}


def _third_party_imports() -> set[str]:
    names = set()
    for file in (ROOT / "epts").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {_norm(DISTRIBUTIONS.get(n, n)) for n in names if n not in sys.stdlib_module_names and n != "epts"}


def test_declared_dependencies_are_exactly_the_imported_ones():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = _requirement_names(project["dependencies"])
    extras = {name: _requirement_names(reqs) for name, reqs in project["optional-dependencies"].items()}
    imported = _third_party_imports()
    assert required - imported == RUNTIME_ONLY  # nothing declared that nothing uses (psutil was)
    optional = extras["hub"] | extras["zeroshot"] | extras["plot"]
    assert imported - required == optional == {"datasets", "lm-eval", "matplotlib"}
    assert optional <= extras["test"]  # the test suite exercises every optional path


def test_license_and_method_ship_with_the_repository():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == {"text": "Apache-2.0"}
    assert (ROOT / "docs" / "METHOD.md").read_text().startswith("# Elastic Post-Training Sparsity (EPTS)")


def test_a_named_dataset_without_datasets_installed_says_how_to_install(monkeypatch):
    from epts.data import DataError, read_text

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"pip install 'epts\[hub\]', or pass a local text"):
        read_text("wikitext2", role="eval")
