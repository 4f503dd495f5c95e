"""epts's compiled CPU kernels, built once per torch version and source: the sparse runtime's bitmask
kernels (csrc/bitmask_linear.cpp) and SparseGPT's OBS column sweep (csrc/obs_sweep.cpp).

Built with PyTorch's C++ extension tooling (`torch.utils.cpp_extension.load`) rather than shipped
as wheels: the kernels use torch's own intra-op thread pool and dispatcher, so they must match the
installed torch's ABI, and g++ is all a CPU machine needs. `scripts/setup.sh` builds them
(calling `unavailable_reason()`); where they cannot be built (no compiler, no x86, a read-only
cache), `available()` is False with the reason, and everything but the sparse runtime works
(SparseGPT then sweeps its columns in Python, to the same bits, more slowly).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).parent / "csrc" / name for name in ("bitmask_linear.cpp", "obs_sweep.cpp"))
# -fopenmp: ATen's parallel_for is OpenMP in torch's CPU builds, and without it compiles to a serial
# loop; the library then links libgomp.so.1, which resolves to the copy torch has already loaded.
CFLAGS = ("-O3", "-std=c++17", "-fopenmp")
LDFLAGS = ("-fopenmp",)
PATHS = ("auto", "avx512_bf16", "avx512", "avx2", "portable")


class SparseRuntimeUnavailable(RuntimeError):
    """The kernels cannot run here (no compiler, a failed build); the message says why."""


def build_dir() -> Path:
    """Where the compiled library lives: under EPTS_CACHE (default ~/.cache/epts), keyed by the torch
    version, the Python version and the source's hash, so that an upgrade rebuilds."""
    root = os.environ.get("EPTS_CACHE", "")
    if root.lower() in ("off", "0", "false", ""):
        root = str(Path.home() / ".cache" / "epts")
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES) + " ".join(CFLAGS + LDFLAGS).encode()).hexdigest()[:12]
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info.major}{sys.version_info.minor}-{digest}"
    return Path(root) / "kernels" / tag


@cache
def _load() -> str | None:
    """Build (once) and load the library; returns None when it loads, else why it cannot."""
    from torch.utils import cpp_extension

    folder = build_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # pip's ninja lands beside the interpreter, which a venv's scripts do not put on PATH.
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        if not (folder / "epts_sparse.so").is_file():
            log.info("building epts's compiled kernels in %s (once per torch version, about a minute)", folder)
        cpp_extension.load(name="epts_sparse", sources=[str(f) for f in SOURCES], build_directory=str(folder),
                           extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), is_python_module=False,
                           verbose=False)
    except Exception as err:  # a missing compiler or ninja, a compile error, an unwritable cache
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        return f"the compiled kernels could not be built in {folder}: {reason}"
    return None


def unavailable_reason() -> str | None:
    """None when the sparse runtime can run here, else one line saying why not."""
    return _load()


def available() -> bool:
    return _load() is None


def require() -> None:
    """Raises SparseRuntimeUnavailable (naming why) unless the kernels are loaded."""
    reason = _load()
    if reason is not None:
        raise SparseRuntimeUnavailable(f"the sparse runtime is unavailable: {reason}; use --runtime dense")


def paths() -> list[str]:
    """The instruction-set paths this CPU can run, fastest first ("avx512", "avx2", "portable")."""
    require()
    return list(torch.ops.epts_sparse.bitmask_paths())


def padding() -> int:
    """Elements the kernels may read past a layer's last kept value (the packed values carry them)."""
    require()
    return int(torch.ops.epts_sparse.padding())


def bitmask_linear(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor,
                   in_features: int, path: str = "auto") -> torch.Tensor:
    """x [tokens, in_features] times the packed weight [out, in_features] transposed: [tokens, out], in
    x's dtype (float32, bfloat16 or float16, that of `values`), accumulated in float32."""
    return torch.ops.epts_sparse.bitmask_linear(x, values, bitmask, row_offsets, in_features, path)


def bitmask_decompress(values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor, in_features: int,
                       row0: int, row1: int, path: str = "auto") -> torch.Tensor:
    """Rows [row0, row1) of the packed weight as a dense [row1 - row0, in_features] tensor."""
    return torch.ops.epts_sparse.bitmask_decompress(values, bitmask, row_offsets, in_features, row0, row1, path)


def obs_sweep(w1: torch.Tensor, hinv1: torch.Tensor, prune1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's OBS sweep over one block of columns with its mask chosen (csrc/obs_sweep.cpp):
    `w1` [rows, count] float32, contiguous, overwritten; `hinv1` [count, count] float32, the block of
    the upper Cholesky factor of H^-1; `prune1` [rows, count] bool, True where pruned. Returns the
    kept weights (zeros where pruned) and the errors, both [rows, count] float32. Raises
    SparseRuntimeUnavailable where the kernels cannot be built."""
    require()
    return torch.ops.epts_sparse.obs_sweep(w1, hinv1, prune1)
