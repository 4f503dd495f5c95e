#!/usr/bin/env bash
# The main job, end to end on the built-in default model (SmolLM2-135M), set-up included: ONE elastic
# `epts compress` with the small preset `--preset demo` (epts/config.py: 16 windows, 1 epoch), then that one elastic model evaluated on
# WikiText-2 at several sparsities, switched in place (sparsity 0 is the dense base model): a table
# and a plot of perplexity against sparsity. About 10 minutes on 2 CPU cores.
# The one-shot Wanda baseline demo is scripts/demo_wanda.sh.
#
# Arguments go to `epts compress` and override the preset (e.g. `--nsamples 2` for a quick check).
# Environment: EPTS_DATA (folder of wiki.valid.tokens and wiki.test.raw, default ../shared/data/wikitext2),
# EPTS_DEMO_OUT (runs/demo), EPTS_DEMO_MODEL (smollm2-135m), EPTS_DEMO_SPARSITIES (0,0.3,0.5,0.7),
# EPTS_DEMO_WINDOWS (evaluation windows of 512 tokens, default 32).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -c "import matplotlib" 2>/dev/null || .venv/bin/python -m pip install -q -e ".[plot]"
data=${EPTS_DATA:-../shared/data/wikitext2}
out=${EPTS_DEMO_OUT:-runs/demo}
model=${EPTS_DEMO_MODEL:-smollm2-135m}
sparsities=${EPTS_DEMO_SPARSITIES:-0,0.3,0.5,0.7}
windows=${EPTS_DEMO_WINDOWS:-32}
artifact=$out/artifact
# A finished artifact of an earlier demo is replaced; an interrupted run is resumed where it stopped.
fresh=()
[ -f "$artifact/manifest.json" ] && fresh=(--overwrite)

start=$SECONDS
.venv/bin/epts compress --model "$model" --calib "$data/wiki.valid.tokens" --preset demo \
  --out "$artifact" "${fresh[@]}" "$@"
compress_s=$((SECONDS - start))
.venv/bin/epts eval "$artifact" --sparsity "$sparsities" --data "$data/wiki.test.raw" --seqlen 512 \
  --max-windows "$windows" --report "$out/eval.json"
eval_s=$((SECONDS - start - compress_s))
echo
.venv/bin/epts report "$out/eval.json" --table "$out/table.md" --plot "$out/ppl_vs_sparsity.png" \
  --title "$model: one EPTS model, every sparsity"
cat <<EOF

Demo done in $((SECONDS / 60)) min $((SECONDS % 60)) s (compress ${compress_s} s, evaluation ${eval_s} s).
  artifact: $artifact   (one elastic model: any sparsity from 0 to 0.7)
  table:    $out/table.md
  plot:     $out/ppl_vs_sparsity.png
  report:   $out/eval.json
Export one sparsity as a plain transformers folder (with a model card):
  .venv/bin/epts export $artifact --sparsity 0.5 --out $out/export-0.5
Switch sparsities in memory and generate:
  .venv/bin/epts generate $artifact --sparsity 0.3,0.7 --prompt "The history of"
EOF
