"""Inputs for the llm-compressor peer check, written with epts' own loading and sampling so both
sides see the same model and the same token windows: OUT/model (a save_pretrained folder) and
OUT/windows.safetensors (`calib` [nsamples, seqlen] and `eval` [windows, eval_seqlen] token ids).

    python -m benchmarks.peer.inputs --model smollm2-135m --calib FILE --eval FILE --out DIR
"""

from __future__ import annotations

import argparse

from epts.data import calibration_set, eval_windows, tokenize
from epts.io import save_tensors_atomic
from epts.models import load_model, save_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=64, help="0 = every window")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    loaded = load_model(args.model)
    save_model(loaded, f"{args.out}/model")
    calib = calibration_set(loaded.tokenizer, args.calib, args.nsamples, args.seqlen, seed=0)
    windows = eval_windows(tokenize(loaded.tokenizer, args.eval), args.eval_seqlen, args.max_windows or None)
    save_tensors_atomic({"calib": calib, "eval": windows}, f"{args.out}/windows.safetensors")


if __name__ == "__main__":
    main()
