"""One-off: variants of the block-wise reconstruction at export (`reconstruct.reconstruct_pruned`)
from one start, made as in `blockrecon.py` (START: "all", "bare" or "sparsegpt", SparseGPT's own
solution), scored in mean nats per token on sets no report uses: the 32 choice windows, 32 windows
spread over the calibration file and 32 docstring windows from the middle of the other-domain text
(256 tokens, as `blockrecon.py`), and the same spread starts and docstring text as 16 windows of
512 tokens (the harness's evaluation length).

    python recon_proxy.py ART CALIB OTHER SPARSITY START VARIANT[;VARIANT...]

VARIANT is LOSS:STEP:EPOCHS:FROZEN:LENGTH:RANK:WINDOWS:NORMSTEP:E2ESTEP:E2EEPOCHS
(defaults mse:1.5e-2:2::256:0::0:0:1): the token loss
("mse" or "relative"), the step as a fraction of the block's weight RMS, the epochs, layer names
kept out of the training (joined by |, e.g. q_proj|k_proj), the length of the training windows
(other than the calibration's: the same starts, as many windows as keep the token count), and the
rank of the masked update (0: every kept weight), and the number of training windows (default: the
calibration windows; more: the calibration windows, then the next free windows of the calibration file
after the 32 choice windows, on their grid from its start, which is where `data.heldout_windows` takes
them), and Adam's absolute step for the block's one-dimensional parameters, its norms' weights and any biases
(0: they stay), and then an end-to-end stage (E2ESTEP > 0): a new masked rank-RANK update of every prunable
layer, all trained together for E2EEPOCHS over the training windows, Adam at E2ESTEP x the layers' weight RMS,
toward the dense model's last hidden state (after the final norm: what the output embedding reads). The spread sets leave out the first 128 windows' length of the file, so no set overlaps them."""
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import epts.reconstruct as RC
import epts.refit as R
from epts.arch import decoder_blocks, prunable_linears as _pl
from epts.artifact import ElasticModel
from epts.config import RefitConfig
from epts.data import _calibration_starts, heldout_windows, tokenize
from epts.evaluate import blockwise_window_nll
from epts.runtime import RuntimeModel

torch.set_num_threads(2)
art, calib, other, sparsity, start = sys.argv[1:6]
sparsity = float(sparsity)
variants = [[x or d for x, d in zip((v.split(":") + [""] * 10)[:10], ["mse", "1.5e-2", "2", "", "256", "0", "0", "0", "0", "1"])]
            for v in sys.argv[6].split(";")]
elastic = ElasticModel.load(art)
cc = elastic.config.calib
text = R.refit_calibration(elastic, calib, progress=False)
windows = text.windows
tokens = tokenize(elastic.base.tokenizer, calib, role="calib")
n = tokens.numel()
used = torch.zeros(n, dtype=torch.bool)
starts = _calibration_starts(n, cc.nsamples, cc.seqlen, cc.seed)
for s in starts:
    used[s : s + 512] = True
used[n - 24 * 512 - 4096 :] = True
used[: 128 * cc.seqlen + 4096] = True
free = [s for s in range(0, n - cc.seqlen + 1, cc.seqlen) if not used[s : s + cc.seqlen].any()]
spread = torch.stack([tokens[free[round(i * (len(free) - 1) / 31)] :][: cc.seqlen] for i in range(32)])
otokens = tokenize(elastic.base.tokenizer, other, role="eval")
mid = otokens.numel() // 2
odoc = otokens[mid : mid + 32 * cc.seqlen].reshape(32, cc.seqlen)
spread512 = torch.stack([tokens[free[round(i * (len(free) - 1) / 15)] :][: 512] for i in range(16)])
odoc512 = otokens[mid : mid + 16 * 512].reshape(16, 512)
sets = {"choice32": text.heldout, "spread32": spread, "doc32": odoc, "spread512": spread512, "doc512": odoc512}


@torch.no_grad()
def scores(model):
    return {k: round(float(blockwise_window_nll(model, w, 8).mean() / (w.shape[1] - 1)), 4) for k, w in sets.items()}


class MaskedLowRank(nn.Module):
    """W -> W + M * (B A), M the weight's nonzero pattern at the start (B zero: the identity at first)."""

    def __init__(self, weight, rank, generator):
        super().__init__()
        self.register_buffer("mask", weight.detach().ne(0))
        self.a = nn.Parameter(torch.randn(rank, weight.shape[1], generator=generator) / weight.shape[1] ** 0.5)
        self.b = nn.Parameter(torch.zeros(weight.shape[0], rank))

    def forward(self, weight):
        return weight + self.mask * (self.b @ self.a)


def end_to_end(model, base, windows, step, epochs, rank):
    layers = [layer for block in decoder_blocks(model) for layer in _pl(model, block).values()]
    scale = (sum(float(l.weight.pow(2).sum()) for l in layers) / sum(l.weight.numel() for l in layers)) ** 0.5
    generator = torch.Generator().manual_seed(0)
    model.requires_grad_(False)
    updates = [MaskedLowRank(layer.weight, rank, generator) for layer in layers]
    for layer, update in zip(layers, updates):
        parametrize.register_parametrization(layer, "weight", update)
    optimizer = torch.optim.Adam([p for u in updates for p in u.parameters()], lr=step * scale)
    with torch.no_grad():
        targets = [base.model(windows[i : i + 1]).last_hidden_state for i in range(len(windows))]
    t, last = time.time(), 0.0
    for _ in range(epochs):
        last = 0.0
        for i in torch.randperm(len(windows), generator=generator).tolist():
            loss = F.mse_loss(model.model(windows[i : i + 1]).last_hidden_state, targets[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            last += loss.item() / len(windows)
    with torch.no_grad():
        for layer in layers:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return last, time.time() - t


runtime = RuntimeModel(elastic)
runtime.set_sparsity(sparsity)
plan = runtime.sparsity
t = time.time()
with torch.no_grad():
    R._refit_pass(elastic, runtime.loaded, plan, windows, RefitConfig("auto"), "all" if start == "sparsegpt" else start,
                  8, False, None, sparsegpt=start == "sparsegpt")
model = runtime.loaded.model
saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
print(f"{start} at {sparsity} ({time.time()-t:.0f} s): {scores(model)}", flush=True)
for loss, step, epochs, freeze, length, rank, count, norm_step, e2e_step, e2e_epochs in variants:
    model.load_state_dict(saved)
    frozen = [f for f in freeze.split("|") if f]
    RC.prunable_linears = lambda m, b: {k: v for k, v in _pl(m, b).items() if not any(f in k for f in frozen)}
    length = int(length)
    w = windows if length == cc.seqlen else torch.stack([tokens[min(s, n - length):][:length] for s in starts[: len(windows) * cc.seqlen // length]])
    if int(count) > len(windows):
        chosen = len(text.heldout)  # past the choice windows, the next windows data.heldout_windows gives
        more = heldout_windows(tokens, cc.nsamples, cc.seqlen, cc.seed, chosen + int(count) - len(windows))[chosen:]
        w = torch.cat([w, more])
    done = RC.reconstruct_pruned(model, elastic.base.model, w, int(epochs), float(step), 8, False, token_loss=loss, rank=int(rank),
                                 norm_step=float(norm_step))
    print(f"{start} + recon {loss} step {step} x {epochs} frozen {frozen} windows {tuple(w.shape)} rank {rank} norms {norm_step} "
          f"({done.seconds:.0f} s): {scores(model)}", flush=True)
    if float(e2e_step):
        value, seconds = end_to_end(model, elastic.base.model, w, float(e2e_step), int(e2e_epochs), int(rank))
        print(f"  + end to end, step {e2e_step} x {e2e_epochs}, rank {rank} (last-epoch loss {value:.4g}, {seconds:.0f} s): "
              f"{scores(model)}", flush=True)
