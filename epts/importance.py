"""Importance scores (Wanda, magnitude) and the masks they induce: per-row top-k (nested) and N:M."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: unstructured `sparsity` per output row, or N zeros in every M inputs."""

    sparsity: float | None = None
    n: int | None = None
    m: int | None = None

    def __post_init__(self):
        if (self.sparsity is None) == (self.n is None):
            raise ValueError("a pattern is either an unstructured sparsity or an N:M pattern, not both or neither")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity {self.sparsity} is outside [0, 1)")
        if self.n is not None and (self.m is None or not 0 < self.n < self.m):
            raise ValueError(f"N:M pattern {self.n}:{self.m} is invalid: need 0 < N < M")

    @classmethod
    def parse(cls, text: str | float) -> "Pattern":
        """`0.5` -> unstructured 50 %; `2:4` -> two zeros in every four consecutive inputs."""
        if isinstance(text, str) and ":" in text:
            try:
                n, m = (int(x) for x in text.split(":"))
            except ValueError:
                raise ValueError(f"N:M pattern {text!r} is not two integers like 2:4") from None
            return cls(n=n, m=m)
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"sparsity {text!r} is neither a number in [0, 1) nor an N:M pattern like 2:4") from None
        return cls(sparsity=value)

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"


def kept_per_row(d_in: int, sparsity: float) -> int:
    """floor((1 - s) * d_in), rounded first so that 0.3 * 1000 is not 299.99999 kept."""
    return math.floor(round((1.0 - sparsity) * d_in, 6))


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """S[i, j] = |W[i, j]| * ||X_j||_2."""
    return weight.detach().abs().float() * input_norm.to(weight.device).float().unsqueeze(0)


def ria_scores(weight: torch.Tensor, input_norm: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """RIA, relative importance and activations (Zhang et al., ICLR 2024):
    S[i, j] = (|W[i, j]| / sum_k |W[i, k]| + |W[i, j]| / sum_k |W[k, j]|) * ||X_j||_2 ** power.
    Within a row the first term only scales |W|; the second favours weights that are large for
    their input channel. An all-zero row or column scores 0."""
    w = weight.detach().abs().float()
    relative = w / w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny) \
        + w / w.sum(0, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return relative * input_norm.to(weight.device).float().pow(power).unsqueeze(0)


CRITERIA = ("wanda", "magnitude", "ria")


def importance_scores(weight: torch.Tensor, input_norm: torch.Tensor | None, criterion: str = "wanda") -> torch.Tensor:
    """The EPTS importance of every weight (METHOD.md, ingredient 1), chosen here once for the
    optimisation and the artifact: magnitude |W| where no input norms were recorded (criterion
    "magnitude"), else Wanda's |W| * ||X_j|| (criterion "wanda", METHOD.md's) or RIA's
    (`ria_scores`, criterion "ria", an epts option). `weight` (d_out, d_in), `input_norm` (d_in,);
    float32 result. Raises ValueError for another criterion."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion {criterion!r} is not one of {', '.join(CRITERIA)}")
    if input_norm is None:
        return magnitude_scores(weight)
    return ria_scores(weight, input_norm) if criterion == "ria" else wanda_scores(weight, input_norm)


def row_ranks(scores: torch.Tensor) -> torch.Tensor:
    """rank[i, j] = position of weight j in row i when sorted by descending score.

    A stable sort breaks ties by the lower input index, so ranks (and the masks `rank < k`) are
    deterministic, and masks from one score matrix are nested across sparsities by construction.
    """
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    dtype = torch.int16 if scores.shape[1] <= torch.iinfo(torch.int16).max else torch.int32
    ranks = torch.empty_like(order, dtype=dtype)
    positions = torch.arange(scores.shape[1], device=scores.device, dtype=dtype).expand_as(order)
    ranks.scatter_(1, order, positions)
    return ranks


def mask_from_ranks(ranks: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask: the top floor((1 - s) * d_in) weights of every output row."""
    return ranks < kept_per_row(ranks.shape[1], sparsity)


def float_mask(ranks: torch.Tensor, sparsity: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The keep-mask of `mask_from_ranks` as 0./1. of `dtype`, built as clamp(k - rank, 0, 1): on the
    CPU this is twice as fast as a comparison followed by a multiply with the bool mask, and it sits
    on the hot path of every training step. Always computed in float32, which holds ranks exactly
    up to 2^24 (bfloat16 only to 256, float16 to 2048), then the exact 0/1 result is cast."""
    k = kept_per_row(ranks.shape[1], sparsity)
    return (k - ranks.to(torch.float32)).clamp_(0.0, 1.0).to(dtype)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean keep-mask zeroing the `n` lowest-scoring weights in every `m` consecutive inputs."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m} needs the input size ({cols}) to be a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)
    ranks = row_ranks(groups.reshape(-1, m)).reshape(rows, cols // m, m)
    return (ranks < m - n).reshape(rows, cols)


def pattern_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return mask_from_ranks(row_ranks(scores), pattern.sparsity)


class InputNormStats:
    """Accumulates ||X_j||_2 of a linear layer's input channels over every calibration token."""

    def __init__(self, d_in: int):
        # float64: sums of squares over many thousand tokens lose digits in float32.
        self.sum_sq = torch.zeros(d_in, dtype=torch.float64)
        self.tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1])
        self.sum_sq += x.double().pow(2).sum(0).to(self.sum_sq.device)
        self.tokens += x.shape[0]

    def norm(self) -> torch.Tensor:
        return self.sum_sq.sqrt().float()
