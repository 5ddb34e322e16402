"""`label-studio-ml train` on Cloud Storage (a real fake-gcs-server), as a job task runs it: a
serving instance picks up the model version a `train` process published, without a restart
(/health?project=, /versions, /predict); two trains at once: the lease lets one train and the
other exit "locked"; a train killed mid-fit leaves its lease and its event, and the next run,
once the lease expired, runs that event as attempt 2."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid

import pytest

from lsdeploy.jobs import QUEUE_KEY, JobQueue
from support import CLI, Server, annotation_event, backend_dir, predict_body, run_cli, text_task, wait_for
from test_train_command import MODEL, fitting

pytestmark = pytest.mark.gcs

SERVED = MODEL + '''

    def predict(self, tasks, context=None, **kwargs):
        return [{"result": [], "score": 0.5} for _ in tasks]
'''


@pytest.fixture
def setup(tmp_path, gcs_emulator, bucket, make_store):
    uri = f"gs://{bucket}/train-{uuid.uuid4().hex[:6]}"
    signals = tmp_path / "signals"
    signals.mkdir()
    backend = backend_dir(tmp_path, SERVED, "recorder")
    store = make_store(gcs_emulator, uri)
    env = {"MODEL_STATE_URI": uri, **gcs_emulator.env, "SIGNAL_DIR": str(signals), "MODEL_STATE_REFRESH_SECONDS": "1",
           "MODEL_STATE_LEASE_SECONDS": "4", "TRAINING_RETRY_SECONDS": "0.1", "PYTHONUNBUFFERED": "1"}
    return {"uri": uri, "signals": signals, "backend": backend, "store": store, "env": env,
            "queue": JobQueue(lambda: store), "tmp": tmp_path}


def queue_events(setup, ids):
    return [setup["queue"].enqueue("1", "webhook", "ANNOTATION_CREATED",
                                   json.dumps(annotation_event(i, i, f"text {i}", "Positive")).encode())["id"]
            for i in ids]


def train(setup, n=0, **extra):
    env = {**setup["env"], "MODEL_DIR": str(setup["tmp"] / f"task-{n}"), **{k: str(v) for k, v in extra.items()}}
    return run_cli("train", setup["backend"], "--project", "1", "--no-check-requirements", env=env)


def start_train(setup, n=0) -> subprocess.Popen:
    env = {**os.environ, **setup["env"], "MODEL_DIR": str(setup["tmp"] / f"task-{n}")}
    return subprocess.Popen([*CLI, "train", str(setup["backend"]), "--project", "1", "--no-check-requirements"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def log_of(setup):
    return setup["store"].read("1", "log") or []


def test_a_serving_instance_shows_the_version_a_train_process_published(setup):
    # The server never trains here: its poller looks once at start, then only after its own webhooks.
    env = {**setup["env"], "MODEL_DIR": str(setup["tmp"] / "serving"), "TRAINING_POLL_SECONDS": "3600"}
    with Server(setup["backend"], env=env) as server:
        task = text_task(1, "hello")
        before = server.post("/predict", predict_body([task])).json()["results"][0]["model_version"]
        assert before == server.get("/health", params={"project": "1"}).json()["model_version"] == "0.0.1"
        queue_events(setup, [1, 2])
        done = train(setup, 1, CLOUD_RUN_JOB="recorder-train", CLOUD_RUN_EXECUTION="recorder-train-ab1c2")
        assert done.returncode == 0, done.stderr
        assert "2 event(s) trained" in done.stderr
        published = setup["store"].read("1", "model_version")
        assert published == "0.2.0"
        wait_for(lambda: server.get("/health", params={"project": "1"}).json()["model_version"] == published,
                 timeout=30, message="the published version in /health")
        assert server.get("/versions", params={"project": "1"}).json()["model_version"] == published
        after = server.post("/predict", predict_body([task])).json()["results"][0]
        assert after["model_version"] == published
        health = server.get("/health").json()
        assert "model_version" not in health and health["status"] == "UP"  # Label Studio's probe is unchanged
    assert [e[0] for e in log_of(setup)] == [1, 2]


def test_two_trains_on_one_bucket_and_a_killed_one_loses_no_event(setup):
    queue_events(setup, [1, 2, 3])
    with fitting(lambda: start_train(setup, 1), setup["signals"], 2) as first:
        second = train(setup, 2)
        assert second.returncode == 10, second.stderr
        assert "another process holds project 1's training lock" in second.stderr
        first.send_signal(signal.SIGKILL)  # mid-fit: its lease and its running event stay behind
        first.wait(30)
    head = setup["store"].read("1", QUEUE_KEY)["queued"][0]
    assert head["state"] == "running" and head["attempts"] == 1
    (setup["signals"] / "hold-2").unlink()
    # the lease of the killed process expires MODEL_STATE_LEASE_SECONDS after its last renewal;
    # until then a run says "locked" (as a job task: exit 0, the record's execution waits for it)
    results = []

    def trained():
        result = train(setup, 3)
        results.append(result.returncode)
        assert result.returncode in (0, 10), result.stderr
        return result.returncode == 0 and result

    done = wait_for(trained, timeout=90, interval=0.2, message="a train after the lease expired")
    assert "runs again, attempt 2" in done.stderr
    assert [(e[0], e[3]) for e in log_of(setup)] == [(1, 1), (2, 2), (3, 1)]
    assert set(results[:-1]) <= {10}


def test_webhooks_on_two_instances_racing_executions_lose_no_wake_up(gcs_emulator, bucket, make_store):
    """The execution record's rule on Cloud Storage: webhooks stored through two instances race
    executions (each its own store, like its own process) that end and are started; every event
    runs once, in order, never two at once, and no event is left without an execution."""
    from test_training_executions import race_executions

    uri = f"gs://{bucket}/race-{uuid.uuid4().hex[:6]}"
    instances = [JobQueue(lambda s=make_store(gcs_emulator, uri): s) for _ in range(2)]
    outcome = race_executions(lambda n: instances[n % 2], lambda: JobQueue(lambda s=make_store(gcs_emulator, uri): s),
                              30, senders=4)
    assert sorted(outcome["ran"]) == list(range(30)) and len(outcome["ran"]) == 30
    index = instances[0].store.read("1", QUEUE_KEY)
    assert index["queued"] == [] and "execution" not in index
    assert not outcome["overlaps"] and outcome["started"] >= 1
