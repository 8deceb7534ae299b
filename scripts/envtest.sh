#!/usr/bin/env bash
# Build and cache a real Kubernetes 1.20.2 control plane for the e2e tests (envtest asset layout).
#
# No binary package carries kube-apiserver, so we build it from Debian bookworm's `kubernetes`
# source package (upstream 1.20.2 with every dependency vendored) using Debian's Go, offline.
# etcd and a version-matched kubectl come from Debian binary packages (unpacked, not installed).
# The result lives in ${XDG_CACHE_HOME:-~/.cache}/specserve/envtest/1.20.2/bin and is reused: a
# second run only checks the binaries and prints KUBEBUILDER_ASSETS. Cold build: ~7-10 min on 2 cores.
#
# Environment:
#   SPECSERVE_ENVTEST_KEEP_BUILD=1   keep the 3-4 GB source tree and Go build cache after building
#   SPECSERVE_ENVTEST_JOBS=N         parallel Go compile jobs (default: nproc)
set -euo pipefail

K8S_VERSION=1.20.2
K8S_SRC_VERSION="1.20.5+really1.20.2-1.1+deb12u1" # Debian bookworm source package `kubernetes`
ETCD_DEB_VERSION="3.4.23-4+b4"                   # Debian bookworm `etcd-server`
KUBECTL_DEB_VERSION="$K8S_SRC_VERSION"           # Debian bookworm `kubernetes-client` (kubectl 1.20.2)
REFLECT2_DEB_VERSION="1.0.2-2"                   # replaces the vendored reflect2 1.0.1 (crashes with Go >= 1.18)

CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/specserve/envtest/$K8S_VERSION"
BIN="$CACHE_ROOT/bin"
STAMP="$BIN/.specserve-envtest-stamp"
STAMP_TEXT="k8s=$K8S_SRC_VERSION etcd=$ETCD_DEB_VERSION kubectl=$KUBECTL_DEB_VERSION reflect2=$REFLECT2_DEB_VERSION"
WANTED=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl)

log() { printf '[envtest] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root (or sudo) to run: $*"
  fi
}

assets_ok() {
  [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]] || return 1
  local b
  for b in "${WANTED[@]}"; do [[ -x "$BIN/$b" ]] || return 1; done
  "$BIN/kube-apiserver" --version 2>/dev/null | grep -q "v$K8S_VERSION" || return 1
  "$BIN/etcd" --version >/dev/null 2>&1 || return 1
}

finish() {
  log "assets ready in $BIN"
  echo "KUBEBUILDER_ASSETS=$BIN"
}

mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.lock"
flock 9 # one builder at a time; a concurrent caller waits, then finds the cache filled

if assets_ok; then finish; exit 0; fi

APT_UPDATED=0
apt_update_once() {
  if [[ $APT_UPDATED -eq 0 ]]; then
    log "apt-get update"
    as_root apt-get update -qq
    APT_UPDATED=1
  fi
}

ensure_pkgs() {
  local missing=() p
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p"); done
  if ((${#missing[@]})); then
    apt_update_once
    log "apt-get install ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
}

ensure_deb_src() {
  # `apt-get source` needs a deb-src entry; derive one from the enabled Debian deb entries.
  if grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/; then return 0; fi
  log "adding a deb-src entry (/etc/apt/sources.list.d/specserve-deb-src.*)"
  local f tmp
  tmp=$(mktemp)
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    grep -q 'debian' "$f" || continue
    sed -E 's/^Types:[[:space:]]*deb[[:space:]]*$/Types: deb-src/' "$f" >>"$tmp"
    printf '\n' >>"$tmp"
  done
  if [[ -s $tmp ]]; then
    as_root install -m 0644 "$tmp" /etc/apt/sources.list.d/specserve-deb-src.sources
  elif [[ -f /etc/apt/sources.list ]] && grep -qE '^deb .*debian' /etc/apt/sources.list; then
    grep -E '^deb .*debian' /etc/apt/sources.list | sed 's/^deb /deb-src /' >"$tmp"
    as_root install -m 0644 "$tmp" /etc/apt/sources.list.d/specserve-deb-src.list
  else
    rm -f "$tmp"
    die "no Debian apt source found to derive a deb-src entry from"
  fi
  rm -f "$tmp"
  APT_UPDATED=0
}

WORK="$CACHE_ROOT/build"
STAGE="$CACHE_ROOT/bin.new"
rm -rf "$STAGE"
mkdir -p "$WORK" "$STAGE"
START=$(date +%s)

ensure_pkgs golang-go rsync jq dpkg-dev openssl ca-certificates
ensure_deb_src
apt_update_once

# --- etcd and kubectl from Debian binary packages (unpacked into the cache, nothing installed) ---
debx() { # debx PACKAGE VERSION DEST
  local d
  d=$(mktemp -d "$WORK/deb.XXXX")
  (cd "$d" && apt-get download -qq "$1=$2" >&2)
  dpkg -x "$d"/*.deb "$3"
  rm -rf "$d"
}
log "etcd-server $ETCD_DEB_VERSION, kubernetes-client $KUBECTL_DEB_VERSION"
rm -rf "$WORK/x" && mkdir -p "$WORK/x"
debx etcd-server "$ETCD_DEB_VERSION" "$WORK/x"
debx kubernetes-client "$KUBECTL_DEB_VERSION" "$WORK/x"
install -m 0755 "$WORK/x/usr/bin/etcd" "$STAGE/etcd"
install -m 0755 "$WORK/x/usr/bin/kubectl" "$STAGE/kubectl"

# --- kube-apiserver, kube-controller-manager, kube-scheduler from the Debian source package ---
SRC="$WORK/kubernetes-src"
if [[ ! -f "$SRC/.specserve-patched" ]]; then
  rm -rf "$SRC" "$WORK/src-dl" && mkdir -p "$WORK/src-dl"
  log "apt-get source kubernetes=$K8S_SRC_VERSION"
  (cd "$WORK/src-dl" && apt-get source -qq --download-only "kubernetes=$K8S_SRC_VERSION" >&2)
  dpkg-source -x "$WORK"/src-dl/kubernetes_*.dsc "$SRC" >&2
  rm -rf "$WORK/src-dl"
  log "replacing vendored github.com/modern-go/reflect2 with Debian's $REFLECT2_DEB_VERSION"
  mkdir -p "$WORK/r2"
  debx golang-github-modern-go-reflect2-dev "$REFLECT2_DEB_VERSION" "$WORK/r2"
  R2SRC="$WORK/r2/usr/share/gocode/src/github.com/modern-go/reflect2"
  R2DST="$SRC/vendor/github.com/modern-go/reflect2"
  [[ -d $R2SRC && -d $R2DST ]] || die "reflect2 source or vendor dir missing"
  find "$R2DST" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) -delete
  find "$R2SRC" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' -exec cp {} "$R2DST/" \;
  rm -rf "$WORK/r2"
  touch "$SRC/.specserve-patched"
fi

log "building kube-apiserver, kube-controller-manager, kube-scheduler (GOPATH mode, offline; several minutes)"
mkdir -p "$WORK/home" "$WORK/gocache"
(
  cd "$SRC"
  export HOME="$WORK/home" GOCACHE="$WORK/gocache" GOPROXY=off GOFLAGS= CGO_ENABLED=0
  export KUBE_GIT_VERSION="v$K8S_VERSION" KUBE_GIT_TREE_STATE=clean
  export GOMAXPROCS="${SPECSERVE_ENVTEST_JOBS:-$(nproc)}"
  nice -n 10 make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >&2
)
OUTBIN=$(find "$SRC/_output" -type d -path '*/bin' -print | head -n1)
for b in kube-apiserver kube-controller-manager kube-scheduler; do
  [[ -x "$OUTBIN/$b" ]] || die "build produced no $b"
  install -m 0755 "$OUTBIN/$b" "$STAGE/$b"
done

"$STAGE/kube-apiserver" --version | grep -q "v$K8S_VERSION" || die "kube-apiserver does not report v$K8S_VERSION"
"$STAGE/etcd" --version >/dev/null || die "etcd does not run"
echo "$STAMP_TEXT" >"$STAGE/.specserve-envtest-stamp"
rm -rf "$BIN" && mv "$STAGE" "$BIN"
if [[ "${SPECSERVE_ENVTEST_KEEP_BUILD:-0}" != 1 ]]; then rm -rf "$WORK"; fi
log "built in $(($(date +%s) - START)) s"
finish
