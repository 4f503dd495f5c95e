"""Perplexity on non-overlapping windows (PROTOCOL.md): exp of the mean token negative log-likelihood;
sparsity, memory and decode-speed measurements."""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from .arch import decoder_blocks, final_modules, prunable_linears
from .blocks import capture_block_calls
from .data import eval_windows, tokenize
from .models import LoadedModel, check_context
from .offload import resident
from .streams import StreamStore


@torch.no_grad()
def mean_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """Mean next-token negative log-likelihood over every predicted token of `windows`."""
    device = next(model.parameters()).device
    total_nll, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        count += batch[:, 1:].numel()
    return total_nll / count


@torch.no_grad()
def blockwise_window_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8,
                         store: StreamStore | None = None) -> torch.Tensor:
    """The summed next-token negative log-likelihood (nats) of each of `windows` (n, seqlen) token
    ids: (n,) float64, computed block-major: every window through block 1, then all through block 2,
    and so on, `batch_size` windows per forward pass, each block held once (a streamed model reads
    each block's weights once, not once per window); then the final norm, the output embedding and
    any logit soft-capping one window at a time (a batch's logits over a large vocabulary would
    dominate the peak memory). The hidden states (n x seqlen x hidden) live in `store` (default
    RAM). Raises NonFiniteActivationError where a block's output overflows."""
    calls = capture_block_calls(model, windows, batch_size, store)
    hidden = calls.hidden
    calls.hidden = None
    for b, block in enumerate(decoder_blocks(model)):
        with resident(block):
            hidden = calls.runner(b, block).run(hidden)
    device = next(model.parameters()).device
    head, final = model.get_output_embeddings(), final_modules(model)
    cap = getattr(model.config, "final_logit_softcapping", None)
    sums = torch.zeros(len(windows), dtype=torch.float64)
    for i in range(len(windows)):
        h = hidden[i : i + 1].to(device)
        for module in final:
            h = module(h)
        logits = head(h)[:, :-1]
        if cap is not None:  # as Gemma's causal LMs apply it, in the model's dtype
            logits = torch.tanh(logits / cap) * cap
        target = windows[i : i + 1, 1:].to(device)
        sums[i] = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                  reduction="sum").item()
    return sums


def evaluate_ppl(
    loaded: LoadedModel,
    text: str | os.PathLike | torch.Tensor,
    seqlen: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> float:
    """Perplexity of `loaded` on `text` (a file, folder, dataset name or 1-D token tensor)."""
    check_context(loaded.model, seqlen)  # before tokenising a whole corpus, not after
    tokens = tokenize(loaded.tokenizer, text, role="eval")
    return math.exp(mean_nll(loaded.model, eval_windows(tokens, seqlen, max_windows), batch_size, progress))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB. On Linux, VmHWM of /proc/self/status
    (getrusage's ru_maxrss survives exec, so a process started by a large parent would report the
    parent's peak); elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def layer_sparsity(model: torch.nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in every prunable linear, by its full name."""
    out = {}
    for b, block in enumerate(decoder_blocks(model)):
        with resident(block):
            for name, layer in prunable_linears(model, block).items():
                out[f"{b}.{name}"] = (layer.weight == 0).float().mean().item()
    return out


def total_sparsity(model: torch.nn.Module) -> float:
    """Fraction of exact zeros over all prunable weights together."""
    zeros = total = 0
    for block in decoder_blocks(model):
        with resident(block):
            for layer in prunable_linears(model, block).values():
                zeros += (layer.weight == 0).sum().item()
                total += layer.weight.numel()
    return zeros / total


@dataclass
class Generation:
    """Greedy continuation of one prompt, timed: `ids` [new tokens] (int64), the prefill (prompt
    through the first new token) in seconds, and the decode speed in new tokens a second after
    the first (None when fewer than two were generated)."""

    ids: torch.Tensor
    prefill_seconds: float
    decode_tokens_per_s: float | None


class _StepClock(StoppingCriteria):
    """Records when each new token has been appended (generate calls it after every step)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_timed(model: torch.nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int,
                   ignore_eos: bool = False) -> Generation:
    """Greedy generation from `prompt_ids` [1, n] with the model's KV cache, timed per step;
    `ignore_eos` generates exactly `max_new_tokens` (for benchmarks)."""
    clock = _StepClock()
    extra = {"min_new_tokens": max_new_tokens} if ignore_eos else {}
    start = time.perf_counter()
    out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=max_new_tokens,
                         do_sample=False, stopping_criteria=StoppingCriteriaList([clock]), **extra)
    new = out[0, prompt_ids.shape[1]:]
    steps = clock.times
    speed = (len(steps) - 1) / (steps[-1] - steps[0]) if len(steps) > 1 and steps[-1] > steps[0] else None
    return Generation(new, steps[0] - start if steps else time.perf_counter() - start, speed)
