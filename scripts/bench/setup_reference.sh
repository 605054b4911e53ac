#!/usr/bin/env bash
# Create the Python reference environment for the side-by-side benchmarks:
# torch + transformers + peft + safetensors from PyPI, in scripts/bench/.venv (git-ignored).
#
#   scripts/bench/setup_reference.sh            # create or update
#   VENV=/some/dir scripts/bench/setup_reference.sh
#
# PyPI's default Linux torch wheel pulls the CUDA libraries (several GB); CPU is all the
# benchmarks use, but only PyPI is reachable here, so the default wheel it is.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${VENV:-$HERE/.venv}"
PY="${PYTHON:-python3}"

echo "disk before install:"; df -h "$(dirname "$VENV")" | tail -1
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade pip
# peft >= 0.15 has CorDA (preprocess_corda); its corda.py imports `attr` (attrs), which peft does
# not declare. Versions are recorded by the harness.
"$VENV/bin/python" -m pip install "torch>=2.3" "transformers>=4.45" "peft>=0.15" safetensors accelerate psutil attrs gguf
"$VENV/bin/python" - <<'PY'
import torch, transformers, peft, safetensors
from peft.tuners.lora.corda import preprocess_corda  # noqa: F401  (fails loudly if peft lacks CorDA)
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "threads", torch.get_num_threads())
PY
echo "disk after install:"; df -h "$(dirname "$VENV")" | tail -1
