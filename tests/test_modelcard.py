"""Exported folders carry a model card the hub's parser reads, and stock transformers loads them;
the Python API takes a plain transformers model and tokenizer."""

import json
import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

import epts
from conftest import tiny_model_folder
from epts.modelcard import hub_base_model, render


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def artifact(model_dir, tmp_path_factory):
    from conftest import SAMPLE_TEXT

    text = tmp_path_factory.mktemp("text") / "text.txt"
    text.write_text(SAMPLE_TEXT)
    # A plain transformers model and its tokenizer, as a user holds them: no epts loading involved.
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = tmp_path_factory.mktemp("art") / "art"
    config = epts.EPTSConfig(epochs=1, ranks=4, calib={"nsamples": 2, "seqlen": 64})
    elastic = epts.compress(model, text, config, out=out, progress=False, tokenizer=tokenizer)
    assert elastic.base.spec == str(model_dir.resolve())  # recorded so that the artifact reloads its base
    return out, text


def test_export_api_card_is_parsed_by_the_hub_and_the_folder_loads_in_transformers(artifact, tmp_path):
    art, text = artifact
    out = tmp_path / "owl-0.5"
    meta = epts.export(art, 0.5, out, allocation="owl", eval_data=text, eval_seqlen=64, refit="none")
    assert meta["total_sparsity"] == pytest.approx(0.5, abs=0.01) and meta["allocation"] == "owl"
    assert json.loads((out / "epts_export.json").read_text()) == meta
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"epts", "sparsity", "unstructured-sparsity"} <= set(card.data.tags)
    (result,) = card.data.eval_results
    assert result.metric_type == "perplexity" and result.metric_value == pytest.approx(meta["ppl"])
    assert "| allocation over blocks | owl |" in card.text
    assert f"| measured zeros over the pruned linear layers | {meta['total_sparsity']:.4f} |" in card.text
    assert f"epts {epts.__version__}" in card.text
    # Stock transformers loads the folder, and it computes what the elastic model materialises.
    model = AutoModelForCausalLM.from_pretrained(out)
    plan = dict(enumerate(meta["block_sparsity"]))
    expected = epts.ElasticModel.load(art).materialize(plan).model
    ids = torch.tensor([[5, 9, 77, 120, 3, 250]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected(ids).logits, atol=1e-5)


def test_prune_out_writes_a_card_with_its_measured_perplexity(model_dir, artifact, tmp_path):
    _, text = artifact
    out = tmp_path / "wanda"
    env = dict(os.environ, HF_HUB_OFFLINE="1", EPTS_CACHE="off")
    r = subprocess.run([sys.executable, "-m", "epts.cli", "prune", "--model", str(model_dir), "--method", "wanda",
                        "--sparsity", "0.6", "--calib", str(text), "--nsamples", "2", "--seqlen", "64",
                        "--eval-data", str(text), "--eval-seqlen", "64", "--out", str(out)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "epts_report.json").read_text())
    card = ModelCard.load(out / "README.md")
    assert "wanda" in card.data.tags
    # Only the pruned model's own perplexity is its evaluation; the dense one is shown for comparison.
    assert [r.metric_value for r in card.data.eval_results] == [pytest.approx(report["ppl"])]
    assert f"{report['ppl_dense']:.4g}" in card.text and "the dense base model" in card.text
    AutoModelForCausalLM.from_pretrained(out)


def test_hub_metadata_names_the_hub_model_and_not_a_local_path(tmp_path):
    assert hub_base_model("smollm2-135m") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    assert hub_base_model("gemma3-270m") == ("google/gemma-3-270m", "gemma")
    assert hub_base_model("meta-llama/Llama-3.2-1B") == ("meta-llama/Llama-3.2-1B", None)
    assert hub_base_model(str(tmp_path)) == (None, None)
    card = ModelCard(render("smollm2-135m", "sparsegpt", "2:4", 0.5, compressed=True))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    assert "2:4-sparsity" in card.data.tags and "compressed-tensors" in card.text
    assert card.data.eval_results is None and "Not measured at export" in card.text


def test_api_errors_name_what_to_do(model_dir, artifact, tmp_path):
    art, _ = artifact
    with pytest.raises(ValueError, match="needs its tokenizer"):
        epts.as_loaded(AutoModelForCausalLM.from_pretrained(model_dir))
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        epts.export(art, 0.5, tmp_path / "taken")
    with pytest.raises(ValueError, match="needs calib"):
        epts.export(art, 0.5, tmp_path / "x", allocation="search")


def test_export_takes_one_config_object_and_its_fields_as_keywords(artifact, tmp_path):
    art, _ = artifact
    config = epts.ExportConfig(allocation="owl", format="compressed", refit="none")
    assert isinstance(config.refit, epts.RefitConfig) and config.refit.mode == "none"
    meta = epts.export(art, 0.5, tmp_path / "a", config, progress=False)
    assert meta["allocation"] == "owl" and meta["format"] == "compressed" and "refit" not in meta
    # A keyword overrides the object's field, and only fields are keywords.
    meta = epts.export(art, 0.5, tmp_path / "b", config, allocation="uniform", progress=False)
    assert meta["allocation"] == "uniform" and set(meta["block_sparsity"]) == {0.5}
    with pytest.raises(ValueError, match="export got refit_mode=, which is no ExportConfig field"):
        epts.export(art, 0.5, tmp_path / "c", refit_mode="none")
    with pytest.raises(ValueError, match="format 'sparse' is not one of dense, compressed"):
        epts.ExportConfig(format="sparse")
    with pytest.raises(ValueError, match="allocation 'global' is not one of uniform, owl, search"):
        epts.ExportConfig(allocation="global")
