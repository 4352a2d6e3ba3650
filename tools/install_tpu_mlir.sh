#!/usr/bin/env bash
# Build TPU-MLIR 1.30.2's own environment (a Python 3.10 venv) in a cache folder outside the repo.
#
#   tools/install_tpu_mlir.sh            # installs into $LLMC_TPU_MLIR_HOME or ~/.cache/llmc_tpu/tpu-mlir-1.30.2
#   tools/install_tpu_mlir.sh --check    # exit 0 when a working install is already there
#
# Why not `pip install tpu-mlir`: the wheel needs Python 3.10, has undeclared dependencies
# (psutil, setuptools<81, GNU parallel, torch for llm_convert.py) and bundles glibc pieces that
# break every tool on a newer system (GLIBC_2.36 not found). See docs/tpu_mlir.md.
# The llmc-tpu `verify` stage finds the result through the same LLMC_TPU_MLIR_HOME rule.
set -euo pipefail

TPU_MLIR_VERSION=1.30.2
HOME_DIR="${LLMC_TPU_MLIR_HOME:-$HOME/.cache/llmc_tpu/tpu-mlir-$TPU_MLIR_VERSION}"
VENV="$HOME_DIR/venv"
STAMP="$HOME_DIR/.complete"

check() {
  [ -f "$STAMP" ] && "$VENV/bin/python" -c "import tpu_mlir" 2>/dev/null \
    && command -v parallel >/dev/null 2>&1
}

if [ "${1:-}" = "--check" ]; then
  check && { echo "TPU-MLIR $TPU_MLIR_VERSION ready in $HOME_DIR"; exit 0; }
  echo "TPU-MLIR $TPU_MLIR_VERSION not installed in $HOME_DIR" >&2; exit 1
fi
if check; then
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

if ! command -v parallel >/dev/null 2>&1; then
  echo "installing GNU parallel (llm_convert.py runs model_deploy jobs through it)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq parallel >/dev/null
fi

rm -rf "$HOME_DIR.partial"
mkdir -p "$HOME_DIR.partial"
echo "creating venv with $PY310"
"$PY310" -m venv "$HOME_DIR.partial/venv"
PIP="$HOME_DIR.partial/venv/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q "tpu-mlir==$TPU_MLIR_VERSION" psutil "setuptools<81" \
  onnx==1.14.1 onnxruntime==1.16.3 onnxsim==0.4.17
# llm_convert.py imports torch; PyPI has only CUDA builds for cp310 (they run on the CPU).
$PIP install -q "torch==2.5.1"

# The wheel ships Ubuntu's libc/libm/libpthread and puts them first on LD_LIBRARY_PATH.
THIRD=$("$HOME_DIR.partial/venv/bin/python" -c 'import tpu_mlir, os; print(os.path.join(os.path.dirname(tpu_mlir.__file__), "lib", "third_party"))')
mkdir -p "$THIRD/glibc_moved_aside"
for lib in libc.so.6 libm.so.6 libpthread.so.0; do
  [ -e "$THIRD/$lib" ] && mv "$THIRD/$lib" "$THIRD/glibc_moved_aside/"
done

rm -rf "$HOME_DIR"
mv "$HOME_DIR.partial" "$HOME_DIR"
# the venv's scripts hold absolute paths: fix them after the rename
grep -rl "$HOME_DIR.partial" "$VENV/bin" 2>/dev/null | xargs -r sed -i "s#$HOME_DIR.partial#$HOME_DIR#g"
date -u +%FT%TZ > "$STAMP"
echo "TPU-MLIR $TPU_MLIR_VERSION installed in $HOME_DIR"
