"""One-off: where in a 512-token window does the least-squares refit lose to SparseGPT's solution on
Gemma-3 at 0.3? Calibration windows are 256 tokens: mean next-token loss on positions 1-255 and
256-511 of the same held-out windows, SparseGPT's solution (0 steps) against the least-squares
refit (k steps) on the same OBS masks."""
import math, sys, time
import torch
import torch.nn.functional as F
import epts.refit as R
from benchmarks.experiments import heldout_text
from epts.artifact import ElasticModel
from epts.runtime import RuntimeModel
from epts.config import RefitConfig
from epts.data import tokenize

art, calib, sparsity, nheld = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(2)
elastic = ElasticModel.load(art)
cc = elastic.config.calib
windows = R.artifact_calibration(elastic, calib)
tokens = tokenize(elastic.base.tokenizer, calib, role="calib")
held = heldout_text(tokens, cc.nsamples, cc.seqlen, cc.seed, 512, nheld)

def obs_block(elastic, index, sparsity, base_runner, stream, iters, ridge=0.0, anchors=None, obs=False):
    layers = R.prunable_linears(elastic.base.model, base_runner.block)
    pruners = {name: R.SparseGPTPruner(layer) for name, layer in layers.items()}
    base_runner.run_with_input_stats(stream, {p.layer: p for p in pruners.values()})
    weights = {}
    for name, p in pruners.items():
        start, pruned = p.prune(R.Pattern(sparsity=sparsity))
        hessian, inverse, _ = p.inverse_hessian()
        weights[name] = R.masked_least_squares(p.layer.weight, hessian, inverse, pruned, iters, 0.0, None, start).to(p.layer.weight.dtype)
    return weights
R._refit_block = obs_block

@torch.no_grad()
def halves(model):
    sums = torch.zeros(2, dtype=torch.float64)
    for w in held:
        logits = model(w[None]).logits[0, :-1].float()
        nll = F.cross_entropy(logits, w[1:], reduction="none").double()
        sums += torch.stack([nll[:255].mean(), nll[255:].mean()])
    return (sums / len(held)).tolist()

for iters in [int(s) for s in sys.argv[5:]]:
    runtime = RuntimeModel(elastic)
    runtime.set_sparsity(sparsity)
    config = RefitConfig("bare", 1, 0.0, 8); config.iters = iters
    t = time.time()
    R.refit(elastic, runtime.loaded, runtime.sparsity, windows, config, progress=False)
    a, b = halves(runtime.loaded.model)
    print(f"steps {iters}: ppl positions 1-255 {math.exp(a):.2f}, 256-511 {math.exp(b):.2f}, all {math.exp((a*255+b*256)/511):.2f} ({time.time()-t:.0f}s)", flush=True)
