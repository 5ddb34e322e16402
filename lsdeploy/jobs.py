"""The durable training queue: every acknowledged training event, per project, in the state store.

A webhook's body is stored (`StateStore.put_event`) and then appended to the project's index, one
state key (`QUEUE_KEY`) changed only by atomic `update()`s, before the webhook is answered. So
the queue lives wherever the state does: SQLite under MODEL_DIR for every worker of a machine, or
Cloud Storage (MODEL_STATE_URI) for every instance of a deployment.

The index of a project, rewritten by every event (so it holds only what is pending)::

    {"next": 18,                       # the sequence number of the next event
     "queued": [entry, ...],           # in acknowledgement order; the head is the next to run
     "execution": {...}}               # job mode only: the Cloud Run job execution that drains
                                       # the queue, {"name", "since"}, or {"starting", "since"}
                                       # while a webhook starts one (see `enqueue`, `settle`)

and its history (`HISTORY_KEY`), written once per finished event, for GET /jobs/<id>::

    {"done": [entry, ...],             # the last DONE_KEPT finished
     "failed": [entry, ...]}           # the last FAILED_KEPT given up after TRAINING_MAX_ATTEMPTS
                                       # (their bodies are kept, for POST /jobs/<id>/retry)

An entry: ``{"id", "seq", "kind", "event", "size", "queued_at", "attempts", "state",
"not_before", "error", "runner", "started_at", "finished_at", "result"}`` (empty fields left
out); state is ``queued``, ``running`` (claimed by `runner`) or ``retrying`` (a fit raised; runs
again from `not_before`).

Only the holder of the project's training lock (`StateStore.try_lock`) claims the head, runs it
and finishes it, so events of a project reach fit() one at a time in order, across workers and
instances. An event leaves `queued` only after its fit returned; a claimed entry whose runner
died stays `running` and the next holder runs it again with the next attempt number: delivery is
at least once, and fit() gets the job id and attempt (see `LabelStudioMLBase.delivery`).
"""
from __future__ import annotations

import datetime
import logging
import secrets
import time
from typing import Optional

from .errors import StateError

logger = logging.getLogger("lsdeploy.server")

QUEUE_KEY = "lsdeploy.training_queue"      # {"next", "queued"}: changed by every event
HISTORY_KEY = "lsdeploy.training_history"  # {"done", "failed"}: changed once per finished event
DONE_KEPT = 100     # finished jobs kept in the index, for GET /jobs/<id>
FAILED_KEPT = 100   # failed jobs kept (with their bodies); older ones are dropped
ERROR_CHARS = 2000  # an error message kept in the index is cut to this
RESULT_CHARS = 200  # a fit's result (JSON) kept in the done list is cut to this

DEFAULT_MAX_JOBS = 1000                 # TRAINING_QUEUE_MAX_JOBS, per project
DEFAULT_MAX_BYTES = 256 * 1024 * 1024   # TRAINING_QUEUE_MAX_BYTES, per project
DEFAULT_MAX_ATTEMPTS = 5                # TRAINING_MAX_ATTEMPTS
DEFAULT_RETRY_SECONDS = 5.0             # TRAINING_RETRY_SECONDS: the first backoff, doubled each time
MAX_BACKOFF_SECONDS = 600.0


class QueueFull(Exception):
    """The project's training queue is at its bound: the caller answers 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


def job_id(project: str, token: str) -> str:
    """The public id of a job: the project and the event's token (`<project>-<token>`)."""
    return f"{project}-{token}"


def parse_job_id(value: str) -> Optional[tuple]:
    """(project, token) of a public job id, or None when it cannot be one."""
    project, sep, token = str(value).rpartition("-")
    if not sep or not token or len(token) > 64 or not all(c.isalnum() or c == "_" for c in token):
        return None
    return project, token


def view(job: str, project_id: str, entry: dict) -> dict:
    """GET /jobs/<id>: a queue entry as the API shows it (times in ISO 8601, UTC)."""
    def when(seconds):
        if not seconds:
            return None
        return datetime.datetime.fromtimestamp(float(seconds), datetime.timezone.utc).isoformat(timespec="milliseconds")

    state = entry.get("state")
    shown = {"job": job, "project": project_id, "state": state, "event": entry.get("event"),
            "sequence": entry.get("seq"), "attempts": entry.get("attempts", 0),
            "queued_at": when(entry.get("queued_at")), "started_at": when(entry.get("started_at")),
            "finished_at": when(entry.get("finished_at"))}
    if "position" in entry:
        shown["position"] = entry["position"]  # events ahead of it in the project's queue
    if entry.get("error"):
        shown["error"] = entry["error"]
    if state == "retrying":
        shown["next_attempt_at"] = when(entry.get("not_before"))
    if entry.get("result") is not None:
        shown["result"] = entry["result"]
    return shown


def _index(value) -> dict:
    index = {"next": 1, "queued": []}
    if isinstance(value, dict):
        index.update({k: value[k] for k in index if k in value})
        if value.get("execution"):  # job mode: the execution that drains the project (lsdeploy.dispatch)
            index["execution"] = value["execution"]
    return index


def _history(value) -> dict:
    history = {"done": [], "failed": []}
    if isinstance(value, dict):
        history.update({k: value[k] for k in history if k in value})
    return history


def _without(value: dict, part: str, token: str) -> dict:
    """`value` with the entry `token` taken out of its list `part`."""
    value[part] = [e for e in value[part] if e.get("id") != token]
    return value


def _compact(entry: dict) -> dict:
    """An entry as stored: no empty fields (the index is rewritten by every event)."""
    return {k: v for k, v in entry.items() if v is not None and v != ""}


class JobQueue:
    """The durable queue over a state store; see the module docstring."""

    def __init__(self, store_of, max_jobs: int = DEFAULT_MAX_JOBS, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, retry_seconds: float = DEFAULT_RETRY_SECONDS):
        self._store_of = store_of  # a callable: the store is opened per worker process, on first use
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        self.max_attempts = max(1, max_attempts)
        self.retry_seconds = retry_seconds
        self.interrupted_failed = 0  # events this process kept as failed because they were interrupted too often

    @property
    def store(self):
        return self._store_of()

    # -- the request path ------------------------------------------------------------------
    @staticmethod
    def new_token() -> str:
        return secrets.token_hex(8)

    def enqueue(self, project: str, kind: str, event: str, body: bytes, seconds_per_fit: float = 1.0,
                token: Optional[str] = None, dispatch: bool = False) -> dict:
        """Store the event and append it to the project's queue; the entry. Raises QueueFull past
        the bounds (an empty queue takes any one event) and StateError when storage fails: then
        nothing was acknowledged and nothing is left behind but, at worst, an unreferenced body.

        With `dispatch` (job mode), the same index write looks at the project's execution record:
        when there is none it records a start marker ``{"starting": <token>}`` and the entry
        carries ``"start_execution": True`` (the caller starts one, then `record_execution`);
        otherwise the entry carries the record as ``"execution"`` (that execution, or the next
        one, runs the event: a drainer clears the record only with the queue empty, `settle`)."""
        store = self.store
        problem = store.degraded()
        if problem is not None:  # answer at once: this event cannot be stored now
            raise StateError(f"the training event was not stored, so it is not acknowledged: the state store is "
                             f"unreachable ({problem}); it trains if sent again once storage answers")
        token = token or self.new_token()
        try:
            return self._enqueue(store, project, token, kind, event, body, seconds_per_fit, dispatch)
        except StateError as exc:
            raise StateError(f"the training event was not stored, so it is not acknowledged: {exc}; it trains if "
                             "sent again once storage answers") from None

    def _enqueue(self, store, project: str, token: str, kind: str, event: str, body: bytes,
                 seconds_per_fit: float, dispatch: bool) -> dict:
        store.put_event(project, token, body)
        entry = {"id": token, "seq": 0, "kind": kind, "event": event, "size": len(body),
                 "queued_at": time.time(), "attempts": 0, "state": "queued"}
        seen: dict = {}  # what the write found of the execution record (job mode)

        def append(value):
            seen.clear()
            index = _index(value)
            queued = index["queued"]
            held = sum(int(e.get("size") or 0) for e in queued)
            if queued and (len(queued) + 1 > self.max_jobs or held + len(body) > self.max_bytes):
                wait = max(1, min(300, round(seconds_per_fit * len(queued))))
                raise QueueFull(
                    f"training queue of project {project!r} is full ({len(queued)} event(s), {held} bytes; "
                    f"bounds TRAINING_QUEUE_MAX_JOBS={self.max_jobs}, TRAINING_QUEUE_MAX_BYTES={self.max_bytes}): "
                    f"send the event again in about {wait} s, or raise the bounds", wait)
            entry["seq"] = index["next"]
            index["next"] += 1
            queued.append(dict(entry))
            if dispatch:
                if index.get("execution"):
                    seen["execution"] = dict(index["execution"])
                else:
                    index["execution"] = {"starting": token, "since": time.time()}
                    seen["start_execution"] = True
            return index

        try:
            store.update(project, QUEUE_KEY, append)
        except QueueFull:
            self._drop_bodies(project, [token])
            raise
        # (a StateError leaves the body: storage failed, a deletion would wait for it again; an
        # unreferenced body costs only its bytes)
        return dict(entry, **seen)

    # -- job mode: the execution record (see lsdeploy.dispatch) ---------------------------
    def execution(self, project: str, fresh: bool = True) -> tuple:
        """(the project's execution record, events queued): the record is {"name", "since"},
        {"starting", "since"} (a webhook is starting one), or None. `fresh=False` reads the
        snapshot (cheap; the caller's writes check again)."""
        index = _index((self.store.read if fresh else self.store.get)(project, QUEUE_KEY))
        return index.get("execution"), len(index["queued"])

    def drains(self, project: str, execution: str) -> bool:
        """Whether the execution `execution` (its short or full name) must drain the project even
        while another process holds its lock: the record names it, or an execution is being
        started (the holder drains the events and clears the record; then this one may exit)."""
        record, _ = self.execution(project)
        if record is None:
            return False
        return "starting" in record or str(record.get("name", "")).rsplit("/", 1)[-1] == execution.rsplit("/", 1)[-1]

    def record_execution(self, project: str, token: str, name: str) -> bool:
        """The execution started under the start marker `token` is `name`; False when the marker
        is no longer there (the record was replaced meanwhile)."""
        return self._swap(project, {"starting": token}, {"name": name, "since": time.time()}, only_if_queued=False)

    def release_start(self, project: str, token: str) -> None:
        """Starting an execution under the marker `token` failed: the marker goes (the events stay
        queued, for the next webhook or the server's poller)."""
        self._swap(project, {"starting": token}, None, only_if_queued=False)

    def redispatch(self, project: str, expected: dict, token: str) -> str:
        """The recorded execution `expected` ended (or its start marker went stale): in one write,
        "start" when events are queued (a new start marker `token` is recorded: start one), or
        "cleared" when none is (the record goes); "changed" when the record is no longer `expected`."""
        outcome = self._swap(project, expected, {"starting": token, "since": time.time()}, only_if_queued=True)
        if outcome:
            return "start"
        return "cleared" if self._swap(project, expected, None, only_if_queued=False, only_if_empty=True) else "changed"

    def dispatch_missing(self, project: str, token: str) -> bool:
        """Events queued and no execution recorded (a start that failed): record a start marker
        `token` in one write; True when the caller should start an execution."""
        return self._swap(project, None, {"starting": token, "since": time.time()}, only_if_queued=True)

    def settle(self, project: str) -> bool:
        """A drainer (`label-studio-ml train`) holding the project's lock found nothing to run:
        the execution record is cleared in the same write that sees the queue empty, so a webhook
        that queues after it starts a new execution and one that queued before it is drained by
        this one. False (nothing changed) when events are queued: the caller drains them."""
        index = _index(self.store.read(project, QUEUE_KEY))
        if not index["queued"] and not index.get("execution"):
            return True  # nothing to clear: no write (a webhook queueing now finds no record and starts one)
        return self._swap(project, "any", None, only_if_queued=False, only_if_empty=True)

    def _swap(self, project: str, expected, new: Optional[dict], only_if_queued: bool,
              only_if_empty: bool = False) -> bool:
        """One index write: the record becomes `new` when it matches `expected` ("any"; None:
        absent; a dict: the record has each of its fields) and the queue condition holds."""
        done: dict = {}

        def swap(value):
            done.clear()
            index = _index(value)
            record = index.get("execution")
            if expected == "any":
                matches = True
            elif expected is None:
                matches = record is None
            else:
                matches = record is not None and all(record.get(k) == v for k, v in expected.items() if k != "since")
            if not matches or (only_if_queued and not index["queued"]) or (only_if_empty and index["queued"]):
                return value if value is not None else index
            if new is None:
                index.pop("execution", None)
            else:
                index["execution"] = new
            done["swapped"] = True
            return index

        self.store.update(project, QUEUE_KEY, swap)
        return bool(done)

    def lookup(self, project: str, token: str, fresh: bool = False) -> Optional[dict]:
        """The entry of a job wherever it is (queued, failed, done), with its position."""
        store = self.store
        read = store.read if fresh else store.get
        for position, entry in enumerate(_index(read(project, QUEUE_KEY))["queued"]):
            if entry.get("id") == token:
                return dict(entry, position=position)
        history = _history(read(project, HISTORY_KEY))
        for part, state in (("failed", "failed"), ("done", "done")):
            for entry in history[part]:
                if entry.get("id") == token:
                    return dict(entry, state=state)
        return None

    # -- the trainer (holding the project's lock) ------------------------------------------
    def projects(self) -> list:
        return self.store.projects(QUEUE_KEY)

    def runnable_in(self, project: str, now: Optional[float] = None, fresh: bool = False) -> Optional[float]:
        """Seconds until the project's head may run (0: now), None when nothing is queued."""
        queued = _index((self.store.read if fresh else self.store.get)(project, QUEUE_KEY))["queued"]
        if not queued:
            return None
        now = time.time() if now is None else now
        return max(0.0, float(queued[0].get("not_before") or 0) - now)

    def depth(self) -> tuple:
        """(queued, failed) events over every project."""
        queued = failed = 0
        store = self.store
        for project in self.projects():
            queued += len(_index(store.get(project, QUEUE_KEY))["queued"])
            failed += len(_history(store.get(project, HISTORY_KEY))["failed"])
        return queued, failed

    def claim(self, project: str, runner: str) -> Optional[dict]:
        """Mark the head running (one more attempt) and return it; None when there is nothing to
        run now. A head left `running` was interrupted (its runner died or was stopped): it runs
        again, counted as an attempt; past the bound it is moved to failed instead."""
        if self.runnable_in(project) != 0.0 and self._fresh_head(project) is None:
            return None
        claimed: dict = {}

        def take(value):
            claimed.clear()
            index = _index(value)
            self._take_head(index, runner, claimed)
            return index

        self.store.update(project, QUEUE_KEY, take)
        return self._claimed(project, claimed)

    def _take_head(self, index: dict, runner: str, claimed: dict) -> None:
        now = time.time()
        while index["queued"]:
            head = index["queued"][0]
            if float(head.get("not_before") or 0) > now:
                return
            if head.get("state") == "running" and int(head.get("attempts") or 0) >= self.max_attempts:
                index["queued"].pop(0)
                head.update(state="failed", finished_at=now, error=(
                    f"interrupted {head['attempts']} time(s): the process running fit() died or was stopped "
                    f"before it returned (last runner {head.get('runner')}); kept as failed"))
                claimed.setdefault("interrupted", []).append(dict(head))
                continue
            interrupted = head.get("runner") if head.get("state") == "running" else None
            head.update(state="running", attempts=int(head.get("attempts") or 0) + 1, runner=runner, started_at=now)
            claimed["entry"] = dict(head, interrupted_runner=interrupted)
            return

    def _claimed(self, project: str, claimed: dict) -> Optional[dict]:
        for entry in claimed.get("interrupted", ()):
            self.interrupted_failed += 1
            logger.error("training job %s (%s) kept as failed: %s", job_id(project, entry["id"]), entry.get("event"),
                         entry["error"])
            self._remember(project, "failed", entry)
        return claimed.get("entry")

    def _remember(self, project: str, part: str, entry: dict) -> None:
        """Add a finished entry to the project's done or failed list (bounded; the bodies of failed
        entries dropped past FAILED_KEPT are deleted)."""
        dropped: list = []
        keep = DONE_KEPT if part == "done" else FAILED_KEPT

        def add(value):
            dropped.clear()
            history = _history(value)
            entries = [e for e in history[part] if e.get("id") != entry["id"]] + [_compact(entry)]
            history[part] = entries[-keep:]
            dropped.extend(e.get("id") for e in entries[:-keep])
            return history

        self.store.update(project, HISTORY_KEY, add)
        if part == "failed":
            self._drop_bodies(project, dropped)

    def _fresh_head(self, project: str) -> Optional[dict]:
        """The head from a fresh read (the snapshot `get` serves may lag a write elsewhere)."""
        queued = _index(self.store.read(project, QUEUE_KEY))["queued"]
        if queued and float(queued[0].get("not_before") or 0) <= time.time():
            return queued[0]
        return None

    def finish(self, project: str, token: str, summary: Optional[str] = None,
               runner: Optional[str] = None) -> Optional[dict]:
        """The head's fit returned: it is recorded as done, then leaves the queue, and its body is
        deleted. With `runner`, the next head that is due is claimed for it in the same index
        write (on Cloud Storage one object takes about one write a second) and returned."""
        store = self.store
        entry = next((e for e in _index(store.get(project, QUEUE_KEY))["queued"] if e.get("id") == token), None)
        if entry is not None:  # first the record: a crash before the index write runs it again, never loses it
            done = dict(entry, state="done", finished_at=time.time(), error=None, runner=None, not_before=None,
                        result=None if summary is None else summary[:RESULT_CHARS])
            self._remember(project, "done", done)
        claimed: dict = {}

        def leave(value):
            claimed.clear()
            index = _without(_index(value), "queued", token)
            if runner is not None:
                self._take_head(index, runner, claimed)
            return index

        store.update(project, QUEUE_KEY, leave)
        store.delete_event(project, token)
        return self._claimed(project, claimed)

    def failed(self, project: str, token: str, error: str) -> tuple:
        """The head's fit raised: ("retrying", seconds until the next attempt), or ("failed", 0)
        once it had TRAINING_MAX_ATTEMPTS attempts (it is then kept in the failed list)."""
        store = self.store
        entry = next((e for e in _index(store.get(project, QUEUE_KEY))["queued"] if e.get("id") == token), None)
        attempts = int((entry or {}).get("attempts") or 1)
        if entry is None or attempts >= self.max_attempts:
            if entry is not None:
                self._remember(project, "failed", dict(entry, state="failed", finished_at=time.time(),
                                                       error=error[:ERROR_CHARS], not_before=None))
            store.update(project, QUEUE_KEY, lambda value: _without(_index(value), "queued", token))
            return "failed", 0.0
        delay = min(MAX_BACKOFF_SECONDS, self.retry_seconds * 2 ** (attempts - 1))

        def later(value):
            index = _index(value)
            for e in index["queued"]:
                if e.get("id") == token:
                    e.update(state="retrying", not_before=time.time() + delay, error=error[:ERROR_CHARS])
            return index

        store.update(project, QUEUE_KEY, later)
        return "retrying", delay

    def retry(self, project: str, token: str) -> Optional[dict]:
        """Queue a failed job again, at the end of the queue with fresh attempts; its entry, or
        None when no failed job has that id."""
        store = self.store
        entry = next((e for e in _history(store.read(project, HISTORY_KEY))["failed"] if e.get("id") == token), None)
        if entry is None:
            return None
        found: dict = {}

        def again(value):
            index = _index(value)
            queued = [e for e in index["queued"] if e.get("id") != token]
            again = _compact(dict(entry, state="queued", attempts=0, seq=index["next"], not_before=None, runner=None,
                                  queued_at=time.time(), finished_at=None, error=None))
            index.update(next=index["next"] + 1, queued=queued + [again])
            found["entry"] = dict(again, position=len(queued))
            return index

        store.update(project, QUEUE_KEY, again)
        store.update(project, HISTORY_KEY, lambda value: _without(_history(value), "failed", token))
        return found["entry"]

    def _drop_bodies(self, project: str, tokens: list) -> None:
        for token in tokens:
            try:
                self.store.delete_event(project, token)
            except Exception:  # noqa: BLE001 - an unreferenced body costs only its bytes
                pass
