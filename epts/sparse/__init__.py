"""The sparse runtime: the packed format a pruned model is stored in (`format`), the compiled
kernels that multiply by it (`kernels`, csrc/), the layer that holds it (`linear`) and packed
models (`model`). The deployment path reads artifact -> materialise -> refit -> pack -> run."""

from .kernels import SparseRuntimeUnavailable, available, unavailable_reason
from .linear import SparseLinear
from .model import load_packed, pack_, packed_bytes, packed_layers

__all__ = ["SparseLinear", "SparseRuntimeUnavailable", "available", "load_packed", "pack_", "packed_bytes",
           "packed_layers", "unavailable_reason"]
