"""Step time, SmolLM2-shaped block (bf16_step.py's), one step of 7 groups on one 256-token window: float32
against a float32 forward with bfloat16 backward matmuls (the forward, so the function trained, stays
exact; only the gradients are rounded). Run from the repository root, alone on the machine."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bf16_step import R, W, d, lin32, timed  # noqa: E402  (draws the block's weights with seed 0)

torch.set_num_threads(2)
BF = torch.bfloat16


class Bwd16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, both):
        ctx.save_for_backward(x, w); ctx.both = both
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]); x2 = x.reshape(-1, x.shape[-1])
        gb = g2.to(BF)
        gw = (gb.t() @ x2.to(BF)).float()
        gx = (gb @ w.to(BF)).float() if ctx.both else g2 @ w
        return gx.reshape(x.shape), gw, None


def weff(n, k, a, b):
    return torch.addmm(W[n], b, a) * (k - R[n]).clamp(0, 1)


def linb(n, x, k, a, b): return Bwd16.apply(x, weff(n, k, a, b), True)
def linw(n, x, k, a, b): return Bwd16.apply(x, weff(n, k, a, b), False)


x = torch.randn(256, d, requires_grad=True); y = torch.randn(256, d)  # every layer computes its input's gradient
for name, lin in [("fp32", lin32), ("bwd bf16 (gw+gx)", linb), ("bwd bf16 (gw only)", linw)] * 3:
    print(name, timed(lin, x, y), "ms per step (7 groups)", flush=True)
