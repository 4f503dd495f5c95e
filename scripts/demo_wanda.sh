#!/usr/bin/env bash
# A one-shot baseline on the built-in default model: prune SmolLM2-135M with Wanda at 50 % and print
# its WikiText-2 perplexity before and after (PROTOCOL.md's quick protocol). The main demo, one
# elastic model served at several sparsities, is scripts/demo.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
data=${EPTS_DATA:-../shared/data/wikitext2}
exec .venv/bin/epts prune --model smollm2-135m --method wanda --sparsity 0.5 \
  --calib "$data/wiki.valid.tokens" --eval-data "$data/wiki.test.raw" --max-windows 64 \
  --out runs/smollm2-wanda-0.5 --overwrite "$@"
