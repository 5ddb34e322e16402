"""`deploy gcp` end to end: the Google API fakes run the deployed backend as a local process, a
real Label Studio registers it (basic auth from Secret Manager), gets predictions and trains it."""
from __future__ import annotations

import json

import pytest
import requests

from labelstudio_server import import_tasks, tasks_of, wait_label_studio_version, wait_trained
from lsdeploy.providers.gcp import GcpClients
from support import run_cli
from test_labelstudio import NEGATIVE, POSITIVE, annotate, choices, retrieve_predictions


pytestmark = pytest.mark.e2e


def basic_auth_password(cloud, gcp_project, service):
    """The password deploy generated for the service, read back from the Secret Manager fake."""
    secrets = GcpClients.from_env(cloud.env, gcp_project).secrets
    name = f"projects/{gcp_project}/secrets/{service}-basic-auth-pass/versions/latest"
    return secrets.access_secret_version(name=name).payload.data.decode()


@pytest.fixture
def gcs(own_emulator):
    return own_emulator  # buckets named after the project: an emulator of its own


def test_deploy_registers_and_label_studio_gets_predictions(label_studio, ls_api, project, make_gcp_fakes, gcs,
                                                            tmp_path):
    cloud = make_gcp_fakes(runner=True, storage_url=gcs.url)
    directory = tmp_path / "sentiment"
    assert run_cli("create", directory, "--blueprint", "text-classifier").returncode == 0
    pid = project(POSITIVE[:2] + NEGATIVE[:2])
    env = {**cloud.env, "GCP_PROJECT": "e2e-project", "GCP_REGION": "us-central1",
           "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.legacy_token,
           "LSDEPLOY_MIN_INSTANCES": "0"}
    done = run_cli("deploy", "gcp", directory, "--project", pid, "--json", env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert label_studio.legacy_token not in done.stdout + done.stderr
    (registration,) = result["registrations"]
    assert registration["state"] == "CO" and registration["basic_auth"] is True
    assert result["label_studio_backend_ids"] == [registration["backend_id"]]
    backend = ls_api.get_backend(registration["backend_id"])
    assert backend["url"].rstrip("/") == result["url"] and backend["auth_method"] == "BASIC_AUTH"

    predictions = retrieve_predictions(ls_api, pid)
    assert len(predictions) == 4
    for preds in predictions.values():
        assert len(preds) == 1 and choices(preds[0])

    # training: annotations reach the deployed backend through the webhook (basic auth header)
    tasks = {t["data"]["text"]: t["id"] for t in tasks_of(ls_api, pid)}
    for text in POSITIVE[:2]:
        annotate(ls_api, tasks[text], "Positive")
    for text in NEGATIVE[:2]:
        annotate(ls_api, tasks[text], "Negative")
    # Wait for the training of all four (each webhook is one fit), then for the version it left.
    service = requests.Session()
    service.auth = (result["basic_auth_user"], basic_auth_password(cloud, "e2e-project", result["service"]))
    wait_trained(lambda path: service.get(result["url"] + path, timeout=10), 4, "ANNOTATION_CREATED")
    version = service.get(f"{result['url']}/versions?project={pid}", timeout=10).json()["model_version"]
    assert version != registration["model_version"]
    wait_label_studio_version(ls_api, registration["backend_id"], version)
    new_id, = import_tasks(ls_api, pid, [NEGATIVE[0]])
    preds = retrieve_predictions(ls_api, pid)[new_id]
    assert choices(preds[0]) == ["Negative"] and preds[0]["model_version"] == version

    # an unchanged redeploy changes nothing, Label Studio keeps the same backend
    again = run_cli("deploy", "gcp", directory, "--project", pid, "--json", env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert (second["revision"], second["built"], second["label_studio_backend_ids"]) == \
        (result["revision"], False, result["label_studio_backend_ids"])
    assert len(ls_api.backends(pid)) == 1
