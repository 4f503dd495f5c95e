"""How much of the least-squares refit's layer-error reduction can a small stored correction of the bare
Wanda mask capture? Per prunable layer of the named blocks (0-based), H = X^T X of the dense stream's 32
calibration windows (dampened by 1 % of its mean diagonal), the layer error tr((W' - W) H (W' - W)^T) of:
the bare mask M*W; M*W with each row scaled by its optimal factor (a d_out vector); the refit (20 steps of
`refit.masked_least_squares`); and M*W plus the masked best rank-r approximation, in the H metric, of the
refit's update (rank 8, 32, 128: what an adapter of that rank could hold). Prints each one's share of the
refit's reduction, summed over the block's layers (relative errors).

    python benchmarks/results/refit-diagnostics/lowrank_share.py smollm2-135m 3,15    # from the repository root
"""
import sys, torch
from epts.models import load_model
from epts.data import tokenize, calibration_windows
from epts.blocks import capture_block_calls
from epts.arch import decoder_blocks, prunable_linears
from epts.reconstruct import layer_ranks, dense_pass
from epts.importance import mask_from_ranks
from epts.refit import masked_least_squares
torch.set_num_threads(2)
name = sys.argv[1]; wanted = [int(x) for x in sys.argv[2].split(",")]
loaded = load_model(name); model = loaded.model
tok = tokenize(loaded.tokenizer, "../shared/data/wikitext2/wiki.valid.tokens", role="calib")
calls = capture_block_calls(model, calibration_windows(tok, 32, 256, 0))
blocks = decoder_blocks(model); h = calls.hidden
def err(d, H):
    return float(((d @ H) * d).sum())
with torch.no_grad():
    for b, block in enumerate(blocks):
        runner = calls.runner(b, block)
        if b in wanted:
            layers = prunable_linears(model, block)
            Hs = {n: torch.zeros(l.in_features, l.in_features, dtype=torch.float64) for n, l in layers.items()}
            def acc(n):
                def hook(m, a, o):
                    x = a[0].reshape(-1, a[0].shape[-1]).double()
                    Hs[n].add_(x.T @ x)
                return hook
            hooks = [l.register_forward_hook(acc(n)) for n, l in layers.items()]
            _, norms = dense_pass(runner, layers, h)
            for hk in hooks: hk.remove()
            ranks = layer_ranks(layers, norms)
            for s in (0.3, 0.4, 0.5):
                tot = {"bare": 0.0, "row": 0.0, "ls": 0.0, "r8": 0.0, "r32": 0.0, "r128": 0.0}
                for n, l in layers.items():
                    H = Hs[n].float(); H = H + 0.01 * H.diagonal().mean() * torch.eye(H.shape[0])
                    W = l.weight.float(); keep = mask_from_ranks(ranks[n], s)
                    Wb = W * keep
                    # per-row optimal scale: alpha_i = <Wb_i, W_i>_H / <Wb_i, Wb_i>_H
                    WbH = Wb @ H
                    alpha = (WbH * W).sum(1) / (WbH * Wb).sum(1).clamp_min(1e-30)
                    Wr = Wb * alpha[:, None]
                    inv = torch.cholesky_inverse(torch.linalg.cholesky(H))
                    Wl = masked_least_squares(W, H, inv, ~keep, 20)
                    e = {"bare": err(Wb - W, H), "row": err(Wr - W, H), "ls": err(Wl - W, H)}
                    ev, Q = torch.linalg.eigh(H.double())
                    Hh = (Q * ev.clamp_min(0).sqrt()) @ Q.T
                    Hih = (Q * ev.clamp_min(1e-12).rsqrt()) @ Q.T
                    U, S, Vh = torch.linalg.svd((Wl - Wb).double() @ Hh, full_matrices=False)
                    for r in (8, 32, 128):
                        Dr = ((U[:, :r] * S[:r]) @ Vh[:r] @ Hih).float() * keep
                        e[f"r{r}"] = err(Wb + Dr - W, H)
                    for k in tot: tot[k] += e[k] / err(W, H)
                    if s == 0.4:
                        print(f"  block {b} {n} s={s}: bare {e['bare']:.4g} row {e['row']:.4g} ls {e['ls']:.4g} "
                              f"share {(e['bare'] - e['row']) / max(e['bare'] - e['ls'], 1e-30):.3f} alpha {alpha.min():.3f}-{alpha.max():.3f}")
                print(f"block {b} s={s}: relative error summed over layers bare {tot['bare']:.4f} row {tot['row']:.4f} "
                      f"ls {tot['ls']:.4f}; share of the LS reduction: row scale {(tot['bare'] - tot['row']) / (tot['bare'] - tot['ls']):.3f}, "
                      + ", ".join(f"masked rank {r} {(tot['bare'] - tot[f'r{r}']) / (tot['bare'] - tot['ls']):.3f}" for r in (8, 32, 128)), flush=True)
        if b >= max(wanted):
            break
        h = runner.run(h)
