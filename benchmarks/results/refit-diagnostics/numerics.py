"""One-off: is the refit's float32 conjugate-gradient solve on Gemma-3 a descent on its own layer
objective? Objective f(x) = sum_rows (w - x) H (w - x)^T in float64, H the dampened Hessian, at
SparseGPT's OBS solution and after k CG steps from it (float32 as epts runs, and float64)."""
import inspect, sys, torch
import epts.refit as R
from epts.models import load_model
from epts.data import calibration_set
from epts.blocks import capture_block_calls
from epts.arch import decoder_blocks, prunable_linears
from epts.baselines.sparsegpt import SparseGPTPruner
from epts.importance import Pattern

torch.set_num_threads(2)
model_name, blocks_wanted, sparsity = sys.argv[1], [int(b) for b in sys.argv[2].split(",")], float(sys.argv[3])
loaded = load_model(model_name)
windows = calibration_set(loaded.tokenizer, "../shared/data/wikitext2/wiki.valid.tokens", 32, 256, 0)
model = loaded.model
model.requires_grad_(False)
src = inspect.getsource(R.masked_least_squares).replace(".float()", ".double()")
ns = dict(R.__dict__); exec(src, ns); lsq64 = ns["masked_least_squares"]
with torch.no_grad():
    calls = capture_block_calls(model, windows, 8, None)
    stream = calls.hidden
    blocks = decoder_blocks(model)
    for b in range(max(blocks_wanted) + 1):
        runner = calls.runner(b, blocks[b])
        if b in blocks_wanted:
            layers = prunable_linears(model, blocks[b])
            pruners = {n: SparseGPTPruner(l) for n, l in layers.items()}
            runner.run_with_input_stats(stream, {p.layer: p for p in pruners.values()})
            for name, p in pruners.items():
                start, pruned = p.prune(Pattern(sparsity=sparsity))
                h, inv, _ = p.inverse_hessian()
                w = p.layer.weight.double(); H = h.double()
                f = lambda x: float(((w - x.double()) @ H * (w - x.double())).sum())
                f0 = f(start)
                cond = torch.linalg.cond(H).item()
                r32 = {k: f(R.masked_least_squares(p.layer.weight, h, inv, pruned, k, 0.0, None, start)) / f0 for k in (1, 3, 10, 30)}
                H64inv = torch.cholesky_inverse(torch.linalg.cholesky(H))
                r64 = {k: f(lsq64(p.layer.weight, H, H64inv, pruned, k, 0.0, None, start)) / f0 for k in (1, 3, 10, 30, 100)}
                print(f"block {b} {name:28s} cond {cond:.2e} f(sgpt) {f0:.4e} f32 " + " ".join(f"{k}:{v:.4f}" for k, v in r32.items())
                      + " | f64 " + " ".join(f"{k}:{v:.4f}" for k, v in r64.items()), flush=True)
        stream = runner.run(stream)
