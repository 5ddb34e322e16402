"""Starting and reading Cloud Run job executions (Run v2 REST), for training in job mode.

A serving instance deployed with `--training job` starts an execution of its training job for a
Label Studio project (`RunJobs.run`) and reads executions (`RunJobs.get`). Only google-auth and
requests are used (they come with the `gcs` extra that images install); google-cloud-run is a
deploy-side dependency and never imported here.

    POST {endpoint}/v2/{job}:run   {"overrides": {"containerOverrides": [{"args": [...]}], "taskCount": 1}}
    GET  {endpoint}/v2/{execution}

The endpoint is CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN when set (a plain http:// address is called
with no credentials: an emulator or a test fake), else https://run.googleapis.com with
Application Default Credentials (the metadata server on Cloud Run). Google's errors become a
`RunApiError` whose message names the permission, role or API to fix and whose `status` is the
HTTP status the server answers with (500: a deployment to fix; 503: try again later).
"""
from __future__ import annotations

import re
import time
from typing import Optional

DEFAULT_ENDPOINT = "https://run.googleapis.com"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
JOB_NAME = re.compile(r"^projects/([^/]+)/locations/([^/]+)/jobs/([a-z]([-a-z0-9]{0,61}[a-z0-9])?)$")
TIMEOUT = 30.0          # one request
OPERATION_WAIT = 10.0   # how long `run` waits for the execution's name when the operation lacks it
RUN_ROLE = "roles/run.jobsExecutorWithOverrides"  # run.jobs.run, run.jobs.runWithOverrides
READ_ROLE = "roles/run.viewer"                     # run.executions.get


class RunApiError(Exception):
    """A Run API call failed; the message says what to do."""

    def __init__(self, message: str, status: int = 503, retry_after: Optional[int] = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def check_job_name(name: str) -> str:
    if not isinstance(name, str) or not JOB_NAME.match(name):
        raise ValueError(f"LSDEPLOY_TRAINING_JOB={name!r} is not a Cloud Run job name: it must be "
                         "projects/PROJECT/locations/REGION/jobs/JOB (deploy gcp --training job sets it)")
    return name


def short_name(name: str) -> str:
    return str(name).rstrip("/").rsplit("/", 1)[-1]


class RunJobs:
    """The Run v2 calls of one training job (`projects/P/locations/R/jobs/J`)."""

    def __init__(self, job: str, endpoint: Optional[str] = None, session=None):
        self.job = check_job_name(job)
        self.endpoint = (endpoint or DEFAULT_ENDPOINT).rstrip("/")
        self._session = session

    @classmethod
    def from_env(cls, job: str, environ) -> "RunJobs":
        return cls(job, environ.get("CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN") or None)

    @property
    def session(self):
        if self._session is None:
            if self.endpoint.startswith("http://"):  # an emulator or fake: anonymous, like STORAGE_EMULATOR_HOST
                import requests

                self._session = requests.Session()
            else:
                import google.auth
                from google.auth.exceptions import DefaultCredentialsError
                from google.auth.transport.requests import AuthorizedSession

                try:
                    credentials, _ = google.auth.default(scopes=[SCOPE])
                except DefaultCredentialsError as exc:
                    raise RunApiError(f"no Google credentials to start training executions ({exc}); on Cloud Run the "
                                      "service account provides them", 500) from None
                self._session = AuthorizedSession(credentials)
        return self._session

    def _url(self, name: str) -> str:
        base = self.endpoint if self.endpoint.endswith("/v2") else self.endpoint + "/v2"
        return f"{base}/{name}"

    def run(self, project: str, directory: str = "/app") -> str:
        """Start an execution training Label Studio project `project`; its name."""
        body = {"overrides": {"containerOverrides": [{"args": ["train", directory, "--project", str(project)]}],
                              "taskCount": 1}}
        operation = self._call("POST", self.job + ":run", "run", json=body)
        deadline = time.monotonic() + OPERATION_WAIT
        while True:
            name = _execution_of(operation)
            if name:
                return name
            if operation.get("done") or not operation.get("name") or time.monotonic() >= deadline:
                error = (operation.get("error") or {}).get("message")
                raise RunApiError(f"the Run API did not start an execution of {self.job}"
                                  f"{': ' + error if error else ' (its operation names none)'}", 503, 30)
            time.sleep(0.5)
            operation = self._call("GET", operation["name"], "get")

    def get(self, execution: str) -> Optional[dict]:
        """The execution resource, or None when it does not exist (any more)."""
        try:
            return self._call("GET", execution, "get")
        except RunApiError as exc:
            if exc.status == 404:
                return None
            raise

    def _call(self, method: str, name: str, what: str, **kwargs) -> dict:
        import requests

        try:
            response = self.session.request(method, self._url(name), timeout=TIMEOUT, **kwargs)
        except requests.RequestException as exc:
            raise RunApiError(f"the Cloud Run Admin API ({self.endpoint}) did not answer: {type(exc).__name__}; "
                              "the event stays queued and an execution is started once it answers", 503, 10) from None
        if response.status_code < 300:
            try:
                return response.json()
            except ValueError:
                raise RunApiError(f"the Cloud Run Admin API answered HTTP {response.status_code} without JSON", 503,
                                  10) from None
        raise self._error(response, name, what)

    def _error(self, response, name: str, what: str) -> RunApiError:
        try:
            error = response.json().get("error") or {}
        except ValueError:
            error = {}
        message = error.get("message") or response.reason or ""
        status = error.get("status") or ""
        reasons = {d.get("reason") for d in error.get("details") or () if isinstance(d, dict)}
        code = response.status_code
        said = f"(Google said: HTTP {code} {status}: {message[:300]})"
        if "SERVICE_DISABLED" in reasons or "API has not been used" in message or "is disabled" in message:
            return RunApiError(f"the Cloud Run Admin API (run.googleapis.com) is disabled in the project of {self.job}: "
                               f"enable it (gcloud services enable run.googleapis.com) {said}", 500)
        if code == 403 and what == "run":
            return RunApiError(f"the service's account may not start executions of the training job {self.job}: it "
                               f"needs run.jobs.runWithOverrides on the job; grant it {RUN_ROLE} on the job (deploy "
                               f"gcp --training job does) {said}", 500)
        if code == 403:
            return RunApiError(f"the service's account may not read {name}: it needs run.executions.get on the job; "
                               f"grant it {READ_ROLE} on the job (deploy gcp --training job does; the executor "
                               f"roles do not include it) {said}", 500)
        if code == 401:
            return RunApiError(f"the Run API refused the service's credentials {said}", 500)
        if code == 404:
            return RunApiError(f"{name} does not exist: deploy again with --training job, which creates the training "
                               f"job {short_name(self.job)} {said}", 404 if what == "get" else 500)
        if code == 429 or status == "RESOURCE_EXHAUSTED":
            return RunApiError(f"the Run API's quota for {self.job} is exhausted: the event stays queued and an "
                               f"execution is started once the quota allows {said}", 503, 60)
        if code >= 500:
            return RunApiError(f"the Run API failed {said}; the event stays queued", 503, 10)
        return RunApiError(f"the Run API refused to {what} {name} {said}", 500)


def _execution_of(operation: dict) -> Optional[str]:
    """The execution a jobs.run operation started: its metadata (or response) is the Execution."""
    for part in ("metadata", "response"):
        value = operation.get(part)
        if isinstance(value, dict) and "/executions/" in str(value.get("name") or ""):
            return value["name"]
    return None


def execution_state(execution: Optional[dict]) -> str:
    """running, succeeded, failed, cancelled or pending; "gone" when it no longer exists."""
    if execution is None:
        return "gone"
    if int(execution.get("cancelledCount") or 0) > 0:
        return "cancelled"
    completed = next((c for c in execution.get("conditions") or () if c.get("type") == "Completed"), None)
    if execution.get("completionTime") or (completed or {}).get("state") in ("CONDITION_SUCCEEDED",
                                                                               "CONDITION_FAILED"):
        if int(execution.get("failedCount") or 0) > 0 and not int(execution.get("succeededCount") or 0):
            return "failed"
        if (completed or {}).get("state") == "CONDITION_FAILED":
            return "failed"
        return "succeeded"
    if int(execution.get("runningCount") or 0) > 0 or execution.get("startTime"):
        return "running"
    return "pending"


def ended(state: str) -> bool:
    return state in ("succeeded", "failed", "cancelled", "gone")


def view(execution: Optional[dict], name: str) -> dict:
    """GET /jobs/<execution name>: what the server shows of an execution."""
    state = execution_state(execution)
    shown = {"job": name, "kind": "execution", "state": state}
    if execution:
        for source, target in (("createTime", "created_at"), ("startTime", "started_at"),
                               ("completionTime", "finished_at"), ("logUri", "log_uri")):
            if execution.get(source):
                shown[target] = execution[source]
        shown["tasks"] = {key[:-5]: int(execution.get(key) or 0) for key in (
            "runningCount", "succeededCount", "failedCount", "retriedCount", "cancelledCount")}
    return shown
