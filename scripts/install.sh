#!/usr/bin/env bash
# Install seedselect (and with --test, pytest) into the current Python environment.
# An already installed torch (CPU or CUDA build) is kept: torch is installed only when missing,
# pinned to the version the test suite runs on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet ".${extra}"
"$PY" -c "import torch, seedselect_cli; print(f'seedselect {seedselect_cli.__version__} installed (torch {torch.__version__})')"
