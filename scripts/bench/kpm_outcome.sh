#!/usr/bin/env bash
# KPM outcome benchmark on a real model: does the knowledge-preserved mode keep what the model
# knows while it learns a task, against plain LoRA of the same rank, data and schedule?
#
#   scripts/bench/setup_reference.sh        # once: torch, transformers, peft, gguf (.venv)
#   scripts/bench/kpm_outcome.sh            # ~20 min on a quiet 2-core machine; table in $OUT/results.md
#
# Model: SmolLM2-135M-Instruct (../shared/models, GGUF Q4_1 dequantized to float32). Data: the
# project's own tests/data: 80 knowledge questions with answer aliases (the first 40 calibrate
# KPM, the last 40 are held out for evaluation) and 240 math word problems with worked answers
# (the first 160 train, the last 40 evaluate). For each learning rate in $LRS: corda-finetune of
# the KPM adapter (--corda_mode True) and of a plain LoRA (--corda_mode False), r 16, alpha = r,
# $EPOCHS epochs, batch 4, cosine with 3% warmup. Evaluation (scripts/bench/kpm_eval.py, greedy
# generation with transformers + PEFT): knowledge exact match on the held-out questions, math
# accuracy on the held-out problems, for the base model, residual + corda_init (must equal the
# base), and every fine-tuned model.
#
# Environment: OUT (scripts/bench/out-kpm), PY (scripts/bench/.venv/bin/python), GGUF, LRS
# ("2e-5 5e-4"), EPOCHS (1), THREADS (2), SKIP_BUILD=1.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/scripts/bench"
OUT="${OUT:-$HERE/out-kpm}"
PY="${PY:-$HERE/.venv/bin/python}"
GGUF="${GGUF:-$ROOT/../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"
LRS="${LRS:-2e-5 5e-4}"
EPOCHS="${EPOCHS:-1}"
THREADS="${THREADS:-2}"
R=16
BIN="${BIN:-$("$ROOT/scripts/target-dir.sh")/release}"
export RAYON_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS" TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/log.txt" >&2; }

mkdir -p "$OUT/data"
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -p corda-preprocess -p corda-finetune --manifest-path "$ROOT/Cargo.toml"
D="$OUT/data"
head -n 40 "$ROOT/tests/data/knowledge.jsonl" >"$D/calib.jsonl"
tail -n 40 "$ROOT/tests/data/knowledge.jsonl" >"$D/knowledge-eval.jsonl"
head -n 160 "$ROOT/tests/data/math.jsonl" >"$D/math-train.jsonl"
tail -n 40 "$ROOT/tests/data/math.jsonl" >"$D/math-eval.jsonl"
{ echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"; date -u; } >"$OUT/machine.txt"

if [ ! -f "$OUT/base/model.safetensors" ]; then
  log "base model: $GGUF -> $OUT/base (float32)"
  "$PY" "$(dirname "$GGUF")/gguf2hf.py" "$GGUF" "$OUT/base" float32 >/dev/null
fi
log "KPM preprocess on 40 knowledge questions, r $R"
"$BIN/corda-preprocess" --model_id "$OUT/base" --r $R --calib_dataset "$D/calib.jsonl" \
  --calib_template "{question}" --calib_loader_size 40 --calib_max_length 128 \
  --save_model --save_path "$OUT/kpm" --overwrite --quiet 2>"$OUT/preprocess.log"

ft() { # name model corda_mode lr [extra...]
  local name=$1 model=$2 mode=$3 lr=$4
  shift 4
  log "fine-tune $name (lr $lr)"
  rm -rf "${OUT:?}/$name"
  "$BIN/corda-finetune" --model_name_or_path "$model" --corda_mode "$mode" "$@" \
    --data_path "$D/math-train.jsonl" --dataset_split train --dataset_field query response \
    --output_dir "$OUT/$name" --num_train_epochs "$EPOCHS" --per_device_train_batch_size 4 \
    --learning_rate "$lr" --lr_scheduler_type cosine --warmup_ratio 0.03 --weight_decay 0 \
    --save_strategy no --logging_steps 10 --seed 42 --disable_tqdm True \
    >"$OUT/$name.log" 2>&1 || { tail -5 "$OUT/$name.log" >&2; exit 1; }
}
MODELS=(--model "base=$OUT/base" --model "kpm-init=$OUT/kpm:$OUT/kpm/corda_init")
for lr in $LRS; do
  ft "kpm-lr$lr" "$OUT/kpm" True "$lr"
  ft "lora-lr$lr" "$OUT/base" False "$lr" --lora_r $R
  MODELS+=(--model "kpm-lr$lr=$OUT/kpm:$OUT/kpm-lr$lr/ft" --model "lora-lr$lr=$OUT/base:$OUT/lora-lr$lr/ft")
done
log "evaluate"
"$PY" "$HERE/kpm_eval.py" --tokenizer "$OUT/base" --knowledge "$D/knowledge-eval.jsonl" \
  --math "$D/math-eval.jsonl" --threads "$THREADS" "${MODELS[@]}" >"$OUT/results.json"
"$PY" - "$OUT/results.json" "$OUT/machine.txt" <<'PY' | tee "$OUT/results.md"
import json, sys
r = json.load(open(sys.argv[1]))
print(open(sys.argv[2]).read().strip().replace("\n", "; "))
print()
print("| model | knowledge EM (40 held-out) | math accuracy (40 held-out) |")
print("| --- | --- | --- |")
for name, v in r.items():
    print(f"| {name} | {v['knowledge_em']:.3f} | {v['math_acc']:.3f} |")
PY
