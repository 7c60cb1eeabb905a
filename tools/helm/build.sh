#!/usr/bin/env bash
# Build the helm CLI from the Go module proxy into .cache/bin (idempotent).
#
# The tests drive the real helm binary; building it from source through the Go module
# proxy is the only way to get it on machines whose network reaches package registries
# and nothing else. A second run is a no-op when the same build is already there.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.22.0}"
MODULE="helm.sh/helm/v3"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="$ROOT/.cache/bin"
HELM="$BIN/helm"
STAMP="$BIN/.helm-build"

if ! command -v go >/dev/null 2>&1; then
  if [[ -x /usr/local/go/bin/go ]]; then
    PATH="/usr/local/go/bin:$PATH"
  else
    echo "tools/helm/build.sh: the Go toolchain is needed to build helm (apt-get install golang-go)" >&2
    exit 1
  fi
fi

if [[ -x "$HELM" && -f "$STAMP" && "$(cat "$STAMP")" == "$HELM_VERSION" ]]; then
  echo "helm $HELM_VERSION already at $HELM"
  exit 0
fi

# Like helm's own Makefile: the default Kubernetes version that `helm template` and
# `helm lint` assume comes from the client-go the release was built with (v0.X.Y -> 1.X).
# Without it, helm falls back to 1.20 and refuses charts that need a newer cluster.
GOMOD="$(go mod download -json "$MODULE@$HELM_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
CLIENT_GO="$(awk '$1 == "k8s.io/client-go" {print $2; exit}' "$GOMOD")"
K8S_MINOR="$(echo "$CLIENT_GO" | cut -d. -f2)"
if [[ -z "$K8S_MINOR" ]]; then
  echo "tools/helm/build.sh: cannot read the k8s.io/client-go version from $GOMOD" >&2
  exit 1
fi

LDFLAGS="-s -w -X $MODULE/internal/version.version=$HELM_VERSION"
for pkg in pkg/lint/rules pkg/chartutil; do
  LDFLAGS+=" -X $MODULE/$pkg.k8sVersionMajor=1 -X $MODULE/$pkg.k8sVersionMinor=$K8S_MINOR"
done

mkdir -p "$BIN"
echo "building helm $HELM_VERSION (Kubernetes 1.$K8S_MINOR) from the Go module proxy into $BIN (minutes the first time)"
GOBIN="$BIN" CGO_ENABLED=0 GOFLAGS="${GOFLAGS:--buildvcs=false}" go install -trimpath -ldflags "$LDFLAGS" \
  "$MODULE/cmd/helm@$HELM_VERSION"
echo "$HELM_VERSION" >"$STAMP"
"$HELM" version --short
