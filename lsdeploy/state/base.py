"""The state store interface and what every backend shares: value encoding and name checks."""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
from typing import Any, Callable, Iterator

MISSING = object()  # "no value" where None is a value
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
EVENT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_EVENT_KEY = "lsdeploy.event."


def check_event_id(event_id: str) -> str:
    if not isinstance(event_id, str) or not EVENT_ID.match(event_id):
        raise ValueError(f"event id {event_id!r} is not allowed: letters, digits, '_' or '-', at most 64")
    return event_id


def check_artifact_name(name: str) -> str:
    if not isinstance(name, str) or not ARTIFACT_NAME.match(name) or ".." in name:
        raise ValueError(
            f"artifact name {name!r} is not allowed: use letters, digits, '.', '_' or '-' "
            "(no path separators), at most 200 characters"
        )
    return name


def safe_component(project: str) -> str:
    """A file-system-safe, collision-free name for a project id."""
    project = str(project)
    cleaned = _SAFE.sub("_", project) or "_"
    if cleaned != project or cleaned.startswith("."):
        cleaned = f"{cleaned.lstrip('.')}-{hashlib.sha256(project.encode()).hexdigest()[:10]}"
    return cleaned


def encode_value(value: Any) -> str:
    """A state value as compact JSON; TypeError naming what to do for anything JSON cannot carry."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"state values must be JSON-serializable (str, number, bool, None, list, dict): {exc}; "
            "store whole files with save_artifact()"
        ) from None


class StateStore:
    """Interface of a model state store. Keys live per project (a string; '' is allowed)."""

    kind = "abstract"

    def get(self, project: str, key: str, default: Any = None) -> Any:
        raise NotImplementedError

    def set(self, project: str, key: str, value: Any, *, wait: float | None = None) -> None:
        """Write a value. `wait` (seconds): return after at most that long, the write going on
        in the background (it lands, or an error is logged); for writes on the request path,
        which must not hang on a storage outage. None: return when written (errors raise)."""
        raise NotImplementedError

    def create(self, project: str, key: str, value: Any, *, wait: float | None = None) -> None:
        """Set the key only if it has no value yet: a value another worker or instance wrote,
        even one this process has not seen yet, is kept. `wait` as for `set`."""
        self.update(project, key, lambda current: value if current is MISSING else current, default=MISSING)

    def has(self, project: str, key: str) -> bool:
        return self.get(project, key, MISSING) is not MISSING

    def delete(self, project: str, key: str) -> None:
        raise NotImplementedError

    def update(self, project: str, key: str, fn: Callable[[Any], Any], default: Any = None) -> Any:
        """Atomically replace the value with ``fn(current)`` and return it. `fn` may run
        more than once (optimistic stores retry on conflict): keep it free of side effects."""
        raise NotImplementedError

    def save_artifact(self, project: str, name: str, local_path: str) -> None:
        """Store a whole file; readers see the old or the new file, never a mix."""
        raise NotImplementedError

    def load_artifact(self, project: str, name: str) -> str | None:
        """A local path holding the artifact's bytes, or None when there is none."""
        raise NotImplementedError

    @contextlib.contextmanager
    def lock(self, project: str) -> Iterator[None]:
        """Serialize training for a project across the processes that share this store."""
        yield

    # -- what the durable training queue (lsdeploy.jobs) needs -------------------------------
    @contextlib.contextmanager
    def try_lock(self, project: str) -> Iterator[bool]:
        """The project's training lock without waiting: yields a true value when this process now
        holds it (exclusive across threads, processes and instances sharing the store), False at
        once when another holds it or it cannot be taken. A lock that can be lost while held (a
        lease that expires) yields an object whose `valid()` says whether it still holds. This
        default waits for `lock()`."""
        with self.lock(project):
            yield True

    def read(self, project: str, key: str, default: Any = None) -> Any:
        """A fresh read: reflects every write completed before the call, by any process or
        instance (`get` may serve a snapshot a little older)."""
        return self.get(project, key, default)

    def degraded(self) -> str | None:
        """Why writes cannot be expected to land now (storage known to be unreachable), or None;
        cheap, for the request path (health() is the full check)."""
        return None

    def projects(self, key: str) -> list:
        """The projects that have a value for `key` (a store that cannot list them: none)."""
        return []

    def put_event(self, project: str, event_id: str, data: bytes) -> None:
        """Store a queued event's body (the request as received) durably before returning."""
        self.set(project, _EVENT_KEY + check_event_id(event_id), data.decode("utf-8"))

    def get_event(self, project: str, event_id: str) -> bytes | None:
        text = self.read(project, _EVENT_KEY + check_event_id(event_id))
        return None if text is None else text.encode("utf-8")

    def delete_event(self, project: str, event_id: str) -> None:
        self.delete(project, _EVENT_KEY + check_event_id(event_id))

    def health(self) -> dict:
        return {"store": self.kind, "status": "ok"}

    def close(self) -> None:
        pass
