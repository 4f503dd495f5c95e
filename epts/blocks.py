"""Capture the real calls a model makes to its decoder blocks, and replay any block on a stream
(`BlockRunner`, the one home of a replayed block: every pipeline step runs its block through it).

Instead of re-deriving attention masks, position ids and rotary embeddings per architecture and
per transformers version, we run the model once and record every keyword argument each block
receives. Families whose blocks differ (Gemma 3's sliding and global layers) are then served by the
same code. The recorded keyword arguments come from a batch of one; masks and rotary tables
broadcast over a larger batch of windows of the same length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .arch import decoder_blocks
from .streams import StreamStore


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once what we need is recorded."""


class NonFiniteActivationError(ArithmeticError):
    """The model's own (dense or pruned) forward pass produced inf or NaN: an overflow of its dtype."""


class BlockKwargs(dict):
    """The keyword arguments of one block's call, knowing which block they belong to, so that
    every replay of the block can name it in an error."""

    def __init__(self, kwargs: dict[str, Any], index: int, count: int):
        super().__init__(kwargs)
        self.index, self.count = index, count


def check_finite(hidden: torch.Tensor, where: str) -> None:
    """Raise NonFiniteActivationError, naming `where` and a dtype that does not overflow, if
    `hidden` holds inf or NaN."""
    if torch.isfinite(hidden).all():
        return
    dtype = str(hidden.dtype).removeprefix("torch.")
    advice = {"float16": "load the model with --dtype bfloat16 or --dtype float32",
              "bfloat16": "load the model with --dtype float32"}.get(
        dtype, "the model's weights hold inf or NaN: check the checkpoint")
    raise NonFiniteActivationError(f"{where} produced non-finite activations (inf or NaN) in {dtype}: {advice}")


@dataclass
class BlockCalls:
    """What the model feeds its blocks: the first block's hidden states and each block's kwargs."""

    hidden: torch.Tensor | None  # (n, seqlen, hidden) on the CPU: the stream entering block 0 (None once taken)
    kwargs: list[BlockKwargs]  # per block, the keyword arguments of its call (batch of one)
    hidden_as_kwarg: bool  # whether the model passes hidden states by keyword
    batch_size: int = 8  # windows per forward pass
    store: StreamStore = field(default_factory=StreamStore)  # where the streams live (RAM, or mapped files)

    def runner(self, index: int, block: nn.Module, device: torch.device | None = None) -> "BlockRunner":
        """The replay of block `index` (0-based), which is `block`, on `device` (default: its weights')."""
        return BlockRunner(block, self.kwargs[index], self.hidden_as_kwarg, self.batch_size, device, self.store)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict, bool]:
    if args:
        return args[0], dict(kwargs), False
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), kwargs, True


@torch.no_grad()
def capture_block_calls(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8,
                        store: StreamStore | None = None) -> BlockCalls:
    """Record the input of block 0 for every window (in `store`, default RAM) and the call arguments
    of every block. Raises NonFiniteActivationError if the input of block 0 holds inf or NaN."""
    store = store or StreamStore()
    blocks = decoder_blocks(model)
    device = _model_device(model)
    per_block: list[dict[str, Any] | None] = [None] * len(blocks)
    hidden_as_kwarg = False

    def record_kwargs(index):
        def hook(module, args, kwargs):
            nonlocal hidden_as_kwarg
            _, rest, hidden_as_kwarg = _split_hidden(args, kwargs)
            per_block[index] = BlockKwargs({k: _detach(v) for k, v in rest.items()}, index, len(blocks))

        return hook

    handles = [b.register_forward_pre_hook(record_kwargs(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        model(input_ids[:1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if any(k is None for k in per_block):
        raise RuntimeError(f"{type(model).__name__} did not call every decoder block in its forward pass")

    hidden: torch.Tensor | None = None

    def record_hidden(module, args, kwargs):
        nonlocal hidden
        chunk = _split_hidden(args, kwargs)[0].detach()
        if hidden is None:  # each batch written in place: never the stream twice in memory
            hidden = store.empty((input_ids.shape[0], *chunk.shape[1:]), chunk.dtype)
        hidden[start : start + chunk.shape[0]] = chunk.to("cpu")
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(record_hidden, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    check_finite(hidden, "the embedding layer (the input of block 1)")
    return BlockCalls(hidden, per_block, hidden_as_kwarg, batch_size, store)


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


@dataclass
class BlockRunner:
    """One decoder block replayed on streams of hidden states: the block, the keyword arguments of
    its captured call, whether the model passes hidden states by keyword, the windows per forward
    pass, the device it computes on, and the store its output streams come from. Streams stay on
    the CPU; each batch moves to `device` and its result back."""

    block: nn.Module
    kwargs: dict[str, Any]  # a captured BlockKwargs names its block in errors
    hidden_as_kwarg: bool = False
    batch_size: int = 8
    device: torch.device | None = None  # None: the device of the block's weights
    store: StreamStore = field(default_factory=StreamStore)

    def __post_init__(self):
        if self.device is None:
            self.device = _model_device(self.block)

    @property
    def name(self) -> str:
        """"block i of n" for a captured call, else "a decoder block"."""
        kw = self.kwargs
        return f"block {kw.index + 1} of {kw.count}" if isinstance(kw, BlockKwargs) else "a decoder block"

    @torch.no_grad()
    def run(self, stream: torch.Tensor) -> torch.Tensor:
        """The block over a whole stream (n, seqlen, hidden), batch by batch; the result (same shape
        and dtype) stays on the stream's device. Raises NonFiniteActivationError at the first batch
        whose output holds inf or NaN (an overflow of the model's dtype), naming the block."""
        out = self.store.empty_like(stream)
        for start in range(0, stream.shape[0], self.batch_size):
            result = call_block(self, stream[start : start + self.batch_size].to(self.device))
            check_finite(result, self.name)
            out[start : start + self.batch_size] = result.to(out.device)
        return out

    def run_with_input_stats(self, stream: torch.Tensor, stats: dict[nn.Module, Any]) -> torch.Tensor:
        """`run(stream)`, feeding every input batch of each module in `stats` to its statistic's
        `add_batch` (Wanda's input norms, SparseGPT's Hessian). A module called on the very tensor
        the module before it was called on (a block's q, k and v projections; gate and up), whose
        statistic is of the same type and has `share`, is not fed: after the run it takes that
        module's statistic (`share(leader)`), the same numbers without computing them again.
        Raises RuntimeError if which modules share changes from one batch to the next."""
        return self._with_stats(stream, stats, outputs=True)

    def collect_input_stats(self, stream: torch.Tensor, stats: dict[nn.Module, Any]) -> None:
        """The statistics of `run_with_input_stats`, the same numbers, where the block's output is
        not needed (SparseGPT's and the refit's Hessians): after the first batch, each batch's forward
        stops once its modules' inputs are fed, so the last prunable layer (a down projection, a
        quarter of a LLaMA-style block's multiplications) and what follows it are not computed. The
        first batch runs whole and counts the modules' calls, so a block that calls a module twice,
        or a module after its last prunable layer, is still fed every call."""
        self._with_stats(stream, stats, outputs=False)

    def _with_stats(self, stream: torch.Tensor, stats: dict[nn.Module, Any], outputs: bool) -> torch.Tensor | None:
        leaders: dict[Any, Any] = {}  # statistic -> the one it shares, or None where it is fed
        last: list = [None, None]  # the input and the statistic last fed
        calls = [0, None]  # hook calls in this batch, and in a whole batch (known after the first)

        def feed(inputs: tuple, s) -> None:
            x = inputs[0]
            leader = last[1] if x is last[0] and type(s) is type(last[1]) and hasattr(s, "share") else None
            if leaders.setdefault(s, leader) is not leader:
                raise RuntimeError(f"{self.name}: its layers' shared inputs changed between batches")
            if leader is None:
                if not outputs:  # run() checks the block's output; here no output is computed
                    check_finite(x, self.name)
                s.add_batch(x)
                last[:] = [x, s]
            calls[0] += 1
            if calls[0] == calls[1]:
                raise _StopForward

        # Pre-hooks: the input is fed before the module computes, so the last one can stop the batch there.
        handles = [module.register_forward_pre_hook(lambda mod, inp, s=s: feed(inp, s)) for module, s in stats.items()]
        try:
            if outputs:
                out = self.run(stream)
            else:
                out = None
                with torch.no_grad():
                    for start in range(0, stream.shape[0], self.batch_size):
                        calls[0] = 0
                        try:
                            call_block(self, stream[start : start + self.batch_size].to(self.device))
                        except _StopForward:
                            pass
                        calls[1] = calls[0]
        finally:
            last.clear()
            for h in handles:
                h.remove()
        for s, leader in leaders.items():
            if leader is not None:
                s.share(leader)
        return out


def call_block(runner: BlockRunner, hidden: torch.Tensor) -> torch.Tensor:
    """The runner's block on one batch (b, seqlen, hidden) already on its device, with the captured
    kwargs moved there; gradients flow (the optimisation trains through this call)."""
    kwargs = {k: _to_device(v, hidden.device) for k, v in runner.kwargs.items()}
    block = runner.block
    out = block(hidden_states=hidden, **kwargs) if runner.hidden_as_kwarg else block(hidden, **kwargs)
    # Some families (OPT) still return a tuple whose first item is the hidden states.
    return out[0] if isinstance(out, (tuple, list)) else out
