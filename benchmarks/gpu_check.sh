#!/bin/bash
# The CUDA path end to end, for a lent GPU machine that weights cannot travel to (BENCHMARKS.md, "On a GPU").
#
#   bash benchmarks/gpu_check.sh prepare   # here: SmolLM2's tokenizer and config, and the text, into .gpu/
#   bash benchmarks/gpu_check.sh run       # there (carry .gpu; ignore it in .git/info/exclude): writes $OUT
#
# `run` builds a randomly initialised SmolLM2-shaped model with the real tokenizer, then runs the real
# CLI on CUDA: compress (default recipe, bfloat16), export with the refit, in-place eval, SparseGPT,
# a float16 compress and export; then one LLaMA-7B block through benchmarks.scale. Perplexities of
# random weights say nothing about quality: the check is that every command runs and stays finite.
set -u
DATA=${DATA:-../shared/data/wikitext2}
if [ "${1:-}" = prepare ]; then
  mkdir -p .gpu/smol && cp "$DATA/wiki.valid.tokens" "$DATA/wiki.test.raw" .gpu/ || exit 1
  exec python -c "
from epts.models import load_model
m = load_model('smollm2-135m')
m.tokenizer.save_pretrained('.gpu/smol')
m.model.config.save_pretrained('.gpu/smol')"
fi
[ "${1:-}" = run ] || { echo "usage: $0 prepare|run"; exit 2; }
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
T0=$(date +%s)
step() { local name=$1 limit=$2; shift 2; local s=$(date +%s); echo "=== $name (limit $limit s) at +$((s-T0)) s"; timeout "$limit" "$@"; echo "=== $name rc=$? in $(( $(date +%s) - s )) s"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
python3 -c "
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained('.gpu/smol')).save_pretrained('/tmp/smolr')
AutoTokenizer.from_pretrained('.gpu/smol').save_pretrained('/tmp/smolr')"
C=.gpu/wiki.valid.tokens; D=.gpu/wiki.test.raw
step "compress default recipe, bf16" 170 python3 -m epts compress --model /tmp/smolr --calib $C --device cuda --dtype bfloat16 --out /tmp/art -q
step "export 0.5, default refit" 60 python3 -m epts export /tmp/art --sparsity 0.5 --out /tmp/exp --device cuda --eval-data $D --max-windows 16
step "eval in place 0.7" 40 python3 -m epts eval /tmp/art --sparsity 0.7 --device cuda --data $D --max-windows 16
step "prune sparsegpt 0.5, bf16" 60 python3 -m epts prune --model /tmp/smolr --method sparsegpt --sparsity 0.5 --calib $C --device cuda --dtype bfloat16 --out /tmp/sgpt --max-windows 16 --eval-data $D
step "compress 1 epoch 8 windows, fp16" 60 python3 -m epts compress --model /tmp/smolr --calib $C --device cuda --dtype float16 --nsamples 8 --epochs 1 --out /tmp/art16 -q
step "export fp16 0.6, default refit" 40 python3 -m epts export /tmp/art16 --sparsity 0.6 --out /tmp/exp16 --device cuda --eval-data $D --max-windows 8
step "scale llama-7b bf16" 220 python3 -m benchmarks.scale --models llama-7b --device cuda --dtype bfloat16 --validate '' --out "$OUT/scale"
echo "total $(( $(date +%s) - T0 )) s"
