#!/usr/bin/env bash
# Run a user's day for one config: check the config, quantize, and (with --verify) compile
# the result with TPU-MLIR and compare its codes with ours.
#
#   ./run_llmc.sh configs/LLM/demo_awq.yml --overwrite --verify
#
# Options: --overwrite (replace save.save_path), --verify (needs tools/install_tpu_mlir.sh), -q.
# Uses .venv/bin/python when present (tools/setup_env.sh), else python3.
set -euo pipefail
cd "$(dirname "$0")"

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,9p' "$0"; exit 0
fi
CONFIG="$1"; shift
OVERWRITE=(); VERIFY=0; QUIET=()
for arg in "$@"; do
  case "$arg" in
    --overwrite) OVERWRITE=(--overwrite) ;;
    --verify) VERIFY=1 ;;
    -q|--quiet) QUIET=(-q) ;;
    *) echo "unknown option: $arg (see --help)" >&2; exit 2 ;;
  esac
done
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python

echo "== 1/3 config: $CONFIG"
"$PY" -m llmc_tpu check-config "$CONFIG" > /dev/null
echo "== 2/3 quantize"
"$PY" -m llmc_tpu "${QUIET[@]}" quantize --config "$CONFIG" "${OVERWRITE[@]}"
if [ "$VERIFY" = 1 ]; then
  SAVE=$("$PY" -c 'import sys; from llmc_tpu.config import load_config; print(load_config(sys.argv[1]).save.save_path)' "$CONFIG")
  echo "== 3/3 verify $SAVE with TPU-MLIR"
  "$PY" -m llmc_tpu verify "$SAVE"
else
  echo "== 3/3 verify skipped (add --verify)"
fi
