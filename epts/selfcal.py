"""Self-generated calibration: windows the model writes itself, for compressing with no dataset at hand.

The data-free trick of LLM-QAT (Liu et al. 2023) and of data-free quantisation generally: the
model's own samples stand in for its training distribution. Each window starts from a first token
drawn uniformly over the tokenizer's ordinary (non-special) tokens, as LLM-QAT does, and continues
with tokens sampled from the model at `temperature` with top-k and top-p cuts, one window per row
of a batched, KV-cached generation.

Reproducible, so that the refit at export (`epts.refit.artifact_calibration`) can regenerate the
windows an artifact was trained on from the manifest alone: every window draws from its own random
stream, seeded from (use, seed, window index), so a window does not depend on the batch it was made in;
a token is picked by inverse CDF from a float64 uniform of torch's CPU generator (Mersenne Twister,
the same on every platform and torch version) over float64 probabilities, with ties sorted stably,
rather than by `torch.multinomial`, whose algorithm is not promised to stay the same. The logits
themselves can still differ in their last bits on another device, dtype or torch version, and a
differing bit can flip a draw: the manifest records the windows' sha256 and where they were made,
and the refit says so when what it regenerates differs.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from .artifact import windows_sha256
from .io import atomic_path

SOURCE = "self-generated"  # the manifest's calibration source for these windows


@dataclass
class SelfCalConfig:
    """How the model samples its calibration windows: temperature, top-k (0: no cut) and top-p
    (nucleus; 1: no cut) of the next-token draw, and the windows generated at once (it changes
    only speed and memory, not which tokens are drawn; on some devices the last bits of the logits)."""

    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    batch_size: int = 16

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"self-generated calibration: temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"self-generated calibration: top_k must be >= 0 (0: no cut), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"self-generated calibration: top_p must be in (0, 1] (1: no cut), got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"self-generated calibration: batch_size must be >= 1, got {self.batch_size}")

    def sampling(self) -> dict:
        """The settings that decide the tokens drawn, as the manifest records them."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


def _window_generator(use: str, seed: int, index: int) -> torch.Generator:
    """Window `index`'s own random stream: distinct (use, seed, index) never share a seed, so
    evaluation text is held out from calibration windows whatever seeds the two are given."""
    digest = hashlib.sha256(f"epts-selfcal:{use}:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _ordinary_tokens(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    """Ids a window may start with: the tokenizer's vocabulary (at most the model's embedding rows,
    which are often padded past it) without its special tokens."""
    size = model.get_input_embeddings().num_embeddings
    try:
        size = min(size, len(tokenizer))
    except TypeError:  # a tokenizer without a length: every embedding row is a token
        pass
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    ids = torch.tensor([i for i in range(size) if i not in special], dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("self-generated calibration: the tokenizer has no ordinary tokens to start a window with")
    return ids


def _draw(logits: torch.Tensor, uniforms: torch.Tensor, config: SelfCalConfig) -> torch.Tensor:
    """One token per row of `logits` (rows, vocab) by inverse CDF of `uniforms` (rows,), float64,
    over the temperature-scaled distribution cut to its top-k tokens and its top-p mass, tokens in
    order of probability, ties by id."""
    probs = torch.softmax(logits.double().cpu() / config.temperature, dim=-1)
    picked = []
    for p, u in zip(probs, uniforms.tolist()):
        if 0 < config.top_k < p.numel():
            # Only the tokens that can be among the top k are sorted (every one at least as likely as
            # the k-th, ties included), not the whole vocabulary: the draw costs a tenth as much.
            ids = (p >= p.topk(config.top_k).values[-1]).nonzero().squeeze(1)
        else:
            ids = torch.arange(p.numel())
        q, order = p[ids].sort(descending=True, stable=True)
        q, ids = q[: config.top_k or None], ids[order][: config.top_k or None]
        if config.top_p < 1:  # the most likely token is always kept
            keep = q.cumsum(0) - q < config.top_p
            q, ids = q[keep], ids[keep]
        cdf = q.cumsum(0)
        j = torch.searchsorted(cdf, cdf[-1:] * u, right=True).clamp_max(len(q) - 1)
        picked.append(ids[j])
    return torch.cat(picked)


def generate_windows(model: torch.nn.Module, tokenizer, nsamples: int, seqlen: int, seed: int = 0,
                     config: SelfCalConfig | None = None, progress: bool = True,
                     use: str = "calibration") -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens sampled from `model` (see the module docstring):
    (nsamples, seqlen) int64 on the CPU; `use` names the random streams ("calibration",
    "evaluation"). The model runs in eval mode on its own device, without gradients; a streamed
    model (`epts.offload`) reads its blocks once per generated token."""
    config = config or SelfCalConfig()
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}")
    starts = _ordinary_tokens(model, tokenizer)
    firsts, uniforms = [], []
    for i in range(nsamples):
        gen = _window_generator(use, seed, i)
        firsts.append(starts[torch.randint(len(starts), (1,), generator=gen)])
        uniforms.append(torch.rand(seqlen - 1, generator=gen, dtype=torch.float64))
    windows = torch.empty(nsamples, seqlen, dtype=torch.long)
    windows[:, 0] = torch.cat(firsts)
    uniforms = torch.stack(uniforms)
    device = model.get_input_embeddings().weight.device
    # The cache argument is `cache` in recent transformers 5 releases, `past_key_values` before.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    bar = tqdm(total=nsamples * seqlen, desc=f"{use}: self-generated", unit="token", disable=not progress)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for lo in range(0, nsamples, config.batch_size):
                hi = min(lo + config.batch_size, nsamples)
                cache, step = DynamicCache(config=model.config), windows[lo:hi, :1]
                bar.update(hi - lo)
                for t in range(1, seqlen):
                    logits = model(input_ids=step.to(device), **{cache_arg: cache}, use_cache=True).logits
                    windows[lo:hi, t] = _draw(logits[:, -1], uniforms[lo:hi, t - 1], config)
                    step = windows[lo:hi, t : t + 1]
                    bar.update(hi - lo)
                del cache  # one batch's cache is freed before the next is built
    finally:
        model.train(was_training)
        bar.close()
    return windows


def calibration_record(model: torch.nn.Module, config: SelfCalConfig, seed: int, windows: torch.Tensor) -> dict:
    """What the manifest says about self-generated windows: the source, the sampling settings and
    seed that regenerate them, where they were made (device, dtype, torch version: what can change
    the logits' last bits), and their sha256 (as `epts.artifact.calibration_record`)."""
    weight = model.get_input_embeddings().weight
    return {"source": SOURCE, "sha256": None, "sampling": config.sampling(), "seed": seed,
            "batch_size": config.batch_size, "first_token": "uniform over the tokenizer's ordinary tokens",
            "device": weight.device.type, "dtype": str(weight.dtype).removeprefix("torch."),
            "torch": torch.__version__, "windows_sha256": windows_sha256(windows)}


def self_calibration(model: torch.nn.Module, tokenizer, nsamples: int, seqlen: int, seed: int = 0,
                     config: SelfCalConfig | None = None, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Self-generated calibration windows and their manifest record."""
    config = config or SelfCalConfig()
    windows = generate_windows(model, tokenizer, nsamples, seqlen, seed, config, progress)
    return windows, calibration_record(model, config, seed, windows)


def regenerate(model: torch.nn.Module, tokenizer, record: dict, nsamples: int, seqlen: int,
               progress: bool = True) -> tuple[torch.Tensor, bool]:
    """The windows of a manifest's self-generated `record`, made again with its recorded settings,
    and whether their sha256 is the recorded one."""
    config = SelfCalConfig(**record["sampling"], batch_size=record.get("batch_size", SelfCalConfig.batch_size))
    windows = generate_windows(model, tokenizer, nsamples, seqlen, record["seed"], config, progress)
    return windows, windows_sha256(windows) == record.get("windows_sha256")


def write_text(model: torch.nn.Module, tokenizer, path, nsamples: int, seqlen: int, seed: int,
               config: SelfCalConfig | None = None, progress: bool = True) -> None:
    """Self-generated windows decoded to text, one paragraph each, written to `path` atomically:
    held-out text to evaluate on when there is no dataset (scripts/demo.sh): its random streams are
    not those of any calibration windows."""
    windows = generate_windows(model, tokenizer, nsamples, seqlen, seed, config, progress, use="evaluation")
    text = "\n\n".join(tokenizer.decode(w, skip_special_tokens=True).strip() for w in windows.tolist())
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")

