"""The Python API, in the from_pretrained / save_pretrained spirit: every function takes the model
as a spec (`load_model`: alias, .gguf file, folder, hub id), a `LoadedModel`, or a plain
transformers `PreTrainedModel` with its tokenizer; `export` writes a folder that stock
transformers loads, with a model card."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch

from .allocation import allocate, search
from .arch import decoder_blocks
from .artifact import ElasticModel
from .baselines import PruneReport
from .baselines import prune as _prune
from .config import EPTSConfig, ExportConfig, PruneConfig
from .data import calibration_set
from .evaluate import evaluate_ppl as _evaluate_ppl
from .evaluate import total_sparsity
from .io import refuse_inputs
from .models import LoadedModel, check_context, fingerprint, load_model, save_model
from .offload import check_scratch_space, release_scratch
from .modelcard import render
from .reconstruct import compress as _compress
from .refit import refit as _refit
from .refit import refit_calibration
from .streams import StreamStore
from .zeroshot import zero_shot as _zero_shot

ModelLike = str | os.PathLike | LoadedModel | torch.nn.Module


def as_loaded(model: ModelLike, tokenizer=None, dtype: str = "auto", device: str = "cpu",
              runtime: str = "auto") -> LoadedModel:
    """A `LoadedModel` from a spec (loaded with `dtype` on `device`), a `LoadedModel` (returned as
    it is) or a transformers causal LM with its `tokenizer` (wrapped, not copied; put in eval mode;
    its spec is `config._name_or_path`, so an artifact made from it can reload it when that is a
    folder or hub id); a spec loads with `runtime` (see `load_model`: what prunes or compresses
    needs "dense"). Raises ValueError for a transformers model without a tokenizer, and
    UnsupportedArchitectureError for a model without supported decoder blocks."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, dtype, device, runtime=runtime)
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise ValueError(f"a {type(model).__name__} needs its tokenizer: pass tokenizer=AutoTokenizer."
                             f"from_pretrained(...) along with the model")
        decoder_blocks(model)
        spec = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
        if Path(spec).exists():
            spec = str(Path(spec).resolve())
        # A class loaded from code shipped with the model lives in transformers' dynamic modules.
        remote = type(model).__module__.startswith("transformers_modules")
        return LoadedModel(model.eval(), tokenizer, spec, remote)
    raise TypeError(f"model must be a path, hub id, LoadedModel or transformers model, not {type(model).__name__}")


def compress(model: ModelLike, calib=None, config: EPTSConfig | None = None, out: str | os.PathLike | None = None,
             progress: bool = True, metadata: dict | None = None, *, tokenizer=None) -> ElasticModel:
    """One EPTS optimisation of `model` (see `epts.reconstruct.compress`); returns the elastic model.
    `calib` is a text source or windows; None (the default) or a `SelfCalConfig`: windows the model
    writes itself (`epts.selfcal`). A transformers model passed in memory must be what its folder
    (`config._name_or_path`) holds, since the artifact reloads its base from there: ValueError
    otherwise (a merged LoRA, say)."""
    loaded = as_loaded(model, tokenizer, runtime="dense")
    if isinstance(model, torch.nn.Module):
        _check_reloadable(loaded)
    return _compress(loaded, calib, config, out, progress, metadata)


def _check_reloadable(loaded: LoadedModel) -> None:
    """Refuse an in-memory model whose recorded spec cannot give its weights back: an artifact
    stores no base weights, only the spec and a fingerprint. A local folder is compared by
    fingerprint (its blocks streamed); a hub id is taken as it is (checking it would download it)."""
    save = "save it with model.save_pretrained(FOLDER) and compress that folder"
    if loaded.spec == type(loaded.model).__name__:
        raise ValueError(f"the {loaded.spec} passed has no folder or hub id to reload it from (config._name_or_path "
                         f"is empty), so its artifact could never be loaded: {save}")
    folder = Path(loaded.spec)
    if not folder.exists():
        return
    try:
        saved = load_model(folder, loaded.dtype, "cpu", loaded.trust_remote_code, stream=True, runtime="dense")
    except ValueError as err:  # ModelLoadError: the folder does not load
        raise ValueError(f"the model passed records {folder} as its folder, which does not load ({err}): {save}") \
            from None
    if fingerprint(saved.model) != fingerprint(loaded.model):
        raise ValueError(f"the model passed differs from its folder {folder} (merged adapters or edited weights?), "
                         f"which its artifact would reload: {save}")


def prune(model: ModelLike, calib, config: PruneConfig | None = None, progress: bool = True, *,
          tokenizer=None) -> PruneReport:
    """Single-sparsity pruning of `model` in place (see `epts.baselines.prune`)."""
    return _prune(as_loaded(model, tokenizer, runtime="dense"), calib, config, progress)


def evaluate_ppl(model: ModelLike, text, seqlen: int = 512, max_windows: int | None = None, batch_size: int = 4,
                 progress: bool = True, *, tokenizer=None) -> float:
    """Perplexity of `model` on `text` (see `epts.evaluate.evaluate_ppl`)."""
    return _evaluate_ppl(as_loaded(model, tokenizer), text, seqlen, max_windows, batch_size, progress)


def zero_shot(model: ModelLike, tasks, *, tokenizer=None, **kwargs) -> list[dict]:
    """Zero-shot accuracy of `model` through lm-evaluation-harness (see `epts.zeroshot.zero_shot`)."""
    return _zero_shot(as_loaded(model, tokenizer), tasks, **kwargs)


def export(
    artifact: str | os.PathLike | ElasticModel,
    sparsity: float,
    out: str | os.PathLike,
    config: ExportConfig | None = None,
    *,
    calib=None,
    base: str | os.PathLike | LoadedModel | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    eval_data=None,
    eval_seqlen: int = 512,
    max_windows: int | None = None,
    command: str | None = None,
    progress: bool = True,
    **fields,
) -> dict:
    """Materialise an elastic artifact at the global `sparsity` and save it to `out`, as `config`
    (an `ExportConfig`; its fields may also be given as keywords, e.g. `refit="none"`, on top of
    it) says: the allocation of the budget over blocks, the refit, the format.

    `calib` is text for the search (`allocation="search"` needs it; its text is the search's alone)
    or, otherwise, for the refit (default: the artifact's own recorded text); the refit's text and
    whether its windows are the artifact's are recorded. A base model that runs its own code needs
    `trust_remote_code`. `base` replaces the artifact's recorded base model. With `eval_data`, the
    export's perplexity is measured and recorded in its model card. The folder holds the weights,
    tokenizer, `epts_export.json` (the returned dict) and a README.md model card; `command` (the
    CLI line) is recorded in both. `device` and `dtype` ("auto": the artifact's) are those the base
    model is loaded with. Raises ValueError for an existing `out` without `overwrite`, an `out`
    that is a file, a sparsity outside the trained range, a search without `calib` or a keyword
    that is no `ExportConfig` field; ArtifactError for a bad artifact; ScratchSpaceError when
    TMPDIR cannot hold the changed blocks.
    """
    try:
        sparsity = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"sparsity must be a number, e.g. 0.5, not {sparsity!r}") from None
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(ExportConfig)})
    if unknown:
        raise ValueError(f"export got {unknown[0]}=, which is no ExportConfig field (fields: "
                         f"{', '.join(f.name for f in dataclasses.fields(ExportConfig))})")
    config = dataclasses.replace(config or ExportConfig(), **fields)
    allocation, refit = config.allocation, config.refit
    if allocation == "search" and calib is None:
        raise ValueError("allocation search needs calib (text whose loss scores the allocations), e.g. --calib "
                         "../shared/data/wikitext2/wiki.valid.tokens")
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"--out {out} exists and is not a folder (a file or a link): choose another --out")
    if out.exists() and not overwrite:
        raise ValueError(f"output folder {out} already exists: choose another --out or pass --overwrite")
    if isinstance(artifact, ElasticModel):
        elastic = artifact
    else:
        # Streamed: the base model's blocks are read from its files one at a time, and the export
        # is written block by block (`epts.offload`).
        elastic = ElasticModel.load(artifact, base=base if base is None or isinstance(base, LoadedModel) else str(base),
                                    device=device, dtype=dtype, stream=True, trust_remote_code=trust_remote_code)
    refuse_inputs(out, "--out", {"artifact": None if isinstance(artifact, ElasticModel) else artifact,
                                 "base model": elastic.base.spec, "calib": calib, "eval data": eval_data})
    if eval_data is not None:
        check_context(elastic.base.model, eval_seqlen, "--eval-seqlen")  # before the search, not after
    extra = {}
    if allocation == "search":
        check_context(elastic.base.model, config.search_seqlen, "--search-seqlen")
        windows = calibration_set(elastic.base.tokenizer, calib, config.search_samples, config.search_seqlen)
        found = search(elastic, sparsity, windows, allocate(elastic, sparsity, config.search_start, config.owl_m,
                                                            config.owl_lambda), seconds=config.search_seconds)
        plan = found.plan
        extra["search"] = {"start": config.search_start, "start_loss": found.start_loss, "loss": found.loss,
                           "evaluations": found.evaluations, "accepted": found.accepted, "seconds": found.seconds}
    else:
        plan = allocate(elastic, sparsity, allocation, config.owl_m, config.owl_lambda)
    if refit.mode != "none":  # its text is reread and checked before the long work, not after
        text = refit_calibration(elastic, None if allocation == "search" else calib,
                                 None if allocation == "search" else "--calib", progress,
                                 refit.compare_windows if refit.mode == "auto" else 0)
        used = text.record
    check_scratch_space(elastic.base.model, "exporting a streamed model", copies=refit.mode == "auto")
    start = time.perf_counter()
    model = elastic.materialize(plan)
    try:
        seconds = time.perf_counter() - start
        if refit.mode != "none":
            with StreamStore(config.stream_memory_mb) as store:
                extra["refit"] = _refit(elastic, model, plan, text.windows, refit, elastic.config.calib.batch_size,
                                        progress, store, text.heldout).to_dict()
            extra["refit"]["calibration"] = used
        source = str(Path(artifact).resolve()) if not isinstance(artifact, ElasticModel) else None
        meta = {"artifact": source, "sparsity": sparsity, "allocation": allocation,
                "block_sparsity": [plan[b] for b in sorted(plan)], "materialize_seconds": seconds,
                "total_sparsity": total_sparsity(model.model), "base_model": elastic.base.spec,
                "format": config.format,
                **extra}
        evaluation = []
        if eval_data is not None:
            meta["ppl"] = _evaluate_ppl(model, eval_data, eval_seqlen, max_windows, progress=progress)
            meta["eval"] = {"data": str(eval_data), "seqlen": eval_seqlen, "max_windows": max_windows}
            first = f", first {max_windows} windows" if max_windows else ""
            evaluation.append({"metric": "perplexity", "value": meta["ppl"], "data": str(eval_data),
                               "setting": f"{eval_seqlen}-token windows{first}"})
        if command:
            meta["command"] = command
        details = {"artifact": source} if source else {}
        if "refit" in extra:
            chosen = extra["refit"]["chosen"]
            solution = " (SparseGPT's solution)" if chosen == "sparsegpt" else ""
            tuned = " and tuned end to end" if extra["refit"]["tuned"] else ""
            rebuilt = f", then reconstructed block-wise{tuned}" if extra["refit"]["reconstructed"] else ""
            details["refit (kept weights re-solved on the calibration)"] = (
                f"{refit.mode}{f' (chose {chosen})' if chosen else ''}: {extra['refit']['refit_blocks']} of "
                f"{len(plan)} blocks, on {extra['refit']['mask']} masks{solution}{rebuilt}")
            whose = "the artifact's own windows" if used["artifact_windows"] else \
                "not the windows the artifact was trained on"
            details["refit calibration"] = f"{used['source']} ({whose})"
        if "search" in extra:
            details["search (calibration loss)"] = f"{found.start_loss:.4f} -> {found.loss:.4f}"
        card = render(elastic.base.spec, "epts", f"{sparsity:g}", meta["total_sparsity"], allocation,
                      meta["block_sparsity"], evaluation, config.format == "compressed", command, details)
        save_model(model, out, extra_json={"epts_export.json": meta}, compressed=config.format == "compressed",
                   extra_text={"README.md": card}, overwrite=overwrite)
    finally:
        release_scratch(model.model)  # the changed blocks' scratch files, now rather than at exit
    return meta
