"""The SQLite state store tells the truth about its database file (issue 14, point 6).

Real files on real file systems: deleted, replaced, on a read-only mount, on a full tmpfs,
overwritten with garbage. Mounting needs root (the tests run as root); where it is not
allowed those tests are skipped, saying why.
"""
from __future__ import annotations

import base64
import os
import sqlite3
import subprocess
import threading

import pytest

from lsdeploy import LabelStudioMLBase, create_app
from lsdeploy.errors import StateError
from lsdeploy.state import SQLiteStore
from support import TEXT_CONFIG, annotation_event, predict_body, text_task


@pytest.fixture
def mount():
    """mount(*args, target): mount(8); whatever was mounted is unmounted after the test."""
    targets = []

    def run(*args, target):
        result = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount here (needs root with CAP_SYS_ADMIN): {result.stderr.strip()}")
        if str(target) not in targets:
            targets.append(str(target))

    yield run
    for target in reversed(targets):
        subprocess.run(["umount", "-l", target], capture_output=True)


def in_thread(fn):
    """fn() on a new thread (a new SQLite connection): its result, or the exception it raised."""
    out = {}

    def run():
        try:
            out["result"] = fn()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    return out.get("error", out.get("result"))


def degraded(store: SQLiteStore, *words: str) -> dict:
    health = store.health()
    assert health["status"] == "degraded", health
    assert health["error"].startswith(f"state database {store.path} "), health
    assert store.path not in health["detail"] and health["detail"].startswith("state database "), health
    for word in words:
        assert word in health["error"] and word in health["detail"], (word, health)
    return health


def test_a_healthy_database_is_ok(tmp_path):
    store = SQLiteStore(str(tmp_path))
    store.set("1", "a", 1)
    assert store.health() == {"store": "sqlite", "status": "ok", "path": store.path}


# -- the file is deleted or replaced while the server runs ---------------------------------------

def test_a_deleted_database_refuses_writes_instead_of_losing_them(tmp_path):
    store = SQLiteStore(str(tmp_path))
    store.set("1", "model_version", "0.1.0")  # this thread now holds a connection to the file
    os.unlink(store.path)

    degraded(store, "was deleted", "restart the server, which starts an empty database")
    with pytest.raises(StateError, match="was deleted: restart the server"):
        store.set("1", "model_version", "0.2.0")  # the old connection would write to the vanished file
    with pytest.raises(StateError, match="was deleted"):
        store.update("1", "n", lambda n: (n or 0) + 1)
    error = in_thread(lambda: store.set("1", "other", 1))  # a new connection: no empty database either
    assert isinstance(error, StateError) and "was deleted" in str(error), error
    assert not os.path.exists(store.path)
    assert store.get("1", "model_version") == "0.1.0"  # reads serve what this process knew

    restarted = SQLiteStore(str(tmp_path))  # what the operator is told to do: a new, empty database
    assert restarted.health()["status"] == "ok"
    assert restarted.get("1", "model_version") is None and restarted.get("1", "n") is None


def test_a_replaced_database_refuses_writes(tmp_path):
    store = SQLiteStore(str(tmp_path / "live"))
    store.set("1", "model_version", "0.1.0")
    backup = SQLiteStore(str(tmp_path / "backup"))
    backup.set("1", "model_version", "0.0.7")
    backup.close()
    os.replace(backup.path, store.path)  # say, a backup restored by hand while the server runs

    degraded(store, "was replaced by another file", "stop the server, delete state.sqlite3-wal and state.sqlite3-shm")
    with pytest.raises(StateError, match="was replaced"):
        store.set("1", "model_version", "0.2.0")
    error = in_thread(lambda: store.get("1", "never-read"))
    assert isinstance(error, StateError) and "was replaced" in str(error), error

    store.close()  # what the operator is told to do; the old log would mix the old file into the new
    for leftover in ("state.sqlite3-wal", "state.sqlite3-shm"):
        os.unlink(tmp_path / "live" / leftover)
    assert SQLiteStore(str(tmp_path / "live")).get("1", "model_version") == "0.0.7"  # the restored file


def test_health_of_a_deleted_database_over_http(tmp_path):
    """/health says DEGRADED (HTTP 200: predictions are still served), and a fit's write fails
    with the reason instead of answering 201 for a write that would vanish at restart."""

    class Counter(LabelStudioMLBase):
        def predict(self, tasks, context=None, **kwargs):
            return [{"result": [], "score": 0.5} for _ in tasks]

        def fit(self, event, data, **kwargs):
            return self.update("n", lambda n: (n or 0) + 1)

    store = SQLiteStore(str(tmp_path))
    client = create_app(Counter, store=store, basic_auth=("ls", "pw")).test_client()
    auth = {"Authorization": "Basic " + base64.b64encode(b"ls:pw").decode()}
    assert client.post("/predict", json=predict_body([text_task(1, "x")]), headers=auth).status_code == 200
    os.unlink(store.path)

    public = client.get("/health")
    assert public.status_code == 200 and public.json["status"] == "DEGRADED"
    assert public.json["store"]["status"] == "degraded" and "error" not in public.json["store"]
    assert public.json["store"]["detail"].startswith("state database was deleted: restart the server")
    full = client.get("/health", headers=auth).json["store"]
    assert full["error"].startswith(f"state database {store.path} was deleted")

    answer = client.post("/webhook", json=annotation_event(1, 1, "x", "Positive"), headers=auth)
    assert answer.status_code == 503, answer.json  # the store, not the request nor a bug
    assert "was deleted: restart the server" in answer.json["error"]
    assert client.post("/predict", json=predict_body([text_task(1, "x")]), headers=auth).status_code == 200


# -- the file cannot be written, the disk is full, the file is corrupt ----------------------------

def test_a_read_only_database_is_reported_and_writes_say_what_to_do(tmp_path, mount):
    """A database the server cannot write (root ignores file modes: a read-only bind mount of the
    file does what chmod 444 does to an unprivileged server)."""
    directory = tmp_path / "state"
    before = SQLiteStore(str(directory))
    before.set("1", "model_version", "0.3.0")
    before.close()
    mount("--bind", before.path, target=before.path)
    mount("-o", "remount,bind,ro", before.path, target=before.path)

    store = SQLiteStore(str(directory))
    degraded(store, "is read-only", "writable")
    assert store.get("1", "model_version") == "0.3.0"  # predictions still read their state
    with pytest.raises(StateError, match="is read-only .*: make it and its directory writable"):
        store.set("1", "model_version", "0.4.0")


def test_a_full_disk_is_reported_and_writes_work_again_once_there_is_room(tmp_path, mount):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", target=disk)
    store = SQLiteStore(str(disk / "state"))
    store.set("1", "n", 1)
    assert store.health()["status"] == "ok"
    filler = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 16, 1 << 12, 1 << 9):
            while True:
                try:
                    os.write(filler, b"\0" * chunk)
                except OSError:
                    break
    finally:
        os.close(filler)

    degraded(store, "has no room to grow", "free space on its disk")
    with pytest.raises(StateError, match="is full .*: free space on its disk"):
        store.set("1", "weights", "x" * 300_000)
    with pytest.raises(StateError, match="is full"):
        store.update("1", "n", lambda n: n + 1 if n < 2 else "x" * 300_000)
    assert store.get("1", "n") == 1

    os.unlink(disk / "filler")
    degraded(store, "is full")  # the last write failed; nothing has shown that writes work again
    assert store.update("1", "n", lambda n: n + 1) == 2  # the failed update left no transaction open
    store.set("1", "weights", "x" * 300_000)
    assert store.health()["status"] == "ok"


def test_a_failed_write_the_checks_cannot_see_is_reported_until_a_write_succeeds(tmp_path):
    """The database's own page limit (as a quota would): the disk has room, the file is fine, but
    writes fail; health reports the last failed write until one succeeds."""
    store = SQLiteStore(str(tmp_path))
    store.set("1", "n", 1)
    conn = store._connect()  # this thread's connection: the one the next writes use
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={pages + 1}")

    with pytest.raises(StateError, match="is full"):
        store.set("1", "weights", "x" * 300_000)
    degraded(store, "is full", "free space on its disk")
    conn.execute("PRAGMA max_page_count=1073741823")
    store.set("1", "n", 2)
    assert store.health()["status"] == "ok"


def _corrupt_pages(path: str) -> None:
    """Garbage over every page but the first (the schema), as a bad disk or a stray write would."""
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(4096)
        handle.write(os.urandom(size - 4096))


def _corrupt_header(path: str) -> None:
    with open(path, "r+b") as handle:
        handle.write(b"this is not an SQLite file at all")


@pytest.mark.parametrize("corrupt", [_corrupt_pages, _corrupt_header], ids=["pages", "header"])
def test_a_corrupt_database_is_reported(tmp_path, corrupt):
    store = SQLiteStore(str(tmp_path))
    for i in range(300):
        store.set("1", f"k{i}", "v" * 100)
    with sqlite3.connect(store.path) as outside:  # everything into the file itself, out of the WAL
        outside.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    outside.close()
    corrupt(store.path)

    health = degraded(store, "is corrupt", "restore it from a backup")
    assert health["degraded_for_seconds"] >= 0
    error = in_thread(lambda: store.get("1", "k150"))
    assert isinstance(error, StateError) and "is corrupt" in str(error), error
    with pytest.raises(StateError, match="is corrupt"):
        SQLiteStore(str(tmp_path)).get("1", "k151")
