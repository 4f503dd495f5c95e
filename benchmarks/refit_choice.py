"""The export's per-block refit choice ("block", the default before "auto") at several settings on one kept artifact: for each
SPARSITY:COMPARE_WINDOWS:ITERS, the held-out perplexity, which blocks were refit (R) or kept their
adapters (a), and the refit's seconds. What docs/RECIPE.md's "choice on all 32 windows" and "20 steps"
rows measure (the artifact of `benchmarks.experiments ... --keep-artifacts`):

    python -m benchmarks.refit_choice OUT/artifacts/default 0.7:32:10 0.6:32:10 0.7:8:20

The held-out windows are those of the experiment harness: windows of the calibration text that no
calibration window overlaps.
"""

from __future__ import annotations

import argparse
import math

from benchmarks.experiments import heldout_text
from epts.artifact import ElasticModel
from epts.runtime import RuntimeModel
from epts.config import RefitConfig
from epts.data import tokenize
from epts.evaluate import mean_nll
from epts.refit import artifact_calibration, refit


def parse_spec(text: str) -> tuple[float, RefitConfig]:
    parts = text.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not SPARSITY:COMPARE_WINDOWS:ITERS, e.g. 0.7:32:10")
    try:
        return float(parts[0]), RefitConfig("block", int(parts[2]), 0.0, int(parts[1]))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.refit_choice", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("artifact", help="an EPTS artifact folder")
    parser.add_argument("specs", nargs="+", type=parse_spec, metavar="SPARSITY:COMPARE_WINDOWS:ITERS")
    parser.add_argument("--calib", help="calibration text (default: the artifact's own, reread and checked)")
    parser.add_argument("--heldout-windows", type=int, default=24, help="held-out windows to evaluate on")
    parser.add_argument("--eval-seqlen", type=int, default=512, help="held-out window length")
    args = parser.parse_args(argv)

    elastic = ElasticModel.load(args.artifact)
    cc = elastic.config.calib
    windows = artifact_calibration(elastic, args.calib)
    tokens = tokenize(elastic.base.tokenizer, args.calib or elastic.calibration["source"], role="calib")
    held = heldout_text(tokens, cc.nsamples, cc.seqlen, cc.seed, args.eval_seqlen, args.heldout_windows)
    runtime = RuntimeModel(elastic)
    print("sparsity:compare_windows:iters  held-out ppl  blocks (R refit, a adapters kept)  refit s")
    for sparsity, config in args.specs:
        runtime.set_sparsity(sparsity)  # re-merges every block: each spec starts from the plain merge
        report = refit(elastic, runtime.loaded, runtime.sparsity, windows, config, progress=False)
        ppl = math.exp(mean_nll(runtime.loaded.model, held))
        choices = "".join("R" if choice == "refit" else "a" for choice in report.choices)
        print(f"{sparsity}:{config.compare_windows}:{config.iters}  {ppl:.2f}  {choices}  {report.seconds:.1f}",
              flush=True)


if __name__ == "__main__":
    main()
