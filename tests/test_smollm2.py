"""On the real SmolLM2-135M and WikiText-2 (PROTOCOL.md quick protocol); skipped without them."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import WIKI_TEST, WIKI_VALID
from epts import LoadedModel, Pattern, PruneConfig, evaluate_ppl, load_model, prune, save_model
from epts.data import tokenize
from epts.models import fingerprint

pytestmark = pytest.mark.slow


# The protocol's 64 test windows are evaluated once, as the first SHORT and the rest, so that a pruned
# model's ratio to dense is measured on SHORT windows only: it needs no more.
WINDOWS, SHORT = 64, 16


@pytest.fixture(scope="module")
def wiki_tokens(smollm2):
    return tokenize(smollm2.tokenizer, WIKI_TEST)


@pytest.fixture(scope="module")
def dense_ppl(smollm2, wiki_tokens):
    """Dense perplexity on (the first SHORT windows, all WINDOWS windows) of 512 tokens."""
    head = evaluate_ppl(smollm2, wiki_tokens[: SHORT * 512], seqlen=512, progress=False)
    rest = evaluate_ppl(smollm2, wiki_tokens[SHORT * 512:], seqlen=512, max_windows=WINDOWS - SHORT, progress=False)
    # Every window predicts 511 tokens, so the mean NLL of all is the window-weighted mean of the two parts.
    return head, math.exp((SHORT * math.log(head) + (WINDOWS - SHORT) * math.log(rest)) / WINDOWS)


def test_dense_perplexity_matches_the_protocol_reference(dense_ppl):
    assert dense_ppl[1] == pytest.approx(29.5, rel=0.02)


def test_wanda_half_sparsity_costs_a_modest_factor(smollm2, dense_ppl, wiki_tokens):
    pruned = LoadedModel(copy.deepcopy(smollm2.model), smollm2.tokenizer, smollm2.spec)
    report = prune(pruned, WIKI_VALID, PruneConfig("wanda", Pattern(sparsity=0.5)), progress=False)
    assert report.total_sparsity == pytest.approx(0.5, abs=1e-3)
    ppl = evaluate_ppl(pruned, wiki_tokens[: SHORT * 512], seqlen=512, progress=False)
    assert math.isfinite(ppl) and dense_ppl[0] < ppl < 4 * dense_ppl[0]


def test_gguf_model_exports_to_a_plain_folder_with_same_logits(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("EPTS_CACHE", "off")  # really parse the GGUF file, not the cached copy
    from_gguf = load_model("smollm2-135m")
    assert fingerprint(from_gguf.model) == fingerprint(smollm2.model)
    out = save_model(from_gguf, tmp_path / "smollm2")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(reloaded.config, "quantization_config", None) is None
    ids = torch.tensor([[1, 504, 3458, 282, 260, 2619, 30]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, smollm2.model(ids).logits)
