#!/usr/bin/env bash
# The paper's findings at small scale, on CPU: SFT, SoFT and SFT+ICT on an 8-layer LLaMA, every exit
# evaluated on the held-out Alpaca records, and a report of which claims reproduce.
#
#     bash tools/reproduce_small.sh [OUT [train.py options...]]     (default OUT: runs/reproduce_small)
#
# Options after OUT go to all three training runs, after the script's own (the smoke test passes
# --train_steps 2 to run the whole chain in minutes).
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
# One epoch of the training split, in optimizer steps of the config's batch.
epoch=$("$PYTHON" - "$CONFIG" <<'EOF'
import math, sys
from soft_ds.config import load_config
from soft_ds.data import build_datasets, load_tokenizer
config = load_config(sys.argv[1])
soft = config.soft
train_set, _ = build_datasets("data/alpaca_5000.json", load_tokenizer("data/tokenizer"), soft.seq_len,
                              soft.val_size, soft.seed)
print(math.ceil(len(train_set) / (config.micro_batch_size * config.grad_accum)))
EOF
)
train ict --model "$OUT/hf/sft" --mode ict --train_steps "$epoch" --warmup_steps 20 --eval_interval 0

echo "== evaluating every exit ($(date +%H:%M:%S))"
models=(--model "sft=$OUT/hf/sft" --model "soft=$OUT/hf/soft" --model "ict=$OUT/hf/ict")
# --config: the held-out split training set aside (its val_size, seed and seq_len).
soft-ds eval lm "${models[@]}" --exits 2,4,6,8 --config "$CONFIG" --out "$OUT/eval"
soft-ds eval kl "${models[@]}" --exits 2,4,6,8 --num-prompts 32 --max-new-tokens 64 --out "$OUT/eval"
soft-ds eval claims "$OUT"
echo "== done in $(minutes "$start"): $OUT/report.md"
