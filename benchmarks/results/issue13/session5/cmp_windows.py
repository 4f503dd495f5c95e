import sys, math, torch
from benchmarks.experiments import heldout_windows, DATA
from epts.models import load_model
from epts.artifact import ElasticModel
from epts.data import calibration_windows, tokenize
from epts.config import RefitConfig
from epts.refit import refit
from epts.evaluate import mean_nll
torch.set_num_threads(2)
base = load_model("smollm2-135m")
valid = tokenize(base.tokenizer, DATA / "wiki.valid.tokens", role="calib")
held = heldout_windows(valid, 32, 256, 0, 512, 24)
windows = calibration_windows(valid, 32, 256, 0)
elastic = ElasticModel.load("/work/runs/full/artifacts/default", base=base)
runtime = elastic.to_runtime()
for spec in sys.argv[1:]:
    s, cw, it = spec.split(":")
    runtime.set_sparsity(float(s))
    rep = refit(elastic, runtime.loaded, runtime.sparsity, windows, RefitConfig("auto", int(it), 0.0, int(cw)), progress=False)
    ppl = math.exp(mean_nll(runtime.loaded.model, held))
    print(spec, round(ppl, 2), "".join("R" if c == "refit" else "a" for c in rep.choices), round(rep.seconds, 1), flush=True)
