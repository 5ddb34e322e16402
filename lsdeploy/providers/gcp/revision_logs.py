"""Why a revision did not start, read from its log in Cloud Logging.

Cloud Run's condition for a container that exits or misses its startup probe says only that it
"failed to start and listen on the port ... Logs for this revision might contain more information":
what the container printed (a missing module, a refused bucket, lsdeploy's own `error: ...` line)
is in Cloud Logging only. When a new revision fails, the deploy reads the end of that revision's
log (`entries.list`, one request, newest first; `logging.logEntries.list`, in roles/logging.viewer)
and shows it. Reading it is a courtesy: a refusal or an error becomes a note, never the failure.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from .errors import google_error
from .rest import RestClient

# the line that says why: lsdeploy's one-line errors, then a Python exception's last line
_ERROR_LINE = (re.compile(r"^error: "), re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*:"),
               re.compile(r"\b(ERROR|CRITICAL|Error|error)\b"))
_SYSTEM_LOG = "run.googleapis.com%2Fvarlog%2Fsystem"


class LoggingRest(RestClient):
    """Cloud Logging v2 `entries.list` over REST (Google's Python client of this API speaks gRPC
    only, and the deploy needs one call of it)."""

    default_endpoint = "https://logging.googleapis.com"

    def list_entries(self, resource_names: list, filter_: str, order_by: str = "timestamp desc",
                     page_size: int = 50) -> list:
        return self.request("POST", "v2/entries:list", {"resourceNames": resource_names, "filter": filter_,
                                                        "orderBy": order_by, "pageSize": page_size},
                            timeout=30).get("entries", [])


@dataclass
class RevisionLog:
    lines: list = field(default_factory=list)  # the log's last lines, oldest first
    reason: str = ""                           # the line that says why ("" when none does)
    note: str = ""                             # why the log could not be read ("" when it was)


def entry_text(entry: dict) -> str:
    """One log entry as one line of text (textPayload, or a structured log's message)."""
    text = entry.get("textPayload")
    if text is None:
        payload = entry.get("jsonPayload") or {}
        text = payload.get("message") or payload.get("msg") or ""
    return " ".join(str(text).split())


def reason_of(lines: list) -> str:
    """The last line that names an error, by the most specific pattern that matches one."""
    for pattern in _ERROR_LINE:
        for line in reversed(lines):
            if pattern.search(line):
                return line
    return ""


def revision_log(api, settings, revision: str, since: datetime | None = None, limit: int = 30,
                 tries: int = 3) -> RevisionLog:
    """The end of `revision`'s log. Entries reach Cloud Logging seconds after they are written:
    an empty answer is asked again (`tries` times, the deploy's poll interval apart)."""
    from google.api_core import exceptions as gexc

    client = getattr(api.clients, "logging", None)
    if client is None:
        return RevisionLog()
    since = since or datetime.now(timezone.utc) - timedelta(hours=1)
    query = (f'resource.type="cloud_run_revision" AND resource.labels.service_name="{settings.service}" AND '
             f'resource.labels.revision_name="{revision}" AND '
             f'timestamp>="{since.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}"')
    entries = []
    for attempt in range(tries):
        try:
            entries = client.list_entries([f"projects/{settings.project}"], query, page_size=limit)
        except gexc.GoogleAPICallError as exc:
            error = google_error(exc, "logging", "reading the log of revision", revision, settings.project)
            return RevisionLog(note=f"its log could not be read: {error}")
        except Exception as exc:  # noqa: BLE001 - no answer, credentials: the revision's failure is the news
            return RevisionLog(note=f"its log could not be read ({type(exc).__name__}: {str(exc)[:200]})")
        if any(not e.get("logName", "").endswith(_SYSTEM_LOG) for e in entries) or attempt == tries - 1:
            break
        time.sleep(api.poll_interval)
    lines = [text for text in (entry_text(e) for e in reversed(entries)) if text]
    own = [entry_text(e) for e in reversed(entries) if not e.get("logName", "").endswith(_SYSTEM_LOG)]
    return RevisionLog(lines=lines, reason=reason_of([line for line in own if line]) or reason_of(lines))
