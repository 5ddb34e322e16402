"""`label-studio-ml train DIR --project P` on SQLite, as real processes: it drains the project's
durable queue in order through the server's fit path and exits with the documented code; two at
once: one trains, the other says the lock is held; one killed mid-fit (SIGKILL) loses no event
(the next run delivers it as attempt 2); SIGTERM stops after the running fit and leaves the rest
queued. Events are queued with `JobQueue.enqueue`, what a webhook does before it is answered."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess

import pytest

from lsdeploy.jobs import HISTORY_KEY, QUEUE_KEY, JobQueue
from lsdeploy.state import SQLiteStore
from support import CLI, annotation_event, backend_dir, run_cli, wait_for

MODEL = '''
import os
import time

from lsdeploy.model import LabelStudioMLBase


class Recorder(LabelStudioMLBase):
    """Records each delivery [annotation, event, sequence, attempt] and publishes a new model
    version per fit. Before fitting annotation N it creates SIGNAL_DIR/started-N; while
    SIGNAL_DIR/hold-N exists it waits; while SIGNAL_DIR/fail-N exists it raises."""

    def fit(self, event, data, **kwargs):
        signals = os.environ.get("SIGNAL_DIR", "/nonexistent")
        annotation = (data.get("annotation") or {}).get("id", "start")
        if os.path.isdir(signals):
            open(os.path.join(signals, f"started-{annotation}"), "a").close()
        while os.path.exists(os.path.join(signals, f"hold-{annotation}")):
            time.sleep(0.02)
        if os.path.exists(os.path.join(signals, f"fail-{annotation}")):
            raise RuntimeError(f"cannot train on annotation {annotation}")
        delivery = self.delivery
        entry = [annotation, event, delivery["sequence"], delivery["attempt"]]
        self.update("log", lambda log: (log or []) + [entry])
        self.bump_model_version()
        return {"ok": True}
'''


@pytest.fixture
def backend(tmp_path):
    return backend_dir(tmp_path, MODEL, "recorder")


@pytest.fixture
def signals(tmp_path):
    path = tmp_path / "signals"
    path.mkdir()
    return path


def env_for(tmp_path, signals, **extra) -> dict:
    return {"MODEL_DIR": str(tmp_path / "state"), "SIGNAL_DIR": str(signals), "TRAINING_RETRY_SECONDS": "0.1",
            "PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in extra.items()}}


def queue_events(tmp_path, ids, project="1") -> list:
    """Store webhook events for annotations `ids`, as the server does before answering; their tokens."""
    store = SQLiteStore(str(tmp_path / "state"))
    try:
        queue = JobQueue(lambda: store)
        return [queue.enqueue(project, "webhook", "ANNOTATION_CREATED",
                              json.dumps(annotation_event(i, i, f"text {i}", "Positive", project=int(project))).encode())
                ["id"] for i in ids]
    finally:
        store.close()


def stored(tmp_path, key, project="1"):
    store = SQLiteStore(str(tmp_path / "state"))
    try:
        return store.get(project, key)
    finally:
        store.close()


def train(backend, tmp_path, signals, *args, **extra):
    return run_cli("train", backend, "--project", "1", "--no-check-requirements", *args,
                   env=env_for(tmp_path, signals, **extra))


def start_train(backend, tmp_path, signals, **extra) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "train", str(backend), "--project", "1", "--no-check-requirements"],
                            env={**os.environ, **env_for(tmp_path, signals, **extra)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@contextlib.contextmanager
def fitting(start, signals, annotation):
    """A `train` process (`start()` starts it) whose fit of `annotation` has started and is held
    (SIGNAL_DIR/hold-N, removed by the caller); killed after the block if it still runs."""
    (signals / f"hold-{annotation}").touch()
    proc = start()
    try:
        wait_for(lambda: (signals / f"started-{annotation}").exists() or proc.poll() is not None, timeout=60,
                 message=f"the fit of annotation {annotation}")
        assert proc.poll() is None, proc.stdout.read()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_train_drains_in_order_then_says_nothing_to_train(tmp_path, backend, signals):
    queue_events(tmp_path, range(1, 7))
    done = train(backend, tmp_path, signals)
    assert done.returncode == 0, done.stderr
    assert "6 event(s) trained, 0 kept as failed" in done.stderr
    log = stored(tmp_path, "log")
    assert [e[0] for e in log] == [1, 2, 3, 4, 5, 6]  # acknowledgement order
    assert [e[2] for e in log] == [1, 2, 3, 4, 5, 6] and {e[3] for e in log} == {1}
    assert stored(tmp_path, "model_version") == "0.6.0"  # each fit published one
    assert stored(tmp_path, QUEUE_KEY)["queued"] == []
    assert len(stored(tmp_path, HISTORY_KEY)["done"]) == 6

    again = train(backend, tmp_path, signals)
    assert again.returncode == 8, again.stderr
    assert "nothing to train for project 1" in again.stderr
    # as a Cloud Run job task "nothing to train" must not make the execution retry the task
    as_task = train(backend, tmp_path, signals, CLOUD_RUN_JOB="backend-train", CLOUD_RUN_EXECUTION="backend-train-x1",
                    CLOUD_RUN_TASK_INDEX=0, CLOUD_RUN_TASK_ATTEMPT=2, CLOUD_RUN_TASK_COUNT=1)
    assert as_task.returncode == 0, as_task.stderr
    assert "execution backend-train-x1, task 0 of 1, attempt 2: training project 1" in as_task.stderr


def test_start_training_runs_after_the_queued_events(tmp_path, backend, signals):
    queue_events(tmp_path, [1, 2])
    done = train(backend, tmp_path, signals, "--start-training")
    assert done.returncode == 0, done.stderr
    assert [(e[0], e[1]) for e in stored(tmp_path, "log")] == [(1, "ANNOTATION_CREATED"), (2, "ANNOTATION_CREATED"),
                                                              ("start", "START_TRAINING")]


def test_a_fit_that_fails_every_attempt_exits_9_and_the_queue_goes_on(tmp_path, backend, signals):
    queue_events(tmp_path, [1, 2, 3])
    (signals / "fail-2").touch()
    done = train(backend, tmp_path, signals, TRAINING_MAX_ATTEMPTS=3)
    assert done.returncode == 9, done.stderr
    assert "2 event(s) trained, 1 kept as failed, 2 failed attempt(s) retried" in done.stderr
    assert "cannot train on annotation 2" in done.stderr
    assert [e[0] for e in stored(tmp_path, "log")] == [1, 3]
    failed = stored(tmp_path, HISTORY_KEY)["failed"]
    assert len(failed) == 1 and failed[0]["attempts"] == 3 and "annotation 2" in failed[0]["error"]
    # a failure is a failure as a job task too: the execution retries the task
    queue_events(tmp_path, [4])
    (signals / "fail-4").touch()
    as_task = train(backend, tmp_path, signals, TRAINING_MAX_ATTEMPTS=1, CLOUD_RUN_JOB="backend-train")
    assert as_task.returncode == 9, as_task.stderr


def test_two_trains_at_once_one_trains_the_other_exits_locked(tmp_path, backend, signals):
    queue_events(tmp_path, [1, 2])
    with fitting(lambda: start_train(backend, tmp_path, signals), signals, 1) as first:
        second = train(backend, tmp_path, signals)
        assert second.returncode == 10, second.stderr
        assert "another process holds project 1's training lock" in second.stderr
        as_task = train(backend, tmp_path, signals, CLOUD_RUN_JOB="backend-train", CLOUD_RUN_EXECUTION="other-x")
        assert as_task.returncode == 0, as_task.stderr  # not its record: the holder drains, no retry
        (signals / "hold-1").unlink()
        assert first.wait(60) == 0
    assert [e[0] for e in stored(tmp_path, "log")] == [1, 2]


def test_a_train_killed_mid_fit_loses_no_event(tmp_path, backend, signals):
    queue_events(tmp_path, [1, 2, 3])
    with fitting(lambda: start_train(backend, tmp_path, signals), signals, 2) as victim:
        victim.send_signal(signal.SIGKILL)  # the OOM killer, a task past its timeout
        victim.wait(30)
    running = stored(tmp_path, QUEUE_KEY)["queued"][0]
    assert running["state"] == "running" and running["attempts"] == 1
    (signals / "hold-2").unlink()
    done = train(backend, tmp_path, signals)
    assert done.returncode == 0, done.stderr
    assert "runs again, attempt 2" in done.stderr
    log = stored(tmp_path, "log")
    assert [(e[0], e[3]) for e in log] == [(1, 1), (2, 2), (3, 1)]


def test_sigterm_stops_after_the_running_fit_and_leaves_the_rest_queued(tmp_path, backend, signals):
    queue_events(tmp_path, [1, 2, 3])
    with fitting(lambda: start_train(backend, tmp_path, signals), signals, 1) as proc:
        proc.send_signal(signal.SIGTERM)
        (signals / "hold-1").unlink()
        assert proc.wait(60) == 143
        output = proc.stdout.read()
    assert "the rest stays queued" in output, output
    assert [e[0] for e in stored(tmp_path, "log")] == [1]  # the running fit finished; no new one started
    assert [e["seq"] for e in stored(tmp_path, QUEUE_KEY)["queued"]] == [2, 3]


def test_bad_input_is_one_line(tmp_path, backend, signals):
    bad = run_cli("train", backend, "--project", "a b", "--no-check-requirements", env=env_for(tmp_path, signals))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--project 'a b'" in bad.stderr, bad.stderr
    missing = run_cli("train", backend, "--no-check-requirements", env=env_for(tmp_path, signals))
    assert missing.returncode == 2 and "--project" in missing.stderr
    nothing_there = run_cli("train", tmp_path / "nowhere", "--project", "1", "--no-check-requirements",
                            env=env_for(tmp_path, signals))
    assert nothing_there.returncode == 2 and "Traceback" not in nothing_there.stderr, nothing_there.stderr


def test_an_event_interrupted_every_attempt_is_kept_as_failed_and_exits_9(tmp_path, backend, signals):
    queue_events(tmp_path, [1, 2])
    for attempt in (1, 2):  # each run is killed in the fit of annotation 1
        with fitting(lambda: start_train(backend, tmp_path, signals, TRAINING_MAX_ATTEMPTS=2), signals, 1) as victim:
            victim.send_signal(signal.SIGKILL)
            victim.wait(30)
        (signals / "started-1").unlink()
    done = train(backend, tmp_path, signals, TRAINING_MAX_ATTEMPTS=2)
    assert done.returncode == 9, done.stderr
    assert "1 event(s) trained, 1 kept as failed" in done.stderr
    assert "interrupted 2 time(s)" in done.stderr
    assert [e[0] for e in stored(tmp_path, "log")] == [2]
