#!/usr/bin/env bash
# Start a single-node Kubernetes cluster on this machine (`make cluster`).
#
# Builds what is missing first (tools/cluster/{install,build,images}.sh), then runs etcd,
# containerd, the control plane, the kubelet and kube-proxy as host processes, each with
# its PID and log under .cache/cluster, and installs CoreDNS and the default StorageClass.
# tools/cluster/down.sh undoes all of it. Network rules: see docs/cluster.md.
set -Eeuo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/pki.sh"

PV_COUNT="${SYNPREF_CLUSTER_PVS:-16}"
PV_SIZE="${SYNPREF_CLUSTER_PV_SIZE:-20Gi}"
started=$SECONDS

[[ "$(id -u)" == 0 ]] || die "the node needs root (containerd, kubelet, iptables, routes)"
if pid_alive kube-apiserver && pid_alive kubelet; then
  log "a cluster is already running; KUBECONFIG=$KUBECONFIG_ADMIN"
  exit 0
fi

bash "$ROOT/tools/cluster/install.sh"
bash "$ROOT/tools/cluster/build.sh"
bash "$ROOT/tools/cluster/images.sh"
# Whatever an earlier, interrupted run left behind goes first.
bash "$ROOT/tools/cluster/down.sh" --quiet

mkdir -p "$PIDS" "$LOGS" "$STATE/cni" "$STATE/ipam" "$KUBELET_DIR" "$STATE/volumes"
# If this script fails half-way, leave nothing running.
trap 'echo "tools/cluster/up.sh failed; logs in $LOGS; tearing down" >&2; bash "$ROOT/tools/cluster/down.sh" --keep-logs' ERR

# start NAME COMMAND...: run COMMAND detached, recording its PID and log.
start() {
  local name="$1"
  shift
  setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$PIDS/$name.pid"
}

# Host directories the kubelet, containerd and the CNI plugins make when missing; the
# ones that do not exist yet are removed again by down.sh.
# (/run/containerd: containerd 1.6 puts its shims' sockets there whatever its state dir.)
for dir in /var/log/pods /var/log/containers /var/run/netns /var/lib/cni /run/containerd; do
  [[ -e "$dir" ]] || echo "$dir" >>"$STATE/created-dirs"
done

log "certificates and kubeconfigs"
make_pki

log "network: $NODE_IFACE $NODE_IP, blackhole routes, forward guard"
cat /proc/sys/net/ipv4/ip_forward >"$STATE/ip_forward.before"
# An empty bridge stands in for a dummy interface: this VM's kernel has no dummy driver.
ip link add "$NODE_IFACE" type bridge
echo 1 >"/proc/sys/net/ipv6/conf/$NODE_IFACE/disable_ipv6"
ip addr add "$NODE_IP/32" dev "$NODE_IFACE"
ip link set "$NODE_IFACE" up
# No packet for a ClusterIP or a pod address may leave by the default route, even while
# kube-proxy or the bridge is down: kube-proxy's DNAT happens before routing, and the
# bridge's own /24 route is more specific than the pod CIDR's blackhole.
ip route add blackhole "$SERVICE_CIDR"
ip route add blackhole "$POD_CIDR" metric 4000
# Pods may talk to each other over the bridge and to this host (INPUT, not FORWARD);
# anything else that would be forwarded into or out of the bridge is dropped.
iptables -N "$FORWARD_CHAIN"
iptables -A "$FORWARD_CHAIN" -i "$BRIDGE" -o "$BRIDGE" -j RETURN
iptables -A "$FORWARD_CHAIN" -i "$BRIDGE" -j DROP
iptables -A "$FORWARD_CHAIN" -o "$BRIDGE" -j DROP
iptables -I FORWARD 1 -j "$FORWARD_CHAIN"

# The bridge plugin without ipMasq: pod traffic is never rewritten to leave the node.
# Pods get routes to the Service CIDR and the node address only, no default route.
cat >"$STATE/cni/10-synpref.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "$CNI_NETWORK",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$STATE/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GATEWAY"}]],
        "routes": [{"dst": "$SERVICE_CIDR"}, {"dst": "$NODE_IP/32"}]
      }
    }
  ]
}
JSON
# Pods never see the host's resolver: an empty resolv.conf for the kubelet means
# ClusterFirst pods get only the in-cluster DNS, and "Default" pods get no DNS at all.
: >"$STATE/resolv.conf"

log "etcd"
start etcd "$BIN/etcd" --name synpref --data-dir "$STATE/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
  --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "synpref=http://127.0.0.1:$ETCD_PEER_PORT" \
  --unsafe-no-fsync --log-level warn

log "containerd"
mkdir -p "$CONTAINERD_ROOT" "$CONTAINERD_STATE"
cat >"$STATE/containerd.toml" <<TOML
version = 2
root = "$CONTAINERD_ROOT"
state = "$CONTAINERD_STATE"
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$CONTAINERD_STATE/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$CONTAINERD_ROOT/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # This VM lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj below the parent's.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "$CONTAINERD_STATE/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni"
    max_conf_num = 1
TOML
start containerd containerd --config "$STATE/containerd.toml"
CTR=(ctr --address "$CONTAINERD_SOCK" -n k8s.io)
wait_for "containerd" 30 "${CTR[@]}" version
# Every locally built image (NAME.tar, its reference in NAME.ref) that containerd lacks, or whose
# archive is newer than its last import (NAME.imported): a rebuilt image keeps its tag (:dev), and
# a check by name alone kept serving the stale one.
for ref_file in "$IMAGES"/*.ref; do
  image="$(cat "$ref_file")"
  archive="${ref_file%.ref}.tar"
  stamp="${ref_file%.ref}.imported"
  if ! "${CTR[@]}" images ls -q | grep -xF "$image" >/dev/null || [[ "$archive" -nt "$stamp" ]]; then
    log "importing $image"
    old_digest="$("${CTR[@]}" images ls | awk -v ref="$image" '$1 == ref {print $3}')"
    "${CTR[@]}" images import "$archive" >/dev/null
    touch "$stamp"
    new_digest="$("${CTR[@]}" images ls | awk -v ref="$image" '$1 == ref {print $3}')"
    # The CRI plugin also names each image by its ID (sha256:...). After a re-import of a new
    # build, that name still pins the replaced one (7 GB for the CPU image): drop it.
    if [[ -n "$old_digest" && "$old_digest" != "$new_digest" ]]; then
      "${CTR[@]}" images ls | awk -v d="$old_digest" '$3 == d && $1 ~ /^sha256:/ {print $1}' |
        while read -r stale; do
          "${CTR[@]}" images rm --sync "$stale" >/dev/null
        done
    fi
  fi
done

log "kube-apiserver"
wait_for "etcd" 30 curl -fsS "http://127.0.0.1:$ETCD_CLIENT_PORT/health"
start kube-apiserver "$BIN/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_CLIENT_PORT" \
  --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port "$APISERVER_PORT" \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
  --allow-privileged=true --anonymous-auth=false --profiling=false \
  --client-ca-file "$PKI/ca.crt" \
  --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
  --kubelet-certificate-authority "$PKI/ca.crt" \
  --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
  --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
  --kubelet-preferred-address-types InternalIP,Hostname \
  --service-account-issuer "https://kubernetes.default.svc.$CLUSTER_DOMAIN" \
  --service-account-key-file "$PKI/service-account.pub" \
  --service-account-signing-key-file "$PKI/service-account.key"
wait_for "kube-apiserver /readyz" 120 kubectl_admin get --raw /readyz

log "kube-controller-manager and kube-scheduler"
BUSYBOX_IMAGE="$BUSYBOX_IMAGE" envsubst '${BUSYBOX_IMAGE}' <"$ROOT/tools/cluster/addons/recycler-pod.yaml" >"$STATE/recycler-pod.yaml"
start kube-controller-manager "$BIN/kube-controller-manager" \
  --kubeconfig "$STATE/controller-manager.kubeconfig" \
  --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
  --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 --leader-elect=false --use-service-account-credentials \
  --service-account-private-key-file "$PKI/service-account.key" --root-ca-file "$PKI/ca.crt" \
  --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --pv-recycler-pod-template-filepath-hostpath "$STATE/recycler-pod.yaml"
start kube-scheduler "$BIN/kube-scheduler" \
  --kubeconfig "$STATE/scheduler.kubeconfig" \
  --authentication-kubeconfig "$STATE/scheduler.kubeconfig" \
  --authorization-kubeconfig "$STATE/scheduler.kubeconfig" \
  --bind-address 127.0.0.1 --leader-elect=false

log "kubelet"
cat >"$STATE/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
clusterDomain: $CLUSTER_DOMAIN
clusterDNS: [$DNS_SERVICE_IP]
resolvConf: $STATE/resolv.conf
# containerd 1.6 lacks the RuntimeConfig call, so the kubelet needs cgroupfs named here.
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, nodefs.inodesFree: 1%, imagefs.available: 1%}
# Our images cannot be pulled again, so the image GC must not remove them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
YAML
start kubelet "$BIN/kubelet" --config "$STATE/kubelet.yaml" \
  --kubeconfig "$STATE/kubelet.kubeconfig" --root-dir "$KUBELET_DIR" \
  --node-ip "$NODE_IP" --hostname-override "$NODE_NAME"
wait_for "node $NODE_NAME to register" 90 kubectl_admin get node "$NODE_NAME"

log "kube-proxy"
cat >"$STATE/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $STATE/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: $POD_CIDR
# Masquerade only what comes from outside the pod CIDR (and hairpin traffic); the
# destinations are always endpoints on this node.
iptables: {masqueradeAll: false}
nodePortAddresses: ["$NODE_IP/32"]
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Leave the host's conntrack sysctls as they are.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
start kube-proxy "$BIN/kube-proxy" --config "$STATE/kube-proxy.yaml"
# Nothing may use a Service before kube-proxy has programmed it.
wait_for "kube-proxy rules for the kubernetes Service" 60 \
  bash -c "iptables -t nat -S KUBE-SERVICES | grep -- '-d $KUBERNETES_SERVICE_IP/32' >/dev/null"

log "CoreDNS and storage"
kubectl_admin wait --for=condition=Ready "node/$NODE_NAME" --timeout=90s >/dev/null
export CLUSTER_DOMAIN COREDNS_IMAGE DNS_SERVICE_IP
envsubst '${CLUSTER_DOMAIN} ${COREDNS_IMAGE} ${DNS_SERVICE_IP}' \
  <"$ROOT/tools/cluster/addons/coredns.yaml" | kubectl_admin apply -f - >/dev/null
kubectl_admin apply -f "$ROOT/tools/cluster/addons/storage.yaml" >/dev/null
for i in $(seq -w 1 "$PV_COUNT"); do
  dir="$STATE/volumes/pv$i"
  mkdir -p "$dir"
  # Any pod user may write: a hostPath volume has no fsGroup ownership change.
  chmod 0777 "$dir"
  cat <<YAML
apiVersion: v1
kind: PersistentVolume
metadata: {name: synpref-pv$i, labels: {synpref.dev/pool: standard}}
spec:
  storageClassName: standard
  capacity: {storage: $PV_SIZE}
  accessModes: [ReadWriteOnce, ReadWriteMany]
  persistentVolumeReclaimPolicy: Recycle
  hostPath: {path: $dir, type: Directory}
---
YAML
done | kubectl_admin apply -f - >/dev/null
kubectl_admin -n kube-system rollout status deployment/coredns --timeout=120s >/dev/null

log "cluster ready in $((SECONDS - started))s: KUBECONFIG=$KUBECONFIG_ADMIN"
kubectl_admin get node -o wide
