"""The training queue is bounded (jobs and bytes per worker): past it a webhook gets an honest 503
with Retry-After and a JSON error naming the setting, never unbounded memory."""
from __future__ import annotations

import threading

import pytest

from lsdeploy import LabelStudioMLBase, create_app
from lsdeploy.state import SQLiteStore
from labelstudio_server import wait_trained
from support import Server, annotation_event, memory_kb, worker_pid


class Gated(LabelStudioMLBase):
    """fit() waits until the test opens the gate: jobs stay queued as long as the test needs."""

    gate = threading.Event()
    fits = []

    def fit(self, event, data, **kwargs):
        Gated.gate.wait(30)
        Gated.fits.append(data["annotation"]["id"])


@pytest.fixture
def gated(model_dir, monkeypatch):
    Gated.gate, Gated.fits = threading.Event(), []
    monkeypatch.setenv("FIT_WAIT_SECONDS", "0")
    yield
    Gated.gate.set()


def hook(client, annotation_id, padding=0):
    body = annotation_event(annotation_id, annotation_id, "x" * padding, "Positive")
    return client.post("/webhook", json=body)


def test_a_full_queue_answers_503_with_retry_after_and_takes_events_again_once_drained(gated, model_dir, monkeypatch):
    monkeypatch.setenv("TRAINING_QUEUE_MAX_JOBS", "3")
    app = create_app(Gated, store=SQLiteStore(str(model_dir)))
    client = app.test_client()
    assert [hook(client, i).status_code for i in (1, 2, 3)] == [202, 202, 202]
    refused = hook(client, 4)
    assert refused.status_code == 503 and refused.is_json
    assert refused.json["error"].startswith("training queue of project '1' is full (3 event(s), ")
    assert "TRAINING_QUEUE_MAX_JOBS=3" in refused.json["error"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 300
    assert 'lsdeploy_fit_refused_total{event="ANNOTATION_CREATED"} 1' in client.get("/metrics").get_data(as_text=True)

    Gated.gate.set()
    assert app.extensions["lsdeploy"]["trainer"].wait_idle(20)
    assert Gated.fits == [1, 2, 3]  # the refused one never reached fit: Label Studio was told
    assert hook(client, 5).status_code in (201, 202)


def test_the_byte_bound_counts_the_requests_and_an_empty_queue_takes_any_one(gated, model_dir, monkeypatch):
    monkeypatch.setenv("TRAINING_QUEUE_MAX_BYTES", "100000")
    app = create_app(Gated, store=SQLiteStore(str(model_dir)))
    client = app.test_client()
    assert hook(client, 1, padding=150_000).status_code == 202  # larger than the bound, alone: taken
    refused = hook(client, 2, padding=1000)
    assert refused.status_code == 503 and "TRAINING_QUEUE_MAX_BYTES=100000" in refused.json["error"]
    Gated.gate.set()
    assert app.extensions["lsdeploy"]["trainer"].wait_idle(20)
    assert hook(client, 3, padding=60_000).status_code in (201, 202)


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_a_bad_bound_is_refused_at_start_naming_it(model_dir, monkeypatch, value):
    from lsdeploy.errors import LsdeployError

    monkeypatch.setenv("TRAINING_QUEUE_MAX_JOBS", value)
    with pytest.raises(LsdeployError, match=rf"TRAINING_QUEUE_MAX_JOBS='{value}' must be a whole number, at least 1"):
        create_app(Gated, store=SQLiteStore(str(model_dir)))


GATED_MODEL = '''
import os
import time
from lsdeploy.model import LabelStudioMLBase


class Gated(LabelStudioMLBase):
    def fit(self, event, data, **kwargs):
        while not os.path.exists(os.environ["GATE_FILE"]):  # the test opens the gate
            time.sleep(0.05)
'''


def test_large_webhooks_past_the_bound_cost_no_memory_under_gunicorn(tmp_path):
    """50 webhooks of 2 MiB while the first fit is held: the worker keeps at most the bound (5 MiB
    here) in its queue; before the bound it grew by every one of them."""
    directory = tmp_path / "gated"
    directory.mkdir()
    (directory / "model.py").write_text(GATED_MODEL)
    gate = tmp_path / "gate"
    env = {"FIT_WAIT_SECONDS": "0", "TRAINING_QUEUE_MAX_BYTES": str(5 * 1024 * 1024),
           "MODEL_DIR": str(tmp_path / "state"), "GATE_FILE": str(gate)}
    with Server(directory, env=env) as server:
        body = annotation_event(1, 1, "y" * (2 * 1024 * 1024), "Positive")
        assert server.post("/webhook", body).status_code == 202  # held by the gate: 2 MiB queued
        worker = worker_pid(server)
        before = memory_kb(worker)["VmRSS"]
        statuses = [server.post("/webhook", body).status_code for _ in range(50)]
        grown_mib = (memory_kb(worker)["VmRSS"] - before) / 1024
        assert (statuses.count(202), statuses.count(503)) == (1, 49), statuses  # two requests of 2 MiB fit
        assert grown_mib < 40, f"the worker grew by {grown_mib:.0f} MiB"
        gate.write_text("")
        wait_trained(lambda path: server.get(path, timeout=10), 2, "ANNOTATION_CREATED")
