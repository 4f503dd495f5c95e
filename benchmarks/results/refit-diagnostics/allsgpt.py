"""One-off: the export's choice between the least-squares refit of every block and SparseGPT's own
solution for every block, per choice window (the first 32 held-out 256-token windows from the start
of the calibration file, as the export takes them): mean loss on the first 8 / 16 / 32 and the paired
standard error of the difference on the first 8."""
import sys, time, torch
import epts.refit as R
from epts.artifact import ElasticModel
from epts.runtime import RuntimeModel
from epts.config import RefitConfig
from epts.data import heldout_windows, tokenize
from epts.evaluate import mean_nll
torch.set_grad_enabled(False)

art, calib = sys.argv[1], sys.argv[2]
torch.set_num_threads(2)
elastic = ElasticModel.load(art)
cc = elastic.config.calib
windows = R.artifact_calibration(elastic, calib, progress=False)
tokens = tokenize(elastic.base.tokenizer, calib, role="calib")
choice = heldout_windows(tokens, cc.nsamples, cc.seqlen, cc.seed, 32)
for s in [float(x) for x in sys.argv[3:]]:
    per = {}
    for name, sgpt in (("ls", False), ("sgpt", True)):
        runtime = RuntimeModel(elastic)
        runtime.set_sparsity(s)
        t = time.time()
        R._refit_pass(elastic, runtime.loaded, runtime.sparsity, windows, RefitConfig("all"), "all", 8, False, None,
                      sparsegpt=sgpt)
        per[name] = torch.tensor([mean_nll(runtime.loaded.model, w[None], 1) for w in choice], dtype=torch.float64)
        print(f"{s} {name} {time.time() - t:.0f}s", flush=True)
        del runtime
    d = per["ls"] - per["sgpt"]
    print(f"sparsity {s}: ls - sgpt mean over 8 {d[:8].mean():+.4f} (se {d[:8].std() / 8 ** .5:.4f}), 16 {d[:16].mean():+.4f}, "
          f"32 {d.mean():+.4f} (se {d.std() / 32 ** .5:.4f}); ls 8 {per['ls'][:8].mean():.4f}, sgpt 8 {per['sgpt'][:8].mean():.4f}",
          flush=True)
    print("per window:", " ".join(f"{v:+.3f}" for v in d.tolist()), flush=True)
