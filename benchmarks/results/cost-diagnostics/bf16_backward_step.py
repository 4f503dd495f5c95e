"""Step time, SmolLM2-shaped block, one step of 7 groups on one 256-token window: float32 against a float32
forward with bfloat16 backward matmuls (the forward, so the function trained, stays exact; only the
gradients are rounded). Run from the repository root, alone on the machine."""
import time, torch, torch.nn.functional as F
from torch import nn
torch.manual_seed(0); torch.set_num_threads(2)
d, f, kv, r, K = 576, 1536, 192, 8, 7
shapes = {"q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d), "gate": (f, d), "up": (f, d), "down": (d, f)}
W = {n: torch.randn(o, i) * 0.02 for n, (o, i) in shapes.items()}
R = {n: torch.rand(o, i).argsort(1).argsort(1).float() for n, (o, i) in shapes.items()}
A = {n: [nn.Parameter(torch.randn(r, i) * 0.01) for _ in range(K)] for n, (o, i) in shapes.items()}
B = {n: [nn.Parameter(torch.randn(o, r) * 0.01) for _ in range(K)] for n, (o, i) in shapes.items()}
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
def lin32(n, x, k, a, b): return F.linear(x, weff(n, k, a, b))
def linb(n, x, k, a, b): return Bwd16.apply(x, weff(n, k, a, b), True)
def linw(n, x, k, a, b): return Bwd16.apply(x, weff(n, k, a, b), False)
def fwd(x, s, g, lin):
    def L(n, h):
        a = torch.cat(A[n][: g + 1]); b = torch.cat(B[n][: g + 1], 1)
        return lin(n, h, float(int((1 - s) * W[n].shape[1])), a, b)
    q, kk, v = L("q", x), L("k", x), L("v", x)
    h = x + L("o", q)
    return h + L("down", F.silu(L("gate", h)) * L("up", h))
x = torch.randn(256, d, requires_grad=True); y = torch.randn(256, d)
def step(lin):
    for g in range(K):
        F.mse_loss(fwd(x, 0.05 + 0.1 * g, g, lin), y).backward()
for name, lin in [("fp32", lin32), ("bwd bf16 (gw+gx)", linb), ("bwd bf16 (gw only)", linw)] * 3:
    step(lin); t = time.perf_counter()
    for _ in range(5): step(lin)
    print(name, round((time.perf_counter() - t) / 5 * 1000, 1), "ms per step (7 groups)", flush=True)
