"""`status` and `destroy` with a real Label Studio: the deployed backend (run by the Cloud Run
fake as a local process) shows as connected, then destroy removes it from the project."""
from __future__ import annotations

import json

import pytest

from support import run_cli

pytestmark = pytest.mark.e2e


def test_status_shows_connected_and_destroy_unregisters(label_studio, ls_api, project, make_gcp_fakes,
                                                        own_emulator, tmp_path):
    cloud = make_gcp_fakes(runner=True, storage_url=own_emulator.url)
    directory = tmp_path / "opsbackend"
    assert run_cli("create", directory).returncode == 0
    pid = project()
    env = {**cloud.env, "GCP_PROJECT": "e2e-project", "GCP_REGION": "us-central1",
           "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.legacy_token,
           "LABEL_STUDIO_PROJECT": str(pid), "LSDEPLOY_MIN_INSTANCES": "0"}
    done = run_cli("deploy", "gcp", directory, "--json", env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    deployed = json.loads(done.stdout)
    (backend_id,) = deployed["label_studio_backend_ids"]

    status = run_cli("status", "opsbackend", "--json", env=env)
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["label_studio"] == [{"project": pid, "backend_id": backend_id, "state": "CO",
                                     "state_name": "connected", "error_message": ""}]
    assert label_studio.legacy_token not in status.stdout + status.stderr

    gone = run_cli("destroy", "opsbackend", "--yes", "--json", env=env)
    assert gone.returncode == 0, gone.stderr
    result = json.loads(gone.stdout)
    assert result["unregistered"][0]["project"] == pid and result["unregistered"][0]["backend_ids"] == [backend_id]
    assert all(b["id"] != backend_id for b in ls_api.backends(pid))
    assert not cloud.run.services
    assert label_studio.legacy_token not in gone.stdout + gone.stderr
