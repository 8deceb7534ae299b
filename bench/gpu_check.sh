#!/usr/bin/env bash
# One command for the lent GPU machine: the torch backend on CUDA with random-weight 7B/0.5B
# Qwen2-shaped models and synthetic acceptance (see bench/gpu_check.py). Finishes in < 8 min.
#
#   bash bench/gpu_check.sh                    # --device cuda, results under $OUT
#   bash bench/gpu_check.sh --device cpu --tiny  # CPU smoke test (what the unit test runs)
#
# Writes $OUT/profile.json (an adaspec Profile; the simulator loads it), $OUT/results.json and
# $OUT/gpu_check.log. The machine needs torch, transformers, numpy and pydantic; nothing is
# installed or downloaded. If pydantic is missing there, put its wheels' contents in
# bench/.gpu_deps (carried along: `carry: ["bench/.gpu_deps"]`) and they are put on the path.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu_check_out}"
export OUT
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

export PYTHONPATH="$ROOT/engine${PYTHONPATH:+:$PYTHONPATH}"
if [[ -d "$ROOT/bench/.gpu_deps" ]]; then
  export PYTHONPATH="$PYTHONPATH:$ROOT/bench/.gpu_deps"
fi
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # no network there; never try a hub

missing=$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "transformers", "numpy", "pydantic"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
if [[ -n "$missing" ]]; then
  echo "gpu_check: missing Python packages on this machine: $missing" >&2
  echo "  (put their wheels' contents in bench/.gpu_deps and carry that folder)" >&2
  exit 2
fi

args=("$@")
has_device=0
for a in "${args[@]}"; do [[ "$a" == --device* ]] && has_device=1; done
[[ $has_device -eq 1 ]] || args=(--device cuda "${args[@]}")

{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader || true; } 2>&1 | tee "$OUT/gpu_check.log"
"$PY" "$ROOT/bench/gpu_check.py" --out "$OUT" "${args[@]}" 2>&1 | tee -a "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
