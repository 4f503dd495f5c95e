"""One-off: the issue's lead "a short block-wise reconstruction at export starting from the refit".
Materialise the artifact at one sparsity, make a start (the least-squares refit of every block,
"all", or the merged adapters, "bare"), then, block by block in order, train the block's kept weights
(the mask fixed: gradients of pruned weights zeroed) to match the dense block's output on the dense
stream (METHOD.md's target), fed the stream of the blocks already reconstructed; Adam, one
calibration window per step. Scores every model on calibration-side windows no report uses (the
first 32 choice windows of the refit, and 32 windows spread over the rest of the file, none
overlapping a calibration window or the harness's tail) and on docstring windows taken from the
middle of the other-domain text (the harness scores its first windows). Prints mean nats per token.

    python blockrecon.py ART CALIB OTHER SPARSITY START LR[,LR...] EPOCHS"""
import math
import sys
import time

import torch

import epts.refit as R
from epts.arch import decoder_blocks, prunable_linears
from epts.artifact import ElasticModel
from epts.blocks import call_block, capture_block_calls
from epts.config import RefitConfig
from epts.data import _calibration_starts, tokenize
from epts.evaluate import blockwise_window_nll
from epts.runtime import RuntimeModel

torch.set_num_threads(2)
art, calib, other, sparsity, start = sys.argv[1:6]
sparsity = float(sparsity)
lrs = [float(x) for x in sys.argv[6].split(",")]
epochs = int(sys.argv[7])
elastic = ElasticModel.load(art)
cc = elastic.config.calib
text = R.refit_calibration(elastic, calib, progress=False)
windows = text.windows
tokens = tokenize(elastic.base.tokenizer, calib, role="calib")
n = tokens.numel()
used = torch.zeros(n, dtype=torch.bool)
for s in _calibration_starts(n, cc.nsamples, cc.seqlen, cc.seed):
    used[s : s + cc.seqlen] = True
used[n - 24 * 512 - 4096 :] = True  # the harness's tail windows, with margin
used[: 32 * cc.seqlen + 4096] = True  # the choice windows, scored apart
free = [s for s in range(0, n - cc.seqlen + 1, cc.seqlen) if not used[s : s + cc.seqlen].any()]
spread = torch.stack([tokens[free[round(i * (len(free) - 1) / 31)] :][: cc.seqlen] for i in range(32)])
otokens = tokenize(elastic.base.tokenizer, other, role="eval")
mid = otokens.numel() // 2
odoc = otokens[mid : mid + 32 * cc.seqlen].reshape(32, cc.seqlen)
sets = {"choice32": text.heldout, "spread32": spread, "doc32": odoc}


@torch.no_grad()
def scores(model) -> dict[str, float]:
    return {k: round(float(blockwise_window_nll(model, w, 8).mean() / (w.shape[1] - 1)), 4) for k, w in sets.items()}


def started():
    runtime = RuntimeModel(elastic)
    runtime.set_sparsity(sparsity)
    plan = runtime.sparsity
    with torch.no_grad():
        R._refit_pass(elastic, runtime.loaded, plan, windows, RefitConfig("auto"), start, 8, False, None)
    return runtime.loaded.model


def reconstruct(model, lr: float) -> float:
    t = time.time()
    base = elastic.base.model
    with torch.no_grad():
        calls = capture_block_calls(model, windows, 8)
    pruned, dense = calls.hidden, calls.hidden.clone()
    for b, (block, base_block) in enumerate(zip(decoder_blocks(model), decoder_blocks(base))):
        runner, base_runner = calls.runner(b, block), calls.runner(b, base_block)
        with torch.no_grad():
            target = base_runner.run(dense)
        layers = prunable_linears(model, block)
        weights = [layer.weight for layer in layers.values()]
        masks = [w != 0 for w in weights]
        hooks = []
        for w, m in zip(weights, masks):
            w.requires_grad_(True)
            hooks.append(w.register_hook(lambda g, m=m: g * m))
        scale = math.sqrt(sum(float(w.detach().pow(2).sum()) for w in weights) / sum(w.numel() for w in weights))
        opt = torch.optim.Adam(weights, lr=lr * scale / 0.19)  # lr given for SmolLM2's weight RMS
        g = torch.Generator().manual_seed(b)
        with torch.enable_grad():
            for _ in range(epochs):
                for i in torch.randperm(len(pruned), generator=g).tolist():
                    out = call_block(runner, pruned[i : i + 1])
                    loss = torch.nn.functional.mse_loss(out, target[i : i + 1])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        for w, m, h in zip(weights, masks, hooks):
            h.remove()
            w.requires_grad_(False)
            assert not bool(w[~m].any())
        with torch.no_grad():
            pruned, dense = runner.run(pruned), target
    return time.time() - t


model = started()
print(f"{start} at {sparsity}: {scores(model)}", flush=True)
for lr in lrs:
    model = started()
    seconds = reconstruct(model, lr)
    print(f"{start} + reconstruction lr {lr:g} x {epochs} epochs ({seconds:.0f} s): {scores(model)}", flush=True)
