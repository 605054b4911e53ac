#!/usr/bin/env bash
# Prepare a CUDA build on a machine without a GPU or a CUDA toolkit (idempotent).
#
# 1. Installs CUDA 13.0's compiler, headers and runtime from PyPI into a local folder. Every package
#    is pinned to one release line: a newer nvvm/crt emits PTX that ptxas 13.0 rejects, which
#    candle-kernels reports only as "nvcc error". 13.0 is what the H200 machine's driver (580) runs.
# 2. Adds the lib64 symlink candle's build scripts look for and a linker script that makes
#    `-lcudart` the static CUDA runtime.
# 3. Copies the registry's candle-core with cudarc's `dynamic-linking` switched to
#    `dynamic-loading`, so the binaries open libcuda/cuBLAS/cuRAND/NVRTC at run time instead of
#    needing libcuda.so at link time (it exists only where a driver is installed).
# 4. Writes the environment to `<dir>/env.sh` and prints it.
#
# Usage: scripts/cuda/setup.sh [--quiet]      (folder: $CORDA_CUDA_DIR, default <repo>/.cuda)
# Then:  scripts/cuda/build.sh                (or: source .cuda/env.sh; cargo build ... $CORDA_CUDA_PATCH)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="${CORDA_CUDA_DIR:-$ROOT/.cuda}"
QUIET=0
[[ "${1:-}" == "--quiet" ]] && QUIET=1
log() { [[ $QUIET == 1 ]] || echo "setup.sh: $*" >&2; }

# One release line (CUDA 13.0); see the header.
PINS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85)
PYTHON="${PYTHON:-python3}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
PKGS="$DIR/pkgs"
CU="$PKGS/nvidia/cu13"
STAMP="$DIR/pkgs.stamp"

# --- 1. the CUDA packages ---
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "${PINS[*]}" && -x "$CU/bin/nvcc" ]]; then
  log "CUDA packages already in $PKGS"
else
  command -v "$PYTHON" >/dev/null || { echo "setup.sh: error: $PYTHON not found; set PYTHON=/path/to/python3" >&2; exit 1; }
  log "installing ${PINS[*]} into $PKGS"
  rm -rf "$PKGS" "$STAMP"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$PKGS" "${PINS[@]}"
  [[ -x "$CU/bin/nvcc" ]] || { echo "setup.sh: error: nvcc not found at $CU/bin/nvcc after install" >&2; exit 1; }
  printf '%s' "${PINS[*]}" >"$STAMP"
fi
"$CU/bin/nvcc" --version | grep -q "release 13.0" || {
  echo "setup.sh: error: $CU/bin/nvcc is not CUDA 13.0:" >&2; "$CU/bin/nvcc" --version >&2; exit 1; }

# --- 2. symlinks, and the CUDA runtime linked statically ---
[[ -e "$CU/lib64" ]] || ln -s lib "$CU/lib64"
# (An earlier setup's libcudart.so symlink would make the runtime a shared library again.)
[[ -L "$CU/lib/libcudart.so" ]] && rm "$CU/lib/libcudart.so"
[[ -f "$CU/lib/libcudart_static.a" ]] || { echo "setup.sh: error: $CU/lib/libcudart_static.a missing (nvidia-cuda-runtime)" >&2; exit 1; }
# candle-kernels asks for `-lcudart` (its quantized/MoE kernels call the runtime API). A linker
# script found first on the search path links the static runtime instead, as nvcc does by
# default: the binaries then need no CUDA library to start (`--device cpu` runs anywhere) and
# open the driver only for `--device cuda`.
mkdir -p "$DIR/link"
printf 'INPUT(%s -ldl -lrt -lpthread)\n' "$CU/lib/libcudart_static.a" >"$DIR/link/libcudart.so"

# --- 3. candle-core with dynamic loading ---
VER="$(awk '/^name = "candle-core"$/ {getline; sub(/version = /, ""); gsub(/"/, ""); print; exit}' "$ROOT/Cargo.lock")"
[[ -n "$VER" ]] || { echo "setup.sh: error: candle-core not found in $ROOT/Cargo.lock" >&2; exit 1; }
PATCHED="$DIR/candle-core-$VER"
if [[ -f "$PATCHED/.corda-patched" ]]; then
  log "patched candle-core $VER already at $PATCHED"
else
  CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"
  src="$(ls -d "$CARGO_HOME"/registry/src/*/candle-core-"$VER" 2>/dev/null | head -n1 || true)"
  if [[ -z "$src" ]]; then
    log "fetching crates (candle-core $VER not in $CARGO_HOME/registry/src)"
    (cd "$ROOT" && cargo fetch --locked >/dev/null)
    src="$(ls -d "$CARGO_HOME"/registry/src/*/candle-core-"$VER" 2>/dev/null | head -n1 || true)"
    [[ -n "$src" ]] || { echo "setup.sh: error: candle-core $VER not found under $CARGO_HOME/registry/src" >&2; exit 1; }
  fi
  rm -rf "$PATCHED" "$PATCHED.tmp"
  cp -a "$src" "$PATCHED.tmp"
  chmod -R u+w "$PATCHED.tmp"
  # Exactly one occurrence, inside cudarc's feature list; fail loudly if the layout changed.
  n="$(grep -c '^    "dynamic-linking",$' "$PATCHED.tmp/Cargo.toml" || true)"
  [[ "$n" == 1 ]] || { echo "setup.sh: error: expected one \"dynamic-linking\" feature in candle-core $VER's Cargo.toml, found $n" >&2; exit 1; }
  sed -i 's/^    "dynamic-linking",$/    "dynamic-loading",/' "$PATCHED.tmp/Cargo.toml"
  touch "$PATCHED.tmp/.corda-patched"
  mv "$PATCHED.tmp" "$PATCHED"
  log "patched candle-core $VER at $PATCHED (cudarc dynamic-loading)"
fi

# --- 4. environment ---
CAP="${CUDA_COMPUTE_CAP:-90}"
cat >"$DIR/env.sh" <<EOF
# Written by scripts/cuda/setup.sh: source it before a CUDA build.
export PATH="$CU/bin:\$PATH"
export CUDA_ROOT="$CU" CUDA_PATH="$CU" CUDA_HOME="$CU"
export CUDA_COMPUTE_CAP="$CAP"
export LIBRARY_PATH="$DIR/link:$CU/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export CORDA_CUDA_PATCH="patch.crates-io.candle-core.path=\"$PATCHED\""
EOF
if [[ $QUIET == 0 ]]; then
  echo "# source $DIR/env.sh   (it contains:)"
  cat "$DIR/env.sh"
  echo "# then: cargo build --release --features cuda --config \"\$CORDA_CUDA_PATCH\"   (or scripts/cuda/build.sh)"
fi
