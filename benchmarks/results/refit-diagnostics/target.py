"""One-off proxy: held-out ppl of the refit with target pruned vs dense."""
import math, sys, time
import torch
import epts.refit as R
from benchmarks.experiments import heldout_text
from epts.artifact import ElasticModel
from epts.runtime import RuntimeModel
from epts.config import RefitConfig
from epts.data import heldout_windows, tokenize
from epts.evaluate import mean_nll

art, calib, nheld = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(2)
elastic = ElasticModel.load(art)
cc = elastic.config.calib
windows = R.artifact_calibration(elastic, calib)
tokens = tokenize(elastic.base.tokenizer, calib, role="calib")
held = heldout_text(tokens, cc.nsamples, cc.seqlen, cc.seed, 512, nheld)
runtime = RuntimeModel(elastic)
for spec in sys.argv[4:]:  # sparsity:mode:mask:target
    sp, mode, mask, target = spec.split(":")
    runtime.set_sparsity(float(sp))
    config = RefitConfig(mode, 10, 0.0, 8, mask=mask, target=target)
    choice = heldout_windows(tokens, cc.nsamples, cc.seqlen, cc.seed, 8) if mode == "auto" else None
    t = time.time()
    report = R.refit(elastic, runtime.loaded, runtime.sparsity, windows, config, progress=False, heldout=choice)
    ppl = math.exp(mean_nll(runtime.loaded.model, held))
    blocks = "".join("R" if c == "refit" else "a" for c in report.choices)
    print(f"{spec} ppl {ppl:.2f} {blocks} {report.chosen} {report.losses} {time.time()-t:.0f}s", flush=True)
