#!/usr/bin/env bash
# Install (cached) and run a real Label Studio for the e2e tests.
#
#   tests/labelstudio.sh install          create the cached venv when missing; prints its python
#   tests/labelstudio.sh start PORT DIR   run Label Studio on 127.0.0.1:PORT with data dir DIR
#                                         (foreground; exec so the caller's pid is Label Studio's)
#
# The venv lives OUTSIDE the package's dependencies, under
# ${LSDEPLOY_CACHE:-$HOME/.cache/lsdeploy}/label-studio-$LABEL_STUDIO_VERSION and is reused.
# Environment for `start`: LS_USERNAME, LS_PASSWORD, LS_TOKEN (known user and legacy token).
set -euo pipefail

LABEL_STUDIO_VERSION="${LABEL_STUDIO_VERSION:-1.23.2}"
CACHE="${LSDEPLOY_CACHE:-$HOME/.cache/lsdeploy}"
VENV="$CACHE/label-studio-$LABEL_STUDIO_VERSION"
PYTHON_BIN="${LABEL_STUDIO_PYTHON:-python3}"
# shellcheck source=tests/progress.sh
. "$(dirname "$0")/progress.sh"

install() {
    if [ -x "$VENV/bin/label-studio" ] && [ -f "$VENV/.installed" ]; then
        echo "$VENV/bin/python"
        return 0
    fi
    mkdir -p "$CACHE"
    # Serialise concurrent installs (parallel test sessions) on a lock file.
    exec 9>"$CACHE/.label-studio-$LABEL_STUDIO_VERSION.lock"
    flock 9
    if [ ! -f "$VENV/.installed" ]; then
        rm -rf "$VENV"
        echo "installing label-studio==$LABEL_STUDIO_VERSION into $VENV (about 1 GB and a few minutes, once)" >&2
        "$PYTHON_BIN" -m venv "$VENV"
        run_with_progress "installing label-studio==$LABEL_STUDIO_VERSION" "$CACHE/label-studio-install.log" \
            "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off \
            "label-studio==$LABEL_STUDIO_VERSION" || exit 1
        touch "$VENV/.installed"
    fi
    flock -u 9
    echo "$VENV/bin/python"
}

start() {
    local port="$1" data="$2"
    install >/dev/null
    mkdir -p "$data"
    # Label Studio reads LABEL_STUDIO_X, then HEARTEX_X, then bare X: stray values would win.
    unset USERNAME PASSWORD HOST PORT DATA_DIR
    export LABEL_STUDIO_USERNAME="${LS_USERNAME:-admin@example.com}"
    export LABEL_STUDIO_PASSWORD="${LS_PASSWORD:-admin12345}"
    export LABEL_STUDIO_USER_TOKEN="${LS_TOKEN:-lsdeploy-e2e-token-0123456789}"
    export LABEL_STUDIO_HOST="http://127.0.0.1:$port"
    # Label Studio refuses backends (ML_BLOCK_LOCAL_IP) and webhooks (SSRF_PROTECTION_ENABLED) on
    # 127.0.0.1 unless told; LS_ML_BLOCK_LOCAL_IP / LS_SSRF_PROTECTION=true keep its defaults (the
    # tests use that to check the error messages).
    export ML_BLOCK_LOCAL_IP="${LS_ML_BLOCK_LOCAL_IP:-false}" SSRF_PROTECTION_ENABLED="${LS_SSRF_PROTECTION:-false}"
    export COLLECT_ANALYTICS=false LATEST_VERSION_CHECK=false
    export LABEL_STUDIO_BASE_DATA_DIR="$data"
    exec "$VENV/bin/label-studio" start --no-browser --internal-host 127.0.0.1 --port "$port" \
        --data-dir "$data" --enable-legacy-api-token
}

case "${1:-}" in
    install) install ;;
    start) shift; start "$@" ;;
    *) echo "usage: $0 install | start PORT DATA_DIR" >&2; exit 2 ;;
esac
