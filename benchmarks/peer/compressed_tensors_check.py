"""Peer check: the real library stack reads epts' sparse-bitmask checkpoints back exactly.

Runs INSIDE benchmarks/peer/.venv-ct (made by setup_ct.sh: transformers 4.x and a
compressed-tensors release that still has `BitmaskCompressor`), never in the project's .venv:

    benchmarks/peer/.venv-ct/bin/python benchmarks/peer/compressed_tensors_check.py \
        --compressed DIR --dense DIR [--out result.json]

--compressed is a folder epts wrote with `save_model(..., compressed=True)`, --dense the same
model written dense (zeros in place). Three comparisons, all with torch.equal (so -0.0 == +0.0):

1. transformers: `AutoModelForCausalLM.from_pretrained` of both folders (the compressed-tensors
   HF quantizer decompresses the sparse-bitmask folder on load), every state_dict tensor, plus the
   logits of both models on a few fixed token windows.
2. compressed-tensors alone: `ModelCompressor.from_pretrained(DIR)` and its sparsity compressor's
   (`BitmaskCompressor`) `decompress(DIR)`, every tensor it yields against the dense folder's
   safetensors, by name.
3. compressed-tensors as the writer: the dense folder's tensors compressed by
   `ModelCompressor.compress` with the folder's own sparsity config, against the compressed
   folder's safetensors: same names, dtypes, shapes and values (byte layout of the format).

Prints a JSON report (versions, counts, max abs diff, PASS/FAIL), also written to --out.
Exit code 0 on PASS, 1 on FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import traceback
from pathlib import Path

# The hub is never needed: everything is loaded from local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compressed", type=Path, required=True, help="sparse-bitmask folder written by epts")
    p.add_argument("--dense", type=Path, required=True, help="the same model written dense")
    p.add_argument("--out", type=Path, help="write the JSON report here too")
    p.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        help="dtype to load both models in; default: the dense folder's config (dtype/torch_dtype), else "
        "float32. Always passed explicitly: without it the compressed-tensors quantizer loads in float16",
    )
    return p.parse_args(argv)


def versions() -> dict[str, str]:
    import compressed_tensors
    import safetensors
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "safetensors": safetensors.__version__,
    }


def config_dtype(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return name if name in _DTYPES else "float32"


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict:
    """Tensor-by-tensor comparison of two name -> tensor maps."""
    common = sorted(got.keys() & want.keys())
    unequal, max_diff = [], 0.0
    for name in common:
        a, b = got[name], want[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            unequal.append(f"{name}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
            max_diff = float("inf")
            continue
        if not torch.equal(a, b):
            unequal.append(name)
        if a.is_floating_point() and a.numel():
            max_diff = max(max_diff, (a.double() - b.double()).abs().max().item())
        elif a.numel():
            max_diff = max(max_diff, float((a.long() - b.long()).abs().max().item()))
    return {
        "compared": len(common),
        "equal": len(common) - len(unequal),
        "max_abs_diff": max_diff,
        "only_in_compressed": sorted(got.keys() - want.keys())[:20],
        "only_in_dense": sorted(want.keys() - got.keys())[:20],
        "n_only_in_compressed": len(got.keys() - want.keys()),
        "n_only_in_dense": len(want.keys() - got.keys()),
        "unequal": unequal[:20],
        "ok": not unequal and got.keys() == want.keys() and len(common) > 0,
    }


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    files = (
        sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        if index.is_file()
        else [folder / "model.safetensors"]
    )
    state = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def check_transformers(compressed: Path, dense: Path, dtype: torch.dtype) -> dict:
    from transformers import AutoModelForCausalLM

    want_model = AutoModelForCausalLM.from_pretrained(dense, torch_dtype=dtype)
    got_model, info = AutoModelForCausalLM.from_pretrained(compressed, torch_dtype=dtype, output_loading_info=True)
    result = compare(got_model.state_dict(), want_model.state_dict())
    result["loading_info"] = {k: sorted(v)[:20] for k, v in info.items() if v}
    result["hf_quantizer"] = type(getattr(got_model, "hf_quantizer", None)).__name__
    result["compressed_model_dtype"] = str(got_model.dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, want_model.config.vocab_size, (2, 64), generator=g)
    with torch.no_grad():
        a, b = got_model(ids).logits, want_model(ids).logits
    result["logits_equal"] = torch.equal(a, b)
    result["logits_max_abs_diff"] = (a.double() - b.double()).abs().max().item()
    # The loading info lists weights transformers did not find in the checkpoint; for a tied
    # lm_head that is expected, for anything else it would be randomly initialised.
    result["ok"] = result["ok"] and result["logits_equal"]
    return result


def check_compressed_tensors(compressed: Path, dense_state: dict[str, torch.Tensor]) -> dict:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.sparse_compressors import BitmaskCompressor

    compressor = ModelCompressor.from_pretrained(str(compressed))
    if compressor is None or compressor.sparsity_compressor is None:
        return {"ok": False, "error": "ModelCompressor.from_pretrained found no sparsity config"}
    sparse = compressor.sparsity_compressor
    if not isinstance(sparse, BitmaskCompressor):
        return {"ok": False, "error": f"sparsity compressor is {type(sparse).__name__}, not BitmaskCompressor"}
    got = dict(sparse.decompress(str(compressed)))
    result = compare(got, dense_state)
    result["compressor"] = type(sparse).__name__
    result["sparsity_config"] = sparse.config.model_dump()
    return result


def check_reference_writer(compressed: Path, dense: Path, dense_state: dict[str, torch.Tensor], dtype) -> dict:
    from compressed_tensors.compressors import ModelCompressor
    from transformers import AutoModelForCausalLM

    compressor = ModelCompressor.from_pretrained(str(compressed))
    if compressor is None or compressor.sparsity_compressor is None:
        return {"ok": False, "error": "ModelCompressor.from_pretrained found no sparsity config"}
    model = AutoModelForCausalLM.from_pretrained(dense, torch_dtype=dtype)  # only to resolve targets
    want = compressor.compress(model, state_dict=dict(dense_state))
    return compare(read_folder(compressed), want)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype_name = args.dtype or config_dtype(args.dense)
    report: dict = {
        "compressed": str(args.compressed),
        "dense": str(args.dense),
        "versions": versions(),
        "dtype": dtype_name,
    }
    dense_state = read_folder(args.dense)
    for name, run in (
        ("transformers_load", lambda: check_transformers(args.compressed, args.dense, _DTYPES[dtype_name])),
        ("compressed_tensors_decompress", lambda: check_compressed_tensors(args.compressed, dense_state)),
        ("compressed_tensors_writer", lambda: check_reference_writer(args.compressed, args.dense, dense_state,
                                                                     _DTYPES[dtype_name])),
    ):
        try:
            report[name] = run()
        except Exception as e:  # noqa: BLE001 - a loader that raises is a FAIL, with its message
            report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            if "meta tensor" in str(e):
                report[name]["hint"] = (
                    "transformers >= 4.56 compresses the meta-device model before loading, which "
                    "BitmaskCompressor cannot do: unstructured sparse-bitmask checkpoints load only with transformers <= 4.55"
                )
    checks = ("transformers_load", "compressed_tensors_decompress", "compressed_tensors_writer")
    report["result"] = "PASS" if all(report[k]["ok"] for k in checks) else "FAIL"
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as f:
            f.write(text + "\n")
        os.replace(f.name, args.out)
    summary = {k: {f: report[k].get(f) for f in ("compared", "equal", "max_abs_diff", "error")} for k in checks}
    print(f"{report['result']}: {json.dumps(summary)}", file=sys.stderr)
    return 0 if report["result"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
