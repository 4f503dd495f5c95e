"""The Python API, in the from_pretrained / save_pretrained spirit: every function takes the model
as a spec (`load_model`: alias, .gguf file, folder, hub id), a `LoadedModel`, or a plain
transformers `PreTrainedModel` with its tokenizer; `export` writes a folder that stock
transformers loads, with a model card."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .allocation import allocate, search
from .arch import decoder_blocks
from .artifact import ElasticModel
from .baselines import PruneReport
from .baselines import prune as _prune
from .config import EPTSConfig, PruneConfig, RefitConfig
from .data import calibration_set
from .evaluate import evaluate_ppl as _evaluate_ppl
from .evaluate import total_sparsity
from .io import refuse_inputs
from .models import LoadedModel, check_context, load_model, save_model
from .modelcard import render
from .reconstruct import compress as _compress
from .refit import artifact_calibration
from .refit import refit as _refit

ModelLike = str | os.PathLike | LoadedModel | torch.nn.Module


def as_loaded(model: ModelLike, tokenizer=None, dtype: str = "auto", device: str = "cpu") -> LoadedModel:
    """A `LoadedModel` from a spec (loaded with `dtype` on `device`), a `LoadedModel` (returned as
    it is) or a transformers causal LM with its `tokenizer` (wrapped, not copied; put in eval mode;
    its spec is `config._name_or_path`, so an artifact made from it can reload it when that is a
    folder or hub id). Raises ValueError for a transformers model without a tokenizer, and
    UnsupportedArchitectureError for a model without supported decoder blocks."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, dtype, device)
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ValueError(f"a {type(model).__name__} needs its tokenizer: pass tokenizer=AutoTokenizer."
                             f"from_pretrained(...) along with the model")
        decoder_blocks(model)
        spec = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
        if Path(spec).exists():
            spec = str(Path(spec).resolve())
        return LoadedModel(model.eval(), tokenizer, spec)
    raise TypeError(f"model must be a path, hub id, LoadedModel or transformers model, not {type(model).__name__}")


def compress(model: ModelLike, calib=None, config: EPTSConfig | None = None, out: str | os.PathLike | None = None,
             progress: bool = True, metadata: dict | None = None, *, tokenizer=None) -> ElasticModel:
    """One EPTS optimisation of `model` (see `epts.reconstruct.compress`); returns the elastic model.
    `calib` is a text source or windows; None (the default) or a `SelfCalConfig`: windows the model
    writes itself (`epts.selfcal`)."""
    return _compress(as_loaded(model, tokenizer), calib, config, out, progress, metadata)


def prune(model: ModelLike, calib, config: PruneConfig | None = None, progress: bool = True, *,
          tokenizer=None) -> PruneReport:
    """Single-sparsity pruning of `model` in place (see `epts.baselines.prune`)."""
    return _prune(as_loaded(model, tokenizer), calib, config, progress)


def evaluate_ppl(model: ModelLike, text, seqlen: int = 512, max_windows: int | None = None, batch_size: int = 4,
                 progress: bool = True, *, tokenizer=None) -> float:
    """Perplexity of `model` on `text` (see `epts.evaluate.evaluate_ppl`)."""
    return _evaluate_ppl(as_loaded(model, tokenizer), text, seqlen, max_windows, batch_size, progress)


def zero_shot(model: ModelLike, tasks, *, tokenizer=None, **kwargs) -> list[dict]:
    """Zero-shot accuracy of `model` through lm-evaluation-harness (see `epts.zeroshot.zero_shot`)."""
    # Imported here, not at the top: `import epts` must not import epts.zeroshot, which also runs as
    # `python -m epts.zeroshot` (runpy warns when the module is already imported).
    from .zeroshot import zero_shot as _zero_shot

    return _zero_shot(as_loaded(model, tokenizer), tasks, **kwargs)


def export(
    artifact: str | os.PathLike | ElasticModel,
    sparsity: float,
    out: str | os.PathLike,
    allocation: str = "uniform",
    format: str = "dense",
    base: str | os.PathLike | LoadedModel | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    dtype: str = "auto",
    owl_m: float = 5.0,
    owl_lambda: float = 0.08,
    calib=None,
    search_seconds: float = 120.0,
    search_samples: int = 8,
    search_seqlen: int = 256,
    search_start: str = "owl",
    eval_data=None,
    eval_seqlen: int = 512,
    max_windows: int | None = None,
    command: str | None = None,
    progress: bool = True,
    refit: str | RefitConfig = "auto",
) -> dict:
    """Materialise an elastic artifact at the global `sparsity` and save it to `out`.

    `allocation` spreads the budget over blocks: "uniform", "owl" (`owl_m`, `owl_lambda`) or
    "search" (needs `calib`, text whose loss scores allocations; `search_*` set its budget).
    `refit` (a `RefitConfig` or its mode: "none", "bare", "auto", "all") re-solves the kept weights
    on the calibration windows with the masks fixed (`epts.refit`; default "auto"): from `calib`
    when given, else the artifact's own recorded text ("none": the adapter merge alone, what
    in-place switching serves).
    `format` is "dense" (zeros in dense tensors, for any transformers) or "compressed"
    (compressed-tensors sparse bitmask). `base` replaces the artifact's recorded base model. With
    `eval_data`, the export's perplexity is measured and recorded in its model card. The folder
    holds the weights, tokenizer, `epts_export.json` (the returned dict) and a README.md model
    card; `command` (the CLI line) is recorded in both. `device` and `dtype` ("auto": the
    artifact's) are those the base model is loaded with. Raises ValueError for an existing `out`
    without `overwrite`, a sparsity outside the trained range or a search without `calib`;
    ArtifactError for a bad artifact.
    """
    if format not in ("dense", "compressed"):
        raise ValueError(f"format {format!r} is not dense or compressed")
    refit = RefitConfig(refit) if isinstance(refit, str) else refit
    if allocation not in ("uniform", "owl", "search"):
        raise ValueError(f"allocation {allocation!r} is not uniform, owl or search")
    if allocation == "search" and calib is None:
        raise ValueError("allocation search needs calib (text whose loss scores the allocations), e.g. --calib "
                         "../shared/data/wikitext2/wiki.valid.tokens")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"output folder {out} already exists: choose another --out or pass --overwrite")
    if isinstance(artifact, ElasticModel):
        elastic = artifact
    else:
        # Streamed: the base model's blocks are read from its files one at a time, and the export
        # is written block by block (`epts.offload`).
        elastic = ElasticModel.load(artifact, base=base if base is None or isinstance(base, LoadedModel) else str(base),
                                    device=device, dtype=dtype, stream=True)
    refuse_inputs(out, "--out", {"artifact": None if isinstance(artifact, ElasticModel) else artifact,
                                 "base model": elastic.base.spec, "calib": calib, "eval data": eval_data})
    if eval_data is not None:
        check_context(elastic.base.model, eval_seqlen, "--eval-seqlen")  # before the search, not after
    extra = {}
    if allocation == "search":
        check_context(elastic.base.model, search_seqlen, "--search-seqlen")
        windows = calibration_set(elastic.base.tokenizer, calib, search_samples, search_seqlen)
        found = search(elastic, sparsity, windows, allocate(elastic, sparsity, search_start, owl_m, owl_lambda),
                       seconds=search_seconds)
        plan = found.plan
        extra["search"] = {"start": search_start, "start_loss": found.start_loss, "loss": found.loss,
                           "evaluations": found.evaluations, "accepted": found.accepted, "seconds": found.seconds}
    else:
        plan = allocate(elastic, sparsity, allocation, owl_m, owl_lambda)
    start = time.perf_counter()
    model = elastic.materialize(plan)
    seconds = time.perf_counter() - start
    if refit.mode != "none":
        extra["refit"] = _refit(elastic, model, plan, artifact_calibration(elastic, calib, progress), refit,
                                elastic.config.calib.batch_size, progress).to_dict()
    source = str(Path(artifact).resolve()) if not isinstance(artifact, ElasticModel) else None
    meta = {"artifact": source, "sparsity": sparsity, "allocation": allocation,
            "block_sparsity": [plan[b] for b in sorted(plan)], "materialize_seconds": seconds,
            "total_sparsity": total_sparsity(model.model), "base_model": elastic.base.spec, "format": format, **extra}
    evaluation = []
    if eval_data is not None:
        meta["ppl"] = _evaluate_ppl(model, eval_data, eval_seqlen, max_windows, progress=progress)
        meta["eval"] = {"data": str(eval_data), "seqlen": eval_seqlen, "max_windows": max_windows}
        windows = f", first {max_windows} windows" if max_windows else ""
        evaluation.append({"metric": "perplexity", "value": meta["ppl"], "data": str(eval_data),
                           "setting": f"{eval_seqlen}-token windows{windows}"})
    if command:
        meta["command"] = command
    details = {"artifact": source} if source else {}
    if "refit" in extra:
        details["refit (kept weights re-solved on the calibration)"] = (
            f"{refit.mode}: {extra['refit']['refit_blocks']} of {len(plan)} blocks")
    if "search" in extra:
        details["search (calibration loss)"] = f"{found.start_loss:.4f} -> {found.loss:.4f}"
    card = render(elastic.base.spec, "epts", f"{sparsity:g}", meta["total_sparsity"], allocation,
                  meta["block_sparsity"], evaluation, format == "compressed", command, details)
    save_model(model, out, extra_json={"epts_export.json": meta}, compressed=format == "compressed",
               extra_text={"README.md": card})
    return meta
