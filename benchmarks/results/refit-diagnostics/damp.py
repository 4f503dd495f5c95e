"""One-off diagnosis of the Gemma-3 gap at 0.3 (README.md here): held-out perplexity of the refit
with its Hessian dampening varied (SparseGPT keeps 0.01), its steps counted from 0, on OBS or
elastic masks, only some layers re-solved (only=q_proj,k_proj: the others keep SparseGPT's
solution, OBS masks), or in float64 (f64).
Spec DAMP:ITERS:MODE[:obs][:f64][:only=NAMES]; run from the repository root at 3eb971e with
PYTHONPATH=. ."""
import functools, math, sys, time
import torch
import epts.refit as R
from benchmarks.experiments import heldout_text
from epts.artifact import ElasticModel
from epts.runtime import RuntimeModel
from epts.config import RefitConfig
from epts.data import heldout_windows, tokenize
from epts.evaluate import mean_nll
from epts.baselines.sparsegpt import SparseGPTPruner

art, calib, sparsity, nheld = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
specs = sys.argv[5:]  # damp:iters:mode[:mask]
torch.set_num_threads(2)
elastic = ElasticModel.load(art)
cc = elastic.config.calib
windows = R.artifact_calibration(elastic, calib)
tokens = tokenize(elastic.base.tokenizer, calib, role="calib")
held = heldout_text(tokens, cc.nsamples, cc.seqlen, cc.seed, 512, nheld)
runtime = RuntimeModel(elastic)
LSQ32 = R.masked_least_squares
for spec in specs:
    damp, iters, mode, *mask = spec.split(":")
    only = None
    if mask and "=" in mask[-1]:
        only = mask.pop().split("=")[1].split(",")
    mask = [m for m in mask if m != "f64"]
    def patched(elastic, index, sparsity, base_runner, stream, iters, ridge=0.0, anchors=None, obs=False, only=only):
        layers = R.prunable_linears(elastic.base.model, base_runner.block)
        pruners = {name: R.SparseGPTPruner(layer) for name, layer in layers.items()}
        base_runner.run_with_input_stats(stream, {p.layer: p for p in pruners.values()})
        weights = {}
        for name, p in pruners.items():
            start = None
            if obs:
                start, pruned = p.prune(R.Pattern(sparsity=sparsity))
            else:
                pruned = ~R.mask_from_ranks(elastic.ranks(index, name).to(p.layer.weight.device), sparsity)
            n = iters if only is None or any(o in name for o in only) else 0
            hessian, inverse, _ = p.inverse_hessian()
            weights[name] = R.masked_least_squares(p.layer.weight, hessian, inverse, pruned, n, 0.0, None, start).to(p.layer.weight.dtype)
        return weights
    R._refit_block = patched
    if "f64" in spec:
        import inspect, textwrap
        src = inspect.getsource(R.masked_least_squares).replace(".float()", ".double()")
        ns = dict(R.__dict__)
        exec(src, ns)
        lsq64 = ns["masked_least_squares"]
        def lsq(weight, hessian, inverse, pruned, iters, ridge=0.0, anchor=None, start=None):
            h = hessian.double()
            inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
            return lsq64(weight, h, inv, pruned, iters, ridge, anchor, start).float()
        R.masked_least_squares = lsq
    else:
        R.masked_least_squares = LSQ32
    R.SparseGPTPruner = functools.partial(SparseGPTPruner, percdamp=float(damp))
    runtime.set_sparsity(sparsity)
    config = RefitConfig(mode, 1, 0.0, 8); config.iters = int(iters)
    config.mask = mask[0] if mask else "elastic"
    choice = heldout_windows(tokens, cc.nsamples, cc.seqlen, cc.seed, 8) if mode == "auto" else None
    t = time.time()
    report = R.refit(elastic, runtime.loaded, runtime.sparsity, windows, config, progress=False, heldout=choice)
    ppl = math.exp(mean_nll(runtime.loaded.model, held))
    blocks = "".join("R" if c == "refit" else "a" for c in report.choices)
    print(f"{spec} ppl {ppl:.2f} {blocks} {report.chosen} {report.losses} {time.time()-t:.0f}s", flush=True)
