#!/usr/bin/env bash
# Build the CUDA binaries (corda-preprocess, corda-finetune, corda-convert) on any x86-64 Linux,
# GPU or not: runs scripts/cuda/setup.sh (idempotent), then cargo with the patched candle-core.
#
# Usage: scripts/cuda/build.sh [cargo args...]     default: --release
#   e.g. scripts/cuda/build.sh --profile ci-cuda   (compile check, as .ci/run does)
# The target directory is cargo's usual one (CARGO_TARGET_DIR is honoured).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
"$ROOT/scripts/cuda/setup.sh" --quiet
DIR="${CORDA_CUDA_DIR:-$ROOT/.cuda}"
# shellcheck disable=SC1091
source "$DIR/env.sh"
cd "$ROOT"
# The patch rewrites candle-core's source in Cargo.lock; keep the committed lock file as it was.
cp Cargo.lock "$DIR/Cargo.lock.saved"
trap 'cp "$DIR/Cargo.lock.saved" "$ROOT/Cargo.lock"' EXIT
[[ $# -gt 0 ]] || set -- --release
cargo build "$@" -p corda-preprocess -p corda-finetune -p corda-convert --features cuda \
  --config "$CORDA_CUDA_PATCH"
