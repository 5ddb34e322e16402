"""cloudbuild.yaml's deploy step with Label Studio: the key comes from Secret Manager through
`availableSecrets`/`secretEnv`, the URL and project from substitutions; the deployed backend
(the Cloud Run fake runs it as a local process) is registered and serves predictions."""
from __future__ import annotations

import json

import pytest

from gcs_emulator import GCSEmulator
from test_cloudbuild import (PROJECT, REGION, LocalBuild, base_env, create_backend, load, store_secret,
                             to_build, venv_volume)
from test_labelstudio import NEGATIVE, POSITIVE, choices, retrieve_predictions

from lsdeploy.providers.gcp import GcpClients

pytestmark = pytest.mark.e2e


@pytest.fixture
def gcs(tmp_path):
    emulator = GCSEmulator(tmp_path / "fake-gcs").start()
    yield emulator
    emulator.stop()


def test_deploy_step_registers_with_label_studio(label_studio, ls_api, project, make_gcp_fakes, gcs, tmp_path):
    cloud = make_gcp_fakes(runner=True, storage_url=gcs.url)
    workspace = create_backend(tmp_path / "workspace", "text-classifier")
    pid = project(POSITIVE[:1] + NEGATIVE[:1])
    clients = GcpClients.from_env(cloud.env, PROJECT)
    store_secret(clients, "team-ls-key", label_studio.legacy_token)
    local = LocalBuild(to_build(load()), workspace, venv_volume(tmp_path / "volume"),
                       {**base_env(tmp_path / "home"), **cloud.env}, {
                           "PROJECT_ID": PROJECT, "_REGION": REGION, "_SERVICE": "cb-e2e",
                           "_LABEL_STUDIO_URL": label_studio.url, "_LABEL_STUDIO_PROJECT": str(pid),
                           "_LABEL_STUDIO_API_KEY_SECRET": "team-ls-key", "_DEPLOY_ARGS": "--min-instances 0"},
                       secrets=clients.secrets)

    done = local.run("deploy", timeout=900)
    assert done.returncode == 0, done.stderr
    assert label_studio.legacy_token not in done.stdout + done.stderr
    result = json.loads(done.stdout)
    (registration,) = result["registrations"]
    assert registration["state"] == "CO" and registration["basic_auth"] is True
    backend = ls_api.get_backend(registration["backend_id"])
    assert backend["url"].rstrip("/") == result["url"]

    # the service gets the key as a Secret Manager reference of its own, never a plain value
    service = clients.services.get_service(name=f"projects/{PROJECT}/locations/{REGION}/services/cb-e2e")
    env = {e.name: e for e in service.template.containers[0].env}
    assert env["LABEL_STUDIO_API_KEY"].value == ""
    assert env["LABEL_STUDIO_API_KEY"].value_source.secret_key_ref.secret.endswith("/secrets/cb-e2e-label-studio-api-key")

    predictions = retrieve_predictions(ls_api, pid)
    assert len(predictions) == 2 and all(len(p) == 1 and choices(p[0]) for p in predictions.values())
