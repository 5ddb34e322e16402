"""`deploy gcp --training job` end to end: the Google API fakes run the deployed text-classifier as
a local process and its training job's executions as `label-studio-ml train /app --project P`
processes (tests/fakes/cloudrun_jobs.py), a real fake-gcs-server holds the model state both share,
and a real Label Studio registers the backend, sends annotation webhooks and shows the version the
job trained. A task killed by the test (SIGKILL through the fake) is retried by its execution
(CLOUD_RUN_TASK_ATTEMPT=1) and no event is lost."""
from __future__ import annotations

import json

import pytest
import requests

from labelstudio_server import import_tasks, tasks_of, wait_label_studio_version
from lsdeploy.model import next_version
from lsdeploy.providers.gcp import GcpClients
from support import run_cli, wait_for
from test_labelstudio import NEGATIVE, POSITIVE, annotate, choices, retrieve_predictions

pytestmark = pytest.mark.e2e
GCP_PROJECT = "e2e-project"


@pytest.fixture
def gcs(own_emulator):
    return own_emulator  # buckets named after the project: an emulator of its own


def bumped(version: str, times: int) -> str:
    for _ in range(times):
        version = next_version(version)
    return version


def executions(cloud) -> list:
    with cloud.server.lock:
        return sorted(cloud.jobs.executions.values(), key=lambda e: e.message.create_time.ToNanoseconds())


def test_annotations_train_in_job_executions_and_label_studio_shows_the_version(
        label_studio, ls_api, project, make_gcp_fakes, gcs, tmp_path):
    cloud = make_gcp_fakes(runner=True, storage_url=gcs.url)
    directory = tmp_path / "sentiment"
    assert run_cli("create", directory, "--blueprint", "text-classifier").returncode == 0
    pid = project(POSITIVE[:3] + NEGATIVE[:3])
    env = {**cloud.env, "GCP_PROJECT": GCP_PROJECT, "GCP_REGION": "us-central1",
           "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.legacy_token,
           "LSDEPLOY_MIN_INSTANCES": "0", "LSDEPLOY_TRAINING_MODE": "job", "LSDEPLOY_TRAINING_MAX_RETRIES": "2"}
    done = run_cli("deploy", "gcp", directory, "--project", pid, "--json", env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["training_job"].endswith("/jobs/sentiment-train") and result["training_job_action"] == "created"
    (registration,) = result["registrations"]
    assert registration["state"] == "CO"
    start = registration["model_version"]
    service = requests.Session()
    secrets = GcpClients.from_env(cloud.env, GCP_PROJECT).secrets
    password = secrets.access_secret_version(
        name=f"projects/{GCP_PROJECT}/secrets/sentiment-basic-auth-pass/versions/latest").payload.data.decode()
    service.auth = (result["basic_auth_user"], password)

    def served_version():
        return service.get(f"{result['url']}/versions?project={pid}", timeout=10).json()["model_version"]

    # annotations in Label Studio: the webhooks start executions, which train; the service serves the result
    tasks = {t["data"]["text"]: t["id"] for t in tasks_of(ls_api, pid)}
    for text in POSITIVE[:2]:
        annotate(ls_api, tasks[text], "Positive")
    for text in NEGATIVE[:2]:
        annotate(ls_api, tasks[text], "Negative")
    trained = bumped(start, 4)  # each annotation adds an example: one new version per event
    wait_for(lambda: served_version() == trained, timeout=300, interval=0.5,
             message=f"the service to serve version {trained} trained by the job")
    runs = executions(cloud)
    assert runs, "the webhooks started no execution"
    wait_for(lambda: all(e.done.is_set() for e in executions(cloud)), timeout=120, interval=0.2,
             message="the executions to end")
    assert all(e.message.succeeded_count == 1 and e.message.failed_count == 0 for e in executions(cloud))
    assert {e.message.task_count for e in runs} == {1}
    wait_label_studio_version(ls_api, registration["backend_id"], trained)
    new_id, = import_tasks(ls_api, pid, [NEGATIVE[0]])
    preds = retrieve_predictions(ls_api, pid)[new_id]
    assert choices(preds[0]) == ["Negative"] and preds[0]["model_version"] == trained

    status = run_cli("status", "sentiment", "--json", env=env, timeout=120)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["training_job"] == result["training_job"]
    assert shown["executions"] and {e["state"] for e in shown["executions"]} == {"succeeded"}

    # a task killed by the test is retried by its execution, and its event still trains
    before = len(executions(cloud))
    cloud.jobs.freeze_attempts = True
    annotate(ls_api, tasks[POSITIVE[2]], "Positive")
    wait_for(lambda: len(executions(cloud)) > before, timeout=120, interval=0.1,
             message="the webhook to start an execution")
    killed = executions(cloud)[-1]
    execution_id = killed.message.name.rsplit("/", 1)[-1]
    cloud.jobs.wait_attempt(execution_id, 0)
    cloud.jobs.freeze_attempts = False
    assert cloud.jobs.kill_task(execution_id) == 0
    cloud.jobs.wait_attempt(execution_id, 1)
    wait_for(killed.done.is_set, timeout=300, interval=0.2, message="the retried execution to end")
    assert killed.message.succeeded_count == 1 and killed.message.retried_count == 1
    assert [attempt for _, attempt, _ in killed.attempts] == [0, 1] and killed.attempts[0][2] == -9
    again = bumped(trained, 1)
    wait_for(lambda: served_version() == again, timeout=120, interval=0.5,
             message=f"the service to serve version {again} (the killed task's event, trained on retry)")
    wait_label_studio_version(ls_api, registration["backend_id"], again)
