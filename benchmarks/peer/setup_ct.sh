#!/usr/bin/env bash
# Idempotent: makes benchmarks/peer/.venv-ct, the venv in which compressed_tensors_check.py runs.
# transformers 4.x + a compressed-tensors release that still ships the sparse-bitmask compressor
# (compressors/sparse_compressors/sparse_bitmask.py; dropped in 0.15). CPU torch is installed
# FIRST, pinned, so that nothing pulls a CUDA build.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-ct"
PYTHON="${PYTHON:-python3}"
TORCH="torch==2.13.0"
PINS=(
  "transformers==4.55.4"
  "compressed-tensors==0.13.0"
  "safetensors"
  "accelerate"
)
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q "$TORCH"
# torch stays pinned while the rest resolve, so pip cannot swap it for a CUDA build.
"${PIP[@]}" install -q "$TORCH" "${PINS[@]}"
if "${PIP[@]}" list 2>/dev/null | grep -i '^nvidia-'; then
  echo "setup_ct.sh: nvidia-* packages got installed into $VENV; expected a CPU-only torch" >&2
  exit 1
fi
"$VENV/bin/python" - <<'PY'
import importlib.util, torch, transformers, compressed_tensors
assert importlib.util.find_spec("compressed_tensors.compressors.sparse_compressors.sparse_bitmask"), \
    "this compressed-tensors has no sparse-bitmask compressor"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"compressed-tensors {compressed_tensors.__version__}")
PY
