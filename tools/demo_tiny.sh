#!/usr/bin/env bash
# The pipeline demo: set up, then a tiny SoFT fine-tune (8-layer LLaMA, exits 2/4/6/8) on the bundled
# Alpaca sample, on 2 CPU pipeline stages through the real `deepspeed` launcher. Ends with the
# per-exit table; TensorBoard events in runs/demo-*/tb. Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
out=runs/demo-tiny-$(date +%Y%m%d-%H%M%S)
# One thread per rank: 2 ranks on a small machine would otherwise oversubscribe its cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"${PYTHON:-python3}" -m deepspeed.launcher.runner --num_gpus 2 soft_ds/train.py --ds-config ds_configs/tiny_pp2.json --output-dir "$out" "$@"
echo
echo "TensorBoard: tensorboard --logdir $out/tb"
echo "Export:      soft-ds export --run $out --exit 4 --out $out/hf-exit4"
