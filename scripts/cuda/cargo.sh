#!/usr/bin/env bash
# Run cargo with the CUDA build environment: scripts/cuda/setup.sh (idempotent), its env.sh,
# and the patched candle-core (cudarc loads the CUDA libraries at run time).
#
# Usage: scripts/cuda/cargo.sh SUBCOMMAND [ARGS...]
#   e.g. scripts/cuda/cargo.sh test --release --features cuda -p corda-preprocess --test cuda_device
# Cargo.lock is left as committed (the patch rewrites candle-core's source in it while cargo runs).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
[[ $# -ge 1 ]] || { echo "usage: scripts/cuda/cargo.sh SUBCOMMAND [ARGS...]" >&2; exit 2; }
"$ROOT/scripts/cuda/setup.sh" --quiet
DIR="${CORDA_CUDA_DIR:-$ROOT/.cuda}"
# shellcheck disable=SC1091
source "$DIR/env.sh"
cd "$ROOT"
saved="$(mktemp "$DIR/Cargo.lock.XXXXXX")"
cp Cargo.lock "$saved"
trap 'cp "$saved" "$ROOT/Cargo.lock"; rm -f "$saved"' EXIT
sub="$1"
shift
cargo "$sub" --config "$CORDA_CUDA_PATCH" "$@"
