"""One-off proxy: the refit (and SparseGPT = obs mask, 0 steps) on more calibration windows, drawn
away from the held-out tail. spec sparsity:mode:mask:iters:nwin"""
import math, sys, time
import torch
import epts.refit as R
from benchmarks.experiments import heldout_text
from epts.artifact import ElasticModel
from epts.runtime import RuntimeModel
from epts.config import RefitConfig
from epts.data import calibration_windows, tokenize
from epts.evaluate import mean_nll

art, calib, nheld = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(2)
elastic = ElasticModel.load(art)
cc = elastic.config.calib
own = R.artifact_calibration(elastic, calib)
tokens = tokenize(elastic.base.tokenizer, calib, role="calib")
held = heldout_text(tokens, cc.nsamples, cc.seqlen, cc.seed, 512, nheld)
head = tokens[: len(tokens) - 4 * nheld * 512]
runtime = RuntimeModel(elastic)
for spec in sys.argv[4:]:
    sp, mode, mask, iters, nwin = spec.split(":")
    windows = own if int(nwin) == cc.nsamples else calibration_windows(head, int(nwin), cc.seqlen, cc.seed)
    runtime.set_sparsity(float(sp))
    config = RefitConfig(mode, 1, 0.0, 8, mask=mask)
    config.iters = int(iters)
    t = time.time()
    report = R.refit(elastic, runtime.loaded, runtime.sparsity, windows, config, progress=False)
    ppl = math.exp(mean_nll(runtime.loaded.model, held))
    blocks = "".join("R" if c == "refit" else "a" for c in report.choices)
    print(f"{spec} ppl {ppl:.2f} {blocks} {time.time()-t:.0f}s", flush=True)
