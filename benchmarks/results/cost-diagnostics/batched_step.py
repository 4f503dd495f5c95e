"""One training step of the 7 groups on a real SmolLM2-135M block: sequential (train_block: one forward and
backward per group) against all 7 groups batched into one forward and backward (each group's effective
weight stacked, the token matmuls as one bmm). Prints the largest relative difference of the adapters'
gradients and the time per step; with a third argument, a cProfile-like table of the sequential step's
ops by input shape (torch.profiler).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/results/cost-diagnostics/batched_step.py smollm2-135m 3 [profile]
"""
import sys, time, math, torch
import torch.nn.functional as F
from epts.models import load_model
from epts.data import tokenize, calibration_windows
from epts.blocks import capture_block_calls, call_block
from epts.arch import decoder_blocks, prunable_linears
from epts import hilora
from epts.config import EPTSConfig
from epts.reconstruct import layer_ranks, dense_pass, guided_loss, reconstruction_loss

torch.set_num_threads(2)
model_name = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
bidx = int(sys.argv[2]) if len(sys.argv) > 2 else 3
loaded = load_model(model_name)
model = loaded.model
tok = tokenize(loaded.tokenizer, "../shared/data/wikitext2/wiki.valid.tokens", role="calib")
win = calibration_windows(tok, 4, 256, 0)
calls = capture_block_calls(model, win)
blocks = decoder_blocks(model)
h = calls.hidden
with torch.no_grad():
    for b in range(bidx):
        h = calls.runner(b, blocks[b]).run(h)
block = blocks[bidx]
runner = calls.runner(bidx, block)
orig = prunable_linears(model, block)
targets, norms = dense_pass(runner, orig, h)
ranks = layer_ranks(orig, norms)
cfg = EPTSConfig()
layers = hilora.attach(block, orig, ranks, cfg.ranks, torch.Generator().manual_seed(0))
for l in layers.values():
    for B in l.B:
        torch.nn.init.normal_(B, std=1e-3)
K = 7
sps = [0.2, 0.42, 0.47, 0.52, 0.57, 0.62, 0.67]
STATES = None

def fwd(self, x):
    if STATES is None:
        return F.linear(x, self.effective_weight(), self.bias)
    ws = []
    for s, k in STATES:
        self.set_state(s, k)
        ws.append(self.effective_weight())
    W = torch.stack(ws)
    G = len(STATES)
    out = torch.bmm(x.reshape(G, -1, x.shape[-1]), W.transpose(1, 2))
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], -1)
hilora.ElasticLinear.forward = fwd
params = [p for l in layers.values() for p in l.parameters()]
x = h[:1]; y = targets[:1].float()

def seq_step():
    anchor = None
    for k in range(K):
        hilora.set_state(layers, sps[k], k)
        out = call_block(runner, x).float()
        loss = reconstruction_loss(out, y, None) if k == 0 else guided_loss(out, y, anchor, 0.5)
        if k == 0:
            anchor = out.detach()
        loss.item()
        loss.backward()

def bat_step():
    global STATES
    STATES = list(zip(sps, range(K)))
    out = call_block(runner, x.expand(K, -1, -1).contiguous()).float()
    STATES = None
    anchor = out[:1].detach()
    loss = reconstruction_loss(out[:1], y, None)
    for k in range(1, K):
        loss = loss + guided_loss(out[k:k + 1], y, anchor, 0.5)
    loss.item()
    loss.backward()

def grads():
    g = [p.grad.clone() for p in params]
    for p in params: p.grad = None
    return g
seq_step(); g1 = grads(); bat_step(); g2 = grads()
rel = max(((a - b).norm() / a.norm().clamp_min(1e-30)).item() for a, b in zip(g1, g2))
print("max relative grad difference", rel)
for name, f in [("sequential", seq_step), ("batched", bat_step)] * 3:
    f(); grads()
    t = time.perf_counter()
    for _ in range(5):
        f(); grads()
    print(name, round((time.perf_counter() - t) / 5 * 1000, 1), "ms per step")
if len(sys.argv) > 3:
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            seq_step(); grads()
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=20, max_shapes_column_width=70))
