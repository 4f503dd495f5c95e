"""One-off: why Gemma-3-270M's default export at 0.4 scored below the dense model on Wikipedia text
(harness at c127d64). The dense model and the export (the kept artifact, `refit` auto as the harness
runs it, on the harness's calibration and choice windows) on four sets: the harness's 8 held-out
windows of 512 tokens, the first 8 WikiText-2 test windows, the 32 calibration windows and the 32
choice windows of 256 tokens. For each: mean nats a token with the logits divided by a temperature T,
the mean entropy of the predicted distribution (nats), and for the pruned model (the export, or
SparseGPT's below) the mean squared error of its last hidden state, after the final norm, to the dense model's.

    python temperature.py ART SPARSITY [OTHER] [--model MODEL]   # ART: the kept default artifact of MODEL

With OTHER (the other-domain text), also its first 8 windows of 512 tokens ("other"). ART "sparsegpt":
SparseGPT at SPARSITY on the calibration windows instead of the export (as the harness runs it); ART
"dense": the dense model's rows only. MODEL: gemma3-270m (the default) or smollm2-135m.
"""
import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

from benchmarks.experiments import heldout_text
from benchmarks.run import DATA
from epts.artifact import ElasticModel
from epts.baselines import prune
from epts.config import CalibConfig, PruneConfig, RefitConfig
from epts.data import calibration_windows, eval_windows, heldout_windows, tokenize
from epts.importance import Pattern
from epts.models import LoadedModel, load_model
from epts.refit import refit
from epts.runtime import RuntimeModel

TEMPERATURES = (0.8, 0.9, 1.0, 1.1, 1.25)


@torch.no_grad()
def scores(model, windows):
    nll, entropy, hidden = {t: 0.0 for t in TEMPERATURES}, 0.0, []
    for window in windows:
        out = model(window[None], use_cache=False, output_hidden_states=True)
        logits = out.logits[0, :-1].float()
        for t in TEMPERATURES:
            nll[t] += F.cross_entropy(logits / t, window[1:], reduction="sum").item()
        logp = F.log_softmax(logits, -1)
        entropy += -(logp.exp() * logp).sum(-1).mean().item()
        hidden.append(out.hidden_states[-1][0].float())
    tokens = windows[:, 1:].numel()
    return {t: round(v / tokens, 4) for t, v in nll.items()}, round(entropy / len(windows), 3), hidden


def main(artifact, sparsity, other=None, model_name="gemma3-270m"):
    torch.set_num_threads(2)
    base = load_model(model_name)
    cc = CalibConfig()
    valid = tokenize(base.tokenizer, DATA / "wiki.valid.tokens", role="calib")
    calib = calibration_windows(valid, cc.nsamples, cc.seqlen, cc.seed)
    sets = {"heldout": heldout_text(valid, cc.nsamples, cc.seqlen, [cc.seed], 512, 8),
            "test": eval_windows(tokenize(base.tokenizer, DATA / "wiki.test.raw"), 512, 8),
            "calib": calib, "choice": heldout_windows(valid, cc.nsamples, cc.seqlen, cc.seed, RefitConfig.compare_windows)}
    if other:
        sets["other"] = eval_windows(tokenize(base.tokenizer, other), 512, 8)
    dense = {name: scores(base.model, windows) for name, windows in sets.items()}
    for name, (nll, entropy, _) in dense.items():
        print("dense", name, nll, "entropy", entropy, flush=True)
    if artifact == "dense":
        return
    if artifact == "sparsegpt":
        pruned = LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.spec)
        prune(pruned, calib, PruneConfig("sparsegpt", Pattern(sparsity=sparsity), cc), progress=False)
        model, label = pruned.model, "sparsegpt"
    else:
        elastic = ElasticModel.load(artifact, base=base)
        runtime = RuntimeModel(elastic)
        runtime.set_sparsity(sparsity)
        start = time.time()
        report = refit(elastic, runtime.loaded, runtime.sparsity, calib, RefitConfig(), progress=False,
                       heldout=sets["choice"])
        print("refit", round(time.time() - start), json.dumps({k: report.to_dict()[k] for k in ("chosen", "losses")}),
              flush=True)
        model, label = runtime.loaded.model, "export"
    for name, windows in sets.items():
        nll, entropy, hidden = scores(model, windows)
        reference = dense[name][2]
        error = sum(((a - b) ** 2).mean().item() for a, b in zip(hidden, reference)) / len(hidden)
        power = sum((a**2).mean().item() for a in reference) / len(reference)
        print(label, name, nll, "entropy", entropy, "hidden MSE", round(error, 4), "dense hidden mean square",
              round(power, 4), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact")
    parser.add_argument("sparsity", type=float)
    parser.add_argument("other", nargs="?")
    parser.add_argument("--model", default="gemma3-270m")
    args = parser.parse_args()
    main(args.artifact, args.sparsity, args.other, args.model)
