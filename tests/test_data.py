import json
import random

import pytest
import torch

from conftest import ByteTokenizer, tiny_model, tiny_model_folder
from epts import evaluate_ppl
from epts.data import DataError, calibration_windows, eval_windows, heldout_windows, read_text, tokenize


def test_calibration_windows_follow_the_reference_sampler():
    tokens = torch.arange(1000)
    windows = calibration_windows(tokens, nsamples=5, seqlen=50, seed=0)
    random.seed(0)
    starts = [random.randint(0, 1000 - 50 - 1) for _ in range(5)]
    assert torch.equal(windows, torch.stack([torch.arange(s, s + 50) for s in starts]))
    assert not torch.equal(windows, calibration_windows(tokens, 5, 50, seed=1))


def test_heldout_windows_share_no_token_with_the_calibration():
    tokens = torch.arange(5000)
    calib = set(calibration_windows(tokens, 20, 100, seed=3).reshape(-1).tolist())
    head = heldout_windows(tokens, 20, 100, 3, count=8)
    tail = heldout_windows(tokens, 20, 100, 3, count=8, eval_seqlen=50, from_end=True)
    assert head.shape == (8, 100) and tail.shape == (8, 50)
    for windows in (head, tail):
        assert not calib & set(windows.reshape(-1).tolist())
        assert all(int(w[0]) % w.numel() == 0 for w in windows)  # on the grid, so never overlapping
    assert int(head[0, 0]) < int(tail[-1, 0]) and not set(head.reshape(-1).tolist()) & set(tail.reshape(-1).tolist())
    # A text the calibration covers gives as many as it has, possibly none.
    assert len(heldout_windows(tokens[:400], 40, 100, 0, count=8)) == 0
    assert len(heldout_windows(tokens[:400], 1, 100, 0, count=8)) in (2, 3)  # of 4, one or two covered



def test_heldout_windows_of_several_seeds_avoid_every_seeds_calibration():
    tokens = torch.arange(5000)
    one, both = heldout_windows(tokens, 20, 100, 3, count=30), heldout_windows(tokens, 20, 100, [3, 4], count=30)
    other = set(calibration_windows(tokens, 20, 100, seed=4).reshape(-1).tolist())
    assert other & set(one.reshape(-1).tolist())  # seed 3's held-out text holds some of seed 4's calibration
    assert not other & set(both.reshape(-1).tolist()) and set(both.reshape(-1).tolist()) <= set(one.reshape(-1).tolist())


def test_eval_windows_are_non_overlapping_from_the_start():
    w = eval_windows(torch.arange(1050), seqlen=100, max_windows=None)
    assert w.shape == (10, 100) and torch.equal(w.reshape(-1), torch.arange(1000))
    assert eval_windows(torch.arange(1050), 100, max_windows=3).shape == (3, 100)


def test_too_short_text_is_a_clear_error():
    with pytest.raises(DataError, match="too short for windows of 64 tokens"):
        calibration_windows(torch.arange(50), 2, 64)
    with pytest.raises(DataError, match="fewer than one window of 64"):
        eval_windows(torch.arange(50), 64)


def test_jsonl_folder_and_plain_files(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["one", "two"]) + "\n")
    (tmp_path / "b.txt").write_text("three")
    assert read_text(tmp_path / "a.jsonl") == "one\n\ntwo"
    assert read_text(tmp_path) == "one\n\ntwo\n\nthree"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(DataError, match="line 1 has no .text. field"):
        read_text(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="neither a file, a folder nor one of"):
        read_text(tmp_path / "missing.txt")


def test_hub_dataset_without_network_says_what_to_do(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="pass a local text or JSON-lines file instead"):
        read_text("wikitext2")


def test_perplexity_is_exp_of_mean_token_nll():
    loaded = tiny_model("llama")
    text = "".join(chr(97 + (i * 7) % 26) for i in range(300))
    ids = ByteTokenizer()(text).input_ids.reshape(-1)
    windows = eval_windows(ids, 64)
    with torch.no_grad():
        logits = loaded.model(windows).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    ppl = evaluate_ppl(loaded, ids, seqlen=64, batch_size=3, progress=False)
    assert ppl == pytest.approx(torch.exp(nll).item(), rel=1e-5)
    assert evaluate_ppl(loaded, ids, seqlen=64, max_windows=1, progress=False) != pytest.approx(ppl)


def test_a_special_tokens_spelling_in_the_text_is_text(tmp_path):
    """WikiText's tokenised release writes rare words as "<unk>"; a tokenizer that reads a special
    token's spelling as that token would make them targets no model predicts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_folder(tmp_path / "model"))
    text = tmp_path / "text.txt"
    text.write_text("the mask of block <eos> keeps the rest")
    ids = tokenize(tokenizer, text)
    assert tokenizer.eos_token_id not in ids.tolist()
    assert tokenizer.decode(ids) == "the mask of block <eos> keeps the rest"
    assert tokenizer.eos_token_id in tokenizer("block <eos>").input_ids  # what the default would have done


def test_a_text_that_spells_special_tokens_says_so(tmp_path, caplog):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_folder(tmp_path / "model"))
    text = tmp_path / "text.txt"
    text.write_text("a <eos> b <eos> c")
    with caplog.at_level("WARNING", logger="epts.data"):
        tokenize(tokenizer, text)
    assert f"{text} spells the tokenizer's special tokens <eos> (2x)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="epts.data"):  # the same text again: said once is enough
        ids = tokenize(tokenizer, text)
    assert "special tokens" not in caplog.text and ids.numel() > 0
    text.write_text("a <eos> b <eos> c <eos>")
    with caplog.at_level("WARNING", logger="epts.data"):  # the file changed: said again
        tokenize(tokenizer, text)
    assert f"{text} spells the tokenizer's special tokens <eos> (3x)" in caplog.text
    caplog.clear()
    text.write_text("a b c")
    with caplog.at_level("WARNING", logger="epts.data"):
        tokenize(tokenizer, text)
    assert "special tokens" not in caplog.text
