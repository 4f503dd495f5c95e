"""In place at group-1 sparsities: a block whose group-1 check dropped its adapter serves them bare
(METHOD.md) or with group 2's adapter stack (adapters 1-2, trained for (0.40, 0.45]). No training:
one kept artifact, scored on the harness's held-out windows (from the file's end) and another text's.

    PYTHONPATH=. python group2-borrow.py MODEL ART HELDOUT_WINDOWS OTHER.txt OTHER_WINDOWS 0.3,0.35,0.4
"""
import sys
import torch
from benchmarks.experiments import heldout_text, evaluate
from benchmarks.run import DATA
from epts.artifact import ElasticModel
from epts.data import eval_windows, tokenize
from epts.hilora import active_adapters
from epts.models import load_model
from epts.runtime import RuntimeModel
import epts.artifact as art

torch.set_num_threads(2)
spec, path, nheld, other, nother = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
sparsities = [float(x) for x in sys.argv[6].split(",")]
base = load_model(spec)
valid = tokenize(base.tokenizer, DATA / "wiki.valid.tokens", role="calib")
texts = {"heldout": heldout_text(valid, 32, 256, [0], 512, nheld),
         "other": eval_windows(tokenize(base.tokenizer, other), 512, nother)}
elastic = ElasticModel.load(path, base=base)
print("group-1 adapter kept in", sum(b.group1_adapter for b in elastic.blocks), "of", len(elastic.blocks), flush=True)
original = art.active_adapters
for rule in ("bare", "group2"):
    art.active_adapters = original if rule == "bare" else (
        lambda group, keep, inherit, g1inh: original(1 if group == 0 and not keep else group, keep, inherit, g1inh))
    runtime = RuntimeModel(elastic)
    for s in sparsities:
        runtime.set_sparsity(s)
        ppl = evaluate(runtime.loaded, texts)
        print(rule, s, {k: round(v, 3) for k, v in ppl.items()}, flush=True)
    del runtime
