"""`deploy gcp --training job` with real images: the Cloud Build fake builds the backend with the
container engine (tests/engine.py), the Cloud Run fake serves it in a container, and each attempt of
the training job's executions runs the job's image in a container of its own
(tests/fakes/cloudrun_jobs_containers.py) as `label-studio-ml train /app --project P`, with Cloud
Run's job variables and the service's secrets. Webhooks are POSTed to the service (basic auth), as
Label Studio would send them; the model counts the events it trained on and bumps its version on
each, so the version the service serves says how many events the job trained. A task SIGKILLed
through the fake is retried (CLOUD_RUN_TASK_ATTEMPT=1) and its event still trains. An attempt past
the task timeout (1 s, by RunJob's overrides; frozen so that it cannot handle SIGTERM) is stopped
like Cloud Run stops it: SIGTERM, SIGKILL 10 s later.

Needs an engine (`bash tests/containers.sh install`); without one it skips with the reason, and
tests/e2e/test_training_job_e2e.py runs the same flow with processes.
"""
from __future__ import annotations

import json
import time

import pytest
import requests
from google.cloud import run_v2
from google.protobuf import duration_pb2

from engine import engine, why_no_engine
from fakes.cloudrun_jobs_containers import ContainerAttempt
from gcp_support import PROJECT, REGION
from lsdeploy.model import next_version
from lsdeploy.providers.gcp import GcpClients
from support import annotation_event, run_cli, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(engine() is None, reason=f"no container engine: {why_no_engine()}")]

COUNTER = '''from lsdeploy.model import LabelStudioMLBase
from lsdeploy.response import ModelResponse


class Counter(LabelStudioMLBase):
    """Trains by counting the events it was given: each one bumps the model version."""

    def predict(self, tasks, context=None, **kwargs):
        return ModelResponse(predictions=[])

    def fit(self, event, data, **kwargs):
        events = self.update("events", lambda n: (n or 0) + 1)
        self.bump_model_version()
        return {"events": events}
'''
LS_PROJECT = 7
OVERRIDE = run_v2.RunJobRequest.Overrides.ContainerOverride
ARGS_99 = ["train", "/app", "--project", "99"]  # a project with nothing queued


@pytest.fixture
def gcs(own_emulator):
    return own_emulator


def test_job_executions_train_in_containers_of_the_jobs_image_and_a_killed_task_is_retried(
        make_gcp_fakes, gcs, tmp_path):
    from lsdeploy.blueprints import create

    started = time.monotonic()
    cloud = make_gcp_fakes(runner=True, storage_url=gcs.url, engine=engine())
    directory = tmp_path / "counter"
    create(directory)
    (directory / "model.py").write_text(COUNTER)
    env = {**cloud.env, "GCP_PROJECT": PROJECT, "GCP_REGION": REGION, "LSDEPLOY_SOURCE_BUCKET": "src-counter",
           "LSDEPLOY_STATE_BUCKET": "state-counter", "LSDEPLOY_MIN_INSTANCES": "0",
           "LSDEPLOY_TRAINING_MODE": "job", "LSDEPLOY_TRAINING_MAX_RETRIES": "2"}
    done = run_cli("deploy", "gcp", directory, "--service", "counter", "--json", env=env, timeout=900)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    deployed = time.monotonic()
    assert result["built"] is True and result["training_job_action"] == "created"
    job = cloud.jobs.job("counter-train")
    image = cloud.artifactregistry.resolve(job.template.template.containers[0].image)
    assert image is not None and image.local and image.local == result["image"].rsplit("@", 1)[1]

    service = requests.Session()
    password = GcpClients.from_env(cloud.env, PROJECT).secrets.access_secret_version(
        name=f"projects/{PROJECT}/secrets/counter-basic-auth-pass/versions/latest").payload.data.decode()
    service.auth = (result["basic_auth_user"], password)

    def served_version():
        answer = service.get(f"{result['url']}/versions?project={LS_PROJECT}", timeout=60)
        assert answer.status_code == 200, answer.text
        return answer.json()["model_version"]

    def webhook(annotation: int) -> None:
        answer = service.post(f"{result['url']}/webhook", timeout=60, json=annotation_event(
            annotation, annotation, f"text {annotation}", "Positive", project=LS_PROJECT))
        assert answer.status_code == 202, answer.text

    def executions() -> list:
        with cloud.server.lock:
            return sorted(cloud.jobs.executions.values(), key=lambda e: e.message.create_time.ToNanoseconds())

    start = served_version()

    # one event: an execution whose single attempt runs the job's image in a container, and trains
    webhook(1)
    wait_for(lambda: executions(), timeout=60, interval=0.1, message="the webhook to start an execution")
    first = executions()[0]
    wait_for(first.done.is_set, timeout=300, interval=0.2, message="the first execution to end")
    assert first.attempts == [(0, 0, 0)] and first.message.succeeded_count == 1
    log = open(first.log_path).read()
    assert f"--- task 0 attempt 0 ({image.local}): exit code 0" in log, log
    trained = next_version(start)
    wait_for(lambda: served_version() == trained, timeout=60, interval=0.3,
             message=f"the service to serve version {trained} trained by the job")
    first_done = time.monotonic()

    # a second event: its attempt is frozen as it starts, looked at, then SIGKILLed; the retry trains it
    cloud.jobs.freeze_attempts = True
    webhook(2)
    wait_for(lambda: len(executions()) > 1, timeout=60, interval=0.1, message="the webhook to start an execution")
    killed = executions()[-1]
    execution_id = killed.message.name.rsplit("/", 1)[-1]
    cloud.jobs.wait_attempt(execution_id, 0)
    cloud.jobs.freeze_attempts = False
    attempt = killed.proc
    assert isinstance(attempt, ContainerAttempt) and attempt.image == image.local
    box = attempt.container
    assert box.inspect()["Image"].removeprefix("sha256:") == image.local.removeprefix("sha256:")
    assert box.exec(["id", "-u"]).stdout.strip() == "10001"  # the image's non-root user
    seen = json.loads(box.exec(["python", "-c", "import os, json; print(json.dumps(dict(os.environ)))"]).stdout)
    assert seen["CLOUD_RUN_JOB"] == "counter-train" and seen["CLOUD_RUN_EXECUTION"] == execution_id
    assert [seen[f"CLOUD_RUN_TASK_{key}"] for key in ("INDEX", "ATTEMPT", "COUNT")] == ["0", "0", "1"]
    image_env = dict(e.split("=", 1) for e in cloud.engine.config(image.local).get("Env") or [])
    assert seen.get("PORT") == image_env.get("PORT")  # the image's own default, if any: Cloud Run adds none
    assert seen["BASIC_AUTH_PASS"] == password  # the secret, resolved
    assert seen["CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN"].startswith("http://127.0.0.1:")
    assert attempt.argv[:2] == ["label-studio-ml", "train"] and f"{LS_PROJECT}" in attempt.argv
    assert cloud.jobs.kill_task(execution_id) == 0
    cloud.jobs.wait_attempt(execution_id, 1)
    wait_for(killed.done.is_set, timeout=300, interval=0.2, message="the retried execution to end")
    assert [(a, code) for _, a, code in killed.attempts] == [(0, -9), (1, 0)]
    assert killed.message.succeeded_count == 1 and killed.message.retried_count == 1
    again = next_version(trained)
    wait_for(lambda: served_version() == again, timeout=60, interval=0.3,
             message=f"the service to serve version {again} (the killed task's event, trained on retry)")
    log = open(killed.log_path).read()
    assert "attempt 0" in log and "exit code -9" in log and "attempt 1" in log and "exit code 0" in log, log

    # the attempts' containers are gone once they ended
    kill_done = time.monotonic()
    listed = cloud.engine.call(["ps", "-a", "--format", "{{.Names}}"], check=False).stdout.split()
    ours = [n for n in listed if n.startswith(("lsdeploy-fake-" + execution_id, "lsdeploy-fake-" + first.message.name
                                                .rsplit("/", 1)[-1]))]
    assert ours == [], f"attempt containers left behind: {ours}"

    # past the task timeout the container is stopped: SIGTERM, SIGKILL 10 s later (a frozen attempt
    # never handles the SIGTERM); the attempt counts as failed and is retried
    cloud.jobs.freeze_attempts = True
    operation = GcpClients.from_env(cloud.env, PROJECT).jobs.run_job(request=run_v2.RunJobRequest(
        name=job.name, overrides=run_v2.RunJobRequest.Overrides(timeout=duration_pb2.Duration(seconds=1),
                                                                container_overrides=[OVERRIDE(args=ARGS_99)])))
    timed_id = operation.metadata.name.rsplit("/", 1)[-1]
    cloud.jobs.wait_attempt(timed_id, 0)
    frozen_at = time.monotonic()
    cloud.jobs.freeze_attempts = False
    timed = cloud.jobs.wait_attempt(timed_id, 1, timeout=120)
    assert time.monotonic() - frozen_at >= 10  # 1 s of task timeout, then the 10 s between SIGTERM and SIGKILL
    wait_for(timed.done.is_set, timeout=120, interval=0.2, message="the timed-out execution to end")
    assert timed.attempts[0][2] is None and timed.message.retried_count >= 1
    assert f"--- task 0 attempt 0 ({image.local}): stopped past the task timeout" in open(timed.log_path).read()
    ended = time.monotonic()

    print(f"\ndeploy (build + service container) {deployed - started:.1f} s; first execution trained and served "
          f"{first_done - deployed:.1f} s; kill + retry + served {kill_done - first_done:.1f} s; task timeout (1 s) "
          f"+ SIGTERM grace + retries {ended - kill_done:.1f} s; total {ended - started:.1f} s")
