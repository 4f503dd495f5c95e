"""Text sources -> token streams -> calibration and evaluation windows (PROTOCOL.md)."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_TEXT_SUFFIXES = {".txt", ".raw", ".tokens", ".md"}
_JSON_SUFFIXES = {".jsonl", ".json"}

# Standard names, loaded through `datasets` from the hub: (path, name, text field, split per role).
HUB_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text", {"calib": "train", "eval": "test"}),
    "ptb": ("ptb_text_only", "penn_treebank", "sentence", {"calib": "train", "eval": "test"}),
    "c4": ("allenai/c4", "en", "text", {"calib": "train", "eval": "validation"}),
}
# c4 is huge: only the first shard of each split, as the SparseGPT and Wanda reference code do.
_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


class DataError(ValueError):
    pass


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".json" and f.read(1) == "[":
            f.seek(0)
            rows = json.load(f)
        else:
            f.seek(0)
            rows = [json.loads(line) for line in f if line.strip()]
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "text" not in row:
            raise DataError(f"{path}: row {i + 1} has no 'text' field")
        texts.append(row["text"])
    return texts


def _read_file(path: Path) -> str:
    if path.suffix in _JSON_SUFFIXES:
        return "\n\n".join(_read_jsonl(path))
    return path.read_text(encoding="utf-8")


def _load_hub(name: str, role: str) -> str:
    import datasets

    path, config, field, splits = HUB_DATASETS[name]
    split = splits[role]
    try:
        if name == "c4":
            ds = datasets.load_dataset(path, data_files={split: _C4_FILES[split]}, split=split)
        else:
            ds = datasets.load_dataset(path, config, split=split)
    except Exception as err:  # datasets raises many types for an unreachable hub
        raise DataError(
            f"could not load dataset {name!r} ({path}) from the Hugging Face hub: {err}. "
            f"Without a network, pass a local text or JSON-lines file instead "
            f"(e.g. ../shared/data/wikitext2/wiki.test.raw)"
        ) from err
    return "\n\n".join(ds[field])


def read_text(source: str | os.PathLike, role: str = "eval") -> str:
    """Text from a file (plain text, or JSON lines with a `text` field), a folder of such files,
    or a standard dataset name (`wikitext2`, `c4`, `ptb`; `role` picks calib or eval split)."""
    if str(source) in HUB_DATASETS and not Path(source).exists():
        return _load_hub(str(source), role)
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _TEXT_SUFFIXES | _JSON_SUFFIXES)
        if not files:
            raise DataError(f"folder {source} holds no .txt/.raw/.tokens/.jsonl/.json files")
        return "\n\n".join(_read_file(p) for p in files)
    if not path.is_file():
        raise DataError(
            f"text source {str(source)!r} is neither a file, a folder nor one of {', '.join(HUB_DATASETS)}"
        )
    return _read_file(path)


def tokenize(tokenizer, source: str | os.PathLike | torch.Tensor, role: str = "eval") -> torch.Tensor:
    """The whole source as one 1-D tensor of token ids (a tensor passes through)."""
    if isinstance(source, torch.Tensor):
        return source.reshape(-1).long()
    text = read_text(source, role)
    # The whole text is tokenised at once, far beyond the model's context: that is intended here.
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    return ids.reshape(-1)


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens, drawn as the SparseGPT and Wanda references do."""
    if nsamples < 1 or seqlen < 2:
        raise DataError(f"need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}")
    n = tokens.numel()
    if n - seqlen - 1 < 0:
        raise DataError(f"calibration text has {n} tokens, too short for windows of {seqlen} tokens: "
                        f"use more text or a smaller --seqlen")
    rng = random.Random(seed)  # same sequence as random.seed(seed) then random.randint
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([tokens[s : s + seqlen] for s in starts])


def eval_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens from the start; the tail that does not fill one is dropped."""
    count = tokens.numel() // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise DataError(f"max_windows must be >= 1, got {max_windows}")
        count = min(count, max_windows)
    if count == 0:
        raise DataError(f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    return tokens[: count * seqlen].reshape(count, seqlen)


def calibration_set(tokenizer, source: str | os.PathLike | torch.Tensor, nsamples: int, seqlen: int,
                    seed: int = 0) -> torch.Tensor:
    """Calibration windows from a text source; a 2-D tensor is taken as ready-made windows."""
    if isinstance(source, torch.Tensor) and source.dim() == 2:
        return source
    return calibration_windows(tokenize(tokenizer, source, role="calib"), nsamples, seqlen, seed)
