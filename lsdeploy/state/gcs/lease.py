"""One fit per project at a time: a thread lock in this process, plus a best-effort lease object
across instances (``locks/p-<project>.json``, created with if_generation_match=0, renewed while
held, taken over when expired, deleted at the end)."""
from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from typing import Iterator, Optional

from .bucket import StateBucket
from .errors import describe
from .snapshot import Snapshot

logger = logging.getLogger("lsdeploy.state.gcs")


class TrainingLocks:
    def __init__(self, objects: StateBucket, snapshot: Snapshot, owner: str, lease_seconds: float,
                 lock_wait: float):
        self.objects = objects
        self.snapshot = snapshot
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.lock_wait = lock_wait
        self.after_fork()

    def after_fork(self) -> None:
        self._guard = threading.Lock()
        self._local: dict[str, threading.Lock] = {}

    @contextlib.contextmanager
    def hold(self, project) -> Iterator[None]:
        """If storage cannot be reached, or the lease is not free after `lock_wait` seconds,
        training goes ahead without it (with a warning): the lease avoids duplicate work;
        update() is what keeps state correct."""
        project = str(project)
        with self._guard:
            local = self._local.setdefault(project, threading.Lock())
        with local:
            lease = self._acquire(project)
            try:
                # The previous holder's writes finished before it let go: see them before fit
                # reads anything (a fit is not on the request path, so it may wait for storage).
                self.snapshot.refresh()
            except Exception as exc:  # noqa: BLE001 - degraded: fit sees the last known state
                logger.warning("training project %r on the last known state: cannot refresh it (%s)",
                               project, describe(exc))
            try:
                yield
            finally:
                if lease is not None:
                    lease.release()

    def lease_body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.lease_seconds}).encode()

    def _acquire(self, project: str) -> Optional["Lease"]:
        from google.api_core import exceptions as gexc

        objects = self.objects
        name = objects.lease_object(project)
        deadline = time.monotonic() + self.lock_wait
        waited = False
        while True:
            body = self.lease_body()
            blob = objects.bucket.blob(name)
            try:
                holder = blob.bucket.get_blob(name, timeout=objects.timeout, retry=objects.retry_for(10.0))
                if holder is None:
                    generation = 0
                else:
                    info = json.loads(holder.download_as_bytes(timeout=objects.timeout, retry=objects.retry_for(10.0),
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
                                        retry=objects.retry_for(10.0), timeout=objects.timeout)
            except (gexc.PreconditionFailed, gexc.NotFound):  # another instance moved first
                if time.monotonic() > deadline:
                    logger.warning("training lease of project %r still contended after %.0f s: training without it",
                                   project, self.lock_wait)
                    return None
                time.sleep(random.uniform(0.05, 0.2))
                continue
            except Exception as exc:  # noqa: BLE001 - best effort
                logger.warning("training lease of project %r unavailable (%s): training without it",
                               project, describe(exc))
                return None
            return Lease(self, blob, int(blob.generation))


class Lease:
    """A held lease object, renewed in the background until released."""

    def __init__(self, locks: TrainingLocks, blob, generation: int):
        self.locks, self.blob, self.generation = locks, blob, generation
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="lsdeploy-gcs-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        from google.api_core import exceptions as gexc

        locks, objects = self.locks, self.locks.objects
        while not self._done.wait(locks.lease_seconds / 3):
            try:
                self.blob.upload_from_string(locks.lease_body(), content_type="application/json",
                                             if_generation_match=self.generation,
                                             retry=objects.retry_for(locks.lease_seconds / 3), timeout=objects.timeout)
                self.generation = int(self.blob.generation)
            except gexc.PreconditionFailed:
                logger.warning("training lease %s was taken over by another instance", self.blob.name)
                return
            except Exception as exc:  # noqa: BLE001
                logger.warning("could not renew training lease %s: %s", self.blob.name, describe(exc))

    def release(self) -> None:
        from google.api_core import exceptions as gexc

        self._done.set()
        self._thread.join(timeout=5)
        objects = self.locks.objects
        try:
            self.blob.delete(if_generation_match=self.generation, timeout=objects.timeout,
                             retry=objects.retry_for(10.0))
        except (gexc.NotFound, gexc.PreconditionFailed):
            pass
        except Exception as exc:  # noqa: BLE001 - it expires by itself
            logger.warning("could not release training lease %s (expires in %.0f s): %s", self.blob.name,
                           self.locks.lease_seconds, describe(exc))
