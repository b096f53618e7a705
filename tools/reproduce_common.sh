# What tools/reproduce_small.sh and tools/reproduce_real.sh share (sourced, not run): set up, then
# train NAME [options...] runs one training through DeepSpeed's launcher and exports it.
# Expects OUT, CONFIG and EXTRA (train.py options every run gets, after the script's own).
PYTHON=${PYTHON:-python3}
soft-ds() { "$PYTHON" -m soft_ds.cli "$@"; }  # the soft-ds command of the Python that setup.sh installs into
bash tools/setup.sh
mkdir -p "$OUT"
# One process per run uses both cores best on a small CPU; DeepSpeed's launcher still runs it.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
port=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
start=$(date +%s)

minutes() { echo "$(( ($(date +%s) - $1 + 30) / 60 )) min"; }

train() {  # train NAME [train.py options...]: train, then export the full model to $OUT/hf/NAME
  local name=$1; shift
  if [ -f "$OUT/hf/$name/config.json" ]; then echo "== $name: done already ($OUT/hf/$name)"; return; fi
  echo "== $name: training ($(date +%H:%M:%S))"
  local begun resume=()
  begun=$(date +%s)
  [ -f "$OUT/$name/checkpoints/latest" ] && resume=(--resume)
  deepspeed --num_gpus 1 --master_port "$port" soft_ds/train.py --ds-config "$CONFIG" \
    --output-dir "$OUT/$name" "${resume[@]}" "$@" "${EXTRA[@]}"
  soft-ds export --run "$OUT/$name" --out "$OUT/hf/$name" --overwrite
  echo "== $name: trained and exported in $(minutes "$begun")"
}
