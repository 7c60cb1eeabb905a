#!/usr/bin/env bash
# Make the cluster's CA, serving and client certificates, service-account key and
# kubeconfigs under .cache/cluster/pki (sourced by up.sh; a fresh set every run).
# shellcheck shell=bash

# sign NAME SUBJECT [SANS]: a key and a CA-signed certificate NAME.{key,crt} in $PKI.
sign() {
  local name="$1" subject="$2" sans="${3:-}"
  local ext="$PKI/$name.ext"
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [[ -n "$sans" ]]; then
      echo "extendedKeyUsage=serverAuth,clientAuth"
      echo "subjectAltName=$sans"
    else
      echo "extendedKeyUsage=clientAuth"
    fi
  } >"$ext"
  openssl req -new -newkey rsa:2048 -nodes -keyout "$PKI/$name.key" -subj "$subject" \
    -out "$PKI/$name.csr" 2>/dev/null
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
    -CAcreateserial -days 30 -extfile "$ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$ext"
}

# kubeconfig FILE USER: a kubeconfig for the client certificate $PKI/USER.{crt,key}.
kubeconfig() {
  local file="$1" user="$2"
  local kc=("$BIN/kubectl" --kubeconfig "$file")
  "${kc[@]}" config set-cluster synpref --server "https://$NODE_IP:$APISERVER_PORT" \
    --certificate-authority "$PKI/ca.crt" --embed-certs >/dev/null
  "${kc[@]}" config set-credentials "$user" --client-certificate "$PKI/$user.crt" \
    --client-key "$PKI/$user.key" --embed-certs >/dev/null
  "${kc[@]}" config set-context synpref --cluster synpref --user "$user" >/dev/null
  "${kc[@]}" config use-context synpref >/dev/null
}

make_pki() {
  mkdir -p "$PKI"
  chmod 700 "$PKI"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=synpref-cluster-ca" \
    -keyout "$PKI/ca.key" -out "$PKI/ca.crt" 2>/dev/null
  local apiserver_sans="IP:$NODE_IP,IP:$KUBERNETES_SERVICE_IP,IP:127.0.0.1,DNS:localhost"
  apiserver_sans+=",DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
  apiserver_sans+=",DNS:kubernetes.default.svc.$CLUSTER_DOMAIN"
  sign apiserver "/CN=kube-apiserver" "$apiserver_sans"
  sign kubelet-serving "/CN=$NODE_NAME" "IP:$NODE_IP,DNS:$NODE_NAME"
  sign admin "/O=system:masters/CN=synpref-admin"
  sign apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  sign controller-manager "/CN=system:kube-controller-manager"
  sign scheduler "/CN=system:kube-scheduler"
  sign kubelet "/O=system:nodes/CN=system:node:$NODE_NAME"
  sign kube-proxy "/CN=system:kube-proxy"
  openssl genrsa -out "$PKI/service-account.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/service-account.key" -pubout -out "$PKI/service-account.pub" 2>/dev/null
  kubeconfig "$KUBECONFIG_ADMIN" admin
  local user
  for user in controller-manager scheduler kubelet kube-proxy; do
    kubeconfig "$STATE/$user.kubeconfig" "$user"
  done
}
