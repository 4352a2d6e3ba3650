#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install llmc_tpu into it.
#
#   tools/setup_env.sh              # .venv with torch (CPU wheel 2.13.0 where available), llmc_tpu[dev,onnx]
#   tools/setup_env.sh --tpu-mlir   # also build TPU-MLIR's own environment (tools/install_tpu_mlir.sh)
#
# Set LLMC_VENV to put the venv elsewhere, TORCH_SPEC to choose another torch (e.g. "torch==2.5.1").
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${LLMC_VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
WITH_TPU_MLIR=0
for arg in "$@"; do
  case "$arg" in
    --tpu-mlir) WITH_TPU_MLIR=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown option: $arg (see --help)" >&2; exit 2 ;;
  esac
done

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
# torch first, pinned: an unpinned torch requirement would pull a CUDA build of several GB
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "$TORCH_SPEC"
fi
"$PY" -m pip install -q -e '.[dev,onnx]'
echo "llmc_tpu installed in $VENV ($("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"

if [ "$WITH_TPU_MLIR" = 1 ]; then
  bash tools/install_tpu_mlir.sh
fi
