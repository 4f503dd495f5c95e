"""Compress time of the first 3 SmolLM2 blocks: default against group1_stream dense, alternating."""
import sys, time, torch
from epts.models import load_model
from epts.reconstruct import compress
from epts.config import EPTSConfig
torch.set_num_threads(2)
loaded = load_model("smollm2-135m")
text = "../shared/data/wikitext2/wiki.valid.tokens"
for rep in range(2):
    for name, cfg in (("default", EPTSConfig()), ("group1_stream dense", EPTSConfig(group1_stream="dense")),
                      ("dense, guide 0", EPTSConfig(group1_stream="dense", guide_weight=0.0))):
        t = time.perf_counter()
        compress(loaded, text, cfg, progress=False, num_blocks=3)
        print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)
