"""The helpers scripts/demo.sh runs, as `python scripts/demo_text.py COMMAND` (the demo's plumbing, so
it lives beside the demo, not in the library):

- `source FOLDER`: print which text the demo can use, `local`, `hub` or `none` (`epts.data.pick_text_source`);
- `text --out FILE`: write held-out self-generated text to evaluate on when there is none
  (`epts.selfcal.write_text`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from epts.data import pick_text_source
from epts.selfcal import SelfCalConfig, write_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo_text.py", description="helpers of scripts/demo.sh")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("source", help="print local, hub or none: the WikiText-2 the demo can use")
    p.add_argument("folder", help="folder that may hold wiki.valid.tokens and wiki.test.raw")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the hub (default 3)")
    p = sub.add_parser("text", help="write text the model samples itself (decoded self-generated windows)")
    p.add_argument("--model", default="smollm2-135m", help="model alias, .gguf file, folder or hub id")
    p.add_argument("--out", required=True, help="text file to write")
    p.add_argument("--nsamples", type=int, default=32, help="windows (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0; the text is held out from self-generated "
                                                      "calibration windows of any seed)")
    args = parser.parse_args(argv)
    if args.command == "source":
        print(pick_text_source(args.folder, args.timeout))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from epts.models import load_model

    try:
        loaded = load_model(args.model)
        write_text(loaded.model, loaded.tokenizer, args.out, args.nsamples, args.seqlen, args.seed, SelfCalConfig())
    except (ValueError, OSError) as err:  # ModelLoadError is a ValueError
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
