#!/usr/bin/env bash
# Creates .venv (or $LORA_OPS_VENV) with the pinned CPU torch and installs lora_ops in editable mode with the
# test, benchmark and real-model extras. Safe to re-run: an existing venv is reused and the C++ build is incremental.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LORA_OPS_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# torch is pinned so pip takes the CPU wheel, never a multi-GB CUDA download.
"$VENV/bin/pip" install -q "torch==${LORA_OPS_TORCH:-2.13.0}" setuptools wheel ninja numpy
MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/pip" install -q --no-build-isolation -e ".[test,bench,real]"
