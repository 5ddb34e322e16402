"""Each process's in-memory copy of every state object, and the thread that keeps it fresh.

Reads never make a storage request (only the first load of a process, at start-up, does).
One background thread lists ``state/`` (one request returns every object's generation) every
``refresh_seconds / 2`` and downloads only the objects whose generation changed; it is the only
thread that refreshes for readers. A read whose snapshot is older than ``refresh_seconds`` (the
thread was starved, or the process was idle and the thread paused, as on Cloud Run with CPU
throttling) wakes it and waits for its refresh at most ``read_wait`` seconds (a listing takes
milliseconds), then serves what it has. So a write that completed at time t is seen by every read
that starts after t + refresh_seconds on any instance, while storage answers within ``read_wait``.
When storage fails or hangs (a refresh failed, or one has been running longer than ``read_wait``),
reads do not wait at all: they serve the snapshot and the store is degraded until a refresh
succeeds. A process with no reads for a while stops listing (no cost when idle).

Writes of this process enter the snapshot with `remember` / `forget` (read-your-writes); a
listing that began before such a write does not undo it.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Optional

from .bucket import StateBucket
from .errors import Outage

IDLE_AFTER_SECONDS = 60.0  # no reads for this long: the background thread stops listing


class Entry:
    """One state object as this process knows it."""

    __slots__ = ("generation", "value", "raw", "mutable", "recent", "stamp")

    def __init__(self, generation: int, body: dict, stamp: float):
        self.generation = generation
        self.value = body.get("v")
        self.mutable = isinstance(self.value, (dict, list))
        self.raw = json.dumps(self.value) if self.mutable else None
        self.recent = list(body.get("w") or [])
        self.stamp = stamp  # monotonic time from which this knowledge is valid

    def copy_value(self):
        return json.loads(self.raw) if self.mutable else self.value


class Snapshot:
    """Entries by key ``(kind, project, key)``; see the module docstring."""

    def __init__(self, objects: StateBucket, outage: Outage, refresh_seconds: float, read_wait: float):
        self.objects = objects
        self.outage = outage
        self.refresh_seconds = refresh_seconds
        self.read_wait = read_wait
        self._entries: dict[tuple, Entry] = {}
        self._tombstones: dict[tuple, float] = {}
        self.as_of = float("-inf")  # start time of the listing the snapshot reflects
        self._last_read = time.monotonic()
        self._closed = False
        self._new_threads_and_locks()

    def _new_threads_and_locks(self) -> None:
        self._lock = threading.Lock()          # guards _entries/_tombstones mutations
        self._refresh_lock = threading.Lock()  # one refresh at a time
        self._refreshed = threading.Condition()  # notified after every refresh attempt
        self._refreshing_since: Optional[float] = None  # start of the refresh in flight
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def after_fork(self) -> None:
        # Threads do not survive fork: start over with the same entries, as if never listed.
        self._new_threads_and_locks()
        self.as_of = float("-inf")

    def get(self, key: tuple) -> Optional[Entry]:
        return self._entries.get(key)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def keys(self) -> list:
        """Every key the snapshot holds, as `(kind, project, key)`."""
        with self._lock:
            return list(self._entries)

    # -- refresh -------------------------------------------------------------------------
    def refresh(self, startup: bool = False) -> None:
        """List state/, download what changed, merge into the snapshot. Readers never call
        this: the background thread does (and start-up, lock(), which may wait)."""
        with self._refresh_lock:
            started = time.monotonic()
            self._refreshing_since = started
            try:
                self._refresh_locked(started, startup)
            finally:
                self._refreshing_since = None
                with self._refreshed:
                    self._refreshed.notify_all()

    def _refresh_locked(self, started: float, startup: bool) -> None:
        objects = self.objects
        try:
            listed = objects.list_state(retry=objects.retry_for(10.0) if startup else None)
            changed = [k for k, g in listed.items()
                       if (e := self._entries.get(k)) is None or (e.generation != g and e.stamp <= started)]
            fetched: dict[tuple, Optional[tuple]] = {}
            for key in changed:
                fetched[key] = objects.download_state(key, retry=objects.retry_for(10.0) if startup else None,
                                                      timeout=objects.list_timeout)
        except Exception as exc:
            if not startup:
                self.outage.note(exc)
            raise
        with self._lock:
            for key, entry in list(self._entries.items()):
                if key not in listed and entry.stamp <= started:
                    del self._entries[key]
            for key, found in fetched.items():
                current = self._entries.get(key)
                if current is not None and current.stamp > started:
                    continue  # this process wrote it after the listing began
                if self._tombstones.get(key, float("-inf")) > started:
                    continue  # this process deleted it after the listing began
                if found is None:
                    self._entries.pop(key, None)
                else:
                    generation, body = found
                    self._entries[key] = Entry(generation, body, started)
            for key, stamp in list(self._tombstones.items()):
                if stamp <= started:
                    del self._tombstones[key]
            self.as_of = max(self.as_of, started)
        self.outage.over(started)

    def _ensure_thread(self) -> None:
        thread = self._thread
        if (thread is None or not thread.is_alive()) and not self._closed:
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="lsdeploy-gcs-state", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        interval = self.refresh_seconds / 2
        stop = self._stop
        while not stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if stop.is_set():
                return
            if time.monotonic() - self._last_read > IDLE_AFTER_SECONDS:
                continue  # idle: no listing (and no cost); the next read refreshes first
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - noted in the outage; retried next round
                pass

    def fresh(self) -> None:
        """Let the snapshot be at most refresh_seconds old when storage answers: wake the
        refresher and wait for it at most read_wait. Never waits while storage is degraded."""
        now = time.monotonic()
        self._last_read = now
        if self._thread is None:
            self._ensure_thread()
        if now - self.as_of <= self.refresh_seconds:
            return
        self._ensure_thread()
        if self.degraded(now) is not None:
            return  # serve the last snapshot; the background thread keeps trying
        self._wake.set()
        with self._refreshed:
            self._refreshed.wait_for(lambda: self.as_of >= now - self.refresh_seconds or self.outage.error is not None,
                                     timeout=self.read_wait)

    def degraded(self, now: float) -> Optional[str]:
        """Why storage is not answering (a refresh failed, or one has run longer than
        read_wait), or None."""
        if self.outage.error is not None:
            return self.outage.error
        since = self._refreshing_since
        if since is not None and now - since > self.read_wait:
            return f"Cloud Storage has not answered a listing for {now - since:.1f} s"
        return None

    def degraded_since(self) -> Optional[float]:
        return self.outage.since if self.outage.error is not None else self._refreshing_since

    # -- this process's writes -------------------------------------------------------------
    def remember(self, key: tuple, generation: int, body: dict) -> None:
        with self._lock:
            current = self._entries.get(key)
            if current is None or generation >= current.generation:
                self._entries[key] = Entry(generation, body, time.monotonic())
            self._tombstones.pop(key, None)

    def forget(self, key: tuple) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._tombstones[key] = time.monotonic()

    def close(self) -> None:
        self._closed = True
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._thread = None
