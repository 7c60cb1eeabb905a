#!/usr/bin/env bash
# Install the node's Debian packages (idempotent): containerd, runc, the CNI plugins,
# iptables and conntrack for kube-proxy, buildah and busybox-static for local images, jq for the scripts.
#
# Nothing here starts a service: the cluster scripts run containerd themselves, with
# their own config and state under .cache/cluster, and stop it by its recorded PID.
set -euo pipefail

PACKAGES=(containerd runc containernetworking-plugins iptables conntrack buildah busybox-static jq)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -x 'install ok installed' >/dev/null; then
    missing+=("$pkg")
  fi
done
if ((${#missing[@]} == 0)); then
  echo "node packages already installed"
  exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
  echo "tools/cluster/install.sh: needs root to apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]} with apt-get"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
