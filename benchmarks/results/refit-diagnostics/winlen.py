"""One-off: does the window length decide the export's choice on Gemma-3? The refit of every block
against SparseGPT's solution for every block, scored on the first 32 held-out 256-token windows
from the start of the calibration file (the choice's kind of window; its first 8 are the choice's)
and on the first 16 held-out 512-token windows from the start (positions 1-255 and 256-511 apart)."""
import sys, time, torch
import torch.nn.functional as F
import epts.refit as R
from epts.artifact import ElasticModel
from epts.runtime import RuntimeModel
from epts.config import RefitConfig
from epts.data import heldout_windows, tokenize

torch.set_grad_enabled(False)
art, calib = sys.argv[1], sys.argv[2]
torch.set_num_threads(2)
elastic = ElasticModel.load(art)
cc = elastic.config.calib
windows = R.artifact_calibration(elastic, calib, progress=False)
tokens = tokenize(elastic.base.tokenizer, calib, role="calib")
short = heldout_windows(tokens, cc.nsamples, cc.seqlen, cc.seed, 32)
long = heldout_windows(tokens, cc.nsamples, cc.seqlen, cc.seed, 16, 512)

def nll(model, w):
    logits = model(w[None], use_cache=False).logits[0, :-1].float()
    return F.cross_entropy(logits, w[1:], reduction="none").double()

for s in [float(x) for x in sys.argv[3:]]:
    res = {}
    for name, sgpt in (("ls", False), ("sgpt", True)):
        runtime = RuntimeModel(elastic)
        runtime.set_sparsity(s)
        R._refit_pass(elastic, runtime.loaded, runtime.sparsity, windows, RefitConfig("all"), "all", 8, False, None,
                      sparsegpt=sgpt)
        m = runtime.loaded.model
        res[name] = (torch.stack([nll(m, w).mean() for w in short]),
                     torch.stack([nll(m, w)[:255].mean() for w in long]), torch.stack([nll(m, w)[255:].mean() for w in long]))
        del runtime
    d = [a - b for a, b in zip(res["ls"], res["sgpt"])]
    print(f"sparsity {s}: ls - sgpt, 256-token windows: first 8 {d[0][:8].mean():+.4f}, 32 {d[0].mean():+.4f} "
          f"(se {d[0].std() / 32 ** .5:.4f}); 512-token windows (16): positions 1-255 {d[1].mean():+.4f} "
          f"(se {d[1].std() / 4:.4f}), 256-511 {d[2].mean():+.4f} (se {d[2].std() / 4:.4f})", flush=True)
