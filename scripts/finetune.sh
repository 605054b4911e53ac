#!/usr/bin/env bash
# Fine-tune a CorDA adapter with the reference recipe (corda_finetuning.py flags: one epoch of
# 100k MetaMathQA rows, effective batch 32, lr 2e-5 cosine with 3% warmup, bf16 base weights).
#
#   RESIDUAL=out/llama2-7b-kpm-nqopen OUTPUT_DIR=out/llama2-7b-kpm-nqopen-ft scripts/finetune.sh
#
# Variables: RESIDUAL (the corda-preprocess output: residual model + corda_init/), OUTPUT_DIR
# (checkpoints, trainer_state.json, loss curve; final adapter in OUTPUT_DIR/ft), DATA (hub id in
# the local cache or a local file), SPLIT, FIELDS (query and response columns), DEVICE (cuda by
# default, as the recipe is a GPU run; with DEVICE=cpu --tf32 is left out), BIN. Extra
# arguments go to corda-finetune and override the recipe (e.g. --max_steps 10).
# Same run: configs/llama2-7b-finetune-metamath.yaml.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BIN:-$("$ROOT/scripts/target-dir.sh")/release}"
RESIDUAL="${RESIDUAL:-out/llama2-7b-kpm-nqopen}"
OUTPUT_DIR="${OUTPUT_DIR:-${RESIDUAL%/}-ft}"
DATA="${DATA:-meta-math/MetaMathQA}"
SPLIT="${SPLIT:-train[:100000]}"
FIELDS="${FIELDS:-query response}"
read -r -a FIELD_ARGS <<<"$FIELDS"
DEVICE="${DEVICE:-cuda}"
TF32=(--tf32 True)
[[ "$DEVICE" == cpu ]] && TF32=()

exec "$BIN/corda-finetune" \
  --model_name_or_path "$RESIDUAL" \
  --output_dir "$OUTPUT_DIR" \
  --corda_mode True \
  --data_path "$DATA" \
  --dataset_split "$SPLIT" \
  --dataset_field "${FIELD_ARGS[@]}" \
  --num_train_epochs 1 \
  --per_device_train_batch_size 1 \
  --gradient_accumulation_steps 32 \
  --save_strategy steps \
  --save_steps 100 \
  --save_total_limit 1 \
  --learning_rate 2e-5 \
  --weight_decay 0. \
  --warmup_ratio 0.03 \
  --lr_scheduler_type cosine \
  --logging_steps 1 \
  --bf16 True \
  "${TF32[@]}" \
  --device "$DEVICE" \
  --report_to none \
  "$@"
