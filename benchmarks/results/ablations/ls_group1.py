"""Prototype: group 1's adapter initialised in closed form from the least-squares refit at s* = 0.4 (the
top of group 1): the best rank-r approximation, in the layer's H metric, of the refit's update of the
kept weights. LSG1=frozen: group 1's adapter keeps that value (its lr 0); LSG1=trained: trained from it.
H is X^T X of the elastic stream group 1 trains on (dampened by 1 % of its mean diagonal); the refit is 20
steps of `refit.masked_least_squares`. Wraps `epts.reconstruct.train_block`, then runs the harness with the
arguments given; each variant file is a copy of benchmarks/experiments/default.yaml (its stem names the rows):

    LSG1=frozen python benchmarks/results/ablations/ls_group1.py lsg1-frozen.yaml --blocks 6 --baselines '' \
        --heldout-windows 24 --other-text OTHER.txt --other-windows 16 --threads 2 --quiet --out OUT
"""
import os, sys, torch
import epts.reconstruct as R
from epts import hilora
from epts.blocks import call_block
from epts.importance import mask_from_ranks
from epts.refit import masked_least_squares

MODE, S_STAR = os.environ["LSG1"], float(os.environ.get("LSG1_S", "0.4"))
orig_train = R.train_block


def patched(runner, layers, inputs, targets, config, generator, lr, progress, dense_inputs=None, group1_lr=None):
    hs, hooks = {}, []
    for n, l in layers.items():
        hs[n] = torch.zeros(l.in_features, l.in_features, dtype=torch.float64)

        def hook(m, a, o, n=n):
            x = a[0].reshape(-1, a[0].shape[-1]).double()
            hs[n].add_(x.T @ x)
        hooks.append(l.register_forward_hook(hook))
    hilora.set_state(layers, 0.0, 0, group1_adapter=False)
    with torch.no_grad():
        for i in range(0, inputs.shape[0], 8):
            call_block(runner, inputs[i:i + 8])
    for h in hooks:
        h.remove()
    r = config.ranks[0]
    with torch.no_grad():
        for n, l in layers.items():
            H = hs[n]
            H = H + 0.01 * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
            W = l.weight.float()
            keep = mask_from_ranks(l.ranks, S_STAR)
            inv = torch.cholesky_inverse(torch.linalg.cholesky(H)).float()
            Wl = masked_least_squares(W, H.float(), inv, ~keep, 20)
            D = (Wl - W * keep).double()
            ev, Q = torch.linalg.eigh(H)
            Hh = (Q * ev.clamp_min(0).sqrt()) @ Q.T
            Hih = (Q * ev.clamp_min(1e-12).rsqrt()) @ Q.T
            U, S, Vh = torch.linalg.svd(D @ Hh, full_matrices=False)
            root = S[:r].sqrt()
            l.B[0].copy_((U[:, :r] * root).float())
            l.A[0].copy_(((root[:, None] * Vh[:r]) @ Hih).float())
    return orig_train(runner, layers, inputs, targets, config, generator, lr, progress, dense_inputs,
                      0.0 if MODE == "frozen" else group1_lr)


R.train_block = patched
from benchmarks.experiments import main  # noqa: E402
main(sys.argv[1:])
