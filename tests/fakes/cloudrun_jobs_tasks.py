"""A Cloud Run job execution's tasks (cloudrun_jobs.py starts one thread per execution with
`run_execution`).

Each attempt of each task runs the real image in the container engine where the FakeGoogleCloud has
one and the image was really built (cloudrun_jobs_containers.py), else as a local process from a
fresh copy of the image's source bundle (runner.py unpacks it and reads the Dockerfile, as for a
revision); either way with the job's env and its secrets resolved (a
secret its service account may not read fails the execution as Cloud Run does), Cloud Run's job
variables and no PORT, and the Run endpoint of the job's service account as
CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN. A non-zero exit, a kill, or running past the task timeout
fails the attempt; the task is retried up to max_retries times. The execution's counts, conditions
and completion time follow what happened, as GetExecution shows them on Google.
"""
from __future__ import annotations

import signal
import subprocess
import time

from .cloudrun_jobs_containers import ContainerAttempt, signal_attempt, stop_attempt
from .runner import RevisionProcess
from .server import ApiError, etag_of, now_pb


def _resolve_env(fake, estate, project: str):
    """The task's env from the job's container (secrets read as its service account) and the
    overrides; (env, None) or (None, failure message)."""
    template = estate.message.template
    container = template.containers[0]
    account = template.service_account
    secrets = fake.cloud.secretmanager
    env = {}
    for index, var in enumerate(list(container.env) + list(estate.env)):
        if var.HasField("value_source"):
            ref = var.value_source.secret_key_ref
            secret = ref.secret if ref.secret.startswith("projects/") else f"projects/{project}/secrets/{ref.secret}"
            version = ref.version or "latest"
            canonical = f"{secrets.canonical(secret)}/versions/{version}"
            if fake.cloud.run.require_secret_access and secrets.canonical(secret) in secrets.secrets \
                    and not secrets.can_access(secret, f"serviceAccount:{account}"):
                return None, (f"spec.template.spec.containers[0].env[{index}].value_from.secret_key_ref.name: "
                              f"Permission denied on secret: {canonical} for Execution service account {account}. "
                              f"The service account used must be granted the 'Secret Manager Secret Accessor' role "
                              f"(roles/secretmanager.secretAccessor) at the secret, project or higher level.")
            try:
                env[var.name] = secrets.value(secret, version).decode()
            except ApiError:
                return None, f"Secret {canonical} was not found"
        else:
            env[var.name] = var.value
    return env, None


def _update(fake, estate, **counts) -> None:
    with fake.cloud.server.lock:
        message = estate.message
        for key, value in counts.items():
            setattr(message, key, value)
        now_pb(message.update_time)
        message.etag = etag_of(message)


def _finish(fake, estate, outcome: str, text: str) -> None:
    """outcome: succeeded | failed | cancelled."""
    from google.cloud import run_v2

    Condition = run_v2.Condition.pb()
    with fake.cloud.server.lock:
        message = estate.message
        message.reconciling = False
        message.running_count = 0
        now_pb(message.completion_time)
        del message.conditions[:]
        for kind in ("ResourcesAvailable", "Started"):
            c = message.conditions.add(type_=kind, state=Condition.State.CONDITION_SUCCEEDED)
            now_pb(c.last_transition_time)
        completed = message.conditions.add(type_="Completed", message=text, state=(
            Condition.State.CONDITION_SUCCEEDED if outcome == "succeeded" else Condition.State.CONDITION_FAILED))
        if outcome == "failed":
            completed.execution_reason = Condition.ExecutionReason.NON_ZERO_EXIT_CODE
        elif outcome == "cancelled":
            completed.execution_reason = Condition.ExecutionReason.CANCELLED
        now_pb(completed.last_transition_time)
        message.etag = etag_of(message)
        job_state = fake.jobs.get(message.name.split("/executions/")[0])
        if job_state is not None and job_state.message.latest_created_execution.name == message.name:
            latest = job_state.message.latest_created_execution
            latest.completion_time.CopyFrom(message.completion_time)
            latest.completion_status = {"succeeded": 1, "failed": 2, "cancelled": 4}[outcome]
            job_state.message.etag = etag_of(job_state.message)
    with estate.started:
        estate.proc = None
        estate.started.notify_all()
    estate.done.set()


def _attempt(fake, estate, image, env: dict, index: int, attempt: int) -> int | None:
    """One attempt of task `index`; its exit code (negative: killed by that signal), None on timeout."""
    template = estate.message.template
    container = template.containers[0]
    execution_id = estate.message.name.rsplit("/", 1)[-1]
    task_env = dict(env)
    task_env.update({"CLOUD_RUN_JOB": estate.message.job, "CLOUD_RUN_EXECUTION": execution_id,
                     "CLOUD_RUN_TASK_INDEX": str(index), "CLOUD_RUN_TASK_ATTEMPT": str(attempt),
                     "CLOUD_RUN_TASK_COUNT": str(estate.message.task_count)})
    extra = {**fake.cloud.run.extra_env, **fake.caller_env(template.service_account), **fake.task_env}
    args = list(container.args) if estate.args is None else estate.args
    label = f"{execution_id}-task{index}-attempt{attempt}"
    if fake.cloud.engine is not None and image.local:  # the real image, in the container engine
        if container.working_dir:
            raise ValueError("the lsdeploy fake runs real images in their own WORKDIR: a job that overrides "
                             "`working_dir` needs the process runner (FakeGoogleCloud(engine=None))")
        estate.log_path = str(fake.cloud.workdir / f"{execution_id}.log")
        proc = ContainerAttempt(fake.cloud.engine, image.local, label, list(container.command), args,
                                {**extra, **task_env}, estate.log_path)
    else:
        proc = _process(fake, estate, image, label, {"command": list(container.command), "args": args,
                                                     "working_dir": container.working_dir}, task_env, extra)
    if fake.freeze_attempts:
        signal_attempt(proc, signal.SIGSTOP)
    with estate.started:
        estate.proc, estate.attempt = proc, attempt
        estate.started.notify_all()
    try:
        code = proc.wait(timeout=estate.timeout)
    except subprocess.TimeoutExpired:
        stop_attempt(proc, 10)  # Cloud Run stops an attempt past the task timeout
        code = None
    if isinstance(proc, ContainerAttempt):
        proc.finish(f"--- task {index} attempt {attempt} ({proc.image}): "
                    + ("stopped past the task timeout" if code is None else f"exit code {code}"))
    estate.attempts.append((index, attempt, code))
    return code


def _process(fake, estate, image, label: str, spec: dict, task_env: dict, extra: dict) -> subprocess.Popen:
    """The attempt as a local process from a fresh copy of the image's source bundle."""
    helper = RevisionProcess(label, image.bundle, {**spec, "dockerfile": image.dockerfile}, task_env, {},
                             fake.cloud.workdir, extra_env=extra)
    argv, process_env, cwd = helper.argv_and_env()
    process_env.pop("PORT", None)  # a job task listens on nothing
    process_env.pop("HOST", None)
    estate.log_path = str(helper.log_path)
    with open(helper.log_path, "ab") as log:
        return subprocess.Popen(argv, cwd=cwd, env=process_env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def run_execution(fake, estate, project: str) -> None:
    """Run every task of the execution in turn, with retries; then mark it done."""
    template = estate.message.template
    container = template.containers[0]
    image = fake.cloud.artifactregistry.resolve(container.image)
    if image is None:
        _finish(fake, estate, "failed", f"Image '{container.image}' not found.")
        return
    env, failure = _resolve_env(fake, estate, project)
    if failure:
        _finish(fake, estate, "failed", failure)
        return
    with fake.cloud.server.lock:
        now_pb(estate.message.start_time)
    retries = template.max_retries
    succeeded = failed = retried = 0
    failed_index = None
    for index in range(estate.message.task_count or 1):
        for attempt in range(retries + 1):
            if estate.cancelled:
                break
            _update(fake, estate, running_count=1, succeeded_count=succeeded, failed_count=failed,
                    retried_count=retried)
            try:
                code = _attempt(fake, estate, image, env, index, attempt)
            except (OSError, RuntimeError, ValueError) as exc:
                _finish(fake, estate, "failed", f"The task could not be started: {exc}")
                return
            if code == 0:
                succeeded += 1
                break
            if estate.cancelled:
                break
            if attempt < retries:
                retried += 1
                time.sleep(0.1)  # Cloud Run starts the next attempt after a backoff
            else:
                failed += 1
                failed_index = index
        _update(fake, estate, running_count=0, succeeded_count=succeeded, failed_count=failed, retried_count=retried)
        if estate.cancelled:
            break
    if estate.cancelled:
        cancelled = (estate.message.task_count or 1) - succeeded - failed
        _update(fake, estate, cancelled_count=cancelled)
        _finish(fake, estate, "cancelled", "The execution was cancelled.")
    elif failed:
        last = estate.attempts[-1][2] if estate.attempts else None
        why = "it exceeded the task timeout" if last is None else f"its container exited with code {last}"
        _finish(fake, estate, "failed", f"Task {fake_task_name(estate, failed_index)} failed: {why}; "
                                        f"{failed} of {estate.message.task_count} task(s) failed.")
    else:
        _finish(fake, estate, "succeeded", f"Execution completed successfully in {retried} retried attempt(s).")


def fake_task_name(estate, index: int) -> str:
    return f"{estate.message.name.rsplit('/', 1)[-1]}-task{index}"
