#!/usr/bin/env bash
# Build the cluster's own tiny images with buildah into .cache/cluster-images (idempotent):
# the pod sandbox ("pause"), CoreDNS and a busybox for smoke tests and volume helpers.
#
# No registry can be reached, so registry.k8s.io/pause and the CoreDNS image cannot be
# pulled. Each image is a static binary on an empty base, saved as a docker-archive that
# tools/cluster/up.sh imports into the node's containerd (every NAME.tar whose image,
# named in NAME.ref, containerd does not have yet).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BUILDAH=(buildah --root "$ROOT/.cache/buildah/root" --runroot /run/synpref-buildah --storage-driver vfs)
mkdir -p "$IMAGES"

# build_image NAME IMAGE ROOTFS ENTRYPOINT_JSON: commit ROOTFS as IMAGE, save it as NAME.tar.
build_image() {
  local name="$1" image="$2" rootfs="$3" entrypoint="$4"
  local archive="$IMAGES/$name.tar" stamp="$IMAGES/.$name"
  local sum
  sum="$( (cd "$rootfs" && find . -printf '%p %l %m\n' | sort && find . -type f -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1)"
  sum+=" $image $entrypoint"
  if [[ -f "$archive" && -f "$IMAGES/$name.ref" && "$(cat "$stamp" 2>/dev/null)" == "$sum" ]]; then
    log "image $image already in $archive"
    return
  fi
  log "building image $image"
  local container
  container="$("${BUILDAH[@]}" from scratch)"
  "${BUILDAH[@]}" copy "$container" "$rootfs" / >/dev/null
  "${BUILDAH[@]}" config --entrypoint "$entrypoint" --cmd '' --user 65534:65534 \
    --env PATH=/bin "$container"
  "${BUILDAH[@]}" commit --quiet --rm "$container" "$image" >/dev/null
  rm -f "$archive"
  "${BUILDAH[@]}" push --quiet "$image" "docker-archive:$archive:$image"
  echo "$sum" >"$stamp"
  echo "$image" >"$IMAGES/$name.ref"
}

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# Every image gets a passwd and group file, so that numeric users have names in logs.
base_rootfs() {
  local dir="$1"
  mkdir -p "$dir/etc" "$dir/tmp"
  chmod 1777 "$dir/tmp"
  printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' >"$dir/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$dir/etc/group"
}

base_rootfs "$scratch/pause"
install -D -m 0755 "$BIN/pause" "$scratch/pause/pause"
build_image pause "$PAUSE_IMAGE" "$scratch/pause" '["/pause"]'

base_rootfs "$scratch/coredns"
install -D -m 0755 "$BIN/coredns" "$scratch/coredns/coredns"
build_image coredns "$COREDNS_IMAGE" "$scratch/coredns" '["/coredns"]'

base_rootfs "$scratch/busybox"
install -D -m 0755 /bin/busybox "$scratch/busybox/bin/busybox"
for applet in $(/bin/busybox --list); do
  [[ "$applet" == busybox ]] || ln -sf busybox "$scratch/busybox/bin/$applet"
done
build_image busybox "$BUSYBOX_IMAGE" "$scratch/busybox" '["/bin/sh"]'

ls -l "$IMAGES"/*.tar
