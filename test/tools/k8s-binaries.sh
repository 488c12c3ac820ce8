#!/usr/bin/env bash
# Provides the Kubernetes control-plane binaries the tests and the lab run against.
#
#   test/tools/k8s-binaries.sh VERSION DIR [COMPONENT...]
#
# Fills DIR with etcd, kube-apiserver and any further COMPONENT (kube-controller-manager,
# kube-scheduler, kube-proxy) of Kubernetes VERSION (e.g. 1.37.2), then prints DIR.
# Binaries already in DIR are reused. The normal path is setup-envtest; where it cannot
# download (no internet), kube-apiserver and friends are built from k8s.io/kubernetes on the
# Go module proxy, and etcd from go.etcd.io/etcd/server/v3 (ETCD_VERSION) the same way.
set -euo pipefail

version=${1:?usage: $0 VERSION DIR [COMPONENT...]}
dir=${2:?usage: $0 VERSION DIR [COMPONENT...]}
shift 2
components=(kube-apiserver "$@")
# The etcd release Kubernetes 1.34-1.37 is tested with.
etcd_version=${ETCD_VERSION:-3.6.16}
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
  if assets=$(timeout 120 go run sigs.k8s.io/controller-runtime/tools/setup-envtest@release-0.25 \
      use "$version" --bin-dir "$tmp" -p path 2>/dev/null) && [ -x "$assets/kube-apiserver" ]; then
    cp "$assets/kube-apiserver" "$assets/etcd" "$dir/"
    log "got kube-apiserver and etcd $version from setup-envtest"
  else
    log "setup-envtest could not download; building from the module proxy instead"
  fi
  rm -rf "$tmp"
fi

# 2. etcd from go.etcd.io/etcd/server/v3 on the module proxy (Debian's 3.4 is out of support).
if [ ! -x "$dir/etcd" ]; then
  mod=$(mktemp -d)
  log "building etcd v$etcd_version"
  printf 'module portico.dev/etcd-binary\ngo 1.26\nrequire go.etcd.io/etcd/server/v3 v%s\n' "$etcd_version" >"$mod/go.mod"
  (cd "$mod" && GOFLAGS=-mod=mod go build -trimpath -ldflags=-s -o "$dir/etcd" go.etcd.io/etcd/server/v3)
  rm -rf "$mod"
  log "built etcd"
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
  # Built outside a release, the binaries would say v0.0.0-master; clients and the e2e suite
  # read the server's version.
  minor=${version#*.}; minor=${minor%%.*}
  pkg=k8s.io/component-base/version
  ldflags="-s -X $pkg.gitVersion=v$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  for c in "${build[@]}"; do
    (cd "$mod" && GONOSUMDB=k8s.io GOFLAGS=-mod=mod go build -trimpath -ldflags="$ldflags" -o "$dir/$c" "k8s.io/kubernetes/cmd/$c")
    log "built $c"
  done
fi

echo "$dir"
