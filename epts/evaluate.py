"""Perplexity on non-overlapping windows (PROTOCOL.md): exp of the mean token negative log-likelihood."""

from __future__ import annotations

import math
import os
import resource
import sys

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .arch import decoder_blocks, prunable_linears
from .data import eval_windows, tokenize
from .models import LoadedModel, check_context
from .offload import resident


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
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
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
