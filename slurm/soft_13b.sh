#!/usr/bin/env bash
# LLaMA 2 13B SoFT with the paper's exits {12, 16, ..., 40} on 4 nodes x 8 GPUs:
# ds_configs/pp4.json (4 pipeline stages x 8 data parallel), or with PIPELINE_STAGES=8
# ds_configs/pp8.json (8 x 4).
#
#   MODEL=/models/Llama-2-13b-hf DATA=/data/alpaca_data.json OUTPUT_DIR=/shared/runs/soft-13b \
#       sbatch slurm/soft_13b.sh [soft_ds/train.py options, e.g. --resume]
#
# Submit from the soft-ds checkout (or set SOFT_REPO). The launch itself, its environment variables
# (TOKENIZER, PYTHON, MASTER_PORT, SOFT_DRY_RUN=1 ...) and why srun: slurm/soft.sbatch, which this
# runs with SOFT_CONFIG set. More nodes: sbatch --nodes 8 slurm/soft_13b.sh.
#
# Time limit: 24 h per job. Set --time to your partition's MaxTime (`sinfo -o "%P %l"`), here or
# with sbatch --time=2-00:00:00: at the limit the run saves and the job is requeued, up to
# SOFT_MAX_REQUEUES times (default 10), so the whole run may take several limits. SIGUSR1 comes
# 300 s before the limit: one 13B step plus one checkpoint save (about 180 GB of weights and Adam
# state) must fit in it; raise the margin for a slow filesystem (sbatch --signal=USR1@600).
# Details: the header of slurm/soft.sbatch.
#SBATCH --job-name=soft-13b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
set -euo pipefail

export SOFT_REPO=${SOFT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
case ${PIPELINE_STAGES:=4} in
  4 | 8) ;;
  *) echo "soft_13b.sh: PIPELINE_STAGES must be 4 or 8 (ds_configs/pp4.json, pp8.json), got '$PIPELINE_STAGES'" >&2
     exit 2 ;;
esac
[[ -f $SOFT_REPO/slurm/soft.sbatch ]] || {
  echo "soft_13b.sh: no slurm/soft.sbatch in $SOFT_REPO: submit from the soft-ds checkout or set SOFT_REPO" >&2
  exit 2
}
SOFT_CONFIG=$SOFT_REPO/ds_configs/pp$PIPELINE_STAGES.json SOFT_BATCH_SCRIPT=$0 \
  exec bash "$SOFT_REPO/slurm/soft.sbatch" "$@"
