"""Text sources -> token streams -> calibration and evaluation windows (PROTOCOL.md)."""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import urllib.request
from collections.abc import Sequence
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


def _decode(path: Path) -> str:
    """The file's text: UTF-8, a leading byte-order mark dropped (Windows editors write one), line
    ends made "\n" as Python's text mode does (the WikiText-2 files end lines in "\r\n"; every
    perplexity and calibration window the project reports is on this text)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {data[err.start]:#04x} at byte offset {err.start}): "
                        f"convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    nul = text.find("\0")
    if nul >= 0:
        raise DataError(f"{path} is not a text file (a NUL byte at character {nul}): pass plain text or JSON lines")
    return text


def _row_text(path: Path, where: str, row) -> str:
    if not isinstance(row, dict) or "text" not in row:
        raise DataError(f"{path}: {where} has no 'text' field: each row must be an object like {{\"text\": \"...\"}}")
    if not isinstance(row["text"], str):
        raise DataError(f"{path}: {where} has a 'text' of type {type(row['text']).__name__}, not a string")
    return row["text"]


def _read_jsonl(path: Path) -> list[str]:
    """The `text` field of every row: JSON lines, or one JSON list of such rows."""
    text = _decode(path)
    whole = None  # why the file is not one JSON document, if it looks like one
    if text.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            data, whole = None, err  # "Extra data" after the first row: JSON lines
        if isinstance(data, list):
            return [_row_text(path, f"item {i + 1}", row) for i, row in enumerate(data)]
        if isinstance(data, dict) and "\n" in text.strip():  # one object on one line is a JSON-lines row
            if "text" in data:
                return [_row_text(path, "the object", data)]
            raise DataError(f"{path} holds one JSON object (keys: {', '.join(map(str, data))}); expected JSON lines "
                            f'(one {{"text": ...}} object per line) or a list of such objects')
    texts = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if not texts and whole is not None and whole.msg != "Extra data":  # a damaged multi-line document
                raise DataError(f"{path}: not valid JSON at line {whole.lineno}, column {whole.colno} "
                                f"({whole.msg})") from None
            raise DataError(f"{path}: line {number} is not valid JSON ({err.msg} at column {err.colno})") from None
        texts.append(_row_text(path, f"line {number}", row))
    return texts


def _read_file(path: Path) -> str:
    if path.suffix in _JSON_SUFFIXES:
        return "\n\n".join(_read_jsonl(path))
    return _decode(path)


def _load_hub(name: str, role: str) -> str:
    try:
        import datasets
    except ImportError:
        raise DataError(f"the named dataset {name!r} is fetched with the `datasets` package, which is not installed: "
                        f"pip install 'epts[hub]', or pass a local text or JSON-lines file instead") from None

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
    or a standard dataset name (`wikitext2`, `c4`, `ptb`; `role` picks calib or eval split).

    Files are UTF-8 (a byte-order mark is accepted); a .json/.jsonl file is JSON lines, or one JSON
    list of {"text": str} objects. Raises DataError naming the file (and the line or item) for
    text that is not UTF-8 or holds NUL bytes, a malformed JSON line, or a row whose `text` is
    missing or not a string."""
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


_SPELLED_WARNED: set[tuple[str, tuple[tuple[str, int], ...]]] = set()


def tokenize(tokenizer, source: str | os.PathLike | torch.Tensor, role: str = "eval") -> torch.Tensor:
    """The whole source as one 1-D tensor of token ids (a tensor passes through). The text is data:
    a special token's spelling in it ("<unk>", "<eos>") is tokenised as text, never as that control
    token; the tokenizer's own special tokens (a BOS) are still added."""
    if isinstance(source, torch.Tensor):
        return source.reshape(-1).long()
    text = read_text(source, role)
    # The whole text is tokenised at once, far beyond the model's context: that is intended here.
    # split_special_tokens: WikiText's tokenised release writes rare words as "<unk>", which Gemma's
    # tokenizer would read as its unknown-token id, one target in 22 that no model predicts.
    ids = tokenizer(text, return_tensors="pt", verbose=False, split_special_tokens=True).input_ids
    spelled = {token: text.count(token) for token in getattr(tokenizer, "all_special_tokens", []) if token}
    spelled = {token: count for token, count in spelled.items() if count}
    warning = (str(source), tuple(spelled.items()))
    if spelled and warning not in _SPELLED_WARNED:  # once per text: a run tokenises its calibration text twice
        _SPELLED_WARNED.add(warning)
        log.warning("%s spells the tokenizer's special tokens %s; they are read as text, not as those tokens",
                    source, ", ".join(f"{token} ({count}x)" for token, count in spelled.items()))
    return ids.reshape(-1)


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens, drawn as the SparseGPT and Wanda references do
    (starts uniform in [0, n - seqlen - 1], with replacement): (nsamples, seqlen) int64.

    Raises DataError when the text cannot supply `nsamples` distinct windows (a text of n tokens has
    n - seqlen starts), rather than repeating windows; logs a warning when the draw repeats some."""
    if nsamples < 1 or seqlen < 2:
        raise DataError(f"need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}")
    n = tokens.numel()
    if n - seqlen - 1 < 0:
        raise DataError(f"calibration text has {n} tokens, too short for windows of {seqlen} tokens: "
                        f"use more text or a smaller --seqlen")
    distinct = n - seqlen
    if nsamples > distinct:
        raise DataError(f"calibration text has {n} tokens, so only {distinct} distinct windows of {seqlen} tokens, "
                        f"fewer than the {nsamples} asked: use more text, a smaller --nsamples or a smaller --seqlen")
    starts = _calibration_starts(n, nsamples, seqlen, seed)
    repeated = nsamples - len(set(starts))
    if repeated:
        log.warning("calibration: %d of the %d windows drawn repeat another (the text has only %d distinct windows "
                    "of %d tokens): more text gives more distinct windows", repeated, nsamples, distinct, seqlen)
    return torch.stack([tokens[s : s + seqlen] for s in starts])


def _calibration_starts(n: int, nsamples: int, seqlen: int, seed: int) -> list[int]:
    rng = random.Random(seed)  # same sequence as random.seed(seed) then random.randint
    return [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]


def heldout_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int | Sequence[int], count: int,
                    eval_seqlen: int | None = None, from_end: bool = False) -> torch.Tensor:
    """Up to `count` non-overlapping windows of `eval_seqlen` tokens (default `seqlen`) of `tokens`
    that share no token with the calibration windows `calibration_windows(tokens, nsamples, seqlen,
    seed)` draws (with several seeds, those of every one): text of the calibration's domain that
    the calibration did not see. Taken on the
    grid of `eval_seqlen` from the start of the text, or backwards from its end (`from_end`), so
    that two users of one file (the export's refit choice, the experiment harness's scores) take
    different windows. (k, eval_seqlen) int64 with k <= count; k is 0 when the text has no free window."""
    eval_seqlen = eval_seqlen or seqlen
    n = tokens.numel()
    used = torch.zeros(n, dtype=torch.bool)
    if n - seqlen - 1 >= 0:
        for one in [seed] if isinstance(seed, int) else seed:
            for start in _calibration_starts(n, nsamples, seqlen, one):
                used[start : start + seqlen] = True
    starts = range(n - eval_seqlen, -1, -eval_seqlen) if from_end else range(0, n - eval_seqlen + 1, eval_seqlen)
    windows = []
    for start in starts:
        if len(windows) == count:
            break
        if not used[start : start + eval_seqlen].any():
            windows.append(tokens[start : start + eval_seqlen])
    return torch.stack(windows) if windows else tokens.new_zeros((0, eval_seqlen))


def eval_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens from the start; the tail that does not fill one is dropped."""
    count = tokens.numel() // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise DataError(f"max_windows must be >= 1, got {max_windows}")
        if max_windows > count:
            log.warning("evaluation text holds only %d windows of %d tokens, fewer than the %d asked: all %d are used",
                        count, seqlen, max_windows, count)
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


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT, default https://huggingface.co; through the proxy
    of the usual environment variables) answers an HTTP request with success within `timeout`
    seconds; False in offline mode (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE). An answer, not a
    connection: sandboxes and firewalls accept connections to anywhere and drop them after. Never
    waits longer: name resolution, which a socket timeout does not bound, runs in a thread that is
    left behind if it hangs."""
    if any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
           for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    url = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/") + "/"
    answered = []

    def ask():
        try:
            with urllib.request.urlopen(url, timeout=timeout):  # an error status raises
                answered.append(True)
        except (OSError, ValueError):  # no network, an HTTP error status, a malformed HF_ENDPOINT
            pass

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


LOCAL_WIKITEXT2 = ("wiki.valid.tokens", "wiki.test.raw")  # calibration, evaluation (PROTOCOL.md)


def pick_text_source(folder: str | os.PathLike, timeout: float = 3.0) -> str:
    """Which WikiText-2 a run can use: "local" when `folder` holds both PROTOCOL.md files
    (`LOCAL_WIKITEXT2`), else "hub" when the Hugging Face hub is reachable (`hub_reachable`; the
    `wikitext2` named source), else "none" (no text at all: self-generated calibration)."""
    if all((Path(folder) / name).is_file() for name in LOCAL_WIKITEXT2):
        return "local"
    return "hub" if hub_reachable(timeout) else "none"
