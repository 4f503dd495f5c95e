"""Block-wise one-shot reconstruction (METHOD.md, ingredient 4): the heart of EPTS.

Two streams of hidden states flow block by block: the dense stream H (untouched model) and the
elastic stream P (what the already-trained elastic blocks produce). For each block: dense targets
and Wanda input norms from H; E epochs in which every optimiser step runs all K groups (or
`groups_per_step` of them in turn, an epts speed option) on P with a stratified sparsity draw per
group; the group-1 check; H <- dense block(H); P <- MSFM(P) (or P <- H, EPTSConfig.propagate "dense").
Only the current block's adapters live on the compute device; both streams stay on the CPU (in
memory-mapped scratch files past `EPTSConfig.stream_memory_mb`, see `epts.streams`). A
streamed model (`load_model(..., stream=True)`) holds only the current block's weights.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from . import distributed, hilora
from .arch import decoder_blocks, prunable_linears
from .artifact import BlockState, ElasticModel, calibration_record
from .blocks import BlockCalls, BlockRunner, call_block, capture_block_calls
from .checkpoint import clear_checkpoint, load_checkpoint, run_key, run_settings, save_checkpoint
from .config import EPTSConfig
from .data import calibration_set
from .evaluate import peak_rss_mb
from .importance import InputNormStats, importance_scores, row_ranks
from .mixer import draw_mix_sparsities, mix_features
from .models import LoadedModel, check_context, fingerprint
from .offload import is_streamed, resident
from .selfcal import SelfCalConfig, self_calibration
from .streams import StreamStore

log = logging.getLogger(__name__)


def stratified_sparsities(lo: float, hi: float, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` draws in (lo, hi]: the interval cut into `count` equal slices, one uniform draw per
    slice, in shuffled order, so every part of the group's range is visited evenly."""
    width = (hi - lo) / count
    u = 1.0 - torch.rand(count, generator=generator, dtype=torch.float64)  # (0, 1]
    draws = lo + (torch.arange(count, dtype=torch.float64) + u) * width
    return draws[torch.randperm(count, generator=generator)]


def group_schedule(groups: int, per_step: int, steps: int, generator: torch.Generator, top_always: int = 0
                   ) -> list[list[int]]:
    """For each optimiser step, the groups it trains (ascending): all of them when `per_step` equals
    `groups` (METHOD.md; `generator` is then left untouched), else the highest `top_always` groups at
    every step and `per_step - top_always` distinct others taken in turn from a stream of shuffled
    permutations of the lower ones, so that each of those trains on an equal share of the steps (up
    to one). An epts speed option, not in the paper."""
    if per_step >= groups:
        return [list(range(groups))] * steps
    rotating = groups - top_always
    stream: list[int] = []
    schedule = []
    for _ in range(steps):
        chosen: list[int] = []
        i = 0
        while len(chosen) < per_step - top_always:
            if i == len(stream):
                stream += torch.randperm(rotating, generator=generator).tolist()
            if stream[i] in chosen:  # a permutation's seam: the next one may repeat a group
                i += 1
            else:
                chosen.append(stream.pop(i))
        schedule.append(sorted(chosen) + list(range(rotating, groups)))
    return schedule


def _block_generator(seed: int, block: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + block)


def layer_ranks(layers: dict[str, nn.Linear], input_norms: dict[str, torch.Tensor], criterion: str = "wanda"
                ) -> dict[str, torch.Tensor]:
    """Per-row ranks of every layer's importance (`criterion` with `input_norms`, magnitude when empty)."""
    return {n: row_ranks(importance_scores(l.weight, input_norms.get(n), criterion)) for n, l in layers.items()}


@torch.no_grad()
def weight_rms(layers: dict[str, nn.Linear]) -> float:
    """Root-mean-square of all the layers' weights together (summed in float64, whatever their dtype)."""
    total = sum(torch.linalg.vector_norm(layer.weight, dtype=torch.float64).item() ** 2 for layer in layers.values())
    return math.sqrt(total / sum(layer.weight.numel() for layer in layers.values()))


@torch.no_grad()
def dense_pass(runner: BlockRunner, layers: dict[str, nn.Linear], stream: torch.Tensor
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The dense block on the dense stream: its outputs (targets, next dense stream) and the
    input-channel norms of its prunable linears (Wanda importance)."""
    stats = {name: InputNormStats(layer.in_features) for name, layer in layers.items()}
    out = runner.run_with_input_stats(stream, {layer: stats[name] for name, layer in layers.items()})
    for s in stats.values():
        distributed.sum_(s.sum_sq)
    return out, {name: s.norm() for name, s in stats.items()}


def token_weights(target: torch.Tensor, token_loss: str) -> torch.Tensor | None:
    """Per-token weights of the squared error (b, seqlen, 1), or None for plain MSE (`token_loss`
    "mse", METHOD.md). "relative": 1 / the target token's mean square, so every token's error counts
    relative to its size, as the next block's RMSNorm sees it; with plain MSE a few tokens of massive
    activation (SmolLM2's first token: 99 % of a mid-block target's square sum) make most of the loss."""
    if token_loss == "mse":
        return None
    return 1.0 / target.pow(2).mean(-1, keepdim=True).clamp_min(torch.finfo(target.dtype).tiny)


def reconstruction_loss(out: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error of `out` against `target`, each token's weighted by `weights` (`token_weights`)."""
    return F.mse_loss(out, target) if weights is None else (weights * (out - target).pow(2)).mean()


def guided_loss(out: torch.Tensor, target: torch.Tensor, anchor: torch.Tensor, guide_weight: float,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """Loss of a group above the first: (1 - w) ||out - Y||^2 + w ||out - stopgrad(out_1)||^2."""
    return ((1 - guide_weight) * reconstruction_loss(out, target, weights)
            + guide_weight * reconstruction_loss(out, anchor.detach(), weights))


class NonFiniteError(ArithmeticError):
    pass


@contextmanager
def matmul_precision(precision: str, device: torch.device):
    """Inside, float32 matmuls on a CPU run on bfloat16 units (oneDNN: AMX or AVX512-BF16, float32
    accumulation) when `precision` is "bf16"; "ieee" changes nothing. The tensors stay float32.
    Where the CPU has no bfloat16 units, or on another device, it warns and changes nothing."""
    if precision == "ieee":
        yield
        return
    if device.type != "cpu" or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("train_matmul_precision %s: no bfloat16 matmul units on %s; training in float32", precision,
                    device if device.type != "cpu" else "this CPU")
        yield
        return
    previous = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = precision
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous


def train_block(
    runner: BlockRunner,
    layers: dict[str, hilora.ElasticLinear],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    config: EPTSConfig,
    generator: torch.Generator,
    lr: float,
    progress: bool,
    dense_inputs: torch.Tensor | None = None,
    group1_lr: float | None = None,
) -> list[float]:
    """E epochs of multi-sparsity training of one block's adapters on `inputs` (the elastic stream)
    against `targets` (the dense block's outputs), both (n, seqlen, hidden) on the CPU, every step
    training every group or `config.groups_per_step` of them (`group_schedule`); returns each
    group's mean loss over the last epoch. With `config.group1_stream` "dense", group 1 trains on
    `dense_inputs` (the dense stream, same shape) instead; with "alternate", on every other step.
    The adapters train at `lr` (B at lr * config.lr_ratio_b), group 1's at `group1_lr` when given.
    Raises NonFiniteError at the first non-finite loss or gradient, ValueError when the config
    asks for the dense stream and `dense_inputs` is None."""
    if config.group1_stream != "elastic" and dense_inputs is None:
        raise ValueError(f"group1_stream {config.group1_stream!r} needs the dense stream (dense_inputs)")
    device = runner.device
    world = distributed.world_size()
    # config.batch_size is the global batch: each of the `world` processes takes its share of it.
    n, bs, K = inputs.shape[0], config.batch_size // world, config.num_groups
    steps_per_epoch = math.ceil(n / bs)
    total = config.epochs * steps_per_epoch
    # Which groups each step trains: all K (METHOD.md), or `groups_per_step` of them, the top
    # `top_groups_every_step` always and the others in turn.
    schedule = group_schedule(K, config.groups_per_step or K, total, generator, config.top_groups_every_step)
    # Each group's sparsities are stratified over the steps that train it; group 1's over every step,
    # since a step that does not train it still needs its output as the guided loss's anchor.
    visits = [total] + [sum(k in trained for trained in schedule) for k in range(1, K)]
    draws = [stratified_sparsities(lo, hi, max(count, 1), generator) for (lo, hi), count in zip(config.groups, visits)]
    used = [0] * K  # draws taken so far, per group above the first
    params = [p for layer in layers.values() for p in layer.parameters()]
    rates = [lr if group1_lr is None else group1_lr] + [lr] * (K - 1)  # per group's adapter
    groups = [{"params": [getattr(l, m)[k] for l in layers.values()],
               "lr": rate * (config.lr_ratio_b if m == "B" else 1)} for k, rate in enumerate(rates) for m in ("A", "B")]
    if config.delta_lr > 0:
        groups.append({"params": [l.delta for l in layers.values()], "lr": config.delta_lr * lr / config.lr})
    optimizer = torch.optim.Adam(groups)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=0.0)
    epoch_losses = torch.zeros(K, dtype=torch.float64)
    epoch_counts = torch.zeros(K, dtype=torch.float64)
    with tqdm(total=total, desc=runner.name, disable=not progress, leave=False) as bar:
        for step in range(total):
            if step % steps_per_epoch == 0:
                epoch_losses.zero_()
                epoch_counts.zero_()
            start = (step % steps_per_epoch) * bs
            x = inputs[start : start + bs].to(device)
            # Group 1 learns on the elastic stream, the dense one (group1_stream "dense": what a low-sparsity
            # model's blocks see), or each on every other step ("alternate").
            on_dense = config.group1_stream == "dense" or (config.group1_stream == "alternate" and step % 2 == 1)
            x1 = dense_inputs[start : start + bs].to(device) if on_dense else x
            # Losses in float32 whatever the model computes in (a no-op for a float32 model).
            y = targets[start : start + bs].to(device).float()
            weights = token_weights(y, config.token_loss)
            anchor = None
            if (schedule[step][0] != 0 or x1 is not x) and config.guide_weight > 0:
                # The guided loss needs group 1's output on the elastic stream even on a step whose
                # group 1 does not train there.
                with torch.no_grad():
                    hilora.set_state(layers, draws[0][step].item(), 0)
                    anchor = call_block(runner, x).float()
            step_losses = torch.zeros(K, dtype=torch.float64)
            for k in schedule[step]:
                hilora.set_state(layers, draws[k][step if k == 0 else used[k]].item(), k)
                used[k] += 1
                out = call_block(runner, x1 if k == 0 else x).float()
                if k == 0 or anchor is None:
                    loss = reconstruction_loss(out, y, weights)
                else:
                    loss = guided_loss(out, y, anchor, config.guide_weight, weights)
                if k == 0 and x1 is x:
                    anchor = out.detach()
                value = loss.item()
                if world == 1 and not math.isfinite(value):
                    raise NonFiniteError(f"non-finite loss of group {k + 1} at step {step + 1}")
                loss.backward()
                step_losses[k] = value
                epoch_counts[k] += 1
            if world > 1:  # every process decides on the same reduced numbers, or they would part ways
                distributed.mean_grads_(params)
                distributed.mean_(step_losses)
                if not torch.isfinite(step_losses).all():
                    raise NonFiniteError(f"non-finite loss of group {int(step_losses.isfinite().logical_not().nonzero()[0]) + 1} "
                                         f"at step {step + 1}")
            epoch_losses += step_losses
            # A step that trains only some groups leaves the higher groups' adapters without a gradient.
            grads = [p.grad for p in params if p.grad is not None]
            if not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
                raise NonFiniteError(f"non-finite gradient at step {step + 1}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if progress and (step % steps_per_epoch == steps_per_epoch - 1 or step == total - 1):
                # Each group's mean loss so far this epoch, labelled by its sparsity range.
                means = (epoch_losses / epoch_counts.clamp_min(1)).tolist()
                bar.set_postfix_str(" ".join(f"{lo:g}-{hi:g}:{v:.2e}" for (lo, hi), v in zip(config.groups, means)))
            bar.update()
    return (epoch_losses / epoch_counts.clamp_min(1)).tolist()


@torch.no_grad()
def group1_check(runner: BlockRunner, layers: dict[str, hilora.ElasticLinear], stream: torch.Tensor,
                 targets: torch.Tensor, sparsity: float, token_loss: str = "mse") -> tuple[float, float]:
    """Loss against the dense targets at `sparsity`, with and without the group-1 adapter, on the
    training's `token_loss`."""
    losses = []
    y = targets.float()
    weights = token_weights(y, token_loss)
    for keep in (True, False):
        hilora.set_state(layers, sparsity, 0, group1_adapter=keep)
        out = runner.run(stream)
        losses.append(distributed.mean_(reconstruction_loss(out.float(), y, weights).double()).item())
    return losses[0], losses[1]


@dataclass(frozen=True)
class Streams:
    """The two streams entering a block, each (n, seqlen, hidden) on the CPU: the dense stream H
    (the untouched model's hidden states) and the elastic stream P (the trained elastic blocks')."""

    dense: torch.Tensor
    elastic: torch.Tensor


def compress_block(model: nn.Module, b: int, calls: BlockCalls, streams: Streams, config: EPTSConfig, *,
                   progress: bool = False) -> tuple[BlockState, Streams]:
    """Everything METHOD.md does for block `b` (0-based) of `model`, fed by `calls` and `streams`;
    returns its state and the streams entering the next block. A non-finite loss or gradient
    restarts the block with a lower learning rate; `NonFiniteError` once the retries are spent."""
    dense, elastic = streams.dense, streams.elastic
    block = decoder_blocks(model)[b]
    block_start = time.perf_counter()
    runner = calls.runner(b, block)
    originals = prunable_linears(model, block)
    targets, norms = dense_pass(runner, originals, dense)
    input_norms = norms if config.criterion != "magnitude" else {}
    ranks = layer_ranks(originals, input_norms, config.criterion)
    scaled_lr = config.block_lr(weight_rms(originals))
    base_lr = config.lr if config.lr_scaled_groups == "group1" else scaled_lr
    retries = []
    for attempt in range(config.max_retries + 1):
        lr, group1_lr = (rate * config.retry_lr_factor**attempt for rate in (base_lr, scaled_lr))
        # Every random draw of a block comes from its own generator (adapter initialisation, sparsity
        # draws), so a block's result does not depend on how the blocks before it were run.
        gen = _block_generator(config.calib.seed, b)
        layers = hilora.attach(block, originals, ranks, config.ranks, gen, shared_update=config.delta_lr > 0,
                               inherit=config.inherit_adapters, group1_inherited=config.group1_inherited,
                               group1_detached=config.group1_detached, boundaries=config.boundaries,
                               ramp=config.adapter_ramp)
        try:
            with matmul_precision(config.train_matmul_precision, runner.device):
                losses = train_block(runner, layers, elastic, targets, config, gen, lr, progress, dense, group1_lr)
            group1_adapter, check = True, (0.0, 0.0)
            if config.group1_check:
                check = group1_check(runner, layers, dense, targets, config.group1_check_sparsity, config.token_loss)
                group1_adapter = check[0] < check[1]
            if config.propagate == "dense":  # the ablation P <- H: the next block learns on dense features
                mixed = targets
            else:
                mixed = mix_features(runner, layers, elastic, draw_mix_sparsities(config.groups, gen),
                                     config.mix_weights, group1_adapter)
            break
        except NonFiniteError as err:
            retries.append({"attempt": attempt, "lr": lr, "reason": str(err)})
            log.warning("block %d: %s at lr %g; retrying from the block's start", b + 1, err, lr)
        finally:
            hilora.detach(block, originals)
    else:
        raise NonFiniteError(f"block {b + 1} kept diverging ({len(retries)} tries, last lr "
                             f"{retries[-1]['lr']:g}): lower --lr or check the model's weights for NaN")
    state = BlockState(
        adapters={n: ([a.detach().cpu().clone() for a in l.A], [bb.detach().cpu().clone() for bb in l.B])
                  for n, l in layers.items()},
        deltas={n: l.delta.detach().cpu().clone() for n, l in layers.items() if l.delta is not None},
        input_norms=input_norms,
        group1_adapter=group1_adapter,
        losses=losses,
        group1_check=check,
        seconds=time.perf_counter() - block_start,
        retries=retries,
        lr=lr,
        group1_lr=group1_lr,
    )
    log.info("block %d: %.1f s at lr %.3g (group 1 %.3g), last-epoch losses %s, group-1 adapter %s", b + 1,
             state.seconds, lr, group1_lr, ["%.3g" % v for v in losses], "kept" if group1_adapter else "dropped")
    return state, Streams(targets, mixed)


def compress(
    loaded: LoadedModel,
    calib: str | os.PathLike | torch.Tensor | SelfCalConfig | None,
    config: EPTSConfig | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    metadata: dict | None = None,
    num_blocks: int | None = None,
) -> ElasticModel:
    """One EPTS optimisation; returns the elastic model (the base weights are left untouched).

    `calib` is a text source (`epts.data.read_text`), ready windows (a 2-D tensor of token ids), or
    None or a `SelfCalConfig` for windows the model writes itself (`epts.selfcal`, with the default
    or the given sampling); the manifest records which.
    With `out`, a checkpoint is written there after every block, an unfinished run of the same
    model, config and calibration there is continued from its last finished block, and the
    artifact is saved there at the end. `metadata` is recorded with the run's statistics.
    `num_blocks` compresses only the first blocks (a cheap proxy for experiments); the others
    stay dense when the elastic model is materialised.
    """
    config = config or EPTSConfig()
    cc = config.calib
    model = loaded.model
    start = time.perf_counter()
    check_context(model, cc.seqlen)
    if calib is None or isinstance(calib, SelfCalConfig):
        windows, calibration = self_calibration(model, loaded.tokenizer, cc.nsamples, cc.seqlen, cc.seed, calib,
                                                progress)
    else:
        windows = calibration_set(loaded.tokenizer, calib, cc.nsamples, cc.seqlen, cc.seed)
        calibration = calibration_record(calib, windows)
    base_fingerprint = fingerprint(model)
    key, settings = run_key(config, base_fingerprint, windows), run_settings(config, base_fingerprint, windows)
    folder = Path(out) if out is not None else None
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    blocks = decoder_blocks(model)[:num_blocks]
    mine = distributed.shard(len(windows), config.batch_size)  # this process's windows (all of them in one)
    store = StreamStore(config.stream_memory_mb)  # RAM, or scratch files past the budget
    try:
        with torch.no_grad():
            calls = capture_block_calls(model, windows[mine], cc.batch_size, store)
        checkpoint = load_checkpoint(folder, key, config.num_groups, settings) if folder is not None else None
        resumed = checkpoint is not None
        if checkpoint is None:
            states, streams = [], Streams(calls.hidden, store.clone(calls.hidden))
        else:
            states = checkpoint[0]
            streams = Streams(store.keep(checkpoint[1][mine]), store.keep(checkpoint[2][mine]))
            log.info("resuming %s after block %d of %d", folder, len(states), len(blocks))
        # The pipeline alone holds the streams from here, so the captured one is freed after block 1.
        checkpoint = calls.hidden = None
        overall = tqdm(total=len(blocks), initial=len(states), desc="compress: blocks", unit="block",
                       disable=not progress)
        for b in range(len(states), len(blocks)):
            with resident(blocks[b]):  # a streamed block's weights: loaded, used, released
                state, streams = compress_block(model, b, calls, streams, config, progress=progress)
            states.append(state)
            overall.update()
            if folder is not None and b + 1 < len(blocks):
                gathered = [distributed.gather(s, mine, len(windows)) for s in (streams.dense, streams.elastic)]
                if distributed.is_main():
                    save_checkpoint(folder, key, states, *gathered, settings)
        overall.close()
    finally:
        store.close()
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])
    stats = {"compress_seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "nsamples": len(windows),
             "world_size": distributed.world_size(), "resumed": resumed, **(metadata or {})}
    elastic_model = ElasticModel(loaded, config, states, base_fingerprint, stats, calibration)
    if folder is not None and distributed.is_main():
        elastic_model.save(folder)
        clear_checkpoint(folder)
    distributed.barrier()
    return elastic_model


@dataclass
class PrunedReconstruction:
    """What `reconstruct_pruned` did: per block, the mean squared error of its output against the
    dense target over the last epoch's steps (NaN where the block was not trained: dense, or
    restored after a non-finite loss), the blocks restored, and the seconds it took."""

    losses: list[float]
    restored: list[int]
    seconds: float


def reconstruct_pruned(model: nn.Module, base: nn.Module, windows: torch.Tensor, epochs: int, step: float,
                       batch_size: int = 8, progress: bool = True, store: StreamStore | None = None,
                       before_block=None, token_loss: str = "mse", rank: int = 0) -> PrunedReconstruction:
    """Block-wise reconstruction of a pruned model's kept weights, in place, with every mask fixed:
    block by block in order, the block's prunable weights train (Adam, one of `windows` (n, seqlen)
    token ids per step, `epochs` passes in a seeded order) to match METHOD.md's target, the dense
    block of `base` on the dense stream, fed the stream of the blocks already reconstructed. A weight
    that is zero stays zero (its gradient is masked), so the pattern, and with it the sparsity, is
    the one the model had. Adam's step is `step` times the block's weight RMS (weights of different
    scale move alike: Gemma-3's are 5.6x smaller than SmolLM2's). A model in float16 or bfloat16
    trains float32 master weights, rounded into the layer after each step. `token_loss` weighs each
    token's squared error as the compress does (`token_weights`: "mse" or "relative"). With `rank` > 0
    each layer changes only by a masked update of that rank, M * (B A), not every kept weight on its
    own (RefitConfig.reconstruct_rank: fewer degrees of freedom than the calibration's tokens can pin
    down; docs/RECIPE.md). `before_block(b, layers)`
    is called before block b's weights change (a copy to undo them). A block whose loss or gradient
    turns non-finite gets its weights back, with a warning. Blocks of `model` at sparsity 0 (no zero
    weight) are left as they are. Streamed blocks are held one at a time (`offload.resident`)."""
    start = time.perf_counter()
    store = store or StreamStore()
    blocks, base_blocks = decoder_blocks(model), decoder_blocks(base)
    with torch.no_grad():
        calls = capture_block_calls(model, windows, batch_size, store)
    pruned, dense = calls.hidden, store.clone(calls.hidden)
    calls.hidden = None
    losses, restored = [], []
    for b, block in enumerate(tqdm(blocks, desc="reconstruct", disable=not progress)):
        with resident(base_blocks[b]), resident(block, keep=True) as held:
            runner = calls.runner(b, held)
            with torch.no_grad():
                target = calls.runner(b, base_blocks[b]).run(dense)
            layers = prunable_linears(model, held)
            if not _has_zeros(layers.values()):  # a dense block: nothing to fit
                losses.append(float("nan"))
            else:
                if before_block is not None:
                    before_block(b, layers)
                loss = _train_kept_weights(runner, layers, pruned, target, epochs, step, b, progress, token_loss,
                                           rank)
                if loss is None:
                    restored.append(b)
                losses.append(float("nan") if loss is None else loss)
            with torch.no_grad():
                pruned, dense = runner.run(pruned), target
    return PrunedReconstruction(losses, restored, time.perf_counter() - start)


def _has_zeros(layers) -> bool:
    """Whether any of `layers` (nn.Linear) has a pruned (zero) weight: a block without is dense."""
    return any(bool(layer.weight.eq(0).any()) for layer in layers)


def _low_rank_factors(weight: torch.Tensor, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of a low-rank update B A of `weight` (rows, cols), float32 on its device: A (rank,
    cols) drawn from `generator` with variance 1 / cols, B (rows, rank) zero, so the update starts at zero."""
    rows, cols = weight.shape
    return ((torch.randn(rank, cols, generator=generator) / math.sqrt(cols)).to(weight.device),
            torch.zeros(rows, rank, device=weight.device))


def _train_kept_weights(runner: BlockRunner, layers: dict[str, nn.Linear], inputs: torch.Tensor,
                        targets: torch.Tensor, epochs: int, step: float, index: int, progress: bool,
                        token_loss: str = "mse", rank: int = 0) -> float | None:
    """`reconstruct_pruned` for one block: its mean loss over the last epoch, or None where a loss or
    gradient turned non-finite (the block's weights then put back as they were). With `rank` > 0 the
    block's kept weights W0 change only by a masked low-rank update, W = W0 + M * (B A) (B zero at
    the start), A and B trained from the weight's own (masked) gradient G: dB = G A^T, dA = B^T G."""
    block = runner.block
    trainable = {p: p.requires_grad for p in block.parameters()}
    block.requires_grad_(False)
    weights = [layer.weight for layer in layers.values()]
    masks = [w.detach().ne(0) for w in weights]
    originals = [w.detach().clone() for w in weights]
    masters = [w.detach().float().clone() for w in weights]  # float32 master weights, whatever the layer's dtype
    generator = _block_generator(0, index)
    factors = [_low_rank_factors(w, rank, generator) for w in weights] if rank else []
    optimizer = torch.optim.Adam([t for pair in factors for t in pair] or masters, lr=step * weight_rms(layers))
    n = inputs.shape[0]
    total, last = 0.0, None
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad(), tqdm(total=epochs * n, desc=runner.name, disable=not progress, leave=False) as bar:
            for epoch in range(epochs):
                total = 0.0
                for i in torch.randperm(n, generator=generator).tolist():
                    out = call_block(runner, inputs[i : i + 1].to(runner.device)).float()
                    target = targets[i : i + 1].to(runner.device).float()
                    loss = reconstruction_loss(out, target, token_weights(target, token_loss))
                    value = loss.item()
                    loss.backward()
                    grads = [w.grad.float().mul_(m) for w, m in zip(weights, masks)]
                    if not (math.isfinite(value) and torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
                        raise NonFiniteError(f"non-finite loss or gradient at epoch {epoch + 1}")
                    for w in weights:
                        w.grad = None
                    if rank:
                        for (a, b), grad in zip(factors, grads):
                            a.grad, b.grad = b.T @ grad, grad @ a.T
                    else:
                        for master, grad in zip(masters, grads):
                            master.grad = grad
                    optimizer.step()
                    with torch.no_grad():
                        for j, w in enumerate(weights):
                            if rank:
                                a, b = factors[j]
                                w.copy_(torch.addmm(masters[j], b, a).mul_(masks[j]))
                            else:
                                w.copy_(masters[j])
                    total += value
                    bar.update()
        last = total / n
    except NonFiniteError as err:
        log.warning("reconstruct: %s: %s; its weights are put back as they were", runner.name, err)
        with torch.no_grad():
            for w, original in zip(weights, originals):
                w.copy_(original)
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
            p.grad = None
    return last


@dataclass
class EndToEndTuning:
    """What `tune_end_to_end` did: the mean loss of its last epoch (None where it did not run, or
    where a loss or gradient turned non-finite and every weight was put back), the layers it tuned,
    the seconds it took, and why it did not run (`skipped`, else None)."""

    loss: float | None
    layers: int
    seconds: float
    skipped: str | None = None


class _MaskedUpdate(nn.Module):
    """A weight's parametrisation W -> W + M * U, M the weight's nonzero pattern (so the sparsity
    stays) and U = B A of rank `rank` (B zero at the start), or with `rank` 0 a full matrix (zero at
    the start). Added in float32, then cast to the weight's dtype."""

    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator):
        super().__init__()
        self.register_buffer("mask", weight.detach().ne(0))
        if rank:
            a, b = _low_rank_factors(weight, rank, generator)
            self.a, self.b = nn.Parameter(a), nn.Parameter(b)
        else:
            self.a, self.b = None, nn.Parameter(torch.zeros_like(weight, dtype=torch.float32))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        update = self.b if self.a is None else self.b @ self.a
        return (weight.float() + self.mask * update).to(weight.dtype)


def tune_end_to_end(model: nn.Module, base: nn.Module, windows: torch.Tensor, epochs: int, step: float,
                    rank: int = 16, progress: bool = True, batch_size: int = 8) -> EndToEndTuning:
    """End-to-end tuning of a pruned causal LM `model` after its block-wise reconstruction, in place:
    every prunable layer of the blocks with pruned weights changes by a masked update M * U (rank
    `rank`, 0: every kept weight; `_MaskedUpdate`), all trained together toward `base`'s (the dense
    model's) last hidden state, after its final norm (what the output embedding reads): mean squared
    error, Adam at `step` times those layers' weight RMS, one of `windows` (n, seqlen) token ids per
    step, `epochs` passes in a seeded order. Why: the block-wise targets weigh every block's error
    alike, and each block is fitted before the blocks after it change; here each layer moves by
    what its error does at the output (docs/RECIPE.md). It holds every block's weights and, for the
    backward pass, about two float32 copies of them: a streamed model's blocks are held for the
    duration where the memory available allows it, else nothing is done (`skipped` says so).
    Where a loss or gradient turns non-finite every weight is put back, with a warning."""
    start = time.perf_counter()
    if not epochs:
        return EndToEndTuning(None, 0, time.perf_counter() - start, "no epochs")
    blocks = decoder_blocks(model)
    streamed = is_streamed(blocks[0])
    if streamed:
        import psutil

        need = 3 * 4 * sum(p.numel() for block in blocks for p in block.parameters())
        free = psutil.virtual_memory().available
        if need > free:
            log.info("tune end to end: skipped, a streamed model's blocks need about %.1f GiB held, %.1f GiB free",
                     need / 2**30, free / 2**30)
            return EndToEndTuning(None, 0, time.perf_counter() - start,
                                  f"needs {need / 2**30:.1f} GiB of memory, {free / 2**30:.1f} GiB available")
    device = next(model.parameters()).device
    with ExitStack() as held:
        tuned: list[nn.Module] = []  # the blocks with pruned weights: a dense block stays as it is
        if streamed:  # each block read once: held, then written back only if it is tuned
            for block in blocks:
                held.enter_context(resident(block, keep=lambda block=block: any(block is t for t in tuned)))
        tuned += [block for block in blocks if _has_zeros(prunable_linears(model, block).values())]
        if not tuned:
            return EndToEndTuning(None, 0, time.perf_counter() - start, "no pruned block")
        with torch.no_grad():  # a streamed base reads each block once per batch
            targets = torch.cat([base.base_model(windows[i : i + batch_size].to(device), use_cache=False)
                                 .last_hidden_state.float().cpu() for i in range(0, len(windows), batch_size)])
        layers = [layer for block in tuned for layer in prunable_linears(model, block).values()]
        loss = _tune_layers(model, layers, windows, targets, epochs, step, rank, progress, device)
    return EndToEndTuning(loss, len(layers), time.perf_counter() - start)


def _tune_layers(model: nn.Module, layers: list[nn.Linear], windows: torch.Tensor, targets: torch.Tensor,
                 epochs: int, step: float, rank: int, progress: bool, device: torch.device) -> float | None:
    """`tune_end_to_end`'s training, every block's weights held: its last-epoch mean loss, or None
    where it turned non-finite (the weights then as they were)."""
    generator = torch.Generator().manual_seed(0)
    updates = [_MaskedUpdate(layer.weight, rank, generator) for layer in layers]
    optimizer = torch.optim.Adam([p for update in updates for p in update.parameters()],
                                 lr=step * weight_rms(dict(enumerate(layers))))
    trainable = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for layer, update in zip(layers, updates):
        parametrize.register_parametrization(layer, "weight", update)
    total, kept = 0.0, False
    try:
        with torch.enable_grad(), tqdm(total=epochs * len(windows), desc="tune end to end", disable=not progress) as bar:
            for epoch in range(epochs):
                total = 0.0
                for i in torch.randperm(len(windows), generator=generator).tolist():
                    out = model.base_model(windows[i : i + 1].to(device), use_cache=False).last_hidden_state.float()
                    loss = F.mse_loss(out, targets[i : i + 1].to(device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grads = [p.grad for update in updates for p in update.parameters()]
                    if not (math.isfinite(loss.item()) and torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
                        raise NonFiniteError(f"non-finite loss or gradient at epoch {epoch + 1}")
                    optimizer.step()
                    total += loss.item()
                    bar.update()
        kept = True
    except NonFiniteError as err:
        log.warning("tune end to end: %s; every weight is put back as it was", err)
    finally:
        with torch.no_grad():
            for layer in layers:
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=kept)
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    return total / len(windows) if kept else None
