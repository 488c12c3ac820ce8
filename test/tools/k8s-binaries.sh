#!/usr/bin/env bash
# Provides the Kubernetes control-plane binaries the tests and the lab run against.
#
#   test/tools/k8s-binaries.sh VERSION DIR [COMPONENT...]
#
# Fills DIR with etcd, kube-apiserver and any further COMPONENT (kube-controller-manager,
# kube-scheduler, kube-proxy) of Kubernetes VERSION (e.g. 1.32.3), then prints DIR.
# Binaries already in DIR are reused. The normal path is setup-envtest; where it cannot
# download (no internet), kube-apiserver and friends are built from k8s.io/kubernetes on the
# Go module proxy and etcd comes from Debian's etcd-server package.
set -euo pipefail

version=${1:?usage: $0 VERSION DIR [COMPONENT...]}
dir=${2:?usage: $0 VERSION DIR [COMPONENT...]}
shift 2
components=(kube-apiserver "$@")
mkdir -p "$dir"

log() { echo "k8s-binaries: $*" >&2; }

missing() {
  local c
  for c in etcd "${components[@]}"; do [ -x "$dir/$c" ] || return 0; done
  return 1
}

if ! missing; then echo "$dir"; exit 0; fi

# 1. setup-envtest, for machines with internet access.
if [ ! -x "$dir/kube-apiserver" ] || [ ! -x "$dir/etcd" ]; then
  tmp=$(mktemp -d)
  if assets=$(timeout 120 go run sigs.k8s.io/controller-runtime/tools/setup-envtest@release-0.20 \
      use "$version" --bin-dir "$tmp" -p path 2>/dev/null) && [ -x "$assets/kube-apiserver" ]; then
    cp "$assets/kube-apiserver" "$assets/etcd" "$dir/"
    log "got kube-apiserver and etcd $version from setup-envtest"
  else
    log "setup-envtest could not download; building from the module proxy instead"
  fi
  rm -rf "$tmp"
fi

# 2. etcd from Debian.
if [ ! -x "$dir/etcd" ]; then
  if ! command -v etcd >/dev/null; then
    log "installing etcd-server from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq etcd-server >/dev/null
    # Debian starts the packaged service; the tests start their own etcd.
    systemctl stop etcd 2>/dev/null || service etcd stop 2>/dev/null || true
  fi
  ln -sf "$(command -v etcd)" "$dir/etcd"
fi

# 3. Kubernetes components from k8s.io/kubernetes on the module proxy.
build=()
for c in "${components[@]}"; do [ -x "$dir/$c" ] || build+=("$c"); done
if [ ${#build[@]} -gt 0 ]; then
  mod=$(mktemp -d)
  trap 'rm -rf "$mod"' EXIT
  log "building ${build[*]} v$version (several minutes on 2 cores)"
  gomod=$(cd "$mod" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@v$version" |
    sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  {
    echo "module portico.dev/k8s-binaries"
    echo "go 1.23"
    echo "require k8s.io/kubernetes v$version"
    # Every staging module k8s.io/kubernetes replaces with ./staging/... must point at its
    # published v0.Y.Z twin instead.
    grep -E '=> \./staging/' "$gomod" | awk -v v="v0.${version#*.}" '{print "replace " $1 " => " $1 " " v}'
  } >"$mod/go.mod"
  echo 'package tools' >"$mod/tools.go"
  # Some staging modules are missing from the checksum database mirror; their contents still
  # come from the module proxy and are recorded in this throwaway module's go.sum.
  (cd "$mod" && GONOSUMDB=k8s.io GOFLAGS=-mod=mod go mod download k8s.io/kubernetes >/dev/null)
  for c in "${build[@]}"; do
    (cd "$mod" && GONOSUMDB=k8s.io GOFLAGS=-mod=mod go build -trimpath -ldflags=-s -o "$dir/$c" "k8s.io/kubernetes/cmd/$c")
    log "built $c"
  done
fi

echo "$dir"
