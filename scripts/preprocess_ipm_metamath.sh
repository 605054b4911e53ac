#!/usr/bin/env bash
# CorDA instruction-previewed mode (IPM), as in the reference README: calibrate on MetaMathQA
# instructions + responses, train the r largest components (--first_eigen).
#
#   MODEL=meta-llama/Llama-2-7b-hf SAVE_PATH=out/llama2-7b-ipm-metamath scripts/preprocess_ipm_metamath.sh
#
# Variables: MODEL, SAVE_PATH, R, SEED, CALIB (registry name or local file), BIN. Extra
# arguments go to corda-preprocess. Same run: configs/llama2-7b-ipm-metamath.yaml.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BIN:-$("$ROOT/scripts/target-dir.sh")/release}"
MODEL="${MODEL:-meta-llama/Llama-2-7b-hf}"
SAVE_PATH="${SAVE_PATH:-out/llama2-7b-ipm-metamath}"
R="${R:-128}"
SEED="${SEED:-233}"
CALIB="${CALIB:-MetaMATH}"

exec "$BIN/corda-preprocess" \
  --model_id "$MODEL" \
  --r "$R" --seed "$SEED" \
  --save_model --save_path "$SAVE_PATH" \
  --first_eigen --calib_dataset "$CALIB" \
  "$@"
