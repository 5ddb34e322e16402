"""Why a revision did not start, or a training execution failed, read from Cloud Logging.

Cloud Run's condition for a container that exits or misses its startup probe says only that it
"failed to start and listen on the port ... Logs for this revision might contain more information",
and a failed job execution says only how many tasks failed: what the container printed (a missing
module, a refused bucket, lsdeploy's own `error: ...` line, a traceback) is in Cloud Logging only.
The deploy and `status` read the end of that log (`entries.list`, one request, newest first;
`logging.logEntries.list`, in roles/logging.viewer) and show it. Reading it is a courtesy: a
refusal or an error becomes a note, never the failure.
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
class RunLog:
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
                 tries: int = 3) -> RunLog:
    """The end of `revision`'s log. Entries reach Cloud Logging seconds after they are written:
    an empty answer is asked again (`tries` times, the deploy's poll interval apart)."""
    query = (f'resource.type="cloud_run_revision" AND resource.labels.service_name="{settings.service}" AND '
             f'resource.labels.revision_name="{revision}"')
    return read_log(api, settings, f"revision {revision}", query, since, limit, tries)


def execution_log(api, settings, execution: str, since: datetime | None = None, limit: int = 30) -> RunLog:
    """The end of a training job execution's log (all its tasks and attempts)."""
    query = (f'resource.type="cloud_run_job" AND resource.labels.job_name="{settings.job_id}" AND '
             f'labels."run.googleapis.com/execution_name"="{execution}"')
    return read_log(api, settings, f"execution {execution}", query, since, limit, tries=1)


def read_log(api, settings, what: str, query: str, since: datetime | None, limit: int, tries: int) -> RunLog:
    from google.api_core import exceptions as gexc

    client = getattr(api.clients, "logging", None)
    if client is None:
        return RunLog()
    since = since or datetime.now(timezone.utc) - timedelta(days=1)
    query += f' AND timestamp>="{since.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}"'
    entries = []
    for attempt in range(tries):
        try:
            entries = client.list_entries([f"projects/{settings.project}"], query, page_size=limit)
        except gexc.GoogleAPICallError as exc:
            error = google_error(exc, "logging", "reading the log of", what, settings.project)
            return RunLog(note=f"its log could not be read: {error}")
        except Exception as exc:  # noqa: BLE001 - no answer, credentials: the failure itself is the news
            return RunLog(note=f"its log could not be read ({type(exc).__name__}: {str(exc)[:200]})")
        if any(not e.get("logName", "").endswith(_SYSTEM_LOG) for e in entries) or attempt == tries - 1:
            break
        time.sleep(api.poll_interval)
    texts = [(entry_text(e), e.get("logName", "").endswith(_SYSTEM_LOG)) for e in reversed(entries)]
    lines = [text for text, _ in texts if text]
    own = [text for text, system in texts if text and not system]  # the container's, not Cloud Run's
    return RunLog(lines=lines, reason=reason_of(own) or reason_of(lines))
