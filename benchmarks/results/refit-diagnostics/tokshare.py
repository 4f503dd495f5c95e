"""One-off: how much of each layer's Hessian trace (sum of squared input norms) comes from the first
token of each calibration window, on Gemma-3 (dense stream)."""
import sys, torch
from epts.models import load_model
from epts.data import calibration_set
from epts.blocks import capture_block_calls
from epts.arch import decoder_blocks, prunable_linears
torch.set_num_threads(2)
loaded = load_model(sys.argv[1]); model = loaded.model; model.requires_grad_(False)
windows = calibration_set(loaded.tokenizer, "../shared/data/wikitext2/wiki.valid.tokens", 32, 256, 0)
class Share:
    def __init__(self): self.first = 0.0; self.total = 0.0; self.top = []
    def add_batch(self, x):
        n = x.float().pow(2).sum(-1)  # (batch, seq)
        self.first += float(n[:, 0].sum()); self.total += float(n.sum())
        self.top.append(n.flatten())
with torch.no_grad():
    calls = capture_block_calls(model, windows, 8, None)
    stream = calls.hidden
    blocks = decoder_blocks(model)
    for b, block in enumerate(blocks):
        runner = calls.runner(b, block)
        layers = prunable_linears(model, block)
        stats = {l: Share() for l in layers.values()}
        stream = runner.run_with_input_stats(stream, stats)
        row = []
        for name, l in layers.items():
            s = stats[l]; allnorms = torch.cat(s.top).sort(descending=True).values
            row.append(f"{name.split('.')[-1]} first {s.first/s.total:.2f} top32 {float(allnorms[:32].sum())/s.total:.2f}")
        print(b, "; ".join(row), flush=True)
