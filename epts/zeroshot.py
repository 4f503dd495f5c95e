"""Zero-shot accuracy through lm-evaluation-harness, on a model already in memory.

lm-eval's Hugging Face wrapper (`HFLM`) takes a loaded `PreTrainedModel`, so an elastic model's
one runtime copy is wrapped once and switched between sparsities in place: no folder is written
per sparsity. Tasks are hub task names (arc_easy, hellaswag, ...; their data comes from the hub)
or local task YAML files and folders (lm-eval's custom-task format), which work offline.
`write_continuation_task` builds such a local multiple-choice task from any plain text:

    epts task ../shared/data/wikitext2/wiki.test.raw runs/tasks   # then --tasks runs/tasks
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
from pathlib import Path

import yaml

from .data import read_text
from .io import atomic_path, write_json_atomic
from .models import LoadedModel

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'epts[zeroshot]' (or pip install lm-eval)"


class ZeroShotError(ValueError):
    pass


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ZeroShotError(f"zero-shot evaluation (--tasks) needs lm-evaluation-harness, which is not installed "
                            f"({err}): {INSTALL_HINT}") from None
    return lm_eval, HFLM, TaskManager


def parse_tasks(spec: str | list[str]) -> tuple[list[str], tuple[str, ...]]:
    """`arc_easy,hellaswag,./my_task.yaml,./tasks/` -> (what lm-eval loads, folders to index).

    A task YAML file is passed to lm-eval by path; a folder is indexed (`include_path`) and every
    task defined in it is run. Anything else is a task, group or tag name of lm-eval's registry.
    Raises ZeroShotError for a missing file, a folder without tasks, or lm-eval not installed.
    """
    _lm_eval()  # before any model is loaded, say so if lm-eval is missing
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise ZeroShotError("--tasks is empty: give task names (e.g. arc_easy,hellaswag) or a local task YAML/folder")
    names, folders = [], []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            folders.append(str(path.resolve()))
            found = _task_manager((str(path.resolve()),), include_defaults=False).all_subtasks
            if not found:
                raise ZeroShotError(f"task folder {item} defines no lm-eval task (no YAML with a `task:` key)")
            for file in sorted([*path.rglob("*.yaml"), *path.rglob("*.yml")]):
                _check_data_files(file)
            names.extend(found)
        elif path.suffix in (".yaml", ".yml") or os.sep in item:
            if not path.is_file():
                raise ZeroShotError(f"task file {item} does not exist")
            _check_data_files(path)
            names.append(str(path.resolve()))
        else:
            names.append(item)
    return names, tuple(folders)


def _check_data_files(task: Path) -> None:
    """Refuse a local task whose data files are missing (a task folder moved after it was written:
    `write_continuation_task` records their absolute paths), which lm-eval would report as a failed
    download."""
    try:
        config = yaml.safe_load(task.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # lm-eval's own tags (!function): lm-eval reads it
        return
    files = ((config or {}).get("dataset_kwargs") or {}).get("data_files") if isinstance(config, dict) else None
    if isinstance(files, dict):
        files = list(files.values())
    for file in files if isinstance(files, list) else [files]:
        for one in file if isinstance(file, list) else [file]:
            if isinstance(one, str) and not Path(one).expanduser().exists():
                raise ZeroShotError(f"task {task} reads its documents from {one}, which does not exist (was the task "
                                    f"folder moved?): write the task again with `epts task`, or fix "
                                    f"data_files in {task.name}")


@functools.lru_cache(maxsize=8)
def _task_manager(include_paths: tuple[str, ...], include_defaults: bool = True):
    """Indexing lm-eval's thousands of task YAMLs takes seconds: once per process is enough."""
    return _lm_eval()[2](include_path=list(include_paths) or None, include_defaults=include_defaults)


def zero_shot(
    loaded: LoadedModel,
    tasks: str | list[str],
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Accuracy of `loaded` (evaluated as it is now, e.g. at a runtime sparsity) on lm-eval tasks.

    Returns one row per task: {"task", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"};
    `acc_norm` (length-normalised) is None where the task does not define it. `limit` takes the
    first N documents of each task; `progress=False` hides lm-eval's per-request progress bars
    (the bar over documents follows TQDM_DISABLE). Raises ZeroShotError when lm-eval is missing or a task is
    unknown (hub tasks also need the network the first time their data is fetched).
    """
    lm_eval, hflm, _ = _lm_eval()
    names, folders = parse_tasks(tasks)
    registry = [name for name in names if not Path(name).is_file()]
    # Local tasks alone need no index of lm-eval's own tasks (~20 s of YAML parsing).
    local = _task_manager(folders, include_defaults=False)
    manager = _task_manager(folders, include_defaults=any(name not in local.all_tasks for name in registry))
    for name in registry:
        if name not in manager.all_tasks:
            raise ZeroShotError(f"unknown lm-eval task {name!r}: give a task name of lm-eval "
                                f"(`lm-eval ls tasks`) or a local task YAML file or folder")
    # lm-eval warns at every call that a loaded model (what we mean to pass) ignores its loading options.
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    model = (hflm if progress else _quiet(hflm))(pretrained=loaded.model, tokenizer=loaded.tokenizer,
                                                 batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=model, tasks=names, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=1000,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed)
    except (ConnectionError, OSError) as err:
        raise ZeroShotError(f"lm-eval could not load the data of {', '.join(names)}: {err}. Without a network, "
                            f"use a local task (`epts task TEXT FOLDER` writes one)") from err
    rows = []
    for task, metrics in out["results"].items():
        if "acc,none" not in metrics:
            log.warning("task %s reports no accuracy (%s); skipped", task, ", ".join(metrics))
            continue
        rows.append({
            "task": task,
            "acc": metrics["acc,none"],
            "acc_stderr": _number(metrics.get("acc_stderr,none")),
            "acc_norm": metrics.get("acc_norm,none"),
            "acc_norm_stderr": _number(metrics.get("acc_norm_stderr,none")),
            "n": out.get("n-samples", {}).get(task, {}).get("effective"),
        })
    return rows


def _quiet(hflm):
    """HFLM without its request progress bars: lm-eval passes `disable=False` to tqdm explicitly,
    which overrides TQDM_DISABLE, so the only switch is the `disable_tqdm` argument."""

    class QuietHFLM(hflm):
        def loglikelihood(self, requests, disable_tqdm=False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm=False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


def _number(value) -> float | None:
    """lm-eval writes "N/A" for a standard error it could not compute (e.g. a single document)."""
    return value if isinstance(value, (int, float)) else None


def write_continuation_task(
    text: str | os.PathLike,
    folder: str | os.PathLike,
    num_docs: int = 200,
    num_choices: int = 4,
    seed: int = 0,
    name: str = "epts_next_sentence",
    overwrite: bool = False,
) -> Path:
    """Write an offline multiple-choice task in lm-eval's custom-task format and return its YAML.

    From `text` (a file, folder or dataset name, as `epts.data.read_text` reads): each document is
    one sentence as context, and its choices are the true next sentence of the same paragraph and
    `num_choices - 1` sentences drawn from other paragraphs, in a seeded random order. Chance is
    1 / num_choices; a language model does better by following the paragraph. Files written:
    `<name>.jsonl` ({"context", "choices", "gold"} per line) and `<name>.yaml` beside it; a task
    of that name already in `folder` is replaced only with `overwrite` (else FileExistsError).
    """
    out = Path(folder)
    existing = [f for f in (out / f"{name}.jsonl", out / f"{name}.yaml") if f.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists: choose another folder, or pass --overwrite to replace the task")
    paragraphs = []
    for line in read_text(text).splitlines():
        line = line.strip()
        if not line or line.startswith("="):  # blank lines and WikiText headings
            continue
        # A capital or a quote after the stop: "No. 20 Squadron" is one sentence.
        sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", line)]
        paragraphs.append(sentences)

    def usable(sentence: str) -> bool:  # long enough to be told apart, short enough to score quickly
        return 6 <= len(sentence.split()) <= 40

    pairs = [(p, i) for p, sentences in enumerate(paragraphs) for i in range(len(sentences) - 1)
             if usable(sentences[i]) and usable(sentences[i + 1])]
    pool = [(p, s) for p, sentences in enumerate(paragraphs) for s in sentences if usable(s)]
    if len(pairs) < num_docs or len(paragraphs) < num_choices + 1:
        raise ZeroShotError(f"{text} has {len(pairs)} consecutive sentence pairs; need {num_docs}: "
                            f"give a longer text or fewer documents")
    rng = random.Random(seed)
    docs = []
    for p, i in rng.sample(pairs, num_docs):
        context, gold = paragraphs[p][i], paragraphs[p][i + 1]
        distractors: list[str] = []
        while len(distractors) < num_choices - 1:
            q, sentence = rng.choice(pool)
            if q != p and sentence not in distractors:
                distractors.append(sentence)
        choices = [gold, *distractors]
        rng.shuffle(choices)
        docs.append({"context": context, "choices": choices, "gold": choices.index(gold)})
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    with atomic_path(data) as tmp:
        tmp.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0, "source": str(text), "num_choices": num_choices, "seed": seed},
    }
    yaml_path = out / f"{name}.yaml"
    # JSON is valid YAML; written atomically like every other file epts writes.
    write_json_atomic(yaml_path, config)
    return yaml_path

