"""MS-HiLoRA: the elastic linear layer (METHOD.md, ingredient 3).

A frozen linear with K low-rank adapter pairs. At sparsity s in group k it computes with

    W_eff = M(s) * (W + sum_{j <= k} B_j A_j)

so group k inherits the adapters of every lower group, and the mask multiplies the update too, so
the merged weight has exactly the sparsity of M(s). Without inheritance (the paper's ablation,
EPTSConfig.inherit_adapters False) group k computes with its own adapter B_k A_k only. With
EPTSConfig.group1_inherited False, group 1's adapter serves group 1 alone and the hierarchy starts
at group 2: the adapter then learns only what the lowest sparsities need. With
EPTSConfig.group1_detached True the groups above still compute with group 1's adapter but do not
train it: its gradient comes from group 1's loss alone. With EPTSConfig.adapter_ramp (an epts option, not
in the paper) adapter j enters scaled by how far s has gone through group j's interval
(`adapter_scales`), so the update fades to nothing at the group's lower edge instead of serving its whole
range at full size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .importance import float_mask


def active_adapters(group: int, group1_adapter: bool = True, inherit: bool = True,
                    group1_inherited: bool = True) -> range:
    """The adapters group `group` (0-based) computes with, stated once for training, the mixer,
    the group-1 check and the artifact's merge: adapters 0..group (the hierarchy), 1..group for a
    group above the first when `group1_inherited` is False, or only adapter `group` when `inherit`
    is False (independent per-group adapters), except group 0 of a block whose group-1 check
    dropped its adapter (`group1_adapter` False), which uses none."""
    if group == 0:
        return range(1 if group1_adapter else 0)
    return range(group if not inherit else 0 if group1_inherited else 1, group + 1)


ADAPTER_RAMPS = ("none", "group1", "all")  # EPTSConfig.adapter_ramp


def adapter_scales(adapters: range, sparsity: float, boundaries: tuple[float, ...], ramp: str) -> list[float]:
    """The factor each adapter j in `adapters` enters the merge with at `sparsity`: 1 (METHOD.md, `ramp`
    "none"), or, for the ramped adapters (group 1's for "group1", every group's for "all"),
    clip((s - lo_j) / (hi_j - lo_j), 0, 1) over group j's interval (lo_j, hi_j] of `boundaries`. An
    inherited adapter (s above its group) is at 1, so the merged weight is continuous in s across a
    group's upper edge, and at group 1's lower edge (0) the model is the dense one."""
    if ramp not in ADAPTER_RAMPS:
        raise ValueError(f"adapter_ramp {ramp!r} is not one of {ADAPTER_RAMPS}")
    ramped = {"none": 0, "group1": 1, "all": len(boundaries) - 1}[ramp]
    return [min(1.0, max(0.0, (sparsity - boundaries[j]) / (boundaries[j + 1] - boundaries[j]))) if j < ramped else 1.0
            for j in adapters]


def effective_weight(weight: torch.Tensor, ranks: torch.Tensor, sparsity: float, a: list[torch.Tensor],
                     b: list[torch.Tensor], delta: torch.Tensor | None = None,
                     scales: list[float] | None = None) -> torch.Tensor:
    """M(s) * (W + delta + sum_j c_j B_j A_j) over the given adapters, M(s) keeping the top-ranked weights
    per row; `delta` (d_out, d_in), float32, is the optional shared full-rank update (EPTSConfig.delta_lr);
    `scales` the factors c_j (`adapter_scales`; None: all 1).

    `weight` (d_out, d_in) in any float dtype; adapters A_j (r_j, d_in) and B_j (d_out, r_j) in float32.
    The sum and the mask are computed in float32 (mixed precision, as peft does: a bfloat16 sum
    would lose small adapter updates) and the result is cast once to `weight.dtype`; gradients
    flow through the cast to the float32 adapters.
    """
    merged = weight.float()
    if delta is not None:
        merged = merged + delta.float()
    if scales is not None:
        b = [bj if c == 1.0 else bj * c for bj, c in zip(b, scales)]
    if a:
        # One fused matmul-add for all the groups: W + [B_0 .. B_k] @ [A_0; ..; A_k].
        merged = torch.addmm(merged, torch.cat(b, dim=1).float(), torch.cat(a, dim=0).float())
    return (merged * float_mask(ranks, sparsity)).to(weight.dtype)


class ElasticLinear(nn.Module):
    def __init__(self, base: nn.Linear, ranks: torch.Tensor, adapter_ranks: list[int] | tuple[int, ...],
                 generator: torch.Generator | None = None, shared_update: bool = False, inherit: bool = True,
                 group1_inherited: bool = True, group1_detached: bool = False,
                 boundaries: tuple[float, ...] | None = None, ramp: str = "none"):
        """`ranks` are the weights' per-row importance ranks (`importance.row_ranks`), one adapter
        pair per entry of `adapter_ranks`; `generator` draws the A initialisation. `shared_update`
        adds a full-rank update `delta` (zeros) that every group uses, under its mask. `inherit`
        False: each group uses only its own adapter; `group1_inherited` False: groups above the first do
        not use group 1's adapter (`active_adapters`); `group1_detached` True: they use it without a
        gradient; `ramp` other than "none" scales the adapters over the groups' `boundaries` (`adapter_scales`)."""
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        # Frozen and shared with the base layer, not copied.
        self.register_buffer("weight", base.weight.detach(), persistent=False)
        self.register_buffer("bias", None if base.bias is None else base.bias.detach(), persistent=False)
        # float32 ranks, whatever the weight dtype: exact, and float_mask builds the mask from them
        # in one fused op (see importance.float_mask).
        self.register_buffer("ranks", ranks.to(base.weight.device, torch.float32), persistent=False)
        dev, dtype = base.weight.device, torch.float32  # adapters (and so Adam's state) in float32
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for r in adapter_ranks:
            a = torch.empty(r, self.in_features, dtype=dtype)
            # As nn.Linear and peft's LoRA initialise A; drawn on the CPU so a generator gives the same values anywhere.
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.A.append(nn.Parameter(a.to(dev)))
            self.B.append(nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dtype)))
        self.delta = nn.Parameter(torch.zeros_like(self.weight, dtype=dtype)) if shared_update else None
        self.inherit = inherit
        self.group1_inherited = group1_inherited
        self.group1_detached = group1_detached
        if ramp != "none" and (boundaries is None or len(boundaries) != len(adapter_ranks) + 1):
            raise ValueError(f"adapter_ramp {ramp!r} needs the {len(adapter_ranks) + 1} group boundaries")
        self.boundaries, self.ramp = boundaries, ramp
        self.scales: list[float] | None = None
        self.sparsity = 0.0
        self.adapters: range = range(0)  # indices of the adapters in use
        self.group1_frozen = False  # whether group 1's adapter, in use, takes no gradient (group1_detached)

    @property
    def num_groups(self) -> int:
        return len(self.A)

    def set_state(self, sparsity: float, group: int, group1_adapter: bool = True) -> None:
        """Compute at `sparsity` with the adapters `active_adapters(group, group1_adapter)` gives."""
        if not 0 <= group < self.num_groups:
            raise ValueError(f"group {group} outside 0..{self.num_groups - 1}")
        self.sparsity = sparsity
        self.adapters = active_adapters(group, group1_adapter, self.inherit, self.group1_inherited)
        self.group1_frozen = self.group1_detached and group > 0 and 0 in self.adapters
        self.scales = None if self.ramp == "none" else adapter_scales(self.adapters, sparsity, self.boundaries, self.ramp)

    def effective_weight(self) -> torch.Tensor:
        a = [self.A[j].detach() if j == 0 and self.group1_frozen else self.A[j] for j in self.adapters]
        b = [self.B[j].detach() if j == 0 and self.group1_frozen else self.B[j] for j in self.adapters]
        return effective_weight(self.weight, self.ranks, self.sparsity, a, b, self.delta, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain nn.Linear holding the effective weight of the current state."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        layer.weight.copy_(self.effective_weight())
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer


def attach(block: nn.Module, layers: dict[str, nn.Linear], ranks: dict[str, torch.Tensor],
           adapter_ranks: tuple[int, ...], generator: torch.Generator | None = None,
           shared_update: bool = False, inherit: bool = True, group1_inherited: bool = True,
           group1_detached: bool = False, boundaries: tuple[float, ...] | None = None,
           ramp: str = "none") -> dict[str, ElasticLinear]:
    """Replace the named linears of `block` by elastic layers (`detach` puts the originals back)."""
    elastic = {name: ElasticLinear(layer, ranks[name], adapter_ranks, generator, shared_update, inherit,
                                   group1_inherited, group1_detached, boundaries, ramp)
               for name, layer in layers.items()}
    for name, layer in elastic.items():
        block.set_submodule(name, layer)
    return elastic


def detach(block: nn.Module, originals: dict[str, nn.Linear]) -> None:
    for name, layer in originals.items():
        block.set_submodule(name, layer)


def set_state(layers: dict[str, ElasticLinear], sparsity: float, group: int, group1_adapter: bool = True) -> None:
    for layer in layers.values():
        layer.set_state(sparsity, group, group1_adapter)
