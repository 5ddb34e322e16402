"""Storage errors as one line, and whether storage is answering (`Outage`)."""
from __future__ import annotations

import logging
import re
import time
from typing import Optional

from ...errors import StateError

logger = logging.getLogger("lsdeploy.state.gcs")

ROLE_HINT = "grant the service account roles/storage.objectUser on the bucket"


def refused(message: str) -> StateError:
    """A StateError for a permission Cloud Storage refused (start-up may wait for a grant to apply)."""
    error = StateError(message)
    error.permission_denied = True
    return error


def status_of(exc: BaseException) -> Optional[int]:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


def describe(exc: BaseException) -> str:
    """A short one-line account of a storage error (no URLs, no response bodies)."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    if cause is not None and type(exc).__name__ == "RetryError":
        exc = cause
    code = status_of(exc)
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


class Outage:
    """The last storage failure, until a listing succeeds: what `health()` reports and what
    makes reads and request-path writes stop waiting for storage."""

    def __init__(self, uri: str):
        self.uri = uri
        self.error: Optional[str] = None
        self.since: Optional[float] = None  # monotonic time of the first failure

    def note(self, exc: BaseException) -> None:
        message = describe(exc)
        if self.error is None:
            self.since = time.monotonic()
            logger.warning("Cloud Storage state %s unreachable (%s): serving the last known state", self.uri, message)
        self.error = message

    def over(self, started: float) -> None:
        """A listing that began at `started` succeeded."""
        if self.error is not None:
            logger.warning("Cloud Storage state %s reachable again after %.1f s", self.uri,
                           time.monotonic() - (self.since or started))
        self.error = None
        self.since = None
