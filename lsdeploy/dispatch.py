"""Job mode (LSDEPLOY_TRAINING=job): a serving instance stores each training event durably and
makes sure one Cloud Run job execution per project drains the queue; it never runs fit itself.

The project's queue index (`lsdeploy.jobs`) holds the execution record. A webhook appends its
event and, in the same atomic write, sees the record: none, so it records a start marker and
starts an execution (`RunJobs.run`), then records the execution's name; or one, whose execution
(or the next) runs the event. `label-studio-ml train` clears the record only in the write that
finds the queue empty (`JobQueue.settle`): an event stored before that write is drained by the
running execution, one stored after it starts a new execution. No wake-up is lost.

Every worker also has a poller thread (every TRAINING_POLL_SECONDS): when the recorded execution
ended (succeeded, failed, cancelled, deleted) with events still queued, or a start marker is
older than STALE_START_SECONDS (its webhook died), or events wait with no record (a start the Run
API refused), it starts an execution; one write decides which instance does (`redispatch`). The
state store is cheap to read every poll; the Run API is not (its read requests count against a
per-project quota shared by every instance and worker), so a recorded execution is read from it
at most once per TRAINING_FOLLOW_SECONDS per worker. That only delays recovering from an
execution that ended without draining the queue; a webhook never waits for it.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Optional

from .errors import EXIT_USAGE, LsdeployError
from .executions import RunApiError, RunJobs, ended, execution_state
from .jobs import JobQueue, job_id

logger = logging.getLogger("lsdeploy.server")

STALE_START_SECONDS = 120.0  # a start marker older than this: the webhook that wrote it died
MAX_BACKOFF_SECONDS = 300.0  # between a refused start and the poller's next try, per project
FAILED_BACKOFF_SECONDS = 30.0  # before the first restart after a failed execution; doubled per failure
DEFAULT_FOLLOW_SECONDS = 15.0  # TRAINING_FOLLOW_SECONDS: between two reads of a recorded execution


def dispatcher_from(mode: Optional[str], environ, queue: JobQueue, poll_seconds: float) -> Optional["Dispatcher"]:
    """Job mode's dispatcher for the training mode `mode` (LSDEPLOY_TRAINING), with the job from
    `environ` (the server's settings); None in service mode. LsdeployError for a bad setting."""
    mode = (mode or "service").strip().lower()
    if mode == "service":
        return None
    if mode != "job":
        raise LsdeployError(f"LSDEPLOY_TRAINING={mode!r} is not a training mode: use service (fit runs in the "
                            "server) or job (a Cloud Run job execution runs it)", EXIT_USAGE)
    job = (environ.get("LSDEPLOY_TRAINING_JOB") or "").strip()
    if not job:
        raise LsdeployError("LSDEPLOY_TRAINING=job needs LSDEPLOY_TRAINING_JOB=projects/PROJECT/locations/REGION/"
                            "jobs/JOB, the training job to run (deploy gcp --training job sets both)", EXIT_USAGE)
    try:
        follow = float(environ.get("TRAINING_FOLLOW_SECONDS") or DEFAULT_FOLLOW_SECONDS)
    except ValueError:
        raise LsdeployError(f"TRAINING_FOLLOW_SECONDS={environ.get('TRAINING_FOLLOW_SECONDS')!r} is not a number of "
                            "seconds: set how often a worker reads a running execution from the Run API (default "
                            f"{DEFAULT_FOLLOW_SECONDS:.0f})", EXIT_USAGE) from None
    try:
        return Dispatcher(queue, RunJobs.from_env(job, environ), poll_seconds, follow_seconds=follow)
    except ValueError as exc:
        raise LsdeployError(str(exc), EXIT_USAGE) from None


class Dispatcher:
    """See the module docstring. Has the Trainer's start()/stop() for the server's lifecycle."""

    def __init__(self, queue: JobQueue, jobs: RunJobs, poll_seconds: float = 2.0, directory: str = "/app",
                 follow_seconds: float = DEFAULT_FOLLOW_SECONDS):
        self.queue = queue
        self.jobs = jobs
        self.directory = directory
        self.poll_seconds = max(0.05, poll_seconds)
        self.follow_seconds = max(self.poll_seconds, follow_seconds)
        self.seconds_per_fit = 60.0  # for Retry-After when the queue is full
        self._pid = None
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()
        self._stop = threading.Event()
        self._backoff: dict = {}  # project -> (monotonic time of the next try, seconds)
        self._failed: dict = {}  # project -> (the failed execution waited out, failures in a row)
        self._followed: dict = {}  # project -> (execution name, monotonic time this worker last read it)

    # -- the request path ------------------------------------------------------------------
    def submit(self, project: str, kind: str, event: str, body: bytes) -> dict:
        """Queue the event durably, then make sure an execution runs for the project:
        {"job": the execution's name (the event's id while another webhook is still starting
        one), "execution": name or None, "event_job": the event's id, "started": bool}. Raises
        QueueFull and StateError (nothing acknowledged), RunApiError (the event IS queued)."""
        self.start()
        token = self.queue.new_token()
        public = job_id(project, token)
        entry = self.queue.enqueue(project, kind, event, body, self.seconds_per_fit, token=token, dispatch=True)
        if entry.get("start_execution"):
            try:
                name = self._start(project, token)
            except RunApiError as exc:
                exc.event_job = public  # the answer names the event: it is stored, not lost
                raise
            return {"job": name, "execution": name, "event_job": public, "started": True}
        name = (entry.get("execution") or {}).get("name")
        return {"job": name or public, "execution": name, "event_job": public, "started": False}

    def _start(self, project: str, token: str) -> str:
        """Start an execution under the start marker `token` and record its name. A refusal
        takes the marker back (the events stay queued) and is raised."""
        try:
            name = self.jobs.run(project, self.directory)
        except RunApiError as exc:
            logger.error("could not start a training execution for project %s: %s", project, exc)
            self._back_off(project)
            try:
                self.queue.release_start(project, token)
            except Exception as release:  # noqa: BLE001 - the marker goes stale and the poller retries
                logger.warning("start marker of project %s left behind (%s): retried after %.0f s", project,
                               release, STALE_START_SECONDS)
            raise
        self._backoff.pop(project, None)
        if not self.queue.record_execution(project, token, name):
            logger.warning("training execution %s started for project %s, but the project's record changed "
                           "meanwhile: it exits unless it is needed", name, project)
        logger.info("training execution %s started for project %s", name, project)
        return name

    def execution(self, name: str) -> Optional[dict]:
        return self.jobs.get(name)

    def _waited_out(self, project: str, name: str) -> bool:
        """A failed execution (its task failed every retry: a fit failing on every attempt, a
        backend that does not load, storage down) is restarted only after a backoff that doubles
        with each failure in a row, from FAILED_BACKOFF_SECONDS up to MAX_BACKOFF_SECONDS."""
        waited, failures = self._failed.get(project, (None, 0))
        if waited == name:
            return True
        seconds = min(MAX_BACKOFF_SECONDS, FAILED_BACKOFF_SECONDS * 2 ** failures)
        self._failed[project] = (name, failures + 1)
        self._backoff[project] = (time.monotonic() + seconds, seconds)
        logger.warning("training execution %s of project %s failed: another starts in %.0f s if events are still "
                       "queued (see its logs)", name, project, seconds)
        return False

    def _back_off(self, project: str) -> None:
        _, seconds = self._backoff.get(project, (0.0, self.poll_seconds))
        seconds = min(MAX_BACKOFF_SECONDS, seconds * 2)
        self._backoff[project] = (time.monotonic() + seconds, seconds)

    # -- lifecycle (as the Trainer's) -------------------------------------------------------
    def start(self) -> None:
        if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
                self._pid = os.getpid()
                self._stop = threading.Event()
                self._backoff = {}
                self._failed = {}
                self._followed = {}
                self._thread = threading.Thread(target=self._loop, name="lsdeploy-dispatch", daemon=True)
                self._thread.start()

    def stop(self, grace: float) -> dict:
        """Stop polling; queued events stay in the store for the execution (nothing runs here)."""
        self._stop.set()
        return {"finished": True, "running": None, "queued": None}

    def notify(self, project: str) -> None:
        """An event of the project was queued again (POST /jobs/<id>/retry): make sure it runs
        (a refusal is logged; the poller tries again)."""
        try:
            self.check(project)
        except RunApiError:
            pass

    # -- the poller ------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                projects = self.queue.projects()
            except Exception as exc:  # noqa: BLE001 - the store is unreachable: the next pass
                logger.debug("training queue unavailable: %s", exc)
                continue
            for project in projects:
                if self._stop.is_set():
                    return
                try:
                    self.check(project)
                except RunApiError:
                    pass  # logged by _start; tried again after the backoff
                except Exception as exc:  # noqa: BLE001 - never kills the poller
                    logger.warning("training dispatch of project %s failed (%s: %s): tried again in %.0f s",
                                   project, type(exc).__name__, exc, self.poll_seconds)

    def check(self, project: str) -> Optional[str]:
        """Start an execution when the project needs one and has none running; its name."""
        due, _ = self._backoff.get(project, (0.0, 0.0))
        if time.monotonic() < due:
            return None
        record, queued = self.queue.execution(project, fresh=False)
        if record is None and not queued:
            return None
        token = self.queue.new_token()
        if record is None:
            if not self.queue.dispatch_missing(project, token):
                return None
            logger.info("project %s has training events queued and no execution: starting one", project)
            return self._start(project, token)
        if "starting" in record:
            if time.time() - float(record.get("since") or 0) < STALE_START_SECONDS:
                return None
            expected, was = {"starting": record["starting"]}, "a start that never finished"
        else:
            followed, at = self._followed.get(project, (None, 0.0))
            if followed == record["name"] and time.monotonic() - at < self.follow_seconds:
                return None  # read a moment ago, still running
            self._followed[project] = (record["name"], time.monotonic())
            try:
                state = execution_state(self.jobs.get(record["name"]))
            except RunApiError as exc:
                logger.error("cannot follow training execution %s of project %s: %s", record["name"], project, exc)
                self._back_off(project)
                return None
            if not ended(state):
                return None
            if state == "failed" and not self._waited_out(project, record["name"]):
                return None
            if state == "succeeded":
                self._failed.pop(project, None)
            expected, was = {"name": record["name"]}, f"execution {record['name']} ({state})"
        outcome = self.queue.redispatch(project, expected, token)
        if outcome != "start":
            return None
        logger.warning("project %s still has training events queued after %s: starting another execution",
                       project, was)
        return self._start(project, token)
