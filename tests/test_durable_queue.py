"""Every acknowledged training event reaches fit(), in order, whatever happens to the server:
SIGTERM with a long queue, workers killed with SIGKILL, a restart, a fit that fails and then
succeeds, create-then-update of one annotation racing over two workers. Real gunicorn processes
(`label-studio-ml start`) on one MODEL_DIR; fit() records every delivery in the state store."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from lsdeploy.state import SQLiteStore
from support import Server, annotation_event, backend_dir, wait_for

MODEL = '''
import os
import time

from lsdeploy.model import LabelStudioMLBase


class Recorder(LabelStudioMLBase):
    """Records each delivery (annotation, event, label, sequence, attempt) and the latest label of
    each annotation; FIT_SECONDS long; raises while the file FAIL_FILE exists."""

    def fit(self, event, data, **kwargs):
        time.sleep(float(os.environ.get("FIT_SECONDS", "0")))
        if os.path.exists(os.environ.get("FAIL_FILE") or "/nonexistent"):
            raise RuntimeError("storage outage")
        annotation = data["annotation"]
        label = annotation["result"][0]["value"]["choices"][0]
        delivery = self.delivery
        entry = [annotation["id"], event, label, delivery["sequence"], delivery["attempt"]]
        self.update("log", lambda log: (log or []) + [entry])
        self.update("labels", lambda labels: {**(labels or {}), str(annotation["id"]): label})
        return {"ok": True}
'''


@pytest.fixture
def backend(tmp_path):
    return backend_dir(tmp_path, MODEL, "recorder")


def env_for(tmp_path, **extra) -> dict:
    return {"MODEL_DIR": str(tmp_path / "state"), "FIT_WAIT_SECONDS": "0", "TRAINING_POLL_SECONDS": "0.5",
            **{k: str(v) for k, v in extra.items()}}


def deliveries(tmp_path) -> list:
    store = SQLiteStore(str(tmp_path / "state"))
    try:
        return store.get("1", "log") or []
    finally:
        store.close()


def wait_delivered(tmp_path, ids, timeout=120.0) -> list:
    """Until fit() has recorded every annotation id in `ids`; the deliveries."""
    wanted = set(ids)
    return wait_for(lambda: (log := deliveries(tmp_path)) and wanted <= {e[0] for e in log} and log,
                    timeout=timeout, interval=0.2, message=f"fit() for annotations {sorted(wanted)}")


def assert_in_order(log):
    """Each event's first delivery comes in acknowledgement order (its sequence number)."""
    first = {}
    for annotation, event, label, sequence, attempt in log:
        first.setdefault(sequence, annotation)
    sequences = [entry[3] for entry in log]
    firsts = [s for i, s in enumerate(sequences) if s not in sequences[:i]]
    assert firsts == sorted(firsts), f"deliveries out of order: {sequences}"


def send(server, ids, **kwargs):
    for i in ids:
        resp = server.post("/webhook", annotation_event(i, i, f"text {i}", "Positive", **kwargs))
        assert resp.status_code == 202, resp.text


def worker_pids(server) -> list:
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
    return [int(pid) for pid in children.read_text().split()]


def test_sigterm_with_a_long_queue_leaves_the_rest_queued_and_a_restart_trains_every_event(tmp_path, backend):
    env = env_for(tmp_path, FIT_SECONDS=1)
    with Server(backend, "--workers", "2", env=env) as server:
        send(server, range(1, 17))
        wait_delivered(tmp_path, [1])
        code = server.stop(timeout=30)
        log = server.log()
    assert code == 0, log
    assert "left queued in the state store, not lost" in log, log
    trained_before = {e[0] for e in deliveries(tmp_path)}
    assert len(trained_before) < 16, "the test needs events still queued at SIGTERM"

    with Server(backend, "--workers", "2", env=env_for(tmp_path, FIT_SECONDS=0.05)) as server:
        log = wait_delivered(tmp_path, range(1, 17))
        wait_for(lambda: "lsdeploy_fit_queue_depth 0" in server.get("/metrics").text, timeout=30,
                 message="an empty queue")
    assert {e[0] for e in log} == set(range(1, 17))
    assert_in_order(log)


def test_workers_killed_with_sigkill_lose_no_event(tmp_path, backend):
    with Server(backend, "--workers", "2", env=env_for(tmp_path, FIT_SECONDS=0.3)) as server:
        send(server, range(1, 21))
        wait_delivered(tmp_path, [1, 2, 3])
        for pid in worker_pids(server):
            os.kill(pid, signal.SIGKILL)  # what the OOM killer and a hard stop do
        log = wait_delivered(tmp_path, range(1, 21))
        wait_for(lambda: "lsdeploy_fit_queue_depth 0" in server.get("/metrics").text, timeout=30,
                 message="an empty queue")
        log = deliveries(tmp_path)
    assert {e[0] for e in log} == set(range(1, 21))
    assert_in_order(log)


def test_a_fit_that_fails_during_an_outage_is_retried_and_trains_once_it_is_over(tmp_path, backend):
    outage = tmp_path / "outage"
    outage.write_text("")
    env = env_for(tmp_path, FAIL_FILE=outage, FIT_WAIT_SECONDS=5, TRAINING_RETRY_SECONDS=0.3,
                  TRAINING_MAX_ATTEMPTS=20)
    with Server(backend, "--workers", "2", env=env) as server:
        jobs = []
        for i in (1, 2, 3):
            resp = server.post("/webhook", annotation_event(i, i, f"text {i}", "Positive"))
            assert resp.status_code == 202, resp.text
            jobs.append(resp.json()["job"])
        first = server.get(f"/jobs/{jobs[0]}").json()
        assert first["state"] in ("retrying", "running") and first["error"] == "RuntimeError: storage outage"
        assert server.get(f"/jobs/{jobs[2]}").json()["state"] == "queued"  # behind the head, in order
        outage.unlink()
        log = wait_delivered(tmp_path, [1, 2, 3])
        views = [wait_for(lambda j=j: (v := server.get(f"/jobs/{j}").json())["state"] == "done" and v, timeout=30,
                          message=f"job {j} done") for j in jobs]
    assert [e[0] for e in log] == [1, 2, 3]
    assert views[0]["attempts"] >= 2 and "error" not in views[0]


def test_create_then_update_of_an_annotation_train_in_that_order_across_two_workers(tmp_path, backend):
    with Server(backend, "--workers", "2", "--threads", "4", env=env_for(tmp_path)) as server:
        for i in range(1, 41):
            for action, label in (("ANNOTATION_CREATED", "Negative"), ("ANNOTATION_UPDATED", "Positive")):
                resp = server.post("/webhook", annotation_event(i, i, f"text {i}", label, action=action))
                assert resp.status_code in (201, 202), resp.text
        wait_for(lambda: len(deliveries(tmp_path)) >= 80, timeout=120, interval=0.2, message="80 fit() calls")
        wait_for(lambda: "lsdeploy_fit_queue_depth 0" in server.get("/metrics").text, timeout=30,
                 message="an empty queue")
    store = SQLiteStore(str(tmp_path / "state"))
    labels = store.get("1", "labels")
    store.close()
    assert labels == {str(i): "Positive" for i in range(1, 41)}, "an update was trained before its create"
    assert_in_order(deliveries(tmp_path))
