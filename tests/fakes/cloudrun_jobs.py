"""Cloud Run Admin API v2 fake, jobs: create / get / update / delete / list, RunJob (with overrides),
executions get / list / cancel, job IAM policies, long-running operations.

What it does like the real API:
- validates a job (cloudrun_jobs_rules.py: ids, CPU and memory, GPUs for jobs, task timeout up to
  168 h (1 h with a GPU), 0-10 retries, reserved env names) and the overrides of RunJob, and fills in
  the defaults a GetJob shows; `generation` changes only when the spec does;
- RunJob needs `run.jobs.run`, and with overrides `run.jobs.runWithOverrides`: the deployer holds
  what `cloud.deployer` says; a caller that is a service account (a revision or a job task, below)
  holds what the job's IAM policy grants it (roles/run.jobsExecutorWithOverrides, .jobsExecutor,
  .invoker, .developer, .admin; propagated through `cloud.iam`); GetExecution needs
  `run.executions.get` (roles/run.viewer, .developer, .admin). Refusals are Google's 403
  IAM_PERMISSION_DENIED naming the permission;
- an execution really runs its tasks, one at a time: as the real image in the container engine when
  the FakeGoogleCloud has one (`engine=`) and the image was really built (cloudrun_jobs_containers.py:
  the job's command as ENTRYPOINT, its args, host network, env through a 0600 file), else as local
  processes from the source bundle its image was built from (runner.py's bundle and Dockerfile
  handling); either way with the job's env and resolved
  secrets and Cloud Run's job variables (`CLOUD_RUN_JOB`, `CLOUD_RUN_EXECUTION`,
  `CLOUD_RUN_TASK_INDEX`, `CLOUD_RUN_TASK_ATTEMPT`, `CLOUD_RUN_TASK_COUNT`; no `PORT`); a non-zero
  exit is retried up to max_retries, an attempt past the task timeout is killed and counts as failed;
  the execution's counts and conditions (`Completed`, `Started`, `ResourcesAvailable`) follow, and its
  RunJob operation is done when the execution is;
- who calls: requests through the main port are the deployer's; `caller_url(account)` is a front on
  its own port whose requests are the service account's (what the metadata server's token is on
  Google). Revisions and job tasks get theirs as `CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN`.

Tests: `kill_task(execution)` SIGKILLs the running attempt, process group or container (the
execution retries it; the attempt records -9);
`wait_attempt(execution, attempt)` waits for an attempt to have started; with `freeze_attempts`
on, each new attempt is stopped (SIGSTOP, sent to its container too) as it starts, so that a kill
lands on a running attempt whatever the machine's speed (turn it off before the retry starts).
"""
from __future__ import annotations

import random
import re
import signal
import string
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.cloud import run_v2
from google.iam.v1 import iam_policy_pb2, policy_pb2

from .cloudrun_jobs_containers import signal_attempt, stop_attempt
from .cloudrun_jobs_rules import fill_defaults, validate_job, validate_overrides
from .iam import read_policy, write_policy
from .server import (ApiError, already_exists, carry_over, etag_of, not_found, now_pb, paginate,
                     permission_denied_error, project_number, routes_from_transport)

Job = run_v2.Job.pb()
Execution = run_v2.Execution.pb()
Condition = run_v2.Condition.pb()
SUCCEEDED = Condition.State.CONDITION_SUCCEEDED
FAILED = Condition.State.CONDITION_FAILED
PENDING = Condition.State.CONDITION_PENDING
OUTPUT_ONLY = ("uid", "generation", "create_time", "update_time", "delete_time", "expire_time", "creator",
               "last_modifier", "observed_generation", "terminal_condition", "conditions", "execution_count",
               "latest_created_execution", "reconciling", "satisfies_pzs", "etag")
RUN_ROLES = ("roles/run.jobsExecutorWithOverrides", "roles/run.jobsExecutor", "roles/run.invoker",
             "roles/run.developer", "roles/run.admin", "roles/owner", "roles/editor")
OVERRIDE_ROLES = ("roles/run.jobsExecutorWithOverrides", "roles/run.developer", "roles/run.admin", "roles/owner",
                  "roles/editor")
READ_ROLES = ("roles/run.viewer", "roles/run.developer", "roles/run.admin", "roles/owner", "roles/editor",
              "roles/viewer")
ADMIN_ROLES = ("roles/run.admin", "roles/owner")
_caller = threading.local()  # .account: the service account a front's request comes from


@dataclass
class JobState:
    message: object  # Job
    policy: object = field(default_factory=policy_pb2.Policy)
    executions: int = 0


@dataclass
class ExecutionState:
    message: object  # Execution
    job: object      # the Job as it was when run (its spec)
    args: list | None = None       # overridden args (None: the job's)
    env: list = field(default_factory=list)
    timeout: int = 600
    proc: object = None  # the running attempt: a subprocess.Popen, or a ContainerAttempt (real image)
    attempt: int = -1
    attempts: list = field(default_factory=list)  # (task index, attempt, exit code or signal)
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    started: threading.Condition = field(default_factory=threading.Condition)
    log_path: str = ""


class CallerFront:
    """http://127.0.0.1:<port> on which every request is the service account's."""

    def __init__(self, server, account: str):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002
                pass

            def _serve(self):
                _caller.account = account
                try:
                    server.dispatch(self)
                finally:
                    _caller.account = None

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _serve

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                         name=f"caller-{account}").start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class CloudRunJobsFake:
    api = "run"

    def __init__(self, cloud):
        self.cloud = cloud
        self.jobs: dict[str, JobState] = {}
        self.executions: dict[str, ExecutionState] = {}
        self.fronts: dict[str, CallerFront] = {}
        self.task_env: dict[str, str] = {}  # env every task process gets besides cloud.run.extra_env
        self.freeze_attempts = False  # tests: each new attempt is stopped (SIGSTOP) as it starts, to be killed
        server = cloud.server
        server.add_routes(routes_from_transport(
            self.api, "google.cloud.run_v2.services.jobs.transports.rest", "JobsRestTransport"))
        server.add_routes(routes_from_transport(
            self.api, "google.cloud.run_v2.services.executions.transports.rest", "ExecutionsRestTransport"))
        for method in ("CreateJob", "GetJob", "UpdateJob", "DeleteJob", "ListJobs", "RunJob", "GetExecution",
                       "ListExecutions", "CancelExecution"):
            server.handle(self.api, method)(getattr(self, method))
        # the IAM methods share their names with the services': a job's resource goes to the job
        for method in ("GetIamPolicy", "SetIamPolicy", "TestIamPermissions"):
            services = server.handlers.get((self.api, method))
            jobs = getattr(self, f"Job{method}")
            server.handlers[(self.api, method)] = (
                lambda request, ctx, s=services, j=jobs: (j if "/jobs/" in request.resource else s)(request, ctx))

    # ---- who calls -------------------------------------------------------------------------
    def caller_url(self, account: str) -> str:
        """The Run endpoint whose requests are `account`'s (started once per account)."""
        with self.cloud.server.lock:
            if account not in self.fronts:
                self.fronts[account] = CallerFront(self.cloud.server, account)
            return self.fronts[account].url

    def caller_env(self, account: str) -> dict:
        return {"CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN": self.caller_url(account) + "/"}

    @staticmethod
    def caller() -> str | None:
        return getattr(_caller, "account", None)

    def _require(self, state: JobState, permission: str, roles: tuple) -> None:
        account = self.caller()
        if account is None:
            held = self.cloud.deployer is None or permission in self.cloud.deployer
        else:
            held = self.cloud.iam.effective(state.message.name, state.policy, f"serviceAccount:{account}", roles)
        if not held:
            raise permission_denied_error(permission, state.message.name)

    # ---- inspection and faults ----------------------------------------------------------------
    def job(self, job_id: str):
        for name, state in self.jobs.items():
            if name.rsplit("/", 1)[-1] == job_id:
                return state.message
        raise KeyError(job_id)

    def execution(self, execution_id: str | None = None) -> ExecutionState:
        """An execution by id, or the newest."""
        with self.cloud.server.lock:
            states = [s for n, s in self.executions.items() if execution_id in (None, n.rsplit("/", 1)[-1])]
        if not states:
            raise KeyError(execution_id or "no execution")
        return max(states, key=lambda s: s.message.create_time.ToNanoseconds())

    def wait_attempt(self, execution_id: str | None = None, attempt: int = 0, timeout: float = 60.0) -> ExecutionState:
        """Wait until the execution's task has started attempt `attempt` (its process is running)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                state = self.execution(execution_id)
            except KeyError:
                time.sleep(0.05)
                continue
            with state.started:
                if state.attempt >= attempt and state.proc is not None:
                    return state
                state.started.wait(min(0.5, max(0.0, deadline - time.monotonic())))
        raise TimeoutError(f"attempt {attempt} of execution {execution_id or '(newest)'} did not start in {timeout} s")

    def kill_task(self, execution_id: str | None = None) -> int:
        """SIGKILL the running attempt's process group or container (a crash: the execution retries
        the task; the attempt records -9). Returns the attempt killed."""
        state = self.execution(execution_id)
        with state.started:
            proc, attempt = state.proc, state.attempt
        if proc is None or proc.poll() is not None:
            raise RuntimeError("no task attempt is running")
        signal_attempt(proc, signal.SIGKILL)
        return attempt

    def close(self) -> None:
        for state in list(self.executions.values()):
            state.cancelled = True
            if state.proc is not None:
                stop_attempt(state.proc, 5)
        for front in self.fronts.values():
            front.stop()
        self.fronts.clear()

    # ---- jobs ----------------------------------------------------------------------------------
    def _state(self, name: str) -> JobState:
        state = self.jobs.get(name)
        if state is None:
            raise not_found(f"Resource '{name.rsplit('/', 1)[-1]}' of kind 'JOB' in region "
                            f"'{name.split('/')[3] if name.count('/') >= 3 else '?'}' in project "
                            f"'{name.split('/')[1] if name.count('/') >= 1 else '?'}' does not exist.")
        return state

    def _check_act_as(self, job, project: str) -> None:
        account = job.template.template.service_account or f"{project_number(project)}-compute@developer.gserviceaccount.com"
        if not self.cloud.iamadmin.holds(account, "iam.serviceAccounts.actAs"):
            raise permission_denied_error("iam.serviceaccounts.actAs", f"projects/-/serviceAccounts/{account}")

    def _operation(self, location: str, snapshot, check=None, polls: int | None = None):
        name = f"{location}/operations/{self.cloud.server.operation_id()}"
        return self.cloud.server.new_operation(name, self.api, snapshot, check or snapshot, polls_needed=polls).to_pb()

    def _copy(self, message, cls=Job):
        copy = cls()
        copy.CopyFrom(message)
        return copy

    def CreateJob(self, request, ctx):
        m = re.fullmatch(r"projects/([^/]+)/locations/([^/]+)", request.parent)
        if not m:
            raise not_found(f"Location {request.parent} not found.")
        project, region = m.groups()
        name = f"{request.parent}/jobs/{request.job_id}"
        job = self._copy(request.job)
        for f in OUTPUT_ONLY:
            job.ClearField(f)
        validate_job(job, "CreateJobRequest", request.job_id, True, region)
        self._check_act_as(job, project)
        if name in self.jobs:
            raise already_exists(f"Resource '{request.job_id}' already exists.")
        job.name = name
        fill_defaults(job, project)
        if request.validate_only:
            return self._operation(request.parent, lambda: job, polls=0)
        job.uid = str(uuid.uuid4())
        job.generation = job.observed_generation = 1
        job.creator = job.last_modifier = self.cloud.caller.split(":", 1)[-1]
        now_pb(job.create_time)
        now_pb(job.update_time)
        self._ready(job)
        state = JobState(job)
        self.jobs[name] = state
        return self._operation(request.parent, lambda: self._copy(state.message))

    @staticmethod
    def _ready(job) -> None:
        job.terminal_condition.Clear()
        job.terminal_condition.type_ = "Ready"
        job.terminal_condition.state = SUCCEEDED
        now_pb(job.terminal_condition.last_transition_time)
        job.etag = etag_of(job)

    def UpdateJob(self, request, ctx):
        name = request.job.name
        m = re.fullmatch(r"(projects/([^/]+)/locations/([^/]+))/jobs/([^/]+)", name)
        if m is None:
            raise not_found(f"Job {name} not found.")
        if name not in self.jobs and request.allow_missing:
            create = run_v2.CreateJobRequest.pb()(parent=m.group(1), job=request.job, job_id=m.group(4),
                                                  validate_only=request.validate_only)
            create.job.ClearField("name")
            return self.CreateJob(create, ctx)
        state = self._state(name)
        current = state.message
        if request.job.etag and request.job.etag != current.etag:
            raise ApiError("ABORTED", f"Resource '{m.group(4)}' has been modified: the etag in the request does not "
                                      f"match the current one. Get the job again and retry.")
        updated = self._copy(request.job)
        for f in OUTPUT_ONLY:
            updated.ClearField(f)
        validate_job(updated, "UpdateJobRequest", m.group(4), False, m.group(3))
        self._check_act_as(updated, m.group(2))
        updated.name = name
        fill_defaults(updated, m.group(2))
        if request.validate_only:
            return self._operation(m.group(1), lambda: updated, polls=0)
        spec = self._copy(current)
        for f in OUTPUT_ONLY:
            spec.ClearField(f)
        if spec == updated:  # nothing changed: no new generation
            return self._operation(m.group(1), lambda: self._copy(state.message))
        carry_over(current, updated, OUTPUT_ONLY)  # the server's fields; the new generation updates some
        updated.generation = updated.observed_generation = current.generation + 1
        updated.last_modifier = self.cloud.caller.split(":", 1)[-1]
        now_pb(updated.update_time)
        self._ready(updated)
        state.message = updated
        return self._operation(m.group(1), lambda: self._copy(state.message))

    def GetJob(self, request, ctx):
        state = self._state(request.name)
        self._require(state, "run.jobs.get", READ_ROLES)
        return state.message

    def ListJobs(self, request, ctx):
        jobs = [s.message for n, s in sorted(self.jobs.items()) if n.startswith(request.parent + "/jobs/")]
        page, token = paginate(jobs, request.page_size, request.page_token)
        return run_v2.ListJobsResponse.pb()(jobs=page, next_page_token=token)

    def DeleteJob(self, request, ctx):
        state = self._state(request.name)
        if request.etag and request.etag != state.message.etag:
            raise ApiError("ABORTED", "The etag in the request does not match the current one.")
        job = self._copy(state.message)
        if request.validate_only:
            return self._operation(request.name.split("/jobs/")[0], lambda: job, polls=0)
        now_pb(job.delete_time)
        del self.jobs[request.name]
        for name in [n for n, e in self.executions.items() if e.message.job == request.name.rsplit("/", 1)[-1]
                     and n.startswith(request.name + "/")]:
            execution = self.executions.pop(name)
            execution.cancelled = True
            if execution.proc is not None:
                threading.Thread(target=stop_attempt, args=(execution.proc, 10), daemon=True).start()
        return self._operation(request.name.split("/jobs/")[0], lambda: job)

    # ---- IAM on jobs ---------------------------------------------------------------------------
    def JobGetIamPolicy(self, request, ctx):
        state = self._state(request.resource)
        self._require(state, "run.jobs.getIamPolicy", ADMIN_ROLES)
        return read_policy(state.policy)

    def JobSetIamPolicy(self, request, ctx):
        state = self._state(request.resource)
        self._require(state, "run.jobs.setIamPolicy", ADMIN_ROLES)
        for binding in request.policy.bindings:
            if binding.role.startswith("roles/") and not binding.role.startswith(("roles/run.", "roles/owner",
                                                                                  "roles/editor", "roles/viewer")):
                raise ApiError("INVALID_ARGUMENT", f"Role {binding.role} is not supported for this resource.")
        before = state.policy
        state.policy = write_policy(state.policy, request)
        self.cloud.iam.record(request.resource, before, state.policy)
        return state.policy

    def JobTestIamPermissions(self, request, ctx):
        self._state(request.resource)
        held = self.cloud.deployer
        return iam_policy_pb2.TestIamPermissionsResponse(
            permissions=[p for p in request.permissions if held is None or p in held])

    # ---- executions ----------------------------------------------------------------------------
    def RunJob(self, request, ctx):
        state = self._state(request.name)
        self._require(state, "run.jobs.run", RUN_ROLES)
        overridden = request.HasField("overrides")
        if overridden:
            self._require(state, "run.jobs.runWithOverrides", OVERRIDE_ROLES)
            validate_overrides(state.message, request.overrides)
        if request.etag and request.etag != state.message.etag:
            raise ApiError("ABORTED", "The etag in the request does not match the current one.")
        if request.validate_only:
            return self._operation(request.name.split("/jobs/")[0], lambda: Execution(), polls=0)
        job = state.message
        state.executions += 1
        job_id = request.name.rsplit("/", 1)[-1]
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        name = f"{request.name}/executions/{job_id}-{suffix}"
        execution_id = name.rsplit("/", 1)[-1]
        project = request.name.split("/")[1]
        execution = Execution(name=name, uid=str(uuid.uuid4()), generation=1, job=job_id,
                              launch_stage=job.launch_stage, creator=self.caller() or self.cloud.caller.split(":")[-1],
                              parallelism=job.template.parallelism, task_count=job.template.task_count,
                              reconciling=True, observed_generation=1)
        execution.template.CopyFrom(job.template.template)
        execution.labels.update(job.template.labels)
        timeout = job.template.template.timeout.seconds or 600
        args, env = None, []
        if overridden:
            o = request.overrides
            if o.task_count:
                execution.task_count = o.task_count
            if o.HasField("timeout"):
                timeout = o.timeout.seconds
                execution.template.timeout.CopyFrom(o.timeout)
            for co in o.container_overrides:
                args = [] if co.clear_args else (list(co.args) if co.args else args)
                env = list(co.env)
        now_pb(execution.create_time)
        now_pb(execution.update_time)
        execution.log_uri = (f"https://console.cloud.google.com/logs/viewer?project={project}&advancedFilter="
                             f"resource.type%3D%22cloud_run_job%22%0Alabels.%22run.googleapis.com/execution_name%22"
                             f"%3D%22{execution_id}%22")
        execution.conditions.add(type_="Completed", state=PENDING)
        execution.etag = etag_of(execution)
        estate = ExecutionState(execution, self._copy(job), args, env, timeout)
        self.executions[name] = estate
        job.execution_count = state.executions
        latest = job.latest_created_execution
        latest.Clear()
        latest.name = name
        latest.create_time.CopyFrom(execution.create_time)
        job.etag = etag_of(job)
        threading.Thread(target=self._run, args=(estate, project), name=f"execution-{execution_id}",
                         daemon=True).start()

        return self._operation(request.name.split("/jobs/")[0], lambda: self._copy(estate.message, Execution),
                               lambda: self._outcome(estate))

    def _outcome(self, estate: ExecutionState, failures: bool = True):
        """The RunJob operation (`failures`) and the CancelExecution one: pending until the execution has
        ended, then the Execution, or for RunJob the failure of a failed or cancelled execution (the
        Completed condition's message)."""
        if not estate.done.is_set():
            return None
        message = self._copy(estate.message, Execution)
        completed = next((c for c in message.conditions if c.type_ == "Completed"), None)
        if failures and completed is not None and completed.state == FAILED:
            return ApiError("FAILED_PRECONDITION", completed.message)
        return message

    def _execution_state(self, name: str) -> ExecutionState:
        estate = self.executions.get(name)
        if estate is None:
            raise not_found(f"Resource '{name.rsplit('/', 1)[-1]}' of kind 'EXECUTION' does not exist.")
        return estate

    def GetExecution(self, request, ctx):
        estate = self._execution_state(request.name)
        job = self.jobs.get(request.name.split("/executions/")[0])
        if job is not None:
            self._require(job, "run.executions.get", READ_ROLES)
        return estate.message

    def ListExecutions(self, request, ctx):
        if request.parent not in self.jobs and not request.parent.endswith("/jobs/-"):
            self._state(request.parent)
        states = [s for n, s in self.executions.items()
                  if n.startswith(request.parent + "/executions/") or request.parent.endswith("/jobs/-")]
        messages = sorted((s.message for s in states), key=lambda m: m.create_time.ToNanoseconds(), reverse=True)
        page, token = paginate(messages, request.page_size, request.page_token)
        return run_v2.ListExecutionsResponse.pb()(executions=page, next_page_token=token)

    def CancelExecution(self, request, ctx):
        estate = self._execution_state(request.name)
        job = self.jobs.get(request.name.split("/executions/")[0])
        if job is not None:
            self._require(job, "run.executions.cancel", RUN_ROLES)
        if not estate.done.is_set():
            estate.cancelled = True
            if estate.proc is not None:
                threading.Thread(target=stop_attempt, args=(estate.proc, 10), daemon=True).start()

        return self._operation(request.name.split("/jobs/")[0], lambda: self._copy(estate.message, Execution),
                               lambda: self._outcome(estate, failures=False))

    # ---- running an execution --------------------------------------------------------------------
    def _run(self, estate: ExecutionState, project: str) -> None:
        from .cloudrun_jobs_tasks import run_execution

        run_execution(self, estate, project)
