#!/usr/bin/env bash
# Installs the Debian packages a real Kubernetes node of the test environment needs
# (container runtime, CNI plugins, the tools kubelet and kube-proxy call, and the
# tools that build the node's images), only those that are missing. A quick no-op
# when all are present. Prints what it installed (nothing when it installed nothing).
# Needs root (or sudo) and the Debian package mirror when something is missing.
set -euo pipefail

# package:command -- the command tells quickly that the package is there; a package
# without one is checked with dpkg.
wanted=(
    containerd:containerd
    runc:runc
    containernetworking-plugins:
    iptables:iptables
    conntrack:conntrack
    socat:socat
    buildah:buildah
    mmdebstrap:mmdebstrap
    busybox-static:
    iproute2:ip
    gcc:gcc
    libc6-dev:
)

is_installed() { dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null | grep -qx installed; }

missing=()
for entry in "${wanted[@]}"; do
    pkg=${entry%%:*} cmd=${entry#*:}
    if [[ -n $cmd ]] && command -v "$cmd" >/dev/null 2>&1; then
        continue
    fi
    is_installed "$pkg" || missing+=("$pkg")
done
((${#missing[@]})) || exit 0

log() { echo "[host-packages $(date +%T)] $*" >&2; }
command -v apt-get >/dev/null || { echo "host-packages.sh: apt-get not found; install by hand: ${missing[*]}" >&2; exit 1; }
sudo=()
if ((EUID != 0)); then
    command -v sudo >/dev/null || { echo "host-packages.sh: run as root to install: ${missing[*]}" >&2; exit 1; }
    sudo=(sudo)
fi
apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -qq)
log "installing ${missing[*]}"
"${apt[@]}" update >&2
"${apt[@]}" install --no-install-recommends "${missing[@]}" >&2
for pkg in "${missing[@]}"; do
    is_installed "$pkg" || { echo "host-packages.sh: $pkg did not install" >&2; exit 1; }
done
log "installed in $SECONDS s"
printf '%s\n' "${missing[@]}"
