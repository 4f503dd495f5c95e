"""One-off: variants of the block-wise reconstruction at export (`reconstruct.reconstruct_pruned`)
from one start, made as in `blockrecon.py` (START: "all", "bare" or "sparsegpt", SparseGPT's own
solution), scored in mean nats per token on sets no report uses: the 32 choice windows, 32 windows
spread over the calibration file and 32 docstring windows from the middle of the other-domain text
(256 tokens, as `blockrecon.py`), and the same spread starts and docstring text as 16 windows of
512 tokens (the harness's evaluation length).

    python recon_proxy.py ART CALIB OTHER SPARSITY START VARIANT[;VARIANT...]

VARIANT is LOSS:STEP:EPOCHS:FROZEN:LENGTH:RANK:WINDOWS:TUNESTEP:TUNEEPOCHS
(defaults mse:1.5e-2:2::256:0::0:1): the token loss
("mse" or "relative"), the step as a fraction of the block's weight RMS, the epochs, layer names
kept out of the training (joined by |, e.g. q_proj|k_proj), the length of the training windows
(other than the calibration's: the same starts, as many windows as keep the token count), and the
rank of the masked update (0: every kept weight), and the number of training windows (default: the
calibration windows; more: the calibration windows, then the next free windows of the calibration file
after the 32 choice windows, on their grid from its start, which is where `data.heldout_windows` takes
them), and then, with TUNESTEP > 0, the end-to-end tuning (`reconstruct.tune_end_to_end`) at that step for
TUNEEPOCHS over the training windows, at rank RANK, scored after the block-wise result. (At 00e1f25 to 4e2f4c4
an eighth field, NORMSTEP, gave the block's norms an Adam step in the block-wise stage, and the script had its
own copy of the tuning.) Variants that differ only in TUNESTEP and TUNEEPOCHS share one block-wise result (since
this file's commit after 5e9b311), each tuned from it. The spread sets leave out the first 128 windows' length of the file, so no set overlaps them."""
import sys
import time

import torch

import epts.reconstruct as RC
import epts.refit as R
from epts.arch import prunable_linears as _pl
from epts.artifact import ElasticModel
from epts.config import RefitConfig
from epts.data import _calibration_starts, heldout_windows, tokenize
from epts.evaluate import blockwise_window_nll
from epts.runtime import RuntimeModel

torch.set_num_threads(2)
art, calib, other, sparsity, start = sys.argv[1:6]
sparsity = float(sparsity)
variants = [[x or d for x, d in zip((v.split(":") + [""] * 9)[:9], ["mse", "1.5e-2", "2", "", "256", "0", "0", "0", "1"])]
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
reconstructed = {}  # variants that differ only in the tuning share one block-wise result
for loss, step, epochs, freeze, length, rank, count, tune_step, tune_epochs in variants:
    key = (loss, step, epochs, freeze, length, rank, count)
    if key in reconstructed:
        model.load_state_dict(reconstructed[key])
        print(f"{start} + the same reconstruction as above", flush=True)
        tuned = RC.tune_end_to_end(model, elastic.base.model, reconstructed[key, "windows"], int(tune_epochs),
                                   float(tune_step), int(rank), False)
        print(f"  + end to end, step {tune_step} x {tune_epochs}, rank {rank} (last-epoch loss {tuned.loss:.4g}, "
              f"{tuned.seconds:.0f} s): {scores(model)}", flush=True)
        continue
    model.load_state_dict(saved)
    frozen = [f for f in freeze.split("|") if f]
    RC.prunable_linears = lambda m, b: {k: v for k, v in _pl(m, b).items() if not any(f in k for f in frozen)}
    length = int(length)
    w = windows if length == cc.seqlen else torch.stack([tokens[min(s, n - length):][:length] for s in starts[: len(windows) * cc.seqlen // length]])
    if int(count) > len(windows):
        chosen = len(text.heldout)  # past the choice windows, the next windows data.heldout_windows gives
        more = heldout_windows(tokens, cc.nsamples, cc.seqlen, cc.seed, chosen + int(count) - len(windows))[chosen:]
        w = torch.cat([w, more])
    done = RC.reconstruct_pruned(model, elastic.base.model, w, int(epochs), float(step), 8, False, token_loss=loss, rank=int(rank))
    print(f"{start} + recon {loss} step {step} x {epochs} frozen {frozen} windows {tuple(w.shape)} rank {rank} "
          f"({done.seconds:.0f} s): {scores(model)}", flush=True)
    reconstructed[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    reconstructed[key, "windows"] = w
    if float(tune_step):
        tuned = RC.tune_end_to_end(model, elastic.base.model, w, int(tune_epochs), float(tune_step), int(rank), False)
        print(f"  + end to end, step {tune_step} x {tune_epochs}, rank {rank} (last-epoch loss {tuned.loss:.4g}, "
              f"{tuned.seconds:.0f} s): {scores(model)}", flush=True)
