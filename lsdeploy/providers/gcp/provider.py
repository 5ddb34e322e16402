"""Cloud Run: build a backend's source bundle with Cloud Build and serve it on Cloud Run v2.

`GcpProvider(clients).deploy(settings, bundle, progress)`:
1. the image (`build`): one Artifact Registry GetTag for the bundle's digest; when the tag exists
   the upload and the build are skipped. Otherwise the repository and source bucket are created
   when missing, the bundle is uploaded create-only, and a Cloud Build build pulls the previous
   image of the service (`:latest`) for `--cache-from`, builds, and pushes `:src-<digest>` and
   `:latest`; its log is streamed from the logs bucket while it runs (`logs`);
2. secrets (`secrets`): the basic-auth password (generated once, then reused) and the Label Studio
   key go to Secret Manager; the service references pinned versions, so an unchanged key makes no
   revision;
3. the Cloud Run service (`service`): image pinned by digest, MODEL_STATE_URI in a state bucket
   (`storage`), resources, scaling, startup CPU boost, a startup probe on /health, cpu_idle=false,
   public invoker (Label Studio cannot send Google identity tokens) behind the backend's own basic
   auth. A spec fingerprint kept in a service annotation makes an unchanged redeploy send no
   update at all;
4. a warm-up GET /health (so Label Studio's 1 s health check meets a started instance), then
   registration with Label Studio through `lsdeploy.labelstudio`;
5. pruning of old images, source bundles and build logs (`prune`).

`status`, `rollback` and `destroy` live in `ops`. Clients are passed in (`GcpClients`, `clients`);
Google API errors become one line naming the API, the resource and the fix (`errors`).
"""
from __future__ import annotations

import functools
import time
from typing import Callable, Optional

from ...errors import EXIT_DEPLOY, LsdeployError
from ..base import DeployResult, DestroyResult, PlanResult, Provider, RollbackResult, StatusResult, _quiet
from . import build as cloudbuild
from . import job as training_job
from . import ops, preflight, secrets, storage
from . import prune as pruning
from . import service as cloudrun
from .clients import GcpApi, GcpClients
from .errors import auth_errors
from .settings import SPEC_ANNOTATION, GcpSettings, unreachable_label_studio


def _with_api(fn):
    """A provider method that calls fn(self.api, ...)."""
    @functools.wraps(fn)
    def method(self, *args, **kwargs):
        return fn(self.api, *args, **kwargs)
    return method


class GcpProvider(Provider):
    name = "gcp"

    def __init__(self, clients: GcpClients, polling=None, poll_interval: float = 2.0, http_get=None,
                 labelstudio_factory: Optional[Callable] = None):
        # polling: api_core polling for operations (tests: faster); poll_interval: build status / log polling
        self.api = GcpApi(clients, polling, poll_interval)
        self.clients = clients
        self._http_get = http_get
        self._labelstudio_factory = labelstudio_factory

    # -- the steps, each from its module ------------------------------------------------------
    tag_name = staticmethod(cloudbuild.tag_name)
    find_image = _with_api(cloudbuild.find_image)
    ensure_repository = _with_api(cloudbuild.ensure_repository)
    upload = _with_api(cloudbuild.upload)
    build_request = staticmethod(cloudbuild.build_request)
    ensure_bucket = _with_api(storage.ensure_bucket)
    grant_bucket_access = _with_api(storage.grant_bucket_access)
    check_secrets = staticmethod(secrets.check_secrets)
    latest_secret_value = _with_api(secrets.latest_secret_value)
    ensure_secret = _with_api(secrets.ensure_secret)
    secret_refs = _with_api(secrets.secret_refs)
    user_secrets = _with_api(secrets.user_secrets)
    existing_secret = _with_api(secrets.existing_secret)
    peek_secret = _with_api(secrets.peek_secret)
    grant_accessor = _with_api(secrets.grant_accessor)
    desired_service = staticmethod(cloudrun.desired_service)
    spec_hash = staticmethod(cloudrun.spec_hash)
    get_service = _with_api(cloudrun.get_service)
    apply_service = _with_api(cloudrun.apply_service)
    list_revisions = _with_api(cloudrun.list_revisions)
    prune_candidates = _with_api(pruning.prune_candidates)
    prune = _with_api(pruning.prune)

    def build(self, settings, bundle, progress) -> tuple:
        """Upload and build; (image pinned by digest, build id, build region, note). Raises EXIT_BUILD on failure."""
        secrets.check_current_password(self.api, settings, bundle)
        return cloudbuild.build_image(self.api, settings, bundle, progress)

    @auth_errors
    def check(self, settings, enable: bool = False, progress=_quiet) -> "preflight.Readiness":
        """Is the project ready for a deploy (APIs enabled, permissions held)? Sends only reads, and
        with `enable` the enabling of missing APIs. `deploy gcp --check`."""
        settings.validate()
        return preflight.preflight(self.api, settings, enable=enable, progress=progress)

    @staticmethod
    def warn_unreachable(settings, progress) -> None:
        """Label Studio and the backend call each other: an address Cloud Run cannot reach makes a
        backend that cannot read task data (and, with --project, a connection check that fails)."""
        why = unreachable_label_studio(settings.label_studio_url or "")
        if why:
            progress(f"warning: the service on Cloud Run cannot reach Label Studio at {settings.label_studio_url} ("
                     f"{why}): pass --label-studio-host with a public URL, or expose the local Label Studio through "
                     "a tunnel (ngrok, cloudflared) and pass its URL")

    def warm_up(self, url: str, settings, progress) -> None:
        """GET /health until it answers, so Label Studio's 1 s health check meets a started instance."""
        get = self._http_get
        if get is None:
            import requests

            get = lambda u: requests.get(u, timeout=10)  # noqa: E731
        deadline = time.monotonic() + settings.warmup_timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                resp = get(url.rstrip("/") + "/health")
                if resp.status_code == 200:
                    return
                last = f"HTTP {resp.status_code}"
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                last = type(exc).__name__
            time.sleep(min(self.api.poll_interval, 1.0))
        raise LsdeployError(f"{url}/health did not answer 200 within {settings.warmup_timeout:.0f} s ({last}): check "
                            "the service's logs in the Cloud Run console; Label Studio was not changed", EXIT_DEPLOY)

    @auth_errors
    def deploy(self, settings: GcpSettings, bundle, progress=_quiet) -> DeployResult:
        started = time.monotonic()
        settings.validate()
        self.check_secrets(settings, bundle)
        self.warn_unreachable(settings, progress)
        readiness = self.check(settings, enable=settings.enable_apis, progress=progress)  # before any write
        for note in readiness.notes:
            progress(f"note: {note}")
        preflight.require(readiness)
        checked = self.user_secrets(settings)  # before anything is built or written
        progress(f"checking for an image of bundle {bundle.short_digest}")
        image = self.find_image(settings, bundle)
        build_id = build_region = None
        build_note = ""
        if image:
            progress(f"image for bundle {bundle.short_digest} exists: no upload, no build")
        else:
            image, build_id, build_region, build_note = self.build(settings, bundle, progress)
            progress(f"built {image}")

        refs = self.secret_refs(settings, progress, checked=checked)
        secret_refs, member, password = refs.refs, refs.member, refs.password

        desired = self.desired_service(settings, image, secret_refs)
        desired.annotations[SPEC_ANNOTATION] = self.spec_hash(desired)
        live = self.get_service(settings)
        if live is None or live.annotations.get(SPEC_ANNOTATION) != desired.annotations[SPEC_ANNOTATION]:
            bucket = self.ensure_bucket(settings, settings.state_bucket_name, progress)  # MODEL_STATE_URI's bucket
            state_member = member or (f"serviceAccount:{settings.service_account}" if settings.service_account else None)
            if not state_member and settings.state_bucket is None and bucket.project_number:
                # without --service-account the service runs as the project's compute default service
                # account; the default state bucket lives in the project, so it tells the project number
                state_member = secrets.member_for(settings, str(bucket.project_number))
            if state_member:
                self.grant_bucket_access(settings, bucket, state_member, progress)
            else:
                progress(f"note: the service runs as the compute default service account, which needs "
                         f"roles/storage.objectUser on gs://{bucket.name}: run `gcloud storage buckets "
                         f"add-iam-policy-binding gs://{bucket.name} --member serviceAccount:$(gcloud projects describe "
                         f"{settings.project} --format='value(projectNumber)')-compute@developer.gserviceaccount.com "
                         "--role roles/storage.objectUser` (or pass --service-account)")
        job_action = self.apply_training_job(settings, image, secret_refs, member, progress)
        service, changed = self.apply_service(settings, desired, live, progress)
        if changed:
            service = self.get_service(settings) or service
        if settings.training != "job" and training_job.names_job(live):
            # back to --training service: the service no longer starts executions, so the job goes
            job_action = "deleted" if training_job.delete_job(self.api, settings, progress) else ""
        revision = service.latest_ready_revision.rsplit("/", 1)[-1]
        url = service.uri
        progress(f"serving at {url} (revision {revision}{'' if changed else ', unchanged'})")

        registrations = []
        if settings.projects:
            self.warm_up(url, settings, progress)
            progress(f"registering {url} with Label Studio project(s) {', '.join(map(str, settings.projects))}")
            try:
                registrations = self.register(settings, url, password)
            except LsdeployError as exc:
                raise LsdeployError(f"deployed {url} (revision {revision}) but registering it with Label Studio "
                                    f"failed: {exc}", exc.exit_code) from None
        pruned, prune_error = [], ""
        # storage grows only when something was built or deployed: an unchanged redeploy stays at its few reads
        if settings.prune and (build_id is not None or changed):
            try:
                keep = pruning.serving_images(self.api, settings, service) | {image.rsplit("@", 1)[-1]}
                pruned = self.prune(settings, keep, bundle=bundle, progress=progress)
            except LsdeployError as exc:  # housekeeping: the deploy itself succeeded
                prune_error = f"old images were not pruned: {exc} (or pass --no-prune)"
                progress(f"warning: {prune_error}")
        return DeployResult(
            provider=self.name, project=settings.project, region=settings.region, service=settings.service, url=url,
            revision=revision, image=image, bundle_digest=bundle.digest, built=build_id is not None,
            build_id=build_id, new_revision=changed and (live is None or live.latest_ready_revision != service.latest_ready_revision),
            state_uri=settings.state_uri, basic_auth_user=settings.basic_auth_user if settings.basic_auth else None,
            secrets=sorted({ref[0] for ref in secret_refs.values()}),
            registrations=[r.to_dict() for r in registrations], pruned=pruned, prune_error=prune_error,
            seconds=round(time.monotonic() - started, 3), build_region=build_region, build_region_note=build_note,
            training_job=settings.job_name if job_action else "", training_job_action=job_action,
        )

    def apply_training_job(self, settings, image: str, secret_refs: dict, member, progress) -> str:
        """--training job: the job from the service's image, env and identity, and the service's right to
        run it; "created", "updated" or "unchanged" ("" with --training service). Before the service:
        a revision that names the job finds it ready to run."""
        if settings.training != "job":
            return ""
        desired = training_job.desired_job(settings, image, cloudrun.container_env(settings, secret_refs))
        live = training_job.get_job(self.api, settings)
        _, changed = training_job.apply_job(self.api, settings, desired, live, progress)
        runtime = member or (secrets.member_for(settings, self.api.project_number or "")
                             if settings.service_account or self.api.project_number else None)
        if runtime:
            training_job.grant_executor(self.api, settings, runtime, progress)
        else:
            progress(f"note: grant the service's identity roles/run.jobsExecutorWithOverrides and roles/run.viewer on "
                     f"job {settings.job_id} (gcloud run jobs add-iam-policy-binding), or pass --service-account")
        return "unchanged" if not changed else ("created" if live is None else "updated")

    def register(self, settings, url, password) -> list:
        return self._label_studio_client(settings).register(
            url, settings.projects, title=settings.title or f"{settings.service} (Cloud Run)",
            basic_auth=(settings.basic_auth_user, password) if settings.basic_auth else None)

    @auth_errors
    def plan(self, settings, bundle) -> PlanResult:
        """What `deploy(settings, bundle)` would do; sends only reads (Get/List/Access)."""
        settings.validate()
        self.check_secrets(settings, bundle)  # deploy would refuse this bundle: so does its plan
        preflight.require(self.check(settings))  # and a project it is not ready for (enabling nothing)
        image = self.find_image(settings, bundle)
        if image is None:
            secrets.check_current_password(self.api, settings, bundle)
        live = self.get_service(settings)
        refs = self.secret_refs(settings, apply=False)
        target = image or f"{settings.image}:{self.tag_name(settings, bundle)}"
        desired = self.desired_service(settings, target, refs.refs)
        if image and not any(version == "new" for _, version in refs.refs.values()):
            desired.annotations[SPEC_ANNOTATION] = self.spec_hash(desired)
        changes = cloudrun.service_changes(live, desired)
        if live is None:
            action = "create"
        elif cloudrun.up_to_date(live, desired):
            action = "none"
        else:
            action = "update"
            if not changes:  # same settings; lsdeploy's own part of the spec (probe, annotations) differs
                changes = [{"field": "lsdeploy spec (startup probe, annotations)", "live": "older", "desired": "current"}]
        job_changes = self.plan_training_job(settings, target, refs.refs, live)
        changes += job_changes
        if job_changes and action == "none":
            action = "update"
        prune = []
        if settings.prune and (image is None or action != "none"):  # as deploy: only after a build or a change
            serving = pruning.serving_images(self.api, settings, live) | (
                {image.rsplit("@", 1)[-1]} if image else set())
            images, sources = self.prune_candidates(settings, serving, new_image=not image, bundle=bundle)
            prune = [f"image {settings.image}@{digest}" for _, digest in images] + [
                f"gs://{settings.sources_bucket_name}/{blob.name}" for blob in sources]
        return PlanResult(
            service=settings.service, project=settings.project, region=settings.region, action=action,
            service_exists=live is not None, bundle_digest=bundle.digest, bundle_size=bundle.size,
            bundle_files=[{"path": f.path, "size": f.size, "source": f.source} for f in bundle.files],
            dockerfile=bundle.dockerfile, dockerfile_text=bundle.dockerfile_text, ignore_file=bundle.ignore_file,
            image=target, build_needed=image is None, changes=changes, prune=prune,
            label_studio_projects=list(settings.projects))

    def plan_training_job(self, settings, image: str, secret_refs: dict, live_service) -> list:
        """The job's part of the --dry-run diff: its fields (job.*), or its deletion."""
        if settings.training == "job":
            desired = training_job.desired_job(settings, image, cloudrun.container_env(settings, secret_refs))
            live = training_job.get_job(self.api, settings)
            return [] if training_job.up_to_date(live, desired) else training_job.job_changes(live, desired)
        if training_job.names_job(live_service) and training_job.get_job(self.api, settings) is not None:
            return [{"field": "job", "live": settings.job_name, "desired": "(deleted: --training service)"}]
        return []

    # -- operating a deployed service (ops) ----------------------------------------------------
    def _label_studio(self, settings):
        """A Label Studio client when host, key and project(s) are known, else None."""
        if not (settings.label_studio_url and settings.label_studio_api_key and settings.projects):
            return None
        return self._label_studio_client(settings)

    def _label_studio_client(self, settings):
        from ... import labelstudio

        factory = self._labelstudio_factory or labelstudio.LabelStudio
        return factory(settings.label_studio_url, settings.label_studio_api_key)

    @auth_errors
    def status(self, settings) -> StatusResult:
        return ops.status(self.api, settings, self._label_studio)

    @auth_errors
    def rollback(self, settings, to_revision: Optional[str] = None, progress=_quiet) -> RollbackResult:
        """All traffic to `to_revision`, or to the newest ready revision older than the one serving now."""
        return ops.rollback(self.api, settings, to_revision, progress)

    @auth_errors
    def destroy_plan(self, settings, purge: bool = False) -> DestroyResult:
        """What destroy would delete; sends no mutating request."""
        return ops.destroy_plan(self.api, settings, purge)

    @auth_errors
    def destroy(self, settings, purge: bool = False, progress=_quiet) -> DestroyResult:
        """Unregister from Label Studio, delete the service and its secrets; with purge also its
        images, uploaded source bundles and model state. Safe to run again."""
        return ops.destroy(self.api, settings, self._label_studio, purge, progress)
