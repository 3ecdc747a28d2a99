#!/usr/bin/env bash
# Builds the binaries a real Kubernetes node of the test environment runs (kubelet,
# kube-proxy, and a cluster-DNS-only coredns) from the Go modules in node/ and
# coredns/, and caches them under ~/.cache/fedkube/k8s-node/<key>/bin, keyed on this
# script and the modules' go.mod/go.sum. Prints the cache directory (the binaries are
# in its bin/). A warm cache costs nothing. The Debian packages a node needs
# (containerd, runc, CNI plugins, iptables, ...) are installed by host-packages.sh.
#
#   dir=$(tools/k8s-testenv/build-node.sh) && "$dir/bin/kubelet" --version
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
K8S_VERSION=v1.34.4     # must match node/go.mod (checked below)
COREDNS_VERSION=v1.15.0 # must match coredns/go.mod (checked below)

key=$(cat "$here/build-node.sh" "$here"/node/go.{mod,sum} "$here"/coredns/go.{mod,sum} | sha256sum | cut -c1-16)
cache=${FEDKUBE_CACHE:-$HOME/.cache/fedkube}/k8s-node
dest=$cache/$key
if [[ -f $dest/.complete ]]; then
    echo "$dest"
    exit 0
fi

command -v go >/dev/null || { echo "build-node.sh: the Go toolchain is needed (go not on PATH)" >&2; exit 1; }
log() { echo "[k8s-node $(date +%T) +${SECONDS}s] $*" >&2; }
export CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false"

# The versions stamped into the binaries must be the ones the modules pin.
have=$(cd "$here/node" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
[[ $have == "$K8S_VERSION" ]] || { echo "build-node.sh: node/go.mod pins k8s.io/kubernetes $have, script says $K8S_VERSION" >&2; exit 1; }
have=$(cd "$here/coredns" && go list -m -f '{{.Version}}' github.com/coredns/coredns)
[[ $have == "$COREDNS_VERSION" ]] || { echo "build-node.sh: coredns/go.mod pins coredns $have, script says $COREDNS_VERSION" >&2; exit 1; }

tmp=$cache/.build-$key-$$
rm -rf "$tmp"
mkdir -p "$tmp/bin"
trap 'rm -rf "$tmp"' EXIT

minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
k8s_ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"

for cmd in kubelet kube-proxy; do
    t0=$SECONDS
    log "$cmd $K8S_VERSION"
    (cd "$here/node" && go build -trimpath -ldflags "$k8s_ldflags" -o "$tmp/bin/$cmd" "k8s.io/kubernetes/cmd/$cmd")
    log "$cmd done in $((SECONDS - t0)) s"
done
t0=$SECONDS
log "coredns $COREDNS_VERSION"
(cd "$here/coredns" && go build -trimpath \
    -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION-fedkube" \
    -o "$tmp/bin/coredns" .)
log "coredns done in $((SECONDS - t0)) s"

touch "$tmp/.complete"
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
log "built in $SECONDS s"
echo "$dest"
