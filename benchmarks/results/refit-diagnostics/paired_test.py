"""One-off: the standard error of a default export's WikiText-2 test difference to SparseGPT per
target, paired by window, on the harness's windows (the first COUNT x 512 tokens of wiki.test.raw,
SparseGPT on the same 32 calibration windows of 256 tokens, the export `--refit auto` with RefitConfig's defaults
and the harness's choice windows). Prints each model's perplexity (which should equal the harness's
rows) and the mean per-token difference in nats with its standard error over the windows.

    python paired_test.py MODEL ART SPARSITY COUNT

A COUNT above the text's window count takes every window (PROTOCOL.md's full protocol; 570 for
Gemma-3-270M, about 35 min a sparsity on 2 cores).
"""
import math
import sys

import torch

from benchmarks.run import DATA
from epts.artifact import ElasticModel
from epts.baselines import prune
from epts.config import CalibConfig, PruneConfig, RefitConfig
from epts.data import calibration_windows, eval_windows, heldout_windows, tokenize
from epts.evaluate import blockwise_window_nll
from epts.importance import Pattern
from epts.models import LoadedModel, load_model
from epts.refit import refit
from epts.runtime import RuntimeModel

torch.set_num_threads(2)
name, art, sparsity, count = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
base = load_model(name)
cc = CalibConfig()
valid = tokenize(base.tokenizer, DATA / "wiki.valid.tokens", role="calib")
test = eval_windows(tokenize(base.tokenizer, DATA / "wiki.test.raw"), 512, count)
windows = calibration_windows(valid, cc.nsamples, cc.seqlen, cc.seed)


def per_token(model):
    with torch.no_grad():
        return blockwise_window_nll(model, test, 8) / (test.shape[1] - 1)


elastic = ElasticModel.load(art, base=base)
runtime = RuntimeModel(elastic)
runtime.set_sparsity(sparsity)
choice = heldout_windows(valid, cc.nsamples, cc.seqlen, cc.seed, RefitConfig.compare_windows)
refit(elastic, runtime.loaded, runtime.sparsity, windows, RefitConfig("auto"), progress=False, heldout=choice)
ours = per_token(runtime.loaded.model)
del runtime, elastic
pruned = LoadedModel(base.model, base.tokenizer, base.spec)
prune(pruned, windows, PruneConfig("sparsegpt", Pattern(sparsity=sparsity), cc))
theirs = per_token(pruned.model)
diff = ours - theirs
print(f"export ppl {math.exp(ours.mean()):.2f}, SparseGPT ppl {math.exp(theirs.mean()):.2f}, "
      f"difference {diff.mean():+.4f} nats a token, standard error {diff.std() / math.sqrt(len(diff)):.4f} "
      f"({len(diff)} windows; the export lower in {int((diff < 0).sum())})")
