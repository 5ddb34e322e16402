"""What the training queue needs from `GCSStore`, against a real fake-gcs-server: event bodies
(put/get/delete_event), the non-blocking training lock (try_lock), projects(key) and the fresh
read(). Several stores on one bucket and prefix stand for several instances."""
from __future__ import annotations

import json
import logging
import os
import threading
import time

import pytest

from lsdeploy.errors import StateError
from support import wait_for

pytestmark = pytest.mark.gcs


def held(store, project="1"):
    """Whether try_lock takes the project's lock right now (released at once)."""
    with store.try_lock(project) as taken:
        return bool(taken)


def in_thread(fn):
    """fn() run in another thread of this process; its result."""
    result = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join(60)
    assert result, "the thread did not finish"
    return result[0]


# -- event bodies -------------------------------------------------------------------------------

def test_event_bodies_roundtrip_including_10_mib(gcs_emulator, bucket, make_store):
    store = make_store(gcs_emulator, f"gs://{bucket}/events")
    other = make_store(gcs_emulator, f"gs://{bucket}/events", refresh_seconds=60)
    small = json.dumps({"action": "ANNOTATION_CREATED", "annotation": {"id": 1}}).encode()
    big = os.urandom(10 << 20)  # above the client's 8 MiB switch to resumable uploads
    store.put_event("1", "ev-0001", small)
    store.put_event("1", "ev_big", big)
    assert store.get_event("1", "ev-0001") == small
    assert other.get_event("1", "ev_big") == big  # read from storage, not from a snapshot
    assert sorted(gcs_emulator.list_objects(bucket, "events/queue/")) == [
        "events/queue/p-1/ev-0001.json", "events/queue/p-1/ev_big.json"]
    store.put_event("1", "ev-0001", b"rewritten")  # same id again: the last body wins
    assert other.get_event("1", "ev-0001") == b"rewritten"
    other.delete_event("1", "ev_big")
    assert store.get_event("1", "ev_big") is None
    store.delete_event("1", "ev_big")  # already gone: fine
    store.delete_event("1", "never-queued")
    assert store.get_event("1", "never-queued") is None
    assert store.get_event("2", "ev-0001") is None  # per project
    store.put_event("a/b?", "x", b"odd project name")
    assert store.get_event("a/b?", "x") == b"odd project name"
    assert "events/queue/p-a%2Fb%3F/x.json" in gcs_emulator.list_objects(bucket, "events/queue/")
    for bad in ("../k-model_version", "a/b", "", "x" * 65, "dot.json"):
        with pytest.raises(ValueError, match="event id"):
            store.put_event("1", bad, b"{}")
    with pytest.raises(TypeError, match="must be bytes"):
        store.put_event("1", "text", "not bytes")


def test_event_bodies_are_not_state(gcs_emulator, bucket, make_store):
    store = make_store(gcs_emulator, f"gs://{bucket}/apart", refresh_seconds=0.5)
    other = make_store(gcs_emulator, f"gs://{bucket}/apart", refresh_seconds=0.5)
    store.set("1", "queue", ["ev-1"])
    store.put_event("1", "ev-1", json.dumps({"v": "looks like a state object"}).encode())
    store.put_event("9", "ev-2", b"{}")
    assert set(store._objects.list_state(retry=None)) == {("k", "1", "queue")}  # what the snapshot lists
    wait_for(lambda: other.get("1", "queue") == ["ev-1"], timeout=20, message="the key on the other instance")
    assert other.projects("queue") == ["1"]
    assert not other.has("9", "ev-2") and not other.has("1", "ev-1")


# -- try_lock -----------------------------------------------------------------------------------

def test_try_lock_is_exclusive_across_instances(gcs_emulator, bucket, make_store):
    a = make_store(gcs_emulator, f"gs://{bucket}/trylock")
    b = make_store(gcs_emulator, f"gs://{bucket}/trylock")
    with a.try_lock("1") as first:
        assert first and first.valid()
        lease = json.loads(gcs_emulator.read_object(bucket, "trylock/locks/p-1.json"))
        assert lease["owner"] == a._owner
        started = time.monotonic()
        assert held(b) is False
        assert time.monotonic() - started < 5  # never waits for the holder
        assert held(b, "2") is True  # another project is free
    assert not gcs_emulator.list_objects(bucket, "trylock/locks/")  # released
    with b.try_lock("1") as second:
        assert second
        assert held(a) is False
    assert held(a) is True


def test_try_lock_is_exclusive_across_threads_and_with_lock(gcs_emulator, bucket, make_store):
    store = make_store(gcs_emulator, f"gs://{bucket}/threads")
    with store.try_lock("1") as first:
        assert first and first.valid()
        assert in_thread(lambda: held(store)) is False
        assert in_thread(lambda: held(store, "2")) is True
    assert in_thread(lambda: held(store)) is True
    entered, leave = threading.Event(), threading.Event()

    def fit():
        with store.lock("1"):
            entered.set()
            leave.wait(30)

    thread = threading.Thread(target=fit)
    thread.start()
    try:
        assert entered.wait(30)
        assert held(store) is False  # a fit under lock() holds the same lock
    finally:
        leave.set()
        thread.join(30)
    assert held(store) is True


def test_try_lock_renews_the_lease_while_held(gcs_emulator, bucket, make_store):
    a = make_store(gcs_emulator, f"gs://{bucket}/renew", lease_seconds=1.0)
    b = make_store(gcs_emulator, f"gs://{bucket}/renew", lease_seconds=1.0)
    with a.try_lock("1") as first:
        assert first and first.valid()
        deadline = time.monotonic() + 2.5  # over twice the lease: only its renewal keeps it
        while time.monotonic() < deadline:
            assert held(b) is False
            time.sleep(0.2)
    assert held(b) is True


def test_try_lock_takes_over_an_expired_lease(gcs_emulator, bucket, make_store):
    store = make_store(gcs_emulator, f"gs://{bucket}/expired")
    # An instance died while holding the lock: its lease stays until it expires.
    gcs_emulator.write_object(bucket, "expired/locks/p-1.json",
                              json.dumps({"owner": "dead-instance", "expires": time.time() + 1.0}).encode())
    assert held(store) is False
    time.sleep(1.2)
    with store.try_lock("1") as taken:
        assert taken and taken.valid()
        assert json.loads(gcs_emulator.read_object(bucket, "expired/locks/p-1.json"))["owner"] == store._owner
    assert not gcs_emulator.list_objects(bucket, "expired/locks/")


def test_try_lock_sees_what_the_previous_holder_wrote(gcs_emulator, bucket, make_store):
    # A long refresh period: only try_lock's own refresh can show one store the other's writes.
    a = make_store(gcs_emulator, f"gs://{bucket}/handover", refresh_seconds=60)
    b = make_store(gcs_emulator, f"gs://{bucket}/handover", refresh_seconds=60)
    assert b.get("1", "model_version") is None
    with a.try_lock("1") as taken:
        assert taken
        a.set("1", "model_version", "0.2.0")
    with b.try_lock("1") as taken:
        assert taken
        assert b.get("1", "model_version") == "0.2.0"


def test_try_lock_and_events_while_storage_is_down(own_emulator, make_store, caplog):
    own_emulator.create_bucket("bkt")
    store = make_store(own_emulator, "gs://bkt/down", write_timeout=1.5, refresh_seconds=0.5)
    store.put_event("1", "kept", b"body")
    own_emulator.stop()
    caplog.set_level(logging.WARNING, logger="lsdeploy.state.gcs")
    for _ in range(2):
        started = time.monotonic()
        assert held(store) is False
        assert time.monotonic() - started < 15  # a few seconds of retries, not the 60 s of writes
    unavailable = [r for r in caplog.records if "training lease of project '1' unavailable" in r.getMessage()]
    assert len(unavailable) == 1 and unavailable[0].exc_info is None  # once, one line
    with pytest.raises(StateError, match=r"cannot write queued event 'new' to gs://bkt/down/: "):
        store.put_event("1", "new", b"body")
    with pytest.raises(StateError, match=r"cannot read queued event 'kept' from gs://bkt/down/: "):
        store.get_event("1", "kept")
    with pytest.raises(StateError, match=r"deletion of queued event 'kept' to gs://bkt/down/: "):
        store.delete_event("1", "kept")
    with pytest.raises(StateError, match=r"cannot read state key 'queue' from gs://bkt/down/: "):
        store.read("1", "queue")
    assert store.health()["status"] == "degraded"
    own_emulator.start()
    wait_for(lambda: held(store), timeout=30, message="the lock once storage answers")
    assert store.get_event("1", "kept") == b"body"
    assert any("available again" in r.getMessage() for r in caplog.records)


def test_try_lock_does_not_hang_on_storage_that_never_answers(gcs_emulator, bucket, make_store, fault_proxy):
    proxy = fault_proxy(gcs_emulator)
    store = make_store(proxy, f"gs://{bucket}/hanging", refresh_seconds=0.5)
    proxy.hang()
    started = time.monotonic()
    assert held(store) is False
    assert time.monotonic() - started < 15  # the refresh's short timeouts, not the writes' 30 s
    proxy.answer()
    wait_for(lambda: held(store), timeout=30, message="the lock once storage answers")


# -- projects and read ----------------------------------------------------------------------------

def test_projects_having_a_key(gcs_emulator, bucket, make_store, tmp_path):
    a = make_store(gcs_emulator, f"gs://{bucket}/projects", refresh_seconds=0.5)
    b = make_store(gcs_emulator, f"gs://{bucket}/projects", refresh_seconds=0.5)
    assert a.projects("queue") == []
    a.set("1", "queue", [])
    a.set("2.5", "queue", ["ev"])
    a.set("3", "model_version", "0.1.0")
    (tmp_path / "weights").write_bytes(b"w")
    a.save_artifact("4", "queue", str(tmp_path / "weights"))  # an artifact is not a key
    assert a.projects("queue") == ["1", "2.5"]  # this instance's writes, at once
    b.set("", "queue", None)  # a value of None is still a value; '' is a project
    wait_for(lambda: a.projects("queue") == ["", "1", "2.5"], timeout=20, message="the other instance's key")
    assert a.projects("model_version") == ["3"] and a.projects("nothing") == []
    a.delete("1", "queue")
    assert a.projects("queue") == ["", "2.5"]


def test_read_sees_another_instances_write_before_the_snapshot_does(gcs_emulator, bucket, make_store):
    a = make_store(gcs_emulator, f"gs://{bucket}/read", refresh_seconds=60)
    b = make_store(gcs_emulator, f"gs://{bucket}/read", refresh_seconds=60)
    assert b.read("1", "queue") is None and b.read("1", "queue", []) == []
    a.set("1", "queue", ["ev-1"])
    assert b.get("1", "queue") is None  # b's snapshot predates the write
    assert b.read("1", "queue") == ["ev-1"]
    assert b.get("1", "queue") == ["ev-1"] and b.projects("queue") == ["1"]  # and remembers it
    b.read("1", "queue").append("mutated")  # the caller's copy
    assert b.get("1", "queue") == ["ev-1"]
    a.update("1", "queue", lambda q: q + ["ev-2"])
    assert b.read("1", "queue") == ["ev-1", "ev-2"]
    a.delete("1", "queue")
    assert b.get("1", "queue") == ["ev-1", "ev-2"]
    assert b.read("1", "queue", "gone") == "gone"
    assert not b.has("1", "queue") and b.projects("queue") == []


def test_a_lease_this_store_left_behind_is_taken_back_at_once(gcs_emulator, bucket, make_store):
    """Its release failed (storage was down): the same store takes it again without waiting for
    it to expire, while another instance still may not."""
    store = make_store(gcs_emulator, f"gs://{bucket}/ownlease")
    other = make_store(gcs_emulator, f"gs://{bucket}/ownlease")
    gcs_emulator.write_object(bucket, "ownlease/locks/p-1.json",
                              json.dumps({"owner": store._owner, "expires": time.time() + 600}).encode())
    assert held(other) is False
    assert held(store) is True


def test_a_lease_whose_renewals_fail_stops_being_valid_before_it_expires(gcs_emulator, bucket, make_store):
    store = make_store(gcs_emulator, f"gs://{bucket}/invalid", lease_seconds=3.0)
    with store.try_lock("1") as lease:
        assert lease.valid()
        lease._done.set()  # no more renewals, as when storage stops answering them
        lease._thread.join(5)
        lease.valid_until = time.time() + 0.4
        assert not lease.valid()  # a sixth of the lease (0.5 s) early: no new work under it
