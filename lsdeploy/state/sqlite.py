"""SQLite under MODEL_DIR: the local state store, shared by every worker process on a machine.

Correct with several gunicorn workers and threads: read-modify-write runs in an IMMEDIATE
transaction, `lock()` is an inter-process file lock, and reads are served from a per-process
cache that every committed write invalidates (see `SQLiteStore`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import shutil
import sqlite3
import tempfile
import threading
import time

from ..errors import StateError
from .base import StateStore, check_artifact_name, check_event_id, encode_value, safe_component
from .sqlite_file import DatabaseFile, connect, explain

_UPSERT = ("INSERT INTO state (project, key, value) VALUES (?, ?, ?) "
           "ON CONFLICT(project, key) DO UPDATE SET value=excluded.value")


class SQLiteStore(StateStore):
    """SQLite under MODEL_DIR, shared by every worker process on the machine.

    Reads are served from an in-process cache that is dropped whenever any process writes:
    each write commits, then increments a generation counter in a small memory-mapped file
    (under a file lock); a read compares that counter with the one its cache was filled at.
    So a read that starts after another worker's write returned always sees it, and the hot
    path (model_version on every /predict) costs a memory read instead of a query.

    Every write first checks that the file at the path is still the one the store opened
    (`DatabaseFile`): a write to a deleted or replaced file would answer success and vanish at
    the next restart, so it raises StateError instead. SQLite errors are StateErrors naming the
    problem and what to do, and `health()` reports the file's condition.
    """

    kind = "sqlite"

    def __init__(self, model_dir: str):
        self.model_dir = os.path.abspath(model_dir)
        if os.path.exists(self.model_dir) and not os.path.isdir(self.model_dir):
            raise StateError(f"MODEL_DIR {self.model_dir} is a file, not a directory: set MODEL_DIR to a directory "
                             "(a missing one is created)")
        try:
            os.makedirs(self.model_dir, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create MODEL_DIR {self.model_dir}: {_why(exc)}; set MODEL_DIR to a "
                             "directory the server can write") from None
        self.path = os.path.join(self.model_dir, "state.sqlite3")
        self._local = threading.local()
        if not os.access(self.model_dir, os.W_OK):
            read_only = os.statvfs(self.model_dir).f_flag & os.ST_RDONLY
            raise StateError(f"MODEL_DIR {self.model_dir} cannot be used: "
                             f"{'it is on a read-only file system' if read_only else 'permission denied'}; the "
                             "state store writes there: make it writable, or set MODEL_DIR to another directory")
        try:
            self._open("rwc")  # the one connection that may create the file; later ones open it or fail
            self._file = DatabaseFile(self.path)
            self._gen_file = open(os.path.join(self.model_dir, "state.generation"), "a+b")
            if os.fstat(self._gen_file.fileno()).st_size < 8:
                with self._gen_locked():
                    if os.fstat(self._gen_file.fileno()).st_size < 8:
                        self._gen_file.truncate(8)
            self._gen = mmap.mmap(self._gen_file.fileno(), 8)
        except OSError as exc:  # the directory exists but cannot be written (read-only, full, not ours)
            raise StateError(f"MODEL_DIR {self.model_dir} cannot be used: {_why(exc)}; the state store writes "
                             "there: make it writable (or free space), or set MODEL_DIR to another directory") from None
        self._problem: tuple = (None, 0.0)  # the problem health() last reported, and since when
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
        self._file.check()  # never open (let alone create) another file at the path
        return self._open("rw")

    def _open(self, mode: str) -> sqlite3.Connection:
        try:
            conn = connect(self.path, mode, timeout=30)
            if mode == "rwc":
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS state (project TEXT NOT NULL, key TEXT NOT NULL, "
                    "value TEXT NOT NULL, PRIMARY KEY (project, key))"
                )
                # Queued training events (lsdeploy.jobs): bodies apart from the keys, so a queued
                # event never enters a process's read cache and writing one invalidates nothing.
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS events (project TEXT NOT NULL, id TEXT NOT NULL, "
                    "body BLOB NOT NULL, PRIMARY KEY (project, id))"
                )
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise StateError(explain(exc).message(self.path)) from None
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _read(self, sql: str, args: tuple):
        try:
            row = self._connect().execute(sql, args).fetchone()
        except sqlite3.Error as exc:
            raise self._file.failed("read", exc) from None
        self._file.succeeded("read")
        return row

    def _write(self, sql: str, args: tuple = (), done: bool = True) -> sqlite3.Cursor:
        """A statement to the file this store opened (StateError otherwise); `done`: it ends
        the write (committed), so writes work again."""
        self._file.check()
        try:
            cursor = self._connect().execute(sql, args)
        except sqlite3.Error as exc:
            raise self._file.failed("write", exc) from None
        if done:
            self._file.succeeded("write")
        return cursor

    def get(self, project, key, default=None):
        project = str(project)
        gen = self._generation()
        with self._cache_lock:
            if self._cache_gen == gen and (project, key) in self._cache:
                text = self._cache[(project, key)]
                return default if text is None else json.loads(text)
        row = self._read("SELECT value FROM state WHERE project=? AND key=?", (project, key))
        text = None if row is None else row[0]
        with self._cache_lock:
            if self._cache_gen != gen:
                self._cache, self._cache_gen = {}, gen
            self._cache[(project, key)] = text  # tagged with the generation read before the query
        return default if text is None else json.loads(text)

    def set(self, project, key, value, *, wait=None):  # local disk: always written at once
        self._write(_UPSERT, (str(project), key, encode_value(value)))
        self._written()

    def create(self, project, key, value, *, wait=None):
        cursor = self._write(
            "INSERT INTO state (project, key, value) VALUES (?, ?, ?) ON CONFLICT(project, key) DO NOTHING",
            (str(project), key, encode_value(value)),
        )
        if cursor.rowcount:
            self._written()

    def delete(self, project, key):
        self._write("DELETE FROM state WHERE project=? AND key=?", (str(project), key))
        self._written()

    def update(self, project, key, fn, default=None):
        self._write("BEGIN IMMEDIATE", done=False)
        conn = self._connect()
        try:
            row = self._read("SELECT value FROM state WHERE project=? AND key=?", (str(project), key))
            new = fn(default if row is None else json.loads(row[0]))
            self._write(_UPSERT, (str(project), key, encode_value(new)), done=False)
            self._write("COMMIT")
        except BaseException:
            if conn.in_transaction:  # also after a failed COMMIT (a full disk): the next BEGIN must work
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        self._written()
        return new

    def projects(self, key):
        try:
            rows = self._connect().execute("SELECT DISTINCT project FROM state WHERE key=?", (key,)).fetchall()
        except sqlite3.Error as exc:
            raise self._file.failed("read", exc) from None
        return [row[0] for row in rows]

    def put_event(self, project, event_id, data):
        self._write("INSERT OR REPLACE INTO events (project, id, body) VALUES (?, ?, ?)",
                    (str(project), check_event_id(event_id), sqlite3.Binary(data)))

    def get_event(self, project, event_id):
        row = self._read("SELECT body FROM events WHERE project=? AND id=?", (str(project), check_event_id(event_id)))
        return None if row is None else bytes(row[0])

    def delete_event(self, project, event_id):
        self._write("DELETE FROM events WHERE project=? AND id=?", (str(project), check_event_id(event_id)))

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
        with self._lock_file(project) as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def try_lock(self, project):
        # flock belongs to the open file: another thread of this process, with its own open,
        # is refused like another process.
        with self._lock_file(project) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _lock_file(self, project):
        """The project's lock file under MODEL_DIR/locks, opened (lock() and try_lock() share it)."""
        lock_dir = os.path.join(self.model_dir, "locks")
        os.makedirs(lock_dir, exist_ok=True)
        return open(os.path.join(lock_dir, safe_component(project) + ".lock"), "a")

    def health(self) -> dict:
        """Degraded, with what to do, when the database file was deleted or replaced, cannot be
        written, has no room left, does not read as a database, or when the last read or write
        failed: a stat, a statvfs and a short-lived connection (see DatabaseFile.diagnose)."""
        body = {"store": self.kind, "status": "ok", "path": self.path}
        problem = self._file.diagnose()
        now = time.monotonic()
        if problem is None:
            self._problem = (None, now)
            return body
        error = problem.message(self.path)
        if self._problem[0] != error:
            self._problem = (error, now)
        body.update(status="degraded", error=error, detail=problem.message(None),
                    degraded_for_seconds=round(now - self._problem[1], 3))
        return body

    def close(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        with self._cache_lock:
            self._cache, self._cache_gen = {}, -1


def _why(exc: OSError) -> str:
    """What an OSError means for MODEL_DIR, in a few words."""
    reasons = {errno.EROFS: "it is on a read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.ENOSPC: "no space left on its device",
               errno.EDQUOT: "disk quota exceeded", errno.ENOTDIR: "a part of its path is a file, not a directory"}
    return reasons.get(exc.errno, exc.strerror or str(exc))
