"""Reads spread.py's per-window losses. For each sparsity: every candidate's mean loss over the
scored windows other than the first 32 (spread over the file: its own ranking) and over the first
32 (what the export's choice scores); the paired difference of every two candidates on each set,
with its standard error; and the picks of 6 evenly spaced subsamples of 32 scored windows and of
runs of 32 neighbouring ones, with their mean regret (the pick's loss on the spread windows above
the best candidate's).

    python spread_read.py OUT.json"""
import itertools, json, sys

r = json.load(open(sys.argv[1]))
starts, first = r["starts"], set(r["first32"])
n = len(starts)
idx_first = [i for i, s in enumerate(starts) if s in first]
rest = [i for i in range(n) if i not in idx_first]
for sp, per in r["losses"].items():
    names = list(per)
    mean = lambda name, ids: sum(per[name][i] for i in ids) / len(ids)
    every = {name: mean(name, rest) for name in names}
    best = min(every, key=every.get)
    pick = lambda ids: min(names, key=lambda name: mean(name, ids))
    regret = lambda picks: sum(every[p] - every[best] for p in picks) / len(picks)
    step = n / 32
    spread = [pick(sorted({min(n - 1, int(off * step / 6 + k * step)) for k in range(32)})) for off in range(6)]
    runs = [pick(range(a, a + 32)) for a in range(0, n - 32, 16)]
    print(f"{sp}: the {len(rest)} spread windows " + " ".join(f"{k}={v:.4f}" for k, v in every.items()) + f" (best {best}); first 32 "
          + " ".join(f"{k}={mean(k, idx_first):.4f}" for k in names) + f" (picks {pick(idx_first)})")
    print(f"   spread samples pick {spread} (regret {regret(spread):.4f}); runs pick {runs} (regret {regret(runs):.4f})")
    for a, b in itertools.combinations(names, 2):
        out = []
        for ids in (rest, idx_first):
            d = [per[a][i] - per[b][i] for i in ids]
            m = sum(d) / len(d)
            se = (sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) ** .5
            out.append(f"{m:+.4f} (se {se:.4f})")
        print(f"   {a} - {b}: spread {out[0]}, first 32 {out[1]}")
