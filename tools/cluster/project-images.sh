#!/usr/bin/env bash
# Build the project's images from docker/<name>.Dockerfile with buildah, on a Debian base
# made locally by debootstrap, and hand them to the node's containerd (issue 13, item 2).
#
#   bash tools/cluster/project-images.sh [cpu|cuda|kafka]...     (default: cpu)
#
# No registry serves the Dockerfiles' base images here, so the bases are made locally from
# debootstrap's minbase: Debian's Python 3.11 as localhost/python:3.11-slim-bookworm (cpu,
# cuda), Debian's OpenJDK 17 JRE as localhost/debian/openjdk-17-jre:bookworm and that plus
# Maven and the JDK as localhost/debian/maven-openjdk-17:bookworm (kafka). The package
# registries' TLS is re-signed by a CA in the host's bundle: the bundle and a pip.conf naming
# it (for Maven: the host's Java truststore, over the base's own) are mounted read-only into
# the build's RUN steps and nothing of them stays in the image.
# Each image is saved as .cache/cluster-images/synpref-<name>.tar (+ .ref), which
# tools/cluster/up.sh imports; a running cluster gets it imported right away.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PYTHON_BASE="localhost/python:3.11-slim-bookworm"
JRE_BASE="localhost/debian/openjdk-17-jre:bookworm"
MAVEN_BASE="localhost/debian/maven-openjdk-17:bookworm"
SUITE="bookworm"
# The mirror apt already uses on this machine.
MIRROR="$(sed -n 's/^URIs: *\(http[^ ]*debian\)\/* *$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 1p)"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
HOST_CA="${HOST_CA:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
# pip's index inside the build: the one pip uses on the host (PyPI unless configured).
PIP_INDEX="$(pip config get global.index-url 2>/dev/null || true)"
PIP_INDEX="${PIP_INDEX:-https://pypi.org/simple}"
# Maven's JVM trusts a Java truststore, not a PEM bundle: the host's, which Debian's
# ca-certificates-java builds from the same CAs (made from HOST_CA below when missing).
JAVA_TRUSTSTORE="${JAVA_TRUSTSTORE:-/etc/ssl/certs/java/cacerts}"
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

# make_debian_base IMAGE PACKAGES CMD: debootstrap's minbase with PACKAGES (comma-separated),
# committed as IMAGE, once; later runs reuse it.
make_debian_base() {
  local image="$1" packages="$2" cmd="$3"
  "${BUILDAH[@]}" inspect --type image "$image" >/dev/null 2>&1 && return 0
  log "debootstrap $SUITE with $packages from $MIRROR"
  local started=$SECONDS rootfs="$scratch/rootfs"
  nice -n 19 debootstrap --variant=minbase --include="$packages" \
    "$SUITE" "$rootfs" "$MIRROR" >"$scratch/debootstrap.log" 2>&1 ||
    { tail -20 "$scratch/debootstrap.log" >&2; die "debootstrap failed"; }
  rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
  tar -C "$rootfs" -cf "$scratch/rootfs.tar" .
  local container
  container="$("${BUILDAH[@]}" from scratch)"
  "${BUILDAH[@]}" add "$container" "$scratch/rootfs.tar" / >/dev/null
  "${BUILDAH[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd "$cmd" "$container"
  "${BUILDAH[@]}" commit --quiet --rm "$container" "$image" >/dev/null
  rm -rf "$rootfs" "$scratch/rootfs.tar"
  log "base $image in $((SECONDS - started))s"
}

# The Maven builder: the JRE base plus Debian's maven and JDK, installed with apt (Debian's
# mirror is plain HTTP; apt checks the packages' signatures itself).
make_maven_base() {
  "${BUILDAH[@]}" inspect --type image "$MAVEN_BASE" >/dev/null 2>&1 && return 0
  make_debian_base "$JRE_BASE" openjdk-17-jre-headless,ca-certificates java
  log "adding maven and openjdk-17-jdk-headless to $JRE_BASE"
  local started=$SECONDS container
  container="$("${BUILDAH[@]}" from --pull=never "$JRE_BASE")"
  nice -n 19 "${BUILDAH[@]}" run --isolation=chroot "$container" -- sh -c \
    'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends maven openjdk-17-jdk-headless && apt-get clean && rm -rf /var/lib/apt/lists/*' \
    >"$scratch/apt.log" 2>&1 || { tail -20 "$scratch/apt.log" >&2; die "apt-get in $JRE_BASE failed"; }
  "${BUILDAH[@]}" config --cmd mvn "$container"
  "${BUILDAH[@]}" commit --quiet --rm "$container" "$MAVEN_BASE" >/dev/null
  log "base $MAVEN_BASE in $((SECONDS - started))s"
}

# A JKS truststore made from the PEM bundle, for hosts without Debian's Java cacerts.
truststore_from_bundle() {
  local store="$1" i=0 cert
  csplit -s -z -f "$scratch/ca-" "$HOST_CA" '/-----BEGIN CERTIFICATE-----/' '{*}'
  for cert in "$scratch"/ca-*; do
    i=$((i + 1))
    nice -n 19 keytool -importcert -noprompt -storetype JKS -keystore "$store" -storepass changeit \
      -alias "ca-$i" -file "$cert" >/dev/null 2>&1 || die "keytool could not import $cert"
  done
  rm -f "$scratch"/ca-*
}

printf '[global]\ncert = /etc/pip-ca.crt\nindex-url = %s\n' "$PIP_INDEX" >"$scratch/pip.conf"
for name in "${names[@]}"; do
  case "$name" in
    kafka)
      make_maven_base
      make_debian_base "$JRE_BASE" openjdk-17-jre-headless,ca-certificates java
      # Tagged with the Kafka version of tools/kafka/pom.xml, like apache/kafka:<version>.
      kafka_version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$ROOT/tools/kafka/pom.xml")"
      [[ -n "$kafka_version" ]] || die "no <kafka.version> in tools/kafka/pom.xml"
      image="localhost/synpref/kafka:$kafka_version"
      truststore="$JAVA_TRUSTSTORE"
      if [[ ! -f "$truststore" ]]; then
        truststore="$scratch/cacerts"
        truststore_from_bundle "$truststore"
      fi
      # Over the bases' own Java truststore (Debian's ca-certificates-java): the path exists
      # in both stages, so the mount leaves no file behind in the image.
      build_args=(--build-arg "MAVEN_IMAGE=$MAVEN_BASE" --build-arg "JRE_IMAGE=$JRE_BASE"
        --volume "$truststore:/etc/ssl/certs/java/cacerts:ro")
      ;;
    *)
      make_debian_base "$PYTHON_BASE" python3,python3-venv,python3-pip,python-is-python3,ca-certificates python3
      image="localhost/synpref/$name:dev"
      # The cluster's CPU image also serves the dev judges (`transformers serve`, chart devJudges).
      build_args=(--build-arg "PYTHON_IMAGE=$PYTHON_BASE" --build-arg "TORCH_INDEX=$PIP_INDEX"
        --build-arg "EXTRAS=${SYNPREF_IMAGE_EXTRAS-judge-server}"
        --volume "$HOST_CA:/etc/pip-ca.crt:ro" --volume "$scratch/pip.conf:/etc/pip.conf:ro")
      ;;
  esac
  log "building $image from docker/$name.Dockerfile"
  # A rebuild needs about twice the image's size free (the copied layer, then its commit); the
  # previous archive and, once replaced, the previous image (7 GB each for the CPU image) go first.
  archive="$IMAGES/synpref-$name.tar"
  rm -f "$archive"
  previous="$("${BUILDAH[@]}" images --quiet --no-trunc "$image" 2>/dev/null | sed -n 1p || true)"
  started=$SECONDS
  (
    cd "$ROOT"
    nice -n 19 "${BUILDAH[@]}" bud --isolation=chroot --pull=never --layers "${build_args[@]}" \
      -f "docker/$name.Dockerfile" -t "$image" .
  )
  built=$((SECONDS - started))
  current="$("${BUILDAH[@]}" images --quiet --no-trunc "$image" | sed -n 1p)"
  if [[ -n "$previous" && "$previous" != "$current" ]]; then
    "${BUILDAH[@]}" rmi "$previous" >/dev/null 2>&1 || log "kept the previous $image ($previous): still in use"
  fi
  "${BUILDAH[@]}" push --quiet "$image" "docker-archive:$archive:$image"
  echo "$image" >"$IMAGES/synpref-$name.ref"
  size="$("${BUILDAH[@]}" images --format '{{.Size}}' "$image" | sed -n 1p)"
  log "$image built in ${built}s, saved in $((SECONDS - started - built))s: $size, archive $(du -h "$archive" | cut -f1)"
  if pid_alive containerd; then
    started=$SECONDS
    CTR=(ctr --address "$CONTAINERD_SOCK" -n k8s.io)
    old_digest="$("${CTR[@]}" images ls | awk -v ref="$image" '$1 == ref {print $3}')"
    "${CTR[@]}" images import "$archive" >/dev/null
    touch "$IMAGES/synpref-$name.imported"
    # As in up.sh: the CRI plugin's ID name (sha256:...) of the replaced build would pin its 7 GB.
    new_digest="$("${CTR[@]}" images ls | awk -v ref="$image" '$1 == ref {print $3}')"
    if [[ -n "$old_digest" && "$old_digest" != "$new_digest" ]]; then
      "${CTR[@]}" images ls | awk -v d="$old_digest" '$3 == d && $1 ~ /^sha256:/ {print $1}' |
        while read -r stale; do "${CTR[@]}" images rm --sync "$stale" >/dev/null; done
    fi
    log "imported into the node's containerd in $((SECONDS - started))s"
  fi
done
