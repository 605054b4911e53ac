#!/usr/bin/env bash
# Benchmark harness: corda-preprocess / corda-finetune against PEFT + PyTorch on this machine.
#
#   scripts/bench/setup_reference.sh      # once: the Python reference environment (.venv)
#   scripts/bench/run.sh                  # everything below, results in scripts/bench/out/results.md
#
# Stages (STAGES, space-separated, default all; they run in the order pre ft gc ftseq bf16 prescale
# real cov mem alloc perf perf1 perf2 big, about 2 hours on the 2-core machine):
#   pre    4 layers, hidden 1024, intermediate 2816, 16 heads, vocab 32000, float32; for each
#          N in $SAMPLES: corda-preprocess and PEFT preprocess_corda + get_peft_model (+ save, as
#          PEFT's example does), N x 256 tokens, r 64, KPM; A, B alternating for $ROUNDS rounds.
#   ft     the same model: corda-finetune (--corda_mode false --lora_r 64: a LoRA of the CorDA
#          adapter's shapes) vs peft_train.py, batch 4 x 256 tokens, all seven projections,
#          $FT_WARMUP + $FT_STEPS steps, A, B alternating for $ROUNDS rounds.
#   gc     gradient checkpointing: corda-finetune without and with --gradient_checkpointing true,
#          and peft_train.py without and with --gradient_checkpointing (transformers' per-layer
#          checkpointing), batch 4 x $GC_SEQ tokens, the same model; peak RSS and s / step.
#   ftseq  fine-tuning tokens/s against the sequence length ($FT_SEQS), both sides, batch 4.
#   bf16   corda-preprocess (16 samples) and corda-finetune with bfloat16 frozen weights against
#          float32: calibration and training speed.
#   prescale  preprocess time per layer: one-layer models of hidden $SCALE_HIDDEN (intermediate
#          and heads as in Llama-family models of that width), $SCALE_N x 256 tokens; and the
#          4-layer model at $SCALE_SAMPLES x 256 tokens; PEFT beside each ($SCALE_PEFT=1).
#   real   the real model: $REAL_GGUF (SmolLM2-135M-Instruct, 30 layers, hidden 576) dequantised to
#          a float32 Hugging Face directory by the gguf2hf.py beside it; the first $REAL_N questions
#          of tests/data/knowledge.jsonl, one sample per row, KPM r 16 alpha 32: corda-preprocess and
#          PEFT, A, B alternating for $ROUNDS rounds (the issue's real-model row).
#   cov    covariance throughput: corda-preprocess with target_modules q_proj (one input site)
#          vs q_proj,o_proj,gate_proj,down_proj (all four sites), with --calib_batch_size 1 (PEFT's)
#          and 4 (rank-1024 instead of rank-256 updates); the calibration phase grows by
#          the covariance work of the o, gate/up and down inputs (tokens x (2*1024^2 + 2816^2)
#          useful FLOP per layer for one triangle), the forward pass is the same in both.
#   big    7B-shaped stack (hidden 4096, intermediate 11008, 32 heads, vocab 32000), 1, 2, 4
#          layers ($BIG_LAYERS), $BIG_SAMPLES x 256 tokens: corda-preprocess peak RSS vs layers.
#   mem    one corda-preprocess run per N under rss_trace.sh: RSS split into heap (RssAnon) and
#          mapped files (RssFile: the mmapped safetensors) over time.
#   alloc  corda-finetune and peft_train.py under rss_trace.sh, and
#          corda-finetune with glibc malloc tunables that keep freed memory (no per-op page faults).
#   perf1  the machine's matmul peak (peak_matmul.py), and perf of
#          corda-preprocess on one thread: samples form one time line, so perf_phases.py splits
#          the calibration phase into forward and covariance.
#   perf2  the same split on two threads, --calib_batch_size 1 and 4.
#   perf   perf record (cpu-clock, dwarf call graphs) of one reduced corda-preprocess run and a
#          few corda-finetune steps (profiles behind docs/benchmarks.md).
#
# Each benchmark waits for a quiet machine first: no cargo/rustc process and under $QUIET_PCT %
# CPU busy over 3 s (other builds share the 2 cores), polling every 30 s, for at most $WAIT_MAX s.
# Peak memory is /usr/bin/time's "Maximum resident set size" of the whole process, for both sides.
# Environment knobs: OUT, ROUNDS (3), SAMPLES ("16 64"), FT_WARMUP (2), FT_STEPS (5),
# BIG_LAYERS ("1 2 4"), BIG_SAMPLES (8), THREADS (2), STAGES, SKIP_BUILD=1, PY (the venv python),
# M1_SHAPE ("4 1024 2816 16": layers hidden intermediate heads), QUIET_PCT (15), WAIT_MAX (3600),
# REUSE_BIN=1 (keep OUT/bin from an earlier run: add stages with the same binaries),
# GC_SEQ (512: stage gc, gradient checkpointing on and off), FT_SEQS ("128 256 512 1024": stage
# ftseq, tokens/s against the sequence length), SCALE_HIDDEN, SCALE_N, SCALE_SAMPLES, SCALE_PEFT
# (stage prescale), REAL_GGUF, REAL_N (64) (stage real).
# Smoke test: OUT=/tmp/bsmoke M1_SHAPE="2 128 352 4" SAMPLES=4 ROUNDS=1 STAGES="pre ft cov perf" \
#   QUIET_PCT=101 WAIT_MAX=0 SKIP_BUILD=1 scripts/bench/run.sh
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HERE="$ROOT/scripts/bench"
OUT="${OUT:-$HERE/out}"
ROUNDS="${ROUNDS:-3}"
SAMPLES="${SAMPLES:-16 64}"
SEQ=256
R=64
FT_WARMUP="${FT_WARMUP:-2}"
FT_STEPS="${FT_STEPS:-5}"
BIG_LAYERS="${BIG_LAYERS:-1 2 4}"
BIG_SAMPLES="${BIG_SAMPLES:-8}"
GC_SEQ="${GC_SEQ:-512}"
FT_SEQS="${FT_SEQS:-128 256 512 1024}"
LONG_SEQ=1024
SCALE_HIDDEN="${SCALE_HIDDEN:-576 1024 2048 4096}"
SCALE_N="${SCALE_N:-16}"
SCALE_SAMPLES="${SCALE_SAMPLES:-4 16 64}"
SCALE_PEFT="${SCALE_PEFT:-1}"
REAL_GGUF="${REAL_GGUF:-$ROOT/../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"
REAL_N="${REAL_N:-64}"
THREADS="${THREADS:-2}"
STAGES="${STAGES:-pre ft gc ftseq bf16 prescale real cov mem alloc perf perf1 perf2 big}"
QUIET_PCT="${QUIET_PCT:-15}"
WAIT_MAX="${WAIT_MAX:-3600}"
PY="${PY:-$HERE/.venv/bin/python}"
BIN="$ROOT/target/release"
RUNS="$OUT/runs"
mkdir -p "$RUNS"
export RAYON_NUM_THREADS="$THREADS" OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# The CPU this run is measured on, one line: model name, family/model, the vector flags that
# decide which matmul kernels run (AVX2/FMA, AVX-512, BF16, AMX). Stored beside every run.
cpu_id() {
  local name fam mod flags
  name=$(lscpu | sed -n 's/^Model name:\s*//p' | head -1)
  fam=$(sed -n 's/^cpu family\s*:\s*//p' /proc/cpuinfo | head -1)
  mod=$(sed -n 's/^model\s*:\s*//p' /proc/cpuinfo | head -1)
  flags=$(grep -m1 '^flags' /proc/cpuinfo | grep -o -w -E 'avx2|fma|avx512f|avx512_bf16|avx512_fp16|amx_bf16|amx_tile' | tr '\n' ' ')
  echo "$name; family $fam model $mod; $(nproc) cpus; ${flags% }"
}
CPU_ID="$(cpu_id)"

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/harness.log" >&2; }

# Percent of CPU time busy over 3 s, machine-wide (/proc/stat).
busy_pct() {
  local a b
  a=($(head -1 /proc/stat)); sleep 3; b=($(head -1 /proc/stat))
  local idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) total=0 i
  for i in 1 2 3 4 5 6 7 8; do total=$(( total + b[i] - a[i] )); done
  echo $(( total > 0 ? 100 * (total - idle) / total : 0 ))
}

# Wait until no cargo/rustc runs and the CPUs are idle; record what we found.
wait_quiet() {
  local waited=0 pct
  while :; do
    pct=$(busy_pct)
    if ! pgrep -x 'cargo|rustc' >/dev/null && [ "$pct" -lt "$QUIET_PCT" ]; then
      QUIET_NOTE="quiet (${pct}% busy before start)"
      return 0
    fi
    if [ "$waited" -ge "$WAIT_MAX" ]; then
      QUIET_NOTE="NOT quiet after ${WAIT_MAX}s (${pct}% busy before start)"
      log "warning: $QUIET_NOTE; running anyway"
      return 0
    fi
    sleep 30; waited=$((waited + 33))
  done
}

# run NAME CMD...: waits for quiet, runs under /usr/bin/time -v, keeps stdout/stderr/time. A
# monitor marks the run as disturbed (RUNS/NAME.disturbed) when cargo/rustc start during it;
# summarize.py leaves disturbed runs out when clean ones exist.
run() {
  local name="$1"; shift
  wait_quiet
  log "run $name ($QUIET_NOTE)"
  echo "$QUIET_NOTE" > "$RUNS/$name.quiet"
  echo "$CPU_ID" > "$RUNS/$name.cpu"
  rm -f "$RUNS/$name.disturbed"
  ( while sleep 2; do pgrep -xa 'cargo|rustc' | cut -c1-160 >> "$RUNS/$name.disturbed" || true
      [ -s "$RUNS/$name.disturbed" ] || rm -f "$RUNS/$name.disturbed"; done ) &
  local mon=$!
  if [ -n "${TRACE_RSS:-}" ]; then
    /usr/bin/time -v -o "$RUNS/$name.time" "$HERE/rss_trace.sh" "$RUNS/$name.rss.tsv" -- "$@" > "$RUNS/$name.out" 2> "$RUNS/$name.err"
  else
    /usr/bin/time -v -o "$RUNS/$name.time" "$@" > "$RUNS/$name.out" 2> "$RUNS/$name.err"
  fi
  local rc=$?
  kill "$mon" 2>/dev/null; wait "$mon" 2>/dev/null
  [ $rc -eq 0 ] || log "  $name failed (exit $rc); see $RUNS/$name.err"
  [ -s "$RUNS/$name.disturbed" ] && log "  $name disturbed: cargo/rustc ran during it"
  grep -E "Elapsed|Maximum resident" "$RUNS/$name.time" | sed 's/^\s*/  /' | tee -a "$OUT/harness.log" >&2
  return $rc
}

machine() {
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpu: $(lscpu | sed -n 's/^Model name:\s*//p' | head -1)"
    echo "cores: $(nproc)"
    echo "ram: $(free -g | awk '/^Mem:/{print $2" GiB"}')"
    echo "cpu flags: $(grep -o -w -E 'avx2|fma|avx512f|avx512_bf16|avx512_fp16|amx_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    echo "cpu id (stored with every run as runs/NAME.cpu): $CPU_ID"
    echo "kernel: $(uname -r)"
    echo "rustc: $(rustc --version 2>/dev/null)"
    echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) $(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo '(dirty work tree)')"
    echo "threads: $THREADS (RAYON_NUM_THREADS, torch.set_num_threads)"
    "$PY" -c 'import torch, transformers, peft; print("python reference: torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' 2>/dev/null || echo "python reference: not installed (scripts/bench/setup_reference.sh)"
  } > "$OUT/machine.txt"
  cat "$OUT/machine.txt" >&2
}

has_stage() { [[ " $STAGES " == *" $1 "* ]]; }

# demo_model DIR LAYERS HIDDEN INTERMEDIATE HEADS CALIB_SAMPLES
demo_model() {
  local dir="$1" layers="$2" hidden="$3" inter="$4" heads="$5" ncal="$6"
  if [ ! -f "$dir/.ready" ]; then
    rm -rf "$dir"
    "$BIN/corda-demo" --out "$dir" --layers "$layers" --hidden "$hidden" --intermediate "$inter" \
      --heads "$heads" --kv_heads "$heads" --vocab_size 32000 --dtype float32 --skip_data --overwrite >&2 || return 1
    python3 "$HERE/make_inputs.py" --model "$dir/model" --data "$dir/data" --calib_samples "$ncal" \
      --train_rows 64 --seq "$SEQ" >&2 || return 1
    touch "$dir/.ready"
  fi
}

ours_pre() { # NAME MODELDIR N [extra flags...]
  local name="$1" dir="$2" n="$3"; shift 3
  run "$name" "$BIN/corda-preprocess" --model_id "$dir/model" --calib_dataset "$dir/data/calib.jsonl" \
    --calib_sampling rows --calib_loader_size "$n" --calib_max_length "$SEQ" --r "$R" \
    --save_model --save_path "$OUT/tmp/ours_pre" --overwrite --quiet --report_json "$RUNS/$name.json" "$@"
}

peft_pre() { # NAME MODELDIR N
  local name="$1" dir="$2" n="$3"
  rm -rf "$OUT/tmp/peft_pre"
  run "$name" "$PY" "$HERE/peft_preprocess.py" --model "$dir/model" --calib "$dir/data/calib.jsonl" \
    --n "$n" --seq "$SEQ" --r "$R" --threads "$THREADS" --save_dir "$OUT/tmp/peft_pre" --out "$RUNS/$name.json"
}

ours_ft() { # NAME MODELDIR [SEQ [DATA [extra flags...]]]
  local name="$1" dir="$2" seq="${3:-$SEQ}" data="${4:-$2/data}"; shift 2; shift $(( $# < 2 ? $# : 2 ))
  rm -rf "$OUT/tmp/ours_ft"
  run "$name" "$BIN/corda-finetune" --model_name_or_path "$dir/model" --corda_mode false --lora_r "$R" \
    --data_path "$data/train.jsonl" --dataset_split train --dataset_field query response \
    --output_dir "$OUT/tmp/ours_ft" --max_steps $((FT_WARMUP + FT_STEPS)) --per_device_train_batch_size 4 \
    --model_max_length "$seq" --learning_rate 2e-5 --logging_steps 1 --save_strategy no --disable_tqdm true "$@"
  local rc=$?
  cp "$OUT/tmp/ours_ft/trainer_state.json" "$RUNS/$name.json" 2>/dev/null
  return $rc
}

peft_ft() { # NAME MODELDIR [SEQ [DATA [extra flags...]]]
  local name="$1" dir="$2" seq="${3:-$SEQ}" data="${4:-$2/data}"; shift 2; shift $(( $# < 2 ? $# : 2 ))
  run "$name" "$PY" "$HERE/peft_train.py" --model "$dir/model" --train "$data/train.jsonl" --r "$R" \
    --batch 4 --seq "$seq" --warmup "$FT_WARMUP" --steps "$FT_STEPS" --threads "$THREADS" --out "$RUNS/$name.json" "$@"
}

# Training rows long enough for FT_SEQS (the default data is cut for 256 tokens).
long_data() { # MODELDIR -> prints the data directory
  local dir="$1" d="$1/data_long"
  if [ ! -f "$d/.ready" ]; then
    python3 "$HERE/make_inputs.py" --model "$dir/model" --data "$d" --calib_samples 1 --train_rows 64 \
      --seq "$LONG_SEQ" >&2 && touch "$d/.ready"
  fi
  echo "$d"
}

log "harness start: STAGES='$STAGES' ROUNDS=$ROUNDS SAMPLES='$SAMPLES' BIG_LAYERS='$BIG_LAYERS' OUT=$OUT"
machine
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "cargo build --release --workspace"
  (cd "$ROOT" && cargo build --release --workspace) \
    || log "warning: build failed (work in progress elsewhere?); using the existing binaries in $BIN"
fi
# Freeze the binaries: other sessions' `cargo test --release` relinks target/release/* at any time.
# REUSE_BIN=1 keeps the copies of an earlier run (same binaries for added stages).
mkdir -p "$OUT/bin"
if [ "${REUSE_BIN:-0}" != 1 ] || [ ! -x "$OUT/bin/corda-preprocess" ]; then
  for b in corda-preprocess corda-finetune corda-demo; do cp -p "$BIN/$b" "$OUT/bin/$b" || exit 1; done
fi
BIN="$OUT/bin"
echo "frozen binaries (sha256, mtime): $(cd "$BIN" && for b in corda-preprocess corda-finetune corda-demo; do echo -n "$b $(sha256sum $b | cut -c1-12) $(date -r $b +%FT%T); "; done)" >> "$OUT/machine.txt"
mkdir -p "$OUT/tmp" "$OUT/models"
MAXN=$(echo $SAMPLES | tr ' ' '\n' | sort -n | tail -1)
M1_SHAPE="${M1_SHAPE:-4 1024 2816 16}"   # layers hidden intermediate heads (smoke tests: smaller)
M1="$OUT/models/l4_h1024"

if has_stage pre || has_stage ft || has_stage gc || has_stage ftseq || has_stage prescale || has_stage bf16 || has_stage cov || has_stage mem || has_stage alloc || has_stage perf || has_stage perf1 || has_stage perf2; then
  demo_model "$M1" $M1_SHAPE "$(( MAXN > 64 ? MAXN : 64 ))" || { log "model generation failed"; exit 1; }
fi

if has_stage pre; then
  for n in $SAMPLES; do
    for round in $(seq 1 "$ROUNDS"); do
      ours_pre "pre_ours_n${n}_r${round}" "$M1" "$n"
      peft_pre "pre_peft_n${n}_r${round}" "$M1" "$n"
    done
  done
fi

if has_stage ft; then
  for round in $(seq 1 "$ROUNDS"); do
    ours_ft "ft_ours_r${round}" "$M1"
    peft_ft "ft_peft_r${round}" "$M1"
  done
fi

if has_stage gc; then  # gradient checkpointing at batch 4 x GC_SEQ: with and without, both sides
  data=$(long_data "$M1")
  for round in $(seq 1 "$ROUNDS"); do
    ours_ft "gc_ours_plain_r${round}" "$M1" "$GC_SEQ" "$data"
    ours_ft "gc_ours_ckpt_r${round}" "$M1" "$GC_SEQ" "$data" --gradient_checkpointing true
    peft_ft "gc_peft_plain_r${round}" "$M1" "$GC_SEQ" "$data"
    peft_ft "gc_peft_ckpt_r${round}" "$M1" "$GC_SEQ" "$data" --gradient_checkpointing
  done
fi

if has_stage ftseq; then  # fine-tuning tokens/s against the sequence length, both sides
  data=$(long_data "$M1")
  for s in $FT_SEQS; do
    for round in $(seq 1 "$ROUNDS"); do
      ours_ft "ftseq_ours_s${s}_r${round}" "$M1" "$s" "$data"
      peft_ft "ftseq_peft_s${s}_r${round}" "$M1" "$s" "$data"
    done
  done
fi

if has_stage bf16; then  # bfloat16 frozen weights against float32, each side of ours
  for round in $(seq 1 "$ROUNDS"); do
    ours_pre "bf16pre_f32_r${round}" "$M1" 16
    ours_pre "bf16pre_bf16_r${round}" "$M1" 16 --dtype bfloat16
    ours_ft "bf16ft_f32_r${round}" "$M1"
    ours_ft "bf16ft_bf16_r${round}" "$M1" "$SEQ" "$M1/data" --bf16 true
  done
fi

if has_stage real; then  # the real model, real questions (short rows: one sample per question)
  RD="$OUT/models/real"
  if [ ! -f "$RD/.ready" ]; then
    rm -rf "$RD"; mkdir -p "$RD"
    "$PY" "$(dirname "$REAL_GGUF")/gguf2hf.py" "$REAL_GGUF" "$RD/model" float32 >&2 \
      && head -n "$REAL_N" "$ROOT/tests/data/knowledge.jsonl" > "$RD/questions.jsonl" \
      && touch "$RD/.ready"
  fi
  if [ -f "$RD/.ready" ]; then
    for round in $(seq 1 "$ROUNDS"); do
      run "real_ours_r${round}" "$BIN/corda-preprocess" --model_id "$RD/model" --r 16 --lora_alpha 32 \
        --calib_dataset "$RD/questions.jsonl" --calib_template "{question}" --calib_loader_size "$REAL_N" \
        --calib_max_length 128 --save_model --save_path "$OUT/tmp/ours_real" --overwrite --quiet \
        --report_json "$RUNS/real_ours_r${round}.json"
      rm -rf "$OUT/tmp/peft_real"
      run "real_peft_r${round}" "$PY" "$HERE/peft_preprocess.py" --model "$RD/model" --calib "$RD/questions.jsonl" \
        --text_field question --n "$REAL_N" --seq 128 --rows --r 16 --mode kpm --threads "$THREADS" --save_dir "$OUT/tmp/peft_real" \
        --skip_forward_only --out "$RUNS/real_peft_r${round}.json"
    done
  else
    log "stage real skipped: could not convert $REAL_GGUF (is it there? does $PY have the gguf package? scripts/bench/setup_reference.sh installs it)"
  fi
fi

if has_stage cov; then
  n="$MAXN"
  for round in $(seq 1 "$ROUNDS"); do
    ours_pre "cov_q_n${n}_r${round}" "$M1" "$n" --target_modules q_proj
    ours_pre "cov_all4_n${n}_r${round}" "$M1" "$n" --target_modules q_proj,o_proj,gate_proj,down_proj
    ours_pre "covb4_q_n${n}_r${round}" "$M1" "$n" --target_modules q_proj --calib_batch_size 4
    ours_pre "covb4_all4_n${n}_r${round}" "$M1" "$n" --target_modules q_proj,o_proj,gate_proj,down_proj --calib_batch_size 4
  done
fi

if has_stage mem; then  # where the resident memory is: heap (RssAnon) vs mapped weights (RssFile)
  for n in $SAMPLES; do
    TRACE_RSS=1 ours_pre "mem_ours_n${n}_r1" "$M1" "$n"
  done
fi

if has_stage alloc; then  # fine-tuning memory over time, and glibc malloc keeping freed memory
  for round in $(seq 1 "$ROUNDS"); do
    TRACE_RSS=1 ours_ft "alloc_ours_r${round}" "$M1"
    TRACE_RSS=1 peft_ft "alloc_peft_r${round}" "$M1"
    # Large temporaries (logits, activations) are mmapped and unmapped by glibc on every op, so
    # every step page-faults and zeroes them again; these tunables (no mmap, no trimming) keep
    # freed memory in the heap for reuse.
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184 \
      TRACE_RSS=1 ours_ft "alloc_ourstuned_r${round}" "$M1"
  done
fi

if has_stage perf; then
  if perf record -e cpu-clock -o /dev/null true 2>/dev/null; then
    wait_quiet
    log "perf record corda-preprocess (16 samples) ($QUIET_NOTE)"
    perf record -e cpu-clock -F 499 --call-graph dwarf,16384 -o "$OUT/perf_pre.data" -- \
      "$BIN/corda-preprocess" --model_id "$M1/model" --calib_dataset "$M1/data/calib.jsonl" --calib_sampling rows \
      --calib_loader_size 16 --calib_max_length "$SEQ" --r "$R" --save_model --save_path "$OUT/tmp/ours_pre" \
      --overwrite --quiet > "$RUNS/perf_pre.log" 2>&1
    perf report -i "$OUT/perf_pre.data" --no-children --sort dso,sym --percent-limit 0.5 --stdio -g none 2>/dev/null \
      | grep -v '^$' | head -80 > "$OUT/perf_pre_self.txt"
    perf report -i "$OUT/perf_pre.data" --children --sort sym --percent-limit 3 --stdio -g none 2>/dev/null \
      | grep -v '^$' | head -80 > "$OUT/perf_pre_children.txt"
    wait_quiet
    log "perf record corda-finetune (3 steps) ($QUIET_NOTE)"
    rm -rf "$OUT/tmp/ours_ft"
    perf record -e cpu-clock -F 499 --call-graph dwarf,16384 -o "$OUT/perf_ft.data" -- \
      "$BIN/corda-finetune" --model_name_or_path "$M1/model" --corda_mode false --lora_r "$R" \
      --data_path "$M1/data/train.jsonl" --dataset_split train --dataset_field query response \
      --output_dir "$OUT/tmp/ours_ft" --max_steps 3 --per_device_train_batch_size 4 --model_max_length "$SEQ" \
      --logging_steps 1 --save_strategy no --disable_tqdm true > "$RUNS/perf_ft.log" 2>&1
    perf report -i "$OUT/perf_ft.data" --no-children --sort dso,sym --percent-limit 0.5 --stdio -g none 2>/dev/null \
      | grep -v '^$' | head -80 > "$OUT/perf_ft_self.txt"
    perf report -i "$OUT/perf_ft.data" --children --sort sym --percent-limit 3 --stdio -g none 2>/dev/null \
      | grep -v '^$' | head -80 > "$OUT/perf_ft_children.txt"
    for d in pre ft; do  # callers of the hottest symbols, for the write-up
      perf report -i "$OUT/perf_$d.data" --no-children --sort sym --percent-limit 5 --stdio -g caller,0.5,callee,function,percent 2>/dev/null \
        | grep -v '^$' | head -400 > "$OUT/perf_${d}_graph.txt"
    done
    rm -f "$OUT"/perf_*.data
  else
    log "perf record unavailable; skipping profiles"
  fi
fi

if has_stage perf1; then  # single-threaded profile: every sample keeps its caller chain
  wait_quiet
  log "machine matmul peak (PyTorch/MKL, 1 and 2 threads) ($QUIET_NOTE)"
  "$PY" "$HERE/peak_matmul.py" > "$OUT/peak_matmul.json" 2>/dev/null
  wait_quiet
  log "perf record corda-preprocess, 1 thread ($MAXN samples) ($QUIET_NOTE)"
  RAYON_NUM_THREADS=1 perf record -e cpu-clock -F 199 --call-graph dwarf,16384 -o "$OUT/perf_pre1.data" -- \
    "$BIN/corda-preprocess" --model_id "$M1/model" --calib_dataset "$M1/data/calib.jsonl" --calib_sampling rows \
    --calib_loader_size "$MAXN" --calib_max_length "$SEQ" --r "$R" --save_model --save_path "$OUT/tmp/ours_pre" \
    --overwrite --quiet --report_json "$RUNS/perf1_pre.json" > "$RUNS/perf1_pre.log" 2>&1
  perf report -i "$OUT/perf_pre1.data" --children --sort sym --percent-limit 0.8 --stdio -g none 2>/dev/null \
    | grep -v '^$' | head -150 > "$OUT/perf_pre1_children.txt"
  perf report -i "$OUT/perf_pre1.data" --no-children --sort sym --percent-limit 0.5 --stdio -g none 2>/dev/null \
    | grep -v '^$' | head -60 > "$OUT/perf_pre1_self.txt"
  perf script -F tid,time,ip,sym -i "$OUT/perf_pre1.data" 2>/dev/null | python3 "$HERE/perf_phases.py" > "$OUT/perf_pre1_phases.txt"
  rm -f "$OUT/perf_pre1.data"
fi

if has_stage perf2; then  # two threads: the calibration split for --calib_batch_size 1 and 4
  for b in 1 4; do
    wait_quiet
    log "perf record corda-preprocess, $THREADS threads, batch $b ($MAXN samples) ($QUIET_NOTE)"
    perf record -e cpu-clock -F 499 --call-graph dwarf,16384 -o "$OUT/perf_pre2.data" -- \
      "$BIN/corda-preprocess" --model_id "$M1/model" --calib_dataset "$M1/data/calib.jsonl" --calib_sampling rows \
      --calib_loader_size "$MAXN" --calib_max_length "$SEQ" --r "$R" --save_model --save_path "$OUT/tmp/ours_pre" \
      --overwrite --quiet --calib_batch_size "$b" --report_json "$RUNS/perf2_b$b.json" > "$RUNS/perf2_b$b.log" 2>&1
    perf script -F tid,time,ip,sym -i "$OUT/perf_pre2.data" 2>/dev/null | python3 "$HERE/perf_phases.py" > "$OUT/perf_pre2_b${b}_phases.txt"
    rm -f "$OUT/perf_pre2.data"
  done
fi

if has_stage prescale; then  # preprocess time per layer against hidden size and calibration tokens
  for h in $SCALE_HIDDEN; do
    case $h in  # Llama-like shapes: SmolLM2-135M's, the benchmark model's, 1B-ish, 7B's
      576) inter=1536; heads=9 ;; 1024) inter=2816; heads=16 ;; 2048) inter=5632; heads=32 ;;
      4096) inter=11008; heads=32 ;; *) inter=$(( h * 11 / 4 )); heads=$(( h / 64 )) ;;
    esac
    dir="$OUT/models/scale_h$h"
    demo_model "$dir" 1 "$h" "$inter" "$heads" "$SCALE_N" || { log "scale model h$h failed"; continue; }
    for round in $(seq 1 "$ROUNDS"); do
      ours_pre "prescale_ours_h${h}_r${round}" "$dir" "$SCALE_N"
      [ "$SCALE_PEFT" = 1 ] && peft_pre "prescale_peft_h${h}_r${round}" "$dir" "$SCALE_N"
    done
    [ "$h" -ge 4096 ] && rm -rf "$dir"   # 0.8 GB per layer
  done
  for n in $SCALE_SAMPLES; do
    for round in $(seq 1 "$ROUNDS"); do
      ours_pre "prescalen_ours_n${n}_r${round}" "$M1" "$n"
      [ "$SCALE_PEFT" = 1 ] && peft_pre "prescalen_peft_n${n}_r${round}" "$M1" "$n"
    done
  done
fi

if has_stage big; then
  for L in $BIG_LAYERS; do
    dir="$OUT/models/big_l$L"
    demo_model "$dir" "$L" 4096 11008 32 "$BIG_SAMPLES" || { log "big model $L failed"; continue; }
    TRACE_RSS=1 ours_pre "big_ours_l${L}" "$dir" "$BIG_SAMPLES"
    rm -rf "$OUT/tmp/ours_pre" "$dir"   # 7B-shaped layers are 0.8 GB each
  done
fi

rm -rf "$OUT/tmp"
"$PY" "$HERE/summarize.py" "$OUT" > "$OUT/results.md" 2>>"$OUT/harness.log" || python3 "$HERE/summarize.py" "$OUT" > "$OUT/results.md"
log "done: $OUT/results.md"
cat "$OUT/results.md"
