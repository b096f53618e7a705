#!/usr/bin/env bash
# The paper's findings at small scale, on CPU: SFT, SoFT and SFT+ICT on an 8-layer LLaMA, every exit
# evaluated on the held-out Alpaca records, and a report of which claims reproduce.
#
#     bash tools/reproduce_small.sh [OUT [train.py options...]]     (default OUT: runs/reproduce_small)
#
# Options after OUT go to all three training runs, after the script's own (the smoke test passes
# --train-steps 2 --train-epochs 0 to run the whole chain in minutes); KL_PROMPTS=N (default 32) and
# NEW_TOKENS=N (default 64) size the KL-by-position evaluation.
# 1. SFT and SoFT (exits 2,4,6,8), same budget: ds_configs/reproduce_small.json (800 steps of 16
#    sequences of 128 tokens, from the same random initialisation).
# 2. SFT+ICT: a separate norm + head per exit 2,4,6, trained one epoch on the frozen SFT model.
# 3. soft-ds eval lm / kl: held-out loss/perplexity per exit (the 200 records training held out) and
#    KL(last layer || exit) by output position; soft-ds eval claims: the table and claims.
# Each finished stage is kept: running the script again continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/reproduce_small}
shift || true
EXTRA=("$@")
CONFIG=ds_configs/reproduce_small.json
source tools/reproduce_common.sh

train sft --model tiny --mode sft
train soft --model tiny --mode soft
# One epoch of the training split: train.py turns it into whole steps of the config's batch.
train ict --model "$OUT/hf/sft" --mode ict --train-epochs 1 --warmup-steps 20 --eval-interval 0

echo "== evaluating every exit ($(date +%H:%M:%S))"
models=(--model "sft=$OUT/hf/sft" --model "soft=$OUT/hf/soft" --model "ict=$OUT/hf/ict")
# --config: the held-out split training set aside (its val_size, seed and seq_len).
soft-ds eval lm "${models[@]}" --exits 2,4,6,8 --config "$CONFIG" --out "$OUT/eval"
soft-ds eval kl "${models[@]}" --exits 2,4,6,8 --num-prompts "${KL_PROMPTS:-32}" --max-new-tokens "${NEW_TOKENS:-64}" --out "$OUT/eval"
soft-ds eval claims "$OUT"
echo "== done in $(minutes "$start"): $OUT/report.md"
