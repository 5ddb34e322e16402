"""One fit per project at a time: a thread lock in this process, plus a lease object across
instances (``locks/p-<project>.json``, created with if_generation_match=0, renewed while held,
taken over when expired, deleted at the end).

`hold` (lock()) waits for the lease and is best effort: when storage cannot be reached, or the
lease is not free after ``lock_wait`` seconds, training goes ahead without it. `try_hold`
(try_lock(), for the training queue) never waits and never goes on without the lease: anything
but taking it at once (another thread, process or instance holds it, or storage does not answer
within a few seconds) yields False.
"""
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

TRY_SECONDS = 2.0  # how long try_hold retries a storage request that fails transiently


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
        self._unavailable = False  # try_hold warned that storage does not answer

    def _local_lock(self, project: str) -> threading.Lock:
        with self._guard:
            return self._local.setdefault(project, threading.Lock())

    @contextlib.contextmanager
    def hold(self, project) -> Iterator[None]:
        """If storage cannot be reached, or the lease is not free after `lock_wait` seconds,
        training goes ahead without it (with a warning): the lease avoids duplicate work;
        update() is what keeps state correct."""
        project = str(project)
        with self._local_lock(project):
            lease = self._acquire(project)
            try:
                self._catch_up(project)
                yield
            finally:
                if lease is not None:
                    lease.release()

    @contextlib.contextmanager
    def try_hold(self, project) -> Iterator[bool]:
        """Yields the Lease (true; `valid()` tells whether it still holds) while this process holds
        the project's lock and lease (after a refresh, renewed in the background, released at the
        end); False at once when another thread,
        process or instance holds either, or when storage does not answer (a warning the first
        time, until a lease request succeeds again)."""
        project = str(project)
        local = self._local_lock(project)
        if not local.acquire(blocking=False):
            yield False
            return
        lease = None
        try:
            lease = self._acquire_now(project)
        finally:
            if lease is None:
                local.release()
        if lease is None:
            yield False
            return
        try:
            try:  # unlike hold(): no fit on a state older than what the previous holder wrote
                self.snapshot.refresh()
                caught_up = True
            except Exception as exc:  # noqa: BLE001 - storage failed between the lease and the listing
                logger.warning("training of project %r waits: cannot read the latest state (%s)",
                               project, describe(exc))
                caught_up = False
            yield lease if caught_up else False
        finally:
            lease.release()
            local.release()

    def _catch_up(self, project: str) -> None:
        """The previous holder's writes finished before it let go: see them before fit reads
        anything (a fit is not on the request path, so it may wait for storage)."""
        try:
            self.snapshot.refresh()
        except Exception as exc:  # noqa: BLE001 - degraded: fit sees the last known state
            logger.warning("training project %r on the last known state: cannot refresh it (%s)",
                           project, describe(exc))

    def lease_body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.lease_seconds}).encode()

    def _take(self, project: str, retry, timeout) -> tuple[Optional["Lease"], Optional[dict]]:
        """One try: (the lease, None) when it was free or expired and is now ours; (None, the
        holder's lease) while another holder's is unexpired. PreconditionFailed or NotFound:
        another instance moved between our read and our write. Other storage errors raise."""
        objects = self.objects
        name = objects.lease_object(project)
        generation = 0
        holder = objects.bucket.get_blob(name, timeout=timeout, retry=retry)
        if holder is not None:
            info = json.loads(holder.download_as_bytes(timeout=timeout, retry=retry,
                                                       if_generation_match=holder.generation))
            # Unexpired and another's: wait. Our own (its release failed during an outage; the
            # caller holds this process's lock for the project) is taken over at once.
            if float(info.get("expires", 0)) > time.time() and info.get("owner") != self.owner:
                return None, info
            generation = holder.generation
        blob = objects.bucket.blob(name)
        sent = time.time()  # the body's expiry counts from a moment later: this end errs early
        blob.upload_from_string(self.lease_body(), content_type="application/json", if_generation_match=generation,
                                retry=retry, timeout=timeout)
        return Lease(self, blob, int(blob.generation), sent), None

    def _acquire(self, project: str) -> Optional["Lease"]:
        """The lease, waiting up to `lock_wait` for it; None: train without it."""
        from google.api_core import exceptions as gexc

        deadline = time.monotonic() + self.lock_wait
        waited = False
        while True:
            try:
                lease, holder = self._take(project, self.objects.retry_for(10.0), self.objects.timeout)
            except (gexc.PreconditionFailed, gexc.NotFound):  # another instance moved first
                lease, holder = None, None
            except Exception as exc:  # noqa: BLE001 - best effort
                logger.warning("training lease of project %r unavailable (%s): training without it",
                               project, describe(exc))
                return None
            if lease is not None:
                return lease
            if holder is not None and not waited:
                logger.info("waiting for the training lease of project %r (held by %s)", project, holder.get("owner"))
                waited = True
            if time.monotonic() > deadline:
                logger.warning("training lease of project %r still %s after %.0f s: training without it", project,
                               f"held by {holder.get('owner')}" if holder is not None else "contended",
                               self.lock_wait)
                return None
            time.sleep(random.uniform(0.1, 0.4) if holder is not None else random.uniform(0.05, 0.2))

    def _acquire_now(self, project: str) -> Optional["Lease"]:
        """The lease if it can be taken at once, else None. Requests get the refresh's short
        timeout and are retried for TRY_SECONDS at most: a caller polling this never hangs on
        an unreachable storage."""
        from google.api_core import exceptions as gexc

        objects = self.objects
        try:
            lease, _ = self._take(project, objects.retry_for(TRY_SECONDS), objects.list_timeout)
        except (gexc.PreconditionFailed, gexc.NotFound):  # another instance moved first
            return None
        except Exception as exc:  # noqa: BLE001 - not training now; the caller tries again later
            if not self._unavailable:
                self._unavailable = True
                logger.warning("training lease of project %r unavailable (%s): not training until %s answers",
                               project, describe(exc), objects.uri)
            return None
        if self._unavailable:
            self._unavailable = False
            logger.warning("training leases in %s available again", objects.uri)
        return lease


class Lease:
    """A held lease object, renewed in the background until released. True while held; `valid()`
    says whether it still is, as other instances see it (its last renewal has not expired)."""

    def __init__(self, locks: TrainingLocks, blob, generation: int, taken_at: float):
        self.locks, self.blob, self.generation = locks, blob, generation
        self.valid_until = taken_at + locks.lease_seconds
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="lsdeploy-gcs-lease", daemon=True)
        self._thread.start()

    def valid(self) -> bool:
        """Still ours, with a margin: false once a renewal is overdue by more than a sixth of the
        lease, so the holder stops taking new work well before another instance may take it."""
        return time.time() < self.valid_until - self.locks.lease_seconds / 6

    def _renew(self) -> None:
        from google.api_core import exceptions as gexc

        locks, objects = self.locks, self.locks.objects
        wait = locks.lease_seconds / 3
        while not self._done.wait(wait):
            sent = time.time()
            try:
                self.blob.upload_from_string(locks.lease_body(), content_type="application/json",
                                             if_generation_match=self.generation,
                                             retry=objects.retry_for(min(5.0, locks.lease_seconds / 6)),
                                             timeout=objects.list_timeout)
                self.generation = int(self.blob.generation)
                self.valid_until = sent + locks.lease_seconds
                wait = locks.lease_seconds / 3
            except gexc.PreconditionFailed:
                self.valid_until = 0.0
                logger.warning("training lease %s was taken over by another instance", self.blob.name)
                return
            except Exception as exc:  # noqa: BLE001 - retried soon, until the lease would expire
                if time.time() >= self.valid_until:
                    logger.warning("training lease %s expired: storage did not answer its renewals (%s)",
                                   self.blob.name, describe(exc))
                    return
                logger.warning("could not renew training lease %s: %s; retrying", self.blob.name, describe(exc))
                wait = 1.0

    def __bool__(self) -> bool:
        return True

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
