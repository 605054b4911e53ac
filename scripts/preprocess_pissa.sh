#!/usr/bin/env bash
# The paper's PiSSA baseline (PEFT's init_lora_weights="pissa": the r largest singular components
# of each weight train, the rest is the residual), or MiLoRA (INIT=milora: the r smallest). No
# calibration data: the SVD of the weights alone. Same layout as CorDA, so scripts/finetune.sh and
# scripts/convert.sh take the output unchanged.
#
#   MODEL=meta-llama/Llama-2-7b-hf SAVE_PATH=out/llama2-7b-pissa scripts/preprocess_pissa.sh
#
# Variables: MODEL (hub id in the local cache, or a model directory), SAVE_PATH (output: the
# residual model, with the adapter in SAVE_PATH/corda_init), R (rank), INIT (pissa or milora),
# BIN (where the binaries are). Extra arguments go to corda-preprocess (e.g. --overwrite).
# Same run: configs/llama2-7b-pissa.yaml.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BIN:-$("$ROOT/scripts/target-dir.sh")/release}"
MODEL="${MODEL:-meta-llama/Llama-2-7b-hf}"
INIT="${INIT:-pissa}"
SAVE_PATH="${SAVE_PATH:-out/llama2-7b-$INIT}"
R="${R:-128}"

exec "$BIN/corda-preprocess" \
  --model_id "$MODEL" \
  --r "$R" --init "$INIT" \
  --save_model --save_path "$SAVE_PATH" \
  "$@"
