"""Operating a deployed service: `status` (read-only), `rollback` (traffic to an older ready
revision, no new revision) and `destroy` (the service, its secrets and, with purge, its images,
source bundles, build logs and model state).

Label Studio is reached through `open_label_studio(settings)`: a client, or None when no host, key
or project was given.
"""
from __future__ import annotations

from typing import Optional

from ...errors import EXIT_DEPLOY, EXIT_USAGE, LsdeployError
from ..base import DestroyResult, RollbackResult, StatusResult, _quiet
from . import job as training_job
from .errors import google_error
from .secrets import own_secrets
from .service import get_service, list_revisions, revision_ready, service_ready, traffic_targets
from .settings import MANAGED_LABEL
from .storage import delete_blobs, list_blobs


def status(api, settings, open_label_studio) -> StatusResult:
    """What runs now. The image is the one of the revision(s) that take traffic, read from the
    revisions: the service's spec names the newest image, which serves nothing after a rollback."""
    live = get_service(api, settings)
    if live is None:
        return StatusResult(service=settings.service, exists=False)
    ready, message = service_ready(live)
    revisions = []
    for rev in list_revisions(api, settings):
        rev_ready, rev_message = revision_ready(rev)
        revisions.append({"revision": rev.name.rsplit("/", 1)[-1], "ready": rev_ready, "message": rev_message,
                          "image": rev.containers[0].image if rev.containers else "",
                          "created": rev.create_time.isoformat() if rev.create_time else ""})
    images = {rev["revision"]: rev["image"] for rev in revisions}
    traffic = [{**target, "image": images.get(target["revision"], "")} for target in traffic_targets(live)]
    serving = {target["image"] for target in traffic if target["percent"] and target["revision"]}
    image = next(iter(serving)) if len(serving) == 1 else ""  # none when no revision or several images serve
    client = open_label_studio(settings)
    has_job = training_job.names_job(live)
    executions, executions_error = [], ""
    if has_job:
        try:
            executions = training_job.executions(api, settings)
        except LsdeployError as exc:  # e.g. no run.executions.list: the service's status still shows
            executions_error = str(exc)
    return StatusResult(
        service=settings.service, exists=True, url=live.uri, ready=ready, message=message,
        latest_ready_revision=live.latest_ready_revision.rsplit("/", 1)[-1],
        latest_created_revision=live.latest_created_revision.rsplit("/", 1)[-1],
        traffic=traffic, image=image, image_digest=image.split("@", 1)[1] if "@" in image else "",
        updated=live.update_time.isoformat() if live.update_time else "", labels=dict(live.labels),
        revisions=revisions,
        label_studio=_label_studio_states(client, settings.projects, live.uri) if client is not None else [],
        training_job=settings.job_name if has_job else "",
        executions=executions, executions_error=executions_error)


def _label_studio_states(client, projects, url: str) -> list:
    """The backend serving `url` in each Label Studio project, with its state."""
    from ...labelstudio import STATE_NAMES

    url = url.rstrip("/")
    registrations = []
    for pid in projects:
        try:
            found = [b for b in client.backends(pid) if str(b.get("url") or "").rstrip("/") == url]
        except LsdeployError as exc:  # Label Studio down: the service's status still shows
            registrations.append({"project": int(pid), "backend_id": None, "state": "",
                                  "state_name": "unknown", "error_message": str(exc)})
            continue
        if not found:
            registrations.append({"project": int(pid), "backend_id": None, "state": "",
                                  "state_name": "not registered", "error_message": ""})
        for backend in found:
            state = backend.get("state") or ""
            registrations.append({"project": int(pid), "backend_id": int(backend["id"]), "state": state,
                                  "state_name": STATE_NAMES.get(state, state),
                                  "error_message": backend.get("error_message") or ""})
    return registrations


def rollback(api, settings, to_revision: Optional[str] = None, progress=_quiet) -> RollbackResult:
    """All traffic to `to_revision`, or to the newest ready revision older than the one serving now."""
    from google.api_core import exceptions as gexc
    from google.cloud import run_v2
    from google.protobuf import field_mask_pb2

    live = get_service(api, settings)
    if live is None:
        raise LsdeployError(f"service {settings.service} is not deployed in {settings.project}/{settings.region}: "
                            "check --gcp-project-id and --gcp-region", EXIT_USAGE)
    serving = [t["revision"] for t in traffic_targets(live) if t["percent"]]
    revisions = list_revisions(api, settings)
    ready = [r.name.rsplit("/", 1)[-1] for r in revisions if revision_ready(r)[0]]
    by_name = {r.name.rsplit("/", 1)[-1]: r for r in revisions}
    if to_revision:
        target = to_revision.rsplit("/", 1)[-1]
        known = {r.name.rsplit("/", 1)[-1] for r in revisions}
        if target not in known:
            raise LsdeployError(f"service {settings.service} has no revision {target}: pass one of "
                                f"{', '.join(ready) or '(none ready)'} to --to-revision", EXIT_USAGE)
        if target not in ready:
            raise LsdeployError(f"revision {target} is not ready and cannot serve traffic: pass a ready one "
                                f"({', '.join(ready) or 'none'}) to --to-revision", EXIT_USAGE)
        if target not in serving and not image_exists(api, settings, by_name[target]):
            raise LsdeployError(f"the image of revision {target} was pruned (deploy keeps the newest "
                                f"--keep-images images), so it cannot start: deploy that code again instead",
                                EXIT_USAGE)
    else:
        names = [r.name.rsplit("/", 1)[-1] for r in revisions]
        positions = [names.index(s) for s in serving if s in names]
        newest_serving = min(positions) if positions else -1
        older = [n for n in names[newest_serving + 1:] if n in ready and n not in serving]
        pruned = []
        for name in older:  # the newest one whose image is still there (deploy prunes old images)
            if image_exists(api, settings, by_name[name]):
                target = name
                break
            pruned.append(name)
        else:
            more = (f" (the image{'s' if len(pruned) > 1 else ''} of {', '.join(pruned)} "
                    f"{'were' if len(pruned) > 1 else 'was'} pruned: deploy keeps the newest --keep-images "
                    "images)") if pruned else ""
            raise LsdeployError(f"service {settings.service} has no ready revision older than "
                                f"{', '.join(serving) or 'the serving one'} to roll back to{more}; list them with "
                                f"`label-studio-ml status {settings.service}`", EXIT_USAGE)
        if pruned:
            progress(f"skipping {', '.join(pruned)}: {'their images were' if len(pruned) > 1 else 'its image was'} "
                     "pruned")
    if serving == [target] and all(t["percent"] == 100 for t in traffic_targets(live) if t["revision"] == target):
        progress(f"{target} already serves all traffic")
        return RollbackResult(service=settings.service, from_revisions=serving, to_revision=target,
                              traffic=traffic_targets(live), url=live.uri)
    progress(f"moving all traffic of {settings.service} from {', '.join(serving) or 'none'} to {target}")
    # The live service with only its traffic changed (and its etag: a concurrent change is refused),
    # under an update mask naming just `traffic`: no new revision.
    update = run_v2.Service.deserialize(run_v2.Service.serialize(live))
    update.traffic = [run_v2.TrafficTarget(
        type_=run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION, revision=target,
        percent=100)]
    request = run_v2.UpdateServiceRequest(service=update, update_mask=field_mask_pb2.FieldMask(paths=["traffic"]))
    try:
        op = api.clients.services.update_service(request=request)
        api.result(op, settings.ready_timeout, f"moving the traffic of {settings.service} to {target}")
    except gexc.GoogleAPICallError as exc:
        raise google_error(exc, "run", "moving the traffic of", settings.service_name, settings.project) from None
    after = get_service(api, settings)
    traffic = traffic_targets(after) if after is not None else []
    if [t["revision"] for t in traffic if t["percent"]] != [target]:
        raise LsdeployError(f"Cloud Run did not move the traffic of {settings.service} to {target} (it reports "
                            f"{traffic}): check the service in the Cloud Run console", EXIT_DEPLOY)
    progress(f"{target} serves 100% of the traffic")
    if training_job.names_job(live) and by_name[target].containers:
        training_job.follow_image(api, settings, by_name[target].containers[0].image, target, progress)
    return RollbackResult(service=settings.service, from_revisions=serving, to_revision=target,
                          traffic=traffic, url=after.uri)


def image_exists(api, settings, revision) -> bool:
    """Whether the revision's image is still in this service's Artifact Registry package (an
    image from elsewhere is taken to exist)."""
    image = revision.containers[0].image if revision.containers else ""
    ours = f"{settings.image}@"
    if not image.startswith(ours):
        return True
    name = f"{settings.repository_name}/packages/{settings.service}/versions/{image[len(ours):]}"
    return api.lookup("artifactregistry", "reading image", name, settings, api.clients.registry.get_version) \
        is not None


def _package(api, settings) -> Optional[str]:
    name = f"{settings.repository_name}/packages/{settings.service}"
    found = api.lookup("artifactregistry", "reading package", name, settings, api.clients.registry.get_package)
    return name if found is not None else None


def destroy_plan(api, settings, purge: bool = False) -> DestroyResult:
    """What destroy would delete; sends no mutating request."""
    settings.validate()
    result = DestroyResult(service=settings.service, purge=purge)
    live = get_service(api, settings)
    _check_managed(settings, live)
    if live is not None:
        result.deleted.append(settings.service_name)
    job = training_job.get_job(api, settings)
    _check_managed(settings, job, "job")
    if job is not None:
        result.deleted.append(settings.job_name)
    result.deleted += own_secrets(api, settings)
    if purge:
        package = _package(api, settings)
        if package:
            result.deleted.append(f"{package} (every image of {settings.image})")
        for bucket, prefix, _ in _purged_prefixes(settings):
            if list_blobs(api, settings, bucket, prefix):
                result.deleted.append(f"gs://{bucket}/{prefix}")
        result.kept += _shared_kept(settings)
    else:
        result.kept += _kept_without_purge(settings)
    return result


def destroy(api, settings, open_label_studio, purge: bool = False, progress=_quiet) -> DestroyResult:
    """Unregister from Label Studio, delete the service and its secrets; with purge also its
    images, uploaded source bundles and model state. Safe to run again."""
    from google.api_core import exceptions as gexc

    settings.validate()
    result = DestroyResult(service=settings.service, purge=purge)
    live = get_service(api, settings)
    _check_managed(settings, live)
    _check_managed(settings, training_job.get_job(api, settings), "job")  # before anything is deleted
    client = open_label_studio(settings)
    if client is not None and live is not None:
        progress(f"removing {live.uri} from Label Studio project(s) {', '.join(map(str, settings.projects))}")
        try:
            removals = client.unregister(settings.projects, url=live.uri)
        except LsdeployError as exc:
            raise LsdeployError(f"removing the backend from Label Studio failed: {exc}; nothing was deleted "
                                "(run again, or leave out --project to skip Label Studio)", exc.exit_code) from None
        result.unregistered = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in removals]
    if live is not None:
        progress(f"deleting Cloud Run service {settings.service}")
        try:
            api.result(api.clients.services.delete_service(name=settings.service_name), settings.ready_timeout,
                         f"deleting Cloud Run service {settings.service}")
        except gexc.NotFound:
            pass
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "run", "deleting service", settings.service_name, settings.project) from None
        result.deleted.append(settings.service_name)
    if training_job.delete_job(api, settings, progress):
        result.deleted.append(settings.job_name)
    for name in own_secrets(api, settings):
        progress(f"deleting secret {name.rsplit('/', 1)[-1]}")
        try:
            api.clients.secrets.delete_secret(name=name)
        except gexc.NotFound:
            pass
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "secretmanager", "deleting secret", name, settings.project) from None
        result.deleted.append(name)
    if not purge:
        result.kept += _kept_without_purge(settings)
        return result
    package = _package(api, settings)
    if package:
        progress(f"deleting every image of {settings.image}")
        try:
            api.result(api.clients.registry.delete_package(name=package), 300, f"deleting package {package}")
        except gexc.NotFound:
            pass
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "artifactregistry", "deleting package", package, settings.project) from None
        result.deleted.append(f"{package} (every image of {settings.image})")
    for bucket, prefix, _ in _purged_prefixes(settings):
        blobs = list_blobs(api, settings, bucket, prefix)
        if not blobs:
            continue
        progress(f"deleting {len(blobs)} object(s) under gs://{bucket}/{prefix}")
        delete_blobs(api, settings, bucket, blobs)
        result.deleted.append(f"gs://{bucket}/{prefix}")
    result.kept += _shared_kept(settings)
    return result


def _check_managed(settings, live, kind: str = "service") -> None:
    """destroy removes only what lsdeploy deployed (the service, and its training job)."""
    if live is not None and live.labels.get(MANAGED_LABEL[0]) != MANAGED_LABEL[1]:
        name = settings.service if kind == "service" else settings.job_id
        raise LsdeployError(f"Cloud Run {kind} {name} was not deployed by lsdeploy (no label "
                            f"{MANAGED_LABEL[0]}={MANAGED_LABEL[1]}): nothing was deleted; remove it with `gcloud run "
                            f"{kind}s delete {name} --region {settings.region}`", EXIT_USAGE)


def _purged_prefixes(settings) -> list:
    """(bucket, prefix, what) of the service's objects that `destroy --purge` deletes."""
    return [(settings.sources_bucket_name, f"sources/{settings.service}/", "source bundles"),
            (settings.sources_bucket_name, settings.logs_prefix, "build logs"),
            (settings.state_bucket_name, f"{settings.service}/", "model state")]


def _kept_without_purge(settings) -> list:
    return [f"images of {settings.image} (pass --purge)"] + [
        f"{what} gs://{bucket}/{prefix} (pass --purge)" for bucket, prefix, what in _purged_prefixes(settings)]


def _shared_kept(settings) -> list:
    return [f"gs://{settings.sources_bucket_name} and gs://{settings.state_bucket_name} (buckets shared by every "
            "service of the project)", f"{settings.repository_name} (repository shared by every service)"]
