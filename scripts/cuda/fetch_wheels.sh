#!/usr/bin/env bash
# Download PEFT and the packages it needs beyond PyTorch as wheels, for a machine without
# registry access (the GPU machine has Python and PyTorch; scripts/cuda/device_check.sh installs
# these with `pip install --no-index --find-links`).
#
# Usage: scripts/cuda/fetch_wheels.sh [DIR]          (default dist/wheels; idempotent)
#   PYTHON_VERSIONS="3.11 3.12 3.13" picks the Pythons for the version-specific wheels
#   (transformers 5.24 needs Python 3.11 or newer).
#
# The list is PEFT 0.21.2's dependency closure as installed beside torch 2.15 / transformers
# 5.24, minus torch itself and numpy (both come with PyTorch; numpy's wheels are 16 MB each).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${1:-$ROOT/dist/wheels}"
PYTHON="${PYTHON:-python3}"
read -r -a PYVERS <<<"${PYTHON_VERSIONS:-3.11 3.12 3.13}"
PKGS=(
  peft==0.21.2 transformers==5.24.0 accelerate==1.15.0 huggingface-hub==2.4.0
  safetensors==0.8.0 tokenizers==0.23.3 hf-xet==1.8.0 tqdm==4.70.1 packaging==26.4
  pyyaml==6.0.4 regex==2026.11.19 psutil==7.2.2 filelock==4.3.1 fsspec==2026.9.0
  typing-extensions==4.16.0 typer==0.29.2 click==8.5.1 shellingham==1.5.4 rich==15.0.0
  markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 annotated-doc==0.0.7
  httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 anyio==4.16.0 idna==3.20 truststore==0.10.5
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
)
mkdir -p "$OUT"
for v in "${PYVERS[@]}"; do
  echo "fetch_wheels.sh: Python $v" >&2
  # --no-deps with the full list: resolving peft's own dependencies would pull torch (GBs).
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    --python-version "$v" --implementation cp -d "$OUT" "${PKGS[@]}"
done
n="$(ls "$OUT"/*.whl | wc -l)"
echo "fetch_wheels.sh: $n wheels, $(du -sh "$OUT" | cut -f1) in $OUT" >&2
