"""The training job (`deploy gcp --training job`): a Cloud Run v2 job `<service>-train` that runs
`label-studio-ml train /app` from the serving revision's image, with the service's state bucket,
environment, secrets and service account, and its own resources.

What the serving service needs to start its executions is granted on the job itself (job-level
IAM, read first and written only when missing): `roles/run.jobsExecutorWithOverrides` (run.jobs.run,
run.jobs.runWithOverrides: an execution names the Label Studio project in its arguments) and
`roles/run.viewer` (run.executions.get: it follows the execution it started).

As for the service, a fingerprint of the desired job is kept in the annotation SPEC_ANNOTATION:
an unchanged redeploy sends no update.
"""
from __future__ import annotations

import hashlib
from datetime import timedelta

from ...errors import EXIT_DEPLOY, LsdeployError
from .errors import google_error
from .run_logs import execution_log
from .service import duration_seconds, env_fields
from .settings import MANAGED_LABEL, SPEC_ANNOTATION

EXECUTOR_ROLES = ("roles/run.jobsExecutorWithOverrides", "roles/run.viewer")
TRAIN_COMMAND = ["label-studio-ml"]
TRAIN_ARGS = ["train", "/app"]


def desired_job(settings, image: str, env: list):
    """The job lsdeploy wants: `env` is the service's container env (run_v2.EnvVar, secrets as refs)."""
    from google.cloud import run_v2
    from google.protobuf import duration_pb2

    limits = {"cpu": settings.training_cpu, "memory": settings.training_memory}
    if settings.training_gpu:
        limits["nvidia.com/gpu"] = str(settings.training_gpu)
    env = [e for e in env if e.name not in ("LSDEPLOY_TRAINING", "LSDEPLOY_TRAINING_JOB")]
    env.append(run_v2.EnvVar(name="LSDEPLOY_TRAINING", value="job"))
    container = run_v2.Container(image=image, command=list(TRAIN_COMMAND), args=list(TRAIN_ARGS), env=env,
                                 resources=run_v2.ResourceRequirements(limits=limits))
    task = run_v2.TaskTemplate(containers=[container], max_retries=settings.training_max_retries,
                               timeout=duration_pb2.Duration(seconds=settings.training_timeout))
    if settings.service_account:
        task.service_account = settings.service_account
    if settings.training_gpu:
        task.node_selector = run_v2.NodeSelector(accelerator=settings.training_gpu_type)
        task.gpu_zonal_redundancy_disabled = True  # jobs have GPUs without zonal redundancy only
    job = run_v2.Job(
        labels={MANAGED_LABEL[0]: MANAGED_LABEL[1], **settings.labels},
        template=run_v2.ExecutionTemplate(task_count=1, parallelism=1, template=task,
                                          labels={MANAGED_LABEL[0]: MANAGED_LABEL[1]}),
    )
    job.annotations[SPEC_ANNOTATION] = spec_hash(job)
    return job


def spec_hash(job) -> str:
    from google.cloud import run_v2

    copy = run_v2.Job.deserialize(run_v2.Job.serialize(job))
    copy.annotations.pop(SPEC_ANNOTATION, None)
    return hashlib.sha256(run_v2.Job.to_json(copy, sort_keys=True, indent=None).encode()).hexdigest()


def get_job(api, settings):
    return api.lookup("run", "reading job", settings.job_name, settings, api.clients.jobs.get_job)


def up_to_date(live, desired) -> bool:
    return live is not None and live.annotations.get(SPEC_ANNOTATION) == desired.annotations.get(SPEC_ANNOTATION)


def apply_job(api, settings, desired, live, progress) -> tuple:
    """Create or update the job; (job, True when a request was sent). Unchanged: no request."""
    from google.api_core import exceptions as gexc

    if up_to_date(live, desired):
        return live, False
    if live is not None and live.labels.get(MANAGED_LABEL[0]) != MANAGED_LABEL[1]:
        raise LsdeployError(f"a Cloud Run job {settings.job_id} exists in {settings.project}/{settings.region} and was "
                            f"not made by lsdeploy (no label {MANAGED_LABEL[0]}={MANAGED_LABEL[1]}): it was left as it "
                            "is; deploy with another --service, or delete that job (gcloud run jobs delete "
                            f"{settings.job_id} --region {settings.region})", EXIT_DEPLOY)
    try:
        if live is None:
            progress(f"creating Cloud Run job {settings.job_id} in {settings.region}")
            op = api.clients.jobs.create_job(parent=settings.location, job=desired, job_id=settings.job_id)
        else:
            progress(f"updating Cloud Run job {settings.job_id}")
            desired.name = settings.job_name
            desired.etag = live.etag
            op = api.clients.jobs.update_job(job=desired)
        return api.result(op, settings.ready_timeout, f"{'creating' if live is None else 'updating'} job "
                                                     f"{settings.job_id}"), True
    except gexc.GoogleAPICallError as exc:
        error = google_error(exc, "run", f"{'creating' if live is None else 'updating'} job", settings.job_name,
                             settings.project, run_role="roles/run.admin")
        if settings.training_gpu and error.reason == "QUOTA":
            error.args = (f"{error}; a new project has no Cloud Run GPU quota for jobs: request 'Total Nvidia L4 GPU "
                          f"allocation without zonal redundancy, per project per region' for {settings.region}",)
        raise error from None


def grant_executor(api, settings, member: str, progress) -> bool:
    """The service's identity may start executions with overrides and read them (EXECUTOR_ROLES on
    the job); True when the policy was written."""
    from google.api_core import exceptions as gexc
    from google.iam.v1 import iam_policy_pb2

    try:
        policy = api.clients.jobs.get_iam_policy(request=iam_policy_pb2.GetIamPolicyRequest(resource=settings.job_name))
        missing = [role for role in EXECUTOR_ROLES
                   if not any(b.role == role and member in b.members for b in policy.bindings)]
        if not missing:
            return False
        for role in missing:
            binding = next((b for b in policy.bindings if b.role == role), None)
            if binding is None:
                policy.bindings.add(role=role, members=[member])
            else:
                binding.members.append(member)
        progress(f"granting {member.split(':', 1)[-1]} {' and '.join(missing)} on job {settings.job_id} "
                 "(the service starts and follows its executions)")
        api.clients.jobs.set_iam_policy(request=iam_policy_pb2.SetIamPolicyRequest(
            resource=settings.job_name, policy=policy))
    except gexc.GoogleAPICallError as exc:
        raise google_error(exc, "run", "granting the service's identity the right to run", settings.job_name,
                           settings.project, run_role="roles/run.admin") from None
    api.granted("runtime", settings.job_name)
    return True


def delete_job(api, settings, progress) -> bool:
    """Delete the training job when it exists and lsdeploy made it; True when it was deleted."""
    from google.api_core import exceptions as gexc

    live = get_job(api, settings)
    if live is None:
        return False
    if live.labels.get(MANAGED_LABEL[0]) != MANAGED_LABEL[1]:
        raise LsdeployError(f"Cloud Run job {settings.job_id} was not made by lsdeploy (no label "
                            f"{MANAGED_LABEL[0]}={MANAGED_LABEL[1]}): it was not deleted; remove it with `gcloud run "
                            f"jobs delete {settings.job_id} --region {settings.region}`", EXIT_DEPLOY)
    progress(f"deleting Cloud Run job {settings.job_id}")
    try:
        api.result(api.clients.jobs.delete_job(name=settings.job_name), settings.ready_timeout,
                   f"deleting Cloud Run job {settings.job_id}")
    except gexc.NotFound:
        return False
    except gexc.GoogleAPICallError as exc:
        raise google_error(exc, "run", "deleting job", settings.job_name, settings.project,
                           run_role="roles/run.admin") from None
    return True


def job_fields(job) -> dict:
    """What a user tunes on the job, flattened for the --dry-run diff (plain env values hashed)."""
    from google.cloud import run_v2

    task = job.template.template
    container = task.containers[0] if task.containers else run_v2.Container()
    plain, secret_refs = env_fields(container)
    seconds = duration_seconds(task.timeout)
    account = task.service_account or ""
    if account.endswith("-compute@developer.gserviceaccount.com"):
        account = ""
    limits = container.resources.limits
    return {
        "image": container.image, "command": " ".join(list(container.command) + list(container.args)),
        "cpu": limits.get("cpu", ""), "memory": limits.get("memory", ""),
        "gpu": int(limits.get("nvidia.com/gpu", "0") or 0), "gpu_type": task.node_selector.accelerator or "",
        "timeout": f"{seconds}s", "max_retries": task.max_retries, "service_account": account or "(default)",
        "labels": {k: v for k, v in job.labels.items() if (k, v) != MANAGED_LABEL},
        "env": plain, "secrets": secret_refs,
    }


def job_changes(live, desired) -> list:
    """[{"field": "job.<name>", "live", "desired"}]; `live` None lists every desired field."""
    want = job_fields(desired)
    have = job_fields(live) if live is not None else None
    changes = []
    for name, value in want.items():
        if name in ("env", "secrets"):
            before = have[name] if have else {}
            for key in sorted(set(before) | set(value)):
                if before.get(key) != value.get(key):
                    shown = (lambda v: None if v is None else "set") if name == "env" else (lambda v: v)
                    changes.append({"field": f"job.{'env' if name == 'env' else 'secret'}.{key}",
                                    "live": shown(before.get(key)), "desired": shown(value.get(key))})
        elif have is None or have[name] != value:
            changes.append({"field": f"job.{name}", "live": have[name] if have else None, "desired": value})
    return changes


def execution_state(execution) -> str:
    """running | succeeded | failed | cancelled | pending, from the execution's counts and Completed condition."""
    from google.cloud import run_v2

    for cond in execution.conditions:
        if cond.type_ == "Completed" and cond.state == run_v2.Condition.State.CONDITION_SUCCEEDED:
            return "succeeded"
        if cond.type_ == "Completed" and cond.state == run_v2.Condition.State.CONDITION_FAILED:
            return "cancelled" if execution.cancelled_count else "failed"
    if execution.completion_time:
        return "failed" if execution.failed_count else ("cancelled" if execution.cancelled_count else "succeeded")
    return "running" if execution.running_count or execution.start_time else "pending"


def executions(api, settings, limit: int = 5) -> list:
    """The job's newest executions: [{"execution", "state", "started", "completed", "running",
    "succeeded", "failed", "retried", "log_uri", "reason"}] ("reason": for a failed one, the line of
    its log that says why, or why the log could not be read); [] when there is no job."""
    from google.api_core import exceptions as gexc

    try:
        found = list(api.clients.executions.list_executions(request={"parent": settings.job_name, "page_size": 50}))
    except gexc.NotFound:
        return []
    except gexc.GoogleAPICallError as exc:
        raise google_error(exc, "run", "listing the executions of", settings.job_name, settings.project) from None
    found.sort(key=lambda e: (e.create_time.timestamp() if e.create_time else 0, e.name), reverse=True)
    shown = [{"execution": e.name.rsplit("/", 1)[-1], "state": execution_state(e),
              "started": e.start_time.isoformat() if e.start_time else "",
              "completed": e.completion_time.isoformat() if e.completion_time else "",
              "running": e.running_count, "succeeded": e.succeeded_count, "failed": e.failed_count,
              "retried": e.retried_count, "log_uri": e.log_uri, "reason": ""} for e in found[:limit]]
    for run, execution in zip(shown, found):
        if run["state"] == "failed":  # what its tasks printed says why (one Cloud Logging read each)
            since = execution.create_time - timedelta(minutes=1) if execution.create_time else None
            log = execution_log(api, settings, run["execution"], since)
            run["reason"] = log.reason or log.note
    return shown


def names_job(service) -> bool:
    """The live service was deployed with --training job (its env names a training job)."""
    if service is None or not service.template.containers:
        return False
    return any(env.name == "LSDEPLOY_TRAINING_JOB" for env in service.template.containers[0].env)


def follow_image(api, settings, image: str, revision: str, progress) -> bool:
    """After a rollback the job trains with the image of the revision that serves (a model trained by
    newer code could not be loaded by the older serving code). Its spec fingerprint then names the
    rollback, so the next deploy updates the job again. True when the job was updated."""
    from google.api_core import exceptions as gexc
    from google.cloud import run_v2

    live = get_job(api, settings)
    if live is None or not live.template.template.containers or live.template.template.containers[0].image == image:
        return False
    update = run_v2.Job.deserialize(run_v2.Job.serialize(live))
    update.template.template.containers[0].image = image
    update.annotations[SPEC_ANNOTATION] = f"rollback-to-{revision}"
    progress(f"training job {settings.job_id} now runs the image of {revision}")
    try:
        api.result(api.clients.jobs.update_job(job=update), settings.ready_timeout,
                   f"updating job {settings.job_id}")
    except gexc.GoogleAPICallError as exc:
        raise google_error(exc, "run", "moving the training job to the image of", settings.job_name,
                           settings.project, run_role="roles/run.admin") from None
    return True
