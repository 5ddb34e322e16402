"""The trainer: one background thread per worker process drains the durable training queue
(`lsdeploy.jobs`) of every project that has one, running fit() for each event in order.

A webhook stores its event (`JobQueue.enqueue`) and wakes this process's trainer; the trainer
takes the project's training lock without waiting (`StateStore.try_lock`) and, while it holds
it, claims the head, runs it and finishes it, one event after another. A worker that cannot take
the lock leaves the project to the holder, which re-reads the queue after every event and once
more after letting the lock go, so no event waits for a holder that has just finished. Every
trainer also looks at every project's queue every TRAINING_POLL_SECONDS: what a dead process or
instance left, and retries that came due, are picked up without a new webhook.

A webhook waits FIT_WAIT_SECONDS for its own event (`Trainer.wait`), so a quick fit is answered
with its result; otherwise the event trains in the background and `GET /jobs/<id>` tells how it
went. On shutdown (`Trainer.stop`) the running fit may finish within the grace period; whatever
is queued stays queued for the next start, and the log says how many.

`Trainer.drain_project` runs one project's queue in the calling thread, with the same claims,
retries and fit path, for `label-studio-ml train` (a Cloud Run job task in job mode).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import traceback
from typing import Callable, Optional

from .jobs import JobQueue, job_id
from .metrics import Metrics
from .model import delivery_context

logger = logging.getLogger("lsdeploy.server")

DEFAULT_POLL_SECONDS = 2.0  # TRAINING_POLL_SECONDS


class Outcome:
    """What a waiting webhook learns about its event in this process."""

    def __init__(self):
        self.done = threading.Event()
        self.status: Optional[str] = None  # "done", "retrying" or "failed"
        self.result = None
        self.error: Optional[BaseException] = None
        self.retry_in = 0.0
        self.model_version: Optional[str] = None


class Trainer:
    """See the module docstring. `run_fit(project, entry, body)` builds the model and runs its
    fit() for one event (the server supplies it); it returns (result, model_version)."""

    def __init__(self, queue: JobQueue, run_fit: Callable, metrics: Metrics,
                 poll_seconds: float = DEFAULT_POLL_SECONDS):
        self.queue = queue
        self.run_fit = run_fit
        self.metrics = metrics
        self.poll_seconds = max(0.05, poll_seconds)
        self._pid = None
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()
        self._seconds_per_fit = 1.0  # a moving average, for Retry-After
        self._reset()

    def _reset(self):
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._hints: set = set()  # projects this process queued to: looked at before polling finds them
        self._waiters: dict[str, Outcome] = {}
        self._lock = threading.Lock()
        self._running: Optional[str] = None  # the job id whose fit runs now
        self._runner = f"{socket.gethostname()}-{os.getpid()}"
        self.outcomes = {"done": 0, "retrying": 0, "failed": 0}  # this process's fits, by outcome

    # -- the request path ------------------------------------------------------------------
    def start(self) -> None:
        """Start this process's trainer thread (again after a fork); idempotent."""
        if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._pid != os.getpid():
                self._reset()
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._loop, name="lsdeploy-trainer", daemon=True)
                self._thread.start()

    def submit(self, project: str, kind: str, event: str, body: bytes) -> tuple:
        """Queue an event durably, then wake the trainer: (job id, Outcome to wait on)."""
        self.start()
        token = self.queue.new_token()
        public = job_id(project, token)
        outcome = Outcome()
        with self._lock:  # before the event is queued: the trainer may run it at once
            self._waiters[public] = outcome
        try:
            self.queue.enqueue(project, kind, event, body, self._seconds_per_fit, token=token)
        except BaseException:
            self.forget(public)
            raise
        self.notify(project)
        return public, outcome

    def notify(self, project: str) -> None:
        """The project has an event due: look at it now rather than at the next poll."""
        self.start()
        with self._lock:
            self._hints.add(project)
        self._wake.set()

    def forget(self, public_id: str) -> None:
        """The webhook stopped waiting for this job."""
        with self._lock:
            self._waiters.pop(public_id, None)

    @property
    def seconds_per_fit(self) -> float:
        return self._seconds_per_fit

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no event is queued or running in the store (all projects); True then."""
        deadline = time.monotonic() + timeout
        while True:
            if self.queue.depth()[0] == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    # -- shutdown --------------------------------------------------------------------------
    def stop(self, grace: float) -> dict:
        """Take no new event; let the running fit finish within `grace` seconds. What is queued
        stays in the store for the next start. Returns {"finished": bool, "running": job id or
        None, "queued": events left queued (all projects)}."""
        self._stop.set()
        self._wake.set()
        finished = True
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(max(0.0, grace))
            finished = not self._thread.is_alive()
        try:
            queued = self.queue.depth()[0]
        except Exception:  # noqa: BLE001 - the store may be what failed
            queued = None
        return {"finished": finished, "running": None if finished else self._running, "queued": queued}

    def request_stop(self) -> None:
        """From a signal handler: take no new event; the running fit finishes (drain_project)."""
        self._stop.set()
        self._wake.set()

    # -- the thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        wait = 0.0  # look at once: a restarted server resumes what was left
        failures = 0
        while not self._stop.is_set():
            self._wake.wait(wait)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                wait = self._pass()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the store is unreachable: try again later
                failures += 1
                wait = min(30.0, self.poll_seconds * 2 ** min(failures, 4))
                log = logger.warning if failures == 1 else logger.debug
                log("training queue unavailable (%s: %s): trying again in %.0f s", type(exc).__name__, exc, wait)

    def _pass(self) -> float:
        """Drain every project with runnable events; seconds until the next look."""
        with self._lock:
            hints = set(self._hints)
        projects = hints | set(self.queue.projects())
        wait = self.poll_seconds
        for project in sorted(projects):
            if self._stop.is_set():
                break
            due = self._drain(project)
            if due is None:
                with self._lock:
                    self._hints.discard(project)
            else:
                wait = min(wait, max(due, 0.05))
        return wait

    def _drain(self, project: str) -> Optional[float]:
        """Run the project's events while this process holds its lock; seconds until its head
        is due (or worth another look), None when its queue is empty."""
        for _ in range(100):  # a bound, against a lock that is released and retaken forever
            due = self.queue.runnable_in(project)
            if due is None or due > 0:
                return due
            with self.queue.store.try_lock(project) as held:
                if not held:
                    return self.poll_seconds  # another worker or instance drains it
                entry = self.queue.claim(project, self._runner)
                if entry is None:  # nothing due after all (the read that said so was older)
                    due = self.queue.runnable_in(project)
                    return self.poll_seconds if due == 0 else due
                still_held = getattr(held, "valid", lambda: True)
                while entry is not None:
                    entry = self._run(project, entry, still_held)  # the next one, claimed as this one finished
            if self._stop.is_set():
                return None
            # The lock is free: an event queued while it was held, by a worker whose own try
            # failed, is seen now (its write came before that try, which came before this read).
        return 0.0

    # -- one project, in the calling thread (`label-studio-ml train`) ------------------------
    def drain_project(self, project: str, runner: Optional[str] = None, responsible: Callable[[], bool] = None,
                      lock_retry_seconds: float = 1.0) -> str:
        """Run the project's queued events in this thread, in order, with the queue's retry rules
        (a fit that raised runs again when its backoff is over: this waits for it), until the
        queue is empty or `stop()` was called. Returns why it ended: "drained" (the queue is
        empty and, in job mode, the execution record was cleared with it: `JobQueue.settle`),
        "stopped", "locked" (another process holds the project's lock) or "lease lost" (the
        lease could not be renewed: storage does not answer). Outcomes add up in `outcomes`.

        `responsible()` says whether this process must drain the project even though another
        holds its lock (job mode: the execution record names this execution); it then waits for
        the lock, trying every `lock_retry_seconds`, for as long as that stays true."""
        if runner:
            self._runner = runner
        while not self._stop.is_set():
            with self.queue.store.try_lock(project) as held:
                if held:
                    return self._drain_held(project, held)
            if responsible is None or not responsible():
                return "locked"
            self._stop.wait(lock_retry_seconds)  # the holder drains our events too, then clears the record
        return "stopped"

    def _drain_held(self, project: str, held) -> str:
        still_held = getattr(held, "valid", lambda: True)
        while not self._stop.is_set():
            if not still_held():
                return "lease lost"
            entry = self.queue.claim(project, self._runner)
            if entry is None:
                due = self.queue.runnable_in(project, fresh=True)
                if due is None:
                    if self.queue.settle(project):
                        return "drained"
                    continue  # an event came in as the queue emptied: it is ours
                if due > 0:
                    logger.info("next attempt of project %s's head in %.0f s", project, due)
                    self._stop.wait(due)
                continue
            while entry is not None:
                entry = self._run(project, entry, still_held)
        return "stopped"

    def _run(self, project: str, entry: dict, still_held: Callable[[], bool] = lambda: True) -> Optional[dict]:
        """Run one claimed event; the project's next one when it was claimed in the same write
        (never after a failure, once stopping, nor once the lock may have been lost: a lease
        whose renewals storage did not answer, which another instance may take)."""
        public = job_id(project, entry["id"])
        event, attempt = entry.get("event"), int(entry.get("attempts") or 1)
        if entry.get("interrupted_runner"):
            logger.warning("job %s (%s) runs again, attempt %d: its run by %s did not finish", public, event,
                           attempt, entry["interrupted_runner"])
        with self._lock:
            outcome = self._waiters.pop(public, None)
            self._running = public
        started = time.monotonic()
        try:
            body = self.queue.store.get_event(project, entry["id"])
            if body is None:
                raise LookupError("the event's body is missing from the state store")
            with delivery_context({"job_id": public, "attempt": attempt, "sequence": entry.get("seq"),
                                   "event": event, "queued_at": entry.get("queued_at")}):
                result, version = self.run_fit(project, entry, body)
        except BaseException as exc:  # noqa: BLE001 - recorded, retried; never kills the thread
            took = time.monotonic() - started
            self._count(event, "error", took)
            message = f"{type(exc).__name__}: {exc}"
            # logged before the queue is told: during a storage outage that write fails too
            logger.error("fit failed for job %s (%s, attempt %d of %d): %s", public, event, attempt,
                         self.queue.max_attempts, message)
            logger.debug("fit traceback:\n%s", traceback.format_exc())
            status, delay = self.queue.failed(project, entry["id"], message)
            self.outcomes[status] += 1
            if status == "retrying":
                logger.info("job %s runs again in %.0f s", public, delay)
            else:
                logger.error("job %s kept as failed after %d attempt(s) (GET /jobs/%s)", public, attempt, public)
            if outcome is not None:
                outcome.status, outcome.error, outcome.retry_in = status, exc, delay
                outcome.done.set()
            return None
        finally:
            with self._lock:
                self._running = None
        took = time.monotonic() - started
        self._seconds_per_fit = 0.8 * self._seconds_per_fit + 0.2 * took
        self._count(event, "ok", took)
        self.outcomes["done"] += 1
        go_on = not self._stop.is_set() and still_held()
        following = self.queue.finish(project, entry["id"], _summary(result), runner=self._runner if go_on else None)
        if outcome is not None:
            outcome.status, outcome.result, outcome.model_version = "done", result, version
            outcome.done.set()
        return following

    def _count(self, event, status, took) -> None:
        self.metrics.inc("lsdeploy_fit_total", event=event, status=status)
        self.metrics.observe("lsdeploy_fit_duration_seconds", took)


def _summary(result) -> Optional[str]:
    """What the done list keeps of a fit's result: its JSON, cut short."""
    if result is None:
        return None
    try:
        return json.dumps(result)[:500]
    except (TypeError, ValueError):
        return repr(result)[:500]
