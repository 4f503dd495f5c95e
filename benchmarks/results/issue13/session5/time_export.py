import sys, time, shutil, torch
from epts.api import export
torch.set_num_threads(2)
for s in [float(x) for x in sys.argv[1].split(",")]:
    shutil.rmtree("/tmp/time-export", ignore_errors=True)
    t = time.perf_counter()
    meta = export("/work/runs/full/artifacts/default", s, "/tmp/time-export", calib="/work/shared/data/wikitext2/wiki.valid.tokens", progress=False)
    print(f"sparsity {s}: export {time.perf_counter() - t:.1f} s, refit {meta['refit']['seconds']:.1f} s, "
          f"materialise {meta['materialize_seconds']:.1f} s, refit blocks {meta['refit']['refit_blocks']}", flush=True)
