#!/usr/bin/env bash
# Tear the single-node cluster down (`make cluster-down`); safe to run at any time.
#
# Stops every process by the PID recorded in .cache/cluster/pids (and the containers by
# the PIDs containerd recorded), then removes what the cluster made on the host: the
# pods' network namespaces and mounts, the bridge and the node's dummy interface, the
# routes, the iptables chains, the kubelet's cgroups, and the runtime state.
# --keep-logs leaves .cache/cluster/logs for a look after a failed start; --quiet prints
# nothing when there was nothing to do.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

keep_logs=false
quiet=false
for arg in "$@"; do
  case "$arg" in
    --keep-logs) keep_logs=true ;;
    --quiet) quiet=true ;;
    *) die "unknown argument $arg" ;;
  esac
done
say() { $quiet || log "$@"; }

# running PID: the process exists and is not a zombie waiting for its parent.
running() {
  local state
  state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
  [[ -n "$state" && "$state" != Z ]]
}

# stop_pid PID WHAT [GRACE]: SIGTERM, then SIGKILL if it still runs after GRACE seconds
# (20 by default; 0 kills at once).
stop_pid() {
  local pid="$1" what="$2" grace="${3:-20}"
  running "$pid" || return 0
  say "stopping $what (pid $pid)"
  local deadline=$((SECONDS + grace))
  if ((grace > 0)); then
    kill -TERM "$pid" 2>/dev/null
    while running "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
  fi
  if running "$pid"; then
    kill -KILL "$pid" 2>/dev/null
    deadline=$((SECONDS + 10))
    while running "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
  fi
}

stop_recorded() {
  local name="$1" file="$PIDS/$1.pid"
  [[ -f "$file" ]] || return 0
  stop_pid "$(cat "$file")" "$name"
  rm -f "$file"
}

# The kubelet goes first, so that it does not restart the containers stopped below.
stop_recorded kube-proxy
stop_recorded kubelet
stop_recorded kube-scheduler
stop_recorded kube-controller-manager

# Containers: containerd keeps each task's PIDs in its bundle (init.pid, shim.pid), and
# each pod sandbox's network namespace is named in its OCI spec. All of it is read before
# anything is stopped, since containerd deletes a bundle as soon as its task has exited.
netns_files=()
container_pids=()
shim_pids=()
for bundle in "$CONTAINERD_STATE"/io.containerd.runtime.v2.task/k8s.io/*/; do
  [[ -d "$bundle" ]] || continue
  if [[ -f "$bundle/config.json" ]]; then
    netns="$(jq -r '.linux.namespaces[]? | select(.type == "network") | .path // empty' "$bundle/config.json")"
    # Only a sandbox names a file under /var/run/netns (a symlink to /run here);
    # its containers join the sandbox's namespace through /proc.
    [[ "$netns" == /var/run/netns/* || "$netns" == /run/netns/* ]] && netns_files+=("/run/netns/${netns##*/}")
  fi
  [[ -f "$bundle/init.pid" ]] && container_pids+=("$(cat "$bundle/init.pid")")
  [[ -f "$bundle/shim.pid" ]] && shim_pids+=("$(cat "$bundle/shim.pid")")
done
# The cluster is going away: no grace period for its containers.
for pid in "${container_pids[@]}"; do stop_pid "$pid" "container process" 0; done
stop_recorded containerd
# A shim outlives containerd by design; stop the ones still there by their recorded PIDs.
for pid in "${shim_pids[@]}"; do stop_pid "$pid" "containerd shim" 5; done
# A shim whose bundle had no shim.pid yet (a sandbox still starting, measured after a test run) is
# found by the socket address it was started with: only this cluster's containerd listens there.
for pid in $(pgrep -f -- "containerd-shim-runc-v2 .*-address $CONTAINERD_SOCK( |$)" || true); do
  stop_pid "$pid" "containerd shim (unrecorded)" 5
done
stop_recorded kube-apiserver
stop_recorded etcd

# Mounts under the cluster's directories and the pods' network namespaces, deepest first.
mapfile -t mounts < <(awk '{print $5}' /proc/self/mountinfo | grep -E "^($STATE|$CONTAINERD_STATE|$CONTAINERD_ROOT)/" | sort -r)
mounts+=("${netns_files[@]}")
for mount in "${mounts[@]}"; do
  # A path can be mounted more than once (mount propagation): unmount until it is not.
  while awk -v m="$mount" '$5 == m {found = 1} END {exit !found}' /proc/self/mountinfo; do
    umount "$mount" 2>/dev/null || umount -l "$mount" || break
  done
done
for netns in "${netns_files[@]}"; do rm -f "$netns"; done
((${#mounts[@]})) && say "unmounted ${#mounts[@]} mounts"

# Network. The veth pairs went with the network namespaces.
for link in "$BRIDGE" "$NODE_IFACE"; do
  if ip link show "$link" >/dev/null 2>&1; then
    say "removing link $link"
    ip link del "$link"
  fi
done
for cidr in "$SERVICE_CIDR" "$POD_CIDR"; do
  while [[ -n "$(ip route show type blackhole "$cidr")" ]]; do
    say "removing blackhole route $cidr"
    ip route del blackhole "$cidr"
  done
done
if command -v iptables >/dev/null; then
  while iptables -C FORWARD -j "$FORWARD_CHAIN" 2>/dev/null; do iptables -D FORWARD -j "$FORWARD_CHAIN"; done
  if iptables -S "$FORWARD_CHAIN" >/dev/null 2>&1; then
    say "removing iptables chain $FORWARD_CHAIN"
    iptables -F "$FORWARD_CHAIN"
    iptables -X "$FORWARD_CHAIN"
  fi
  # kube-proxy knows its own rules; the kubelet's canary and firewall chains go after.
  # (grep -c, not -q: an early exit of grep would fail iptables-save's pipe.)
  if [[ -x "$BIN/kube-proxy" ]] && (($(iptables-save | grep -c '^:KUBE-') > 0)); then
    say "removing kube-proxy's and the kubelet's iptables rules"
    "$BIN/kube-proxy" --cleanup >/dev/null 2>&1
    for cmd in iptables ip6tables; do
      for table in filter nat mangle; do
        "$cmd" -t "$table" -S 2>/dev/null | awk '/^-A .* -j KUBE-/ {sub(/^-A/, "-D"); print}' |
          while read -r rule; do eval "$cmd -t $table $rule"; done
        for chain in $("$cmd" -t "$table" -S 2>/dev/null | awk '/^-N KUBE-/ {print $2}'); do
          "$cmd" -t "$table" -F "$chain"
        done
        for chain in $("$cmd" -t "$table" -S 2>/dev/null | awk '/^-N KUBE-/ {print $2}'); do
          "$cmd" -t "$table" -X "$chain"
        done
      done
    done
  fi
fi
if [[ -f "$STATE/ip_forward.before" ]]; then
  cat "$STATE/ip_forward.before" >/proc/sys/net/ipv4/ip_forward
fi
rm -f /var/lib/cni/results/"$CNI_NETWORK"-*
# Host directories that the kubelet or containerd made because they were missing
# (the kubelet writes pod logs to /var/log/pods whatever its root dir is).
if [[ -f "$STATE/created-dirs" ]]; then
  while read -r dir; do
    [[ -n "$dir" && -d "$dir" ]] && rm -rf "$dir"
  done <"$STATE/created-dirs"
fi

# The kubelet's pod cgroups (cgroupfs driver, cgroup v1 plus the unified mount).
for hierarchy in /sys/fs/cgroup/*/; do
  [[ -d "$hierarchy/kubepods" ]] || continue
  say "removing cgroups $hierarchy/kubepods"
  find "$hierarchy/kubepods" -depth -type d -exec rmdir {} + 2>/dev/null
done

if $keep_logs && [[ -d "$LOGS" ]]; then
  find "$STATE" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
else
  rm -rf "$STATE"
fi
rm -rf "$CONTAINERD_STATE"
say "cluster down"
