#!/usr/bin/env bash
# Turn a fine-tuned CorDA adapter into a plain LoRA for the original base model (rank 2r, exact;
# PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...)).
#
#   RESIDUAL=out/llama2-7b-kpm-nqopen FT=out/llama2-7b-kpm-nqopen-ft/ft LORA=out/llama2-7b-kpm-nqopen-lora scripts/convert.sh
#
# Variables: RESIDUAL (the corda-preprocess output holding corda_init/), FT (the trained
# adapter), LORA (output directory), BIN. With VERIFY=1 and MODEL=<base model>, also compares
# base + LoRA with residual + trained adapter on a probe text. Extra arguments go to
# corda-convert (e.g. --rank 64, --merge --base_model M --merged_path DIR, --overwrite).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BIN:-$("$ROOT/scripts/target-dir.sh")/release}"
RESIDUAL="${RESIDUAL:-out/llama2-7b-kpm-nqopen}"
FT="${FT:-${RESIDUAL%/}-ft/ft}"
LORA="${LORA:-${RESIDUAL%/}-lora}"

VERIFY_ARGS=()
if [[ "${VERIFY:-0}" == 1 ]]; then
  : "${MODEL:?VERIFY=1 needs MODEL=<the original base model>}"
  VERIFY_ARGS=(--verify --base_model "$MODEL" --residual_model "$RESIDUAL")
fi

exec "$BIN/corda-convert" \
  --initial_adapter "$RESIDUAL/corda_init" \
  --trained_adapter "$FT" \
  --output_dir "$LORA" \
  ${VERIFY_ARGS[@]+"${VERIFY_ARGS[@]}"} \
  "$@"
