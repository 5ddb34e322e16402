"""The image of a source bundle: found by its `src-<digest>` tag in Artifact Registry, or built.

A build uploads the bundle create-only to the sources bucket, creates the repository when missing,
and runs Cloud Build: pull the service's previous image (`:latest`) for `--cache-from`, build, push
`:src-<digest>` and `:latest`. Its log is streamed from the logs bucket while it runs.
"""
from __future__ import annotations

import time
from typing import Optional

from ...errors import EXIT_BUILD, EXIT_DEPLOY, LsdeployError
from . import identity
from .errors import GoogleApiError, google_error
from .logs import LogStreamer
from .settings import MANAGED_LABEL, OPEN_BUILD_REGIONS, nearest_build_region
from .storage import ensure_bucket

# Cloud Build's refusal of a region for a restricted project (FAILED_PRECONDITION)
RESTRICTED_REGION = "due to quota restrictions, cannot run builds in this region"
TERMINAL_BUILD = {"SUCCESS", "FAILURE", "INTERNAL_ERROR", "TIMEOUT", "CANCELLED", "EXPIRED"}


def tag_name(settings, bundle) -> str:
    return f"src-{bundle.digest}"


def find_image(api, settings, bundle) -> Optional[str]:
    """The image (pinned by digest) already built from this bundle, or None."""
    name = f"{settings.repository_name}/packages/{settings.service}/tags/{tag_name(settings, bundle)}"
    tag = api.lookup("artifactregistry", "reading tag", name, settings, api.clients.registry.get_tag)
    if tag is None:
        return None
    digest = tag.version.rsplit("/", 1)[-1]
    return f"{settings.image}@{digest}"


def ensure_repository(api, settings, progress) -> None:
    from google.api_core import exceptions as gexc
    from google.cloud import artifactregistry_v1 as ar

    try:
        api.clients.registry.get_repository(name=settings.repository_name)
        return
    except gexc.NotFound:
        pass
    except gexc.GoogleAPICallError as exc:
        raise google_error(exc, "artifactregistry", "reading repository", settings.repository_name,
                           settings.project) from None
    progress(f"creating Artifact Registry repository {settings.repository} in {settings.region}")
    repo = ar.Repository(format_=ar.Repository.Format.DOCKER,
                         description="Label Studio ML backend images (lsdeploy)",
                         labels={MANAGED_LABEL[0]: MANAGED_LABEL[1]})
    try:
        op = api.clients.registry.create_repository(parent=settings.location, repository_id=settings.repository,
                                                     repository=repo)
        api.result(op, 300, f"creating Artifact Registry repository {settings.repository_name}")
    except gexc.AlreadyExists:
        pass  # created concurrently
    except gexc.GoogleAPICallError as exc:
        raise google_error(exc, "artifactregistry", "creating repository", settings.repository_name,
                           settings.project) from None


def upload(api, settings, bundle, progress) -> tuple:
    """(bucket, object, generation) of the bundle in the sources bucket (create-only upload)."""
    from google.api_core import exceptions as gexc

    bucket = ensure_bucket(api, settings, settings.sources_bucket_name, progress)
    name = f"sources/{settings.service}/{bundle.digest}.tar.gz"
    blob = bucket.blob(name)
    try:
        blob.upload_from_string(bundle.data, content_type="application/gzip", if_generation_match=0)
        progress(f"uploaded {bundle.size} bytes to gs://{bucket.name}/{name}")
    except gexc.PreconditionFailed:
        progress(f"gs://{bucket.name}/{name} already uploaded (same digest, same bytes)")
        blob = bucket.get_blob(name)
    except gexc.GoogleAPICallError as exc:
        raise google_error(exc, "storage", "uploading", f"gs://{bucket.name}/{name}", settings.project) from None
    return bucket.name, name, int(blob.generation or 0)


def build_request(settings, bundle, source, region: Optional[str] = None, account: str = "") -> object:
    """The build of a bundle; `account` (projects/P/serviceAccounts/EMAIL) is the identity it runs as,
    logging only to the logs bucket (which Cloud Build requires with a chosen account, and which the
    deploy streams)."""
    from google.cloud.devtools import cloudbuild_v1 as cb
    from google.protobuf import duration_pb2

    bucket, name, generation = source
    tagged = f"{settings.image}:{tag_name(settings, bundle)}"
    latest = f"{settings.image}:latest"
    steps = [
        # The previous image's layers are the cache; the first build has none (exit 0).
        cb.BuildStep(id="pull-cache", name="gcr.io/cloud-builders/docker", entrypoint="bash",
                     args=["-c", f"docker pull {latest} || exit 0"]),
        cb.BuildStep(id="build", name="gcr.io/cloud-builders/docker",
                     args=["build", "--cache-from", latest, "--build-arg", "BUILDKIT_INLINE_CACHE=1",
                           "-t", tagged, "-t", latest, "."]),
    ]
    build = cb.Build(
        steps=steps, images=[tagged, latest],
        source=cb.Source(storage_source=cb.StorageSource(bucket=bucket, object_=name, generation=generation)),
        logs_bucket=f"gs://{bucket}/{settings.logs_prefix.rstrip('/')}",
        timeout=duration_pb2.Duration(seconds=settings.build_timeout),
        tags=["lsdeploy", settings.service],
    )
    if account:
        build.service_account = account
        build.options = cb.BuildOptions(logging=cb.BuildOptions.LoggingMode.GCS_ONLY)
    # parent alone: with project_id set too, the REST client picks the legacy path
    # POST /v1/projects/P/builds, which builds in the global region (parent only becomes a query parameter)
    return cb.CreateBuildRequest(parent=settings.build_location(region), build=build)


def start_build(api, settings, bundle, source, progress, account: str = "", region: Optional[str] = None,
                note: str = "") -> tuple:
    """CreateBuild in --build-region, else the service's region; when Cloud Build refuses that
    region for this project (some new or low-usage projects may build only in a few regions), once
    in the nearest open region. (operation, build region, note)."""
    from google.api_core import exceptions as gexc

    region = region or settings.build_region or settings.region
    while True:
        location = settings.build_location(region)
        try:
            request = build_request(settings, bundle, source, region, account)
            return api.clients.builds.create_build(request=request), region, note
        except gexc.GoogleAPICallError as exc:
            message = getattr(exc, "message", None) or str(exc)
            fallback = nearest_build_region(region)
            if RESTRICTED_REGION in message and not settings.build_region and not note and fallback != region:
                note = (f"Cloud Build may not run builds in {region} for project {settings.project} (quota "
                        f"restrictions); built in {fallback} instead (pass --build-region to choose)")
                progress(f"note: {note}")
                region = fallback
                continue
            if RESTRICTED_REGION in message:
                raise GoogleApiError(f"Cloud Build API: refused to run builds in {region} for project "
                                     f"{settings.project} ({RESTRICTED_REGION}): it runs this project's builds only "
                                     f"in some regions: pass --build-region with one of "
                                     f"{', '.join(OPEN_BUILD_REGIONS)}", EXIT_DEPLOY, "QUOTA") from None
            raise google_error(exc, "cloudbuild", "starting a build in", location, settings.project) from None


class BuildFailed(LsdeployError):
    """The build ran and failed; `detail` is Cloud Build's failure detail."""

    def __init__(self, message, detail: str):
        super().__init__(message, EXIT_BUILD)
        self.detail = detail


def build_image(api, settings, bundle, progress) -> tuple:
    """Upload and build; (image pinned by digest, build id, build region, note). Raises EXIT_BUILD on
    failure. A push or a source read refused to the build's account just after it was granted
    the repository or the sources bucket (IAM takes minutes to apply) is built again, backing
    off, for up to settings.iam_wait seconds."""
    account = identity.prepare(api, settings, progress)
    ensure_repository(api, settings, progress)
    source = upload(api, settings, bundle, progress)
    identity.grant_build_access(api, settings, api.clients.storage.bucket(source[0]), account.rsplit("/", 1)[-1],
                                progress)
    region, note, attempt = None, "", 0
    while True:
        operation, region, note = start_build(api, settings, bundle, source, progress, account, region, note)
        try:
            build, build_id = wait_build(api, settings, operation, region, progress)
            break
        except BuildFailed as exc:
            if "uploadArtifacts" in exc.detail:
                what, waited = "the push", api.just_granted("build", exc.detail)
            elif "storage.objects.get" in exc.detail and source[0] in api.granted_on.get("build", ()):
                # Cloud Storage's refusal names no bucket: the grant this run made on the sources bucket
                what, waited = "its source (storage.objects.get)", api.since_grant("build")
            else:
                raise
            if waited is None or waited >= settings.iam_wait:
                raise
            attempt += 1
            pause = min(30.0, api.poll_interval * 2 ** attempt)
            progress(f"the build's service account was refused {what} it was granted {waited:.0f} s ago; IAM changes "
                     f"take minutes to apply: building again in {pause:.3g} s (attempt {attempt + 1})")
            time.sleep(pause)
    tagged = f"{settings.image}:{tag_name(settings, bundle)}"
    digest = next((img.digest for img in build.results.images if img.name == tagged), None)
    if not digest:
        raise LsdeployError(f"build {build_id} succeeded but pushed no {tagged}; see {build.log_url}", EXIT_BUILD)
    return f"{settings.image}@{digest}", build_id, region, note


def wait_build(api, settings, operation, region, progress) -> tuple:
    """Follow a started build, streaming its log; (the successful Build, its id) or BuildFailed."""
    from google.cloud.devtools import cloudbuild_v1 as cb

    meta = cb.BuildOperationMetadata.deserialize(operation.metadata.value) \
        if hasattr(operation.metadata, "value") else operation.metadata
    build = meta.build
    build_id = build.id
    progress(f"building image (Cloud Build {build_id}); logs: {build.log_url}")
    build_name = f"{settings.build_location(region)}/builds/{build_id}"
    streamer = LogStreamer(api.clients.storage, build.logs_bucket, build_id, progress)
    deadline = time.monotonic() + settings.build_timeout + 300
    while True:
        build = api.call("cloudbuild", "reading build", build_name, settings,
                         api.clients.builds.get_build, name=build_name)
        streamer.poll()
        if cb.Build.Status(build.status).name in TERMINAL_BUILD:
            break
        if time.monotonic() > deadline:
            raise LsdeployError(f"build {build_id} did not finish in {settings.build_timeout + 300} s: see "
                                f"{build.log_url}", EXIT_BUILD)
        time.sleep(api.poll_interval)
    streamer.poll()
    status = cb.Build.Status(build.status).name
    if status == "TIMEOUT":
        tail = " | ".join(streamer.tail(8))
        raise BuildFailed(f"the image build timed out after {settings.build_timeout} s (--build-timeout): raise it "
                          f"(at most 86400) or slim the image's dependencies; log tail: {tail or '(no log)'}; full "
                          f"log: {build.log_url}; nothing was deployed", "timeout")
    if status != "SUCCESS":
        failing = [f"step {i} ({s.id or s.name})" for i, s in enumerate(build.steps)
                   if cb.Build.Status(s.status).name in ("FAILURE", "TIMEOUT", "INTERNAL_ERROR")]
        detail = build.failure_info.detail or build.status_detail or status
        tail = " | ".join(streamer.tail(8))
        raise BuildFailed(f"the image build failed ({status}) at {failing[0] if failing else 'the build'}: "
                          f"{detail}; log tail: {tail or '(no log)'}; full log: {build.log_url}; "
                          "nothing was deployed", detail)
    return build, build_id
