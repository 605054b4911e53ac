#!/usr/bin/env bash
# Quickstart: from a fresh clone to a converted LoRA, with nothing downloaded.
#
#   scripts/quickstart.sh                                  # demo model + data, everything under demo/
#   OUT=/tmp/corda STEPS=20 scripts/quickstart.sh          # elsewhere, shorter fine-tune
#   MODEL=meta-llama/Llama-2-7b-hf DATA=my-data scripts/quickstart.sh
#                                                          # a real model (directory or cached hub id);
#                                                          # DATA is a directory with qa.jsonl and math.jsonl
#
# Stages:
#   0. cargo build --release --workspace
#   1. corda-demo        a random Llama model ($OUT/model) and datasets ($OUT/data), unless MODEL / DATA
#   2. corda-preprocess  CorDA KPM: covariances of the QA questions, SVD, residual model ($OUT/corda)
#                        and initial adapter ($OUT/corda/corda_init); prints the identity check
#   3. corda-finetune    trains the adapter on the math set ($OUT/ft/ft), loss curve $OUT/ft/loss.svg
#   4. corda-convert     plain LoRA for the original model ($OUT/lora), checked on a probe text
#
# Variables (default):
#   OUT (demo/ in the checkout)   MODEL (the demo model)   DATA (the demo data)
#   CALIB_DATA ($DATA/qa.jsonl; or a registry name such as nqopen)
#   CALIB_TEMPLATE ({question}; empty for a registry name's own)   CALIB_SAMPLES (256)
#   TRAIN_DATA ($DATA/math.jsonl)   TRAIN_FIELDS ("query response")
#   R (8)   STEPS (60)   BATCH (8)   LR (5e-3 on the demo; the recipe's 2e-5 with MODEL)
#   SKIP_BUILD=1 uses the built binaries as they are.
#   BIN (cargo's target directory/release: CARGO_TARGET_DIR is honoured) holds the binaries.
# Logs of every stage go to $OUT/logs/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BIN:-$("$ROOT/scripts/target-dir.sh")/release}"
OUT="${OUT:-$ROOT/demo}"
R="${R:-8}"
STEPS="${STEPS:-60}"
BATCH="${BATCH:-8}"
LOGS="$OUT/logs"
[[ -t 1 ]] || export NO_COLOR=1

step() { printf '\n==> %s\n' "$*"; }
# Run a stage with its output both shown and kept in $LOGS/<name>.log.
run_logged() {
  local name="$1"
  shift
  "$@" 2>&1 | tee "$LOGS/$name.log"
}
# The first line of a log matching a pattern (empty if none).
pick() { grep -m1 -E "$2" "$LOGS/$1.log" | sed -e 's/\x1b\[[0-9;]*m//g' || true; }

if [[ -z "${SKIP_BUILD:-}" ]]; then
  step "[0/4] building (cargo build --release --workspace)"
  (cd "$ROOT" && cargo build --release --workspace)
fi
for b in corda-demo corda-preprocess corda-finetune corda-convert; do
  if [[ ! -x "$BIN/$b" ]]; then
    echo "error: $BIN/$b is missing; run without SKIP_BUILD or build with: cargo build --release --workspace" >&2
    exit 1
  fi
done
mkdir -p "$OUT" "$LOGS"

# ---------------------------------------------------------------------------- 1. demo model and data
DEMO_ARGS=()
if [[ -n "${MODEL:-}" ]]; then DEMO_ARGS+=(--skip_model); fi
if [[ -n "${DATA:-}" ]]; then DEMO_ARGS+=(--skip_data); fi
if [[ ${#DEMO_ARGS[@]} -lt 2 ]]; then
  step "[1/4] writing the demo model and datasets (corda-demo)"
  # initializer_range 0.1 (about 1/sqrt(hidden)) instead of transformers' 0.02: with hidden 128
  # and std 0.02 a random LM head cannot produce logits beyond about 0.02 * 128 = 2.6, so no
  # adapter could make confident predictions and the loss curve would stay flat.
  run_logged demo "$BIN/corda-demo" --out "$OUT" --overwrite --seed 42 --rows 512 \
    --layers 4 --hidden 128 --intermediate 352 --heads 4 --kv_heads 2 --initializer_range 0.1 \
    ${DEMO_ARGS[@]+"${DEMO_ARGS[@]}"}
else
  step "[1/4] using MODEL=$MODEL and DATA=$DATA"
fi
IS_DEMO_MODEL=1
if [[ -n "${MODEL:-}" ]]; then IS_DEMO_MODEL=0; fi
MODEL="${MODEL:-$OUT/model}"
DATA="${DATA:-$OUT/data}"
CALIB_DATA="${CALIB_DATA:-$DATA/qa.jsonl}"
DEFAULT_TEMPLATE='{question}'
CALIB_TEMPLATE="${CALIB_TEMPLATE-$DEFAULT_TEMPLATE}"
TRAIN_DATA="${TRAIN_DATA:-$DATA/math.jsonl}"
TRAIN_FIELDS="${TRAIN_FIELDS:-query response}"
read -r -a FIELD_ARGS <<<"$TRAIN_FIELDS"
# The reference's 256 calibration samples. The demo's random model needs a far larger learning
# rate than a pretrained one to move visibly in a few dozen steps.
CALIB_SAMPLES="${CALIB_SAMPLES:-256}"
if [[ $IS_DEMO_MODEL == 1 ]]; then LR="${LR:-5e-3}"; else LR="${LR:-2e-5}"; fi

# ---------------------------------------------------------------------------- 2. preprocess (KPM)
step "[2/4] CorDA KPM preprocessing (corda-preprocess, r $R, $CALIB_SAMPLES calibration samples of $CALIB_DATA)"
CALIB_ARGS=(--calib_dataset "$CALIB_DATA" --calib_sampling rows --calib_loader_size "$CALIB_SAMPLES" --calib_max_length 256)
if [[ -n "$CALIB_TEMPLATE" ]]; then CALIB_ARGS+=(--calib_template "$CALIB_TEMPLATE"); fi
run_logged preprocess "$BIN/corda-preprocess" --model_id "$MODEL" --r "$R" --seed 233 \
  "${CALIB_ARGS[@]}" --save_model --save_path "$OUT/corda" --overwrite --quiet

# ---------------------------------------------------------------------------- 3. fine-tune
step "[3/4] fine-tuning the adapter (corda-finetune, $STEPS steps of $BATCH examples from $TRAIN_DATA)"
rm -rf "$OUT/ft"
LOG_EVERY=$((STEPS / 10))
if ((LOG_EVERY < 1)); then LOG_EVERY=1; fi
run_logged finetune "$BIN/corda-finetune" --model_name_or_path "$OUT/corda" --output_dir "$OUT/ft" \
  --corda_mode True --data_path "$TRAIN_DATA" --dataset_split train --dataset_field "${FIELD_ARGS[@]}" \
  --max_steps "$STEPS" --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps 1 \
  --learning_rate "$LR" --lr_scheduler_type cosine --warmup_ratio 0.05 --weight_decay 0. \
  --logging_steps "$LOG_EVERY" --save_strategy no --seed 42 --report_to none --disable_tqdm true

# ---------------------------------------------------------------------------- 4. convert
step "[4/4] converting to a plain LoRA for the original model (corda-convert --verify)"
run_logged convert "$BIN/corda-convert" --initial_adapter "$OUT/corda/corda_init" \
  --trained_adapter "$OUT/ft/ft" --output_dir "$OUT/lora" --overwrite \
  --verify --base_model "$MODEL" --residual_model "$OUT/corda"

# ---------------------------------------------------------------------------- summary
losses=$(grep -oE '"loss": *[0-9.eE+-]+' "$OUT/ft/trainer_state.json" | sed -E 's/.*: *//' || true)
first_loss=$(printf '%.3f' "$(head -n1 <<<"$losses")")
last_loss=$(printf '%.3f' "$(tail -n1 <<<"$losses")")
loss_plot=$(ls "$OUT"/ft/loss.* 2>/dev/null | head -n1 || true)

cat <<EOF

==> quickstart done
  base model        $MODEL
  datasets          $CALIB_DATA (calibration), $TRAIN_DATA (fine-tuning)
  residual model    $OUT/corda
  initial adapter   $OUT/corda/corda_init
    $(pick preprocess 'identity check')
  fine-tuned        $OUT/ft/ft   (trainer_state.json and checkpoints in $OUT/ft)
    training loss $first_loss (first log) -> $last_loss (last log) over $STEPS steps; curve: ${loss_plot:-none}
  LoRA for the base $OUT/lora
    $(pick convert '^(converted|compressed)')
    $(pick convert '^verify')
  logs              $LOGS/

Load them in PEFT:
  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("$OUT/corda"), "$OUT/ft/ft")
  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("$MODEL"), "$OUT/lora")
EOF
