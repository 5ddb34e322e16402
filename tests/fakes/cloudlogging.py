"""Cloud Logging v2 fake: `entries.list` over the Cloud Run fake's revisions.

Cloud Run keeps what a container prints in Cloud Logging, never in a revision's conditions, so a
deploy that wants to say why a revision did not start reads it from here. The route is the REST one
(`POST /v2/entries:list`); bodies are parsed into the real messages (google.cloud.logging_v2's
ListLogEntriesRequest / ListLogEntriesResponse, google.logging.v2.LogEntry) and refused as Google
refuses them: no `resourceNames` (or more than 100), a `pageSize` below 0 or over 1000, an
`orderBy` other than "timestamp asc" / "timestamp desc", a filter over 20,000 characters or one
this fake cannot parse (it reads `FIELD OP "VALUE"` terms joined by AND, OP one of = != >= <= > < :,
on resource.type, resource.labels.*, logName, severity, timestamp and textPayload).

The entries are each revision's container log, line by line, under
`projects/P/logs/run.googleapis.com%2Fstderr` with a `cloud_run_revision` resource (what the
runner captured: a process's or a real container's output, and the lines the fake itself wrote for
a container it models without running it, `RevisionState.log`), and each job execution's log (all
its attempts) with a `cloud_run_job` resource and the `run.googleapis.com/execution_name` label
(filtered as `labels."run.googleapis.com/execution_name"="E"`). Permission: logging.logEntries.list
(the PERMISSIONS table; `deny("logging", "ListLogEntries")`).
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from google.cloud.logging_v2 import types as logging_types

from .server import Route, compile_template, invalid_argument

ListLogEntriesRequest = logging_types.ListLogEntriesRequest.pb()
ListLogEntriesResponse = logging_types.ListLogEntriesResponse.pb()
STDERR_LOG = "run.googleapis.com%2Fstderr"
TERM = re.compile(r'\s*([A-Za-z_][\w.]*(?:\."[^"]+")?)\s*(>=|<=|!=|=|>|<|:)\s*"((?:[^"\\]|\\.)*)"\s*')
SEVERITIES = ["DEFAULT", "DEBUG", "INFO", "NOTICE", "WARNING", "ERROR", "CRITICAL", "ALERT", "EMERGENCY"]


def parse_filter(text: str) -> list[tuple[str, str, str]]:
    """[(field, op, value)] of `T AND T AND ...`; INVALID_ARGUMENT for anything else."""
    terms = []
    for part in re.split(r"\s+AND\s+", text.strip()) if text.strip() else []:
        m = TERM.fullmatch(part)
        if not m:
            raise invalid_argument(f"Unparseable filter: syntax error near {part[:40]!r}", "filter")
        terms.append((m.group(1).replace('"', ""), m.group(2), m.group(3).replace('\\"', '"')))
    return terms


def _timestamp(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise invalid_argument(f"Unparseable filter: invalid timestamp {value!r}", "filter") from None


def matches(entry: dict, field: str, op: str, value: str) -> bool:
    if field == "timestamp":
        have, want = entry["_time"], _timestamp(value)
    elif field == "severity":
        if value not in SEVERITIES:
            raise invalid_argument(f"Unparseable filter: unknown severity {value!r}", "filter")
        have, want = SEVERITIES.index(entry["severity"]), SEVERITIES.index(value)
    else:
        have, want = entry["_fields"].get(field, ""), value
    if op == ":":
        return str(want).lower() in str(have).lower()
    return {"=": have == want, "!=": have != want, ">=": have >= want, "<=": have <= want,
            ">": have > want, "<": have < want}[op]


class CloudLoggingFake:
    api = "logging"

    def __init__(self, cloud):
        self.cloud = cloud
        regex, variables, has_verb = compile_template("/v2/entries:list")
        cloud.server.add_routes([Route(self.api, "ListLogEntries", "POST", "/v2/entries:list", regex, variables,
                                       "*", ListLogEntriesRequest, ListLogEntriesResponse, has_verb)])
        cloud.server.handle(self.api, "ListLogEntries")(self.ListLogEntries)

    # ---- the entries -------------------------------------------------------------------------
    def entries(self, project: str) -> list[dict]:
        """Every revision's and job execution's log in `project`, oldest first."""
        found = []
        for name, rstate in self.cloud.run.revisions.items():
            parts = name.split("/")  # projects/P/locations/L/services/S/revisions/R
            if parts[1] != project:
                continue
            lines = list(rstate.log)
            if rstate.process is not None:
                lines += rstate.process.log_tail(10000).splitlines()
            labels = {"service_name": parts[5], "revision_name": parts[7], "location": parts[3],
                      "configuration_name": parts[5], "project_id": project}
            found += self._lines(project, "cloud_run_revision", labels, {}, lines, rstate.message.create_time,
                                 parts[7])
        for name, estate in self.cloud.jobs.executions.items():
            parts = name.split("/")  # projects/P/locations/L/jobs/J/executions/E
            if parts[1] != project or not estate.log_path:
                continue
            try:
                with open(estate.log_path, errors="replace") as log:
                    lines = log.read().splitlines()
            except OSError:
                continue
            labels = {"job_name": parts[5], "location": parts[3], "project_id": project}
            entry_labels = {"run.googleapis.com/execution_name": parts[7], "run.googleapis.com/task_index": "0"}
            found += self._lines(project, "cloud_run_job", labels, entry_labels, lines, estate.message.create_time,
                                 parts[7])
        return found

    @staticmethod
    def _lines(project, kind, labels, entry_labels, lines, create_time, source) -> list[dict]:
        """One entry a line of `source`'s log, a millisecond apart from its create time; `_fields`
        are what a filter can name."""
        created = datetime.fromtimestamp(create_time.seconds, timezone.utc)
        fields = {"resource.type": kind, "logName": f"projects/{project}/logs/{STDERR_LOG}",
                  **{f"resource.labels.{k}": v for k, v in labels.items()},
                  **{f"labels.{k}": v for k, v in entry_labels.items()}}
        return [{"_time": created + timedelta(milliseconds=index), "_fields": {**fields, "textPayload": line},
                 "kind": kind, "severity": "DEFAULT", "labels": labels, "entry_labels": entry_labels,
                 "line": line, "index": index, "rev": source} for index, line in enumerate(lines)]

    # ---- entries.list -------------------------------------------------------------------------
    def ListLogEntries(self, request, ctx):
        names = list(request.resource_names)
        if not names:
            raise invalid_argument("resource_names is required.", "resource_names")
        if len(names) > 100:
            raise invalid_argument("At most 100 resource names may be given.", "resource_names")
        for name in names:
            if not re.fullmatch(r"projects/[^/]+", name):
                raise invalid_argument(f"The lsdeploy fake reads only projects/PROJECT, not {name!r}.",
                                       "resource_names")
        if request.page_size < 0 or request.page_size > 1000:
            raise invalid_argument(f"page_size must be between 0 and 1000, not {request.page_size}.", "page_size")
        if request.order_by not in ("", "timestamp asc", "timestamp desc"):
            raise invalid_argument(f"Invalid order_by {request.order_by!r}: only \"timestamp asc\" and "
                                   "\"timestamp desc\" are supported.", "order_by")
        if len(request.filter) > 20000:
            raise invalid_argument("The filter is longer than 20,000 characters.", "filter")
        terms = parse_filter(request.filter)
        found = [e for name in names for e in self.entries(name.split("/")[1])
                 if all(matches(e, *term) for term in terms)]
        found.sort(key=lambda e: (e["_time"], e["rev"], e["index"]), reverse=request.order_by == "timestamp desc")
        start = int(request.page_token or 0)
        size = request.page_size or 50
        response = ListLogEntriesResponse()
        for e in found[start:start + size]:
            entry = response.entries.add(log_name=e["_fields"]["logName"], text_payload=e["line"],
                                         insert_id=f"{e['rev']}-{e['index']:06d}")
            entry.resource.type = e["kind"]
            entry.resource.labels.update(e["labels"])
            entry.labels.update(e["entry_labels"])
            entry.timestamp.FromDatetime(e["_time"])
        if start + size < len(found):
            response.next_page_token = str(start + size)
        return response
