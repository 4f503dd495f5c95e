"""One-off: on Gemma-3-270M block B (dense stream H in, dense target Y), train group 1's adapter
alone (2 epochs x 32 windows, draws over (0, 0.4], MSE to Y) at several learning rates and score
the loss on H at 0.1..0.4 with and without it. Is the group-1 adapter dropped for its lr?"""
import sys, math, torch, torch.nn.functional as F
from epts import hilora
from epts.models import load_model
from epts.data import calibration_set
from epts.blocks import capture_block_calls, call_block
from epts.arch import decoder_blocks, prunable_linears
from epts.reconstruct import dense_pass, layer_ranks, stratified_sparsities
torch.set_num_threads(2)
model_name, target = sys.argv[1], [int(b) for b in sys.argv[2].split(",")]
lrs = [float(x) for x in sys.argv[3].split(",")]
loaded = load_model(model_name)
model = loaded.model; model.requires_grad_(False)
windows = calibration_set(loaded.tokenizer, "/work/shared/data/wikitext2/wiki.valid.tokens", 32, 256, 0)
with torch.no_grad():
    calls = capture_block_calls(model, windows, 8)
H = calls.hidden
for b in range(max(target) + 1):
    block = decoder_blocks(model)[b]
    runner = calls.runner(b, block)
    originals = prunable_linears(model, block)
    Y, norms = dense_pass(runner, originals, H)
    if b in target:
        ranks = layer_ranks(originals, norms)
        for lr in lrs:
            gen = torch.Generator().manual_seed(b)
            layers = hilora.attach(block, originals, ranks, (8,) * 7, gen)
            params = [l.A[0] for l in layers.values()] + [l.B[0] for l in layers.values()]
            opt = torch.optim.Adam(params, lr=lr)
            steps = 64
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.0)
            draws = stratified_sparsities(0.0, 0.4, steps, gen)
            for step in range(steps):
                i = step % 32
                hilora.set_state(layers, draws[step].item(), 0)
                loss = F.mse_loss(call_block(runner, H[i:i+1]).float(), Y[i:i+1].float())
                loss.backward(); opt.step(); opt.zero_grad(); sched.step()
            row = []
            with torch.no_grad():
                for s in (0.1, 0.2, 0.3, 0.4):
                    pair = []
                    for keep in (True, False):
                        hilora.set_state(layers, s, 0, group1_adapter=keep)
                        pair.append(F.mse_loss(runner.run(H).float(), Y.float()).item())
                    row.append(f"{s}: {pair[0]:.4g}/{pair[1]:.4g}")
            norm = sum((l.B[0] @ l.A[0]).norm().item() ** 2 for l in layers.values()) ** 0.5
            wn = sum(l.weight.norm().item() ** 2 for l in layers.values()) ** 0.5
            print(f"block {b + 1} lr {lr:g}: with/without {' '.join(row)}  |BA|/|W| {norm / wn:.3g}", flush=True)
            hilora.detach(block, originals)
    H = Y
