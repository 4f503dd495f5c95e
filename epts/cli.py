"""The `epts` command: parses arguments, calls the Python API, prints tables."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from . import __version__
from .baselines import METHODS, prune
from .config import CalibConfig, PruneConfig
from .data import DataError
from .evaluate import evaluate_ppl
from .importance import Pattern
from .io import write_json_atomic
from .models import DEFAULT_MODEL, ModelLoadError, load_model, save_model
from .arch import UnsupportedArchitectureError

log = logging.getLogger("epts")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, folder, .gguf file or alias (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps or auto")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with a hub model (off by default)")


def _add_eval_args(p: argparse.ArgumentParser, data_flag: str, seqlen_flag: str, required: bool) -> None:
    p.add_argument(data_flag, dest="eval_data", required=required,
                   help="evaluation text: file, folder of .txt/.jsonl, or wikitext2/c4/ptb")
    p.add_argument(seqlen_flag, dest="eval_seqlen", type=_positive_int, default=512, help="evaluation window length")
    p.add_argument("--max-windows", type=_positive_int, default=None, help="evaluate on the first N windows only")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epts", description="Elastic post-training sparsity for causal LMs")
    parser.add_argument("--version", action="version", version=f"epts {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: all cores)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="single-sparsity one-shot pruning (magnitude, Wanda, SparseGPT)")
    _add_model_args(p)
    p.add_argument("--method", default="wanda", help=f"one of {', '.join(METHODS)}")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--sparsity", help="unstructured sparsity per output row, in [0, 1) (default 0.5)")
    target.add_argument("--pattern", help="N:M pattern, e.g. 2:4 or 4:8")
    p.add_argument("--calib", help="calibration text: file, folder of .txt/.jsonl, or wikitext2/c4/ptb")
    p.add_argument("--nsamples", type=_positive_int, default=CalibConfig.nsamples)
    p.add_argument("--seqlen", type=_positive_int, default=CalibConfig.seqlen)
    p.add_argument("--seed", type=int, default=CalibConfig.seed)
    p.add_argument("--batch-size", type=_positive_int, default=CalibConfig.batch_size)
    p.add_argument("--out", help="write the pruned model here (a plain transformers folder)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--report", help="also write the JSON report to this file")
    _add_eval_args(p, "--eval-data", "--eval-seqlen", required=False)

    p = sub.add_parser("eval", help="perplexity of a model on a text")
    _add_model_args(p)
    _add_eval_args(p, "--data", "--seqlen", required=True)
    return parser


def _cmd_prune(args) -> dict:
    config = PruneConfig(
        method=args.method,
        pattern=Pattern.parse(args.pattern or args.sparsity or "0.5"),
        calib=CalibConfig(args.nsamples, args.seqlen, args.seed, args.batch_size),
    )
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}: choose one of {', '.join(METHODS)}")
    if METHODS[config.method].needs_inputs and not args.calib:
        raise ValueError(f"--calib is required for {config.method} (e.g. ../shared/data/wikitext2/wiki.valid.tokens)")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.overwrite:
        raise ValueError(f"output folder {out} already exists: choose another --out or pass --overwrite")
    loaded = load_model(args.model, args.dtype, args.device, args.trust_remote_code)
    result: dict = {"model": args.model}
    if args.eval_data:
        result["ppl_dense"] = evaluate_ppl(loaded, args.eval_data, args.eval_seqlen, args.max_windows)
        print(f"dense perplexity: {result['ppl_dense']:.3f}")
    report = prune(loaded, args.calib, config)
    result.update(report.to_dict())
    print(f"{config.method} {config.pattern}: total sparsity {report.total_sparsity:.4f}, "
          f"{report.seconds:.1f} s, peak RSS {report.peak_rss_mb:.0f} MiB")
    if args.eval_data:
        result["ppl"] = evaluate_ppl(loaded, args.eval_data, args.eval_seqlen, args.max_windows)
        result["eval"] = {"data": args.eval_data, "seqlen": args.eval_seqlen, "max_windows": args.max_windows}
        print(f"{config.method} {config.pattern} perplexity: {result['ppl']:.3f}")
    result["command"] = " ".join(["epts", *sys.argv[1:]])
    if out is not None:
        save_model(loaded, out, extra_json={"epts_report.json": result})
        print(f"saved {out} (report: {out / 'epts_report.json'})")
    if args.report:
        write_json_atomic(args.report, result)
    return result


def _cmd_eval(args) -> dict:
    loaded = load_model(args.model, args.dtype, args.device, args.trust_remote_code)
    ppl = evaluate_ppl(loaded, args.eval_data, args.eval_seqlen, args.max_windows)
    print(f"perplexity: {ppl:.3f}")
    return {"model": args.model, "ppl": ppl}


_USER_ERRORS = (ValueError, ModelLoadError, DataError, UnsupportedArchitectureError, FileNotFoundError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        {"prune": _cmd_prune, "eval": _cmd_eval}[args.command](args)
    except _USER_ERRORS as err:
        print(f"epts {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
