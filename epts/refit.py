"""Fixed-mask least-squares refit at export: an epts extension of METHOD.md's deployment step.

The elastic model serves every sparsity from one set of base weights, nested importance masks and
low-rank adapters. At low sparsity the group-1 check drops the group-1 adapter in most blocks, so
those sparsities run on bare masks, while SparseGPT re-solves the kept weights of every layer (an
OBS update) for its one target. A refit gives an export that update, taken to its optimum: with the
elastic mask M(s) fixed, the kept weights of each layer are re-solved to the exact least-squares
weights against the Hessian of its inputs (`masked_least_squares`), block by block on the exported
model's own activations, with SparseGPT's convention for the Hessian (the unpruned block on the
pruned model's stream). Blocks served with no adapter are always refit. Whether the refit also
replaces the merged weights (`M(s) * (W + sum B A)`) of the blocks with adapters is decided for the
whole model ("auto", the default; `RefitConfig`): the candidates, adapters kept ("bare"), the
blocks with adapters refit where that lowers their output error ("block", the per-block choice),
all of them refit ("all") and SparseGPT's own solution for every block ("sparsegpt"), are scored
by their loss on held-out windows of the calibration text, windows no calibration window
overlaps, and the lowest wins. Which one that is depends on the model and the sparsity (measured
in docs/RECIPE.md): the per-block choice alone was fooled by Gemma-3's large residual stream, and
is the best of the four on SmolLM2 at 0.7.

The calibration windows are the ones the artifact was trained on, recomputed from its recorded
source and checked against its recorded sha256 (`artifact.calibration_record`), so a refit needs no
extra data stored. It changes only the exported weights: switching a served model in place
(`epts.runtime`) stays adapter-only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .arch import decoder_blocks, prunable_linears
from .artifact import ElasticModel, windows_sha256
from .baselines.sparsegpt import SparseGPTPruner
from .blocks import capture_block_calls
from .config import RefitConfig
from .data import calibration_windows, heldout_windows, tokenize
from .evaluate import blockwise_window_nll
from .hilora import active_adapters
from .importance import Pattern, mask_from_ranks
from .models import LoadedModel
from .offload import is_streamed, resident
from .reconstruct import reconstruct_pruned, tune_end_to_end
from .selfcal import SOURCE as SELF_GENERATED
from .selfcal import regenerate
from .streams import StreamStore

log = logging.getLogger(__name__)


@dataclass
class RefitReport:
    """What a refit did: per block, "refit", "adapters" (merged weights kept) or "dense" (sparsity
    0, untouched), and the block's output error (mean squared, float32) with the merged and with
    the refit weights against the dense target on the first `RefitConfig.compare_windows`
    calibration windows (NaN where not run: the target is computed in "block" only, which compares).
    In "auto", `losses` holds each candidate's mean next-token loss (nats) on the scored windows,
    `chosen` the winner ("bare", "all" or "sparsegpt"), and `scored_on` "heldout" or "calibration".
    `mask` is the masks of the blocks re-solved: `RefitConfig.mask`, or "obs" where SparseGPT's own
    mask and weights (`RefitConfig.sparsegpt`) won, its blocks then "sparsegpt" in `choices`.
    `difference_se` is the standard error (nats) of the paired per-window difference between the
    other candidates' winner and SparseGPT's solution, where that was scored. `reconstructed`: whether
    the winner's block-wise reconstruction (`RefitConfig.reconstruct_epochs`, scored as
    "reconstructed", or then tuned end to end, "tuned") was kept (None where none was made), and the
    seconds it took; `tuned` whether the tuning was (None where it did not run), `tune_loss` its
    last-epoch training loss (None where it did not run or was undone for a non-finite loss),
    `tune_seconds` its share of those seconds and `tune_skipped` why it did not run, where it did
    not (a streamed model too large to hold). `first_choice` is the winner before any reconstruction;
    `chosen` differs from it where the least-squares candidate's tuned model replaced the winner's
    best (`RefitConfig.reconstruct_all`)."""

    mode: str
    choices: list[str] = field(default_factory=list)
    errors: list[tuple[float, float]] = field(default_factory=list)  # (merged, refit) per block
    seconds: float = 0.0
    chosen: str | None = None
    losses: dict[str, float] = field(default_factory=dict)
    scored_on: str | None = None
    mask: str = "elastic"
    difference_se: float | None = None
    reconstructed: bool | None = None
    reconstruct_seconds: float = 0.0
    tuned: bool | None = None
    tune_loss: float | None = None
    tune_seconds: float = 0.0
    tune_skipped: str | None = None
    first_choice: str | None = None

    def to_dict(self) -> dict:
        return {"mode": self.mode, "choices": self.choices, "errors": [list(e) for e in self.errors],
                "refit_blocks": self.choices.count("refit") + self.choices.count("sparsegpt"), "seconds": self.seconds,
                "chosen": self.chosen, "losses": self.losses, "scored_on": self.scored_on, "mask": self.mask,
                "difference_se": self.difference_se, "reconstructed": self.reconstructed,
                "reconstruct_seconds": self.reconstruct_seconds, "tuned": self.tuned,
                "tune_loss": self.tune_loss, "tune_seconds": self.tune_seconds, "tune_skipped": self.tune_skipped,
                "first_choice": self.first_choice}


@dataclass
class RefitText:
    """The refit's text: the calibration `windows` (n, seqlen) it solves on; `heldout` (k, seqlen)
    windows of the same text that no calibration window overlaps, on which "auto" scores its
    candidates (None where there is no text to hold out: self-generated windows or windows passed as
    a tensor); and the `record` of where they come from (source, sha256, whether they are the
    windows the artifact was trained on)."""

    windows: torch.Tensor
    heldout: torch.Tensor | None
    record: dict


def artifact_calibration(elastic: ElasticModel, calib=None, flag: str | None = "--calib",
                         progress: bool = True) -> torch.Tensor:
    """The calibration windows (nsamples, seqlen) for a refit: drawn from `calib` (text source or
    ready windows) when given, else the artifact's own, recomputed from its recorded source with its
    recorded sampling and checked against its recorded sha256 (self-generated windows: made again by
    the base model with the recorded settings; a warning when they differ). Raises ValueError, naming the
    source, when the artifact was calibrated on windows passed as a tensor, or when the recorded
    file is missing or no longer gives the same windows; its advice names `flag`, the option that
    passes the refit's text (None: there is none)."""
    return _calibration(elastic, calib, flag, progress)[0]


def _calibration(elastic: ElasticModel, calib, flag: str | None, progress: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`artifact_calibration`'s windows and the tokens of the text they were drawn from (None for
    ready windows and self-generated ones)."""
    cc = elastic.config.calib
    if calib is not None:
        if isinstance(calib, torch.Tensor) and calib.dim() == 2:
            return calib, None
        tokens = tokenize(elastic.base.tokenizer, calib, role="calib")
        return calibration_windows(tokens, cc.nsamples, cc.seqlen, cc.seed), tokens
    record = elastic.calibration or {}
    source = record.get("source")
    if source == SELF_GENERATED:
        return _regenerated(elastic, record, progress), None

    def give(what: str) -> str:
        return f"pass {what} with {flag}" if flag else f"restore {what}"

    if source in (None, "tensor"):
        raise ValueError(f"the artifact was calibrated on windows passed as a tensor, not on a file it can reread: "
                         f"{give('the calibration text for the refit')}, or use --refit none")
    try:
        tokens = tokenize(elastic.base.tokenizer, source, role="calib")
        windows = calibration_windows(tokens, cc.nsamples, cc.seqlen, cc.seed)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot reread the artifact's calibration text {source} for the refit ({err}): {give('it')}, "
                         f"or use --refit none") from None
    recorded = record.get("windows_sha256")
    if recorded and windows_sha256(windows) != recorded:
        raise ValueError(f"the calibration text {source} no longer gives the windows the artifact was trained on "
                         f"(sha256 differs): {give('the original text')}, or use --refit none")
    return windows, tokens


def refit_calibration(elastic: ElasticModel, calib=None, flag: str | None = "--calib",
                      progress: bool = True, heldout: int = RefitConfig.compare_windows) -> RefitText:
    """The refit's windows (`artifact_calibration`), up to `heldout` windows of the same text that
    none of them overlaps (taken from the start of the text, `data.heldout_windows`), and their
    record: source, sha256 and whether they are the windows the artifact was trained on (a warning
    is logged when they are not)."""
    windows, tokens = _calibration(elastic, calib, flag, progress)
    held = None
    if tokens is not None and heldout > 0:
        cc = elastic.config.calib
        held = heldout_windows(tokens, cc.nsamples, cc.seqlen, cc.seed, heldout)
        if len(held) < heldout:
            log.warning("the refit's text holds only %d windows of %d tokens that no calibration window overlaps, "
                        "fewer than the %d its choice is scored on: more text gives a surer choice", len(held),
                        cc.seqlen, heldout)
        held = held if len(held) else None
    trained = elastic.calibration or {}
    if calib is None:
        source = trained.get("source")
    else:
        source = "tensor" if isinstance(calib, torch.Tensor) else str(calib)
    digest = windows_sha256(windows)
    own = digest == trained.get("windows_sha256")
    if not own:
        log.warning("the refit re-solves the kept weights on windows of %s, not on the ones the artifact was trained "
                    "on (%s)", source, trained.get("source"))
    return RefitText(windows, held, {"source": source, "windows_sha256": digest, "artifact_windows": own})


def _regenerated(elastic: ElasticModel, record: dict, progress: bool) -> torch.Tensor:
    """Self-generated calibration windows made again with the recorded sampling. Where they differ
    from the recorded ones (another device, dtype or torch version can change the logits' last bits,
    and with them a draw), they are still a sample of the same model and settings: the refit uses
    them, and says so."""
    cc = elastic.config.calib
    loaded = elastic.base
    windows, same = regenerate(loaded.model, loaded.tokenizer, record, cc.nsamples, cc.seqlen, progress)
    if not same:
        made = f"{record.get('device')}, {record.get('dtype')}, torch {record.get('torch')}"
        here = loaded.model.get_input_embeddings().weight
        now = f"{here.device.type}, {str(here.dtype).removeprefix('torch.')}, torch {torch.__version__}"
        log.warning("refit: the self-generated calibration windows made again (%s) differ from those the artifact was "
                    "trained on (made on %s; sha256 differs): the refit uses the new ones, a sample of the same model "
                    "and settings; for the exact windows, export on %s, or pass --calib TEXT", now, made, made)
    return windows


def masked_least_squares(weight: torch.Tensor, hessian: torch.Tensor, inverse: torch.Tensor, pruned: torch.Tensor,
                         iters: int, ridge: float = 0.0, anchor: torch.Tensor | None = None,
                         start: torch.Tensor | None = None) -> torch.Tensor:
    """Minimise sum_i (w_i - x_i) H (w_i - x_i)^T over x supported off `pruned`, every row at once,
    by `iters` steps of conjugate gradients from the bare mask (w with the pruned weights zeroed).
    `hessian` and its `inverse` come dampened (`SparseGPTPruner.inverse_hessian`). The
    preconditioner is H^-1 restricted to the kept weights: by the Schur complement it is the inverse
    of the kept block H_KK up to a correction of rank at most the pruned count, so far fewer steps
    are needed than with a diagonal one (measured on SmolLM2-135M layers at sparsity 0.5, mean
    relative excess error over the optimum: 6.5e-4 after 10 steps and 2e-9 after 20, against
    1.3e-2 and 1.8e-3 for Jacobi steps from SparseGPT's OBS sweep). Shapes: weight, pruned
    (d_out, d_in); hessian, inverse (d_in, d_in); one device; float32 result. Written here: batched
    conjugate gradients over rows with per-row masks is not in torch.

    With `ridge` > 0 the objective gains lambda * |x_i - a_i|^2, lambda = ridge *
    mean(diag(H)), pulling the solution toward `anchor` (d_out, d_in; the merged weights the refit
    replaces, required then): the system matrix becomes H + lambda I on the kept weights, the
    preconditioner its inverse, and the steps start from the anchor on the mask. ridge 0 runs the
    code above unchanged. Without a ridge, `start` (d_out, d_in) replaces the bare mask as the
    first iterate (taken on the mask): a better start, such as SparseGPT's OBS solution, needs
    fewer steps to the same optimum."""
    h, hinv = hessian.float(), inverse.float()
    keep = (~pruned).float()
    lam = 0.0
    if ridge > 0:
        if anchor is None:
            raise ValueError("a ridge refit needs the anchor weights it pulls toward")
        lam = ridge * float(torch.diagonal(h).mean())
        eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h + lam * eye))
        x = anchor.float() * keep
    else:
        x = (weight if start is None else start).float() * keep
    # Minus half the gradient; the ridge term (a - x) is zero at the start, x = a on the mask.
    residual = ((weight.float() - x) @ h) * keep
    z = (residual @ hinv) * keep
    direction = z.clone()
    rz = (residual * z).sum(1)
    for _ in range(iters):
        hd = (direction @ h + lam * direction) * keep if lam else (direction @ h) * keep
        curvature = (direction * hd).sum(1)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(1e-30), torch.zeros_like(rz))
        x += alpha[:, None] * direction
        residual -= alpha[:, None] * hd
        z = (residual @ hinv) * keep
        rz_next = (residual * z).sum(1)
        direction = z + (rz_next / rz.clamp_min(1e-30))[:, None] * direction
        rz = rz_next
    return x * keep


def _mse(out: torch.Tensor | None, target: torch.Tensor | None) -> float:
    """Mean squared error in float32; NaN when either was not computed."""
    if out is None or target is None:
        return float("nan")
    return float((out.float() - target.float()).pow(2).mean())


@torch.no_grad()
def refit(elastic: ElasticModel, model: LoadedModel, plan: dict[int, float], windows: torch.Tensor,
          config: RefitConfig | str = "auto", batch_size: int = 8, progress: bool = True,
          store: StreamStore | None = None, heldout: torch.Tensor | None = None) -> RefitReport:
    """Refit, in place, the prunable weights of `model`, the elastic model materialised at `plan`
    ({block: sparsity}, `ElasticModel.materialize`), on calibration `windows` (n, seqlen) token ids.

    `config` (`RefitConfig`, or just its mode): "bare" refits only the blocks that serve their
    sparsity with no learnt update (group 1 where the group-1 check dropped the adapter: bare
    masks) and keeps the adapters elsewhere; "all" refits every block at a nonzero sparsity;
    "auto" makes "bare" and then the blocks with adapters refit with the per-block choice of
    "block" and refit all (the blocks with bare masks keeping their refit: `_adapted_candidates`),
    and keeps the one with the lowest mean next-token loss on `heldout` (k, seqlen)
    windows of the calibration text that no calibration window overlaps (`refit_calibration`), or,
    when there are none, on the first `config.compare_windows` calibration windows, with a warning;
    with `config.sparsegpt` it then scores the same way SparseGPT's own solution for every block
    (its OBS mask and weights at the block's sparsity) against the winner, and keeps the lower (with
    `config.sparsegpt_se`, the winner only where its loss is lower by more than that many standard
    errors of the paired per-window difference);
    "block" also refits a block with adapters where that lowers its output error against the
    dense target, on the first `config.compare_windows` windows, by more than `config.margin`
    (relative; 0 by default: any drop); "none" does nothing. `config.iters` conjugate-gradient
    steps (`masked_least_squares`) solve each layer for the least-squares weights on its mask.
    Streamed models are processed one resident block at a time. The result keeps exactly the masks
    M(s) of the plan, except with `config.mask` "obs" in the blocks it re-solves: there SparseGPT's
    OBS saliency on the refit's Hessians chooses each layer's mask again, at the same sparsity per
    row (a re-solved block keeps nothing of its adapters, so nothing ties it to M(s)). The streams
    (about three of n x seqlen x hidden at a time) live in `store` (default: RAM; `epts.streams`).
    Raises ValueError for an unknown mode.
    """
    config = RefitConfig(config) if isinstance(config, str) else config
    if config.mode == "none":
        return RefitReport("none")
    if config.mode != "auto":
        return _refit_pass(elastic, model, plan, windows, config, config.mode, batch_size, progress, store)
    start = time.perf_counter()
    adapted = [b for b, s in sorted(plan.items()) if s > 0 and _has_adapters(elastic, b, s)]
    bare = [b for b, s in sorted(plan.items()) if s > 0 and b not in adapted]
    scored_on = None
    if adapted or (bare and (config.sparsegpt or config.reconstruct_epochs)):  # else nothing to choose
        scored_on = "heldout" if heldout is not None and len(heldout) else "calibration"
    if scored_on == "calibration":
        log.warning("refit auto: no held-out text of the calibration's domain (self-generated windows, windows passed "
                    "as a tensor, or a text with no window left over): the refit's candidates are scored on the "
                    "first %d calibration windows, which they were all fitted to; pass --calib TEXT for a choice "
                    "on text they did not see", config.compare_windows)
        heldout = windows[: config.compare_windows]

    losses: dict[str, float] = {}
    per_window: dict[str, torch.Tensor] = {}  # each candidate's loss on each choice window

    def score(name: str) -> None:
        per_window[name] = _window_losses(model.model, heldout, batch_size, store)
        losses[name] = float(per_window[name].mean())

    rebuilt = config.reconstruct_epochs and scored_on is not None
    with _Saved(model) as least_squares:  # the least-squares candidate's weights, where it is reconstructed too
        if bare:
            report = _refit_pass(elastic, model, plan, windows, config, "bare", batch_size, progress, store)
        else:  # every block serves with adapters: the merged model is the "bare" candidate as it stands
            count = len(decoder_blocks(model.model))
            report = RefitReport("bare", ["adapters" if plan.get(b, 0.0) > 0 else "dense" for b in range(count)],
                                 [(float("nan"), float("nan"))] * count, mask=config.mask)
        report.chosen = "bare"
        solved = report  # the least-squares candidate: every pruned block refit ("bare" where none has adapters)
        # Else it is the only winner, or it has no tuned model to offer (`_reconstructed_candidate`).
        keep = rebuilt and config.reconstruct_all and config.tune_epochs and (config.sparsegpt or adapted)
        if keep and not adapted:
            least_squares.keep_blocks(model, bare)
        if scored_on is not None:
            score("bare")
        if adapted:
            report, solved = _adapted_candidates(elastic, model, plan, windows, config, batch_size, progress, store,
                                                 report, adapted, score, losses, least_squares if keep else None)
        if config.sparsegpt and scored_on is not None:
            report = _sparsegpt_candidate(elastic, model, plan, windows, config, batch_size, progress, store, report,
                                          score, per_window)
        report.first_choice = report.chosen
        if rebuilt:
            other = (solved, least_squares) if keep and report.chosen != solved.chosen else None
            report = _reconstructed_candidate(elastic, model, windows, config, batch_size, progress, store, report,
                                              score, losses, per_window, other)
    report.losses = losses
    report.mode, report.scored_on = "auto", scored_on
    report.seconds = time.perf_counter() - start
    return report


def _adapted_candidates(elastic: ElasticModel, model: LoadedModel, plan: dict[int, float], windows: torch.Tensor,
                        config: RefitConfig, batch_size: int, progress: bool, store: StreamStore | None,
                        bare: RefitReport, adapted: list[int], score: Callable[[str], None],
                        losses: dict[str, float], least_squares: "_Saved | None") -> tuple[RefitReport, RefitReport]:
    """For "auto": the candidates that re-solve blocks with adapters, against `bare` (the merged model
    as `model` holds it, scored as "bare"): "block", each block with adapters refit only where that
    lowers its output error against the dense target (the per-block choice, `--refit block`), and
    "all", every one refit. Each is made on its own stream; the blocks with bare masks keep their
    solution of the first pass (re-solving them on the slightly changed stream doubled the export's
    time at 0.3-0.4). Where the per-block choice refits every block with adapters it is "all" and
    is scored once as "all"; where it refits none it is "bare". Without `config.block_candidate` only
    "all" is made. The lowest loss wins (ties to the one scored first: bare, block, all); the others
    are undone from copies. Where `least_squares` is given, it receives a copy of "all"'s weights in
    every pruned block. Returns the winner's report and "all"'s."""
    blocks = decoder_blocks(model.model)
    candidates = {"bare": bare}
    refit_blocks: list[int] = []
    with _Saved(model) as merged, _Saved(model) as per_block:
        if config.block_candidate:
            choice = _refit_pass(elastic, model, plan, windows, config, "adapted-block", batch_size, progress, store,
                                 merged)
            refit_blocks = [b for b in adapted if choice.choices[b] != "adapters"]
            if len(refit_blocks) == len(adapted):
                score("all")
                candidates["all"] = choice
            elif refit_blocks:
                score("block")
                candidates["block"] = choice
                for b in refit_blocks:
                    with resident(blocks[b]):
                        per_block.keep(b, prunable_linears(model.model, blocks[b]))
                merged.restore(model, refit_blocks)  # the others kept their merged weights
        if "all" not in candidates:
            # The merged weights are copied by the first pass that overwrites them.
            candidates["all"] = _refit_pass(elastic, model, plan, windows, config, "adapted", batch_size, progress,
                                            store, None if merged else merged)
            score("all")
        if least_squares is not None:  # every path above leaves "all" in the model here
            least_squares.keep_blocks(model, sorted(b for b, s in plan.items() if s > 0))
        chosen = min(candidates, key=losses.__getitem__)
        if chosen == "bare":
            merged.restore(model)
        elif chosen == "block":
            per_block.restore(model)
            merged.restore(model, [b for b in adapted if b not in refit_blocks])
    log.info("refit auto: held-out loss %s: %s", ", ".join(f"{losses[n]:.4f} {n}" for n in candidates), chosen)
    report = candidates[chosen]
    report.chosen = chosen
    candidates["all"].chosen = "all"
    return report, candidates["all"]


def _window_losses(model: torch.nn.Module, heldout: torch.Tensor, batch_size: int,
                   store: StreamStore | None) -> torch.Tensor:
    """Each of the `heldout` (k, seqlen) windows' mean next-token loss (nats), (k,) float64."""
    return blockwise_window_nll(model, heldout, batch_size, store) / (heldout.shape[1] - 1)


def prefers_sparsegpt(candidate: torch.Tensor, sparsegpt: torch.Tensor, se_margin: float) -> tuple[bool, float]:
    """Whether "auto" keeps SparseGPT's solution against a candidate, from their losses on the same
    choice windows ((k,) each): unless the candidate's mean is lower by more than `se_margin`
    standard errors of the paired per-window difference (with one window there is no standard
    error, and SparseGPT's solution stays); with `se_margin` 0, the lower mean wins. Returns the
    decision and the standard error (nats; inf for one window)."""
    difference = candidate - sparsegpt
    se = float(difference.std() / math.sqrt(len(difference))) if len(difference) > 1 else math.inf
    mean = float(difference.mean())
    return (mean > 0 if se_margin == 0 else mean >= -se_margin * se), se


def _sparsegpt_candidate(elastic: ElasticModel, model: LoadedModel, plan: dict[int, float], windows: torch.Tensor,
                         config: RefitConfig, batch_size: int, progress: bool, store: StreamStore | None,
                         current: RefitReport, score: Callable[[str], None],
                         per_window: dict[str, torch.Tensor]) -> RefitReport:
    """For "auto" with `config.sparsegpt`: SparseGPT's own solution for every block at its sparsity
    (its OBS mask and weights, what `epts prune --method sparsegpt` gives), against the `current`
    winner, scored per choice window by `score("sparsegpt")` into `per_window`; keeps the one
    `prefers_sparsegpt` says (`config.sparsegpt_se`) and returns its report. Why a candidate: on
    Gemma-3-270M each layer's exact least-squares weights fit the calibration better than
    SparseGPT's OBS sweep and the model predicts held-out text worse, at 0.3 with any dampening,
    precision or calibration size tried (docs/RECIPE.md); the choice makes the export at least
    SparseGPT's model on the choice windows."""
    with _Saved(model) as saved:
        solution = _refit_pass(elastic, model, plan, windows, config, "all", batch_size, progress, store, saved,
                               sparsegpt=True)
        score("sparsegpt")
        keep, se = prefers_sparsegpt(per_window[current.chosen], per_window["sparsegpt"], config.sparsegpt_se)
        log.info("refit auto: held-out loss %.4f with SparseGPT's solution, %.4f with the %s candidate "
                 "(standard error of the difference %.4f): %s", float(per_window["sparsegpt"].mean()),
                 float(per_window[current.chosen].mean()), current.chosen, se,
                 "SparseGPT's solution" if keep else current.chosen)
        recorded = se if math.isfinite(se) else None  # one choice window has no standard error
        if keep:
            solution.chosen, solution.difference_se = "sparsegpt", recorded
            return solution
        saved.restore(model)
    current.difference_se = recorded
    return current


def _reconstructed_candidate(elastic: ElasticModel, model: LoadedModel, windows: torch.Tensor, config: RefitConfig,
                             batch_size: int, progress: bool, store: StreamStore | None, current: RefitReport,
                             score: Callable[[str], None], losses: dict[str, float],
                             per_window: dict[str, torch.Tensor],
                             least_squares: "tuple[RefitReport, _Saved] | None" = None) -> RefitReport:
    """For "auto" with `config.reconstruct_epochs`: the `current` winner, as `model` holds it, trained
    block by block toward the dense model with its masks fixed (`reconstruct.reconstruct_pruned`) and
    scored as "reconstructed"; with `config.tune_epochs`, that then tuned end to end
    (`reconstruct.tune_end_to_end`) and scored as "tuned". Where `least_squares` is given (the
    least-squares candidate's report and a copy of its weights, when another candidate won:
    `RefitConfig.reconstruct_all`), the same two steps start from it too, scored as "NAME
    reconstructed" and "NAME tuned" ("all reconstructed", "all tuned"), and its tuned model replaces
    the winner's best where it scores lower. The lowest of the winner and what its steps and that
    gave is kept, the others undone from copies. Returns the report of the candidate whose solution
    is kept, with the outcome recorded on it. Why the reconstruction: the refit solves each layer on
    its own input, the reconstruction the whole block against the dense model's stream, which also
    takes out the error the blocks before it left. Why the least-squares candidate too: the choice
    comes before these steps, which gained more from it than from the winner in most Gemma-3-270M
    cells measured, and less in one (docs/RECIPE.md), so each start is judged after its steps; why
    its tuned model only: on SmolLM2-135M its reconstruction won the choice windows and lost the
    docstrings by 6-14 % (docs/RECIPE.md). Why the tuning is scored on its own: toward the last
    hidden state it gains on Gemma-3 and loses on SmolLM2 (docs/RECIPE.md)."""

    def steps(prefix: str, report: RefitReport, before_block=None) -> tuple[str, float]:
        """Reconstruct (then tune) what `model` holds, leave it at the lower-scoring step and return
        that step's name and the seconds both took; the tuning's outcome goes on `report`."""
        rebuilt, tuned_name = f"{prefix}reconstructed", f"{prefix}tuned"
        done = reconstruct_pruned(model.model, elastic.base.model, windows, config.reconstruct_epochs,
                                  config.reconstruct_step, batch_size, progress, store, before_block=before_block,
                                  rank=config.reconstruct_rank)
        score(rebuilt)
        log.info("refit auto: held-out loss %.4f %s block-wise (%.0f s), %.4f as chosen (%s)", losses[rebuilt],
                 f"from the {prefix.strip()} candidate, reconstructed" if prefix else "reconstructed",
                 done.seconds, losses[current.chosen], current.chosen)
        best = rebuilt
        if config.tune_epochs:
            with _Saved(model) as blockwise:  # copies of the reconstruction, to undo a tuning that loses
                blockwise.keep_blocks(model, list(saved))
                tuned = tune_end_to_end(model.model, elastic.base.model, windows, config.tune_epochs,
                                        config.tune_step, config.reconstruct_rank, progress, batch_size)
                report.tune_loss, report.tune_seconds, report.tune_skipped = tuned.loss, tuned.seconds, tuned.skipped
                if tuned.loss is not None:
                    score(tuned_name)
                    log.info("refit auto: held-out loss %.4f %s end to end (%.0f s)", losses[tuned_name],
                             f"from the {prefix.strip()} candidate, tuned" if prefix else "tuned", tuned.seconds)
                    report.tuned = losses[tuned_name] < losses[rebuilt]
                    if report.tuned:
                        best = tuned_name
                    else:
                        blockwise.restore(model)
        return best, done.seconds + report.tune_seconds

    with _Saved(model) as saved:
        best, seconds = steps("", current, saved.keep)
        kept = current  # whose solution `model` now starts from
        if least_squares is not None:
            other, weights = least_squares
            # A block the reconstruction left (no zero in it) still holds the winner's weights: copied too, so
            # that `saved` undoes the other candidate wherever it differs.
            saved.keep_blocks(model, [b for b in weights if b not in saved])
            with _Saved(model) as first:
                first.keep_blocks(model, list(saved))
                weights.restore(model)
                again, more = steps(f"{other.chosen} ", other)
                seconds += more
                difference = per_window[again] - per_window[best]
                se = float(difference.std() / math.sqrt(len(difference))) if len(difference) > 1 else math.nan
                log.info("refit auto: from the %s candidate %.4f, from %s %.4f (standard error of the difference "
                         "%.4f)", other.chosen, losses[again], current.chosen, losses[best], se)
                # Only its tuned model may replace the winner's: on SmolLM2-135M its reconstruction alone won the
                # choice windows and lost the docstrings (docs/RECIPE.md).
                if again == f"{other.chosen} tuned" and losses[again] < losses[best]:
                    best, kept = again, other
                    other.difference_se, other.first_choice = current.difference_se, current.first_choice
                else:
                    first.restore(model)
        if losses[current.chosen] <= losses[best]:
            best, kept = current.chosen, current
            saved.restore(model)
        log.info("refit auto: kept %s", best)
    kept.reconstructed = best != current.chosen
    kept.tuned = kept.tuned and best.endswith("tuned") if kept.tuned is not None else None
    kept.reconstruct_seconds = seconds
    return kept


class _Saved(dict):
    """The prunable weights of the blocks a candidate pass changes, {block: {layer name: weight}},
    copied before it changes them so that a losing candidate is undone exactly: in RAM, or, for a
    streamed model (larger than RAM), in scratch files (`StreamStore`) deleted on leaving the
    `with` block."""

    def __init__(self, model: LoadedModel):
        super().__init__()
        self.store = StreamStore(0 if is_streamed(decoder_blocks(model.model)[0]) else None)

    def __enter__(self) -> "_Saved":
        return self

    def __exit__(self, *exc) -> None:
        self.store.close()

    def keep(self, block: int, layers: dict[str, torch.nn.Linear]) -> None:
        self[block] = {name: self.store.clone(layer.weight.detach()) for name, layer in layers.items()}

    def keep_blocks(self, model: LoadedModel, indices: list[int]) -> None:
        blocks = decoder_blocks(model.model)
        for b in indices:
            with resident(blocks[b]):
                self.keep(b, prunable_linears(model.model, blocks[b]))

    def restore(self, model: LoadedModel, only: list[int] | None = None) -> None:
        """Put the copied weights back (a streamed block's into its scratch file), of the blocks in
        `only` where given."""
        blocks = decoder_blocks(model.model)
        for b, weights in self.items():
            if only is not None and b not in only:
                continue
            with resident(blocks[b], keep=True):
                for name, layer in prunable_linears(model.model, blocks[b]).items():
                    layer.weight.copy_(weights[name])


def _refit_pass(elastic: ElasticModel, model: LoadedModel, plan: dict[int, float], windows: torch.Tensor,
                config: RefitConfig, mode: str, batch_size: int, progress: bool, store: StreamStore | None,
                saved: _Saved | None = None, sparsegpt: bool = False) -> RefitReport:
    """One pass of `refit` in `mode` ("bare", "block", "all", "adapted": only the blocks with
    adapters, the others keep the weights a "bare" pass gave them, or "adapted-block": those blocks
    with the per-block choice of "block") over the blocks in order, each
    refit on the stream the blocks before it give. `saved`, when given, receives a copy of the
    prunable weights of each block before the pass changes them ({block: {layer name: weight}}).
    `sparsegpt` solves the blocks it re-solves with SparseGPT's own OBS mask and weights instead
    of the least-squares refit (`RefitConfig.sparsegpt`)."""
    report = RefitReport(mode, mask="obs" if sparsegpt else config.mask)
    iters, ridge = (0, 0.0) if sparsegpt else (config.iters, config.ridge)
    start = time.perf_counter()
    blocks = decoder_blocks(model.model)
    base_blocks = decoder_blocks(elastic.base.model)
    sparsities = [plan.get(b, 0.0) for b in range(len(blocks))]
    adapters = [s > 0 and _has_adapters(elastic, b, s) for b, s in enumerate(sparsities)]
    compares = mode in ("block", "adapted-block")  # the per-block choice, in the blocks with adapters
    solved = [s > 0 and not (mode == "bare" and adapters[b])
              and not (mode in ("adapted", "adapted-block") and not adapters[b]) for b, s in enumerate(sparsities)]
    # What a block the pass does not re-solve serves with.
    kept = ["dense" if s == 0 else "adapters" if adapters[b] else "refit" for b, s in enumerate(sparsities)]
    # Past the last block it re-solves a pass has nothing left to change, so its stream is not carried
    # further ("block" still measures errors there).
    end = len(blocks) if mode == "block" else max((b + 1 for b in range(len(blocks)) if solved[b]), default=0)
    calls = capture_block_calls(model.model, windows, batch_size, store) if end else None
    elastic_stream = calls.hidden if end else None
    # METHOD.md's target (the dense block on the dense stream) decides only the per-block choice, and only on
    # the first windows: a choice needs an estimate of the error, not the whole calibration's forward.
    few = config.compare_windows
    dense = elastic_stream[:few] if compares else None
    for b, block in enumerate(tqdm(blocks[:end], desc=f"refit ({mode})", disable=not progress)):
        sparsity = sparsities[b]
        with resident(base_blocks[b]), resident(block, keep=sparsity > 0):
            base_runner, runner = calls.runner(b, base_blocks[b]), calls.runner(b, block)
            target = base_runner.run(dense) if dense is not None else None
            if not solved[b]:
                out = runner.run(elastic_stream)
                report.choices.append(kept[b])
                report.errors.append((_mse(out[:few], target), float("nan")))
                elastic_stream, dense = out, target
                continue
            layers = prunable_linears(model.model, block)
            if saved is not None:
                saved.keep(b, layers)
            anchors = {name: layer.weight for name, layer in layers.items()} if ridge > 0 else None
            refitted = _refit_block(elastic, b, sparsity, base_runner, elastic_stream, iters, ridge, anchors,
                                    sparsegpt or config.mask == "obs")
            # Only the per-block choice compares, in blocks with adapters: elsewhere the merged weights are not needed.
            compare = compares and adapters[b]
            merged = {name: layer.weight.detach().clone() for name, layer in layers.items()} if compare else {}
            few_merged = runner.run(elastic_stream[:few]) if compare else None
            for name, layer in layers.items():
                layer.weight.copy_(refitted[name])
            out = runner.run(elastic_stream)
            errors = (_mse(few_merged, target), _mse(out[:few], target))
            keep_refit = not compare or errors[1] < (1 - config.margin) * errors[0]
            if not keep_refit:
                for name, layer in layers.items():
                    layer.weight.copy_(merged[name])
                # Where the error was measured on every window, that run is the merged block's output.
                out = few_merged if few >= len(elastic_stream) else runner.run(elastic_stream)
            report.choices.append(("sparsegpt" if sparsegpt else "refit") if keep_refit else "adapters")
            report.errors.append(errors)
            elastic_stream, dense = out, target
    report.choices += kept[end:]
    report.errors += [(float("nan"), float("nan"))] * (len(blocks) - end)
    report.seconds = time.perf_counter() - start
    log.info("refit (%s%s): %d of %d blocks re-solved in %.1f s", mode, ", SparseGPT's solution" * sparsegpt,
             report.to_dict()["refit_blocks"], len(blocks), report.seconds)
    return report


def _has_adapters(elastic: ElasticModel, index: int, sparsity: float) -> bool:
    """Whether block `index` serves `sparsity` with any learnt update (adapters or a shared delta)."""
    state = elastic.blocks[index]
    config = elastic.config
    return bool(active_adapters(config.group_of(sparsity), state.group1_adapter, config.inherit_adapters,
                                config.group1_inherited)) or bool(state.deltas)


def _refit_block(elastic: ElasticModel, index: int, sparsity: float, base_runner, stream: torch.Tensor,
                 iters: int, ridge: float = 0.0, anchors: dict[str, torch.Tensor] | None = None,
                 obs: bool = False) -> dict[str, torch.Tensor]:
    """The refit weights of every prunable layer of block `index`: Hessians of the layers' inputs
    when the base block runs on `stream` (SparseGPT's convention: the unpruned block on the pruned
    model's activations), then the least-squares weights on the elastic mask M(sparsity), pulled
    toward `anchors` (the served block's merged weights, by layer name) with `ridge` > 0. With
    `obs` (`RefitConfig.mask` "obs") the mask is SparseGPT's instead, chosen by OBS saliency on
    these Hessians at the same sparsity per row, and the steps start from SparseGPT's OBS solution."""
    layers = prunable_linears(elastic.base.model, base_runner.block)
    pruners = {name: SparseGPTPruner(layer) for name, layer in layers.items()}
    base_runner.collect_input_stats(stream, {p.layer: p for p in pruners.values()})
    weights = {}
    for name, p in pruners.items():
        start = None
        factors = p.inverse_hessian()
        if obs:
            start, pruned = p.prune(Pattern(sparsity=sparsity), factors)
            if iters == 0:  # SparseGPT's own solution (RefitConfig.sparsegpt): nothing to solve
                weights[name] = start
                continue
        else:
            pruned = ~mask_from_ranks(elastic.ranks(index, name).to(p.layer.weight.device), sparsity)
        hessian, inverse, _ = factors
        anchor = None if anchors is None else anchors[name].to(p.layer.weight.device)
        weights[name] = masked_least_squares(p.layer.weight, hessian, inverse, pruned, iters, ridge, anchor,
                                             start).to(p.layer.weight.dtype)
    return weights
