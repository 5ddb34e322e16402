#!/usr/bin/env bash
# A container engine for the tests that build and run real images (tests/containers/, the Cloud
# Build and Cloud Run fakes). Cached, idempotent, safe to run from parallel sessions.
#
#   tests/containers.sh install   make an engine ready; prints its name (docker or podman) on stdout
#   tests/containers.sh status    prints the engine name, or the reason there is none (exit 3)
#
# Which engine: LSDEPLOY_TEST_ENGINE=docker|podman forces one; otherwise a Docker engine that
# answers `docker info` is used as it is (nothing is installed or built), else podman.
# podman: installed with Debian's packages (podman, buildah, runc, debootstrap, podman-compose)
# when missing, which needs root and apt-get; the settings this needs are added to the engine's
# configuration only where the machine's own configuration does not set them (a drop-in file, the
# user's containers.conf is never rewritten). Docker Hub may be out of reach, so the base image
# `python:3.11-slim` is a local stand-in: Debian bookworm (Python 3.11) bootstrapped with
# debootstrap once (the tarball is cached under ${LSDEPLOY_CACHE:-$HOME/.cache/lsdeploy}/containers).
#
# Where no engine can be had (no root, no apt-get), `install` prints one line saying why, records
# it for the tests (they skip with that reason) and exits 3. Any other failure exits 1.
set -euo pipefail

CACHE="${LSDEPLOY_CACHE:-$HOME/.cache/lsdeploy}/containers"
BASE_TAG="docker.io/library/python:3.11-slim"
ROOTFS_TAG="localhost/lsdeploy-debian-python:bookworm"
TARBALL="$CACHE/bookworm-python-minbase.tar"
UNAVAILABLE="$CACHE/unavailable"
DROPIN_DIR="/etc/containers/containers.conf.d"
DROPIN="$DROPIN_DIR/50-lsdeploy-tests.conf"
PACKAGES=(podman buildah runc debootstrap podman-compose)
# shellcheck source=tests/progress.sh
. "$(dirname "$0")/progress.sh"

unavailable() {
    mkdir -p "$CACHE"
    echo "$1" >"$UNAVAILABLE"
    echo "no container engine: $1" >&2
    exit 3
}

docker_answers() {
    command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1
}

debian_mirror() {
    local uri
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    if [ -z "$uri" ]; then
        uri=$(awk '$1 == "deb" && $0 ~ / bookworm / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

install_packages() {
    local missing=()
    command -v podman >/dev/null 2>&1 || missing+=(podman)
    command -v buildah >/dev/null 2>&1 || missing+=(buildah)
    command -v runc >/dev/null 2>&1 || missing+=(runc)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    command -v podman-compose >/dev/null 2>&1 || missing+=(podman-compose)
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        unavailable "${missing[*]} not installed, and installing them needs root (apt-get install ${PACKAGES[*]})"
    fi
    command -v apt-get >/dev/null 2>&1 \
        || unavailable "${missing[*]} not installed, and this machine has no apt-get to install them"
    echo "installing ${missing[*]} with apt-get (about a minute, once)" >&2
    run_with_progress "apt-get update" "$CACHE/apt.log" apt-get update -q || exit 1
    run_with_progress "apt-get install ${missing[*]}" "$CACHE/apt-install.log" \
        env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${PACKAGES[@]}" uidmap slirp4netns fuse-overlayfs || exit 1
}

# The settings this sandbox needs, each only where podman's own configuration leaves it unset:
# default_ulimits (the engine may not raise limits beyond the hard ones; crun/runc otherwise fail
# with "setrlimit RLIMIT_NPROC: Operation not permitted"), the host's CA bundle in every container
# (package registries may be reached through a CA only the host knows: pip inside a build needs
# it), runtime runc (crun refuses cgroups in hybrid mode).
configure() {
    [ "$(id -u)" -eq 0 ] || return 0
    local nofile
    nofile=$(ulimit -Hn)
    [ "$nofile" = unlimited ] && nofile=1048576
    mkdir -p "$DROPIN_DIR"
    NOFILE="$nofile" DROPIN="$DROPIN" python3 - <<'PY'
import os, pathlib, re

try:
    import tomllib
except ImportError:  # Python < 3.11: the tables and keys are all this needs
    tomllib = None


def tables(text):
    if tomllib is not None:
        return tomllib.loads(text)
    found, table = {}, None
    for line in text.splitlines():
        header = re.match(r"\s*\[([^\]]+)\]", line)
        key = re.match(r"\s*([A-Za-z0-9_]+)\s*=", line)
        if header:
            table = found.setdefault(header.group(1).strip(), {})
        elif key and table is not None:
            table[key.group(1)] = True
    return found


dropin = pathlib.Path(os.environ["DROPIN"])
# Everything the machine already configures, except our own drop-in (rewritten below).
paths = [pathlib.Path("/usr/share/containers/containers.conf"), pathlib.Path("/etc/containers/containers.conf")]
paths += sorted(p for p in dropin.parent.glob("*.conf") if p != dropin)
have = {}
for path in paths:
    try:
        data = tables(path.read_text())
    except (OSError, ValueError):  # tomllib.TOMLDecodeError is a ValueError
        continue
    for table, values in data.items():
        if isinstance(values, dict):
            have.setdefault(table, set()).update(values)
nofile = os.environ["NOFILE"]
wanted = {
    "containers": {
        "default_ulimits": f'["nofile={nofile}:{nofile}", "nproc=32768:32768"]',
        "volumes": '["/etc/ssl/certs:/etc/ssl/certs:ro"]',
    },
    "engine": {"runtime": '"runc"'},
}
lines = ["# Written by lsdeploy's tests/containers.sh: only settings no other file sets."]
for table, values in wanted.items():
    missing = {k: v for k, v in values.items() if k not in have.get(table, set())}
    if missing:
        lines.append(f"[{table}]")
        lines += [f"{k} = {v}" for k, v in missing.items()]
text = "\n".join(lines) + "\n"
if not dropin.exists() or dropin.read_text() != text:
    dropin.write_text(text)
PY
}

build_base() {
    if podman image exists "$BASE_TAG" 2>/dev/null; then
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || unavailable "the base image $BASE_TAG is missing, and bootstrapping it needs root"
    if [ ! -f "$TARBALL" ]; then
        local rootfs="$CACHE/rootfs.tmp"
        rm -rf "$rootfs"
        echo "bootstrapping Debian bookworm with Python 3.11 for the base image (3-4 minutes, once)" >&2
        run_with_progress "debootstrap bookworm" "$CACHE/debootstrap.log" \
            debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
            bookworm "$rootfs" "$(debian_mirror)" || exit 1
        # Only what an image needs: no apt lists or caches.
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
        tar -C "$rootfs" -cf "$TARBALL.tmp" .
        mv "$TARBALL.tmp" "$TARBALL"
        rm -rf "$rootfs"
    fi
    podman import "$TARBALL" "$ROOTFS_TAG" >>"$CACHE/base.log" 2>&1
    local dir
    dir=$(mktemp -d)
    # The two differences from python:3.11-slim that matter to a Dockerfile: pip may install into
    # the system Python, and `python`/`pip` are on PATH.
    cat >"$dir/Containerfile" <<EOF
FROM $ROOTFS_TAG
RUN rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED && ln -s /usr/bin/python3 /usr/local/bin/python && ln -s /usr/bin/pip3 /usr/local/bin/pip
ENV LANG=C.UTF-8
EOF
    podman build --pull=never -q -t "$BASE_TAG" "$dir" >>"$CACHE/base.log" 2>&1 || { cat "$CACHE/base.log" >&2; exit 1; }
    rm -rf "$dir"
}

install_podman() {
    install_packages
    configure
    build_base
    podman info >/dev/null 2>&1 || { podman info >&2 || true; echo "podman is installed but does not work (podman info failed)" >&2; exit 1; }
}

install() {
    mkdir -p "$CACHE"
    local forced="${LSDEPLOY_TEST_ENGINE:-}"
    case "$forced" in
        ""|docker|podman) ;;
        *) echo "LSDEPLOY_TEST_ENGINE must be docker or podman, not '$forced'" >&2; exit 2 ;;
    esac
    if [ "$forced" = docker ] || { [ -z "$forced" ] && docker_answers; }; then
        docker_answers || unavailable "LSDEPLOY_TEST_ENGINE=docker, but \`docker info\` does not answer (is the Docker daemon running?)"
        rm -f "$UNAVAILABLE"
        echo docker
        return 0
    fi
    exec 9>"$CACHE/.install.lock"
    flock 9
    install_podman
    flock -u 9
    rm -f "$UNAVAILABLE"
    echo podman
}

status() {
    local forced="${LSDEPLOY_TEST_ENGINE:-}"
    if [ "$forced" != podman ] && docker_answers; then echo docker; return 0; fi
    if [ "$forced" != docker ] && command -v podman >/dev/null 2>&1 && podman image exists "$BASE_TAG" 2>/dev/null; then
        echo podman
        return 0
    fi
    if [ -f "$UNAVAILABLE" ]; then
        cat "$UNAVAILABLE"
    else
        echo "not installed: run bash tests/containers.sh install"
    fi
    exit 3
}

case "${1:-}" in
    install) install ;;
    status) status ;;
    *) echo "usage: $0 install | status" >&2; exit 2 ;;
esac
