#!/usr/bin/env bash
# Builds the test control plane (kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl, etcd, kwok, helm) from Go modules and caches the binaries under
# ~/.cache/fedkube/k8s-testenv/<key>, keyed on this script and the modules' sums.
# Prints the directory holding the binaries. A warm cache costs nothing.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
K8S_VERSION=v1.34.4
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.19.5

key=$(cat "$here/build.sh" "$here"/kubernetes/go.{mod,sum} "$here"/etcd/go.{mod,sum} | sha256sum | cut -c1-16)
cache=${FEDKUBE_CACHE:-$HOME/.cache/fedkube}/k8s-testenv
dest=$cache/$key
if [[ -f $dest/.complete ]]; then
    echo "$dest"
    exit 0
fi

command -v go >/dev/null || { echo "build.sh: the Go toolchain is needed (go not on PATH)" >&2; exit 1; }
tmp=$cache/.build-$key-$$
rm -rf "$tmp"
mkdir -p "$tmp/bin" "$tmp/kwok-stages"
trap 'rm -rf "$tmp"' EXIT
export CGO_ENABLED=0 GOFLAGS=-mod=mod
log() { echo "[k8s-testenv $(date +%T)] $*" >&2; }

minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
k8s_ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"

log "etcd"
(cd "$here/etcd" && go build -trimpath -ldflags "-s -w" -o "$tmp/bin/etcd" go.etcd.io/etcd/server/v3)
log "kwok $KWOK_VERSION"
GOBIN=$tmp/bin go install -trimpath -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
cp -r "$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage/." "$tmp/kwok-stages/"
chmod -R u+w "$tmp/kwok-stages"
log "helm $HELM_VERSION"
GOBIN=$tmp/bin go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
for cmd in kubectl kube-scheduler kube-controller-manager kube-apiserver; do
    log "$cmd $K8S_VERSION"
    (cd "$here/kubernetes" && go build -trimpath -ldflags "$k8s_ldflags" -o "$tmp/bin/$cmd" "k8s.io/kubernetes/cmd/$cmd")
done
touch "$tmp/.complete"
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
log "built in $SECONDS s"
echo "$dest"
