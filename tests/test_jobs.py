"""The durable queue's rules (lsdeploy/jobs.py) on a real SQLite store, without a server: order,
claims, interruptions, retries with backoff, failures kept, bounds, and the job view."""
from __future__ import annotations

import time

import pytest

from lsdeploy.jobs import QUEUE_KEY, JobQueue, QueueFull, job_id, parse_job_id, view
from lsdeploy.state import SQLiteStore


@pytest.fixture
def store(tmp_path):
    store = SQLiteStore(str(tmp_path / "state"))
    yield store
    store.close()


def queue_of(store, **kwargs) -> JobQueue:
    return JobQueue(lambda: store, **kwargs)


def test_events_are_claimed_in_order_and_leave_only_when_finished(store):
    queue = queue_of(store)
    entries = [queue.enqueue("3", "webhook", "ANNOTATION_CREATED", f'{{"n": {i}}}'.encode()) for i in range(3)]
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert store.get_event("3", entries[0]["id"]) == b'{"n": 0}'
    first = queue.claim("3", "w1")
    assert first["id"] == entries[0]["id"] and first["attempts"] == 1 and first["state"] == "running"
    assert queue.depth() == (3, 0)  # a running event is still queued
    following = queue.finish("3", first["id"], '{"ok": true}', runner="w1")
    assert following["id"] == entries[1]["id"]  # claimed in the same write
    assert store.get_event("3", first["id"]) is None  # its body is gone
    done = queue.lookup("3", first["id"])
    assert done["state"] == "done" and done["result"] == '{"ok": true}'
    queue.finish("3", following["id"])
    assert queue.lookup("3", entries[2]["id"])["position"] == 0
    assert queue.claim("3", "w1")["id"] == entries[2]["id"]
    queue.finish("3", entries[2]["id"])
    assert queue.claim("3", "w1") is None and queue.runnable_in("3") is None and queue.depth() == (0, 0)


def test_a_claim_whose_runner_died_runs_again_as_the_next_attempt_then_is_kept_as_failed(store):
    queue = queue_of(store, max_attempts=2)
    entry = queue.enqueue("3", "webhook", "ANNOTATION_CREATED", b"{}")
    queue.claim("3", "worker-that-dies")
    again = queue.claim("3", "w2")  # the next holder of the lock finds it still running
    assert again["id"] == entry["id"] and again["attempts"] == 2 and again["interrupted_runner"] == "worker-that-dies"
    assert queue.claim("3", "w3") is None  # interrupted twice: failed, the queue goes on
    failed = queue.lookup("3", entry["id"])
    assert failed["state"] == "failed" and "interrupted 2 time(s)" in failed["error"] and "w2" in failed["error"]
    assert store.get_event("3", entry["id"]) == b"{}"  # kept, for a retry
    assert queue.depth() == (0, 1)


def test_a_failed_fit_is_retried_with_backoff_behind_which_later_events_wait(store):
    queue = queue_of(store, max_attempts=3, retry_seconds=0.2)
    first = queue.enqueue("3", "webhook", "ANNOTATION_CREATED", b"{}")
    queue.enqueue("3", "webhook", "ANNOTATION_UPDATED", b"{}")
    queue.claim("3", "w")
    assert queue.failed("3", first["id"], "RuntimeError: boom") == ("retrying", 0.2)
    assert queue.claim("3", "w") is None  # the head is not due: the second event waits behind it
    assert 0 < queue.runnable_in("3") <= 0.2
    time.sleep(0.25)
    assert queue.claim("3", "w")["attempts"] == 2
    assert queue.failed("3", first["id"], "RuntimeError: boom") == ("retrying", 0.4)  # doubled
    time.sleep(0.45)
    queue.claim("3", "w")
    assert queue.failed("3", first["id"], "RuntimeError: boom again") == ("failed", 0.0)
    failed = queue.lookup("3", first["id"])
    assert failed["state"] == "failed" and failed["attempts"] == 3 and failed["error"] == "RuntimeError: boom again"
    assert queue.claim("3", "w")["event"] == "ANNOTATION_UPDATED"  # the queue went on

    again = queue.retry("3", first["id"])
    assert again["state"] == "queued" and again["attempts"] == 0 and again["seq"] == 3 and again["position"] == 1
    assert queue.retry("3", "0123456789abcdef") is None


def test_bounds_refuse_an_event_and_leave_nothing_behind(store):
    queue = queue_of(store, max_jobs=2, max_bytes=1000)
    queue.enqueue("3", "webhook", "A", b"x" * 5000)  # an empty queue takes any one event
    with pytest.raises(QueueFull, match=r"TRAINING_QUEUE_MAX_BYTES=1000") as refused:
        queue.enqueue("3", "webhook", "A", b"y" * 10)
    assert 1 <= refused.value.retry_after <= 300
    assert store.get("3", QUEUE_KEY)["next"] == 2 and len(store.get("3", QUEUE_KEY)["queued"]) == 1
    rows = store._connect().execute("SELECT COUNT(*) FROM events").fetchone()[0]
    assert rows == 1  # the refused body was removed
    queue.enqueue("4", "webhook", "A", b"z")  # bounds are per project
    small = queue_of(store, max_jobs=1)
    with pytest.raises(QueueFull, match=r"TRAINING_QUEUE_MAX_JOBS=1"):
        small.enqueue("4", "webhook", "A", b"z")


def test_job_ids_name_the_project_and_the_view_is_what_the_api_shows(store):
    assert job_id("3", "ab12") == "3-ab12" and parse_job_id("3-ab12") == ("3", "ab12")
    assert parse_job_id("my-project-ab12") == ("my-project", "ab12") and parse_job_id("-ab12") == ("", "ab12")
    for bad in ("ab12", "3-", "3-a/b", "3-" + "a" * 65):
        assert parse_job_id(bad) is None
    queue = queue_of(store)
    entry = queue.enqueue("3", "webhook", "ANNOTATION_CREATED", b"{}")
    shown = view(job_id("3", entry["id"]), "3", queue.lookup("3", entry["id"], fresh=True))
    assert shown["state"] == "queued" and shown["position"] == 0 and shown["sequence"] == 1
    assert shown["queued_at"].endswith("+00:00") and shown["started_at"] is None


def test_every_store_has_the_queue_through_the_interface_defaults(tmp_path):
    """A store that implements only get/set/update/delete (as a custom one may) still queues:
    the base class keeps bodies as state keys and waits for lock() in try_lock."""
    from lsdeploy.state.base import MISSING, StateStore

    class DictStore(StateStore):
        def __init__(self):
            self.data = {}

        def get(self, project, key, default=None):
            return self.data.get((project, key), default)

        def set(self, project, key, value, *, wait=None):
            self.data[(project, key)] = value

        def delete(self, project, key):
            self.data.pop((project, key), None)

        def update(self, project, key, fn, default=None):
            current = self.data.get((project, key), MISSING)
            new = fn(default if current is MISSING else current)
            self.data[(project, key)] = new
            return new

    store = DictStore()
    queue = queue_of(store)
    entry = queue.enqueue("1", "webhook", "A", b'{"a": 1}')
    assert store.get_event("1", entry["id"]) == b'{"a": 1}'
    with store.try_lock("1") as held:
        assert held
        claimed = queue.claim("1", "w")
        queue.finish("1", claimed["id"])
    assert store.get_event("1", entry["id"]) is None and queue.lookup("1", entry["id"])["state"] == "done"
