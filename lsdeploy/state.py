"""Per-project model state: the `get`/`set`/`has` behind `LabelStudioMLBase`.

`StateStore` is the interface; `SQLiteStore` is the local default (correct with several
gunicorn workers and threads: every read goes to the database, read-modify-write runs in
an IMMEDIATE transaction, and `lock()` is an inter-process file lock). A Cloud Storage
store is selected with ``MODEL_STATE_URI=gs://bucket/prefix``.

Values are anything JSON can carry; artifacts are whole files (trained weights).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import re
import shutil
import sqlite3
import tempfile
import threading
from typing import Any, Callable, Iterator

from .errors import StateError

_MISSING = object()
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_artifact_name(name: str) -> str:
    if not isinstance(name, str) or not ARTIFACT_NAME.match(name) or ".." in name:
        raise ValueError(
            f"artifact name {name!r} is not allowed: use letters, digits, '.', '_' or '-' "
            "(no path separators), at most 200 characters"
        )
    return name


def safe_component(project: str) -> str:
    """A file-system-safe, collision-free name for a project id."""
    project = str(project)
    cleaned = _SAFE.sub("_", project) or "_"
    if cleaned != project or cleaned.startswith("."):
        cleaned = f"{cleaned.lstrip('.')}-{hashlib.sha256(project.encode()).hexdigest()[:10]}"
    return cleaned


class StateStore:
    """Interface of a model state store. Keys live per project (a string; '' is allowed)."""

    kind = "abstract"

    def get(self, project: str, key: str, default: Any = None) -> Any:
        raise NotImplementedError

    def set(self, project: str, key: str, value: Any, *, wait: float | None = None) -> None:
        """Write a value. `wait` (seconds): return after at most that long, the write going on
        in the background (it lands, or an error is logged); for writes on the request path,
        which must not hang on a storage outage. None: return when written (errors raise)."""
        raise NotImplementedError

    def create(self, project: str, key: str, value: Any, *, wait: float | None = None) -> None:
        """Set the key only if it has no value yet: a value another worker or instance wrote,
        even one this process has not seen yet, is kept. `wait` as for `set`."""
        self.update(project, key, lambda current: value if current is _MISSING else current, default=_MISSING)

    def has(self, project: str, key: str) -> bool:
        return self.get(project, key, _MISSING) is not _MISSING

    def delete(self, project: str, key: str) -> None:
        raise NotImplementedError

    def update(self, project: str, key: str, fn: Callable[[Any], Any], default: Any = None) -> Any:
        """Atomically replace the value with ``fn(current)`` and return it. `fn` may run
        more than once (optimistic stores retry on conflict): keep it free of side effects."""
        raise NotImplementedError

    def save_artifact(self, project: str, name: str, local_path: str) -> None:
        """Store a whole file; readers see the old or the new file, never a mix."""
        raise NotImplementedError

    def load_artifact(self, project: str, name: str) -> str | None:
        """A local path holding the artifact's bytes, or None when there is none."""
        raise NotImplementedError

    @contextlib.contextmanager
    def lock(self, project: str) -> Iterator[None]:
        """Serialize training for a project across the processes that share this store."""
        yield

    def health(self) -> dict:
        return {"store": self.kind, "status": "ok"}

    def close(self) -> None:
        pass


def _encode(value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"state values must be JSON-serializable (str, number, bool, None, list, dict): {exc}; "
            "store whole files with save_artifact()"
        ) from None


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
            (str(project), key, _encode(value)),
        )
        self._written()

    def create(self, project, key, value, *, wait=None):
        cursor = self._connect().execute(
            "INSERT INTO state (project, key, value) VALUES (?, ?, ?) ON CONFLICT(project, key) DO NOTHING",
            (str(project), key, _encode(value)),
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
                (str(project), key, _encode(new)),
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


def store_from_env(environ=None, model_dir: str | None = None) -> StateStore:
    """The store a server process uses: Cloud Storage when MODEL_STATE_URI is gs://...,
    otherwise SQLite under MODEL_DIR (default ./.lsdeploy)."""
    environ = os.environ if environ is None else environ
    uri = environ.get("MODEL_STATE_URI", "").strip()
    if uri:
        if not uri.startswith("gs://"):
            raise StateError(f"MODEL_STATE_URI={uri!r} is not supported: use gs://BUCKET/PREFIX or unset it")
        from .state_gcs import GCSStore  # imported only when selected: keeps the base image lean

        return GCSStore.from_uri(uri, environ=environ)
    return SQLiteStore(model_dir or environ.get("MODEL_DIR") or os.path.join(os.getcwd(), ".lsdeploy"))


_default_store: StateStore | None = None
_default_lock = threading.Lock()


def default_store() -> StateStore:
    """The process-wide store, created from the environment on first use."""
    global _default_store
    with _default_lock:
        if _default_store is None:
            _default_store = store_from_env()
        return _default_store


def set_default_store(store: StateStore | None) -> None:
    global _default_store
    with _default_lock:
        _default_store = store
