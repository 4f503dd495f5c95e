"""SparseGPT (Frantar & Alistarh 2023): prune column by column and let OBS updates of the
remaining weights absorb each pruning error, with the Hessian H = X^T X of the calibration inputs.

Follows the reference: 1 % dampening, lazy updates in blocks of 128 columns, mask chosen per
block by w^2 / [H^-1]_jj^2. One deliberate difference: the unstructured mask is chosen per output
row (each row prunes its share of every block), so every row has exactly the requested sparsity,
the same comparison group as Wanda and EPTS; the reference thresholds a whole block at once.
Dead input channels (zero in all calibration tokens) are pruned first, not all zeroed as in the
reference, so a layer with many of them still keeps exactly its share of every row (or N:M group).
"""

from __future__ import annotations

import logging

import torch

from .. import distributed
from ..importance import Pattern, kept_per_row
from ..sparse import kernels

log = logging.getLogger(__name__)


class SparseGPTPruner:
    needs_inputs = True
    weight_parallel = True  # under torchrun each layer is solved once, on its owner rank (`baselines.solve`)

    def __init__(self, layer: torch.nn.Linear, blocksize: int = 128, percdamp: float = 0.01):
        self.layer = layer
        self.blocksize = blocksize
        self.percdamp = percdamp
        d_in = layer.in_features
        self.hessian = torch.zeros(d_in, d_in, dtype=torch.float32, device=layer.weight.device)
        self.tokens = 0
        # The factors of a Hessian shared with other layers (`share`), by `upper_factor`: computed by
        # the first of them to ask, so q, k and v factor one Hessian once. None: not shared, not kept.
        self._factors: dict[bool, tuple] | None = None

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        # Running mean of X^T X; the scale cancels against the relative dampening.
        total = self.tokens + x.shape[0]
        self.hessian.mul_(self.tokens / total).addmm_(x.t(), x, alpha=1.0 / total)
        self.tokens = total
        if self._factors:
            self._factors.clear()

    def share(self, other: "SparseGPTPruner") -> None:
        """Take `other`'s Hessian (the same tensor, not a copy), for a layer fed the same inputs, and
        its factors once either of them has computed them (`inverse_hessian`)."""
        if other._factors is None:
            other._factors = {}
        self.hessian, self.tokens, self._factors = other.hessian, other.tokens, other._factors

    def reduce(self, owner: int = 0) -> None:
        """The Hessian over every process's tokens (torchrun), on rank `owner` only: that rank solves
        the layer and broadcasts the pruned weight; the other ranks drop their share of the Hessian."""
        if distributed.world_size() == 1:
            return
        self._factors = None  # the reduced Hessian is this layer's own
        device = self.hessian.device
        tokens = distributed.sum_(torch.tensor(float(self.tokens), dtype=torch.float64, device=device))
        # Token-weighted sum in float64, so the order of the ranks' sums barely moves the result.
        hessian = distributed.reduce_to_(self.hessian.double() * self.tokens, owner)
        self.hessian = hessian.div_(tokens).float() if distributed.rank() == owner else None
        self.tokens = int(tokens)

    def dampened_hessian(self, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """H (d_in, d_in, float32) with dead input channels (zero in every calibration token) given a
        unit diagonal and `scale` x the relative dampening added, and the dead channels (bool, d_in)."""
        h = self.hessian.clone()
        dead = torch.diag(h) == 0
        h[dead, dead] = 1.0
        damp = self.percdamp * torch.mean(torch.diag(h))
        h += scale * damp * torch.eye(h.shape[0], device=h.device)
        return h, dead

    def inverse_hessian(self, upper_factor: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The dampened H (d_in, d_in, float32), its inverse (or, with `upper_factor`, the upper
        Cholesky factor of the inverse, which the OBS sweep uses) and the dead input channels (bool,
        d_in; zero in every calibration token). A Hessian too ill-conditioned to factor gets 10x, then
        100x the dampening. Raises ValueError when even that fails. Layers sharing a Hessian (`share`)
        get the same tensors, computed once: read them, never write them."""
        if self._factors is not None and upper_factor in self._factors:
            return self._factors[upper_factor]
        factors = self._factor(upper_factor)
        if self._factors is not None:
            self._factors[upper_factor] = factors
        return factors

    def _factor(self, upper_factor: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        for scale in (1.0, 10.0, 100.0):
            h, dead = self.dampened_hessian(scale)
            try:
                inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
                return h, torch.linalg.cholesky(inverse, upper=True) if upper_factor else inverse, dead
            except torch.linalg.LinAlgError:
                log.warning("SparseGPT: the Hessian of a %d-input layer is not positive definite with %g x the "
                            "dampening", h.shape[0], scale)
        raise ValueError(f"SparseGPT: the Hessian of a {h.shape[0]}-input layer cannot be factored even with 100x "
                         f"the dampening: its calibration activations are degenerate; use more calibration text")

    def _upper(self, factors: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`inverse_hessian(upper_factor=True)` from `inverse_hessian()`'s result."""
        h, inverse, dead = factors
        try:
            return h, torch.linalg.cholesky(inverse, upper=True), dead
        except torch.linalg.LinAlgError:  # more dampening, as `inverse_hessian` gives it
            return self.inverse_hessian(upper_factor=True)

    def pruned_weight(self, pattern: Pattern) -> torch.Tensor:
        """The layer's weight (d_out, d_in), in its dtype, pruned to `pattern` with OBS updates of the
        weights kept."""
        return self.prune(pattern)[0]

    def prune(self, pattern: Pattern, factors: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`pruned_weight` and the mask it chose: the pruned weights (bool, d_out x d_in, True where
        pruned; exactly the zeros of the OBS sweep even where an update lands on zero). `factors`:
        what `inverse_hessian()` returned, for a caller that needs the inverse too (the Hessian is
        then factored once; the same bits)."""
        w = self.layer.weight.data.clone().float()
        pruned = torch.zeros_like(w, dtype=torch.bool)
        rows, cols = w.shape
        blocksize = self.blocksize
        if pattern.is_nm:
            if cols % pattern.m:
                raise ValueError(f"N:M pattern {pattern} needs the input size ({cols}) to be a multiple of {pattern.m}")
            blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)  # N:M groups never straddle two blocks
        _, hinv, dead = self.inverse_hessian(upper_factor=True) if factors is None else self._upper(factors)
        prune_per_row = 0 if pattern.is_nm else cols - kept_per_row(cols, pattern.sparsity)

        def pruned_before(col: int) -> int:
            # Spread the row's pruning quota over the blocks so that rows total exactly the quota.
            return round(prune_per_row * col / cols)

        # An unstructured mask is chosen before each block's sweep, so the compiled sweep can run it.
        compiled = not pattern.is_nm and w.device.type == "cpu" and kernels.available()
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            w1 = w[:, i1:i2].clone()
            hinv1 = hinv[i1:i2, i1:i2]
            prune1 = torch.zeros_like(w1, dtype=torch.bool)
            dead1 = dead[i1:i2]
            if not pattern.is_nm:
                k = pruned_before(i2) - pruned_before(i1)
                if k:
                    saliency = (w1.pow(2) / torch.diag(hinv1).pow(2).unsqueeze(0)).masked_fill(dead1, -1.0)
                    prune1.scatter_(1, torch.topk(saliency, k, dim=1, largest=False).indices, True)
            if compiled:
                q1, err1 = kernels.obs_sweep(w1.contiguous(), hinv1.contiguous(), prune1)
            else:
                q1, err1 = _sweep(w1, hinv1, prune1, dead1, pattern)
            w[:, i1:i2] = q1
            pruned[:, i1:i2] = prune1
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        return w.to(self.layer.weight.dtype), pruned


def _sweep(w1: torch.Tensor, hinv1: torch.Tensor, prune1: torch.Tensor, dead1: torch.Tensor,
           pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """The OBS sweep over one block of columns, column by column: `w1` [rows, count] (overwritten),
    `hinv1` its block of the upper Cholesky factor of H^-1, `prune1` [rows, count] bool (True where
    pruned; an N:M pattern's groups are chosen here, as the sweep reaches them, and written into
    it), `dead1` the block's dead input channels. Returns the kept weights and the errors, both
    [rows, count]. `kernels.obs_sweep` is the same for an unstructured mask, compiled."""
    q1 = torch.zeros_like(w1)
    err1 = torch.zeros_like(w1)
    diag1 = torch.diag(hinv1)
    for i in range(w1.shape[1]):
        if pattern.is_nm and i % pattern.m == 0:
            saliency = w1[:, i : i + pattern.m].pow(2) / diag1[i : i + pattern.m].pow(2).unsqueeze(0)
            saliency = saliency.masked_fill(dead1[i : i + pattern.m], -1.0)
            idx = torch.topk(saliency, pattern.n, dim=1, largest=False).indices
            prune1.scatter_(1, i + idx, True)
        col = w1[:, i]
        d = hinv1[i, i]
        q = col.masked_fill(prune1[:, i], 0.0)
        q1[:, i] = q
        e = (col - q) / d
        w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
        err1[:, i] = e
    return q1, err1
