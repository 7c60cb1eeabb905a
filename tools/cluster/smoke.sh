#!/usr/bin/env bash
# Prove the running cluster works: a namespace, a Service behind a Deployment, a Job that
# resolves the Service through the in-cluster DNS, fetches from it, writes to a bound PVC
# and checks that pods have no way out of the node, then the versions.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

NS="synpref-smoke"
pid_alive kube-apiserver || die "no cluster is running (make cluster)"
started=$SECONDS
kubectl_admin delete namespace "$NS" --ignore-not-found --wait=true >/dev/null
kubectl_admin create namespace "$NS" >/dev/null
export BUSYBOX_IMAGE NS CLUSTER_DOMAIN
envsubst '${BUSYBOX_IMAGE} ${NS} ${CLUSTER_DOMAIN}' <"$ROOT/tools/cluster/smoke.yaml" |
  kubectl_admin apply -f - >/dev/null

wait_for "PVC smoke-data to bind" 60 \
  bash -c "[[ \$(\"$BIN/kubectl\" --kubeconfig '$KUBECONFIG_ADMIN' -n $NS get pvc smoke-data -o jsonpath='{.status.phase}') == Bound ]]"
if ! kubectl_admin -n "$NS" wait --for=condition=complete job/smoke --timeout=120s >/dev/null; then
  kubectl_admin -n "$NS" describe job/smoke pods >&2 || true
  kubectl_admin -n "$NS" logs job/smoke >&2 || true
  die "job smoke did not complete"
fi

echo "--- job smoke (Complete) logs:"
kubectl_admin -n "$NS" logs job/smoke
echo "--- pvc: $(kubectl_admin -n "$NS" get pvc smoke-data -o jsonpath='{.status.phase} {.spec.volumeName} {.status.capacity.storage}')"
echo "--- service web: $(kubectl_admin -n "$NS" get service web -o jsonpath='{.spec.clusterIP}')"
echo "--- kubernetes: $(kubectl_admin version -o json | jq -r '"client \(.clientVersion.gitVersion), server \(.serverVersion.gitVersion)"')"
echo "--- node $NODE_NAME: $(kubectl_admin get node "$NODE_NAME" -o jsonpath='{.status.nodeInfo.containerRuntimeVersion}, kubelet {.status.nodeInfo.kubeletVersion}')"
kubectl_admin delete namespace "$NS" --wait=false >/dev/null
log "smoke passed in $((SECONDS - started))s"
