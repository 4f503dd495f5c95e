#!/usr/bin/env bash
# Idempotent: makes benchmarks/peer/.venv-llamacpp, the venv in which llamacpp_decode.py runs
# (llama.cpp through llama-cpp-python, the CPU user's alternative to the sparse runtime).
# llama-cpp-python builds llama.cpp from source with cmake (5-15 minutes on 2 cores): a plain
# CPU build, native instructions, no BLAS, no CUDA/Metal/Vulkan; it runs under `nice` so that it
# does not crowd other work on a shared machine. Versions come from llamacpp-constraints.txt.
# On this project's VM (AVX-512 + AMX) the build's default extra weight buffers (AMX / repack)
# segfault on Q4_1 / Q8_0 models; llamacpp_decode.py turns them off when it loads a model.
# benchmarks/quiet.sh pauses every process whose command line says "python", and the compiler
# runs of this build do (their paths name llama-cpp-python): a quiet run elsewhere stalls it.
#
#     bash benchmarks/peer/setup_llamacpp.sh            # then
#     benchmarks/peer/.venv-llamacpp/bin/python benchmarks/peer/llamacpp_decode.py
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv-llamacpp"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q -c "$HERE/llamacpp-constraints.txt" numpy gguf
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  export CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
  # --no-binary: always the source build above, never a prebuilt wheel from elsewhere.
  nice -n 10 "${PIP[@]}" install -v --no-cache-dir --no-binary llama-cpp-python \
    -c "$HERE/llamacpp-constraints.txt" llama-cpp-python
fi
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import llama_cpp, gguf, numpy
from gguf import quants
assert hasattr(quants, "quantize"), "this gguf has no gguf.quants.quantize (needed for the F16/Q8_0 conversions)"
print(f"llama-cpp-python {llama_cpp.__version__}, gguf {md.version('gguf')}, numpy {numpy.__version__}")
print(llama_cpp.llama_print_system_info().decode())
PY
