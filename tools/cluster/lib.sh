# Shared settings of the single-node cluster scripts (sourced, not run).
#
# Addresses: the node's InternalIP is 198.51.100.10 (TEST-NET-2, RFC 5737) on a dummy
# interface that these scripts create, because the kubelet refuses a loopback node IP and
# 192.0.2.0/24 is already this VM's uplink. Nothing outside this machine owns these ranges
# from our point of view: every address below lives on a link that the scripts make.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BIN="$ROOT/.cache/cluster-bin"
IMAGES="$ROOT/.cache/cluster-images"
# Runtime state of one cluster run: pids, logs, certs, kubeconfigs, etcd, kubelet.
STATE="$ROOT/.cache/cluster"
PIDS="$STATE/pids"
LOGS="$STATE/logs"
PKI="$STATE/pki"
KUBECONFIG_ADMIN="$STATE/admin.kubeconfig"
# containerd's image store outlives a cluster run, so a warm start imports nothing.
CONTAINERD_ROOT="$ROOT/.cache/containerd"
# containerd's runtime state (task bundles, sockets) belongs on tmpfs.
CONTAINERD_STATE="/run/synpref-containerd"
CONTAINERD_SOCK="$CONTAINERD_STATE/containerd.sock"
KUBELET_DIR="$STATE/kubelet"

NODE_NAME="$(hostname)"
NODE_IFACE="synpref-node"
NODE_IP="198.51.100.10"
BRIDGE="synpref0"
POD_CIDR="10.244.0.0/24"
POD_GATEWAY="10.244.0.1"
SERVICE_CIDR="10.96.0.0/16"
KUBERNETES_SERVICE_IP="10.96.0.1"
DNS_SERVICE_IP="10.96.0.10"
CLUSTER_DOMAIN="cluster.local"
APISERVER_PORT=6443
ETCD_CLIENT_PORT=12379
ETCD_PEER_PORT=12380
CNI_NETWORK="synpref"
FORWARD_CHAIN="SYNPREF-FORWARD"

PAUSE_IMAGE="localhost/synpref/pause:1"
BUSYBOX_IMAGE="localhost/synpref/busybox:1.35"
COREDNS_IMAGE="localhost/synpref/coredns:v1.15.0"

export PATH="$BIN:$PATH"

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*"; }
die() {
  echo "tools/cluster: $*" >&2
  exit 1
}

# wait_for DESCRIPTION SECONDS COMMAND...: poll COMMAND until it succeeds or time runs out.
wait_for() {
  local what="$1" seconds="$2"
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      echo "tools/cluster: timed out after ${seconds}s waiting for $what" >&2
      return 1
    fi
    sleep 0.5
  done
}

kubectl_admin() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

# pid_alive NAME: the process recorded in pids/NAME.pid still runs.
pid_alive() {
  local file="$PIDS/$1.pid"
  [[ -f "$file" ]] && kill -0 "$(cat "$file")" 2>/dev/null
}
