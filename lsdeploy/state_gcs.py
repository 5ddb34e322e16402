"""Model state in Cloud Storage, shared by every instance of a deployed backend.

Selected with ``MODEL_STATE_URI=gs://BUCKET/PREFIX`` (needs the ``gcs`` extra). docs/state.md
is the user-facing description; this docstring is the design.

Layout under ``gs://BUCKET/PREFIX/``:

- ``state/p-<project>/k-<key>.json``: one small object per key, ``{"v": value, "w": [ids]}``.
  One object per key means a ``set()`` never rewrites another key, and ``update()`` is an
  optimistic read-modify-write on one object guarded by ``if_generation_match`` (0 when the
  key does not exist yet). ``w`` lists the ids of the last updates, so an update whose
  answer was lost (and whose retry then fails with 412) can tell that it did land.
  Values are limited to 4 MiB: the client then always uses a multipart upload, where
  Cloud Storage (and fake-gcs-server) honour the precondition; it switches to resumable
  uploads above 8 MiB.
- ``state/p-<project>/a-<name>.json``: the pointer of an artifact ``{"v": {"sha256", "size"}}``.
- ``artifacts/p-<project>/<name>/<sha256>``: artifact contents, immutable, content-addressed.
  A save uploads the contents first and then flips the pointer, so a reader sees the old or the
  new file, never a mix; the download is checked against the hash and renamed into a local
  cache keyed by the hash (a second load of the same version is a local path, no download).
  After a save, contents are deleted unless they are the current or the previous version, the
  version the pointer names when read again (another instance may have saved since), or were
  written (or re-used, ``saved_at`` metadata) within ``artifact_grace_seconds``: another
  instance may have uploaded them and not yet flipped the pointer.
- ``locks/p-<project>.json``: a best-effort training lease (see `lock()`).

Reads never make a storage request (only the first load of a process, at start-up, does).
Each process keeps an in-memory snapshot of every ``state/`` object. One background thread
lists ``state/`` (one request returns every object's generation) every ``refresh_seconds / 2``
and downloads only the objects whose generation changed; it is the only thread that refreshes
for readers. A read whose snapshot is older than ``refresh_seconds`` (the thread was starved,
or the process was idle and the thread paused, as on Cloud Run with CPU throttling) wakes it
and waits for its refresh at most ``read_wait`` seconds (a listing takes milliseconds), then
serves what it has. So a write that completed at time t is seen by every read that starts
after t + refresh_seconds on any instance, while storage answers within ``read_wait``. When
storage fails or hangs (a refresh failed, or one has been running longer than ``read_wait``),
reads do not wait at all: they serve the snapshot and `health()` answers ``degraded`` until a
refresh succeeds. A process with no reads for a while stops listing (no cost when idle).

Writes go to storage before they return and then update the local snapshot (read-your-writes).
Transient errors (429, 5xx, timeouts, refused connections) are retried with exponential backoff
for up to ``write_timeout`` seconds; a write that still fails raises StateError. A write given
``wait=`` (the ones made on the request path while a model is built) returns after at most that
long, at once while storage is degraded, and goes on in a background thread: it lands, or an
error is logged. `lock()` refreshes the snapshot once it holds the training lease, so a fit
starts from what the previous holder wrote.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
import uuid
import weakref
from typing import Any, Callable, Iterator, Optional

from .errors import StateError
from .state import StateStore, _encode, check_artifact_name

logger = logging.getLogger(__name__)

_MISSING = object()
MAX_VALUE_BYTES = 4 << 20  # far below the client's 8 MiB switch to resumable uploads
RECENT_WRITES = 16
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
DEFAULT_REFRESH_SECONDS = 2.0
DEFAULT_WRITE_TIMEOUT = 60.0
IDLE_AFTER_SECONDS = 60.0  # no reads for this long: the background thread stops listing
DEFAULT_READ_WAIT = 0.25  # longest a read waits for a refresh (Label Studio gives /health 1 s)
DEFAULT_ARTIFACT_GRACE_SECONDS = 600.0  # contents younger than this are never garbage-collected
ROLE_HINT = "grant the service account roles/storage.objectUser on the bucket"


def parse_uri(uri: str) -> tuple[str, str]:
    """'gs://bucket/some/prefix' -> ('bucket', 'some/prefix/'); 'gs://bucket' -> ('bucket', '')."""
    if not isinstance(uri, str) or not uri.startswith("gs://"):
        raise StateError(f"MODEL_STATE_URI={uri!r} is not a Cloud Storage URI: use gs://BUCKET/PREFIX")
    bucket, _, prefix = uri[len("gs://"):].partition("/")
    if not _BUCKET_NAME.match(bucket):
        raise StateError(f"MODEL_STATE_URI={uri!r}: {bucket!r} is not a valid bucket name "
                         "(lowercase letters, digits, '-', '_', '.'; 3 to 222 characters)")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")


def _quote(text: str) -> str:
    return urllib.parse.quote(str(text), safe="")


def _project_dir(project: str) -> str:
    return "p-" + _quote(project)


def _state_name(kind: str, project: str, key: str) -> str:
    """Object name (relative to PREFIX/state/) of a key ('k') or an artifact pointer ('a')."""
    return f"{_project_dir(project)}/{kind}-{_quote(key)}.json"


def _parse_state_name(name: str) -> Optional[tuple]:
    project_part, _, leaf = name.partition("/")
    if not project_part.startswith("p-") or "/" in leaf or not leaf.endswith(".json") or leaf[1:2] != "-":
        return None
    kind = leaf[0]
    if kind not in ("k", "a"):
        return None
    return kind, urllib.parse.unquote(project_part[2:]), urllib.parse.unquote(leaf[2:-len(".json")])


class _Entry:
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


def _decode_body(data: bytes) -> dict:
    body = json.loads(data.decode("utf-8"))
    if not isinstance(body, dict) or "v" not in body:
        raise ValueError("not an lsdeploy state object")
    return body


def _encode_body(value: Any, recent: Optional[list] = None) -> bytes:
    text = _encode(value)
    body = f'{{"v":{text}' + (f',"w":{json.dumps(recent)}' if recent else "") + "}"
    data = body.encode("utf-8")
    if len(data) > MAX_VALUE_BYTES:
        raise ValueError(f"state value is {len(data)} bytes, more than {MAX_VALUE_BYTES >> 20} MiB: "
                         "keep big data in files with save_artifact()")
    return data


def _status_of(exc: BaseException) -> Optional[int]:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


def _describe(exc: BaseException) -> str:
    """A short one-line account of a storage error (no URLs, no response bodies)."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    if cause is not None and type(exc).__name__ == "RetryError":
        exc = cause
    code = _status_of(exc)
    if code is not None:
        detail = ""
        for err in getattr(exc, "errors", None) or []:
            if isinstance(err, dict) and err.get("message"):
                detail = str(err["message"])
                break
        return f"HTTP {code} {type(exc).__name__}" + (f": {detail}" if detail else "")
    text = str(exc)
    errno_text = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    if errno_text:
        text = errno_text.group(0)
    text = re.sub(r"https?://[^\s:/]+(:\d+)?\S*", lambda m: m.group(0).split("/")[2], text)
    text = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {text}"[:200]


class GCSStore(StateStore):
    """State store on Cloud Storage; see the module docstring for the design."""

    kind = "gcs"

    def __init__(self, bucket: str, prefix: str = "", *, client=None, client_factory: Optional[Callable] = None,
                 refresh_seconds: float = DEFAULT_REFRESH_SECONDS, write_timeout: float = DEFAULT_WRITE_TIMEOUT,
                 cache_dir: Optional[str] = None, lease_seconds: float = 60.0, lock_wait: float = 600.0,
                 read_wait: float = DEFAULT_READ_WAIT,
                 artifact_grace_seconds: float = DEFAULT_ARTIFACT_GRACE_SECONDS, check: bool = True):
        if refresh_seconds <= 0:
            raise StateError(f"MODEL_STATE_REFRESH_SECONDS must be positive, not {refresh_seconds}")
        self.bucket_name = bucket
        self.prefix = prefix
        self.uri = f"gs://{bucket}/{prefix}"
        self.refresh_seconds = float(refresh_seconds)
        self.write_timeout = float(write_timeout)
        self.lease_seconds = float(lease_seconds)
        self.lock_wait = float(lock_wait)
        self.read_wait = float(read_wait)
        self.artifact_grace_seconds = float(artifact_grace_seconds)
        self._client_factory = client_factory
        if client is None:
            if client_factory is None:
                raise TypeError("GCSStore needs a client or a client_factory")
            client = client_factory()
        self._client = client
        self._bucket = client.bucket(bucket)
        self._state_prefix = prefix + "state/"
        self.cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), f"lsdeploy-{os.getuid()}", "gcs-cache")
        self._owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

        self._snapshot: dict[tuple, _Entry] = {}
        self._tombstones: dict[tuple, float] = {}
        self._lock = threading.Lock()          # guards _snapshot/_tombstones mutations
        self._refresh_lock = threading.Lock()  # one refresh at a time
        self._refreshed = threading.Condition()  # notified after every refresh attempt
        self._refreshing_since: Optional[float] = None  # start of the refresh in flight
        self._as_of = float("-inf")            # start time of the listing the snapshot reflects
        self._last_read = time.monotonic()
        self._error: Optional[str] = None
        self._error_since: Optional[float] = None
        self._project_locks: dict[str, threading.Lock] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._background: set = set()  # writes that outlived their caller's wait

        from google.cloud.storage.retry import DEFAULT_RETRY

        # Writes (and the reads inside update/load) retry transient errors for write_timeout s.
        self._retry = DEFAULT_RETRY.with_delay(initial=0.2, maximum=2.0, multiplier=2.0).with_timeout(self.write_timeout)
        # One request's own timeout (connect, read): a hanging request must not outlast the
        # retry deadline by much.
        self._timeout = (3.0, max(2.0, min(30.0, self.write_timeout)))
        # The refresh is retried by its own loop: a short timeout, no retry inside.
        self._list_timeout = (1.0, max(2.0, self.refresh_seconds))

        if check:
            self._check_usable()
        self._register_fork_handler()

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_uri(cls, uri: str, environ=None, **kwargs) -> "GCSStore":
        """The store for ``MODEL_STATE_URI``; settings from `environ`:
        MODEL_STATE_REFRESH_SECONDS (default 2), MODEL_STATE_WRITE_TIMEOUT_SECONDS (default 60),
        MODEL_STATE_CACHE_DIR (default MODEL_DIR/gcs-cache), STORAGE_EMULATOR_HOST (an emulator,
        anonymous credentials), GOOGLE_CLOUD_PROJECT."""
        environ = os.environ if environ is None else environ
        bucket, prefix = parse_uri(uri.strip())

        def number(name, default):
            raw = str(environ.get(name, "") or "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                value = -1.0
            if value <= 0:
                raise StateError(f"{name}={raw!r} must be a positive number of seconds")
            return value

        kwargs.setdefault("refresh_seconds", number("MODEL_STATE_REFRESH_SECONDS", DEFAULT_REFRESH_SECONDS))
        kwargs.setdefault("write_timeout", number("MODEL_STATE_WRITE_TIMEOUT_SECONDS", DEFAULT_WRITE_TIMEOUT))
        cache = environ.get("MODEL_STATE_CACHE_DIR") or (
            os.path.join(environ["MODEL_DIR"], "gcs-cache") if environ.get("MODEL_DIR") else None)
        kwargs.setdefault("cache_dir", cache)
        emulator = (environ.get("STORAGE_EMULATOR_HOST") or "").strip()
        project = environ.get("GOOGLE_CLOUD_PROJECT") or None

        def make_client():
            try:
                from google.cloud import storage
            except ImportError:
                raise StateError("MODEL_STATE_URI=gs://... needs google-cloud-storage: "
                                 "pip install 'lsdeploy[gcs]'") from None
            if emulator:
                from google.auth.credentials import AnonymousCredentials

                endpoint = emulator if "://" in emulator else f"http://{emulator}"
                return storage.Client(project=project or "lsdeploy-emulator", credentials=AnonymousCredentials(),
                                      client_options={"api_endpoint": endpoint})
            try:
                return storage.Client(project=project)
            except Exception as exc:  # google.auth.exceptions.DefaultCredentialsError and friends
                raise StateError(f"no Google credentials for {uri}: {_describe(exc)}; on Cloud Run the service "
                                 "account is used, locally run `gcloud auth application-default login`") from None

        return cls(bucket, prefix, client_factory=make_client, **kwargs)

    def _check_usable(self) -> None:
        """Fail at start-up, in one line, when the bucket is missing or not readable/writable."""
        from google.api_core import exceptions as gexc

        try:
            self._refresh(startup=True)
        except gexc.NotFound:
            raise StateError(f"Cloud Storage bucket {self.bucket_name!r} does not exist ({self.uri}): create it "
                             f"(gcloud storage buckets create gs://{self.bucket_name}) or fix MODEL_STATE_URI") from None
        except gexc.Forbidden as exc:
            raise StateError(f"no permission to read {self.uri}{self._who()}: needs storage.objects.list and "
                             f"storage.objects.get; {ROLE_HINT} {self.bucket_name!r} ({_describe(exc)})") from None
        except gexc.Unauthorized as exc:
            raise StateError(f"Cloud Storage refused the credentials for {self.uri}: {_describe(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - anything else: storage unreachable at start-up
            raise StateError(f"cannot reach Cloud Storage for {self.uri}: {_describe(exc)}; "
                             "check the network and STORAGE_EMULATOR_HOST") from None
        probe = self._bucket.blob(f"{self.prefix}.lsdeploy-probe/{self._owner}")
        try:
            probe.upload_from_string(b"probe", content_type="text/plain", if_generation_match=0,
                                     retry=self._retry_for(10.0), timeout=self._timeout)
        except gexc.Forbidden as exc:
            raise StateError(f"cannot write to {self.uri}{self._who()}: needs storage.objects.create; "
                             f"{ROLE_HINT} {self.bucket_name!r} ({_describe(exc)})") from None
        except Exception as exc:  # noqa: BLE001
            raise StateError(f"cannot write to {self.uri}: {_describe(exc)}") from None
        try:
            probe.delete(retry=self._retry_for(10.0), timeout=self._timeout)
        except gexc.NotFound:
            pass
        except gexc.Forbidden as exc:
            raise StateError(f"cannot delete in {self.uri}{self._who()}: needs storage.objects.delete; "
                             f"{ROLE_HINT} {self.bucket_name!r} ({_describe(exc)})") from None
        except Exception as exc:  # noqa: BLE001
            raise StateError(f"cannot delete in {self.uri}: {_describe(exc)}") from None

    def _who(self) -> str:
        email = getattr(getattr(self._client, "_credentials", None), "service_account_email", None)
        return f" as {email}" if isinstance(email, str) and "@" in email else ""

    def _retry_for(self, seconds: float):
        return self._retry.with_timeout(seconds)

    def _register_fork_handler(self) -> None:
        ref = weakref.ref(self)

        def after_fork():
            store = ref()
            if store is not None:
                store._after_fork()

        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=after_fork)

    def _after_fork(self) -> None:
        # Threads and HTTP connections do not survive fork: start over with the same snapshot.
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._refreshed = threading.Condition()
        self._refreshing_since = None
        self._background = set()
        self._project_locks = {}
        self._thread = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        if self._client_factory is not None and not self._closed:
            self._client = self._client_factory()
            self._bucket = self._client.bucket(self.bucket_name)
        self._as_of = float("-inf")

    # -- snapshot ------------------------------------------------------------------------
    def _refresh(self, startup: bool = False) -> None:
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
        try:
            listed: dict[tuple, int] = {}
            blobs = self._client.list_blobs(
                self._bucket, prefix=self._state_prefix, fields="items(name,generation),nextPageToken",
                timeout=self._list_timeout, retry=self._retry_for(10.0) if startup else None)
            for blob in blobs:
                parsed = _parse_state_name(blob.name[len(self._state_prefix):])
                if parsed is not None:
                    listed[parsed] = int(blob.generation)
            changed = [k for k, g in listed.items()
                       if (e := self._snapshot.get(k)) is None or (e.generation != g and e.stamp <= started)]
            fetched: dict[tuple, Optional[tuple]] = {}
            for key in changed:
                fetched[key] = self._download_state(key, retry=self._retry_for(10.0) if startup else None,
                                                    timeout=self._list_timeout)
        except Exception as exc:
            if not startup:
                self._note_error(exc)
            raise
        with self._lock:
            for key, entry in list(self._snapshot.items()):
                if key not in listed and entry.stamp <= started:
                    del self._snapshot[key]
            for key, found in fetched.items():
                current = self._snapshot.get(key)
                if current is not None and current.stamp > started:
                    continue  # this process wrote it after the listing began
                if self._tombstones.get(key, float("-inf")) > started:
                    continue  # this process deleted it after the listing began
                if found is None:
                    self._snapshot.pop(key, None)
                else:
                    generation, body = found
                    self._snapshot[key] = _Entry(generation, body, started)
            for key, stamp in list(self._tombstones.items()):
                if stamp <= started:
                    del self._tombstones[key]
            self._as_of = max(self._as_of, started)
        if self._error is not None:
            logger.warning("Cloud Storage state %s reachable again after %.1f s", self.uri,
                           time.monotonic() - (self._error_since or started))
        self._error = None
        self._error_since = None

    def _download_state(self, key: tuple, retry, timeout) -> Optional[tuple]:
        """(generation, body) of a state object, or None when it is gone."""
        from google.api_core import exceptions as gexc

        blob = self._bucket.blob(self._state_prefix + _state_name(*key))
        try:
            data = blob.download_as_bytes(retry=retry, timeout=timeout)
        except gexc.NotFound:
            return None
        try:
            return int(blob.generation), _decode_body(data)
        except ValueError as exc:
            logger.warning("ignoring unreadable state object gs://%s/%s: %s", self.bucket_name, blob.name, exc)
            return None

    def _note_error(self, exc: BaseException) -> None:
        message = _describe(exc)
        if self._error is None:
            self._error_since = time.monotonic()
            logger.warning("Cloud Storage state %s unreachable (%s): serving the last known state", self.uri, message)
        self._error = message

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
                self._refresh()
            except Exception:  # noqa: BLE001 - noted in _error; retried next round
                pass

    def _fresh(self) -> None:
        """Let the snapshot be at most refresh_seconds old when storage answers: wake the
        refresher and wait for it at most read_wait. Never waits while storage is degraded."""
        now = time.monotonic()
        self._last_read = now
        if self._thread is None:
            self._ensure_thread()
        if now - self._as_of <= self.refresh_seconds:
            return
        self._ensure_thread()
        if self._degraded(now) is not None:
            return  # serve the last snapshot; the background thread keeps trying
        self._wake.set()
        with self._refreshed:
            self._refreshed.wait_for(lambda: self._as_of >= now - self.refresh_seconds or self._error is not None,
                                     timeout=self.read_wait)

    def _degraded(self, now: float) -> Optional[str]:
        """Why storage is not answering (a refresh failed, or one has run longer than
        read_wait), or None."""
        if self._error is not None:
            return self._error
        since = self._refreshing_since
        if since is not None and now - since > self.read_wait:
            return f"Cloud Storage has not answered a listing for {now - since:.1f} s"
        return None

    def _remember(self, key: tuple, generation: int, body: dict) -> None:
        with self._lock:
            current = self._snapshot.get(key)
            if current is None or generation >= current.generation:
                self._snapshot[key] = _Entry(generation, body, time.monotonic())
            self._tombstones.pop(key, None)

    def _forget(self, key: tuple) -> None:
        with self._lock:
            self._snapshot.pop(key, None)
            self._tombstones[key] = time.monotonic()

    # -- writes --------------------------------------------------------------------------
    def _write_error(self, what: str, exc: BaseException) -> StateError:
        from google.api_core import exceptions as gexc

        if isinstance(exc, gexc.Forbidden):
            return StateError(f"cannot write {what} to {self.uri}{self._who()}: permission denied, needs "
                              f"storage.objects.create; {ROLE_HINT} {self.bucket_name!r}")
        if isinstance(exc, gexc.NotFound):
            return StateError(f"cannot write {what}: bucket {self.bucket_name!r} does not exist any more")
        self._note_error(exc)
        return StateError(f"cannot write {what} to {self.uri}: {_describe(exc)} "
                          f"(retried for {self.write_timeout:.0f} s, MODEL_STATE_WRITE_TIMEOUT_SECONDS)")

    def _upload(self, name: str, data: bytes, what: str, if_generation_match=None, retry=None):
        """Upload a small object (multipart, so a precondition is honoured); the blob written."""
        from google.api_core import exceptions as gexc

        blob = self._bucket.blob(name)
        try:
            blob.upload_from_string(data, content_type="application/json", if_generation_match=if_generation_match,
                                    retry=retry or self._retry, timeout=self._timeout)
        except gexc.PreconditionFailed:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self._write_error(what, exc) from None
        return blob

    def _within(self, wait: Optional[float], what: str, write: Callable[[], None]) -> None:
        """Run `write`; with `wait`, return after at most that long (at once while storage is
        degraded) and let the write finish in a background thread: it lands, or an error is
        logged. An error raised while the caller still waits is the caller's."""
        if wait is None:
            write()
            return
        done = threading.Event()
        guard = threading.Lock()
        state = {"waiting": True, "error": None}

        def run():
            try:
                write()
            except BaseException as exc:  # noqa: BLE001 - the caller's, or logged
                with guard:
                    if state["waiting"]:
                        state["error"] = exc
                        return
                logger.error("%s was not written to %s: %s", what, self.uri, exc)
            finally:
                done.set()
                with self._lock:
                    self._background.discard(thread)

        thread = threading.Thread(target=run, name="lsdeploy-gcs-write", daemon=True)
        with self._lock:
            self._background.add(thread)
        thread.start()
        done.wait(0 if self._degraded(time.monotonic()) is not None else wait)
        with guard:
            state["waiting"] = False
            error = state["error"]
        if error is not None:
            raise error
        if not done.is_set():
            logger.warning("%s is still being written to %s (storage is slow or unreachable); it lands in "
                           "the background or an error is logged", what, self.uri)

    def get(self, project, key, default=None):
        self._fresh()
        entry = self._snapshot.get(("k", str(project), key))
        return default if entry is None else entry.copy_value()

    def has(self, project, key):
        self._fresh()
        return ("k", str(project), key) in self._snapshot

    def set(self, project, key, value, *, wait=None):
        skey = ("k", str(project), key)
        data = _encode_body(value)

        def write():
            blob = self._upload(self._state_prefix + _state_name(*skey), data, f"state key {key!r}")
            self._remember(skey, int(blob.generation), json.loads(data))

        self._within(wait, f"state key {key!r}", write)

    def create(self, project, key, value, *, wait=None):
        from google.api_core import exceptions as gexc

        skey = ("k", str(project), key)
        if skey in self._snapshot:
            return
        data = _encode_body(value)
        what = f"state key {key!r}"

        def write():
            try:  # create-only: another instance's value, even one not in our snapshot yet, is kept
                blob = self._upload(self._state_prefix + _state_name(*skey), data, what, if_generation_match=0)
            except gexc.PreconditionFailed:
                found = self._read_for_update(skey, what)
                if found is not None:
                    self._remember(skey, *found)
                return
            self._remember(skey, int(blob.generation), json.loads(data))

        self._within(wait, what, write)

    def delete(self, project, key):
        from google.api_core import exceptions as gexc

        skey = ("k", str(project), key)
        try:
            self._bucket.blob(self._state_prefix + _state_name(*skey)).delete(retry=self._retry, timeout=self._timeout)
        except gexc.NotFound:
            pass
        except Exception as exc:  # noqa: BLE001
            raise self._write_error(f"deletion of state key {key!r}", exc) from None
        self._forget(skey)

    def update(self, project, key, fn, default=None):
        from google.api_core import exceptions as gexc

        skey = ("k", str(project), key)
        name = self._state_prefix + _state_name(*skey)
        write_id = uuid.uuid4().hex[:16]
        deadline = time.monotonic() + self.write_timeout
        known = self._snapshot.get(skey)  # first guess; a stale guess just costs one 412
        attempt = 0
        while True:
            if known is not None:
                generation, current, recent = known.generation, known.copy_value(), known.recent
            else:
                found = self._read_for_update(skey, f"state key {key!r}")
                if found is None:
                    generation, current, recent = 0, default, []
                else:
                    generation, body = found
                    current, recent = body.get("v"), list(body.get("w") or [])
            new = fn(current)
            data = _encode_body(new, [write_id] + recent[:RECENT_WRITES - 1])
            try:
                blob = self._upload(name, data, f"state key {key!r}", if_generation_match=generation)
            except gexc.PreconditionFailed:
                found = self._read_for_update(skey, f"state key {key!r}")
                if found is not None and write_id in (found[1].get("w") or []):
                    # An earlier try landed; its answer was lost and the retry hit our own write.
                    self._remember(skey, *found)
                    return new
                attempt += 1
                if time.monotonic() > deadline:
                    raise StateError(f"update of state key {key!r} in {self.uri} gave up after {attempt} "
                                     "conflicting writes from other instances") from None
                if found is not None:
                    self._remember(skey, *found)
                known = self._snapshot.get(skey) if found is not None else None
                time.sleep(random.uniform(0, min(0.02 * (2 ** min(attempt, 6)), 1.0)))
                continue
            self._remember(skey, int(blob.generation), json.loads(data))
            return new

    def _read_for_update(self, skey: tuple, what: str) -> Optional[tuple]:
        try:
            return self._download_state(skey, retry=self._retry, timeout=self._timeout)
        except Exception as exc:  # noqa: BLE001
            self._note_error(exc)
            raise StateError(f"cannot read {what} from {self.uri}: {_describe(exc)} "
                             f"(retried for {self.write_timeout:.0f} s)") from None

    # -- artifacts -----------------------------------------------------------------------
    def _artifact_dir(self, project: str, name: str) -> str:
        return f"{self.prefix}artifacts/{_project_dir(project)}/{name}/"

    def _cache_path(self, project: str, name: str, digest: str) -> str:
        return os.path.join(self.cache_dir, self.bucket_name, _quote(self.prefix) or "_", _project_dir(project),
                            name, digest)

    def save_artifact(self, project, name, local_path):
        from google.api_core import exceptions as gexc

        project = str(project)
        check_artifact_name(name)
        digest, size = _sha256_file(local_path)
        akey = ("a", project, name)
        previous_digest = _digest_of(self._snapshot.get(akey))
        content = self._bucket.blob(self._artifact_dir(project, name) + digest)
        try:
            try:
                # Create-only: the same contents under the same name are already whole.
                content.upload_from_filename(local_path, content_type="application/octet-stream",
                                             if_generation_match=0, retry=self._retry, timeout=self._timeout)
            except gexc.PreconditionFailed:
                # Re-used contents: mark them recent, so no collector deletes them before the
                # pointer names them (gone already: upload them again).
                content.metadata = {"saved_at": repr(time.time())}
                try:
                    content.patch(retry=self._retry, timeout=self._timeout)
                except gexc.NotFound:
                    content.upload_from_filename(local_path, content_type="application/octet-stream",
                                                 retry=self._retry, timeout=self._timeout)
        except Exception as exc:  # noqa: BLE001
            raise self._write_error(f"artifact {name!r}", exc) from None
        pointer = {"sha256": digest, "size": size, "saved_by": self._owner, "saved_at": time.time()}
        data = _encode_body(pointer)
        blob = self._upload(self._state_prefix + _state_name(*akey), data, f"artifact pointer {name!r}")
        self._remember(akey, int(blob.generation), json.loads(data))
        self._cache_copy(local_path, self._cache_path(project, name, digest))
        if previous_digest and previous_digest != digest:
            self._collect(project, name, keep={digest, previous_digest})

    def _cache_copy(self, source: str, target: str) -> None:
        try:
            if os.path.exists(target):
                return
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
            os.replace(tmp, target)
        except OSError as exc:  # the cache is an optimisation: a later load downloads
            logger.warning("cannot cache artifact in %s: %s", target, exc)

    def _collect(self, project: str, name: str, keep: set) -> None:
        """Delete old contents (best effort). Kept besides `keep`: what the pointer names now
        (read again: this snapshot may be stale) and contents written or re-used within
        artifact_grace_seconds (another instance may be about to flip the pointer to them)."""
        keep = set(keep)
        try:
            found = self._download_state(("a", project, name), retry=None, timeout=self._list_timeout)
            pointer = found[1].get("v") if found is not None else None
            if isinstance(pointer, dict):
                keep.add(pointer.get("sha256"))
            cutoff = time.time() - self.artifact_grace_seconds
            for blob in self._client.list_blobs(self._bucket, prefix=self._artifact_dir(project, name),
                                                timeout=self._timeout):
                if blob.name.rsplit("/", 1)[-1] in keep or _saved_at(blob) > cutoff:
                    continue
                blob.delete(if_generation_match=blob.generation, if_metageneration_match=blob.metageneration,
                            timeout=self._timeout, retry=None)  # not if re-used meanwhile
        except Exception as exc:  # noqa: BLE001 - garbage stays; it costs storage, not correctness
            logger.info("could not delete old versions of artifact %r: %s", name, _describe(exc))
        cache = os.path.dirname(self._cache_path(project, name, "x"))
        with contextlib.suppress(OSError):
            for entry in os.listdir(cache):
                if entry not in keep and not entry.startswith(".tmp-"):
                    os.unlink(os.path.join(cache, entry))

    def load_artifact(self, project, name):
        from google.api_core import exceptions as gexc

        project = str(project)
        check_artifact_name(name)
        self._fresh()
        for attempt in range(2):
            entry = self._snapshot.get(("a", project, name))
            if entry is None or not isinstance(entry.value, dict) or "sha256" not in entry.value:
                return None
            digest = entry.value["sha256"]
            path = self._cache_path(project, name, digest)
            if os.path.exists(path):
                return path
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            os.close(fd)
            degraded = self._degraded(time.monotonic())
            try:
                blob = self._bucket.blob(self._artifact_dir(project, name) + digest)
                # While storage is degraded, one short try: a request must not hang on it.
                blob.download_to_filename(tmp, retry=None if degraded else self._retry,
                                          timeout=self._list_timeout if degraded else self._timeout)
                got, _ = _sha256_file(tmp)
                if got != digest:
                    raise StateError(f"artifact {name!r} in {self.uri} is corrupt (sha256 {got}, expected {digest})")
                os.replace(tmp, path)
                return path
            except gexc.NotFound:
                # Replaced (and its old contents deleted) since our snapshot: read the pointer
                # again (one request, not a refresh, which may be stuck) and look once more.
                if attempt == 0:
                    with contextlib.suppress(Exception):
                        found = self._download_state(("a", project, name), retry=None, timeout=self._list_timeout)
                        if found is not None:
                            self._remember(("a", project, name), *found)
                    continue
                raise StateError(f"artifact {name!r} of project {project!r} is missing from {self.uri}") from None
            except StateError:
                raise
            except Exception as exc:  # noqa: BLE001
                self._note_error(exc)
                raise StateError(f"artifact {name!r} of project {project!r} is not cached on this instance and "
                                 f"cannot be downloaded from {self.uri}: {_describe(exc)}"
                                 + ("; Cloud Storage is unreachable, it loads once storage answers again"
                                    if degraded else "")) from None
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        return None

    # -- training lease -------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, project) -> Iterator[None]:
        """Serialize fit() per project: a thread lock in this process, plus a best-effort lease
        object (``locks/p-<project>.json``, created with if_generation_match=0, renewed while held,
        taken over when expired) across instances. If storage cannot be reached, or the lease
        is not free after `lock_wait` seconds, training goes ahead without it (with a warning):
        the lease avoids duplicate work; update() is what keeps state correct."""
        project = str(project)
        with self._lock:
            local = self._project_locks.setdefault(project, threading.Lock())
        with local:
            lease = self._acquire_lease(project)
            try:
                # The previous holder's writes finished before it let go: see them before fit
                # reads anything (a fit is not on the request path, so it may wait for storage).
                self._refresh()
            except Exception as exc:  # noqa: BLE001 - degraded: fit sees the last known state
                logger.warning("training project %r on the last known state: cannot refresh it (%s)",
                               project, _describe(exc))
            try:
                yield
            finally:
                if lease is not None:
                    lease.release()

    def _acquire_lease(self, project: str) -> Optional["_Lease"]:
        from google.api_core import exceptions as gexc

        name = f"{self.prefix}locks/{_project_dir(project)}.json"
        deadline = time.monotonic() + self.lock_wait
        waited = False
        while True:
            body = json.dumps({"owner": self._owner, "expires": time.time() + self.lease_seconds}).encode()
            blob = self._bucket.blob(name)
            try:
                holder = blob.bucket.get_blob(name, timeout=self._timeout, retry=self._retry_for(10.0))
                if holder is None:
                    generation = 0
                else:
                    info = json.loads(holder.download_as_bytes(timeout=self._timeout, retry=self._retry_for(10.0),
                                                               if_generation_match=holder.generation))
                    if float(info.get("expires", 0)) > time.time():
                        if not waited:
                            logger.info("waiting for the training lease of project %r (held by %s)",
                                        project, info.get("owner"))
                            waited = True
                        if time.monotonic() > deadline:
                            logger.warning("training lease of project %r still held by %s after %.0f s: training "
                                           "without it", project, info.get("owner"), self.lock_wait)
                            return None
                        time.sleep(random.uniform(0.1, 0.4))
                        continue
                    generation = holder.generation
                blob.upload_from_string(body, content_type="application/json", if_generation_match=generation,
                                        retry=self._retry_for(10.0), timeout=self._timeout)
            except (gexc.PreconditionFailed, gexc.NotFound):  # another instance moved first
                if time.monotonic() > deadline:
                    logger.warning("training lease of project %r still contended after %.0f s: training without it",
                                   project, self.lock_wait)
                    return None
                time.sleep(random.uniform(0.05, 0.2))
                continue
            except Exception as exc:  # noqa: BLE001 - best effort
                logger.warning("training lease of project %r unavailable (%s): training without it",
                               project, _describe(exc))
                return None
            return _Lease(self, blob, int(blob.generation))

    # -- health and shutdown ------------------------------------------------------------------
    def health(self) -> dict:
        self._fresh()
        now = time.monotonic()
        age = now - self._as_of
        body = {"store": self.kind, "status": "ok", "uri": self.uri,
                "snapshot_age_seconds": round(age, 3) if age != float("inf") else None,
                "refresh_seconds": self.refresh_seconds}
        error = self._degraded(now)
        if error is not None:
            since = self._error_since if self._error is not None else self._refreshing_since
            body["status"] = "degraded"
            body["error"] = error
            body["degraded_for_seconds"] = round(now - (since or now), 3)
            body["detail"] = "Cloud Storage unreachable: serving the last known state; writes are retried"
        return body

    def close(self) -> None:
        # Writes still going on in the background: give them a moment, then say what is lost.
        deadline = time.monotonic() + 5
        with self._lock:
            pending = list(self._background)
        for thread in pending:
            thread.join(max(0.0, deadline - time.monotonic()))
        unfinished = [t for t in pending if t.is_alive()]
        if unfinished:
            logger.error("%d background write(s) to %s not finished at shutdown", len(unfinished), self.uri)
        self._closed = True
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._thread = None
        with contextlib.suppress(Exception):
            self._client.close()


class _Lease:
    """A held lease object, renewed in the background until released."""

    def __init__(self, store: GCSStore, blob, generation: int):
        self.store, self.blob, self.generation = store, blob, generation
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="lsdeploy-gcs-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        from google.api_core import exceptions as gexc

        store = self.store
        while not self._done.wait(store.lease_seconds / 3):
            body = json.dumps({"owner": store._owner, "expires": time.time() + store.lease_seconds}).encode()
            try:
                self.blob.upload_from_string(body, content_type="application/json",
                                             if_generation_match=self.generation,
                                             retry=store._retry_for(store.lease_seconds / 3), timeout=store._timeout)
                self.generation = int(self.blob.generation)
            except gexc.PreconditionFailed:
                logger.warning("training lease %s was taken over by another instance", self.blob.name)
                return
            except Exception as exc:  # noqa: BLE001
                logger.warning("could not renew training lease %s: %s", self.blob.name, _describe(exc))

    def release(self) -> None:
        from google.api_core import exceptions as gexc

        self._done.set()
        self._thread.join(timeout=5)
        try:
            self.blob.delete(if_generation_match=self.generation, timeout=self.store._timeout,
                             retry=self.store._retry_for(10.0))
        except (gexc.NotFound, gexc.PreconditionFailed):
            pass
        except Exception as exc:  # noqa: BLE001 - it expires by itself
            logger.warning("could not release training lease %s (expires in %.0f s): %s", self.blob.name,
                           self.store.lease_seconds, _describe(exc))


def _digest_of(entry: Optional[_Entry]) -> Optional[str]:
    """The sha256 an artifact pointer names, or None."""
    return entry.value.get("sha256") if entry is not None and isinstance(entry.value, dict) else None


def _saved_at(blob) -> float:
    """When artifact contents were last written or re-used (epoch seconds)."""
    times = [blob.time_created.timestamp()] if blob.time_created is not None else []
    with contextlib.suppress(TypeError, ValueError):
        times.append(float((blob.metadata or {}).get("saved_at")))
    return max(times, default=float("inf"))


def _sha256_file(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
