"""Step time, SmolLM2-shaped block: float32 against bfloat16 token matmuls with the update kept apart
(y = x (M*W)^T + x (M*BA)^T, each in bfloat16, so small updates are not rounded into W)."""
import time, torch, torch.nn.functional as F
from torch import nn
torch.manual_seed(0)
d, f, kv, r, K = 576, 1536, 192, 8, 7
shapes = {"q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d), "gate": (f, d), "up": (f, d), "down": (d, f)}
W = {n: torch.randn(o, i) * 0.02 for n, (o, i) in shapes.items()}
R = {n: torch.rand(o, i).argsort(1).argsort(1).float() for n, (o, i) in shapes.items()}
A = {n: [nn.Parameter(torch.randn(r, i) * 0.01) for _ in range(K)] for n, (o, i) in shapes.items()}
B = {n: [nn.Parameter(torch.randn(o, r) * 0.01) for _ in range(K)] for n, (o, i) in shapes.items()}
def lin32(n, x, k, a, b):
    return F.linear(x, (torch.addmm(W[n], b, a) * (k - R[n]).clamp(0, 1)))
def lin16(n, x, k, a, b):
    m = (k - R[n]).clamp(0, 1)
    xb = x.to(torch.bfloat16)
    return (F.linear(xb, (W[n] * m).to(torch.bfloat16)) + F.linear(xb, ((b @ a) * m).to(torch.bfloat16))).float()
def lin16m(n, x, k, a, b):  # merged: the update rounded into W
    return F.linear(x.to(torch.bfloat16), (torch.addmm(W[n], b, a) * (k - R[n]).clamp(0, 1)).to(torch.bfloat16)).float()
def fwd(x, s, g, lin):
    def L(n, h):
        a = torch.cat(A[n][: g + 1]); b = torch.cat(B[n][: g + 1], 1)
        return lin(n, h, float(int((1 - s) * W[n].shape[1])), a, b)
    q, kk, v = L("q", x), L("k", x), L("v", x)
    h = x + L("o", q)
    return h + L("down", F.silu(L("gate", h)) * L("up", h))
def timed(lin, x, y):
    def step():
        for g in range(K):
            F.mse_loss(fwd(x, 0.05 + 0.1 * g, g, lin), y).backward()
    step(); t = time.perf_counter()
    for _ in range(5): step()
    return round((time.perf_counter() - t) / 5 * 1000, 1)
if __name__ == "__main__":
    x = torch.randn(256, d); y = torch.randn(256, d)
    for name, lin in [("fp32", lin32), ("bf16 split", lin16), ("bf16 merged", lin16m)] * 2:
        print(name, timed(lin, x, y), "ms per step (7 groups)")
