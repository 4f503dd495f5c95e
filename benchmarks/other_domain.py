"""A held-out text of another domain than the calibration's: English prose that is not
Wikipedia, built on this machine from the docstrings of installed Python packages.

    python -m benchmarks.other_domain --out /work/shared/data/other/docstrings.txt

Every `.py` file of each source (sorted paths) is parsed with `ast` (never imported); the module,
class and function docstrings are cleaned (`inspect.cleandoc`) and cut at their first section
header (Args, Parameters, Returns, Examples, ...: parameter tables and code follow there); what is
left is split into paragraphs, and a paragraph is kept only if it reads as prose: no indented line
(code blocks, parameter descriptions), no doctest (`>>>`), reST directive, table or URL, at least
12 words, mostly letters, ending a sentence. Its lines are joined into one. A paragraph seen before
(transformers repeats templated docstrings across models) is dropped. The docstrings are then put in
a fixed pseudo-random order (seed 0) so that the first evaluation windows mix every source rather
than holding the first package's first files. Output: the text (UTF-8, paragraphs separated by a
blank line) and, beside it, NAME.json recording the sources, their versions and licences, the
counts and the text's sha256.

The default sources are the Python standard library (PSF-2.0), numpy (BSD-3-Clause), torch
(BSD-3-Clause) and transformers (Apache-2.0) as installed in this interpreter; the licence recorded
is the one in the package's metadata where it has one. Docstrings are technical documentation
prose: another domain than Wikipedia articles, though the models' pretraining may have seen them.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import random
import re
import sys
import sysconfig
from pathlib import Path

SECTION = re.compile(r"^(args|arguments|parameters|params|other parameters|keyword arguments|kwargs|returns?|yields?|"
                     r"raises|examples?|example usage|usage|attributes|see also|references|notes?|warnings?|"
                     r"inputs|outputs|shape|methods|todo|reference)\s*:?\s*$", re.IGNORECASE)
UNDERLINE = re.compile(r"^\s*[-=~^*]{3,}\s*$")
FIELD = re.compile(r"^\s*:(param|type|returns?|rtype|raises?|arg|keyword|var|ivar)\b")
MIN_WORDS = 12
MIN_LETTERS = 0.85
LICENCES = {"stdlib": "PSF-2.0", "numpy": "BSD-3-Clause", "torch": "BSD-3-Clause", "transformers": "Apache-2.0"}


def prose_paragraphs(docstring: str) -> list[str]:
    """The paragraphs of one docstring that read as English prose, each unwrapped onto one line;
    the docstring is cut at its first section header (parameter tables and examples follow there)."""
    lines = inspect.cleandoc(docstring).splitlines()
    body = []
    for i, line in enumerate(lines):
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if SECTION.match(line.strip()) or (line.strip() and UNDERLINE.match(following)) or FIELD.match(line):
            break
        body.append(line)
    paragraphs, current = [], []
    for line in [*body, ""]:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append(current)
            current = []
    return [" ".join(x.strip() for x in p) for p in paragraphs if _is_prose(p)]


def _is_prose(lines: list[str]) -> bool:
    if any(x[:1].isspace() or x.lstrip().startswith((">>>", "...", ".. ", "|", "+-", "- ", "* ", "$ ", "#"))
           for x in lines):
        return False
    text = " ".join(x.strip() for x in lines)
    if any(s in text for s in ("http://", "https://", "::", "```", "\\", "{", "}", "==", "->", "=>", "$")):
        return False
    words = text.split()
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return (len(words) >= MIN_WORDS and letters >= MIN_LETTERS * len(text) and text[-1] in ".!?"
            and text[0].isupper())


def file_docstrings(source: str) -> list[str]:
    """The docstrings of a module's source, module first, then classes and functions in source order;
    [] when it does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found = []

    def visit(node):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                found.append(doc)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def default_sources() -> list[tuple[str, Path]]:
    """(name, folder) of the default sources as installed in this interpreter."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [("stdlib", stdlib)]
    for name in ("numpy", "torch", "transformers"):
        spec = importlib.util.find_spec(name)  # found, not imported
        if spec is None or spec.origin is None:
            raise SystemExit(f"{name} is not installed in this interpreter")
        sources.append((name, Path(spec.origin).parent))
    return sources


def source_files(name: str, root: Path) -> list[Path]:
    """The `.py` files of a source, sorted; for the standard library, not its test suites or
    installed third-party packages."""
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1]))


def _version(name: str) -> str:
    if name == "stdlib":
        return sys.version.split()[0]
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _licence(name: str) -> str:
    if name in LICENCES:
        return LICENCES[name]
    try:
        meta = importlib.metadata.metadata(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
    return meta.get("License-Expression") or meta.get("License") or "unknown"


def build(sources: list[tuple[str, Path]], out: Path, seed: int = 0) -> dict:
    """Write the prose of `sources` ((name, folder) each) to `out` and its record to `out`.json;
    returns the record."""
    docs, seen, record = [], set(), []
    for name, root in sources:
        files = source_files(name, root)
        kept = 0
        for path in files:
            for doc in file_docstrings(path.read_text(encoding="utf-8", errors="replace")):
                paragraphs = [p for p in prose_paragraphs(doc) if p not in seen]
                seen.update(paragraphs)
                if paragraphs:
                    docs.append("\n\n".join(paragraphs))
                    kept += len(paragraphs)
        record.append({"name": name, "path": str(root), "version": _version(name), "licence": _licence(name),
                       "files": len(files), "paragraphs": kept})
    random.Random(seed).shuffle(docs)
    text = "\n\n".join(docs) + "\n"
    data = text.encode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    info = {"text": out.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "words": len(text.split()), "docstrings": len(docs), "paragraphs": len(seen), "seed": seed,
            "sources": record, "method": "benchmarks/other_domain.py: docstring prose via ast"}
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the text file to write (its record goes beside it)")
    p.add_argument("--source", action="append", default=None, metavar="NAME=FOLDER",
                   help="a folder of .py files to read instead of the defaults (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sources = ([(s.split("=", 1)[0], Path(s.split("=", 1)[1])) for s in args.source] if args.source
               else default_sources())
    info = build(sources, args.out, args.seed)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
