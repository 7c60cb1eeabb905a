#!/usr/bin/env bash
# Build the project's images from docker/<name>.Dockerfile with buildah, on a Debian base
# made locally by debootstrap, and hand them to the node's containerd (issue 13, item 2).
#
#   bash tools/cluster/project-images.sh [cpu|cuda]...     (default: cpu)
#
# No registry serves python:3.11-slim-bookworm here, so the base is debootstrap's minbase
# plus Debian's Python 3.11, committed as localhost/python:3.11-slim-bookworm. The package
# registries' TLS is re-signed by a CA in the host's bundle: the bundle and a pip.conf naming
# it are mounted read-only into the build's RUN steps and nothing of them stays in the image.
# Each image is saved as .cache/cluster-images/synpref-<name>.tar (+ .ref), which
# tools/cluster/up.sh imports; a running cluster gets it imported right away.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BASE_IMAGE="localhost/python:3.11-slim-bookworm"
SUITE="bookworm"
# The mirror apt already uses on this machine.
MIRROR="$(sed -n 's/^URIs: *\(http[^ ]*debian\)\/* *$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 1p)"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
HOST_CA="${HOST_CA:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
# pip's index inside the build: the one pip uses on the host (PyPI unless configured).
PIP_INDEX="$(pip config get global.index-url 2>/dev/null || true)"
PIP_INDEX="${PIP_INDEX:-https://pypi.org/simple}"
# overlay, not vfs: these images hold gigabytes of wheels in several layers.
BUILDAH=(buildah --root "$ROOT/.cache/buildah-project/root" --runroot /run/synpref-buildah-project
  --storage-driver overlay)

names=("$@")
((${#names[@]})) || names=(cpu)
for name in "${names[@]}"; do
  [[ -f "$ROOT/docker/$name.Dockerfile" ]] || die "no docker/$name.Dockerfile"
done
[[ "$(id -u)" == 0 ]] || die "debootstrap and buildah need root here"
if ! command -v debootstrap >/dev/null; then
  apt-get install -y -q --no-install-recommends debootstrap >/dev/null
fi
mkdir -p "$IMAGES"
scratch="$(mktemp -d "$ROOT/.cache/project-images.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT

if ! "${BUILDAH[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  log "debootstrap $SUITE from $MIRROR"
  started=$SECONDS
  nice -n 10 debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    "$SUITE" "$scratch/rootfs" "$MIRROR" >"$scratch/debootstrap.log" 2>&1 ||
    { tail -20 "$scratch/debootstrap.log" >&2; die "debootstrap failed"; }
  rm -rf "$scratch/rootfs/var/cache/apt/archives/"*.deb "$scratch/rootfs/var/lib/apt/lists/"*
  tar -C "$scratch/rootfs" -cf "$scratch/rootfs.tar" .
  container="$("${BUILDAH[@]}" from scratch)"
  "${BUILDAH[@]}" add "$container" "$scratch/rootfs.tar" / >/dev/null
  "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 "$container"
  "${BUILDAH[@]}" commit --quiet --rm "$container" "$BASE_IMAGE" >/dev/null
  rm -rf "$scratch/rootfs" "$scratch/rootfs.tar"
  log "base $BASE_IMAGE in $((SECONDS - started))s"
fi

printf '[global]\ncert = /etc/pip-ca.crt\nindex-url = %s\n' "$PIP_INDEX" >"$scratch/pip.conf"
for name in "${names[@]}"; do
  image="localhost/synpref/$name:dev"
  log "building $image from docker/$name.Dockerfile"
  started=$SECONDS
  (
    cd "$ROOT"
    nice -n 10 "${BUILDAH[@]}" bud --isolation=chroot --pull=never --layers \
      --build-arg "PYTHON_IMAGE=$BASE_IMAGE" --build-arg "TORCH_INDEX=$PIP_INDEX" \
      --volume "$HOST_CA:/etc/pip-ca.crt:ro" --volume "$scratch/pip.conf:/etc/pip.conf:ro" \
      -f "docker/$name.Dockerfile" -t "$image" .
  )
  built=$((SECONDS - started))
  archive="$IMAGES/synpref-$name.tar"
  rm -f "$archive"
  "${BUILDAH[@]}" push --quiet "$image" "docker-archive:$archive:$image"
  echo "$image" >"$IMAGES/synpref-$name.ref"
  size="$("${BUILDAH[@]}" images --format '{{.Size}}' "$image" | sed -n 1p)"
  log "$image built in ${built}s, saved in $((SECONDS - started - built))s: $size, archive $(du -h "$archive" | cut -f1)"
  if pid_alive containerd; then
    started=$SECONDS
    ctr --address "$CONTAINERD_SOCK" -n k8s.io images import "$archive" >/dev/null
    log "imported into the node's containerd in $((SECONDS - started))s"
  fi
done
