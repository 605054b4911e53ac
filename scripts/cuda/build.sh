#!/usr/bin/env bash
# Build the CUDA binaries (corda-preprocess, corda-finetune, corda-convert) on any x86-64 Linux,
# GPU or not, through scripts/cuda/cargo.sh (pinned CUDA 13.0 from PyPI, patched candle-core).
#
# Usage: scripts/cuda/build.sh [cargo build args...]     default: --release
#   e.g. scripts/cuda/build.sh --profile ci-cuda          (the compile check of .ci/run)
# The binaries land in cargo's target directory (CARGO_TARGET_DIR is honoured); then
# scripts/cuda/package.sh packs them for a GPU machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
[[ $# -gt 0 ]] || set -- --release
exec "$ROOT/scripts/cuda/cargo.sh" build "$@" -p corda-preprocess -p corda-finetune -p corda-convert \
  --features cuda
