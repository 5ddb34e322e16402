"""Bodies of queued events: what the project's training queue keeps until a fit has used them.

One object per event, ``queue/p-<project>/<event_id>.json`` (names.py), holding the bytes as
given. They are not state keys: outside ``state/`` (the snapshot never lists or downloads them),
read fresh from storage, and up to 16 MiB (above 8 MiB the client uploads them resumably, with
no precondition: an event id is unique, so a retried upload can only write the same bytes). The
queue's index (a state key changed with update()) says which events exist and in which order.

Every request uses the write retries and timeouts; a failure is a StateError naming the event
and the bucket, and an unreachable storage degrades the store as any write does (/health).
"""
from __future__ import annotations

from typing import Optional

from .bucket import StateBucket


class EventBodies:
    def __init__(self, objects: StateBucket):
        self.objects = objects

    def put(self, project: str, event_id: str, data: bytes) -> None:
        """Written before this returns; StateError when storage refuses or stays unreachable."""
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"the body of queued event {event_id!r} must be bytes, not {type(data).__name__}")
        self.objects.upload(self.objects.event_object(project, event_id), bytes(data), _what(event_id))

    def get(self, project: str, event_id: str) -> Optional[bytes]:
        """The body, or None when there is none (never queued, or deleted)."""
        return self.objects.download(self.objects.event_object(project, event_id), _what(event_id))

    def delete(self, project: str, event_id: str) -> None:
        """Remove the body; one that is already gone is fine."""
        self.objects.remove(self.objects.event_object(project, event_id), _what(event_id))


def _what(event_id: str) -> str:
    return f"queued event {event_id!r}"
