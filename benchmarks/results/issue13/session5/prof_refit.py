import cProfile, pstats, sys, time, shutil, logging
import torch
from epts.api import export
art = "/work/runs/full/artifacts/default"
out = "/tmp/prof-export"
shutil.rmtree(out, ignore_errors=True)
s = float(sys.argv[1]) if len(sys.argv) > 1 else 0.5
torch.set_num_threads(2)
pr = cProfile.Profile()
t = time.perf_counter()
pr.enable()
meta = export(art, s, out, calib="/work/shared/data/wikitext2/wiki.valid.tokens", progress=False)
pr.disable()
print("total", time.perf_counter() - t, "refit", meta["refit"]["seconds"], meta["refit"]["refit_blocks"])
st = pstats.Stats(pr); st.sort_stats("cumtime").print_stats(45)
