"""SQLite under MODEL_DIR: the local state store, shared by every worker process on a machine.

Correct with several gunicorn workers and threads: read-modify-write runs in an IMMEDIATE
transaction, `lock()` is an inter-process file lock, and reads are served from a per-process
cache that every committed write invalidates (see `SQLiteStore`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import shutil
import sqlite3
import tempfile
import threading

from ..errors import StateError
from .base import StateStore, check_artifact_name, encode_value, safe_component


class SQLiteStore(StateStore):
    """SQLite under MODEL_DIR, shared by every worker process on the machine.

    Reads are served from an in-process cache that is dropped whenever any process writes:
    each write commits, then increments a generation counter in a small memory-mapped file
    (under a file lock); a read compares that counter with the one its cache was filled at.
    So a read that starts after another worker's write returned always sees it, and the hot
    path (model_version on every /predict) costs a memory read instead of a query.
    """

    kind = "sqlite"

    def __init__(self, model_dir: str):
        self.model_dir = os.path.abspath(model_dir)
        try:
            os.makedirs(self.model_dir, exist_ok=True)
        except OSError as exc:
            raise StateError(
                f"cannot create MODEL_DIR {self.model_dir}: {exc.strerror}; "
                "set MODEL_DIR to a writable directory"
            ) from None
        self.path = os.path.join(self.model_dir, "state.sqlite3")
        self._local = threading.local()
        with self._connect() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS state (project TEXT NOT NULL, key TEXT NOT NULL, "
                "value TEXT NOT NULL, PRIMARY KEY (project, key))"
            )
        self._gen_file = open(os.path.join(self.model_dir, "state.generation"), "a+b")
        if os.fstat(self._gen_file.fileno()).st_size < 8:
            with self._gen_locked():
                if os.fstat(self._gen_file.fileno()).st_size < 8:
                    self._gen_file.truncate(8)
        self._gen = mmap.mmap(self._gen_file.fileno(), 8)
        self._cache: dict = {}
        self._cache_gen = -1
        self._cache_lock = threading.Lock()

    @contextlib.contextmanager
    def _gen_locked(self):
        fcntl.flock(self._gen_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._gen_file, fcntl.LOCK_UN)

    def _generation(self) -> int:
        return int.from_bytes(self._gen[:8], "little")

    def _written(self) -> None:
        """Called after every committed write: invalidates every process's read cache."""
        with self._gen_locked():
            self._gen[:8] = ((self._generation() + 1) % (1 << 63)).to_bytes(8, "little")

    def _connect(self) -> sqlite3.Connection:
        # One connection per thread and process: a forked worker opens its own.
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        try:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise StateError(f"cannot open state database {self.path}: {exc}") from None
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def get(self, project, key, default=None):
        project = str(project)
        gen = self._generation()
        with self._cache_lock:
            if self._cache_gen == gen and (project, key) in self._cache:
                text = self._cache[(project, key)]
                return default if text is None else json.loads(text)
        row = self._connect().execute(
            "SELECT value FROM state WHERE project=? AND key=?", (project, key)
        ).fetchone()
        text = None if row is None else row[0]
        with self._cache_lock:
            if self._cache_gen != gen:
                self._cache, self._cache_gen = {}, gen
            self._cache[(project, key)] = text  # tagged with the generation read before the query
        return default if text is None else json.loads(text)

    def set(self, project, key, value, *, wait=None):  # local disk: always written at once
        self._connect().execute(
            "INSERT INTO state (project, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT(project, key) DO UPDATE SET value=excluded.value",
            (str(project), key, encode_value(value)),
        )
        self._written()

    def create(self, project, key, value, *, wait=None):
        cursor = self._connect().execute(
            "INSERT INTO state (project, key, value) VALUES (?, ?, ?) ON CONFLICT(project, key) DO NOTHING",
            (str(project), key, encode_value(value)),
        )
        if cursor.rowcount:
            self._written()

    def delete(self, project, key):
        self._connect().execute("DELETE FROM state WHERE project=? AND key=?", (str(project), key))
        self._written()

    def update(self, project, key, fn, default=None):
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(
                "SELECT value FROM state WHERE project=? AND key=?", (str(project), key)
            ).fetchone()
            new = fn(default if row is None else json.loads(row[0]))
            conn.execute(
                "INSERT INTO state (project, key, value) VALUES (?, ?, ?) "
                "ON CONFLICT(project, key) DO UPDATE SET value=excluded.value",
                (str(project), key, encode_value(new)),
            )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        self._written()
        return new

    def _artifact_path(self, project, name):
        return os.path.join(self.model_dir, "artifacts", safe_component(project), check_artifact_name(name))

    def save_artifact(self, project, name, local_path):
        target = self._artifact_path(project, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out, open(local_path, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)  # atomic: readers see the old or the new file
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def load_artifact(self, project, name):
        path = self._artifact_path(project, name)
        return path if os.path.exists(path) else None

    @contextlib.contextmanager
    def lock(self, project):
        lock_dir = os.path.join(self.model_dir, "locks")
        os.makedirs(lock_dir, exist_ok=True)
        with open(os.path.join(lock_dir, safe_component(project) + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def close(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        with self._cache_lock:
            self._cache, self._cache_gen = {}, -1

