#!/usr/bin/env bash
# Creates benchmarks/peer/.venv for the llm-compressor peer check (llmcompressor_check.py).
# Separate from the project's own .venv on purpose: llmcompressor pins its own transformers,
# accelerate, compressed-tensors and datasets. Idempotent: re-running only fills in what is missing.
#
# torch is installed FIRST and pinned to 2.13.0 so that pip sees it satisfied when it resolves
# llmcompressor; a bare `torch` requirement would fetch a multi-GB CUDA build from PyPI.
# On this project's machines `pip install torch==2.13.0` resolves to the local 2.13.0+cpu wheel.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
PYTHON="${PYTHON:-python3}"

TORCH_PIN="torch==2.13.0"
LLMC_PIN="llmcompressor==0.14.0.1"       # requires torch>=2.10,<=2.14 and transformers>=5.15,<=5.17
TRANSFORMERS_PIN="transformers==5.17.0"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

"${PIP[@]}" install -q "$TORCH_PIN"
"${PIP[@]}" install -q -c "$HERE/llmcompressor-constraints.txt" "$TORCH_PIN" "$LLMC_PIN" "$TRANSFORMERS_PIN"

# Guard: CPU torch only, and no CUDA runtime wheels (nvidia-ml-py, a pure-Python NVML binding
# that llmcompressor requires, is allowed).
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md, sys
import torch
bad = sorted(d.metadata["Name"] for d in md.distributions()
             if d.metadata["Name"].lower().startswith(("nvidia-", "nvidia_", "triton"))
             and d.metadata["Name"].lower().replace("_", "-") != "nvidia-ml-py")
if torch.version.cuda or bad:
    sys.exit(f"setup.sh: CUDA packages got installed (torch cuda={torch.version.cuda}, {bad}); "
             "remove benchmarks/peer/.venv and install a CPU torch first")
import llmcompressor, transformers
print(f"peer venv ready: torch {torch.__version__}, llmcompressor {md.version('llmcompressor')}, "
      f"transformers {transformers.__version__}")
EOF
