"""The `epts` command: parses arguments, calls the Python API, prints tables."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import tempfile
import time
import traceback
from pathlib import Path

import torch

from . import __version__
from . import distributed
from .api import export
from .arch import UnsupportedArchitectureError
from .baselines import METHODS, prune
from .artifact import ArtifactError, ElasticModel
from .checkpoint import CHECKPOINT, is_unfinished_run
from .config import (PRESETS, REFIT_MASKS, REFIT_MODES, CalibConfig, EPTSConfig, ExportConfig, PruneConfig, RefitConfig,
                     load_config_file)
from .data import DataError
from .evaluate import evaluate_ppl, generate_timed, peak_rss_mb
from .importance import CRITERIA, Pattern
from .io import LOCK, atomic_path, empty_folder, folder_lock, refuse_inputs, write_json_atomic
from .blocks import NonFiniteActivationError
from .modelcard import render
from .models import (DEFAULT_MODEL, DTYPE_CHOICES, RUNTIMES, ModelLoadError, check_context, load_model,
                     resolve_device, save_model, weights_mib)
from .reconstruct import NonFiniteError, compress
from .refit import refit, refit_calibration
from .runtime import RuntimeModel
from .selfcal import SOURCE as SELF_GENERATED
from .selfcal import SelfCalConfig
from .sparse import kernels as sparse_kernels
from .sparse import packed_bytes, packed_layers
from .report import plot as report_plot
from .report import table as report_table
from .streams import ScratchSpaceError, StreamStore, sweep_scratch
from .zeroshot import parse_tasks, write_continuation_task, zero_shot

log = logging.getLogger("epts")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, folder, .gguf file or built-in alias")
    _add_dtype_arg(p)
    _add_device_arg(p)
    _add_trust_arg(p)


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run code shipped with the model (off by default); an artifact of such a model needs it to "
                        "reload its base")


def _add_stream_memory_arg(p: argparse.ArgumentParser, default, what: str) -> None:
    p.add_argument("--stream-memory", type=_non_negative_float, default=default, metavar="MB",
                   help=f"RAM budget in MiB for {what}; past it they are memory-mapped scratch files in TMPDIR, removed "
                        f"at the end (default: no limit){', unless --config sets it' if default is None else ''}; the "
                        f"result is the same")


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, mps or auto")


def _add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="weights' dtype: auto keeps the checkpoint's own, or the one an artifact was made in; a "
                        "GGUF file loads as float32")


def _add_eval_args(p: argparse.ArgumentParser, data_flag: str, seqlen_flag: str, required: bool) -> None:
    p.add_argument(data_flag, dest="eval_data", required=required,
                   help="evaluation text: file, folder of .txt/.jsonl, or wikitext2/c4/ptb")
    p.add_argument(seqlen_flag, dest="eval_seqlen", type=_positive_int, default=512, help="evaluation window length")
    p.add_argument("--max-windows", type=_positive_int, default=None, help="evaluate on the first N windows only")


def _add_runtime_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", choices=list(RUNTIMES), default="auto",
                   help="how pruned layers run: sparse (packed values + bitmask read by epts' CPU kernels: smaller, "
                        "and faster to decode as sparsity grows; an artifact is re-merged and repacked at each "
                        "switch), dense (plain matrices with zeros), or auto (sparse for a --format compressed "
                        "folder where the kernels run, else dense)")


def _add_format_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["dense", "compressed"], default="dense",
                   help="dense: weights with zeros, for any transformers; compressed: compressed-tensors "
                        "sparse-bitmask (values + bitmask), smaller on disk, loaded back by epts")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, except where there is none to show (unset, off, or a
    switch such as --no-refit-sparsegpt, whose "default: True" would read as the switch being on)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def _parsed(text: str, kind: type, wanted: str):
    """`text` as `kind`; argparse's own message would name this module's function, not what is wanted."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _parsed(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = _parsed(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = _parsed(text, float, "a number >= 0")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _rms_or_none(text: str) -> float | str:
    """A positive number, or "none" (kept as the string: an unset flag is None)."""
    if text.strip().lower() == "none":
        return "none"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number or none, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epts", description="Elastic post-training sparsity for causal LMs",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"epts {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: all cores)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="single-sparsity one-shot pruning (magnitude, Wanda, SparseGPT)")
    _add_model_args(p)
    p.add_argument("--method", default="wanda", choices=sorted(METHODS),
                   help="magnitude (no calibration), wanda, or sparsegpt (with a weight update)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--sparsity", help="unstructured sparsity per output row, in [0, 1) (default 0.5)")
    target.add_argument("--pattern", help="N:M pattern, e.g. 2:4 or 4:8")
    p.add_argument("--allocation", choices=["uniform", "owl"], default="uniform",
                   help="per-block sparsities for the global --sparsity: uniform, or OWL's outlier-weighted "
                        "allocation (needs --calib)")
    p.add_argument("--owl-m", type=float, default=PruneConfig.owl_m, help="OWL outlier threshold M (x the mean score)")
    p.add_argument("--owl-lambda", type=float, default=PruneConfig.owl_lambda,
                   help="OWL spread lambda of the per-block sparsity")
    p.add_argument("--calib", help="calibration text: file, folder of .txt/.jsonl, or wikitext2/c4/ptb")
    p.add_argument("--nsamples", type=_positive_int, default=CalibConfig.nsamples, help="calibration windows")
    p.add_argument("--seqlen", type=_positive_int, default=CalibConfig.seqlen, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=CalibConfig.seed, help="seed of the calibration window draw")
    p.add_argument("--forward-batch-size", type=_positive_int, default=CalibConfig.batch_size,
                   help="calibration windows per forward pass while collecting activations")
    p.add_argument("--out", help="write the pruned model here (a plain transformers folder)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_format_arg(p)
    p.add_argument("--report", help="also write the JSON report to this file")
    p.add_argument("--no-dense-eval", action="store_true", help="with --eval-data, skip the dense perplexity")
    _add_eval_args(p, "--eval-data", "--eval-seqlen", required=False)

    p = sub.add_parser("compress", help="one EPTS optimisation: write an elastic artifact")
    _add_model_args(p)
    p.add_argument("--calib", help="calibration text: file, folder of .txt/.jsonl, or wikitext2/c4/ptb (default: "
                                   "no dataset, windows the model writes itself, sampled as the --selfcal-* flags say)")
    selfcal = SelfCalConfig()
    for flag, kind, text in (("--selfcal-temperature", float, f"temperature (default {selfcal.temperature:g})"),
                             ("--selfcal-top-k", int, f"top-k cut, 0 for none (default {selfcal.top_k})"),
                             ("--selfcal-top-p", float, f"top-p (nucleus) cut, 1 for none (default {selfcal.top_p:g})")):
        p.add_argument(flag, type=kind, default=None, help=f"without --calib: the self-generated windows' {text}")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="starting recipe: default (docs/RECIPE.md), paper (METHOD.md exactly: 10 epochs at lr "
                        "1e-3) or demo (16 windows, 1 epoch); --config and the flags below go on top")
    p.add_argument("--config", help="YAML or JSON file of EPTSConfig fields (flags below override it)")
    defaults, calib = EPTSConfig(), CalibConfig()
    # default=None: an unset flag leaves the --config file's value, else the default named in the help.
    for flag, kind, text in (
            ("--nsamples", _positive_int, f"calibration windows (default {calib.nsamples})"),
            ("--seqlen", _positive_int, f"tokens per calibration window (default {calib.seqlen})"),
            ("--seed", int, f"seed of the window draw and of every block's adapter initialisation (default "
                            f"{calib.seed})"),
            ("--epochs", _positive_int, f"passes over the calibration windows, per block (default {defaults.epochs})"),
            ("--lr", float, f"Adam learning rate of the adapters (default {defaults.lr:g})"),
            ("--lr-reference-rms", _rms_or_none, "weight RMS at which --lr holds: each block trains at lr x its "
                                                 "prunable weights' RMS / this; none: lr as given (default none)"),
            ("--batch-size", _positive_int, f"calibration windows per optimiser step (default {defaults.batch_size})"),
            ("--groups-per-step", _positive_int, "sparsity groups trained per optimiser step, in turn (default: all, "
                                                 "as METHOD.md; fewer is faster: docs/RECIPE.md)"),
            ("--top-groups-every-step", _non_negative_int, "with --groups-per-step: the highest this many groups train at "
                                                       "every step, the others in turn (default 0)")):
        p.add_argument(flag, type=kind, default=None, help=text + ", unless --preset or --config sets it")
    p.add_argument("--criterion", choices=list(CRITERIA), default=None,
                   help=f"importance that decides which weights are pruned (default {defaults.criterion}), unless "
                        f"--preset or --config sets it")
    _add_stream_memory_arg(p, None, "the two calibration streams (dense and elastic, nsamples x seqlen x hidden "
                                     "each, per process)")
    p.add_argument("--out", required=True, help="artifact folder to write (checkpoints go there during the run)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in --out (rerunning the same command does this too)")

    p = sub.add_parser("export", help="materialise an artifact at one sparsity into a plain transformers folder")
    p.add_argument("artifact", help="an EPTS artifact folder (written by epts compress)")
    p.add_argument("--sparsity", required=True, type=float,
                   help="global budget: the fraction of prunable weights set to zero, inside the trained range")
    p.add_argument("--out", required=True, help="folder to write: a transformers model with a README.md model card")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_format_arg(p)
    p.add_argument("--allocation", choices=["uniform", "owl", "search"], default="uniform",
                   help="per-block sparsities for the global --sparsity budget")
    p.add_argument("--owl-m", type=float, default=ExportConfig.owl_m, help="OWL outlier threshold M (x the mean score)")
    p.add_argument("--owl-lambda", type=float, default=ExportConfig.owl_lambda,
                   help="OWL spread lambda of the per-block sparsity")
    p.add_argument("--calib", help="search: calibration text whose loss scores allocations; refit: calibration "
                                   "text (default: the artifact's own, reread and checked)")
    _add_refit_args(p, RefitConfig.mode)
    p.add_argument("--search-seconds", type=float, default=ExportConfig.search_seconds, help="search: time budget")
    p.add_argument("--search-samples", type=_positive_int, default=ExportConfig.search_samples,
                   help="search: calibration windows")
    p.add_argument("--search-seqlen", type=_positive_int, default=ExportConfig.search_seqlen,
                   help="search: tokens per window")
    p.add_argument("--search-start", choices=["uniform", "owl"], default=ExportConfig.search_start,
                   help="search: starting allocation")
    p.add_argument("--base", help="base model, if not the artifact's recorded spec")
    _add_dtype_arg(p)
    _add_device_arg(p)
    _add_trust_arg(p)
    _add_stream_memory_arg(p, None, "the refit's calibration streams (about three of nsamples x seqlen x hidden)")
    _add_eval_args(p, "--eval-data", "--eval-seqlen", required=False)

    p = sub.add_parser("generate", help="generate from a model, or from an artifact switched between sparsities in "
                                        "memory; prints tokens/s")
    p.add_argument("artifact", nargs="?", help="an EPTS artifact folder (else --model generates)")
    p.add_argument("--sparsity", help="comma-separated sparsities for an artifact, e.g. 0,0.5,0.7")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=_positive_int, default=48,
                   help="tokens generated at each sparsity (greedy)")
    _add_model_args(p)
    p.add_argument("--base", help="with an artifact: base model, if not the artifact's recorded spec")
    _add_runtime_arg(p)

    p = sub.add_parser("eval", help="perplexity of a model, or of an artifact at several sparsities")
    p.add_argument("artifact", nargs="?", help="an EPTS artifact folder (else --model is evaluated)")
    p.add_argument("--sparsity", help="comma-separated sparsities for an artifact, e.g. 0.3,0.5,0.7")
    _add_model_args(p)
    p.add_argument("--base", help="with an artifact: base model, if not the artifact's recorded spec")
    _add_runtime_arg(p)
    _add_refit_args(p, "none")  # in place by default: what a served model switches to
    p.add_argument("--calib", help="refit: calibration text (default: the artifact's own, reread and checked)")
    _add_stream_memory_arg(p, None, "the refit's calibration streams (about three of nsamples x seqlen x hidden)")
    _add_eval_args(p, "--data", "--seqlen", required=False)
    p.add_argument("--tasks", help="zero-shot accuracy through lm-evaluation-harness: comma-separated lm-eval task "
                                   "names (e.g. arc_easy,hellaswag; the hub), local task YAML files or folders")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="with --tasks: the first N documents of each task only")
    p.add_argument("--report", help="also write the results as JSON to this file")

    p = sub.add_parser("report", help="table and plot of perplexity against sparsity from an `epts eval --report` file")
    p.add_argument("report", help="JSON written by `epts eval ARTIFACT --sparsity ... --report FILE`")
    p.add_argument("--table", help="also write the markdown table to this file")
    p.add_argument("--plot", help="write the perplexity-against-sparsity PNG to this file")
    p.add_argument("--title", default=None, help="plot title")

    p = sub.add_parser("task", help="write a local multiple-choice task (the true next sentence among distractors) "
                                    "for `epts eval --tasks`")
    p.add_argument("text", help="text to draw it from: file, folder of .txt/.jsonl, or wikitext2/c4/ptb")
    p.add_argument("folder", help="folder to write the task's YAML and JSON lines into")
    p.add_argument("--docs", type=_positive_int, default=200, help="documents (questions)")
    p.add_argument("--choices", type=_positive_int, default=4, help="choices per document (one is right)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw and of the choice order")
    p.add_argument("--overwrite", action="store_true", help="replace a task already in the folder")
    for p in sub.choices.values():
        p.formatter_class = _HelpFormatter
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (as TQDM_DISABLE=1 does)")
    return parser


def _check_out(out: Path, overwrite: bool, inputs: dict[str, object]) -> None:
    if out.exists() and not overwrite:
        raise ValueError(f"output folder {out} already exists: choose another --out or pass --overwrite")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"--out {out} exists and is not a folder (a file or a link): choose another --out")
    refuse_inputs(out, "--out", inputs)
    _check_writable(out.parent)


def _check_report(report: str | None, inputs: dict[str, object]) -> None:
    """--report replaces only a regular file (never a link, folder or device), and never an input."""
    if report is None:
        return
    path = Path(report)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ValueError(f"--report {report} exists and is not a regular file (a link, folder or device): "
                         f"choose a new path")
    refuse_inputs(path, "--report", inputs)
    _check_writable(path.parent)


def _check_writable(folder: Path) -> None:
    """Fail before hours of work, not after, when the output cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise PermissionError(f"cannot write to {folder}: {err.strerror or err}; choose another --out") from None


def _ppl(loaded, args) -> float:
    return evaluate_ppl(loaded, args.eval_data, args.eval_seqlen, args.max_windows, progress=args.progress)


def _refuse_unused(args, defaults: object, names: tuple[str, ...], used: bool, needs: str) -> None:
    """Raise ValueError, in one line, when any option `names` (argparse dests) is set away from its
    default on `defaults` (a config class) while nothing would read it (`used` False): a value a
    user typed must not be dropped silently. `needs` says what makes those options count."""
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) != getattr(defaults, n)]
    if given and not used:
        raise ValueError(f"{', '.join(given)} only {'apply' if len(given) > 1 else 'applies'} with {needs}: drop "
                         f"{'them' if len(given) > 1 else 'it'}, or add {needs}")


def _cmd_prune(args) -> None:
    _refuse_unused(args, PruneConfig, ("owl_m", "owl_lambda"), args.allocation == "owl", "--allocation owl")
    config = PruneConfig(
        method=args.method,
        pattern=Pattern.parse(args.pattern or args.sparsity or "0.5"),
        calib=CalibConfig(args.nsamples, args.seqlen, args.seed, args.forward_batch_size),
        allocation=args.allocation,
        owl_m=args.owl_m,
        owl_lambda=args.owl_lambda,
    )
    if (METHODS[config.method].needs_inputs or config.allocation == "owl") and not args.calib:
        raise ValueError(f"--calib is required for {config.method} (e.g. ../shared/data/wikitext2/wiki.valid.tokens)")
    inputs = {"--model": args.model, "--calib": args.calib, "--eval-data": args.eval_data}
    out = Path(args.out) if args.out else None
    if out is not None:
        _check_out(out, args.overwrite, inputs)
    _check_report(args.report, inputs)
    loaded = load_model(args.model, args.dtype, args.device, args.trust_remote_code, stream=True, runtime="dense")
    if METHODS[config.method].needs_inputs:
        check_context(loaded.model, args.seqlen)
    if args.eval_data:
        check_context(loaded.model, args.eval_seqlen, "--eval-seqlen")
    result: dict = {"model": args.model}
    if args.eval_data and not args.no_dense_eval:
        result["ppl_dense"] = _ppl(loaded, args)
        print(f"dense perplexity: {result['ppl_dense']:.3f}")
    report = prune(loaded, args.calib, config, progress=args.progress and distributed.is_main())
    if not distributed.is_main():  # under torchrun: rank 0 holds the same pruned model, and reports it
        return
    result.update(report.to_dict())
    print(f"{config.method} {config.pattern}: total sparsity {report.total_sparsity:.4f}, "
          f"{report.seconds:.1f} s, peak RSS {report.peak_rss_mb:.0f} MiB")
    if args.eval_data:
        result["ppl"] = _ppl(loaded, args)
        result["eval"] = {"data": args.eval_data, "seqlen": args.eval_seqlen, "max_windows": args.max_windows}
        print(f"{config.method} {config.pattern} perplexity: {result['ppl']:.3f}")
    result["command"] = " ".join(["epts", *sys.argv[1:]])
    if out is not None:
        structure = "unstructured" if config.pattern.n is None else f"{config.pattern.m - config.pattern.n}:{config.pattern.m}"
        save_model(loaded, out, extra_json={"epts_report.json": result}, compressed=args.format == "compressed",
                   structure=structure, extra_text={"README.md": _prune_card(args, config, result, loaded.spec)},
                   overwrite=args.overwrite)
        print(f"saved {out} ({args.format}, {weights_mib(out):.1f} MiB of weights; report: {out / 'epts_report.json'})")
    if args.report:
        write_json_atomic(args.report, result)


def _prune_card(args, config: PruneConfig, result: dict, base_spec: str) -> str:
    evaluation = []
    if "ppl" in result:
        windows = f", first {args.max_windows} windows" if args.max_windows else ""
        setting = f"{args.eval_seqlen}-token windows{windows}"
        evaluation.append({"metric": "perplexity", "value": result["ppl"], "data": args.eval_data, "setting": setting})
        if "ppl_dense" in result:
            evaluation.append({"metric": "perplexity", "value": result["ppl_dense"], "data": args.eval_data,
                               "setting": f"{setting}; the dense base model, for comparison", "reference": True})
    return render(base_spec, config.method, str(config.pattern),
                  result["total_sparsity"], evaluation=evaluation, compressed=args.format == "compressed",
                  command=result["command"])


def _cmd_compress(args) -> None:
    fields = load_config_file(args.config) if args.config else {}
    calib = fields.pop("calib", None) or {}
    if not isinstance(calib, dict):
        raise ValueError(f"config file {args.config}: calib must be a mapping of nsamples, seqlen, seed, batch_size; "
                         f"got {calib!r}")
    calib = dict(calib)
    for name in ("nsamples", "seqlen", "seed"):
        if getattr(args, name) is not None:
            calib[name] = getattr(args, name)
    for name in ("epochs", "lr", "batch_size", "groups_per_step", "top_groups_every_step", "criterion"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.lr_reference_rms is not None:
        fields["lr_reference_rms"] = None if args.lr_reference_rms == "none" else args.lr_reference_rms
    if args.stream_memory is not None:
        fields["stream_memory_mb"] = args.stream_memory
    config = EPTSConfig.preset(args.preset, **fields, calib=calib)
    _split_batch(config, fields)
    sampling = {name: getattr(args, f"selfcal_{name}") for name in ("temperature", "top_k", "top_p")
                if getattr(args, f"selfcal_{name}") is not None}
    if sampling and args.calib:
        raise ValueError("the --selfcal-* flags set how the model writes its own calibration windows, which --calib "
                         "replaces: drop one or the other")
    selfcal = None if args.calib else SelfCalConfig(**sampling)  # checked before any work
    out = Path(args.out)
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run checkpointed in --out, --overwrite deletes it: pass only one "
                         "(--resume to keep the finished blocks)")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"--out {out} exists and is not a folder (a file or a link): choose another --out")
    refuse_inputs(out, "--out", {"--model": args.model, "--calib": args.calib, "--config": args.config})
    unfinished = out.is_dir() and is_unfinished_run(out)
    if args.resume and not unfinished:
        raise ValueError(f"--resume: {out} holds no unfinished compress run to continue")
    if not args.overwrite and not unfinished and out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
        raise ValueError(f"output folder {out} already exists and is not an unfinished run of epts compress: "
                         f"choose another --out or pass --overwrite")
    _check_writable(out.parent)
    # One compress at a time writes a folder (rank 0 for torchrun's processes): a second one is
    # refused before it removes (--overwrite) or adds anything.
    with folder_lock(out, "--out") if distributed.is_main() else contextlib.nullcontext():
        if args.overwrite and distributed.is_main():
            empty_folder(out, keep=LOCK)
        distributed.barrier()  # under torchrun: every process has checked --out before rank 0 writes there
        loaded = load_model(args.model, args.dtype, args.device, args.trust_remote_code, stream=True, runtime="dense")
        elastic = compress(loaded, args.calib or selfcal, config, out=out,
                           progress=args.progress and distributed.is_main(),
                           metadata={"command": " ".join(["epts", *sys.argv[1:]])})
    if not distributed.is_main():
        return
    print(f"compressed {args.model} in {elastic.stats['compress_seconds']:.1f} s"
          f"{' (resumed)' if elastic.stats['resumed'] else ''}; artifact: {out}")
    _print_compress_summary(elastic, out)


def _split_batch(config: EPTSConfig, fields: dict) -> None:
    """Under torchrun, a batch size the user did not set (not in `fields`) becomes the smallest
    multiple of the process count at least as large (one process with that batch gives the same
    result), rather than a refusal of the default; the choice is printed."""
    world = distributed.world_size()
    if "batch_size" in fields or config.batch_size % world == 0:
        return
    config.batch_size = -(-config.batch_size // world) * world
    if distributed.is_main():
        print(f"{world} processes: --batch-size {config.batch_size} (the smallest multiple of {world}; pass "
              f"--batch-size to choose another)")


def _print_compress_summary(elastic: ElasticModel, out: Path) -> None:
    config = elastic.config
    lo, hi = config.boundaries[0], config.boundaries[-1]
    kept = sum(state.group1_adapter for state in elastic.blocks)
    why = (f"dropped where the pruned weights alone reconstructed the block better at sparsity "
           f"{config.group1_check_sparsity:g}" if config.group1_check else "the group-1 check is off")
    inside = [s for s in (0.3, 0.5, 0.7) if lo < s <= hi] or [hi]
    record = elastic.calibration or {}
    if record.get("source") == SELF_GENERATED:
        sampling = ", ".join(f"{k} {v:g}" for k, v in record["sampling"].items())
        print(f"  calibration: self-generated, {config.calib.nsamples} windows of {config.calib.seqlen} tokens the "
              f"model wrote itself (seed {record['seed']}; {sampling}); no dataset")
    else:
        print(f"  calibration: {record.get('source')}")
    print(f"  trained sparsity range: {lo:g} to {hi:g} ({config.num_groups} groups)")
    print(f"  group-1 adapters kept: {kept}/{len(elastic.blocks)} blocks ({why})")
    print(f"  next: epts eval {out} --sparsity {','.join(f'{s:g}' for s in inside)} --data TEXT")
    print(f"        epts export {out} --sparsity {inside[len(inside) // 2]:g} --out FOLDER")


def _add_refit_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--refit", choices=list(REFIT_MODES), default=default,
                   help="re-solve the kept weights on the artifact's calibration with the masks fixed (least "
                        "squares): in blocks that serve the sparsity with no adapter (bare), in every block (all), "
                        "bare and in blocks where it lowers the block's error by more than --refit-margin (block), "
                        "or of bare, block, all and SparseGPT's solution the one with the lowest loss on held-out "
                        "windows of the calibration text (auto)")
    p.add_argument("--refit-iters", type=_positive_int, default=RefitConfig.iters,
                   help="refit: conjugate-gradient steps towards the exact least-squares weights")
    p.add_argument("--refit-margin", type=float, default=RefitConfig.margin,
                   help="refit block: the relative drop of a block's error needed to replace its adapters")
    p.add_argument("--refit-ridge", type=float, default=RefitConfig.ridge,
                   help="refit: pull each layer's solution toward the merged weights it replaces, with a ridge of "
                        "this times the mean diagonal of the layer's Hessian (0: plain least squares)")
    p.add_argument("--refit-mask", choices=list(REFIT_MASKS), default=RefitConfig.mask,
                   help="refit: the masks of the blocks re-solved: the elastic model's nested masks, or masks "
                        "chosen again by SparseGPT's OBS saliency on the refit's Hessians (obs)")
    p.add_argument("--no-refit-sparsegpt", dest="refit_sparsegpt", action="store_false",
                   help="refit auto: do not score SparseGPT's own solution for every block as a candidate "
                        "(saves a SparseGPT pass)")
    p.add_argument("--no-refit-block", dest="refit_block_candidate", action="store_false",
                   help="refit auto: do not score the per-block choice (as --refit block) as a candidate (saves up "
                        "to a refit pass where blocks have adapters)")
    p.add_argument("--refit-reconstruct-epochs", type=_non_negative_int, default=RefitConfig.reconstruct_epochs,
                   help="refit auto: epochs of the block-wise reconstruction of the chosen candidate (its kept weights "
                        "trained toward the dense model, masks fixed), kept where it lowers the held-out loss "
                        "(0: none; docs/RECIPE.md)")
    p.add_argument("--no-refit-reconstruct-all", dest="refit_reconstruct_all", action="store_false",
                   help="refit auto: reconstruct and tune the chosen candidate only, not also every block's "
                        "least-squares refit where another candidate won (saves a reconstruction and a tuning there)")
    p.add_argument("--refit-reconstruct-step", type=float, default=RefitConfig.reconstruct_step,
                   help="refit auto: the reconstruction's Adam step, as a fraction of each block's weight RMS")
    p.add_argument("--refit-reconstruct-rank", type=_non_negative_int, default=RefitConfig.reconstruct_rank,
                   help="refit auto: the reconstruction changes each layer's kept weights by a masked update of this "
                        "rank (0: every kept weight trains)")
    p.add_argument("--refit-tune-epochs", type=_non_negative_int, default=RefitConfig.tune_epochs,
                   help="refit auto: epochs of the end-to-end tuning after the reconstruction (every pruned block's "
                        "layers trained together toward the dense model's last hidden state, masks fixed; 0: none)")
    p.add_argument("--refit-tune-step", type=float, default=RefitConfig.tune_step,
                   help="refit auto: the end-to-end tuning's Adam step, as a fraction of the layers' weight RMS")
    p.add_argument("--refit-sparsegpt-se", type=float, default=RefitConfig.sparsegpt_se,
                   help="refit auto: keep SparseGPT's solution unless the other candidates' winner has a loss lower "
                        "by more than this many standard errors of the per-window difference (0, the default: the "
                        "lower wins; 1: the one-standard-error rule)")


def _refit_config(args) -> RefitConfig:
    if args.refit_mask != RefitConfig.mask and args.refit == "none":
        raise ValueError("--refit-mask sets the masks of the blocks a refit re-solves, but --refit is none: drop "
                         "--refit-mask, or choose a --refit mode")
    if args.refit_margin != RefitConfig.margin and args.refit != "block":
        raise ValueError(f"--refit-margin sets the per-block choice of --refit block, but --refit is {args.refit}: "
                         "drop --refit-margin, or pass --refit block")
    if not args.refit_block_candidate and args.refit != "auto":
        raise ValueError(f"--no-refit-block sets a candidate of --refit auto's choice, but --refit is {args.refit}: "
                         "drop --no-refit-block, or pass --refit auto")
    changed = [flag for flag, value, default in (
        ("--refit-reconstruct-epochs", args.refit_reconstruct_epochs, RefitConfig.reconstruct_epochs),
        ("--refit-reconstruct-step", args.refit_reconstruct_step, RefitConfig.reconstruct_step),
        ("--refit-reconstruct-rank", args.refit_reconstruct_rank, RefitConfig.reconstruct_rank),
        ("--no-refit-reconstruct-all", args.refit_reconstruct_all, RefitConfig.reconstruct_all),
        ("--refit-tune-epochs", args.refit_tune_epochs, RefitConfig.tune_epochs),
        ("--refit-tune-step", args.refit_tune_step, RefitConfig.tune_step)) if value != default]
    if changed and args.refit != "auto":
        raise ValueError(f"{changed[0]} sets the reconstruction of --refit auto's choice, but --refit is {args.refit}: "
                         f"drop {changed[0]}, or pass --refit auto")
    tuning = [flag for flag in changed if flag.startswith("--refit-tune")]
    if tuning and args.refit_reconstruct_epochs == 0:
        raise ValueError(f"{tuning[0]} sets the end-to-end tuning that follows the reconstruction, but "
                         f"--refit-reconstruct-epochs is 0: drop {tuning[0]}, or give the reconstruction epochs")
    if not args.refit_reconstruct_all and 0 in (args.refit_reconstruct_epochs, args.refit_tune_epochs):
        zero = "--refit-reconstruct-epochs" if args.refit_reconstruct_epochs == 0 else "--refit-tune-epochs"
        raise ValueError(f"--no-refit-reconstruct-all sets which candidates are reconstructed and tuned, but {zero} "
                         f"is 0: drop --no-refit-reconstruct-all, or give {zero[2:].replace('-', ' ')}")
    if not args.refit_sparsegpt and args.refit != "auto":
        raise ValueError(f"--no-refit-sparsegpt sets a candidate of --refit auto's choice, but --refit is {args.refit}: "
                         "drop --no-refit-sparsegpt, or pass --refit auto")
    if args.refit_sparsegpt_se != RefitConfig.sparsegpt_se and not (args.refit == "auto" and args.refit_sparsegpt):
        raise ValueError("--refit-sparsegpt-se sets how --refit auto weighs SparseGPT's solution, which is not scored "
                         f"here (--refit {args.refit}{', --no-refit-sparsegpt' if not args.refit_sparsegpt else ''}): "
                         "drop --refit-sparsegpt-se")
    return RefitConfig(args.refit, args.refit_iters, args.refit_margin, ridge=args.refit_ridge, mask=args.refit_mask,
                       sparsegpt=args.refit_sparsegpt, sparsegpt_se=args.refit_sparsegpt_se,
                       block_candidate=args.refit_block_candidate, reconstruct_epochs=args.refit_reconstruct_epochs,
                       reconstruct_all=args.refit_reconstruct_all,
                       reconstruct_step=args.refit_reconstruct_step, reconstruct_rank=args.refit_reconstruct_rank,
                       tune_epochs=args.refit_tune_epochs, tune_step=args.refit_tune_step)


def _cmd_export(args) -> None:
    out = Path(args.out)
    _check_out(out, args.overwrite, {"artifact": args.artifact, "--base": args.base, "--calib": args.calib,
                                     "--eval-data": args.eval_data})
    search = args.allocation == "search"
    _refuse_unused(args, ExportConfig, ("search_seconds", "search_samples", "search_seqlen", "search_start"), search,
                   "--allocation search")
    _refuse_unused(args, ExportConfig, ("owl_m", "owl_lambda"),
                   args.allocation == "owl" or (search and args.search_start == "owl"),
                   "--allocation owl (or search starting from owl)")
    if search and not args.calib:
        raise ValueError("--allocation search needs --calib (text whose loss scores the allocations)")
    if args.calib and args.refit == "none" and args.allocation != "search":
        raise ValueError("--calib is the refit's text (and the search's, with --allocation search), but --refit none "
                         "runs no refit: drop --calib, or choose a --refit mode")
    config = ExportConfig(args.allocation, args.format, args.owl_m, args.owl_lambda, args.search_seconds,
                          args.search_samples, args.search_seqlen, args.search_start, _refit_config(args),
                          args.stream_memory)
    meta = export(args.artifact, args.sparsity, out, config, calib=args.calib, base=args.base,
                  overwrite=args.overwrite, device=args.device, dtype=args.dtype,
                  trust_remote_code=args.trust_remote_code, eval_data=args.eval_data, eval_seqlen=args.eval_seqlen,
                  max_windows=args.max_windows, command=" ".join(["epts", *sys.argv[1:]]), progress=args.progress)
    if "refit" in meta:
        done = meta["refit"]
        used = done["calibration"]
        whose = "the artifact's own windows" if used["artifact_windows"] else "NOT the artifact's training windows"
        print(f"refit ({done['mode']}): {done['refit_blocks']} of {len(done['choices'])} blocks re-solved "
              f"in {done['seconds']:.0f} s, on {used['source']} ({whose})")
        losses = done["losses"]
        if losses:
            names = {"bare": "adapters kept" if "all" in losses else "least-squares refit",
                     "all": "every block refit", "block": "the blocks with adapters refit where it lowers their error",
                     "sparsegpt": "SparseGPT's solution"}
            scores = ", ".join(f"{losses[k]:.4f} {names[k]}" for k in names if k in losses)
            se = done.get("difference_se")
            rule = "" if se is None else f"; standard error of the difference to SparseGPT's {se:.4f}"
            first = names[done.get("first_choice") or done["chosen"]]
            print(f"  chose {first}: held-out loss {scores} ({done['scored_on']} windows{rule})")
            if done.get("reconstructed") is not None:
                print(f"  reconstructed block-wise: held-out loss {losses['reconstructed']:.4f}")
                if "tuned" in losses:
                    print(f"  then tuned end to end: held-out loss {losses['tuned']:.4f}")
                elif done.get("tune_skipped"):
                    print(f"  no end-to-end tuning: {done['tune_skipped']}")
                for start in ("all", "bare"):
                    if f"{start} reconstructed" in losses:
                        then = f", then tuned {losses[start + ' tuned']:.4f}" if f"{start} tuned" in losses else ""
                        print(f"  from {names[start]} too: reconstructed {losses[start + ' reconstructed']:.4f}{then}"
                              f"{'; kept from it' if done['chosen'] == start else ''}")
                kept = "tuned end to end" if done["tuned"] else "reconstructed block-wise" if done["reconstructed"] \
                    else "undone (no lower)"
                print(f"  {done['reconstruct_seconds']:.0f} s in all; kept: {kept}")
    if "search" in meta:
        found = meta["search"]
        print(f"search: calibration loss {found['start_loss']:.4f} -> {found['loss']:.4f} "
              f"({found['evaluations']} allocations tried, {found['accepted']} kept, {found['seconds']:.0f} s)")
    if "ppl" in meta:
        print(f"perplexity at {args.sparsity:g} ({args.allocation}): {meta['ppl']:.3f}")
    print(f"materialised at {args.sparsity} in {meta['materialize_seconds']:.2f} s; saved {out} ({args.format}, "
          f"{weights_mib(out):.1f} MiB of weights; model card: {out / 'README.md'})")


def _sparsity_list(text: str | None, elastic: ElasticModel) -> list[float]:
    """Parse `0.3,0.5,0.7`, checking every value against the trained range before any long work."""
    try:
        sparsities = [float(s) for s in (text or "").split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--sparsity {text!r} must be comma-separated numbers, e.g. 0.3,0.5,0.7") from None
    if not sparsities:
        raise ValueError("--sparsity is required with an artifact, e.g. --sparsity 0.3,0.5,0.7")
    for s in sparsities:
        elastic.config.group_of(s)
    return sparsities


def _load_served(args) -> tuple[object, list[float | None]]:
    """What eval and generate serve: (a RuntimeModel of the artifact, its sparsities), or (None,
    [None]) for --model. An artifact's runtime is packed with --runtime sparse: its base blocks then
    stay on disk, read when a switch re-merges them."""
    if args.artifact is None:
        return None, [None]
    packed = args.runtime == "sparse"  # auto: an artifact is served dense, as it was trained
    if packed:
        if getattr(args, "refit", "none") != "none":
            raise ValueError("--refit re-solves dense weights: use it with --runtime dense, or export the refit "
                             "model with --format compressed and evaluate it with --model")
        sparse_kernels.require()
    elastic = ElasticModel.load(args.artifact, base=args.base, device=args.device, dtype=args.dtype, stream=packed,
                                trust_remote_code=args.trust_remote_code)
    sparsities = _sparsity_list(args.sparsity, elastic)
    return RuntimeModel(elastic, packed=packed), sparsities


def _cmd_generate(args) -> None:
    if not args.prompt.strip():
        raise ValueError("--prompt is empty: give text to continue")
    if args.artifact is None and args.sparsity:
        raise ValueError("--sparsity needs an artifact folder (epts generate ARTIFACT --sparsity ...)")
    runtime, sparsities = _load_served(args)
    loaded = runtime.loaded if runtime else load_model(args.model, args.dtype, args.device, args.trust_remote_code,
                                                       runtime=args.runtime)
    prompt = loaded.tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    length = prompt.shape[1]
    if length == 0:
        raise ValueError(f"--prompt {args.prompt!r} gives no tokens: give text to continue")
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if limit is not None and length + args.max_new_tokens > limit:
        raise ValueError(f"--prompt ({length} tokens) and --max-new-tokens {args.max_new_tokens} run past the model's "
                         f"context of {limit} tokens: use --max-new-tokens {max(limit - length, 0)} or less, or a "
                         f"shorter prompt")
    prompt = prompt.to(loaded.device)
    for s in sparsities:
        label = "" if s is None else f" at sparsity {s:g}"
        switch = ""
        if runtime is not None:
            start = time.perf_counter()
            runtime.set_sparsity(s)
            switch = f", switched in {time.perf_counter() - start:.2f} s"
        done = generate_timed(loaded.model, prompt, args.max_new_tokens)
        speed = "-" if done.decode_tokens_per_s is None else f"{done.decode_tokens_per_s:.1f}"
        kind = "sparse" if packed_layers(loaded.model) else "dense"
        print(f"--- {kind} runtime{label}: {speed} tokens/s decoding, prefill {done.prefill_seconds:.2f} s, "
              f"{packed_bytes(loaded.model) / 2**20:.1f} MiB of weights{switch}")
        print(args.prompt + loaded.tokenizer.decode(done.ids, skip_special_tokens=True), flush=True)


def _accuracy(loaded, args) -> list[dict]:
    return zero_shot(loaded, args.tasks, limit=args.limit, progress=args.progress)


def _describe_folder(spec: str) -> str | None:
    """What a folder that epts wrote is, from the record it left there; None for any other model."""
    folder = Path(spec)
    if (folder / "manifest.json").is_file() and not (folder / "config.json").is_file():
        raise ValueError(f"{spec} is an EPTS artifact, not a model folder: evaluate it at chosen sparsities with "
                         f"`epts eval {spec} --sparsity 0.3,0.5,0.7 ...`")
    if (folder / "epts_export.json").is_file():
        meta = json.loads((folder / "epts_export.json").read_text(encoding="utf-8"))
        return (f"{spec}: exported by epts export from the artifact {meta.get('artifact')} at sparsity "
                f"{meta['sparsity']:g} ({meta['allocation']} allocation; {meta['total_sparsity']:.4f} of the pruned "
                f"layers' weights are zero)")
    if (folder / "epts_report.json").is_file():
        report = json.loads((folder / "epts_report.json").read_text(encoding="utf-8"))
        return (f"{spec}: pruned by epts prune from {report.get('model')} with {report.get('method')} at "
                f"{report.get('pattern')} ({report['total_sparsity']:.4f} of the pruned layers' weights are zero)")
    return None


def _cmd_eval(args) -> None:
    _check_report(args.report, {"artifact": args.artifact, "--model": args.model, "--base": args.base,
                                "--data": args.eval_data})
    if args.eval_data is None and args.tasks is None:
        raise ValueError("nothing to evaluate: give --data TEXT (perplexity), --tasks TASKS (zero-shot accuracy "
                         "through lm-eval), or both")
    if args.tasks:
        parse_tasks(args.tasks)  # a missing task file or lm-eval install fails now, before any loading
    rows, accuracy = [], []
    if args.artifact is not None and args.calib and args.refit == "none":
        raise ValueError("--calib is the refit's text, but --refit none (the default of eval) runs no refit: "
                         "drop --calib, or choose a --refit mode")
    runtime, sparsities = _load_served(args)
    if runtime is None:
        artifact_only = {"--sparsity": args.sparsity, "--base": args.base, "--calib": args.calib,
                         "--refit": args.refit != "none", "--stream-memory": args.stream_memory is not None}
        given = [flag for flag, on in artifact_only.items() if on]
        if given:
            raise ValueError(f"{given[0]} needs an artifact folder (epts eval ARTIFACT --sparsity ... {given[0]} ...); "
                             f"--model {args.model} is evaluated as it is")
        described = _describe_folder(args.model)
        if described:
            print(described)
        # lm-eval's harness wants the whole model; perplexity streams it block by block (dense).
        loaded = load_model(args.model, args.dtype, args.device, args.trust_remote_code, stream=not args.tasks,
                            runtime=args.runtime)
        if args.eval_data:
            ppl = _ppl(loaded, args)
            print(f"perplexity: {ppl:.3f}")
            rows = [{"model": args.model, "ppl": ppl}]
        if args.tasks:
            accuracy = [{"model": args.model, **row} for row in _accuracy(loaded, args)]
    else:
        elastic = runtime.elastic
        if args.eval_data:
            check_context(elastic.base.model, args.eval_seqlen)
            print("| sparsity | perplexity | switch s |\n|---|---|---|")
        config = _refit_config(args)
        text = refit_calibration(elastic, args.calib, progress=args.progress,
                                 heldout=config.compare_windows if config.mode == "auto" else 0
                                 ) if config.mode != "none" else None
        for s in sparsities:
            start = time.perf_counter()
            runtime.set_sparsity(s)
            if text is not None:  # what `epts export --refit` gives, measured without writing a folder
                with StreamStore(args.stream_memory) as store:
                    refit(elastic, runtime.loaded, runtime.sparsity, text.windows, config,
                          elastic.config.calib.batch_size, args.progress, store, text.heldout)
            seconds = time.perf_counter() - start
            if args.eval_data:
                ppl = _ppl(runtime.loaded, args)
                print(f"| {s:g} | {ppl:.3f} | {seconds:.2f} |", flush=True)
                rows.append({"artifact": args.artifact, "sparsity": s, "ppl": ppl, "switch_seconds": seconds})
            if args.tasks:
                accuracy += [{"artifact": args.artifact, "sparsity": s, **row}
                             for row in _accuracy(runtime.loaded, args)]
    if accuracy:
        first = "model" if args.artifact is None else "sparsity"
        print(f"| {first} | task | acc | acc_norm | documents |\n|---|---|---|---|---|")
        for row in accuracy:
            norm = "-" if row["acc_norm"] is None else f"{row['acc_norm']:.4f}"
            print(f"| {row[first]:{'g' if first == 'sparsity' else ''}} | {row['task']} | {row['acc']:.4f} | "
                  f"{norm} | {row['n']} |")
    if args.report:
        eval_spec = {"data": args.eval_data, "seqlen": args.eval_seqlen, "max_windows": args.max_windows,
                     "tasks": args.tasks, "limit": args.limit}
        write_json_atomic(args.report, {"rows": rows, "zeroshot": accuracy, "eval": eval_spec,
                                        "peak_rss_mb": peak_rss_mb()})


def _cmd_report(args) -> None:
    try:
        report = json.loads(Path(args.report).read_text(encoding="utf-8"))
        text = report_table(report)
        if args.table:
            with atomic_path(args.table) as tmp:
                tmp.write_text(text, encoding="utf-8")
        if args.plot:
            report_plot(report, args.plot, args.title)
    except OSError as err:  # a folder given as the report, a full disk: a one-line error like the others
        raise ValueError(str(err)) from err
    print(text, end="")


def _cmd_task(args) -> None:
    try:
        path = write_continuation_task(args.text, args.folder, args.docs, args.choices, args.seed,
                                       overwrite=args.overwrite)
    except OSError as err:
        raise ValueError(str(err)) from err
    print(f"wrote {path} ({args.docs} documents, chance {1 / args.choices:.2f}): epts eval ... --tasks {path}")


COMMANDS = {"prune": _cmd_prune, "compress": _cmd_compress, "export": _cmd_export, "eval": _cmd_eval,
            "generate": _cmd_generate, "report": _cmd_report, "task": _cmd_task}
_USER_ERRORS = (ArtifactError, NonFiniteError, NonFiniteActivationError, ValueError, ModelLoadError, DataError,
                UnsupportedArchitectureError, FileNotFoundError, FileExistsError, PermissionError, ScratchSpaceError,
                sparse_kernels.SparseRuntimeUnavailable)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed.init()  # under torchrun only
    args.progress = not (args.quiet or _env_flag("TQDM_DISABLE"))
    if not args.progress:
        _silence_progress_bars()
    sweep_scratch()  # what processes killed outright (SIGKILL, a lost node) left in TMPDIR
    # SIGTERM (pre-emption, `timeout`, torchrun stopping its workers) unwinds as Ctrl-C does, so
    # the scratch files and temporary folders are removed on the way out.
    _SIGNALLED.clear()
    previous = {}
    if _in_main_thread():
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate),
                    signal.SIGINT: signal.signal(signal.SIGINT, _interrupt)}
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt as err:
        traceback.clear_frames(err.__traceback__)
        return _stopped(args, isinstance(err, _Terminated))
    except Exception as err:
        if not (_SIGNALLED or isinstance(err, _USER_ERRORS)):
            raise
        # The failed frames still hold their open progress bars, which would redraw below the
        # message when collected: released first, the bars close and the message is the last line.
        traceback.clear_frames(err.__traceback__)
        # A signal raised inside a library call that catches what it calls (torch building a tensor
        # from a storage does) comes back as another error: the signal is what stopped the command.
        if _SIGNALLED:
            return _stopped(args, _SIGNALLED[0] == signal.SIGTERM)
        message = " ".join(str(err).split())  # one line, whatever the library underneath wrote
        print(f"epts {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(signum, handler)
    return 0


def _stopped(args, terminated: bool) -> int:
    """Say that Ctrl-C or SIGTERM stopped the command, and what was kept; the exit status."""
    how = "terminated (SIGTERM)" if terminated else "interrupted"
    print(f"\nepts {args.command}: {how}{_resume_hint(args)}", file=sys.stderr)
    return 128 + signal.SIGTERM if terminated else 130


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, as SIGINT raises KeyboardInterrupt."""


_SIGNALLED: list[int] = []  # the signals received while a command runs


def _terminate(signum, frame) -> None:
    _SIGNALLED.append(signum)
    raise _Terminated


def _interrupt(signum, frame) -> None:
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _silence_progress_bars() -> None:
    """--quiet for the libraries underneath too: tqdm bars made without an explicit `disable` read
    TQDM_DISABLE; transformers and huggingface_hub have switches of their own."""
    from transformers.utils import logging as hf_logging

    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    hf_logging.disable_progress_bar()


def _resume_hint(args) -> str:
    """After Ctrl-C: what was kept and how to continue (compress checkpoints after every block)."""
    if args.command != "compress":
        return ""
    out = Path(args.out)
    if not is_unfinished_run(out):
        return f"; interrupted before the first block finished, so nothing was saved in {out}"
    done = json.loads((out / CHECKPOINT).read_text(encoding="utf-8"))["next_block"]
    again = ("rerun the command with --resume in place of --overwrite (--overwrite would delete them)"
             if args.overwrite else "rerun the same command (or add --resume)")
    return f"; {done} finished blocks are checkpointed in {out}: {again} to continue from block {done + 1}"


if __name__ == "__main__":
    sys.exit(main())
