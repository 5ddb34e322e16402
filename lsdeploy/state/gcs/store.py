"""`GCSStore`: model state in Cloud Storage, shared by every instance of a deployed backend.

Selected with ``MODEL_STATE_URI=gs://BUCKET/PREFIX`` (needs the ``gcs`` extra). docs/state.md
is the user-facing description; the package docstring is the design. This module holds the
keys (get/set/create/update/delete, and `read`, the one read that asks storage) and puts the
parts together: `StateBucket` (bucket.py) talks to storage, `Snapshot` (snapshot.py) serves
reads, `Artifacts` (artifacts.py), `TrainingLocks` (lease.py) and `EventBodies` (events.py).

One object per key means a ``set()`` never rewrites another key, and ``update()`` is an
optimistic read-modify-write on one object guarded by ``if_generation_match`` (0 when the key
does not exist yet). The object keeps the ids of the last updates (``w``), so an update whose
answer was lost (and whose retry then fails with 412) can tell that it did land. Values are
limited to 4 MiB: the client then always uses a multipart upload, where Cloud Storage (and
fake-gcs-server) honour the precondition; it switches to resumable uploads above 8 MiB.

Writes go to storage before they return and then update the local snapshot (read-your-writes).
Transient errors (429, 5xx, timeouts, refused connections) are retried with exponential backoff
for up to ``write_timeout`` seconds; a write that still fails raises StateError. A write given
``wait=`` (the ones made on the request path while a model is built) returns after at most that
long, at once while storage is degraded, and goes on in a background thread: it lands, or an
error is logged (background.py).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import random
import socket
import tempfile
import time
import uuid
import weakref
from typing import Callable, Iterator, Optional

from ...errors import StateError
from ..base import StateStore
from .artifacts import Artifacts
from .background import BackgroundWrites
from .bucket import StateBucket, client_factory
from .errors import Outage
from .events import EventBodies
from .lease import TrainingLocks
from .names import RECENT_WRITES, encode_body, parse_uri
from .snapshot import Snapshot

logger = logging.getLogger("lsdeploy.state.gcs")

DEFAULT_REFRESH_SECONDS = 2.0
DEFAULT_WRITE_TIMEOUT = 60.0
DEFAULT_LEASE_SECONDS = 60.0  # a training lease not renewed for this long may be taken over
DEFAULT_READ_WAIT = 0.25  # longest a read waits for a refresh (Label Studio gives /health 1 s)
DEFAULT_ARTIFACT_GRACE_SECONDS = 600.0  # contents younger than this are never garbage-collected
# On Cloud Run a refused permission at start-up is waited on this long: the deploy grants the
# service's account the bucket moments before the revision starts, and IAM grants typically take
# 2 minutes to apply (Google: "potentially 7 minutes or longer"). It stays inside the 240 s startup
# probe lsdeploy gives a revision. Elsewhere a refusal fails at once.
CLOUD_RUN_PERMISSION_WAIT = 180.0


class GCSStore(StateStore):
    """State store on Cloud Storage; see the package docstring for the design."""

    kind = "gcs"

    def __init__(self, bucket: str, prefix: str = "", *, client=None, client_factory: Optional[Callable] = None,
                 refresh_seconds: float = DEFAULT_REFRESH_SECONDS, write_timeout: float = DEFAULT_WRITE_TIMEOUT,
                 cache_dir: Optional[str] = None, lease_seconds: float = DEFAULT_LEASE_SECONDS, lock_wait: float = 600.0,
                 read_wait: float = DEFAULT_READ_WAIT,
                 artifact_grace_seconds: float = DEFAULT_ARTIFACT_GRACE_SECONDS, permission_wait: float = 0.0,
                 check: bool = True):
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
        self.permission_wait = float(permission_wait)
        self.cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), f"lsdeploy-{os.getuid()}", "gcs-cache")
        self._owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._closed = False

        self._objects = StateBucket(bucket, prefix, client, client_factory, self.write_timeout,
                                    self.refresh_seconds, Outage(self.uri))
        self._snapshot = Snapshot(self._objects, self._objects.outage, self.refresh_seconds, self.read_wait)
        self._artifacts = Artifacts(self._objects, self._snapshot, self.cache_dir, self._owner,
                                    self.artifact_grace_seconds)
        self._training = TrainingLocks(self._objects, self._snapshot, self._owner, self.lease_seconds,
                                       self.lock_wait)
        self._events = EventBodies(self._objects)
        self._writes = BackgroundWrites(self.uri, lambda: self._snapshot.degraded(time.monotonic()) is not None)
        if check:
            self._check_usable()
        self._register_fork_handler()

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_uri(cls, uri: str, environ=None, **kwargs) -> "GCSStore":
        """The store for ``MODEL_STATE_URI``; settings from `environ`:
        MODEL_STATE_REFRESH_SECONDS (default 2), MODEL_STATE_WRITE_TIMEOUT_SECONDS (default 60),
        MODEL_STATE_LEASE_SECONDS (default 60: a training lease not renewed for this long is free),
        MODEL_STATE_CACHE_DIR (default MODEL_DIR/gcs-cache), MODEL_STATE_PERMISSION_WAIT_SECONDS
        (how long start-up waits for a refused permission to be granted: 180 on Cloud Run, where
        K_SERVICE or CLOUD_RUN_JOB is set, else 0), STORAGE_EMULATOR_HOST (an emulator, anonymous
        credentials), GOOGLE_CLOUD_PROJECT."""
        environ = os.environ if environ is None else environ
        bucket, prefix = parse_uri(uri.strip())

        def number(name, default, zero_ok=False):
            raw = str(environ.get(name, "") or "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                value = -1.0
            if zero_ok and not 0 <= value < float("inf"):
                raise StateError(f"{name}={raw!r} must be a number of seconds, 0 or more (0: a refused permission "
                                 "fails start-up at once)")
            if not zero_ok and value <= 0:
                raise StateError(f"{name}={raw!r} must be a positive number of seconds")
            return value

        kwargs.setdefault("refresh_seconds", number("MODEL_STATE_REFRESH_SECONDS", DEFAULT_REFRESH_SECONDS))
        kwargs.setdefault("write_timeout", number("MODEL_STATE_WRITE_TIMEOUT_SECONDS", DEFAULT_WRITE_TIMEOUT))
        kwargs.setdefault("lease_seconds", number("MODEL_STATE_LEASE_SECONDS", DEFAULT_LEASE_SECONDS))
        on_cloud_run = bool(environ.get("K_SERVICE") or environ.get("CLOUD_RUN_JOB"))
        kwargs.setdefault("permission_wait", number("MODEL_STATE_PERMISSION_WAIT_SECONDS",
                                                    CLOUD_RUN_PERMISSION_WAIT if on_cloud_run else 0.0, zero_ok=True))
        cache = environ.get("MODEL_STATE_CACHE_DIR") or (
            os.path.join(environ["MODEL_DIR"], "gcs-cache") if environ.get("MODEL_DIR") else None)
        kwargs.setdefault("cache_dir", cache)
        return cls(bucket, prefix, client_factory=client_factory(uri, environ), **kwargs)

    def _check_usable(self) -> None:
        """Fail at start-up, in one line, when the bucket is missing or not readable/writable. A
        refused permission is checked again for up to `permission_wait` seconds first: on Cloud Run
        the grant the deploy just made may not have reached Cloud Storage yet."""
        started = time.monotonic()
        pause, refusals = 2.0, 0
        while True:
            try:
                self._check_once()
                if refusals:
                    logger.warning("state store %s: the permission is in effect now, after %.0f s", self.uri,
                                   time.monotonic() - started)
                return
            except StateError as error:
                waited = time.monotonic() - started
                if not getattr(error, "permission_denied", False) or self.permission_wait <= 0:
                    raise
                if waited + pause > self.permission_wait:
                    raise StateError(f"{error} (still refused after waiting {waited:.0f} s for IAM to apply a "
                                     "grant, MODEL_STATE_PERMISSION_WAIT_SECONDS)") from None
                logger.warning("state store: %s; a grant takes minutes to apply: checking again in %.0f s "
                               "(waiting up to %.0f s, MODEL_STATE_PERMISSION_WAIT_SECONDS)", error, pause,
                               self.permission_wait)
                time.sleep(pause)
                pause, refusals = min(pause * 2, 15.0), refusals + 1

    def _check_once(self) -> None:
        try:
            self._snapshot.refresh(startup=True)
        except Exception as exc:  # noqa: BLE001 - translated: missing bucket, permission, unreachable
            raise self._objects.read_refused(exc) from None
        self._objects.check_writable(self._owner)

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
        self._writes.after_fork()
        self._training.after_fork()
        self._snapshot.after_fork()
        if not self._closed:
            self._objects.reconnect()

    # -- keys ----------------------------------------------------------------------------
    def get(self, project, key, default=None):
        self._snapshot.fresh()
        entry = self._snapshot.get(("k", str(project), key))
        return default if entry is None else entry.copy_value()

    def has(self, project, key):
        self._snapshot.fresh()
        return ("k", str(project), key) in self._snapshot

    def set(self, project, key, value, *, wait=None):
        skey = ("k", str(project), key)
        data = encode_body(value)

        def write():
            blob = self._objects.upload(self._objects.state_object(skey), data, f"state key {key!r}")
            self._snapshot.remember(skey, int(blob.generation), json.loads(data))

        self._writes.run(wait, f"state key {key!r}", write)

    def create(self, project, key, value, *, wait=None):
        from google.api_core import exceptions as gexc

        skey = ("k", str(project), key)
        if skey in self._snapshot:
            return
        data = encode_body(value)
        what = f"state key {key!r}"

        def write():
            try:  # create-only: another instance's value, even one not in our snapshot yet, is kept
                blob = self._objects.upload(self._objects.state_object(skey), data, what, if_generation_match=0)
            except gexc.PreconditionFailed:
                found = self._objects.read_for_update(skey, what)
                if found is not None:
                    self._snapshot.remember(skey, *found)
                return
            self._snapshot.remember(skey, int(blob.generation), json.loads(data))

        self._writes.run(wait, what, write)

    def delete(self, project, key):
        skey = ("k", str(project), key)
        self._objects.remove(self._objects.state_object(skey), f"state key {key!r}")
        self._snapshot.forget(skey)

    def read(self, project, key, default=None):
        """The value in storage now (one download with the write retries, not the snapshot):
        every write that completed before the call, on any instance, is seen. The snapshot
        learns it too. StateError when storage does not answer."""
        skey = ("k", str(project), key)
        started = time.monotonic()
        found = self._objects.read_for_update(skey, f"state key {key!r}")
        if found is None:
            known = self._snapshot.get(skey)
            if known is not None and known.stamp <= started:  # not a write of ours made meanwhile
                self._snapshot.forget(skey)
            return default
        self._snapshot.remember(skey, *found)
        return copy.deepcopy(found[1].get("v"))  # the snapshot keeps the decoded body

    def projects(self, key):
        """The projects that have a value for `key`, as the snapshot knows them (no request)."""
        self._snapshot.fresh()
        return sorted({project for kind, project, name in self._snapshot.keys() if kind == "k" and name == key})

    def update(self, project, key, fn, default=None):
        from google.api_core import exceptions as gexc

        objects, snapshot = self._objects, self._snapshot
        skey = ("k", str(project), key)
        name = objects.state_object(skey)
        what = f"state key {key!r}"
        write_id = uuid.uuid4().hex[:16]
        deadline = time.monotonic() + self.write_timeout
        known = snapshot.get(skey)  # first guess; a stale guess just costs one 412
        attempt = 0
        while True:
            if known is not None:
                generation, current, recent = known.generation, known.copy_value(), known.recent
            else:
                found = objects.read_for_update(skey, what)
                if found is None:
                    generation, current, recent = 0, default, []
                else:
                    generation, body = found
                    current, recent = body.get("v"), list(body.get("w") or [])
            new = fn(current)
            data = encode_body(new, [write_id] + recent[:RECENT_WRITES - 1])
            try:
                blob = objects.upload(name, data, what, if_generation_match=generation)
            except gexc.PreconditionFailed:
                found = objects.read_for_update(skey, what)
                if found is not None and write_id in (found[1].get("w") or []):
                    # An earlier try landed; its answer was lost and the retry hit our own write.
                    snapshot.remember(skey, *found)
                    return new
                attempt += 1
                if time.monotonic() > deadline:
                    raise StateError(f"update of state key {key!r} in {self.uri} gave up after {attempt} "
                                     "conflicting writes from other instances") from None
                if found is not None:
                    snapshot.remember(skey, *found)
                known = snapshot.get(skey) if found is not None else None
                time.sleep(random.uniform(0, min(0.02 * (2 ** min(attempt, 6)), 1.0)))
                continue
            snapshot.remember(skey, int(blob.generation), json.loads(data))
            return new

    # -- artifacts, training, health -------------------------------------------------------
    def save_artifact(self, project, name, local_path):
        self._artifacts.save(project, name, local_path)

    def load_artifact(self, project, name):
        return self._artifacts.load(project, name)

    def lock(self, project) -> Iterator[None]:
        """Serialize fit() per project: see lease.py. Once held, the snapshot is refreshed, so
        a fit starts from what the previous holder wrote."""
        return self._training.hold(project)

    def try_lock(self, project) -> Iterator[bool]:
        """lock() that never waits: yields whether this process now holds it (lease.py)."""
        return self._training.try_hold(project)

    # -- queued events: bodies outside the state keys (events.py) ---------------------------
    def put_event(self, project, event_id, data):
        self._events.put(str(project), event_id, data)

    def get_event(self, project, event_id):
        return self._events.get(str(project), event_id)

    def delete_event(self, project, event_id):
        self._events.delete(str(project), event_id)

    def degraded(self):
        return self._snapshot.degraded(time.monotonic())

    def health(self) -> dict:
        self._snapshot.fresh()
        now = time.monotonic()
        age = now - self._snapshot.as_of
        body = {"store": self.kind, "status": "ok", "uri": self.uri,
                "snapshot_age_seconds": round(age, 3) if age != float("inf") else None,
                "refresh_seconds": self.refresh_seconds}
        error = self._snapshot.degraded(now)
        if error is not None:
            since = self._snapshot.degraded_since()
            body["status"] = "degraded"
            body["error"] = error
            body["degraded_for_seconds"] = round(now - (since or now), 3)
            body["detail"] = "Cloud Storage unreachable: serving the last known state; writes are retried"
        return body

    def close(self) -> None:
        self._writes.close(5.0)
        self._closed = True
        self._snapshot.close()
        self._objects.close()
