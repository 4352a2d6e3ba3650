#!/usr/bin/env bash
# Build TPU-MLIR 1.30.2's own environment (a Python 3.10 venv) in a cache folder outside the repo.
#
#   tools/install_tpu_mlir.sh            # installs into $LLMC_TPU_MLIR_HOME or ~/.cache/llmc_tpu/tpu-mlir-1.30.2
#   tools/install_tpu_mlir.sh --check    # exit 0 when a working install is already there
#
# Idempotent: a finished install (marked by .complete) is only smoke-tested again. A fresh one
# takes about 2-4 minutes and 7 GB (most of it the CUDA build of torch that llm_convert.py imports).
# Why not `pip install tpu-mlir`: the wheel needs Python 3.10, has undeclared dependencies
# (psutil, setuptools<81, GNU parallel, torch for llm_convert.py) and bundles glibc pieces that
# break every tool on a newer system (GLIBC_2.36 not found). See docs/tpu_mlir.md.
# The llmc-tpu `verify` stage finds the result through the same LLMC_TPU_MLIR_HOME rule.
set -euo pipefail

TPU_MLIR_VERSION=1.30.2
TORCH_VERSION=2.5.1
HOME_DIR="${LLMC_TPU_MLIR_HOME:-$HOME/.cache/llmc_tpu/tpu-mlir-$TPU_MLIR_VERSION}"
VENV="$HOME_DIR/venv"
STAMP="$HOME_DIR/.complete"

# The tools must start: importing tpu_mlir sets their PATH/LD_LIBRARY_PATH, and a bundled glibc
# left in place makes tpuc-opt and model_tool die at once.
smoke_test() {
  PATH="$1/bin:$PATH" "$1/bin/python" - <<'EOF'
import subprocess
import tpu_mlir  # noqa: F401  (sets up the tools' environment)
import torch  # noqa: F401  (llm_convert.py needs it)
for tool in (["tpuc-opt", "--version"], ["model_tool", "--version"]):
    subprocess.run(tool, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
EOF
}

installed() {
  [ -f "$STAMP" ] && smoke_test "$VENV" >/dev/null 2>&1
}

have_parallel() {
  command -v parallel >/dev/null 2>&1
}

if [ "${1:-}" = "--check" ]; then
  installed && have_parallel && { echo "TPU-MLIR $TPU_MLIR_VERSION ready in $HOME_DIR"; exit 0; }
  echo "TPU-MLIR $TPU_MLIR_VERSION not installed in $HOME_DIR (or GNU parallel missing)" >&2; exit 1
fi

if ! have_parallel; then
  echo "installing GNU parallel (llm_convert.py runs its model_deploy jobs through it)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq parallel >/dev/null
fi

if installed; then
  echo "TPU-MLIR $TPU_MLIR_VERSION already installed in $HOME_DIR"; exit 0
fi

find_python310() {
  for cand in "${PYTHON310:-}" python3.10 "$HOME/.pyenv/versions/"3.10*/bin/python3.10 /usr/bin/python3.10; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  return 1
}
PY310=$(find_python310) || { echo "error: TPU-MLIR needs Python 3.10 (set PYTHON310=/path/to/python3.10)" >&2; exit 1; }

# Build under a temporary name, so an interrupted install never looks finished.
PARTIAL="$HOME_DIR.partial"
rm -rf "$PARTIAL"
mkdir -p "$PARTIAL"
echo "creating venv with $PY310 in $PARTIAL"
"$PY310" -m venv "$PARTIAL/venv"
PIP="$PARTIAL/venv/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q "tpu-mlir==$TPU_MLIR_VERSION" psutil "setuptools<81" \
  onnx==1.14.1 onnxruntime==1.16.3 onnxsim==0.4.17
# llm_convert.py imports torch; PyPI has only CUDA builds for cp310 (they run on the CPU).
$PIP install -q "torch==$TORCH_VERSION"

# The wheel ships Ubuntu's libc/libm/libpthread and puts them first on LD_LIBRARY_PATH.
THIRD=$("$PARTIAL/venv/bin/python" -c 'import tpu_mlir, os; print(os.path.join(os.path.dirname(tpu_mlir.__file__), "lib", "third_party"))')
mkdir -p "$THIRD/glibc_moved_aside"
for lib in libc.so.6 libm.so.6 libpthread.so.0; do
  if [ -e "$THIRD/$lib" ]; then mv "$THIRD/$lib" "$THIRD/glibc_moved_aside/"; fi
done

rm -rf "$HOME_DIR"
mv "$PARTIAL" "$HOME_DIR"
# the venv's scripts hold absolute paths: fix them after the rename
grep -rlF "$PARTIAL" "$VENV/bin" 2>/dev/null | xargs -r sed -i "s#$PARTIAL#$HOME_DIR#g"
smoke_test "$VENV"
date -u +%FT%TZ > "$STAMP"
echo "TPU-MLIR $TPU_MLIR_VERSION installed in $HOME_DIR"
