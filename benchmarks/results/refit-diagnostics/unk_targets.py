"""One-off: how much of the dense Gemma-3-270M's loss on the harness's 8 held-out windows (512 tokens,
from WikiText-2's tokenised validation file) falls on targets that are the tokenizer's unknown-token id
(3): with the text tokenised as before fa84387 (the spelling "<unk>" read as that id) and as since
(`split_special_tokens`, the spelling as text).

    python unk_targets.py
"""
import torch
import torch.nn.functional as F

from benchmarks.experiments import heldout_text
from benchmarks.run import DATA
from epts.data import read_text
from epts.models import load_model

base = load_model("gemma3-270m")
text = read_text(DATA / "wiki.valid.tokens")
for split in (False, True):
    ids = base.tokenizer(text, return_tensors="pt", verbose=False, split_special_tokens=split).input_ids.reshape(-1)
    total = on_unk = 0.0
    count = unk_count = 0
    with torch.no_grad():
        for window in heldout_text(ids, 32, 256, [0], 512, 8):
            loss = F.cross_entropy(base.model(window[None], use_cache=False).logits[0, :-1].float(), window[1:],
                                   reduction="none")
            unk = window[1:] == base.tokenizer.unk_token_id
            total, count = total + loss.sum().item(), count + loss.numel()
            on_unk, unk_count = on_unk + loss[unk].sum().item(), unk_count + int(unk.sum())
    print(f"split_special_tokens={split}: mean nll {total / count:.4f}; unknown-token targets {unk_count} of {count}, "
          f"mean nll there {on_unk / max(unk_count, 1):.2f}, share of the loss {on_unk / total:.3f}; "
          f"the other targets {(total - on_unk) / (count - unk_count):.4f}")
