#!/usr/bin/env bash
# Print cargo's target directory for this workspace, as cargo itself resolves it
# (CARGO_TARGET_DIR, build.target-dir in .cargo/config.toml, else ./target), so that the
# scripts find the binaries wherever `cargo build` put them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')" || true
if [[ -z "$dir" ]]; then
  dir="${CARGO_TARGET_DIR:-$ROOT/target}"
  [[ "$dir" = /* ]] || dir="$PWD/$dir"
fi
printf '%s\n' "$dir"
