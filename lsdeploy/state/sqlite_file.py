"""Whether the SQLite state database can be used: the file the store opened is still there, it
is writable, its disk has room, and it reads as a database; and why an operation on it failed.

`SQLiteStore` asks `check()` before every write and before opening a connection (a write must
not go to a file that was deleted or replaced: it would be lost at the next restart), hands
every SQLite error to `failed()` (a StateError that names the problem and what to do), and
reports `diagnose()` as its health.
"""
from __future__ import annotations

import os
import sqlite3
import time
import urllib.parse
from typing import Optional

from ..errors import StateError

MIN_FREE_BYTES = 1 << 20  # less room than this on the database's disk: the next writes fail
CHECK_SECONDS = 0.05  # longest the health probe's integrity check runs (Label Studio gives /health 1 s)
REFUSED = "writes are refused until then: they would be lost"
RESTART = f"restart the server, which starts an empty database ({REFUSED})"
# SQLite keeps the old file's write-ahead log at the path and would replay it into the new file.
SWAP = f"stop the server, delete state.sqlite3-wal and state.sqlite3-shm beside it, then start it ({REFUSED})"
WRITABLE = "make it and its directory writable by the server, then restart the server"
REPAIR = "restore it from a backup, or move it away and restart the server (which starts an empty database)"
FREE = "free space on its disk"


def connect(path: str, mode: str, timeout: float) -> sqlite3.Connection:
    """A connection that opens `path` only (mode 'rw'), or creates it too ('rwc')."""
    uri = f"file:{urllib.parse.quote(path)}?mode={mode}"
    return sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False)


class Problem:
    """What is wrong with the database, and what to do about it."""

    __slots__ = ("what", "todo", "lasting")

    def __init__(self, what: str, todo: str = "", lasting: bool = False):
        self.what, self.todo = what, todo
        self.lasting = lasting  # it does not go away by itself (corruption)

    def message(self, path: Optional[str]) -> str:
        """One line; without the path for who may not see it (an unauthenticated /health)."""
        where = f"state database {path}" if path else "state database"
        return f"{where} {self.what}" + (f": {self.todo}" if self.todo else "")


def explain(exc: sqlite3.Error) -> Problem:
    """A SQLite error as a Problem (SQLite's own messages, stable across versions)."""
    text = str(exc)
    if "database or disk is full" in text:
        return Problem("is full (database or disk is full)", FREE)
    if "readonly database" in text:
        return Problem("is read-only (attempt to write a readonly database)", WRITABLE)
    if "malformed" in text or "not a database" in text:
        return Problem(f"is corrupt ({text})", REPAIR, lasting=True)
    if "unable to open" in text:
        return Problem(f"cannot be opened ({text})", "check that MODEL_DIR is a directory the server can write")
    if "database is locked" in text:
        return Problem("is locked by another process (database is locked)", "retry; see which process holds it")
    return Problem(f"failed: {type(exc).__name__}: {text}")


class DatabaseFile:
    """The database file of a store, as opened: keeps it open (so its inode, and the number that
    identifies it, stays allocated) and remembers the last failure of reads and of writes."""

    def __init__(self, path: str):
        self.path = path
        self.directory = os.path.dirname(path)
        self._anchor = open(path, "rb", buffering=0)  # noqa: SIM115 - held for the store's life
        stat = os.fstat(self._anchor.fileno())
        self._identity = (stat.st_dev, stat.st_ino)
        # "read" / "write": the last failure of that kind, cleared by the next success of that
        # kind; "lasting": kept (corruption does not heal, though other rows still read).
        self._failures: dict[str, Problem] = {}
        self._sound: Optional[list] = None  # sizes and times of the files when last probed sound

    def changed(self) -> Optional[Problem]:
        """The file at the path is not the one opened (deleted, or replaced by another file)."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return Problem("was deleted", RESTART)
        except OSError as exc:
            return Problem(f"cannot be checked ({exc.strerror})", REFUSED)
        if (stat.st_dev, stat.st_ino) != self._identity:
            return Problem("was replaced by another file", SWAP)
        return None

    def check(self) -> None:
        """Before a write or a new connection: StateError when the file is not the one opened."""
        problem = self.changed()
        if problem is not None:
            raise StateError(problem.message(self.path))

    def failed(self, kind: str, exc: sqlite3.Error) -> StateError:
        """Remember why a read or a write failed; the StateError to raise."""
        problem = explain(exc)
        self._failures["lasting" if problem.lasting else kind] = problem
        return StateError(problem.message(self.path))

    def succeeded(self, kind: str) -> None:
        if kind in self._failures:
            self._failures.pop(kind, None)

    def diagnose(self) -> Optional[Problem]:
        """What is wrong now, or None: a few system calls, and a short-lived connection when the
        file was written since the last look."""
        problem = self.changed()
        if problem is not None:
            return problem
        if not (os.access(self.path, os.W_OK) and os.access(self.directory, os.W_OK)):
            return Problem("is read-only (it or its directory cannot be written)", WRITABLE)
        try:
            disk = os.statvfs(self.directory)
        except OSError:
            disk = None
        if disk is not None:
            free = (disk.f_bfree if os.geteuid() == 0 else disk.f_bavail) * disk.f_frsize
            if free < MIN_FREE_BYTES:
                return Problem(f"has no room to grow ({free} bytes free on its disk)", FREE)
        problem = self._probe_if_written()
        if problem is not None:
            return problem
        for kind in ("lasting", "write", "read"):
            problem = self._failures.get(kind)
            if problem is not None:
                return problem
        return None

    def _probe_if_written(self) -> Optional[Problem]:
        """`_probe`, unless neither the file nor its write-ahead log changed since it last found
        the file sound (a big database costs up to CHECK_SECONDS; an unchanged one, two stats)."""
        files = []
        for path in (self.path, self.path + "-wal"):
            try:
                stat = os.stat(path)
                files.append((stat.st_size, stat.st_mtime_ns))
            except OSError:
                files.append(None)
        if files == self._sound:
            return None
        problem = self._probe()
        if problem is None:
            self._sound = files
        return problem

    def _probe(self) -> Optional[Problem]:
        """Read the file from disk with a new connection (a connection in use serves pages from
        its cache): the schema, then PRAGMA quick_check for at most CHECK_SECONDS."""
        deadline = time.perf_counter() + CHECK_SECONDS
        try:
            conn = connect(self.path, "rw", timeout=0.2)
        except sqlite3.Error as exc:
            return explain(exc)
        try:
            conn.set_progress_handler(lambda: time.perf_counter() > deadline, 1000)
            conn.execute("SELECT name FROM sqlite_master WHERE name='state'").fetchall()
            result = conn.execute("PRAGMA quick_check(1)").fetchone()
            if result and result[0] != "ok":
                return Problem(f"is corrupt (quick_check: {result[0]})", REPAIR, lasting=True)
        except sqlite3.OperationalError as exc:
            if "interrupted" not in str(exc):  # interrupted: a big database, checked in part
                return explain(exc)
        except sqlite3.Error as exc:
            return explain(exc)
        finally:
            conn.close()
        return None
