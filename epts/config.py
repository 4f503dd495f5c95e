"""Typed configuration with the defaults of METHOD.md and PROTOCOL.md; loadable from YAML/JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from .importance import Pattern


@dataclass
class CalibConfig:
    """Calibration windows: PROTOCOL.md's standard is 32 windows of 256 tokens, seed 0."""

    nsamples: int = 32
    seqlen: int = 256
    seed: int = 0
    batch_size: int = 8  # windows per forward pass while propagating streams

    def __post_init__(self):
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")


@dataclass
class PruneConfig:
    """A single-sparsity baseline run."""

    method: str = "wanda"
    pattern: Pattern = dataclasses.field(default_factory=lambda: Pattern(sparsity=0.5))
    calib: CalibConfig = dataclasses.field(default_factory=CalibConfig)
    allocation: str = "uniform"  # or "owl": per-block sparsities by outlier ratio, same global budget
    owl_m: float = 5.0  # OWL outlier threshold (x the block's mean Wanda score)
    owl_lambda: float = 0.08  # OWL spread of the per-block sparsity

    def __post_init__(self):
        if self.allocation not in ("uniform", "owl"):
            raise ValueError(f"unknown allocation {self.allocation!r}: choose uniform or owl")
        if self.allocation == "owl" and self.pattern.is_nm:
            raise ValueError(f"OWL allocation needs an unstructured sparsity, not the N:M pattern {self.pattern}")


REFIT_MODES = ("none", "bare", "auto", "all")


@dataclass
class RefitConfig:
    """The refit at export (`epts.refit`): which blocks get their kept weights re-solved on the
    calibration with the masks fixed ("none", "bare", "auto", "all"); the conjugate-gradient steps
    towards the exact least-squares weights; for "auto", the relative drop of a block's output
    error the refit must bring before it replaces that block's adapters (a block served with no
    adapter is always refit), and the calibration windows that error is measured on. Defaults
    chosen on held-out calibration-file windows (docs/RECIPE.md): a margin of 0.05 was worse than 0
    overall.

    `ridge` (issue 19; 0, off, by default) regularises each layer's refit toward the weights it
    replaces, the merged M(s) * (W + sum B A) (the bare mask M(s) * W in a block with no adapter):
    minimise ||(X - W_dense) H^1/2||^2 + lambda ||X - W_merged||^2 over the kept weights, with
    lambda = ridge * mean(diag(H)) (scale-free), solved by the same conjugate gradients started from
    the merged weights. ridge 0 is today's refit exactly (started from the bare mask)."""

    mode: str = "auto"
    iters: int = 10
    margin: float = 0.0
    compare_windows: int = 8
    ridge: float = 0.0

    def __post_init__(self):
        if self.mode not in REFIT_MODES:
            raise ValueError(f"refit mode {self.mode!r} is not one of {', '.join(REFIT_MODES)}")
        if not self.ridge >= 0:
            raise ValueError(f"refit ridge must be >= 0, got {self.ridge}")
        if self.iters < 1 or not 0 <= self.margin < 1 or self.compare_windows < 1:
            raise ValueError(f"refit needs iters >= 1, a margin in [0, 1) and compare_windows >= 1, got {self.iters}, "
                             f"{self.margin} and {self.compare_windows}")


def load_config_file(path: str | Path) -> dict:
    """A YAML or JSON mapping of config fields."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                         f"({reason})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of field names to values")
    return data



DEFAULT_BOUNDARIES = (0.0, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70)
DEFAULT_MIX_WEIGHTS = (0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2)


@dataclass
class EPTSConfig:
    """One elastic optimisation (METHOD.md). The defaults are the project's measured recipe
    (docs/RECIPE.md: METHOD.md's method with 2 epochs at lr 3e-3); `EPTSConfig.preset("paper")`
    is METHOD.md exactly as the authors' release runs it (10 epochs at lr 1e-3).

    Groups are the half-open intervals (boundaries[k], boundaries[k+1]]; the first group also
    serves sparsity boundaries[0] itself (a dense model at 0).
    """

    boundaries: tuple[float, ...] = DEFAULT_BOUNDARIES
    ranks: tuple[int, ...] = (8,) * 7  # adapter rank per group (an int in a config file means every group)
    epochs: int = 2
    batch_size: int = 1  # calibration windows per optimiser step
    lr: float = 3e-3
    lr_ratio_b: float = 1.0  # LoRA+ (Hayou et al. 2024): the B matrices train at lr * lr_ratio_b
    delta_lr: float = 0.0  # > 0: a full-rank update of the kept weights, shared by every group, trains at this lr
    guide_weight: float = 0.5  # groups > 1: (1 - w) * ||out_k - Y||^2 + w * ||out_k - stopgrad(out_1)||^2
    groups_per_step: int | None = None  # None: every group at every step (METHOD.md); k: k groups in turn (faster)
    mix_weights: tuple[float, ...] = DEFAULT_MIX_WEIGHTS  # MSFM
    propagate: str = "msfm"  # next elastic stream: msfm (the mixer) or dense (P <- H, the paper's ablation)
    inherit_adapters: bool = True  # False: group k uses only its own adapter, not 1..k (the paper's ablation)
    group1_check: bool = True
    group1_check_sparsity: float = 0.3
    criterion: str = "wanda"  # importance: wanda or magnitude
    max_retries: int = 3  # a block whose loss or gradient turns non-finite restarts, this many times at most,
    retry_lr_factor: float = 0.1  # each time with its learning rate multiplied by this
    calib: CalibConfig = dataclasses.field(default_factory=CalibConfig)
    # MiB of RAM for the dense and elastic streams together, per process; past it they are memory-mapped
    # scratch files in TMPDIR (epts.streams). None: no limit. Where they live changes no result.
    stream_memory_mb: float | None = None

    def __post_init__(self):
        self.boundaries = tuple(float(b) for b in self.boundaries)
        if isinstance(self.ranks, int):
            self.ranks = (self.ranks,) * self.num_groups
        self.ranks = tuple(int(r) for r in self.ranks)
        self.mix_weights = tuple(float(w) for w in self.mix_weights)
        if isinstance(self.calib, dict):
            known = {f.name for f in dataclasses.fields(CalibConfig)}
            if set(self.calib) - known:
                raise ValueError(f"unknown calib fields {sorted(set(self.calib) - known)}; known: {sorted(known)}")
            self.calib = CalibConfig(**self.calib)
        b = self.boundaries
        if len(b) < 2:
            raise ValueError(f"boundaries {list(b)} must hold at least two values (one group)")
        if any(hi <= lo for lo, hi in zip(b, b[1:])):
            raise ValueError(f"group boundaries {list(b)} must be strictly increasing (no empty or overlapping group)")
        if b[0] < 0 or b[-1] >= 1:
            raise ValueError(f"group boundaries {list(b)} must lie in [0, 1)")
        if len(self.ranks) != self.num_groups or min(self.ranks) < 1:
            raise ValueError(f"ranks {list(self.ranks)} must be {self.num_groups} positive integers, one per group")
        if len(self.mix_weights) != self.num_groups:
            raise ValueError(f"mix_weights {list(self.mix_weights)} must have {self.num_groups} entries, one per group")
        if min(self.mix_weights) < 0 or abs(sum(self.mix_weights) - 1.0) > 1e-6:
            raise ValueError(f"mix_weights {list(self.mix_weights)} must be non-negative and sum to 1")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.delta_lr < 0:
            raise ValueError(f"delta_lr must be >= 0 (0: no shared update), got {self.delta_lr}")
        if self.lr <= 0 or self.lr_ratio_b <= 0:
            raise ValueError(f"lr and lr_ratio_b must be positive, got {self.lr}, {self.lr_ratio_b}")
        if self.groups_per_step is not None and not 1 <= self.groups_per_step <= self.num_groups:
            raise ValueError(f"groups_per_step must be in 1..{self.num_groups} (the number of groups) or None (all), "
                             f"got {self.groups_per_step}")
        if not 0 <= self.guide_weight <= 1:
            raise ValueError(f"guide_weight must be in [0, 1], got {self.guide_weight}")
        if self.max_retries < 0 or not 0 < self.retry_lr_factor < 1:
            raise ValueError(f"need max_retries >= 0 and 0 < retry_lr_factor < 1, got {self.max_retries}, "
                             f"{self.retry_lr_factor}")
        if self.stream_memory_mb is not None and not self.stream_memory_mb >= 0:
            raise ValueError(f"stream_memory_mb must be >= 0 MiB (or None: no limit), got {self.stream_memory_mb}")
        if self.propagate not in ("msfm", "dense"):
            raise ValueError(f"propagate {self.propagate!r} is not msfm or dense")
        if self.criterion not in ("wanda", "magnitude"):
            raise ValueError(f"criterion {self.criterion!r} is not wanda or magnitude")

    @property
    def num_groups(self) -> int:
        return len(self.boundaries) - 1

    @property
    def groups(self) -> list[tuple[float, float]]:
        return list(zip(self.boundaries, self.boundaries[1:]))

    def group_of(self, sparsity: float) -> int:
        """0-based group serving `sparsity`; outside the trained range is an error."""
        lo, hi = self.boundaries[0], self.boundaries[-1]
        if not lo <= sparsity <= hi:
            raise ValueError(f"sparsity {sparsity} is outside the trained range [{lo:g}, {hi:g}]")
        return next(k for k, (_, top) in enumerate(self.groups) if sparsity <= top)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def preset(cls, name: str, **overrides) -> "EPTSConfig":
        """A named starting point (`PRESETS`), with `overrides` (config fields; `calib` a mapping
        merged into the preset's) on top. Raises ValueError for an unknown name or field."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        fields = {**PRESETS[name], **overrides}
        fields["calib"] = {**PRESETS[name].get("calib", {}), **(overrides.get("calib") or {})}
        return cls.from_dict(fields)

    @classmethod
    def from_dict(cls, data: dict) -> "EPTSConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}; known: {sorted(fields)}")
        return cls(**data)


# Named starting points of `epts compress --preset NAME` (a --config file and flags go on top).
PRESETS: dict[str, dict] = {
    "default": {},  # the dataclass defaults: the measured recipe (docs/RECIPE.md)
    "paper": {"epochs": 10, "lr": 1e-3},  # METHOD.md as written, the authors' release defaults
    # scripts/demo.sh: a quarter of the default's work (16 windows, 1 epoch), ~4 min for SmolLM2 on 2 cores
    "demo": {"epochs": 1, "calib": {"nsamples": 16}},
}
