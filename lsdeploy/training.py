"""Training jobs: fit() runs on a background thread of each worker process, one job after
another, in a bounded queue (jobs and bytes); a full queue is refused with QueueFull, which the
server answers 503 with Retry-After."""
from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
import traceback
from typing import Optional

from .metrics import Metrics

logger = logging.getLogger("lsdeploy.server")


class Job:
    _ids = itertools.count(1)

    def __init__(self, event: str, project_id: str, run, size: int = 0):
        self.id = f"{os.getpid()}-{next(self._ids)}"
        self.event = event
        self.project_id = project_id
        self.run = run
        self.size = size  # bytes of the request that carried it (what a queued job holds in memory, about)
        self.done = threading.Event()
        self.result = None
        self.error: Optional[BaseException] = None


class QueueFull(Exception):
    """The training queue is at its bound: the caller answers 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


DEFAULT_QUEUE_JOBS = 1000                 # TRAINING_QUEUE_MAX_JOBS, per worker process
DEFAULT_QUEUE_BYTES = 32 * 1024 * 1024    # TRAINING_QUEUE_MAX_BYTES, per worker process


class Trainer:
    """Runs fit() jobs one after another on a background thread of this process. The queue is
    bounded in jobs and in the bytes of the requests they came in (a job holds its event in
    memory until it ran): past either bound, submit raises QueueFull. An empty queue takes any
    one job, so an event larger than the byte bound still trains."""

    def __init__(self, metrics: Metrics, max_jobs: int = DEFAULT_QUEUE_JOBS, max_bytes: int = DEFAULT_QUEUE_BYTES):
        self.metrics = metrics
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._pid = None
        self._lock = threading.Lock()
        self._pending = 0
        self._bytes = 0
        self._seconds_per_fit = 1.0  # a moving average, for Retry-After

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._pending and (self._pending + 1 > self.max_jobs or self._bytes + job.size > self.max_bytes):
                self.metrics.inc("lsdeploy_fit_refused_total", event=job.event)
                wait = max(1, min(300, round(self._seconds_per_fit * self._pending)))
                raise QueueFull(
                    f"training queue full ({self._pending} job(s), {self._bytes} bytes queued in this worker; "
                    f"bounds TRAINING_QUEUE_MAX_JOBS={self.max_jobs}, TRAINING_QUEUE_MAX_BYTES={self.max_bytes}): "
                    f"send the event again in about {wait} s, or raise the bounds (memory allowing)", wait)
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="lsdeploy-trainer", daemon=True)
                self._pid = os.getpid()
                self._thread.start()
            self._pending += 1
            self._bytes += job.size
            self.metrics.set("lsdeploy_fit_queue_depth", self._pending)
        self._queue.put(job)
        return job

    @property
    def pending(self) -> int:
        return self._pending

    def _loop(self):
        while True:
            job = self._queue.get()
            if job is None:
                return
            started = time.monotonic()
            try:
                job.result = job.run()
                status = "ok"
            except BaseException as exc:  # noqa: BLE001 - reported, never kills the thread
                job.error = exc
                status = "error"
                logger.error("fit failed for project %r on %s: %s: %s", job.project_id, job.event,
                             type(exc).__name__, exc)
                logger.debug("fit traceback:\n%s", traceback.format_exc())
            finally:
                took = time.monotonic() - started
                with self._lock:
                    self._pending -= 1
                    self._bytes -= job.size
                    self._seconds_per_fit = 0.8 * self._seconds_per_fit + 0.2 * took
                    self.metrics.set("lsdeploy_fit_queue_depth", self._pending)
                self.metrics.inc("lsdeploy_fit_total", event=job.event, status=status)
                self.metrics.observe("lsdeploy_fit_duration_seconds", took)
                job.done.set()

    def drain(self, timeout: float) -> bool:
        """Wait for queued training to finish (on shutdown). True when nothing is left."""
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.05)
        return self._pending == 0
