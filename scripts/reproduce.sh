#!/usr/bin/env bash
# Reproduce the seed's knowledge-preserved comparison (CorDA paper, NeurIPS 2024): LoRA, PiSSA and
# CorDA KPM (covariances of NQ-open questions) fine-tuned on MetaMathQA with the same trainer
# flags, then evaluated on NQ-open (exact match: knowledge kept), GSM8K and MATH (accuracy: task
# learned). One folder ends up with every stage and the comparison table (Markdown + JSON) and chart.
#
#   scripts/reproduce.sh --demo                   # the demo model + tests/data, seconds on a CPU
#   MODEL=meta-llama/Llama-2-7b-hf DEVICE=cuda OUT=out/repro scripts/reproduce.sh
#                                                 # the paper's experiment (hours on one GPU)
#
# Stages (each skipped when it already finished with the same settings, so a rerun resumes;
# an interrupted fine-tune continues from its last checkpoint):
#   0. cargo build --release (--features cuda when DEVICE is cuda*), unless SKIP_BUILD=1
#   1. corda-preprocess  CorDA KPM on CALIB ($OUT/corda) and PiSSA ($OUT/pissa), rank R, alpha ALPHA
#   2. corda-finetune    each method on TRAIN_DATA ($OUT/ft-<method>, adapter in ft-<method>/ft);
#                        plain LoRA is --corda_mode False --lora_r R on MODEL itself
#   3. corda-convert     (CONVERT=1) CorDA and PiSSA as plain LoRAs of MODEL ($OUT/lora-<method>),
#                        checked on a probe text; these are then what is evaluated, on MODEL
#   4. corda-eval        every method on QA_DATA, GSM8K_DATA and MATH_DATA ($OUT/results/<task>-<method>.json);
#                        the last run joins the others: results/comparison.{json,svg,md}
#
# Variables (default; --demo or DEMO=1 sets the demo's):
#   OUT (out/reproduce; demo: reproduce-demo/ in the checkout)   MODEL (meta-llama/Llama-2-7b-hf;
#     demo: a random model written by corda-demo)   METHODS ("lora pissa corda"; add base for a
#     row of the pre-trained model itself, the forgetting's baseline)
#   CALIB (nqopen; demo: tests/data/knowledge.jsonl)   CALIB_SAMPLES (256; demo 64)
#   TRAIN_DATA (meta-math/MetaMathQA; demo: tests/data/math.jsonl)   TRAIN_SPLIT (train[:100000])
#   TRAIN_FIELDS ("query response")   R (128; demo 8)   ALPHA (= R; plain LoRA always has alpha = r)
#   STEPS (empty: one epoch; demo 8)   BATCH (1; demo 4)   GRAD_ACCUM (32; demo 1)   LR (2e-5; demo 5e-3)
#   SEED (42)   QA_DATA (nqopen)   GSM8K_DATA (gsm8k)   MATH_DATA (math, i.e. MATH-500)
#   QA_FIELDS / MATH_FIELDS ("question answer" columns of a QA / math file; empty for built-ins)
#   LIMIT (empty: every question; demo 6), or QA_LIMIT / GSM8K_LIMIT / MATH_LIMIT per task
#   QA_FEWSHOT (0: the seed ran lm-evaluation-harness' nq_open without --num_fewshot)
#   MAX_NEW_TOKENS (the task's default: 32 for QA, 512 for math; demo 24)   EVAL_BATCH (8)
#   DEVICE (cpu; cuda or cuda:N)   DTYPE (bf16 on cuda, else f32: weights in eval, --bf16 in training)
#   CONVERT (0)   SKIP_BUILD (unset)   BIN (cargo's target directory/release; CARGO_TARGET_DIR is honoured)
# Logs of every stage are in $OUT/logs/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BIN:-$("$ROOT/scripts/target-dir.sh")/release}"
[[ -t 1 ]] || export NO_COLOR=1

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() {
  echo "error: $*" >&2
  exit 1
}
DEMO="${DEMO:-0}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --demo) DEMO=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown argument \`$1\`; settings are environment variables (scripts/reproduce.sh --help)" ;;
  esac
  shift
done
[[ $DEMO == 0 || $DEMO == 1 ]] || die "DEMO=$DEMO: use 1 (demo) or 0"

# ---------------------------------------------------------------------------- settings
if [[ $DEMO == 1 ]]; then
  OUT="${OUT:-$ROOT/reproduce-demo}"
  CALIB="${CALIB:-$ROOT/tests/data/knowledge.jsonl}"
  CALIB_SAMPLES="${CALIB_SAMPLES:-64}"
  TRAIN_DATA="${TRAIN_DATA:-$ROOT/tests/data/math.jsonl}"
  TRAIN_SPLIT="${TRAIN_SPLIT:-train}"
  QA_DATA="${QA_DATA:-$ROOT/tests/data/knowledge.jsonl}"
  QA_FIELDS="${QA_FIELDS-question answer}"
  GSM8K_DATA="${GSM8K_DATA:-$ROOT/tests/data/math.jsonl}"
  MATH_DATA="${MATH_DATA:-$ROOT/tests/data/math.jsonl}"
  MATH_FIELDS="${MATH_FIELDS-query answer}"
  R="${R:-8}"
  STEPS="${STEPS-8}"
  BATCH="${BATCH:-4}"
  GRAD_ACCUM="${GRAD_ACCUM:-1}"
  # A random model needs a far larger rate than a pretrained one to move in a few steps.
  LR="${LR:-5e-3}"
  LIMIT="${LIMIT-6}"
  MAX_NEW_TOKENS="${MAX_NEW_TOKENS-24}"
else
  OUT="${OUT:-out/reproduce}"
  MODEL="${MODEL:-meta-llama/Llama-2-7b-hf}"
  CALIB="${CALIB:-nqopen}"
  CALIB_SAMPLES="${CALIB_SAMPLES:-256}"
  TRAIN_DATA="${TRAIN_DATA:-meta-math/MetaMathQA}"
  TRAIN_SPLIT="${TRAIN_SPLIT:-train[:100000]}"
  QA_DATA="${QA_DATA:-nqopen}"
  QA_FIELDS="${QA_FIELDS-}"
  GSM8K_DATA="${GSM8K_DATA:-gsm8k}"
  MATH_DATA="${MATH_DATA:-math}"
  MATH_FIELDS="${MATH_FIELDS-}"
  R="${R:-128}"
  STEPS="${STEPS-}"
  BATCH="${BATCH:-1}"
  GRAD_ACCUM="${GRAD_ACCUM:-32}"
  LR="${LR:-2e-5}"
  LIMIT="${LIMIT-}"
  MAX_NEW_TOKENS="${MAX_NEW_TOKENS-}"
fi
TRAIN_FIELDS="${TRAIN_FIELDS:-query response}"
ALPHA="${ALPHA:-$R}"
SEED="${SEED:-42}"
METHODS="${METHODS:-lora pissa corda}"
QA_LIMIT="${QA_LIMIT-$LIMIT}"
GSM8K_LIMIT="${GSM8K_LIMIT-$LIMIT}"
MATH_LIMIT="${MATH_LIMIT-$LIMIT}"
EVAL_BATCH="${EVAL_BATCH:-8}"
QA_FEWSHOT="${QA_FEWSHOT:-0}"
DEVICE="${DEVICE:-cpu}"
if [[ $DEVICE == cuda* ]]; then DTYPE="${DTYPE:-bf16}"; else DTYPE="${DTYPE:-f32}"; fi
CONVERT="${CONVERT:-0}"

# Check the settings before anything runs.
read -r -a METHOD_LIST <<<"$METHODS"
((${#METHOD_LIST[@]} > 0)) || die "METHODS is empty; use any of: base lora pissa corda"
for m in "${METHOD_LIST[@]}"; do
  case "$m" in base | lora | pissa | corda) ;; *) die "METHODS: unknown method \`$m\`; use any of: base lora pissa corda" ;; esac
done
[[ "$(printf '%s\n' "${METHOD_LIST[@]}" | sort | uniq -d)" == "" ]] || die "METHODS=\"$METHODS\" names a method twice"
[[ $R =~ ^[1-9][0-9]*$ ]] || die "R=$R: the rank must be a positive integer"
if [[ " $METHODS " == *" lora "* && "$ALPHA" != "$R" ]] && ! awk -v a="$ALPHA" -v r="$R" 'BEGIN { exit !(a + 0 == r + 0) }'; then
  die "ALPHA=$ALPHA with plain LoRA: corda-finetune --corda_mode False trains with lora_alpha = r ($R); set ALPHA=$R or leave lora out of METHODS"
fi
[[ -z "$STEPS" || $STEPS =~ ^[1-9][0-9]*$ ]] || die "STEPS=$STEPS: a positive number of optimizer steps, or empty for one epoch"
[[ $QA_FEWSHOT =~ ^[0-9]+$ ]] || die "QA_FEWSHOT=$QA_FEWSHOT: a number of few-shot examples (0 or more)"
for v in QA_LIMIT GSM8K_LIMIT MATH_LIMIT MAX_NEW_TOKENS EVAL_BATCH BATCH GRAD_ACCUM CALIB_SAMPLES; do
  [[ -z "${!v}" || ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v=${!v}: a positive integer, or empty for the default"
done
[[ $CONVERT == 0 || $CONVERT == 1 ]] || die "CONVERT=$CONVERT: use 1 (evaluate converted LoRAs on MODEL) or 0"
case "$DTYPE" in bf16 | f32) ;; *) die "DTYPE=$DTYPE: use bf16 or f32" ;; esac
for f in "$CALIB" "$TRAIN_DATA" "$QA_DATA" "$GSM8K_DATA" "$MATH_DATA"; do
  if [[ ( "$f" == /* || "$f" == ./* || "$f" =~ \.(jsonl|json|parquet|txt)$ ) && ! -e "$f" ]]; then
    die "$f does not exist (give a local file, a built-in name or a hub dataset id)"
  fi
done
read -r -a TRAIN_FIELD_ARGS <<<"$TRAIN_FIELDS"
((${#TRAIN_FIELD_ARGS[@]} == 2)) || die "TRAIN_FIELDS=\"$TRAIN_FIELDS\": two column names, query and response"

LOGS="$OUT/logs"
STAMPS="$OUT/.stamps"
RES="$OUT/results"
step() { printf '\n==> %s\n' "$*"; }

# ---------------------------------------------------------------------------- 0. build
BUILD=(cargo build --release --workspace)
# The CUDA toolkit must be installed for this build (README, "Speed and memory").
if [[ $DEVICE == cuda* ]]; then BUILD=(cargo build --release --features cuda); fi
if [[ -z "${SKIP_BUILD:-}" ]]; then
  step "[0/4] building (${BUILD[*]})"
  (cd "$ROOT" && "${BUILD[@]}")
fi
NEEDED=(corda-preprocess corda-finetune corda-eval)
if [[ $CONVERT == 1 ]]; then NEEDED+=(corda-convert); fi
if [[ $DEMO == 1 ]]; then NEEDED+=(corda-demo); fi
for b in "${NEEDED[@]}"; do
  [[ -x "$BIN/$b" ]] || die "$BIN/$b is missing; run without SKIP_BUILD or build with: ${BUILD[*]}"
done
mkdir -p "$OUT" "$LOGS" "$STAMPS" "$RES"

# Each finished stage leaves a stamp holding its command line and the stamps of its inputs; a
# stage whose stamp matches is skipped, and any change upstream reruns everything downstream.
key_of() { printf '%q ' "$@"; }
stamp_matches() { [[ -f "$STAMPS/$1" && "$(cat "$STAMPS/$1")" == "$2" ]]; }
stamp_write() { printf '%s' "$2" >"$STAMPS/$1"; }
stamp_read() { cat "$STAMPS/$1" 2>/dev/null || true; }
# Run a stage with its output shown and kept in $LOGS/<name>.log; a failure names the log.
run_logged() {
  local name="$1"
  shift
  if ! "$@" 2>&1 | tee "$LOGS/$name.log"; then
    die "stage $name failed; see $LOGS/$name.log"
  fi
}
# stage NAME KEY OUTPUT WHAT CMD...: run CMD as stage NAME (stamp and log NAME) unless it already
# finished with KEY and OUTPUT is there.
stage() {
  local name="$1" key="$2" output="$3" what="$4"
  shift 4
  if stamp_matches "$name" "$key" && [[ -e "$output" ]]; then
    step "$what: done ($output)"
  else
    step "$what ($(basename "$1")) -> $output"
    run_logged "$name" "$@"
    stamp_write "$name" "$key"
  fi
}

# ---------------------------------------------------------------------------- 1. demo model
if [[ $DEMO == 1 && -z "${MODEL:-}" ]]; then
  MODEL="$OUT/model"
  # Same shapes as the quickstart's demo model (initializer_range 0.1 so a random LM head can
  # reach confident logits at all), two layers fewer to stay within seconds.
  DEMO_CMD=("$BIN/corda-demo" --out "$OUT" --overwrite --skip_data --seed 42 --layers 2 --hidden 128
    --intermediate 352 --heads 4 --kv_heads 2 --initializer_range 0.1)
  stage demo "$(key_of "${DEMO_CMD[@]}")" "$MODEL/config.json" "[1/4] demo model" "${DEMO_CMD[@]}"
fi
MODEL="${MODEL:?}"

# ---------------------------------------------------------------------------- 1. preprocess
PREP_COMMON=(--model_id "$MODEL" --r "$R" --lora_alpha "$ALPHA" --device "$DEVICE" --save_model --overwrite --quiet)
for m in "${METHOD_LIST[@]}"; do
  case "$m" in
    corda)
      CMD=("$BIN/corda-preprocess" "${PREP_COMMON[@]}" --seed 233 --save_path "$OUT/corda"
        --calib_dataset "$CALIB" --calib_loader_size "$CALIB_SAMPLES")
      # A local file is sampled by rows and its questions alone are the context (the reference's
      # nqopen template); a registry name brings its own template.
      if [[ -e "$CALIB" ]]; then CMD+=(--calib_sampling rows --calib_template '{question}'); fi
      ;;
    pissa) CMD=("$BIN/corda-preprocess" "${PREP_COMMON[@]}" --init pissa --save_path "$OUT/pissa") ;;
    base | lora) continue ;;
  esac
  stage "preprocess-$m" "$(stamp_read demo)|$(key_of "${CMD[@]}")" "$OUT/$m/corda_init/adapter_config.json" \
    "[1/4] $m preprocessing, r $R" "${CMD[@]}"
done

# ---------------------------------------------------------------------------- 2. fine-tune
TRAIN_ARGS=(--data_path "$TRAIN_DATA" --dataset_split "$TRAIN_SPLIT" --dataset_field "${TRAIN_FIELD_ARGS[@]}"
  --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps "$GRAD_ACCUM"
  --learning_rate "$LR" --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine
  --seed "$SEED" --device "$DEVICE" --report_to none --disable_tqdm true)
if [[ -n "$STEPS" ]]; then
  LOG_EVERY=$((STEPS / 10 > 0 ? STEPS / 10 : 1))
  TRAIN_ARGS+=(--max_steps "$STEPS" --logging_steps "$LOG_EVERY" --save_strategy no)
else
  TRAIN_ARGS+=(--num_train_epochs 1 --logging_steps 1 --save_strategy steps --save_steps 100 --save_total_limit 1)
fi
if [[ $DTYPE == bf16 ]]; then TRAIN_ARGS+=(--bf16 True --tf32 True); fi
for m in "${METHOD_LIST[@]}"; do
  [[ $m != base ]] || continue
  dir="$OUT/ft-$m"
  if [[ $m == lora ]]; then
    CMD=("$BIN/corda-finetune" --model_name_or_path "$MODEL" --corda_mode False --lora_r "$R")
    up="$(stamp_read demo)"
  else
    CMD=("$BIN/corda-finetune" --model_name_or_path "$OUT/$m" --corda_mode True)
    up="$(stamp_read "preprocess-$m")"
  fi
  CMD+=(--output_dir "$dir" "${TRAIN_ARGS[@]}")
  key="$up|$(key_of "${CMD[@]}")"
  if stamp_matches "finetune-$m" "$key" && [[ -f "$dir/ft/adapter_config.json" ]]; then
    step "[2/4] $m fine-tuning: done ($dir/ft)"
    continue
  fi
  # The same run was interrupted after a checkpoint: continue it; otherwise start afresh.
  if stamp_matches "finetune-$m.started" "$key" && compgen -G "$dir/checkpoint-*" >/dev/null; then
    CMD+=(--resume_from_checkpoint true)
    step "[2/4] $m fine-tuning: resuming from the last checkpoint in $dir"
  else
    CMD+=(--overwrite_output_dir true)
    step "[2/4] $m fine-tuning (corda-finetune) -> $dir/ft"
  fi
  stamp_write "finetune-$m.started" "$key"
  run_logged "finetune-$m" "${CMD[@]}"
  stamp_write "finetune-$m" "$key"
done

# ---------------------------------------------------------------------------- 3. convert
# EVAL_MODEL / EVAL_ADAPTER / EVAL_UP: what each method is evaluated as, and the stamp it depends on.
declare -A EVAL_MODEL EVAL_ADAPTER EVAL_UP
for m in "${METHOD_LIST[@]}"; do
  if [[ $m == base ]]; then
    EVAL_MODEL[$m]="$MODEL"
    EVAL_ADAPTER[$m]=""
    EVAL_UP[$m]="$(stamp_read demo)"
  elif [[ $m == lora ]]; then
    EVAL_MODEL[$m]="$MODEL"
    EVAL_ADAPTER[$m]="$OUT/ft-$m/ft"
    EVAL_UP[$m]="$(stamp_read "finetune-$m")"
  elif [[ $CONVERT == 1 ]]; then
    CMD=("$BIN/corda-convert" --initial_adapter "$OUT/$m/corda_init" --trained_adapter "$OUT/ft-$m/ft"
      --output_dir "$OUT/lora-$m" --overwrite --verify --base_model "$MODEL" --residual_model "$OUT/$m"
      --device "$DEVICE")
    key="$(stamp_read "finetune-$m")|$(key_of "${CMD[@]}")"
    stage "convert-$m" "$key" "$OUT/lora-$m/adapter_config.json" \
      "[3/4] $m as a plain LoRA of the base model, verified" "${CMD[@]}"
    EVAL_MODEL[$m]="$MODEL"
    EVAL_ADAPTER[$m]="$OUT/lora-$m"
    EVAL_UP[$m]="$key"
  else
    EVAL_MODEL[$m]="$OUT/$m"
    EVAL_ADAPTER[$m]="$OUT/ft-$m/ft"
    EVAL_UP[$m]="$(stamp_read "finetune-$m")"
  fi
done

# ---------------------------------------------------------------------------- 4. evaluate
TASKS=(nqopen gsm8k math)
declare -A TASK_DATA=([nqopen]="$QA_DATA" [gsm8k]="$GSM8K_DATA" [math]="$MATH_DATA")
declare -A TASK_FIELDS=([nqopen]="$QA_FIELDS" [gsm8k]="$MATH_FIELDS" [math]="$MATH_FIELDS")
declare -A TASK_LIMIT=([nqopen]="$QA_LIMIT" [gsm8k]="$GSM8K_LIMIT" [math]="$MATH_LIMIT")
n_runs=$((${#TASKS[@]} * ${#METHOD_LIST[@]}))
i=0
earlier=()
earlier_keys=""
for t in "${TASKS[@]}"; do
  for m in "${METHOD_LIST[@]}"; do
    i=$((i + 1))
    CMD=("$BIN/corda-eval" --model_name_or_path "${EVAL_MODEL[$m]}")
    if [[ -n "${EVAL_ADAPTER[$m]}" ]]; then CMD+=(--adapter "${EVAL_ADAPTER[$m]}"); fi
    CMD+=(--task "$t" --dataset "${TASK_DATA[$t]}" --batch_size "$EVAL_BATCH" --dtype "$DTYPE" --device "$DEVICE")
    read -r -a fields <<<"${TASK_FIELDS[$t]}"
    if ((${#fields[@]} == 2)); then
      CMD+=(--question_field "${fields[0]}" --answer_field "${fields[1]}")
    elif ((${#fields[@]} != 0)); then
      die "the fields of $t (\"${TASK_FIELDS[$t]}\") must be two column names: question and answer"
    fi
    if [[ $t == nqopen ]]; then CMD+=(--num_fewshot "$QA_FEWSHOT"); fi
    if [[ -n "${TASK_LIMIT[$t]}" ]]; then CMD+=(--limit "${TASK_LIMIT[$t]}"); fi
    if [[ -n "$MAX_NEW_TOKENS" ]]; then CMD+=(--max_new_tokens "$MAX_NEW_TOKENS"); fi
    key="${EVAL_UP[$m]}|"
    if ((i < n_runs)); then
      json="$RES/$t-$m.json"
      CMD+=(--output "$json")
    else
      # The last run joins all the others: one table, one JSON, one chart.
      json="$RES/comparison.json"
      CMD+=(--output "$json")
      for e in "${earlier[@]}"; do CMD+=(--compare_with "$e"); done
      if ((${#METHOD_LIST[@]} > 1)); then CMD+=(--chart "$RES/comparison.svg"); fi
      key+="$earlier_keys|"
    fi
    key+="$(key_of "${CMD[@]}")"
    stage "eval-$t-$m" "$key" "$json" "[4/4] ($i/$n_runs) $m on $t" "${CMD[@]}"
    earlier+=("$json")
    earlier_keys+="$key;"
  done
done

# ---------------------------------------------------------------------------- the table
# One row per method, one column per task, from the joined results (pretty JSON as corda-eval
# writes it: each record's fields are indented six spaces).
records=$(awk '
  /^    \{/ { adapter = ""; task = ""; value = ""; count = "" }
  /^      "adapter": "/ { s = $0; sub(/^      "adapter": "/, "", s); sub(/",?$/, "", s); adapter = s }
  /^      "task": / { s = $0; sub(/^      "task": "/, "", s); sub(/",?$/, "", s); task = s }
  /^      "value": / { s = $0; sub(/^      "value": /, "", s); sub(/,$/, "", s); value = s }
  /^      "count": / { s = $0; sub(/^      "count": /, "", s); sub(/,$/, "", s); count = s }
  /^    \}/ { printf "%s\t%s\t%.2f\t%s\n", adapter, task, 100 * value, count }
' "$RES/comparison.json")
declare -A NAME=([base]="pre-trained" [lora]=LoRA [pissa]=PiSSA [corda]="CorDA (KPM, $(basename "$CALIB"))")
declare -A HEAD=([nqopen]="NQ-open EM (%)" [gsm8k]="GSM8K acc. (%)" [math]="MATH acc. (%)")
{
  echo "# CorDA reproduction: knowledge kept vs task learned"
  echo
  echo "Base model \`$MODEL\`; fine-tuned on \`$TRAIN_DATA\` (\`$TRAIN_SPLIT\`), r $R, alpha $ALPHA, ${STEPS:-one epoch of} ${STEPS:+steps of }batch $BATCH x $GRAD_ACCUM, lr $LR; evaluated with $DTYPE weights on $DEVICE."
  echo
  printf '| method |'
  for t in "${TASKS[@]}"; do printf ' %s |' "${HEAD[$t]}"; done
  printf '\n|---|'
  for t in "${TASKS[@]}"; do printf -- '---:|'; done
  printf '\n'
  for m in "${METHOD_LIST[@]}"; do
    printf '| %s |' "${NAME[$m]}"
    for t in "${TASKS[@]}"; do
      cell=$(awk -F'\t' -v a="${EVAL_ADAPTER[$m]}" -v t="$t" '$1 == a && $2 == t { printf "%s (n = %s)", $3, $4; exit }' <<<"$records")
      [[ -n "$cell" ]] || die "$RES/comparison.json has no $t score for $m (${EVAL_ADAPTER[$m]})"
      printf ' %s |' "$cell"
    done
    printf '\n'
  done
  echo
  echo "Data: NQ-open \`$QA_DATA\` ($QA_FEWSHOT-shot${QA_LIMIT:+, first $QA_LIMIT}), GSM8K \`$GSM8K_DATA\`${GSM8K_LIMIT:+ (first $GSM8K_LIMIT)}, MATH \`$MATH_DATA\`${MATH_LIMIT:+ (first $MATH_LIMIT)}."
  if ((${#METHOD_LIST[@]} > 1)); then echo "Chart: comparison.svg. Every question's generation: comparison.json."; fi
} >"$RES/comparison.md"

step "reproduction done"
cat "$RES/comparison.md"
cat <<EOF

  table     $RES/comparison.md
  results   $RES/comparison.json (and one JSON per task and method beside it)
EOF
if ((${#METHOD_LIST[@]} > 1)); then echo "  chart     $RES/comparison.svg"; fi
echo "  logs      $LOGS/"
