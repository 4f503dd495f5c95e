"""The sparse linear layer: a weight held only as its packed bytes (kept values, bitmask, row
offsets: the layout of `epts.sparse.format`), multiplied by the bitmask kernels.

Decode (up to `DECODE_TOKENS` tokens a call) reads the packed weight directly; longer inputs
(prefill, perplexity) decompress `TILE_ROWS` rows at a time into a dense tile for a dense matmul,
which measured faster there (BENCHMARKS.md, "Sparse decode runtime").
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .format import bitmask_compress

# Measured on this project's 2-core AVX-512 machine (benchmarks/decode.py --crossover): up to 8
# tokens the packed kernel beats decompress-then-matmul on LLaMA-7B shapes; past that it does not.
DECODE_TOKENS = 8
TILE_ROWS = 256


class SparseLinear(nn.Module):
    """y = x W^T + b with W [out_features, in_features] stored packed.

    Buffers: `values` (the kept weights row-major, float32/bfloat16/float16, followed by
    `kernels.padding()` zeros the kernels may read), `bitmask` (uint8 [out_features,
    ceil(in_features / 8)], bit c % 8 of byte c / 8 is column c), `row_offsets` (int64
    [out_features], index of each row's first value), and `bias` if any. Inputs are any
    [..., in_features] tensor in the values' dtype; the output is [..., out_features]. Runs on the
    CPU; raises SparseRuntimeUnavailable where the kernels could not be built.
    """

    def __init__(self, in_features: int, out_features: int, values: torch.Tensor, bitmask: torch.Tensor,
                 row_offsets: torch.Tensor, bias: torch.Tensor | None = None, path: str = "auto"):
        super().__init__()
        kernels.require()
        if path not in kernels.PATHS:
            raise ValueError(f"path {path!r} is not one of {', '.join(kernels.PATHS)}")
        self.in_features, self.out_features, self.path = in_features, out_features, path
        self.register_buffer("values", _padded(values))
        self.register_buffer("bitmask", bitmask.contiguous())
        self.register_buffer("row_offsets", row_offsets.to(torch.int64).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, path: str = "auto") -> "SparseLinear":
        """Pack a dense 2-D weight (its zeros are the pruned weights)."""
        parts = bitmask_compress(weight.detach())
        return cls(weight.shape[1], weight.shape[0], parts["compressed"], parts["bitmask"], parts["row_offsets"],
                   bias, path)

    @classmethod
    def from_linear(cls, layer: nn.Linear, path: str = "auto") -> "SparseLinear":
        return cls.from_dense(layer.weight, layer.bias, path)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nnz(self) -> int:
        return self.values.numel() - kernels.padding()

    def packed_bytes(self) -> int:
        """Bytes the weight occupies (values without the padding, bitmask, offsets)."""
        return (self.nnz * self.values.element_size() + self.bitmask.numel()
                + self.row_offsets.numel() * self.row_offsets.element_size())

    def dense_weight(self) -> torch.Tensor:
        """The weight back as a dense [out_features, in_features] tensor (zeros where pruned)."""
        return kernels.bitmask_decompress(self.values, self.bitmask, self.row_offsets, self.in_features, 0,
                                          self.out_features, self.path)

    @torch.no_grad()
    def repack_(self, weight: torch.Tensor) -> None:
        """Replace the weight by another of the same shape and dtype (a new sparsity), in place."""
        if tuple(weight.shape) != (self.out_features, self.in_features) or weight.dtype != self.dtype:
            raise ValueError(f"repack needs a {self.dtype} weight of shape {(self.out_features, self.in_features)}, "
                             f"got {weight.dtype} {tuple(weight.shape)}")
        parts = bitmask_compress(weight)
        self.values = _padded(parts["compressed"])
        self.bitmask = parts["bitmask"].contiguous()
        self.row_offsets = parts["row_offsets"].to(torch.int64).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != self.dtype:
            raise TypeError(f"input is {flat.dtype} but the packed weight is {self.dtype}")
        if flat.shape[0] <= DECODE_TOKENS:
            out = kernels.bitmask_linear(flat.contiguous(), self.values, self.bitmask, self.row_offsets,
                                         self.in_features, self.path)
            if self.bias is not None:
                out += self.bias
        else:
            out = torch.empty(flat.shape[0], self.out_features, dtype=flat.dtype)
            for row0 in range(0, self.out_features, TILE_ROWS):
                row1 = min(row0 + TILE_ROWS, self.out_features)
                tile = kernels.bitmask_decompress(self.values, self.bitmask, self.row_offsets, self.in_features,
                                                  row0, row1, self.path)
                bias = None if self.bias is None else self.bias[row0:row1]
                out[:, row0:row1] = nn.functional.linear(flat, tile, bias)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        density = self.nnz / max(1, self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}, "
                f"density={density:.3f}, bias={self.bias is not None}")


def _padded(values: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(values.numel() + kernels.padding(), dtype=values.dtype)
    out[:values.numel()] = values.reshape(-1)
    return out
