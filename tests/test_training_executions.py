"""Training in job mode (LSDEPLOY_TRAINING=job): a serving instance queues each training event
durably and makes sure one Cloud Run job execution per project drains the queue.

- The no-lost-wake-up rule itself, fast and in one process: many events queued from several
  threads while "executions" (real `Trainer.drain_project` runs on SQLite) end and are started;
  every event runs exactly once, in order, never two drainers at once, and nothing is left
  queued without an execution.
- End to end against the proto-strict Run v2 Jobs fake (tests/fakes/cloudrun_jobs.py): a real
  server (`label-studio-ml start`, gunicorn) in job mode, the fake running each execution's task
  as a `label-studio-ml train /app --project P` process with Cloud Run's job environment, one
  SQLite state directory shared by both: a burst of webhooks starts exactly one execution; a task
  killed mid-fit is retried by the execution and loses no event; a Run API refusal (the runtime
  account lacks roles/run.jobsExecutorWithOverrides on the job) is a JSON 500 naming the role,
  the event stays queued, and it trains once the role is granted.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lsdeploy.jobs import QUEUE_KEY, JobQueue
from lsdeploy.metrics import Metrics
from lsdeploy.state import SQLiteStore
from lsdeploy.training import Trainer
from support import Server, annotation_event, backend_dir, wait_for
from test_train_command import MODEL, stored

PROJECT, REGION = "proj-train", "us-central1"
JOB = f"projects/{PROJECT}/locations/{REGION}/jobs/recorder-train"
RUNTIME = f"recorder-runtime@{PROJECT}.iam.gserviceaccount.com"
IMAGE = f"{REGION}-docker.pkg.dev/{PROJECT}/lsdeploy/recorder"
DOCKERFILE = """FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1
WORKDIR /app
COPY . /app
CMD ["label-studio-ml", "start", "/app"]
"""


# -- the rule, in one process ---------------------------------------------------------------------

def race_executions(webhook_queue, execution_queue, events: int, senders: int = 6) -> dict:
    """`events` webhooks sent from `senders` threads (the n-th queued through `webhook_queue(n)`)
    race "executions": `Trainer.drain_project` runs, each on `execution_queue()` (its own store
    where that matters, as its own process), started by the webhook that found no execution
    recorded, as the server does. The outcome: {"ran": the events fit ran, in order of running,
    "overlaps": fits that ran while another did, "started": executions started}."""
    ran, active, overlaps, started = [], [0], [], []
    guard = threading.Lock()

    def run_fit(project, entry, body):
        with guard:
            active[0] += 1
            overlaps.extend([entry["seq"]] if active[0] > 1 else [])
        ran.append(json.loads(body)["n"])
        with guard:
            active[0] -= 1
        return None, "v"

    def execution(name):
        """What `label-studio-ml train` does as the execution `name` (without the process)."""
        queue = execution_queue()
        ended = Trainer(queue, run_fit, Metrics(None)).drain_project(
            "1", runner=name, responsible=lambda: queue.drains("1", name))
        assert ended in ("drained", "locked")

    def webhook(n):
        queue = webhook_queue(n)
        entry = queue.enqueue("1", "webhook", "ANNOTATION_CREATED", json.dumps({"n": n}).encode(), dispatch=True)
        if entry.get("start_execution"):
            thread = threading.Thread(target=execution, args=(f"execution-{n}",))
            with guard:
                started.append(thread)
            thread.start()
            queue.record_execution("1", entry["id"], f"execution-{n}")

    with ThreadPoolExecutor(senders) as pool:
        list(pool.map(webhook, range(events)))
    while True:
        with guard:
            waiting = [t for t in started if t.is_alive()]
        if not waiting:
            return {"ran": ran, "overlaps": overlaps, "started": len(started)}
        for thread in waiting:
            thread.join(120)


def test_webhooks_racing_the_end_of_executions_lose_no_wake_up(tmp_path):
    store = SQLiteStore(str(tmp_path / "state"))
    queue = JobQueue(lambda: store)
    outcome = race_executions(lambda n: queue, lambda: queue, 300)
    assert sorted(outcome["ran"]) == list(range(300)) and len(outcome["ran"]) == 300  # each exactly once
    index = store.read("1", QUEUE_KEY)
    assert index["queued"] == [] and "execution" not in index  # no event left without an execution
    assert not outcome["overlaps"]
    assert 1 <= outcome["started"] < 300  # executions were reused while they ran, and restarted after they ended
    store.close()


# -- end to end, with the Run v2 Jobs fake --------------------------------------------------------

def bundle_of(directory) -> bytes:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as archive:
        for path in sorted(directory.iterdir()):
            if path.is_file():
                archive.add(path, arcname=path.name)
    return data.getvalue()


def run_client(endpoint, kind="JobsClient"):
    """run_v2's JobsClient (or ExecutionsClient) for the fake, as the deployer calls it."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import run_v2

    return getattr(run_v2, kind)(credentials=AnonymousCredentials(), transport="rest",
                                 client_options=ClientOptions(api_endpoint=endpoint.rstrip("/")))


def grant(cloud, roles):
    from google.iam.v1 import iam_policy_pb2, policy_pb2

    client = run_client(cloud.url)
    policy = policy_pb2.Policy(bindings=[policy_pb2.Binding(role=role, members=[f"serviceAccount:{RUNTIME}"])
                                         for role in roles])
    client.set_iam_policy(request=iam_policy_pb2.SetIamPolicyRequest(resource=JOB, policy=policy))


@pytest.fixture
def deployed(tmp_path, make_gcp_fakes):
    """The fake cloud with the training job of a recorder backend (what deploy gcp --training job
    creates), and the env of a serving instance in job mode sharing its state directory."""
    from google.cloud import run_v2

    from fakes.fixtures import FAST_POLLING

    cloud = make_gcp_fakes()
    signals = tmp_path / "signals"
    signals.mkdir()
    backend = backend_dir(tmp_path, MODEL, "recorder")
    (backend / "Dockerfile").write_text(DOCKERFILE)
    bundle = bundle_of(backend)
    digest = "sha256:" + hashlib.sha256(bundle).hexdigest()
    cloud.artifactregistry.add_repository(PROJECT, REGION, "lsdeploy")
    cloud.artifactregistry.push(f"{IMAGE}:v1", digest, bundle)
    state = tmp_path / "state"
    env = {"MODEL_DIR": str(state), "SIGNAL_DIR": str(signals), "LSDEPLOY_TRAINING": "job",
           "TRAINING_RETRY_SECONDS": "0.1"}
    container = run_v2.Container(image=f"{IMAGE}@{digest}", command=["label-studio-ml"], args=["train", "/app"],
                                 env=[run_v2.EnvVar(name=k, value=v) for k, v in env.items()])
    job = run_v2.Job(template=run_v2.ExecutionTemplate(task_count=1, template=run_v2.TaskTemplate(
        containers=[container], service_account=RUNTIME, max_retries=2)))
    run_client(cloud.url).create_job(parent=f"projects/{PROJECT}/locations/{REGION}", job=job,
                                      job_id="recorder-train").result(polling=FAST_POLLING)
    serving = {**env, "LSDEPLOY_TRAINING_JOB": JOB, "TRAINING_POLL_SECONDS": "0.3", "TRAINING_FOLLOW_SECONDS": "0.3",
               "PYTHONUNBUFFERED": "1",
               **cloud.jobs.caller_env(RUNTIME)}
    return {"cloud": cloud, "backend": backend, "signals": signals, "state": state, "env": serving}


def deliveries(state) -> list:
    return stored(state.parent, "log") or []  # (the state directory is tmp_path/state)


def webhook(server, n):
    return server.post("/webhook", annotation_event(n, n, f"text {n}", "Positive"))


def execution_names(cloud) -> list:
    return sorted(name for name in cloud.jobs.executions)


def test_a_burst_of_webhooks_starts_exactly_one_execution(deployed):
    cloud, signals = deployed["cloud"], deployed["signals"]
    grant(cloud, ["roles/run.jobsExecutorWithOverrides", "roles/run.viewer"])
    (signals / "hold-1").touch()
    with Server(deployed["backend"], "--workers", "2", env=deployed["env"]) as server:
        first = webhook(server, 1)
        assert first.status_code == 202, first.text
        name = first.json()["execution"]
        assert name.startswith(JOB + "/executions/") and first.json()["job"] == name
        wait_for(lambda: (signals / "started-1").exists(), timeout=60, message="the execution's first fit")
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda n: webhook(server, n), range(2, 22)))
        assert [a.status_code for a in answers] == [202] * 20, [a.text for a in answers]
        assert {a.json()["execution"] for a in answers} == {name}  # all picked up by the running one
        assert execution_names(cloud) == [name]
        view = server.get(f"/jobs/{name}").json()
        assert view["state"] == "running" and view["kind"] == "execution" and view["log_uri"].startswith("https://")
        event = server.get(f"/jobs/{answers[-1].json()['event_job']}").json()
        assert event["state"] == "queued"
        (signals / "hold-1").unlink()
        wait_for(lambda: server.get(f"/jobs/{name}").json()["state"] == "succeeded", timeout=120, interval=0.2,
                 message="the execution to succeed")
        log = deliveries(deployed["state"])  # the burst was acknowledged in any order: its sequence is the order
        assert sorted(e[0] for e in log) == list(range(1, 22)) and [e[2] for e in log] == list(range(1, 22))
        assert execution_names(cloud) == [name]
        # the queue emptied with it: the next webhook starts a new execution
        later = webhook(server, 22)
        assert later.status_code == 202 and later.json()["execution"] not in (None, name)
        wait_for(lambda: server.get(f"/jobs/{later.json()['event_job']}").json()["state"] == "done", timeout=120,
                 interval=0.2, message="the event of the second execution")
        health = server.get("/health", params={"project": "1"}).json()
        assert health["model_version"] == "0.22.0"


@contextlib.contextmanager
def fit_2_held(deployed):
    """A server in job mode that answered webhooks for annotations 1, 2, 3, whose one execution
    is now fitting annotation 2, held (SIGNAL_DIR/hold-2): (server, answers, execution name)."""
    grant(deployed["cloud"], ["roles/run.jobsExecutorWithOverrides", "roles/run.viewer"])
    signals = deployed["signals"]
    (signals / "hold-2").touch()
    with Server(deployed["backend"], env=deployed["env"]) as server:
        answers = [webhook(server, n) for n in (1, 2, 3)]
        name = answers[0].json()["execution"]
        assert {a.json()["execution"] for a in answers} == {name}
        wait_for(lambda: (signals / "started-2").exists(), timeout=60, message="the fit of annotation 2")
        yield server, answers, name


def test_a_task_killed_mid_fit_is_retried_and_loses_no_event(deployed):
    cloud, signals = deployed["cloud"], deployed["signals"]
    with fit_2_held(deployed) as (server, answers, name):
        execution_id = name.rsplit("/", 1)[-1]
        assert cloud.jobs.kill_task(execution_id) == 0
        (signals / "hold-2").unlink()
        cloud.jobs.wait_attempt(execution_id, 1)
        wait_for(lambda: server.get(f"/jobs/{name}").json()["state"] == "succeeded", timeout=120, interval=0.2,
                 message="the retried execution to succeed")
        view = server.get(f"/jobs/{name}").json()
        assert view["tasks"]["retried"] == 1 and view["tasks"]["succeeded"] == 1
        assert [(e[0], e[3]) for e in deliveries(deployed["state"])] == [(1, 1), (2, 2), (3, 1)]


def test_a_run_api_refusal_keeps_the_event_queued_and_names_the_role(deployed):
    cloud = deployed["cloud"]
    grant(cloud, ["roles/run.viewer"])  # may read executions, not start them with overrides
    with Server(deployed["backend"], env={**deployed["env"], "TRAINING_POLL_SECONDS": "0.2"}) as server:
        refused = webhook(server, 1)
        assert refused.status_code == 500, refused.text
        body = refused.json()
        assert "roles/run.jobsExecutorWithOverrides" in body["error"] and "run.jobs.runWithOverrides" in body["error"]
        assert "stays queued" in body["detail"]
        event = server.get(f"/jobs/{body['job']}").json()
        assert event["state"] == "queued"
        assert execution_names(cloud) == []
        grant(cloud, ["roles/run.viewer", "roles/run.jobsExecutorWithOverrides"])
        # the server's poller starts the execution once the Run API accepts
        wait_for(lambda: server.get(f"/jobs/{body['job']}").json()["state"] == "done", timeout=120, interval=0.2,
                 message="the refused event to train once the role is granted")
        assert len(execution_names(cloud)) == 1
    assert [e[0] for e in deliveries(deployed["state"])] == [1]


def test_job_mode_needs_its_job(tmp_path):
    backend = backend_dir(tmp_path, MODEL, "recorder")
    server = Server(backend, env={"MODEL_DIR": str(tmp_path / "state"), "LSDEPLOY_TRAINING": "job"})
    with pytest.raises(RuntimeError, match="LSDEPLOY_TRAINING=job needs LSDEPLOY_TRAINING_JOB"):
        server.start()
    server.stop()
    server = Server(backend, env={"MODEL_DIR": str(tmp_path / "state"), "LSDEPLOY_TRAINING": "job",
                                  "LSDEPLOY_TRAINING_JOB": "recorder-train"})
    with pytest.raises(RuntimeError, match="is not a Cloud Run job name"):
        server.start()
    server.stop()


def test_a_running_execution_is_read_from_the_run_api_once_per_follow_interval(deployed):
    # the store is read every TRAINING_POLL_SECONDS (0.3 s here); the Run API, whose read quota every
    # instance and worker shares, only every TRAINING_FOLLOW_SECONDS while the execution runs
    cloud, signals = deployed["cloud"], deployed["signals"]
    deployed["env"]["TRAINING_FOLLOW_SECONDS"] = "2"
    with fit_2_held(deployed) as (server, answers, name):
        before = cloud.log.count(api="run", method="GetExecution")
        time.sleep(6)
        reads = cloud.log.count(api="run", method="GetExecution") - before
        assert 1 <= reads <= 4, f"{reads} reads of the running execution in 6 s (one per 2 s expected, not per 0.3 s poll)"
        (signals / "hold-2").unlink()
        wait_for(lambda: server.get(f"/jobs/{name}").json()["state"] == "succeeded", timeout=120, interval=0.2,
                 message="the execution to succeed")
    assert [(e[0], e[3]) for e in deliveries(deployed["state"])] == [(1, 1), (2, 1), (3, 1)]


def test_a_follow_interval_that_is_not_a_number_is_named(tmp_path):
    backend = backend_dir(tmp_path, MODEL, "recorder")
    server = Server(backend, env={"MODEL_DIR": str(tmp_path / "state"), "LSDEPLOY_TRAINING": "job",
                                  "LSDEPLOY_TRAINING_JOB": JOB, "TRAINING_FOLLOW_SECONDS": "15s"})
    with pytest.raises(RuntimeError, match="TRAINING_FOLLOW_SECONDS='15s' is not a number of seconds"):
        server.start()
    server.stop()


def test_the_poller_starts_another_execution_when_the_recorded_one_ended_with_events_queued(deployed):
    cloud, signals = deployed["cloud"], deployed["signals"]
    with fit_2_held(deployed) as (server, answers, first):
        run_client(cloud.url, "ExecutionsClient").cancel_execution(name=first)  # SIGTERM, SIGKILL 10 s later: the fit is held
        wait_for(lambda: server.get(f"/jobs/{first}").json()["state"] == "cancelled", timeout=60, interval=0.2,
                 message="the execution to be cancelled")
        (signals / "hold-2").unlink()
        wait_for(lambda: len(execution_names(cloud)) == 2, timeout=60, message="the poller's new execution")
        second = next(name for name in execution_names(cloud) if name != first)
        wait_for(lambda: server.get(f"/jobs/{second}").json()["state"] == "succeeded", timeout=120, interval=0.2,
                 message="the second execution to succeed")
        assert all(server.get(f"/jobs/{a.json()['event_job']}").json()["state"] == "done" for a in answers)
    assert [(e[0], e[3]) for e in deliveries(deployed["state"])] == [(1, 1), (2, 2), (3, 1)]


def test_a_disabled_run_api_and_an_exhausted_quota_are_named_and_the_events_train_later(deployed):
    cloud = deployed["cloud"]
    grant(cloud, ["roles/run.jobsExecutorWithOverrides", "roles/run.viewer"])
    cloud.disable_api("run", times=1)
    with Server(deployed["backend"], env=deployed["env"]) as server:
        disabled = webhook(server, 1)
        assert disabled.status_code == 500, disabled.text
        assert "Cloud Run Admin API (run.googleapis.com) is disabled" in disabled.json()["error"]
        assert "gcloud services enable run.googleapis.com" in disabled.json()["error"]
        wait_for(lambda: server.get(f"/jobs/{disabled.json()['job']}").json()["state"] == "done", timeout=120,
                 interval=0.2, message="the event refused by a disabled API to train once it answers")
        cloud.quota("run", "RunJob", times=1)
        exhausted = server.post("/webhook", annotation_event(2, 2, "text 2", "Positive", project=2))
        assert exhausted.status_code == 503 and exhausted.headers["Retry-After"] == "60", exhausted.text
        assert "quota" in exhausted.json()["error"] and "stays queued" in exhausted.json()["detail"]
        wait_for(lambda: server.get(f"/jobs/{exhausted.json()['job']}").json()["state"] == "done", timeout=120,
                 interval=0.2, message="the event refused for quota to train later")
    assert [e[0] for e in deliveries(deployed["state"])] == [1]
    assert [e[0] for e in stored(deployed["state"].parent, "log", project="2")] == [2]
