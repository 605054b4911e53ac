#!/usr/bin/env bash
# Run a command and sample its memory every INTERVAL seconds (default 0.2) from /proc/PID/status:
# VmRSS = RssAnon (heap) + RssFile (mapped files, e.g. mmapped safetensors) + RssShmem.
#   scripts/bench/rss_trace.sh TRACE.tsv -- corda-preprocess ...
# TRACE.tsv: seconds, VmRSS, RssAnon, RssFile (MiB); the last line has the maxima.
set -uo pipefail
trace="$1"; shift; [ "${1:-}" = "--" ] && shift
INTERVAL="${INTERVAL:-0.2}"
"$@" &
pid=$!
start=$(date +%s.%N)
printf "seconds\tVmRSS_MiB\tRssAnon_MiB\tRssFile_MiB\n" > "$trace"
mr=0; ma=0; mf=0
while kill -0 "$pid" 2>/dev/null; do
  if s=$(cat "/proc/$pid/status" 2>/dev/null); then
    r=$(awk '/^VmRSS/{print int($2/1024)}' <<<"$s"); a=$(awk '/^RssAnon/{print int($2/1024)}' <<<"$s")
    f=$(awk '/^RssFile/{print int($2/1024)}' <<<"$s")
    if [ -n "$r" ]; then
      printf "%s\t%s\t%s\t%s\n" "$(awk -v s="$start" -v n="$(date +%s.%N)" 'BEGIN{printf "%.1f", n - s}')" "$r" "$a" "$f" >> "$trace"
      [ "$r" -gt "$mr" ] && mr=$r; [ "$a" -gt "$ma" ] && ma=$a; [ "$f" -gt "$mf" ] && mf=$f
    fi
  fi
  sleep "$INTERVAL"
done
wait "$pid"; rc=$?
printf "max\t%s\t%s\t%s\n" "$mr" "$ma" "$mf" >> "$trace"
exit $rc
