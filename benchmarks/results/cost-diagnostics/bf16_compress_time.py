"""Compress time of the first 3 SmolLM2 blocks, train_matmul_precision ieee against bf16, alternating
(run from the repository root, alone on the machine)."""
import time, torch
from epts.models import load_model
from epts.reconstruct import compress
from epts.config import EPTSConfig
torch.set_num_threads(2)
loaded = load_model("smollm2-135m")
text = "../shared/data/wikitext2/wiki.valid.tokens"
for rep in range(2):
    for name, cfg in (("ieee", EPTSConfig()), ("bf16", EPTSConfig(train_matmul_precision="bf16"))):
        t = time.perf_counter()
        e = compress(loaded, text, cfg, progress=False, num_blocks=3)
        print(f"{name}: {time.perf_counter() - t:.1f} s, train s per block {[round(b.seconds, 1) for b in e.blocks]}, losses b3 {[round(x, 4) for x in e.blocks[2].losses]}", flush=True)
