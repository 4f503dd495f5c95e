"""Zero-shot accuracy through lm-eval on a local multiple-choice task built from WikiText-2,
checked against an independent computation of the same accuracies with the model itself."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import WIKI_TEST, tiny_model_folder

pytest.importorskip("lm_eval", reason="lm-evaluation-harness absent: pip install 'epts[zeroshot]'")
if not WIKI_TEST.is_file():
    pytest.skip(f"WikiText-2 test text absent at {WIKI_TEST}", allow_module_level=True)

from epts import ElasticModel, load_model, zero_shot  # noqa: E402
from epts.zeroshot import ZeroShotError, parse_tasks, write_continuation_task  # noqa: E402

DOCS = 24


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_continuation_task(WIKI_TEST, tmp_path_factory.mktemp("task"), num_docs=DOCS, seed=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def artifact(model_dir, tmp_path_factory):
    from epts import EPTSConfig, compress

    config = EPTSConfig(epochs=1, ranks=4, calib={"nsamples": 2, "seqlen": 64})
    out = tmp_path_factory.mktemp("art") / "art"
    compress(load_model(model_dir), WIKI_TEST, config, out=out, progress=False)
    return out


def docs(task):
    return [json.loads(line) for line in task.with_suffix(".jsonl").read_text().splitlines()]


@torch.no_grad()
def direct_accuracy(model, tokenizer, task) -> tuple[float, float]:
    """acc and acc_norm computed here: the summed log-likelihood of " choice" after the context, the
    argmax against gold; acc_norm divides it by the choice's length in characters first."""
    hits = norm_hits = 0
    for doc in docs(task):
        context = tokenizer(doc["context"])["input_ids"]
        scores = []
        for choice in doc["choices"]:
            continuation = tokenizer(" " + choice)["input_ids"]
            ids = torch.tensor([context + continuation])
            logprobs = model(ids[:, :-1]).logits.log_softmax(-1)[0, len(context) - 1:]
            scores.append(logprobs.gather(-1, ids[0, len(context):, None]).sum().item())
        hits += max(range(len(scores)), key=scores.__getitem__) == doc["gold"]
        normed = [s / len(c) for s, c in zip(scores, doc["choices"])]
        norm_hits += max(range(len(normed)), key=normed.__getitem__) == doc["gold"]
    n = len(docs(task))
    return hits / n, norm_hits / n


def test_local_task_holds_the_true_next_sentence_among_distractors(task):
    text = WIKI_TEST.read_text(encoding="utf-8")
    rows = docs(task)
    assert len(rows) == DOCS
    for doc in rows:
        assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4
        assert f"{doc['context']} {doc['choices'][doc['gold']]}" in text  # gold follows the context in the text
        others = [c for i, c in enumerate(doc["choices"]) if i != doc["gold"]]
        assert all(f"{doc['context']} {c}" not in text for c in others)
    assert len({doc["gold"] for doc in rows}) > 1  # the gold position is shuffled, not always first


def test_dense_accuracy_equals_a_direct_computation(model_dir, task, capsys):
    loaded = load_model(model_dir)
    (row,) = zero_shot(loaded, str(task))
    acc, acc_norm = direct_accuracy(loaded.model, loaded.tokenizer, task)
    assert row["task"] == "epts_next_sentence" and row["n"] == DOCS
    assert 0 <= row["acc"] <= 1 and 0 <= row["acc_norm"] <= 1
    assert row["acc"] == pytest.approx(acc) and row["acc_norm"] == pytest.approx(acc_norm)
    assert row["acc_stderr"] == pytest.approx((acc * (1 - acc) / (DOCS - 1)) ** 0.5)  # of a mean of 0/1 hits
    assert "Running loglikelihood requests" in capsys.readouterr().err
    # A transformers model with its tokenizer is accepted as it is, and a task folder as well as its file;
    # progress=False (epts --quiet) hides lm-eval's request bars.
    (again,) = zero_shot(loaded.model, str(task.parent), tokenizer=loaded.tokenizer, progress=False)
    assert again["acc"] == row["acc"] and again["acc_norm"] == row["acc_norm"]
    assert "Running loglikelihood requests" not in capsys.readouterr().err


def test_eval_of_an_artifact_switches_sparsity_in_place(artifact, task, tmp_path):
    report = tmp_path / "report.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", EPTS_CACHE="off")
    r = subprocess.run([sys.executable, "-m", "epts.cli", "eval", str(artifact), "--sparsity", "0,0.7",
                        "--tasks", str(task), "--report", str(report)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(report.read_text())["zeroshot"]
    assert [(row["sparsity"], row["task"]) for row in rows] == [(0.0, "epts_next_sentence"), (0.7, "epts_next_sentence")]
    assert sum(line.startswith("| 0") for line in r.stdout.splitlines()) == 2
    assert (rows[0]["acc"], rows[0]["acc_norm"]) != (rows[1]["acc"], rows[1]["acc_norm"])  # the switch took effect
    elastic = ElasticModel.load(artifact)
    for row in rows:
        model = elastic.materialize(row["sparsity"])
        acc, acc_norm = direct_accuracy(model.model, model.tokenizer, task)
        assert row["acc"] == pytest.approx(acc) and row["acc_norm"] == pytest.approx(acc_norm)


def test_the_task_maker_command_writes_the_same_task(task, tmp_path):
    r = subprocess.run([sys.executable, "-m", "epts.cli", "task", str(WIKI_TEST), str(tmp_path), "--docs", str(DOCS),
                        "--seed", "1"], capture_output=True, text=True)
    assert r.returncode == 0 and "chance 0.25" in r.stdout, r.stderr
    assert (tmp_path / "epts_next_sentence.jsonl").read_text() == task.with_suffix(".jsonl").read_text()
    r = subprocess.run([sys.executable, "-m", "epts.cli", "task", str(WIKI_TEST), str(tmp_path), "--docs", "999999",
                        "--overwrite"], capture_output=True, text=True)
    assert r.returncode == 2 and "give a longer text or fewer documents" in r.stderr


def test_unknown_task_and_missing_file_are_clear_errors(model_dir, tmp_path):
    with pytest.raises(ZeroShotError, match="unknown lm-eval task 'no_such_task_xyz'"):
        zero_shot(load_model(model_dir), "no_such_task_xyz")
    with pytest.raises(ZeroShotError, match="does not exist"):
        parse_tasks(str(tmp_path / "missing.yaml"))
    with pytest.raises(ZeroShotError, match="defines no lm-eval task"):
        parse_tasks(str(tmp_path))


def test_missing_lm_eval_says_how_to_install(monkeypatch, model_dir, task):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(ZeroShotError, match=r"pip install 'epts\[zeroshot\]'"):
        zero_shot(load_model(model_dir), str(task))
    with pytest.raises(ZeroShotError, match=r"pip install 'epts\[zeroshot\]'"):
        parse_tasks("arc_easy")  # what epts eval checks before loading any model


@pytest.mark.slow
def test_smollm2_beats_chance_on_the_local_task(smollm2, tmp_path):
    task = write_continuation_task(WIKI_TEST, tmp_path, num_docs=60)
    (row,) = zero_shot(smollm2, str(task))
    assert row["n"] == 60 and row["acc_norm"] > 0.4  # chance is 0.25 with four choices
