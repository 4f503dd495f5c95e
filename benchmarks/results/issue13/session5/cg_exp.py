import sys, torch
torch.manual_seed(0)
torch.set_num_threads(2)
def f(w, h, x):  # per-row objective
    d = w - x
    return ((d @ h) * d).sum(1)
def cg(w, h, keep, x0, iters, pre):
    x = x0 * keep
    r = ((w - x) @ h) * keep
    z = pre(r) * keep
    p = z.clone(); rz = (r * z).sum(1)
    out = [x.clone()]
    for _ in range(iters):
        hd = (p @ h) * keep
        c = (p * hd).sum(1)
        a = torch.where(c > 0, rz / c.clamp_min(1e-30), torch.zeros_like(rz))
        x += a[:, None] * p; r -= a[:, None] * hd
        z = pre(r) * keep
        rzn = (r * z).sum(1)
        p = z + (rzn / rz.clamp_min(1e-30))[:, None] * p; rz = rzn
        out.append(x.clone())
    return out
S = float(sys.argv[1])
d = torch.load(f"/work/runs/s5/hess_{S}.pt")
ks = [0, 1, 2, 5, 10, 20, 40]
res = {}
for key, t in d.items():
    w, h, p, s = t["w"].float(), t["h"].float(), t["p"], t["s"].float()
    rows = torch.randperm(w.shape[0])[:48]
    w, p, s = w[rows], p[rows], s[rows]
    keep = (~p).float()
    # exact per row
    xs = torch.zeros_like(w)
    for i in range(w.shape[0]):
        K = ~p[i]
        rhs = w[i] @ h[:, K]
        xs[i, K] = torch.linalg.solve(h[K][:, K], rhs)
    fstar = f(w, h, xs).sum()
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    dj = 1 / torch.diag(h)
    for name, x0, pre in [("sweep+jac", s, lambda r: r * dj), ("bare+jac", w, lambda r: r * dj),
                          ("sweep+hinv", s, lambda r: r @ hinv), ("bare+hinv", w, lambda r: r @ hinv)]:
        xsq = cg(w, h, keep, x0, max(ks), pre)
        res.setdefault(name, []).append([float(f(w, h, xsq[k]).sum() / fstar - 1) for k in ks])
import math
print("S", S, "iters", ks)
for name, v in res.items():
    t = torch.tensor(v)
    print(f"{name:12s} geo-mean excess", " ".join(f"{math.exp(x):.2e}" for x in t.clamp_min(1e-12).log().mean(0).tolist()),
          " max", " ".join(f"{x:.1e}" for x in t.max(0).values.tolist()))
