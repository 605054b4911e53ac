#!/usr/bin/env bash
# CorDA knowledge-preserved mode (KPM), as in the reference README: calibrate on nq_open
# questions, train the r smallest components, freeze the principal (knowledge) ones.
#
#   MODEL=meta-llama/Llama-2-7b-hf SAVE_PATH=out/llama2-7b-kpm-nqopen scripts/preprocess_kpm_nqopen.sh
#
# Variables: MODEL (hub id in the local cache, or a model directory), SAVE_PATH (output: the
# residual model, with the adapter in SAVE_PATH/corda_init), R (rank), SEED, CALIB (a registry
# name or a local .jsonl/.parquet file), BIN (where the binaries are). Extra arguments go to
# corda-preprocess (e.g. --calib_loader_size 64 --overwrite). Same run: configs/llama2-7b-kpm-nqopen.yaml.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BIN:-$("$ROOT/scripts/target-dir.sh")/release}"
MODEL="${MODEL:-meta-llama/Llama-2-7b-hf}"
SAVE_PATH="${SAVE_PATH:-out/llama2-7b-kpm-nqopen}"
R="${R:-128}"
SEED="${SEED:-233}"
CALIB="${CALIB:-nqopen}"

exec "$BIN/corda-preprocess" \
  --model_id "$MODEL" \
  --r "$R" --seed "$SEED" \
  --save_model --save_path "$SAVE_PATH" \
  --calib_dataset "$CALIB" \
  "$@"
