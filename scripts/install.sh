#!/usr/bin/env bash
# Create (or update) the project's virtual environment with everything the engine, the
# operator, the tests and the benchmarks need. Idempotent; pip's cache makes reruns fast.
#   bash scripts/install.sh [VENV_DIR]   (default .venv)
set -euo pipefail
VENV="${1:-.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" - <<'PYEOF'
import sys
if sys.version_info[:2] != (3, 11):
    sys.exit(f"SpecServe needs Python 3.11 (found {sys.version.split()[0]})")
PYEOF
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# CPU-only torch: the +cpu build is ~200 MB instead of several GB of CUDA libraries. This
# machine image carries it in its local wheel folder (pip's find-links); elsewhere fall back
# to the PyPI build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[install] torch (CPU build)" >&2
  "${PIP[@]}" "torch==2.13.0+cpu" 2>/dev/null || "${PIP[@]}" "torch>=2.4"
fi
echo "[install] project with engine, operator and dev extras" >&2
"${PIP[@]}" -e ".[engine,operator,dev]"
echo "[install] done: $VENV" >&2
