#!/usr/bin/env bash
# Builds the images a real Kubernetes test node runs, with no container registry: the Pod
# sandbox's pause (pause.c, static) and fedkube (deploy/Dockerfile) on a Debian base made
# by mmdebstrap and tagged as the Dockerfile's python:3.11-slim. Each is cached under
# ~/.cache/fedkube/images as a docker-archive tar keyed on its inputs (this script
# included), built only when missing, for `ctr -n k8s.io images import`. Prints
#   pause=<tar>
#   fedkube=<tar>
# on stdout; logs on stderr. A warm cache costs nothing (not even buildah).
#
# The fedkube build reaches no PyPI (its egress re-signs TLS with a CA the base does not
# trust), so the wheels are built here, on the host, and mounted for the build's RUN steps
# only (`buildah bud -v`): never in a layer. On /mnt, which the base has: a mount point of
# its own would be left, empty, in the image.
#
# Needs root, buildah, mmdebstrap, gcc and libc.a (libc6-dev), and a Python 3.11 with pip
# for the wheels: FEDKUBE_HOST_PYTHON, by default .venv/bin/python (`make install`).
# buildah's own STORAGE_DRIVER (overlay or vfs) is honoured; BUILDAH_ISOLATION defaults
# to chroot, which needs neither runc nor a network namespace.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${FEDKUBE_CACHE:-$HOME/.cache/fedkube}/images
host_python=${FEDKUBE_HOST_PYTHON:-$repo/.venv/bin/python}
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}

PAUSE_REF=localhost/fedkube/pause:3.10
BASE_REF=docker.io/library/python:3.11-slim
FEDKUBE_REF=localhost/fedkube:dev
SUITE=bookworm
# python-is-python3: the Dockerfile runs `python`, which Debian names python3.
BASE_PACKAGES=python3,python3-venv,python3-pip,python-is-python3,ca-certificates
MIRRORS=(
    "deb http://deb.debian.org/debian $SUITE main"
    "deb http://deb.debian.org/debian $SUITE-updates main"
    "deb http://deb.debian.org/debian-security $SUITE-security main"
)
KEEP=3  # cache entries of each kind kept (the newest)

start=$SECONDS
log() { echo "[image +$((SECONDS - start))s] $*" >&2; }
die() { echo "build.sh: $*" >&2; exit 1; }
key_of() { sha256sum | cut -c1-16; }

# The inputs of each entry. fedkube's: the files the Dockerfile copies, as tracked by git
# (the build context holds exactly these, whatever else lies in the tree).
mapfile -d '' src_files < <(cd "$repo" && git ls-files -z -- fedkube \
    | while IFS= read -r -d '' f; do [[ -f $f ]] && printf '%s\0' "$f"; done)
src_files+=(deploy/Dockerfile pyproject.toml README.md)
script_key=$(key_of <"$here/build.sh")
pause_key=$(cat "$here/build.sh" "$here/pause.c" | key_of)
base_key=$script_key
wheels_key=$(cat "$here/build.sh" "$repo/pyproject.toml" | key_of)
fedkube_key=$( { echo "$base_key $wheels_key"; cat "$here/build.sh"
                 (cd "$repo" && sha256sum -- "${src_files[@]}"); } | key_of)

pause_tar=$cache/pause-$pause_key.tar
base_tar=$cache/python-3.11-slim-$base_key.tar
wheels=$cache/wheels-$wheels_key
fedkube_tar=$cache/fedkube-$fedkube_key.tar

if [[ -f $pause_tar && -f $fedkube_tar ]]; then
    echo "pause=$pause_tar"
    echo "fedkube=$fedkube_tar"
    exit 0
fi

[[ $(id -u) == 0 ]] || die "needs root (buildah, mmdebstrap)"
for cmd in buildah mmdebstrap gcc; do
    command -v $cmd >/dev/null || die "$cmd is needed (apt-get install buildah mmdebstrap gcc libc6-dev)"
done
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9  # one build at a time; the entries are then looked at again
tmp=$(mktemp -d "$cache/.build-XXXXXX")
ctrs=()  # buildah's working containers, removed should a step fail
cleanup() {
    local c
    for c in "${ctrs[@]}"; do buildah rm "$c" >/dev/null 2>&1 || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT

# Removes all but the newest $KEEP entries of one kind: $cache/$1*$2.
prune() {
    local entries=() old
    mapfile -t entries < <(ls -1td -- "$cache/$1"*"$2" 2>/dev/null)
    for old in "${entries[@]:KEEP}"; do rm -rf -- "$old"; done
}

# Writes image $1 as a docker-archive tar $2 (atomically), named $1 inside.
export_image() {
    rm -f "$tmp/export.tar"
    buildah push -q "$1" "docker-archive:$tmp/export.tar:$1" >&2
    mv "$tmp/export.tar" "$2"
}

image_id() { buildah inspect --type image --format '{{.FromImageID}}' "$1" 2>/dev/null || true; }

# Removes image $1 (an id) if no name is left on it: the one a rebuild of a ref replaced.
drop_untagged() {
    [[ -n $1 ]] || return 0
    if buildah images --noheading --no-trunc --format '{{.ID}} {{.Name}}' \
            | awk -v id="$1" '$1 == id || $1 == "sha256:" id {print $2}' | grep -qvx '<none>'; then
        return 0
    fi
    buildah rmi "$1" >/dev/null 2>&1 || true
}

build_pause() {
    log "pause: gcc -static"
    gcc -static -Os -s -Wall -Wextra -Werror -o "$tmp/pause" "$here/pause.c"
    local old c
    old=$(image_id "$PAUSE_REF")
    c=$(buildah from scratch); ctrs+=("$c")
    buildah copy --chmod 0755 "$c" "$tmp/pause" /pause >/dev/null
    # As registry.k8s.io/pause: an unprivileged user, /pause the entrypoint.
    buildah config --entrypoint '["/pause"]' --cmd '' --user 65535:65535 \
        --label "fedkube.image.key=$pause_key" "$c"
    buildah commit -q --rm "$c" "$PAUSE_REF" >/dev/null; ctrs=()
    drop_untagged "$old"
    export_image "$PAUSE_REF" "$pause_tar"
    prune pause- .tar
}

build_base() {
    log "base: mmdebstrap $SUITE minbase + $BASE_PACKAGES"
    # Docs, man pages and translations left out, as in the slim images (copyrights kept).
    mmdebstrap --variant=minbase --include="$BASE_PACKAGES" --skip=output/dev \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook='rm -f "$1"/usr/lib/python3.*/EXTERNALLY-MANAGED' \
        "$SUITE" "$tmp/rootfs.tar" "${MIRRORS[@]}" >&2
    log "base: rootfs $(du -m "$tmp/rootfs.tar" | cut -f1) MB; committing $BASE_REF"
    local old c mnt
    old=$(image_id "$BASE_REF")
    c=$(buildah from scratch); ctrs+=("$c")
    mnt=$(buildah mount "$c")
    tar -C "$mnt" --numeric-owner -xpf "$tmp/rootfs.tar"
    buildah umount "$c" >/dev/null
    rm -f "$tmp/rootfs.tar"
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd '["python3"]' --label "fedkube.image.key=$base_key" "$c"
    buildah commit -q --rm "$c" "$BASE_REF" >/dev/null; ctrs=()
    drop_untagged "$old"
    export_image "$BASE_REF" "$base_tar"
    prune python-3.11-slim- .tar
}

# The base in buildah's storage: this key's, loaded from its tar or built.
ensure_base() {
    local have
    have=$(buildah inspect --type image \
        --format '{{index .OCIv1.Config.Labels "fedkube.image.key"}}' "$BASE_REF" 2>/dev/null || true)
    [[ $have == "$base_key" ]] && return 0
    if [[ -f $base_tar ]]; then
        log "base: loading $base_tar"
        local old
        old=$(image_id "$BASE_REF")
        buildah pull -q "docker-archive:$base_tar" >/dev/null
        drop_untagged "$old"
    else
        build_base
    fi
}

build_wheels() {
    [[ -d $wheels ]] && return 0
    [[ -x $host_python ]] || die "no $host_python: run \`make install\` (or set FEDKUBE_HOST_PYTHON)"
    "$host_python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
        || die "$host_python is not Python 3.11, the base's"
    log "wheels: pip wheel (fedkube's dependencies and build requirements)"
    # The requirements from pyproject.toml; fedkube itself is built in the image, from its
    # sources, so the tree here gets no build/ directory.
    "$host_python" - "$repo/pyproject.toml" >"$tmp/requirements.txt" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)
print("\n".join(project["build-system"]["requires"] + project["project"]["dependencies"]))
EOF
    "$host_python" -m pip wheel -q --wheel-dir "$tmp/wheels" -r "$tmp/requirements.txt" >&2
    mv "$tmp/wheels" "$wheels"
    log "wheels: $(ls "$wheels" | wc -l) in $(du -sm "$wheels" | cut -f1) MB"
    prune wheels- ""
}

build_fedkube() {
    ensure_base
    build_wheels
    local ctx=$tmp/context old c user
    mkdir -p "$ctx"
    (cd "$repo" && cp --parents -- "${src_files[@]}" "$ctx/")
    # Keyed on what is built: a file another hand changed since the key was taken moves it.
    local key
    key=$( { echo "$base_key $wheels_key"; cat "$here/build.sh"
             (cd "$ctx" && sha256sum -- "${src_files[@]}"); } | key_of)
    if [[ $key != "$fedkube_key" ]]; then
        log "fedkube: the sources changed meanwhile; key $fedkube_key -> $key"
        fedkube_key=$key fedkube_tar=$cache/fedkube-$key.tar
    fi
    old=$(image_id "$FEDKUBE_REF")
    log "fedkube: buildah bud deploy/Dockerfile ($BUILDAH_ISOLATION isolation)"
    buildah bud --pull=never -f "$ctx/deploy/Dockerfile" \
        --build-arg PIP_INSTALL_FLAGS="--no-index --find-links /mnt" \
        -v "$wheels:/mnt:ro" --label "fedkube.image.key=$fedkube_key" \
        -t "$FEDKUBE_REF" "$ctx" >&2
    drop_untagged "$old"
    user=$(buildah inspect --type image --format '{{.OCIv1.Config.User}}' "$FEDKUBE_REF")
    [[ $user == 10001:10001 ]] || die "$FEDKUBE_REF runs as '$user', not 10001:10001"
    log "fedkube: smoke check (fedkube --help as $user)"
    c=$(buildah from -q --pull=never "$FEDKUBE_REF"); ctrs+=("$c")
    buildah run "$c" -- fedkube --help >/dev/null || die "$FEDKUBE_REF: \`fedkube --help\` failed"
    buildah rm "$c" >/dev/null; ctrs=()
    export_image "$FEDKUBE_REF" "$fedkube_tar"
    prune fedkube- .tar
}

[[ -f $pause_tar ]] || build_pause
[[ -f $fedkube_tar ]] || build_fedkube
log "done: pause $(du -m "$pause_tar" | cut -f1) MB, fedkube $(du -m "$fedkube_tar" | cut -f1) MB"
echo "pause=$pause_tar"
echo "fedkube=$fedkube_tar"
