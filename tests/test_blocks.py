import torch

from conftest import random_windows
from epts.arch import decoder_blocks
from epts.blocks import capture_block_calls


def replay_stream(model, ids, batch_size):
    """Run the blocks one at a time from the captured calls."""
    calls = capture_block_calls(model, ids, batch_size=batch_size)
    stream = calls.hidden
    for b, block in enumerate(decoder_blocks(model)):
        stream = calls.runner(b, block).run(stream)
    return stream


@torch.no_grad()
def logits_from_stream(model, ids, stream, batch_size):
    """The model's own head (final norm, projection, lm_head) applied to `stream`, by swapping
    the last block's output for it during an ordinary forward pass."""
    starts = iter(range(0, ids.shape[0], batch_size))

    def swap(module, args, kwargs, output):
        s = next(starts)
        replay = stream[s : s + batch_size]
        return (replay,) + tuple(output[1:]) if isinstance(output, tuple) else replay

    handle = decoder_blocks(model)[-1].register_forward_hook(swap, with_kwargs=True)
    try:
        return torch.cat([model(ids[s : s + batch_size]).logits for s in range(0, ids.shape[0], batch_size)])
    finally:
        handle.remove()


def test_block_replay_reproduces_full_model_logits(tiny):
    ids = random_windows(n=5, seqlen=24)
    with torch.no_grad():
        full = tiny.model(ids).logits
    # Batches of 2 with a ragged last batch: the captured batch-of-one kwargs must broadcast.
    stream = replay_stream(tiny.model, ids, batch_size=2)
    torch.testing.assert_close(logits_from_stream(tiny.model, ids, stream, 2), full, rtol=1e-5, atol=1e-5)
    # The swap is live: a perturbed stream gives other logits.
    noise = torch.randn(stream.shape, generator=torch.Generator().manual_seed(1))
    moved = logits_from_stream(tiny.model, ids, stream + noise, 2)
    assert (moved - full).abs().max() > 1e-2


def test_replay_of_a_perturbed_stream_changes_block_output(tiny):
    ids = random_windows(n=2, seqlen=16)
    calls = capture_block_calls(tiny.model, ids)
    block = decoder_blocks(tiny.model)[0]
    a = calls.runner(0, block).run(calls.hidden)
    b = calls.runner(0, block).run(calls.hidden + 0.1)
    assert (a - b).abs().max() > 1e-3
