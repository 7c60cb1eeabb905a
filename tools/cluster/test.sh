#!/usr/bin/env bash
# The cluster part of `make test`: build and start the single-node cluster, build the project's
# images into it, run tests/cluster, tear the cluster down (also on failure or Ctrl-C).
#
#   bash tools/cluster/test.sh [pytest args...]
#
# A machine that cannot host the cluster (not root, no Go toolchain, no cgroup or overlayfs, too
# little disk) runs tests/cluster anyway, with SYNPREF_CLUSTER_UNAVAILABLE set to the reason: every
# cluster test is then skipped and pytest prints that reason. SYNPREF_CLUSTER_TESTS=0 is the user's
# own opt-out (a laptop without root), reported the same way. Cold, on 2 cores: ~15 min to build
# Kubernetes, etcd and CoreDNS, ~15 min for the images, ~12 min of tests; warm: a minute to start.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PY="${PY:-$ROOT/.venv/bin/python}"
# The CPU image's layers hold the venv several times over during a build (measured peak ~36 GB).
NEED_DISK_GB="${SYNPREF_CLUSTER_DISK_GB:-40}"

unavailable() {
  if [[ "${SYNPREF_CLUSTER_TESTS:-1}" == 0 ]]; then
    echo "SYNPREF_CLUSTER_TESTS=0"
    return
  fi
  [[ "$(id -u)" == 0 ]] || { echo "not root: the node needs root (containerd, kubelet, routes)"; return; }
  command -v go >/dev/null || [[ -x /usr/local/go/bin/go ]] || { echo "no Go toolchain to build Kubernetes"; return; }
  command -v apt-get >/dev/null || { echo "no apt-get for containerd, runc and buildah"; return; }
  [[ -d /sys/fs/cgroup ]] || { echo "no /sys/fs/cgroup"; return; }
  grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null ||
    { echo "no overlay filesystem for containerd"; return; }
  mkdir -p "$ROOT/.cache"
  local free_gb
  free_gb=$(($(df -Pk "$ROOT/.cache" | awk 'NR==2 {print $4}') / 1024 / 1024))
  # What is already built needs no room again.
  local cached_gb
  cached_gb=$(($(du -sk "$ROOT/.cache/buildah-project" "$ROOT/.cache/containerd" 2>/dev/null |
    awk '{s += $1} END {print s + 0}') / 1024 / 1024))
  ((free_gb + cached_gb >= NEED_DISK_GB)) ||
    { echo "${free_gb} GB free under .cache, the images need ~${NEED_DISK_GB} GB"; return; }
}

reason="$(unavailable)"
if [[ -n "$reason" ]]; then
  log "cluster tests skipped: $reason"
  SYNPREF_CLUSTER_UNAVAILABLE="$reason" exec "$PY" -m pytest tests/cluster "$@"
fi

started=$SECONDS
trap 'bash "$ROOT/tools/cluster/down.sh"' EXIT
bash "$ROOT/tools/cluster/up.sh" || exit 1
log "cluster up after $((SECONDS - started))s"
images_started=$SECONDS
bash "$ROOT/tools/cluster/project-images.sh" cpu kafka || exit 1
# The kubelet lists a node's images in its status only at its next status update (up to a minute).
node_lists_images() {
  local listed
  listed="$(kubectl_admin get nodes -o jsonpath='{.items[*].status.images[*].names}')" || return 1
  grep -q 'localhost/synpref/cpu:dev' <<<"$listed" && grep -q 'localhost/synpref/kafka:' <<<"$listed"
}
wait_for "the node to list the project's images" 180 node_lists_images || exit 1
log "project images on the node after $((SECONDS - images_started))s"
# What the tests run on, in the CI log: versions, the node's runtime, the images' digests.
log "Kubernetes $(kubectl_admin version -o json | jq -r '.serverVersion.gitVersion'), node runtime" \
  "$(kubectl_admin get nodes -o jsonpath='{.items[0].status.nodeInfo.containerRuntimeVersion}')"
kubectl_admin get nodes -o json |
  jq -r '.items[0].status.images[] | select(any((.names // [])[]; startswith("localhost/synpref/"))) | .names | join(" ")' |
  while read -r names; do log "image $names"; done
tests_started=$SECONDS
# This machine hosts the cluster: a test that finds none fails instead of skipping. The tests' own
# figures (timings, outcomes, reward gaps) are logged at INFO, shown live.
KUBECONFIG="$KUBECONFIG_ADMIN" SYNPREF_CLUSTER_REQUIRED=1 "$PY" -m pytest tests/cluster -m cluster \
  -o log_cli=true -o log_cli_level=INFO "$@"
rc=$?
log "cluster tests exited $rc after $((SECONDS - tests_started))s; cluster part $((SECONDS - started))s in all"
exit $rc
