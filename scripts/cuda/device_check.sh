#!/usr/bin/env bash
# The device check: one prepared run on a GPU machine (no Rust toolchain, no registry; Python,
# PyTorch and nvcc there) from the packed binaries (scripts/cuda/package.sh -> dist/cuda),
# within a time budget (default 450 s). Each step has its own timeout, records its exit status,
# time and log, and a failed step does not stop the others. Results: $OUT/device_check.json and
# $OUT/device_check.md (OUT defaults to ./device-check-out), logs in $OUT/steps/.
#
#   1. parity: the fixture model preprocessed on cuda vs cpu (KPM, IPM, KPM with the half
#      covariance): residual weights, s·B·A, covariances; 5 fine-tuning steps cuda vs cpu
#      (float32 and --bf16) losses;
#   2. a 7B-shaped random model (LAYERS layers, hidden 4096, intermediate 11008, 32 heads,
#      bfloat16, made here with torch): preprocess time per layer and peak GPU memory, ours and
#      PEFT's; fine-tuning tokens/s and GPU memory, ours and PyTorch+PEFT's;
#   3. matmul rates (bf16, fp32, tf32) to put the covariance throughput in proportion.
#
# Usage: scripts/cuda/device_check.sh [--device cuda|cpu] [--small] [--bin DIR] [--budget S]
#   --small     a scaled-down model (hidden 256) and fewer samples: a dry run on a CPU
#   --bin DIR   take the binaries from DIR instead of unpacking dist/cuda
# Environment: OUT, PKG (dist/cuda), PY (python3), LAYERS (2), N (calibration samples, 64),
#   SEQ (512), R (128).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/scripts/cuda"
DEVICE=cuda
SMALL=0
BIN=""
BUDGET="${BUDGET:-450}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --small) SMALL=1; shift ;;
    --bin) BIN="$(cd "$2" && pwd)"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    *) echo "device_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$ROOT/device-check-out}"
PKG="${PKG:-$ROOT/dist/cuda}"
PY="${PY:-python3}"
LAYERS="${LAYERS:-2}"
N="${N:-64}"
SEQ="${SEQ:-512}"
R="${R:-128}"
SHAPE=(--hidden 4096 --inter 11008 --heads 32 --vocab 32000)
if [[ $SMALL == 1 ]]; then
  SHAPE=(--hidden 256 --inter 688 --heads 4 --vocab 2000)
  N="${N_SMALL:-8}" SEQ=128 R=16
fi
FIX="$ROOT/tests/fixtures/peft-tiny-llama"
START=$(date +%s)
mkdir -p "$OUT/steps"
rm -f "$OUT"/steps/*
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/corda-device-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
S="$OUT/steps"

# step NAME TIMEOUT [--json] CMD...: run CMD under a timeout clipped to the time left; stdout
# goes to NAME.json with --json (else to NAME.log with stderr); NAME.status records rc and time.
step() {
  local name="$1" limit="$2"; shift 2
  local json=0
  [[ "$1" == --json ]] && { json=1; shift; }
  local left=$((BUDGET - ($(date +%s) - START) - 15))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    printf '{"rc": null, "seconds": 0, "note": "skipped: time budget spent"}\n' >"$S/$name.status"
    echo "device_check: $name skipped (budget)" >&2
    return 0
  fi
  echo "device_check: $name (limit ${limit}s)" >&2
  local t0 rc=0
  t0=$(date +%s%N)
  # bash -c: CMD may be one of the functions below (exported).
  if [[ $json == 1 ]]; then
    timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" >"$S/$name.json" 2>"$S/$name.log" || rc=$?
  else
    timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" >"$S/$name.log" 2>&1 || rc=$?
  fi
  local ms note="" secs
  ms=$((($(date +%s%N) - t0) / 1000000))
  secs="$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"
  ((rc == 124 || rc == 137)) && note="timed out after ${limit}s"
  ((rc != 0)) && [[ -z "$note" ]] && note="failed: $(tail -n 3 "$S/$name.log" | tr '\n"\\' '  /' | cut -c1-300)"
  printf '{"rc": %d, "seconds": %s, "limit": %d, "note": "%s"}\n' "$rc" "$secs" "$limit" "$note" >"$S/$name.status"
  return 0
}
ok() { [[ -f "$S/$1.status" ]] && grep -q '"rc": 0,' "$S/$1.status"; }

# --- environment, binaries, libraries ---
step env 30 --json "$PY" "$HERE/device_check.py" env
if [[ -z "$BIN" ]]; then
  BIN="$WORK/bin"
  step unpack 60 "$PKG/unpack.sh" "$BIN"
fi
# cuBLAS, cuRAND, NVRTC from PyTorch's wheels (nvidia/*/lib) or a toolkit; libcuda from the driver.
LIBS="$("$PY" - <<'EOF' 2>/dev/null || true
import glob, os, site
dirs = []
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib")))
    dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "cu*", "lib")))
    dirs += sorted(glob.glob(os.path.join(sp, "torch", "lib")))
for d in ("/usr/local/cuda/lib64", "/usr/local/cuda/lib"):
    if os.path.isdir(d):
        dirs.append(d)
print(":".join(dict.fromkeys(d for d in dirs if os.path.isdir(d))))
EOF
)"
export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >"$S/ld_library_path.txt"
PRE="$BIN/corda-preprocess"
FT="$BIN/corda-finetune"
export PRE FT FIX WORK
step smoke 30 "$PRE" --version

# PEFT from the carried wheels, in a venv that sees the system's torch.
PYP="$PY"
if ! "$PY" -c "import peft, transformers" 2>/dev/null; then
  step peft_install 120 bash -c "'$PY' -m venv --system-site-packages '$WORK/venv' && '$WORK/venv/bin/python' -m pip install --quiet --no-index --find-links '$PKG/wheels' peft==0.21.2"
  PYP="$WORK/venv/bin/python"
fi

# --- 1. parity on the fixture ---
fixture_pre() { # DEVICE NAME [flags...]
  local dev="$1" name="$2"; shift 2
  "$PRE" --quiet --device "$dev" --model_id "$FIX/base-model" --calib_dataset "$FIX/data/qa.jsonl" \
    --calib_template "{question}" --calib_loader_size 16 --calib_max_length 64 --r 8 --lora_alpha 16 \
    --save_model --save_path "$WORK/$name" --covariance_file "$WORK/$name-cov.safetensors" --overwrite "$@"
}
export -f fixture_pre
for mode in kpm ipm half; do
  flags=()
  [[ $mode == ipm ]] && flags=(--first_eigen)
  [[ $mode == half ]] && flags=(--use_float16_for_covariance)
  step "pre_${mode}_cpu" 60 fixture_pre cpu "${mode}_cpu" "${flags[@]}"
  step "pre_${mode}_$DEVICE" 60 fixture_pre "$DEVICE" "${mode}_$DEVICE" "${flags[@]}"
  if ok "pre_${mode}_cpu" && ok "pre_${mode}_$DEVICE"; then
    step "parity_pre_$mode" 60 --json "$PY" "$HERE/device_check.py" compare-preprocess "$WORK/${mode}_$DEVICE" "$WORK/${mode}_cpu"
  fi
done
fixture_ft() { # DEVICE NAME [flags...]
  local dev="$1" name="$2"; shift 2
  "$FT" --model_name_or_path "$WORK/kpm_cpu" --tokenizer_name_or_path "$FIX/base-model" --corda_mode True \
    --output_dir "$WORK/$name" --overwrite_output_dir --data_path "$FIX/data/math.jsonl" --dataset_split train \
    --dataset_field query response --per_device_train_batch_size 4 --max_steps 5 --logging_steps 1 \
    --save_strategy no --learning_rate 1e-3 --model_max_length 192 --disable_tqdm true --device "$dev" "$@"
}
export -f fixture_ft
if ok pre_kpm_cpu; then
  for prec in f32 bf16; do
    flags=()
    [[ $prec == bf16 ]] && flags=(--bf16 True)
    step "ft_${prec}_cpu" 90 fixture_ft cpu "ft_${prec}_cpu" "${flags[@]}"
    step "ft_${prec}_$DEVICE" 90 fixture_ft "$DEVICE" "ft_${prec}_$DEVICE" "${flags[@]}"
    if ok "ft_${prec}_cpu" && ok "ft_${prec}_$DEVICE"; then
      step "parity_ft_$prec" 30 --json "$PY" "$HERE/device_check.py" compare-losses \
        "$WORK/ft_${prec}_$DEVICE/trainer_state.json" "$WORK/ft_${prec}_cpu/trainer_state.json"
    fi
  done
fi

# --- 3. matmul rates ---
step matmul 60 --json "$PY" "$HERE/device_check.py" matmul --device "$DEVICE" $([[ $SMALL == 1 ]] && echo --n 1024 --tokens 2048)

# --- 2. the 7B-shaped model ---
M="$WORK/m7b"
step make_model 120 --json "$PY" "$HERE/device_check.py" make-model "$M/model" --layers "$LAYERS" "${SHAPE[@]}" \
  --dtype bfloat16
if ok make_model; then
  step make_inputs 60 "$PY" "$ROOT/scripts/bench/make_inputs.py" --model "$M/model" --data "$M/data" \
    --calib_samples "$N" --train_rows 64 --seq "$SEQ"
fi
if ok make_inputs; then
  step ours_pre_7b 200 "$PY" "$HERE/device_check.py" gpu-peak "$S/ours_pre_7b_gpu.json" -- \
    "$PRE" --quiet --device "$DEVICE" --model_id "$M/model" --calib_dataset "$M/data/calib.jsonl" \
    --calib_sampling rows --calib_loader_size "$N" --calib_max_length "$SEQ" --r "$R" \
    --save_model --save_path "$WORK/ours7b" --overwrite --report_json "$S/ours_pre_7b.json"
  rm -rf "$WORK/ours7b"
  step peft_pre_7b 200 "$PYP" "$ROOT/scripts/bench/peft_preprocess.py" --model "$M/model" \
    --calib "$M/data/calib.jsonl" --n "$N" --seq "$SEQ" --r "$R" --device "$DEVICE" --dtype bfloat16 \
    --skip_forward_only --threads "$(nproc)" --out "$S/peft_pre_7b.json"
  step ours_ft_7b 120 "$PY" "$HERE/device_check.py" gpu-peak "$S/ours_ft_7b_gpu.json" -- \
    "$FT" --model_name_or_path "$M/model" --corda_mode false --lora_r "$R" --bf16 True \
    $([[ $DEVICE == cuda ]] && echo --tf32 True) --device "$DEVICE" \
    --data_path "$M/data/train.jsonl" --dataset_split train --dataset_field query response \
    --output_dir "$WORK/ours_ft" --overwrite_output_dir --max_steps 7 --per_device_train_batch_size 4 \
    --model_max_length "$SEQ" --learning_rate 2e-5 --logging_steps 1 --save_strategy no --disable_tqdm true
  # tokens/s as corda-finetune reports it (whole run, including its first steps).
  [[ -f "$S/ours_ft_7b.log" ]] && sed -n 's/.* \([0-9.]*\) tokens\/s.*/{"tokens_per_second": \1}/p' "$S/ours_ft_7b.log" | tail -n1 >"$S/ours_ft_7b.json"
  [[ -s "$S/ours_ft_7b.json" ]] || rm -f "$S/ours_ft_7b.json"
  step peft_ft_7b 150 "$PYP" "$ROOT/scripts/bench/peft_train.py" --model "$M/model" --train "$M/data/train.jsonl" \
    --r "$R" --batch 4 --seq "$SEQ" --warmup 2 --steps 5 --device "$DEVICE" --dtype bfloat16 \
    --threads "$(nproc)" --out "$S/peft_ft_7b.json"
fi

"$PY" "$HERE/device_check.py" summarize "$OUT" >/dev/null || echo "device_check: summarize failed" >&2
echo "device_check: done in $(($(date +%s) - START)) s; $OUT/device_check.md" >&2
