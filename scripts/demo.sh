#!/usr/bin/env bash
# The main job, end to end on the built-in default model (SmolLM2-135M), set-up included: ONE elastic
# `epts compress` with the small preset `--preset demo` (epts/config.py: 16 windows, 1 epoch), then that one elastic model evaluated on
# WikiText-2 at several sparsities, switched in place (sparsity 0 is the dense base model): a table
# and a plot of perplexity against sparsity; then the dial: tokens/s at 0 / 0.5 / 0.7 on the sparse
# runtime, from the same artifact. About 10 minutes on 2 CPU cores.
# The one-shot Wanda baseline demo is scripts/demo_wanda.sh.
#
# Text: WikiText-2 from EPTS_DATA when that folder holds it, else from the Hugging Face hub when it answers
# (`python scripts/demo_text.py source`), else none at all: the model calibrates on windows it writes itself and
# perplexity is measured on other text it writes (held out; not WikiText-2, not comparable to any figure).
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

found=$(.venv/bin/python scripts/demo_text.py source "$data")
case $found in
  local)
    calib=(--calib "$data/wiki.valid.tokens"); eval_data=$data/wiki.test.raw; label="WikiText-2"
    text="WikiText-2 from $data: calibration wiki.valid.tokens, evaluation wiki.test.raw" ;;
  hub)
    calib=(--calib wikitext2); eval_data=wikitext2; label="WikiText-2"
    text="WikiText-2 from the Hugging Face hub (no $data here): calibration the train split, evaluation the test split" ;;
  *)
    calib=(); eval_data=$out/self-generated-eval.txt; label="self-generated text, not WikiText-2"
    text="no dataset (no $data here, the Hugging Face hub unreachable): calibration on windows the model wrote itself;
  perplexity on other text it wrote ($eval_data, held out from the calibration). These perplexities measure
  how far each sparsity strays from the dense model on its own text: they are NOT WikiText-2 perplexities and
  compare with no published figure"
    mkdir -p "$out"
    # One window more than evaluated: decoded and tokenised again, the text may come out a few tokens shorter.
    .venv/bin/python scripts/demo_text.py text --model "$model" --out "$eval_data" --nsamples $((windows + 1)) --seqlen 512 ;;
esac
echo "demo text: $text"
start=$SECONDS

.venv/bin/epts compress --model "$model" "${calib[@]}" --preset demo --out "$artifact" "${fresh[@]}" "$@"
compress_s=$((SECONDS - start))
.venv/bin/epts eval "$artifact" --sparsity "$sparsities" --data "$eval_data" --seqlen 512 \
  --max-windows "$windows" --report "$out/eval.json"
eval_s=$((SECONDS - start - compress_s))
echo
.venv/bin/epts report "$out/eval.json" --table "$out/table.md" --plot "$out/ppl_vs_sparsity.png" \
  --title "$model: one EPTS model, every sparsity ($label)"
# The dial: the same artifact served by the sparse runtime (pruned layers packed, re-merged and
# repacked in place at each sparsity): decode speed and model size at 0, 0.5 and 0.7.
echo
if .venv/bin/python -c "import sys, epts.sparse as s; sys.exit(not s.available())" 2>/dev/null; then
  .venv/bin/epts generate "$artifact" --runtime sparse --sparsity 0,0.5,0.7 --max-new-tokens 64 -q \
    --prompt "The history of the city" | tee "$out/dial.txt"
  dial="  dial:     $out/dial.txt   (tokens/s at 0 / 0.5 / 0.7 on the sparse runtime; perplexity in the table)"
else
  .venv/bin/python -c "import epts.sparse as s; print('sparse runtime unavailable:', s.unavailable_reason())"
  dial="  dial:     not run (the sparse runtime is unavailable here)"
fi
cat <<EOF

Demo done in $((SECONDS / 60)) min $((SECONDS % 60)) s (compress ${compress_s} s, evaluation ${eval_s} s).
  text:     $text
  artifact: $artifact   (one elastic model: any sparsity from 0 to 0.7)
  table:    $out/table.md
  plot:     $out/ppl_vs_sparsity.png
  report:   $out/eval.json
$dial
Export one sparsity as a plain transformers folder (with a model card):
  .venv/bin/epts export $artifact --sparsity 0.5 --out $out/export-0.5
Switch sparsities in memory and generate:
  .venv/bin/epts generate $artifact --sparsity 0.3,0.7 --prompt "The history of"
EOF
