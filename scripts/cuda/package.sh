#!/usr/bin/env bash
# Pack the CUDA binaries for a GPU machine without a Rust toolchain: stripped, xz-compressed,
# with PEFT's wheels (for the device check's side-by-side runs) and a manifest (sizes, sha256,
# the newest glibc / libstdc++ symbol versions and the shared libraries the binaries need).
# The folder must stay within 60 MiB so that it travels with a device run.
#
# Usage: scripts/cuda/package.sh [OUT]        (default dist/cuda; run scripts/cuda/build.sh first)
#   BIN=dir     where the CUDA binaries are (default: cargo's target dir /release)
#   BINARIES="corda-preprocess corda-finetune"   (the default: what runs on a GPU; corda-convert
#               is 8.5 MiB more packed and works from the CPU build, add it with WHEELS=0 to stay
#               within the limit)
#   WHEELS=0    leave the wheels out (they are for device_check.sh's PEFT runs)
# On the GPU machine: dist/cuda/unpack.sh DIR puts the runnable binaries in DIR.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${1:-$ROOT/dist/cuda}"
BIN="${BIN:-$("$ROOT/scripts/target-dir.sh")/release}"
read -r -a NAMES <<<"${BINARIES:-corda-preprocess corda-finetune}"
LIMIT_MIB=60

for n in "${NAMES[@]}"; do
  f="$BIN/$n"
  [[ -x "$f" ]] || { echo "package.sh: error: $f missing; run scripts/cuda/build.sh first (or set BIN)" >&2; exit 1; }
  # A CUDA build embeds device code (candle-kernels' sm_XX fat binary); a CPU build does not.
  readelf -S "$f" | grep -q '\.nv_fatbin' || {
    echo "package.sh: error: $f is not a CUDA build (no .nv_fatbin section); build it with scripts/cuda/build.sh" >&2; exit 1; }
done

rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp/bin"
manifest="$OUT.tmp/MANIFEST.txt"
{
  echo "corda CUDA binaries, packed $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "built on: $(ldd --version 2>/dev/null | head -n1)"
  [[ -f "${CORDA_CUDA_DIR:-$ROOT/.cuda}/pkgs.stamp" ]] && echo "CUDA: $(cat "${CORDA_CUDA_DIR:-$ROOT/.cuda}/pkgs.stamp")"
  echo
} >"$manifest"
for n in "${NAMES[@]}"; do
  strip -o "$OUT.tmp/bin/$n" "$BIN/$n"
  glibc="$(objdump -T "$OUT.tmp/bin/$n" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n1)"
  glibcxx="$(objdump -T "$OUT.tmp/bin/$n" | grep -o 'GLIBCXX_[0-9.]*' | sort -uV | tail -n1 || true)"
  needed="$(readelf -d "$OUT.tmp/bin/$n" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
  unstripped="$(stat -c %s "$BIN/$n")"
  stripped="$(stat -c %s "$OUT.tmp/bin/$n")"
  sha="$(sha256sum "$OUT.tmp/bin/$n" | cut -d' ' -f1)"
  xz -T0 -6 "$OUT.tmp/bin/$n"
  {
    echo "$n: unstripped $unstripped B, stripped $stripped B, xz $(stat -c %s "$OUT.tmp/bin/$n.xz") B"
    echo "  sha256 (stripped) $sha"
    echo "  newest symbol versions: ${glibc:-none} ${glibcxx:-}"
    echo "  needs: $needed"
  } >>"$manifest"
done

cat >"$OUT.tmp/unpack.sh" <<'EOF'
#!/usr/bin/env bash
# Unpack the binaries into DIR (default: ./bin beside this script), checking their sha256.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="${1:-$HERE/bin}"
mkdir -p "$DEST"
for f in "$HERE"/bin/*.xz; do
  n="$(basename "$f" .xz)"
  if command -v xz >/dev/null; then
    xz -dc "$f" >"$DEST/$n"
  else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "$DEST/$n"
  fi
  chmod +x "$DEST/$n"
  want="$(awk -v n="$n:" '$1 == n {getline; print $3}' "$HERE/MANIFEST.txt")"
  got="$(sha256sum "$DEST/$n" | cut -d' ' -f1)"
  [[ "$want" == "$got" ]] || { echo "unpack.sh: $n: sha256 $got, expected $want" >&2; exit 1; }
done
echo "$DEST"
EOF
chmod +x "$OUT.tmp/unpack.sh"

if [[ "${WHEELS:-1}" != 0 ]]; then
  "$ROOT/scripts/cuda/fetch_wheels.sh" "$ROOT/dist/wheels"
  cp -a "$ROOT/dist/wheels" "$OUT.tmp/wheels"
fi

size="$(du -sb "$OUT.tmp" | cut -f1)"
echo >>"$manifest"
echo "total: $size B" >>"$manifest"
if ((size > LIMIT_MIB * 1024 * 1024)); then
  echo "package.sh: error: $OUT.tmp is $((size / 1048576)) MiB, over the $LIMIT_MIB MiB that travel to the GPU machine" >&2
  exit 1
fi
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
cat "$OUT/MANIFEST.txt"
