#!/usr/bin/env bash
# Build the cluster's binaries from the Go module proxy into .cache/cluster-bin (idempotent).
#
# No registry but the package registries is reachable, so Kubernetes, etcd and CoreDNS come
# from the Go module proxy. `go install k8s.io/kubernetes/...@v` is refused because of the
# kubernetes module's replace directives, so a scratch module repeats them. The Go module
# and build caches stay in their default places (~/go, ~/.cache/go-build): a fresh clone on
# the same machine then relinks in well under a minute instead of building for ~11.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.7.3}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.15.0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="$ROOT/.cache/cluster-bin"
WORK="$ROOT/.cache/cluster-build"
K8S_COMMANDS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
# Staging modules the kubernetes module replaces with ./staging; sample-cli-plugin and
# sample-controller are left out because the proxy refuses them at this version.
K8S_STAGING=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go
  cloud-provider cluster-bootstrap code-generator component-base component-helpers
  controller-manager cri-api cri-client cri-streaming csi-translation-lib
  dynamic-resource-allocation endpointslice externaljwt kms kube-aggregator
  kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics mount-utils
  pod-security-admission sample-apiserver streaming)

if ! command -v go >/dev/null 2>&1; then
  if [[ -x /usr/local/go/bin/go ]]; then
    PATH="/usr/local/go/bin:$PATH"
  else
    echo "tools/cluster/build.sh: the Go toolchain is needed (apt-get install golang-go)" >&2
    exit 1
  fi
fi

# Two shared cores: stay polite to other people's test runs.
export GOMAXPROCS="${GOMAXPROCS:-2}" CGO_ENABLED=0
NICE=(nice -n 10)
mkdir -p "$BIN" "$WORK"

stamp_matches() { [[ -f "$BIN/.$1" && "$(cat "$BIN/.$1")" == "$2" ]]; }

build_kubernetes() {
  local stamp="$K8S_VERSION"
  local cmd
  for cmd in "${K8S_COMMANDS[@]}"; do stamp+=" $cmd"; done
  if stamp_matches kubernetes "$stamp"; then
    echo "kubernetes $K8S_VERSION already in $BIN"
    return
  fi
  local mod="$WORK/kubernetes"
  mkdir -p "$mod"
  local minor="v0.${K8S_VERSION#v1.}"
  {
    echo "module example/kbuild"
    echo "go 1.26.0"
    echo "require k8s.io/kubernetes $K8S_VERSION"
    local m
    for m in "${K8S_STAGING[@]}"; do echo "replace k8s.io/$m => k8s.io/$m $minor"; done
  } >"$mod/go.mod"
  echo "package kbuild" >"$mod/kbuild.go"
  local pkgs=()
  for cmd in "${K8S_COMMANDS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$cmd"); done
  echo "building kubernetes $K8S_VERSION (${K8S_COMMANDS[*]}); ~11 min cold on an idle machine, ~2 min to relink with warm Go caches"
  (
    cd "$mod"
    GOFLAGS="-mod=mod -buildvcs=false" "${NICE[@]}" go get "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION"
    # Without the -X flag the binaries report v0.0.0-master, and the kubelet/apiserver
    # version skew checks and `kubectl version` become meaningless.
    GOFLAGS="-mod=mod -buildvcs=false" "${NICE[@]}" go build -trimpath \
      -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION" -o "$BIN/" "${pkgs[@]}"
  )
  echo "$stamp" >"$BIN/.kubernetes"
}

build_etcd() {
  if stamp_matches etcd "$ETCD_VERSION"; then
    echo "etcd $ETCD_VERSION already in $BIN"
    return
  fi
  local mod="$WORK/etcd"
  mkdir -p "$mod"
  {
    echo "module example/etcdbuild"
    echo "go 1.26.0"
    echo "require go.etcd.io/etcd/server/v3 $ETCD_VERSION"
    local m
    for m in api/v3 client/pkg/v3 client/v3 pkg/v3; do
      echo "replace go.etcd.io/etcd/$m => go.etcd.io/etcd/$m $ETCD_VERSION"
    done
  } >"$mod/go.mod"
  echo "package etcdbuild" >"$mod/etcdbuild.go"
  echo "building etcd $ETCD_VERSION"
  (
    cd "$mod"
    GOFLAGS="-mod=mod -buildvcs=false" "${NICE[@]}" go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
    GOFLAGS="-mod=mod -buildvcs=false" "${NICE[@]}" go build -trimpath -ldflags "-s -w" \
      -o "$BIN/etcd" go.etcd.io/etcd/server/v3
  )
  echo "$ETCD_VERSION" >"$BIN/.etcd"
}

build_coredns() {
  if stamp_matches coredns "$COREDNS_VERSION"; then
    echo "coredns $COREDNS_VERSION already in $BIN"
    return
  fi
  echo "building coredns $COREDNS_VERSION"
  GOBIN="$BIN" GOFLAGS="-buildvcs=false" "${NICE[@]}" go install -trimpath -ldflags "-s -w" \
    "github.com/coredns/coredns@$COREDNS_VERSION"
  echo "$COREDNS_VERSION" >"$BIN/.coredns"
}

# The pause binary is the pod sandbox's only process: it holds the pod's namespaces and
# reaps orphans. Built here because no registry can serve registry.k8s.io/pause.
build_pause() {
  local src="$ROOT/tools/cluster/pause/main.go"
  local sum
  sum="$(sha256sum "$src" | cut -d' ' -f1)"
  if stamp_matches pause "$sum"; then
    echo "pause already in $BIN"
    return
  fi
  local mod="$WORK/pause"
  mkdir -p "$mod"
  cp "$src" "$mod/main.go"
  printf 'module example/pause\ngo 1.26.0\n' >"$mod/go.mod"
  (cd "$mod" && GOFLAGS="-buildvcs=false" "${NICE[@]}" go build -trimpath -ldflags "-s -w" -o "$BIN/pause" .)
  echo "$sum" >"$BIN/.pause"
}

build_pause
build_etcd
build_coredns
build_kubernetes
"$BIN/kubectl" version --client
"$BIN/etcd" --version | sed -n 1p
"$BIN/coredns" -version | sed -n 1p
