"""Typed configuration with the defaults of METHOD.md and PROTOCOL.md; loadable from YAML/JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from .hilora import ADAPTER_RAMPS
from .importance import CRITERIA, Pattern


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(name: str, value, kind: type):
    """`value` of config field `name` as `kind` (int, float, bool or str) where that loses nothing
    ("3" or 4.0 as an int, "1e-3" as a float: YAML 1.1 reads 1e-3 without a dot as a string);
    ValueError naming the field otherwise (1.5 as an int, "abc" as a number)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if isinstance(value, (str, int)) and text in _TRUE + _FALSE:
            return text in _TRUE
        raise ValueError(f"config field {name} must be true or false, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"config field {name} must be a string, got {value!r} ({type(value).__name__})")
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(f"config field {name} must be a number, got the string {value!r}") from None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config field {name} must be a number, got {value!r} ({type(value).__name__})")
    if kind is float:
        return float(number)
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"config field {name} must be a whole number, got {value!r}")
    return int(number)


def _coerce_fields(config, kinds: dict[str, type], optional: tuple[str, ...] = ()) -> None:
    """Coerce the dataclass `config`'s fields in place (`_coerce`); None stays for `optional` ones."""
    for name, kind in kinds.items():
        value = getattr(config, name)
        if not (value is None and name in optional):
            setattr(config, name, _coerce(name, value, kind))


@dataclass
class CalibConfig:
    """Calibration windows: PROTOCOL.md's standard is 32 windows of 256 tokens, seed 0."""

    nsamples: int = 32
    seqlen: int = 256
    seed: int = 0
    batch_size: int = 8  # windows per forward pass while propagating streams

    def __post_init__(self):
        _coerce_fields(self, {"nsamples": int, "seqlen": int, "seed": int, "batch_size": int})
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
        _coerce_fields(self, {"method": str, "allocation": str, "owl_m": float, "owl_lambda": float})
        if isinstance(self.pattern, (str, int, float)) and not isinstance(self.pattern, bool):
            self.pattern = Pattern.parse(self.pattern)  # "2:4", "0.5" or 0.5, as --pattern / --sparsity take them
        if isinstance(self.calib, dict):
            self.calib = CalibConfig(**self.calib)
        if not isinstance(self.pattern, Pattern) or not isinstance(self.calib, CalibConfig):
            raise ValueError(f"PruneConfig needs a Pattern (or \"2:4\", 0.5) and a CalibConfig (or a mapping), got "
                             f"{self.pattern!r} and {self.calib!r}")
        if self.allocation not in ("uniform", "owl"):
            raise ValueError(f"unknown allocation {self.allocation!r}: choose uniform or owl")
        if self.allocation == "owl" and self.pattern.is_nm:
            raise ValueError(f"OWL allocation needs an unstructured sparsity, not the N:M pattern {self.pattern}")


REFIT_MODES = ("none", "bare", "block", "auto", "all")
REFIT_MASKS = ("elastic", "obs")


@dataclass
class RefitConfig:
    """The refit at export (`epts.refit`): which blocks get their kept weights re-solved on the
    calibration with the masks fixed ("none"; "bare": only those with no adapter; "all"; "auto":
    "bare", "bare" with the blocks with adapters refit too, each where that lowers its output error
    or every one, or SparseGPT's solution (`sparsegpt`),
    whichever has the lowest loss on `compare_windows` held-out windows of the calibration text;
    "block": a choice block by block on the block's output error); the conjugate-gradient steps
    towards the exact least-squares weights; for "block", the relative drop of a block's output
    error the refit must bring before it replaces that block's adapters, and the number of
    calibration windows that error is measured on (`compare_windows`, also the held-out windows of
    "auto"). Defaults chosen on held-out calibration-file windows (docs/RECIPE.md): a margin of 0.05
    was worse than 0 overall; 8 windows of 256 tokens took the candidate that 32 scored 4 standard
    errors worse (Gemma-3-270M at 0.6); 32 cost about 10 s per candidate on SmolLM2-135M.

    `ridge` (0, off, by default) regularises each layer's refit toward the weights it
    replaces, the merged M(s) * (W + sum B A) (the bare mask M(s) * W in a block with no adapter):
    minimise ||(X - W_dense) H^1/2||^2 + lambda ||X - W_merged||^2 over the kept weights, with
    lambda = ridge * mean(diag(H)) (scale-free), solved by the same conjugate gradients started from
    the merged weights. ridge 0 is today's refit exactly (started from the bare mask).

    `mask` ("elastic" or "obs") is the mask of the blocks the refit re-solves: the elastic model's
    nested M(s), or one chosen again at export by SparseGPT's OBS saliency on the refit's own
    Hessians, at the same sparsity per row (a re-solved block keeps nothing of its adapters, so
    nothing ties it to M(s)). "elastic" by default: "obs" is better on held-out text of the
    calibration's domain from 0.5 up and worse off it (docs/RECIPE.md).

    `block_candidate` (True by default; "auto" only): "auto" also scores the per-block choice of "block"
    for the blocks with adapters (docs/RECIPE.md: the best candidate on SmolLM2-135M at 0.7); it
    costs up to one more refit pass and one more held-out score where blocks have adapters.

    `sparsegpt` (True by default; "auto" only): "auto" also scores SparseGPT's own solution for
    every block (its OBS mask and weights at the block's sparsity: `epts prune --method sparsegpt`)
    on the same held-out windows, and keeps it where it beats the other candidates (docs/RECIPE.md:
    on Gemma-3-270M the least-squares weights lose to it at some sparsities). It costs one
    SparseGPT pass and one more held-out score per export. `sparsegpt_se` (0 by default: the lower
    mean wins): with a value, the other candidates' winner replaces SparseGPT's solution only when
    its mean loss on the choice windows is lower by more than this many standard errors of the
    paired per-window difference (1: the one-standard-error rule; where the windows cannot tell the
    two apart, the export is SparseGPT's model). Not the default: on Gemma-3-270M at 0.4, the one
    cell it changes, the refit it gives up is the better model on the calibration text at large and
    off its domain (docs/RECIPE.md).

    `reconstruct_epochs` (2 by default; 0: none; "auto" only): "auto" then trains its winner's kept
    weights block by block toward the dense model, every mask fixed (`reconstruct.reconstruct_pruned`:
    Adam, one calibration window per step, a step of `reconstruct_step` times each block's weight
    RMS), and keeps that where it lowers the loss on the choice windows. `reconstruct_rank` (16 by
    default) limits each layer's change to a masked update of that rank, M * (B A); 0 trains every
    kept weight, which on Gemma-3-270M at 0.5 fitted the calibration windows and lost to SparseGPT
    on every other text, where rank 16 gains on all of them (docs/RECIPE.md). `reconstruct_all` (True
    by default; with `tune_epochs` only): where another candidate won, "auto" also reconstructs and
    tunes the least-squares refit of every block ("all"), and keeps that tuned model where it scores
    lower on the choice windows than the winner's best (the choice comes before these steps, which
    gained more from "all" than from the winner in most Gemma-3-270M cells measured; it costs one
    more reconstruction and tuning there; docs/RECIPE.md). `tune_epochs` (1 by
    default; 0: none) then tunes every pruned block's layers together end to end, with a masked update
    of the same rank, toward the dense model's last hidden state (`reconstruct.tune_end_to_end`: Adam
    at `tune_step` times the layers' weight RMS), scored on the choice windows too: the lowest of the
    winner, its reconstruction and that tuned is kept. A streamed model too large to hold in memory
    skips the tuning."""

    mode: str = "auto"
    iters: int = 10
    margin: float = 0.0
    compare_windows: int = 32
    ridge: float = 0.0
    mask: str = "elastic"
    sparsegpt: bool = True
    sparsegpt_se: float = 0.0
    block_candidate: bool = True
    reconstruct_epochs: int = 2
    reconstruct_all: bool = True
    reconstruct_step: float = 3e-2
    reconstruct_rank: int = 16
    tune_epochs: int = 1
    tune_step: float = 3e-2

    def __post_init__(self):
        _coerce_fields(self, {"mode": str, "iters": int, "margin": float, "compare_windows": int, "ridge": float,
                              "mask": str, "sparsegpt": bool, "sparsegpt_se": float, "block_candidate": bool,
                              "reconstruct_epochs": int, "reconstruct_all": bool,
                              "reconstruct_step": float, "reconstruct_rank": int,
                              "tune_epochs": int, "tune_step": float})
        if self.reconstruct_epochs < 0 or not 0 < self.reconstruct_step < math.inf or self.reconstruct_rank < 0:
            raise ValueError(f"refit reconstruct_epochs must be >= 0 (0: no reconstruction), reconstruct_step a "
                             f"number > 0 and reconstruct_rank >= 0 (0: every kept weight), got "
                             f"{self.reconstruct_epochs}, {self.reconstruct_step} and {self.reconstruct_rank}")
        if self.tune_epochs < 0 or not 0 < self.tune_step < math.inf:
            raise ValueError(f"refit tune_epochs must be >= 0 (0: no end-to-end tuning) and tune_step a number > 0, "
                             f"got {self.tune_epochs} and {self.tune_step}")
        if self.mode not in REFIT_MODES:
            raise ValueError(f"refit mode {self.mode!r} is not one of {', '.join(REFIT_MODES)}")
        if self.mask not in REFIT_MASKS:
            raise ValueError(f"refit mask {self.mask!r} is not one of {', '.join(REFIT_MASKS)}")
        if self.mask == "obs" and self.ridge > 0:
            raise ValueError("a refit ridge pulls toward the weights on the elastic masks, which refit mask 'obs' "
                             "replaces: drop one of the two (--refit-ridge, --refit-mask obs)")
        if not self.ridge >= 0:
            raise ValueError(f"refit ridge must be >= 0, got {self.ridge}")
        if not 0 <= self.sparsegpt_se < math.inf:
            raise ValueError(f"refit sparsegpt_se must be a number of standard errors >= 0, got {self.sparsegpt_se}")
        if self.iters < 1 or not 0 <= self.margin < 1 or self.compare_windows < 1:
            raise ValueError(f"refit needs iters >= 1, a margin in [0, 1) and compare_windows >= 1, got {self.iters}, "
                             f"{self.margin} and {self.compare_windows}")


ALLOCATIONS = ("uniform", "owl", "search")
FORMATS = ("dense", "compressed")


@dataclass
class ExportConfig:
    """How `epts.export` turns an artifact into a folder at one global sparsity: the per-block
    `allocation` of the budget ("uniform", "owl" with `owl_m` and `owl_lambda`, or "search", scored
    by the calibration loss for `search_seconds` on `search_samples` windows of `search_seqlen`
    tokens, starting from `search_start`), the `refit` (a `RefitConfig` or its mode), the
    refit's RAM budget for its streams in MiB (`stream_memory_mb`; None: no limit, past it
    scratch files in TMPDIR) and the weights' `format` ("dense": zeros in dense tensors, for any
    transformers; "compressed": compressed-tensors' sparse bitmask, which epts' sparse runtime
    serves)."""

    allocation: str = "uniform"
    format: str = "dense"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    search_seconds: float = 120.0
    search_samples: int = 8
    search_seqlen: int = 256
    search_start: str = "owl"
    refit: RefitConfig = dataclasses.field(default_factory=RefitConfig)
    stream_memory_mb: float | None = None

    def __post_init__(self):
        _coerce_fields(self, {"allocation": str, "format": str, "owl_m": float, "owl_lambda": float,
                              "search_seconds": float, "search_samples": int, "search_seqlen": int,
                              "search_start": str, "stream_memory_mb": float}, optional=("stream_memory_mb",))
        if isinstance(self.refit, str):
            self.refit = RefitConfig(self.refit)
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation {self.allocation!r} is not one of {', '.join(ALLOCATIONS)}")
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.search_start not in ("uniform", "owl"):
            raise ValueError(f"search_start {self.search_start!r} is not uniform or owl")


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



def _listed(value) -> list:
    """A config list field's items (a lone number or string is a list of one)."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


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
    # Adam's steps are absolute, a model's weight scale is not: with a value, a block trains at lr * (RMS of its
    # prunable weights) / lr_reference_rms (0.19 is SmolLM2-135M's, where lr was measured). None: every block at lr
    # as given (METHOD.md). An option: on Gemma-3 it lost at 0.7 (docs/RECIPE.md, "Levers tried").
    lr_reference_rms: float | None = None
    lr_scaled_groups: str = "all"  # the adapters that lr_reference_rms scales: all, or group1 (the others at lr)
    lr_ratio_b: float = 1.0  # LoRA+ (Hayou et al. 2024): the B matrices train at lr * lr_ratio_b
    delta_lr: float = 0.0  # > 0: a full-rank update of the kept weights, shared by every group, trains at this lr
    guide_weight: float = 0.5  # groups > 1: (1 - w) * ||out_k - Y||^2 + w * ||out_k - stopgrad(out_1)||^2
    # mse: the squared error over all tokens (METHOD.md); relative: each token's divided by the target token's
    # mean square (reconstruct.token_weights), so tokens of massive activation do not make most of the loss
    token_loss: str = "mse"
    # bf16: the training steps' float32 matmuls run on a CPU's bfloat16 units (AMX), float32 kept elsewhere
    # (an epts speed option, docs/RECIPE.md); ieee: float32 throughout
    train_matmul_precision: str = "ieee"
    groups_per_step: int | None = None  # None: every group at every step (METHOD.md); k: k groups in turn (faster)
    top_groups_every_step: int = 0  # with groups_per_step: the highest this many groups train at every step
    mix_weights: tuple[float, ...] = DEFAULT_MIX_WEIGHTS  # MSFM
    propagate: str = "msfm"  # next elastic stream: msfm (the mixer) or dense (P <- H, the paper's ablation)
    inherit_adapters: bool = True  # False: group k uses only its own adapter, not 1..k (the paper's ablation)
    group1_inherited: bool = True  # False: group 1's adapter serves group 1 only; groups k > 1 use 2..k
    group1_detached: bool = False  # True: groups k > 1 compute with group 1's adapter but do not train it
    group1_stream: str = "elastic"  # the stream group 1 trains on: elastic (P, METHOD.md), dense (H) or alternate
    # none: every active adapter at full size (METHOD.md); group1 / all: group 1's / every group's adapter scaled
    # by how far s has gone through its group (hilora.adapter_scales), so it fades out at the group's lower edge
    adapter_ramp: str = "none"
    group1_check: bool = True
    group1_check_sparsity: float = 0.3
    criterion: str = "wanda"  # importance: wanda, magnitude or ria (importance.importance_scores)
    max_retries: int = 3  # a block whose loss or gradient turns non-finite restarts, this many times at most,
    retry_lr_factor: float = 0.1  # each time with its learning rate multiplied by this
    calib: CalibConfig = dataclasses.field(default_factory=CalibConfig)
    # MiB of RAM for the dense and elastic streams together, per process; past it they are memory-mapped
    # scratch files in TMPDIR (epts.streams). None: no limit. Where they live changes no result.
    stream_memory_mb: float | None = None

    def __post_init__(self):
        _coerce_fields(self, {"epochs": int, "batch_size": int, "lr": float, "lr_reference_rms": float,
                              "lr_scaled_groups": str, "train_matmul_precision": str, "lr_ratio_b": float,
                              "delta_lr": float, "guide_weight": float, "token_loss": str, "groups_per_step": int,
                              "top_groups_every_step": int, "propagate": str,
                              "group1_stream": str, "inherit_adapters": bool, "group1_inherited": bool,
                              "group1_detached": bool, "adapter_ramp": str, "group1_check": bool,
                              "group1_check_sparsity": float,
                              "criterion": str, "max_retries": int, "retry_lr_factor": float,
                              "stream_memory_mb": float},
                       optional=("groups_per_step", "stream_memory_mb", "lr_reference_rms"))
        for name in ("boundaries", "ranks", "mix_weights"):
            if not isinstance(getattr(self, name), (list, tuple, int, float, str)):
                raise ValueError(f"config field {name} must be a list of numbers, got {getattr(self, name)!r}")
        self.boundaries = tuple(_coerce(f"boundaries[{i}]", b, float) for i, b in enumerate(_listed(self.boundaries)))
        if not isinstance(self.ranks, (list, tuple)):  # one rank for every group
            self.ranks = (_coerce("ranks", self.ranks, int),) * self.num_groups
        self.ranks = tuple(_coerce(f"ranks[{i}]", r, int) for i, r in enumerate(self.ranks))
        self.mix_weights = tuple(_coerce(f"mix_weights[{i}]", w, float) for i, w in enumerate(_listed(self.mix_weights)))
        if not isinstance(self.calib, (dict, CalibConfig)):
            raise ValueError(f"config field calib must be a mapping (nsamples, seqlen, seed, batch_size), got "
                             f"{self.calib!r}")
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
        if self.lr_reference_rms is not None and not 0 < self.lr_reference_rms < math.inf:
            raise ValueError(f"lr_reference_rms must be a positive RMS (or None: lr as given), got "
                             f"{self.lr_reference_rms}")
        if self.groups_per_step is not None and not 1 <= self.groups_per_step <= self.num_groups:
            raise ValueError(f"groups_per_step must be in 1..{self.num_groups} (the number of groups) or None (all), "
                             f"got {self.groups_per_step}")
        if self.top_groups_every_step and not 0 <= self.top_groups_every_step < (self.groups_per_step or 0):
            raise ValueError(f"top_groups_every_step must be in 0..groups_per_step - 1 (some groups must take turns), "
                             f"got {self.top_groups_every_step} with groups_per_step {self.groups_per_step}")
        if not 0 <= self.guide_weight <= 1:
            raise ValueError(f"guide_weight must be in [0, 1], got {self.guide_weight}")
        if self.max_retries < 0 or not 0 < self.retry_lr_factor < 1:
            raise ValueError(f"need max_retries >= 0 and 0 < retry_lr_factor < 1, got {self.max_retries}, "
                             f"{self.retry_lr_factor}")
        if self.stream_memory_mb is not None and not self.stream_memory_mb >= 0:
            raise ValueError(f"stream_memory_mb must be >= 0 MiB (or None: no limit), got {self.stream_memory_mb}")
        if self.propagate not in ("msfm", "dense"):
            raise ValueError(f"propagate {self.propagate!r} is not msfm or dense")
        if self.group1_stream not in ("elastic", "dense", "alternate"):
            raise ValueError(f"group1_stream {self.group1_stream!r} is not elastic, dense or alternate")
        if self.group1_detached and not (self.inherit_adapters and self.group1_inherited):
            raise ValueError("group1_detached needs the groups above to inherit group 1's adapter "
                             "(inherit_adapters and group1_inherited true)")
        if self.train_matmul_precision not in ("ieee", "bf16"):
            raise ValueError(f"train_matmul_precision {self.train_matmul_precision!r} is not ieee or bf16")
        if self.adapter_ramp not in ADAPTER_RAMPS:
            raise ValueError(f"adapter_ramp {self.adapter_ramp!r} is not {', '.join(ADAPTER_RAMPS[:-1])} or "
                             f"{ADAPTER_RAMPS[-1]}")
        if self.token_loss not in ("mse", "relative"):
            raise ValueError(f"token_loss {self.token_loss!r} is not mse or relative")
        if self.lr_scaled_groups not in ("all", "group1"):
            raise ValueError(f"lr_scaled_groups {self.lr_scaled_groups!r} is not all or group1")
        if self.lr_scaled_groups != "all" and self.lr_reference_rms is None:
            raise ValueError(f"lr_scaled_groups {self.lr_scaled_groups!r} scales by lr_reference_rms, which is None: "
                             f"set lr_reference_rms (0.19: SmolLM2-135M's weight RMS) or drop lr_scaled_groups")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion {self.criterion!r} is not one of {', '.join(CRITERIA)}")

    @property
    def num_groups(self) -> int:
        return len(self.boundaries) - 1

    def block_lr(self, weight_rms: float) -> float:
        """The learning rate of a block whose prunable weights have root-mean-square `weight_rms`: lr
        scaled by weight_rms / lr_reference_rms, or lr itself when that is None, or when the RMS is
        0 or not finite (nothing to scale by)."""
        if self.lr_reference_rms is None or not 0 < weight_rms < math.inf:
            return self.lr
        return self.lr * weight_rms / self.lr_reference_rms

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
