"""One-off: is the export's choice, made on the first 32 free 256-token windows of the calibration
file (its first 8192 tokens: 4 WikiText-2 articles), the choice the whole file would make?
Per-window losses of the three "auto" candidates (the adapters kept with the bare-mask blocks refit,
every block refit, SparseGPT's solution for every block, each made as `epts export` makes it) on
those first 32 windows and on SPREAD (default 160) more taken evenly over the whole file; none
overlaps a calibration window or the experiment harness's 24 held-out 512-token windows at the
file's end. Writes {"starts", "first32", "losses": {sparsity: {candidate: [nats per token, one per
window]}}} to OUT.json (atomically, after each sparsity); `spread_read.py` reads it.

    python spread.py ART ../shared/data/wikitext2/wiki.valid.tokens OUT.json 0.7 0.6 ..."""
import json, os, sys, time
import torch
import epts.refit as R
from epts.artifact import ElasticModel
from epts.runtime import RuntimeModel
from epts.config import RefitConfig
from epts.data import _calibration_starts, tokenize
from epts.evaluate import blockwise_window_nll

torch.set_grad_enabled(False)
torch.set_num_threads(2)
art, calib, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
sparsities = [float(x) for x in sys.argv[4:]]
spread = int(os.environ.get("SPREAD", 160))
elastic = ElasticModel.load(art)
cc = elastic.config.calib
windows = R.artifact_calibration(elastic, calib, progress=False)
tokens = tokenize(elastic.base.tokenizer, calib, role="calib")
n = tokens.numel()
used = torch.zeros(n, dtype=torch.bool)
for s in _calibration_starts(n, cc.nsamples, cc.seqlen, cc.seed):
    used[s : s + cc.seqlen] = True
tail, start = [], n - 512
while len(tail) < 24 and start >= 0:  # the harness's held-out windows (experiments.heldout_text)
    if not used[start : start + 512].any():
        tail.append(start)
    start -= 512
blocked = used.clone()
for s in tail:
    blocked[s : s + 512] = True
free = [s for s in range(0, n - cc.seqlen + 1, cc.seqlen) if not blocked[s : s + cc.seqlen].any()]
picks = sorted(set(free[:32]) | {free[round(i * (len(free) - 1) / (spread - 1))] for i in range(spread)})
print(f"{n} tokens, {len(free)} free windows, scoring {len(picks)}", flush=True)
eval_windows = torch.stack([tokens[s : s + cc.seqlen] for s in picks])
result = {"starts": picks, "first32": free[:32], "free": len(free), "losses": {}}


def score(model):
    return (blockwise_window_nll(model, eval_windows, 8) / (cc.seqlen - 1)).tolist()


for s in sparsities:
    per, t = {}, time.time()
    runtime = RuntimeModel(elastic)
    runtime.set_sparsity(s)
    plan = runtime.sparsity
    adapted = [b for b, x in plan.items() if x > 0 and R._has_adapters(elastic, b, x)]
    if len(adapted) < len(plan):
        R._refit_pass(elastic, runtime.loaded, plan, windows, RefitConfig("auto"), "bare", 8, False, None)
    per["bare"] = score(runtime.loaded.model)
    if adapted:
        R._refit_pass(elastic, runtime.loaded, plan, windows, RefitConfig("auto"), "adapted", 8, False, None)
        per["all"] = score(runtime.loaded.model)
    del runtime
    runtime = RuntimeModel(elastic)
    runtime.set_sparsity(s)
    R._refit_pass(elastic, runtime.loaded, runtime.sparsity, windows, RefitConfig("auto"), "all", 8, False, None,
                  sparsegpt=True)
    per["sparsegpt"] = score(runtime.loaded.model)
    del runtime
    result["losses"][str(s)] = per
    means = {k: sum(v) / len(v) for k, v in per.items()}
    print(f"{s}: {time.time() - t:.0f} s, means over all {means}", flush=True)
    with open(out_path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(out_path + ".tmp", out_path)
