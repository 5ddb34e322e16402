"""The Cloud Run service: what lsdeploy wants it to be, creating or updating it, and reading it back
(its Ready state, revisions and traffic; a field-by-field diff for --dry-run).

A fingerprint of the desired service (`spec_hash`) is kept in the annotation SPEC_ANNOTATION:
when the live service carries the same one, is ready and serves its latest revision, a deploy
sends no update at all.
"""
from __future__ import annotations

import hashlib
import re
import time
from datetime import datetime, timedelta, timezone

from ...errors import EXIT_DEPLOY, LsdeployError
from .errors import OperationTimeout, google_error
from .run_logs import revision_log
from .settings import INGRESS, MANAGED_LABEL, SPEC_ANNOTATION

# On the revision template: the failed revision this one replaces (a template change makes Cloud
# Run create a new revision; the service's spec fingerprint stays the same).
RETRY_ANNOTATION = "lsdeploy.dev/retry-of"
# What Cloud Run says when a revision's identity may not read what it needs (a secret, ...).
PERMISSION_FAILURE = re.compile(r"Permission denied|permission denied|PERMISSION_DENIED|does not have .*permission")


def container_env(settings, secret_refs: dict) -> list:
    """The serving container's env (run_v2.EnvVar; secrets as pinned references, never values). With
    `--training job` the service learns its training job (LSDEPLOY_TRAINING, LSDEPLOY_TRAINING_JOB)."""
    from google.cloud import run_v2

    env = [run_v2.EnvVar(name="MODEL_STATE_URI", value=settings.state_uri)]
    if settings.label_studio_url:
        from ...labelstudio import without_userinfo

        # without user info: a proxy password in the address would be a plain environment value
        env.append(run_v2.EnvVar(name="LABEL_STUDIO_URL", value=without_userinfo(settings.label_studio_url)))
    if settings.basic_auth:
        env.append(run_v2.EnvVar(name="BASIC_AUTH_USER", value=settings.basic_auth_user))
    env += [run_v2.EnvVar(name=k, value=v) for k, v in sorted(settings.env.items())]
    for env_name, (secret, version) in sorted(secret_refs.items()):
        env.append(run_v2.EnvVar(name=env_name, value_source=run_v2.EnvVarSource(
            secret_key_ref=run_v2.SecretKeySelector(secret=secret, version=version))))
    if settings.training == "job":
        env += [run_v2.EnvVar(name="LSDEPLOY_TRAINING", value="job"),
                run_v2.EnvVar(name="LSDEPLOY_TRAINING_JOB", value=settings.job_name)]
    return env


def desired_service(settings, image: str, secret_refs: dict, spec_hash: str = ""):
    from google.cloud import run_v2
    from google.protobuf import duration_pb2

    env = container_env(settings, secret_refs)
    limits = {"cpu": settings.cpu, "memory": settings.memory}
    if settings.gpu:
        limits["nvidia.com/gpu"] = str(settings.gpu)
    container = run_v2.Container(
        image=image, env=env,
        resources=run_v2.ResourceRequirements(limits=limits, cpu_idle=False, startup_cpu_boost=True),
        # Ready only once /health answers: the model imported, the state store opened. Up to
        # 4 minutes for big models (the period x threshold), checked every 2 s.
        startup_probe=run_v2.Probe(http_get=run_v2.HTTPGetAction(path="/health"), initial_delay_seconds=0,
                                   timeout_seconds=1, period_seconds=2, failure_threshold=120),
    )
    template = run_v2.RevisionTemplate(
        containers=[container],
        scaling=run_v2.RevisionScaling(min_instance_count=settings.min_instances,
                                       max_instance_count=settings.max_instances),
        max_instance_request_concurrency=settings.concurrency,
        timeout=duration_pb2.Duration(seconds=settings.timeout),
        labels={MANAGED_LABEL[0]: MANAGED_LABEL[1]},
    )
    if settings.service_account:
        template.service_account = settings.service_account
    if settings.gpu:
        template.node_selector = run_v2.NodeSelector(accelerator=settings.gpu_type)
        template.gpu_zonal_redundancy_disabled = True
    labels = {MANAGED_LABEL[0]: MANAGED_LABEL[1], **settings.labels}
    return run_v2.Service(
        template=template, labels=labels, ingress=run_v2.IngressTraffic[INGRESS[settings.ingress]],
        # Label Studio cannot send Google identity tokens: the service is public and the
        # backend's own basic auth protects it.
        invoker_iam_disabled=True,
        annotations={SPEC_ANNOTATION: spec_hash} if spec_hash else {},
        description=f"Label Studio ML backend {settings.service} (lsdeploy)",
    )


def spec_hash(service) -> str:
    from google.cloud import run_v2

    data = run_v2.Service.to_json(service, sort_keys=True, indent=None)
    return hashlib.sha256(data.encode()).hexdigest()


def get_service(api, settings):
    return api.lookup("run", "reading service", settings.service_name, settings, api.clients.services.get_service)


def apply_service(api, settings, desired, live, progress):
    """Create or update; returns (service after the operation, True when it changed).

    After a revision that never became ready the same spec would make no new revision (Cloud Run
    creates one only when the template changes), so the template names the failed revision
    (RETRY_ANNOTATION). When a new revision fails on a permission this deploy just granted, IAM
    has not propagated yet: wait and deploy again, for up to settings.iam_wait seconds after the grant."""
    if up_to_date(live, desired):
        return live, False
    failed = failed_revision(live)
    if failed:
        progress(f"the latest revision {failed} never became ready: deploying a new revision")
        desired.template.annotations[RETRY_ANNOTATION] = failed
    attempt = 0
    while True:
        try:
            return _send(api, settings, desired, live, progress), True
        except RevisionNotReady as exc:
            waited = api.just_granted("runtime", exc.condition)
            refused = PERMISSION_FAILURE.search(exc.condition)
            if not (refused and waited is not None and waited < settings.iam_wait):
                raise
            attempt += 1
            pause = min(30.0, api.poll_interval * 2 ** attempt)
            progress(f"revision {exc.revision} was refused a permission granted {waited:.0f} s ago "
                     f"({exc.condition[refused.start():][:200]}); IAM changes take minutes to reach Cloud Run: "
                     f"deploying again in {pause:.3g} s (attempt "
                     f"{attempt + 1}, waiting up to {settings.iam_wait:.0f} s after the grant)")
            time.sleep(pause)
            live = get_service(api, settings)
            desired.template.annotations[RETRY_ANNOTATION] = exc.revision


class RevisionNotReady(LsdeployError):
    """The new revision never became ready; traffic stays on the previous one."""

    def __init__(self, message, revision: str, condition: str):
        super().__init__(message, EXIT_DEPLOY)
        self.revision = revision
        self.condition = condition


def failed_revision(live) -> str:
    """The latest revision when it never became ready (traffic stayed on an older one), else ""."""
    if live is None or not live.latest_created_revision or live.latest_created_revision == live.latest_ready_revision:
        return ""
    if live.reconciling:
        return ""  # still deploying: not failed (yet)
    return live.latest_created_revision.rsplit("/", 1)[-1]


def _send(api, settings, desired, live, progress):
    """One create or update, waited for; RevisionNotReady when its revision fails."""
    from google.api_core import exceptions as gexc

    sent = datetime.now(timezone.utc) - timedelta(minutes=1)  # bounds the log query (clocks differ)

    try:
        if live is None:
            progress(f"creating Cloud Run service {settings.service} in {settings.region}")
            op = api.clients.services.create_service(parent=settings.location, service=desired,
                                                     service_id=settings.service)
        else:
            progress(f"updating Cloud Run service {settings.service}")
            desired.name = settings.service_name
            op = api.clients.services.update_service(service=desired)
    except gexc.GoogleAPICallError as exc:
        verb = "creating" if live is None else "updating"
        # the service sets invoker_iam_disabled (Label Studio sends no Google identity token): that
        # needs run.services.setIamPolicy, which roles/run.developer lacks
        raise gpu_quota_note(settings, google_error(exc, "run", f"{verb} service", settings.service_name,
                                                    settings.project, run_role="roles/run.admin")) from None
    progress("waiting for the new revision to be ready")
    try:
        return api.result(op, settings.ready_timeout, f"deploying {settings.service}")
    except OperationTimeout:
        after = get_service(api, settings)
        revision = after.latest_created_revision.rsplit("/", 1)[-1] if after is not None else ""
        raise LsdeployError(f"Cloud Run service {settings.service}: revision {revision or '(not created yet)'} is "
                            f"still deploying after {settings.ready_timeout:.0f} s (--wait-timeout); Label Studio "
                            f"was not changed: follow it with `label-studio-ml status {settings.service} "
                            f"--gcp-project-id {settings.project} --gcp-region {settings.region}`, then deploy "
                            "again to register it", EXIT_DEPLOY) from None
    except gexc.GoogleAPICallError as exc:
        after = get_service(api, settings)
        message = getattr(exc, "message", None) or str(exc)
        revision = ""
        if after is not None:
            _, condition = service_ready(after)
            message = condition or message
            serving = after.latest_ready_revision.rsplit("/", 1)[-1] or "none"
            revision = after.latest_created_revision.rsplit("/", 1)[-1]
        else:
            serving = "none"
        if isinstance(exc, (gexc.Forbidden, gexc.TooManyRequests, gexc.ResourceExhausted)):
            raise gpu_quota_note(settings, google_error(exc, "run", "deploying", settings.service_name,
                                                        settings.project, run_role="roles/run.admin")) from None
        message = " ".join(message.split())  # Cloud Run's condition has line breaks: the error is one line
        why = _why_not_started(api, settings, revision, sent, progress) if revision else ""
        unchecked = "".join(f"; this deploy could not check that {what}: if the revision's log says a permission "
                            f"was denied, run `{command}` and deploy again"
                            for identity, what, command in api.unchecked_grants if identity == "runtime")
        raise RevisionNotReady(f"Cloud Run could not start the new revision of {settings.service}: {message} "
                               f"(traffic stays on the previous revision: {serving}); Label Studio was not "
                               f"changed{why}{unchecked}", revision, message) from None


def _why_not_started(api, settings, revision: str, since, progress) -> str:
    """The end of the failed revision's log, printed, and its telling line for the error ("; its
    log says: ..."): Cloud Run's own message holds nothing the container printed."""
    log = revision_log(api, settings, revision, since)
    if log.note:
        return f"; {log.note}"
    if log.lines:
        progress(f"the last lines of revision {revision}'s log:")
        for line in log.lines[-12:]:
            progress(f"  log | {line[:300]}")
    return f"; its log says: {log.reason[:400]}" if log.reason else ""


def gpu_quota_note(settings, error):
    """A quota refusal of a GPU service: projects have no Cloud Run GPU quota until it is requested."""
    if settings.gpu and error.reason == "QUOTA":
        error.args = (f"{error}; a new project has no Cloud Run GPU quota: request 'Total Nvidia L4 GPU allocation, "
                      f"per project per region' for {settings.region} (IAM & Admin > Quotas, service Cloud Run Admin "
                      "API), usually granted within a few days",)
    return error


def list_revisions(api, settings) -> list:
    """The service's revisions, newest first."""
    pager = api.call("run", "listing the revisions of", settings.service_name, settings,
                     api.clients.revisions.list_revisions, parent=settings.service_name)
    revisions = list(pager)
    revisions.sort(key=lambda r: r.create_time.timestamp() if r.create_time else 0, reverse=True)
    return revisions


def traffic_targets(live) -> list:
    """[{"revision", "percent", "tag"}] as Cloud Run reports the traffic (LATEST resolved)."""
    latest = live.latest_ready_revision.rsplit("/", 1)[-1]
    return [{"revision": t.revision or latest, "percent": t.percent, "tag": t.tag}
            for t in live.traffic_statuses]


def up_to_date(live, desired) -> bool:
    """The live service already is `desired` (same spec fingerprint), ready and serving its latest
    revision: a deploy sends no update."""
    return live is not None and bool(desired.annotations.get(SPEC_ANNOTATION)) \
        and live.annotations.get(SPEC_ANNOTATION) == desired.annotations.get(SPEC_ANNOTATION) \
        and bool(live.latest_ready_revision) and live.latest_ready_revision == live.latest_created_revision \
        and service_ready(live)[0] and serves_latest(live)


def service_fields(service) -> dict:
    """What a user tunes on the service, flattened for a field-by-field diff. Secret references show
    as `secret-id:version`; plain environment values are compared but never shown."""
    from google.cloud import run_v2

    template = service.template
    container = template.containers[0] if template.containers else run_v2.Container()
    plain, secret_refs = env_fields(container)
    limits = container.resources.limits
    seconds = duration_seconds(template.timeout)
    account = template.service_account or ""
    if account.endswith("-compute@developer.gserviceaccount.com"):
        account = ""  # Cloud Run fills in the default identity
    ingress = {v: k for k, v in INGRESS.items()}.get(run_v2.IngressTraffic(service.ingress).name, str(service.ingress))
    return {
        "image": container.image,
        "cpu": limits.get("cpu", ""),
        "memory": limits.get("memory", ""),
        "gpu": int(limits.get("nvidia.com/gpu", "0") or 0),
        "gpu_type": template.node_selector.accelerator or "",
        "min_instances": template.scaling.min_instance_count,
        "max_instances": template.scaling.max_instance_count,
        "concurrency": template.max_instance_request_concurrency,
        "timeout": f"{seconds}s",
        "service_account": account or "(default)",
        "ingress": ingress,
        "labels": {k: v for k, v in service.labels.items() if (k, v) != MANAGED_LABEL},
        "env": plain,
        "secrets": secret_refs,
    }


def env_fields(container) -> tuple:
    """({name: sha256 of the plain value}, {name: "secret-id:version"}) of a container's env: values
    are compared, never shown."""
    plain, secret_refs = {}, {}
    for env in container.env:
        ref = env.value_source.secret_key_ref
        if ref.secret:
            secret_refs[env.name] = f"{ref.secret.rsplit('/', 1)[-1]}:{ref.version or 'latest'}"
        else:
            plain[env.name] = hashlib.sha256(env.value.encode()).hexdigest()
    return plain, secret_refs


def duration_seconds(timeout) -> int:
    return int(timeout.total_seconds()) if hasattr(timeout, "total_seconds") else int(getattr(timeout, "seconds", 0))


def service_changes(live, desired) -> list:
    """[{"field", "live", "desired"}] between two services; `live` None lists every desired field."""
    want = service_fields(desired)
    have = service_fields(live) if live is not None else None
    changes = []
    for name, value in want.items():
        if name == "env":
            before = have["env"] if have else {}
            for env_name in sorted(set(before) | set(value)):
                if env_name not in before:
                    changes.append({"field": f"env.{env_name}", "live": None, "desired": "set"})
                elif env_name not in value:
                    changes.append({"field": f"env.{env_name}", "live": "set", "desired": None})
                elif before[env_name] != value[env_name]:
                    changes.append({"field": f"env.{env_name}", "live": "set", "desired": "set (new value)"})
        elif name == "secrets":
            before = have["secrets"] if have else {}
            for env_name in sorted(set(before) | set(value)):
                if before.get(env_name) != value.get(env_name):
                    changes.append({"field": f"secret.{env_name}", "live": before.get(env_name),
                                    "desired": value.get(env_name)})
        elif have is None or have[name] != value:
            changes.append({"field": name, "live": have[name] if have else None, "desired": value})
    return changes


def serves_latest(service) -> bool:
    """All traffic on the latest ready revision (not pinned elsewhere, as after a rollback)."""
    from google.cloud import run_v2

    latest = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST
    return [(t.type_, t.percent) for t in service.traffic] == [(latest, 100)]


def revision_ready(revision) -> tuple:
    from google.cloud import run_v2

    for cond in revision.conditions:
        if cond.type_ == "Ready":
            ok = cond.state == run_v2.Condition.State.CONDITION_SUCCEEDED
            return ok, "" if ok else cond.message
    return False, "not reported yet"


def service_ready(service) -> tuple:
    """(ready, message) from the service's Ready condition."""
    from google.cloud import run_v2

    cond = service.terminal_condition
    if cond and cond.type_ == "Ready":
        ok = cond.state == run_v2.Condition.State.CONDITION_SUCCEEDED
        return ok, "" if ok else cond.message
    for cond in service.conditions:
        if cond.type_ == "Ready":
            ok = cond.state == run_v2.Condition.State.CONDITION_SUCCEEDED
            return ok, "" if ok else cond.message
    return bool(service.latest_ready_revision), ""
