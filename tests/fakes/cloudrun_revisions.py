"""Cloud Run revisions: how a new one is made from the service's template, what it needs before
its container can start (the image, its secrets, and for lsdeploy's state store its bucket), and
when it counts as ready or failed. cloudrun.py owns services and routes traffic; it calls these.

A revision fails, with the message Cloud Run shows, when its image is missing from a repository
that exists, when a secret reference cannot be read by its service account (roles/secretmanager.
secretAccessor on the secret or the project, propagated), and (with the Cloud Storage front) when
its container keeps state in a bucket (`MODEL_STATE_URI=gs://BUCKET/PREFIX`) that its service
account may not list, read, write and delete in. That last one is the container's own doing, so
it is modelled as lsdeploy's GCSStore behaves on Cloud Run: start-up checks the bucket again until
the permissions are in effect (the revision becomes ready then) or MODEL_STATE_PERMISSION_WAIT_
SECONDS (180) pass; then the container exits 1 and the revision fails with Cloud Run's own words,
which hold nothing the container logged (that is in the revision's logs only).
"""
from __future__ import annotations

import random
import string
import threading
import time
import uuid
from dataclasses import dataclass, field

from google.cloud import run_v2

from .artifactregistry import parse_image
from .containers import ContainerRevision
from .runner import RevisionProcess, start_failure
from .server import ApiError, already_exists, etag_of, now_pb

Revision = run_v2.Revision.pb()
Condition = run_v2.Condition.pb()
SUCCEEDED = Condition.State.CONDITION_SUCCEEDED
FAILED = Condition.State.CONDITION_FAILED
RECONCILING = Condition.State.CONDITION_RECONCILING
# what GCSStore does at start-up, in order: list and read the state, write a probe, delete it
STATE_PERMISSIONS = ("storage.objects.list", "storage.objects.get", "storage.objects.create", "storage.objects.delete")
DEFAULT_STATE_WAIT = 180.0  # GCSStore's MODEL_STATE_PERMISSION_WAIT_SECONDS on Cloud Run


def secret_exists(secrets, name: str) -> bool:
    return secrets.canonical(name) in secrets.secrets


@dataclass
class RevisionState:
    message: object  # Revision
    created: float
    process: RevisionProcess | ContainerRevision | None = None
    outcome: str | None = None  # None (pending) | "ready" | failure message
    failure: str | None = None  # known at creation (image, secrets, fault); reported after ready_delay
    bucket_wait: "BucketWait | None" = None  # the container waits for its state bucket's permissions
    log: list = field(default_factory=list)  # lines of a container the fake models without running it


@dataclass
class BucketWait:
    uri: str  # MODEL_STATE_URI
    bucket: str
    member: str
    deadline: float  # time.monotonic() when the container gives up and exits 1
    port: int


def new_revision(run, state, project: str) -> str:
    """A revision `S-0000N-xyz` (or the template's name) from the service's template, its start
    prepared (or its failure known); returns its name. `run` is the CloudRunFake, `state` the
    service's ServiceState."""
    service = state.message
    service_id = service.name.rsplit("/", 1)[-1]
    state.revision_count += 1
    template = service.template
    revision_id = template.revision or (
        f"{service_id}-{state.revision_count:05d}-"
        f"{''.join(random.choices(string.ascii_lowercase + string.digits, k=3))}")
    name = f"{service.name}/revisions/{revision_id}"
    if name in run.revisions:
        raise already_exists(f"Revision named '{revision_id}' already exists.")
    revision = Revision(name=name, uid=str(uuid.uuid4()), generation=1, service=service.name,
                        observed_generation=1, launch_stage=service.launch_stage, reconciling=True,
                        creator=service.last_modifier)
    for f in template.DESCRIPTOR.fields:
        if f.name in Revision.DESCRIPTOR.fields_by_name and f.name != "revision":
            target = Revision.DESCRIPTOR.fields_by_name[f.name]
            if target.type != f.type or target.message_type != f.message_type:
                continue
            if f.is_repeated and f.message_type is not None and f.message_type.GetOptions().map_entry:
                getattr(revision, f.name).update(getattr(template, f.name))
            elif f.is_repeated:
                getattr(revision, f.name).extend(getattr(template, f.name))
            elif f.message_type is not None:
                if template.HasField(f.name):
                    getattr(revision, f.name).CopyFrom(getattr(template, f.name))
            else:
                setattr(revision, f.name, getattr(template, f.name))
    now_pb(revision.create_time)
    now_pb(revision.update_time)
    revision.log_uri = (f"https://console.cloud.google.com/logs/viewer?project={project}&resource="
                        f"cloud_run_revision/service_name/{service_id}/revision_name/{revision_id}")
    revision.conditions.add(type_="Ready", state=RECONCILING)
    revision.etag = etag_of(revision)
    rstate = RevisionState(revision, time.monotonic())
    run.revisions[name] = rstate

    failure = prepare(run, rstate, service_id, project)
    if failure:
        rstate.failure = failure
    elif run.runner and rstate.process is not None:
        rstate.process.start()
    return name

def prepare(run, rstate: RevisionState, service_id: str, project: str) -> str | None:
    """Resolve the image and secrets; set up the process. Returns a failure message or None."""
    revision = rstate.message
    fault = run.never_ready_faults.get(service_id)
    if fault is not None and fault[1] != 0:
        if fault[1] is not None:
            fault[1] -= 1
        return fault[0]
    container = revision.containers[0]
    ar_fake = run.cloud.artifactregistry
    image = ar_fake.resolve(container.image)
    parts = parse_image(container.image)
    if image is None and parts is not None:
        repository = f"projects/{parts['project']}/locations/{parts['location']}/repositories/{parts['repo']}"
        if repository in ar_fake.repositories:
            return f"Image '{container.image}' not found."
    env = {}
    for index, var in enumerate(container.env):
        if var.HasField("value_source"):
            ref = var.value_source.secret_key_ref
            secret = ref.secret if ref.secret.startswith("projects/") else \
                f"projects/{project}/secrets/{ref.secret}"
            version = ref.version or "latest"
            canonical = f"{run.cloud.secretmanager.canonical(secret)}/versions/{version}"
            runtime = f"serviceAccount:{revision.service_account}"
            if (run.require_secret_access and secret_exists(run.cloud.secretmanager, secret)
                    and not run.cloud.secretmanager.can_access(secret, runtime)):
                return (f"spec.template.spec.containers[0].env[{index}].value_from.secret_key_ref.name: "
                        f"Permission denied on secret: {canonical} for Revision service account "
                        f"{revision.service_account}. The service account used must be granted the 'Secret "
                        f"Manager Secret Accessor' role (roles/secretmanager.secretAccessor) at the secret, "
                        f"project or higher level.")
            try:
                env[var.name] = run.cloud.secretmanager.value(secret, version).decode()
            except ApiError:
                return (f"spec.template.spec.containers[0].env[{index}].value_from.secret_key_ref.name: Secret "
                        f"{run.cloud.secretmanager.canonical(secret)}/versions/{ref.version or 'latest'} was "
                        f"not found")
        else:
            env[var.name] = var.value
    rstate.bucket_wait = state_bucket_wait(run.cloud, revision, env)
    if not run.runner:
        return None
    if image is None:
        return (f"Image '{container.image}' was not built by the Cloud Build fake, so the lsdeploy fake cannot "
                f"run it.")
    revision_id = revision.name.rsplit("/", 1)[-1]
    env.update({"K_SERVICE": service_id, "K_REVISION": revision_id, "K_CONFIGURATION": service_id})
    probe = container.startup_probe
    path = (probe.http_get.path or "/") if probe.HasField("http_get") else None
    # Cloud Run gives up after initial delay + period x failure threshold (240 s by default).
    deadline = (probe.initial_delay_seconds + (probe.period_seconds or 10) * (probe.failure_threshold or 3)
                if container.HasField("startup_probe") else 240)
    spec = {"command": list(container.command), "args": list(container.args), "working_dir": container.working_dir,
            "dockerfile": image.dockerfile}
    startup = {"path": path, "deadline": min(deadline + 5, run.startup_deadline)}
    engine = run.cloud.engine
    if engine is not None and image.local:  # the real image, in the container engine
        if container.command or container.working_dir:
            return ("The lsdeploy fake runs real images with their own ENTRYPOINT and WORKDIR: a service that "
                    "overrides `command` or `working_dir` needs the process runner (FakeGoogleCloud(engine=None)).")
        rstate.process = ContainerRevision(revision_id, engine, image.local, spec, env, startup, run.cloud.workdir,
                                           extra_env={**run.extra_env, **run.cloud.caller_env(revision.service_account)})
        return None
    rstate.process = RevisionProcess(revision_id, image.bundle, spec, env, startup, run.cloud.workdir,
                                     extra_env={**run.extra_env, **run.cloud.caller_env(revision.service_account)})
    return None


def state_bucket_wait(cloud, revision, env: dict) -> BucketWait | None:
    """What the revision's container waits for when lsdeploy's GCSStore starts without the
    permissions it needs on MODEL_STATE_URI's bucket (list, read, write and delete, as the
    revision's service account); None when it has them. Only with the storage front."""
    iam = cloud.bucket_iam
    uri = env.get("MODEL_STATE_URI", "")
    if not iam.enforce or not uri.startswith("gs://"):
        return None
    bucket = uri[5:].split("/", 1)[0]
    member = f"serviceAccount:{revision.service_account}"
    if not iam.missing(bucket, member, STATE_PERMISSIONS):
        return None
    try:
        wait = float(env.get("MODEL_STATE_PERMISSION_WAIT_SECONDS") or DEFAULT_STATE_WAIT)
    except ValueError:
        wait = 0.0  # the container exits at once, naming the setting
    container = revision.containers[0]
    port = container.ports[0].container_port if container.ports else 8080
    return BucketWait(uri.rstrip("/") + "/", bucket, member, time.monotonic() + max(wait, 0.0), port)


def state_bucket_error(wait: BucketWait, first: str) -> str:
    """The line lsdeploy's GCSStore logs when it gives up on a permission (lsdeploy.state.gcs's words)."""
    uri, account = wait.uri, wait.member.split(":", 1)[1]
    if first in ("storage.objects.list", "storage.objects.get"):
        what = f"no permission to read {uri} as {account}: needs storage.objects.list and storage.objects.get"
    elif first == "storage.objects.create":
        what = f"cannot write to {uri} as {account}: needs storage.objects.create"
    else:
        what = f"cannot delete in {uri} as {account}: needs storage.objects.delete"
    return (f"error: {what}; grant the service account roles/storage.objectUser on the bucket {wait.bucket!r} "
            f"(HTTP 403 Forbidden: {account} does not have {first} access to the Google Cloud Storage "
            f"{'bucket' if first == 'storage.objects.list' else 'object'}.) (still refused after waiting, "
            "MODEL_STATE_PERMISSION_WAIT_SECONDS)")


def revision_outcome(run, rstate: RevisionState) -> str | None:
    """None while pending, "ready", or the failure message; sets the revision's conditions once known."""
    if rstate.outcome is None and rstate.bucket_wait is not None:
        wait = rstate.bucket_wait
        missing = run.cloud.bucket_iam.missing(wait.bucket, wait.member, STATE_PERMISSIONS)
        if not missing:
            rstate.bucket_wait = None  # the grant applied: the container's start-up goes on
        elif time.monotonic() >= wait.deadline:  # the container gave up, said why in its log, and exited 1
            rstate.log.append(state_bucket_error(wait, missing[0]))
            rstate.bucket_wait, rstate.failure = None, start_failure(wait.port)
            if rstate.process is not None:
                threading.Thread(target=rstate.process.stop, daemon=True).start()
        else:
            return None
    if rstate.outcome is None:
        if rstate.failure is not None:
            if time.monotonic() - rstate.created >= run.ready_delay:
                rstate.outcome = rstate.failure
        elif rstate.process is not None:
            if rstate.process.state == "ready":
                rstate.outcome = "ready"
            elif rstate.process.state == "failed":
                rstate.outcome = rstate.process.message
        elif time.monotonic() - rstate.created >= run.ready_delay:
            rstate.outcome = "ready"
        if rstate.outcome is not None:
            revision = rstate.message
            del revision.conditions[:]
            revision.reconciling = False
            ready = rstate.outcome == "ready"
            condition = revision.conditions.add(type_="Ready", state=SUCCEEDED if ready else FAILED)
            now_pb(condition.last_transition_time)
            if not ready:
                condition.message = rstate.outcome
                condition.reason = 5  # CONTAINER_MISSING/failed: the generic revision failure reason
            for kind in ("ContainerHealthy", "ResourcesAvailable"):
                c = revision.conditions.add(type_=kind, state=SUCCEEDED if ready else FAILED)
                now_pb(c.last_transition_time)
            revision.etag = etag_of(revision)
    return rstate.outcome
