"""The export's refit choice at several settings on one kept artifact: for each
SPARSITY:COMPARE_WINDOWS:ITERS[:MODE] (MODE "block", the per-block choice and the default here, or
"auto", the default export's choice for the whole model on COMPARE_WINDOWS held-out windows of the
calibration text), the held-out perplexity, which blocks were refit (R) or kept their adapters (a),
the refit's seconds, and for "auto" the candidate it chose with both losses. What docs/RECIPE.md's
"choice on all 32 windows", "20 steps" and "32 choice windows" rows measure (the artifact of
`benchmarks.experiments ... --keep-artifacts`):

    python -m benchmarks.refit_choice OUT/artifacts/default 0.7:32:10 0.6:32:10 0.7:8:20
    python -m benchmarks.refit_choice OUT/artifacts/default 0.7:32:10:auto 0.5:32:10:auto \
        --calib ../shared/data/wikitext2/wiki.valid.tokens

The held-out windows scored are those of the experiment harness: windows of the calibration text
that no calibration window overlaps, from its end ("auto" chooses on others, from its start).
"""

from __future__ import annotations

import argparse
import math

from benchmarks.experiments import heldout_text
from epts.artifact import ElasticModel
from epts.runtime import RuntimeModel
from epts.config import REFIT_MASKS, RefitConfig
from epts.data import heldout_windows, tokenize
from epts.evaluate import mean_nll
from epts.refit import artifact_calibration, refit


def parse_spec(text: str) -> tuple[float, RefitConfig]:
    parts = text.split(":")
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] not in ("block", "auto")):
        raise argparse.ArgumentTypeError(f"{text!r} is not SPARSITY:COMPARE_WINDOWS:ITERS[:block|auto], e.g. 0.7:32:10")
    try:
        mode = parts[3] if len(parts) == 4 else "block"
        return float(parts[0]), RefitConfig(mode, int(parts[2]), 0.0, int(parts[1]))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.refit_choice", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("artifact", help="an EPTS artifact folder")
    parser.add_argument("specs", nargs="+", type=parse_spec, metavar="SPARSITY:COMPARE_WINDOWS:ITERS[:MODE]")
    parser.add_argument("--calib", help="calibration text (default: the artifact's own, reread and checked)")
    parser.add_argument("--heldout-windows", type=int, default=24, help="held-out windows to evaluate on")
    parser.add_argument("--eval-seqlen", type=int, default=512, help="held-out window length")
    parser.add_argument("--mask", choices=REFIT_MASKS, default=RefitConfig.mask,
                        help="the masks of the blocks re-solved (RefitConfig.mask)")
    args = parser.parse_args(argv)

    elastic = ElasticModel.load(args.artifact)
    cc = elastic.config.calib
    windows = artifact_calibration(elastic, args.calib)
    tokens = tokenize(elastic.base.tokenizer, args.calib or elastic.calibration["source"], role="calib")
    held = heldout_text(tokens, cc.nsamples, cc.seqlen, cc.seed, args.eval_seqlen, args.heldout_windows)
    runtime = RuntimeModel(elastic)
    print("sparsity:compare_windows:iters[:mode]  held-out ppl  blocks (R refit, a adapters kept, S SparseGPT's "
          "solution)  refit s  choice")
    for sparsity, config in args.specs:
        config.mask = args.mask
        runtime.set_sparsity(sparsity)  # re-merges every block: each spec starts from the plain merge
        choice = heldout_windows(tokens, cc.nsamples, cc.seqlen, cc.seed, config.compare_windows) \
            if config.mode == "auto" else None
        report = refit(elastic, runtime.loaded, runtime.sparsity, windows, config, progress=False, heldout=choice)
        ppl = math.exp(mean_nll(runtime.loaded.model, held))
        blocks = "".join({"refit": "R", "sparsegpt": "S"}.get(c, "a") for c in report.choices)
        rebuilt = "+tuned" if report.tuned else "+reconstructed" if report.reconstructed else ""
        scores = " ".join(f"{k.replace(' ', '+')}={v:.4f}" for k, v in report.losses.items())
        chose = f"{report.chosen}{rebuilt} {scores}" if config.mode == "auto" else "-"
        mode = ":auto" if config.mode == "auto" else ""
        print(f"{sparsity}:{config.compare_windows}:{config.iters}{mode}  {ppl:.2f}  {blocks}  {report.seconds:.1f}  "
              f"{chose}", flush=True)


if __name__ == "__main__":
    main()
