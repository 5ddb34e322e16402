"""`FakeGoogleCloud`: the four fake control-plane APIs on one local server, plus the fault API.

    with FakeGoogleCloud(storage_url=emulator.url) as cloud:
        env = cloud.env            # CLOUDSDK_API_ENDPOINT_OVERRIDES_* (+ STORAGE_EMULATOR_HOST: the
                                   # bucket-IAM front of storage_iam.py, forwarding to the emulator)
        cloud.deny("run", "CreateService")
        cloud.disable_api("cloudbuild")
        cloud.log.count(api="cloudbuild", method="CreateBuild")
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .artifactregistry import ArtifactRegistryFake
from .cloudbuild import CloudBuildFake
from .cloudlogging import CloudLoggingFake
from .cloudrun import CloudRunFake
from .cloudrun_jobs import CloudRunJobsFake
from .iam import IamPropagation
from .iamadmin import IamAdminFake
from .resourcemanager import ResourceManagerFake
from .secretmanager import SecretManagerFake
from .serviceusage import ServiceUsageFake
from .storage_iam import BucketIam, StorageIamFront
from .server import (ApiError, Fault, FakeServer, permission_denied_error, project_number, quota_error,
                     service_disabled_error)

ENDPOINT_VARIABLES = {
    "run": "CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN",
    "cloudbuild": "CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDBUILD",
    "artifactregistry": "CLOUDSDK_API_ENDPOINT_OVERRIDES_ARTIFACTREGISTRY",
    "secretmanager": "CLOUDSDK_API_ENDPOINT_OVERRIDES_SECRETMANAGER",
    "serviceusage": "CLOUDSDK_API_ENDPOINT_OVERRIDES_SERVICEUSAGE",
    "cloudresourcemanager": "CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDRESOURCEMANAGER",
    "iam": "CLOUDSDK_API_ENDPOINT_OVERRIDES_IAM",
    "logging": "CLOUDSDK_API_ENDPOINT_OVERRIDES_LOGGING",
}

# The IAM permission each method checks (what a PERMISSION_DENIED names).
PERMISSIONS = {
    ("run", "CreateService"): "run.services.create", ("run", "GetService"): "run.services.get",
    ("run", "UpdateService"): "run.services.update", ("run", "DeleteService"): "run.services.delete",
    ("run", "ListServices"): "run.services.list", ("run", "GetIamPolicy"): "run.services.getIamPolicy",
    ("run", "SetIamPolicy"): "run.services.setIamPolicy", ("run", "GetOperation"): "run.operations.get",
    ("run", "ListRevisions"): "run.revisions.list", ("run", "GetRevision"): "run.revisions.get",
    ("run", "DeleteRevision"): "run.revisions.delete",
    ("run", "CreateJob"): "run.jobs.create", ("run", "GetJob"): "run.jobs.get", ("run", "UpdateJob"): "run.jobs.update",
    ("run", "DeleteJob"): "run.jobs.delete", ("run", "ListJobs"): "run.jobs.list", ("run", "RunJob"): "run.jobs.run",
    ("run", "GetExecution"): "run.executions.get", ("run", "ListExecutions"): "run.executions.list",
    ("run", "CancelExecution"): "run.executions.cancel",
    ("logging", "ListLogEntries"): "logging.logEntries.list",
    ("cloudbuild", "CreateBuild"): "cloudbuild.builds.create", ("cloudbuild", "GetBuild"): "cloudbuild.builds.get",
    ("cloudbuild", "ListBuilds"): "cloudbuild.builds.list", ("cloudbuild", "CancelBuild"): "cloudbuild.builds.update",
    ("cloudbuild", "GetOperation"): "cloudbuild.builds.get",
    ("artifactregistry", "GetRepository"): "artifactregistry.repositories.get",
    ("artifactregistry", "CreateRepository"): "artifactregistry.repositories.create",
    ("artifactregistry", "ListRepositories"): "artifactregistry.repositories.list",
    ("artifactregistry", "DeleteRepository"): "artifactregistry.repositories.delete",
    ("artifactregistry", "ListDockerImages"): "artifactregistry.dockerimages.list",
    ("artifactregistry", "GetDockerImage"): "artifactregistry.dockerimages.get",
    ("artifactregistry", "GetTag"): "artifactregistry.tags.get",
    ("artifactregistry", "ListTags"): "artifactregistry.tags.list",
    ("artifactregistry", "CreateTag"): "artifactregistry.tags.create",
    ("artifactregistry", "DeleteTag"): "artifactregistry.tags.delete",
    ("artifactregistry", "ListVersions"): "artifactregistry.versions.list",
    ("artifactregistry", "GetVersion"): "artifactregistry.versions.get",
    ("artifactregistry", "DeleteVersion"): "artifactregistry.versions.delete",
    ("artifactregistry", "ListPackages"): "artifactregistry.packages.list",
    ("artifactregistry", "DeletePackage"): "artifactregistry.packages.delete",
    ("secretmanager", "CreateSecret"): "secretmanager.secrets.create",
    ("secretmanager", "GetSecret"): "secretmanager.secrets.get",
    ("secretmanager", "ListSecrets"): "secretmanager.secrets.list",
    ("secretmanager", "DeleteSecret"): "secretmanager.secrets.delete",
    ("secretmanager", "UpdateSecret"): "secretmanager.secrets.update",
    ("secretmanager", "AddSecretVersion"): "secretmanager.versions.add",
    ("secretmanager", "AccessSecretVersion"): "secretmanager.versions.access",
    ("secretmanager", "GetSecretVersion"): "secretmanager.versions.get",
    ("secretmanager", "ListSecretVersions"): "secretmanager.versions.list",
    ("secretmanager", "GetIamPolicy"): "secretmanager.secrets.getIamPolicy",
    ("secretmanager", "SetIamPolicy"): "secretmanager.secrets.setIamPolicy",
    ("serviceusage", "BatchGetServices"): "serviceusage.services.get",
    ("serviceusage", "GetService"): "serviceusage.services.get",
    ("serviceusage", "ListServices"): "serviceusage.services.list",
    ("serviceusage", "EnableService"): "serviceusage.services.enable",
    ("serviceusage", "BatchEnableServices"): "serviceusage.services.enable",
    ("cloudresourcemanager", "GetProject"): "resourcemanager.projects.get",
    ("cloudresourcemanager", "GetIamPolicy"): "resourcemanager.projects.getIamPolicy",
    ("cloudresourcemanager", "SetIamPolicy"): "resourcemanager.projects.setIamPolicy",
    ("iam", "GetServiceAccount"): "iam.serviceAccounts.get",
    ("iam", "CreateServiceAccount"): "iam.serviceAccounts.create",
    ("iam", "GetIamPolicy"): "iam.serviceAccounts.getIamPolicy",
    ("iam", "SetIamPolicy"): "iam.serviceAccounts.setIamPolicy",
    ("artifactregistry", "GetIamPolicy"): "artifactregistry.repositories.getIamPolicy",
    ("artifactregistry", "SetIamPolicy"): "artifactregistry.repositories.setIamPolicy",
}


def permission_for(api: str, method: str) -> str:
    if (api, method) in PERMISSIONS:
        return PERMISSIONS[(api, method)]
    verb = next((v for v in ("Create", "Get", "List", "Update", "Delete") if method.startswith(v)), "")
    noun = method[len(verb):].lower() or "resources"
    return f"{api}.{noun}s.{verb.lower() or method}"


def permission_of(entry) -> str | None:
    """The permission a logged request needs, or None when PERMISSIONS has no entry for it. Cloud
    Run's IAM methods are shared by services and jobs: a job's policy needs run.jobs.*IamPolicy,
    a service's run.services.*IamPolicy."""
    if (entry.api, entry.method) not in PERMISSIONS:
        return None
    if entry.api == "run" and entry.method in ("GetIamPolicy", "SetIamPolicy") \
            and "/jobs/" in resource_of(entry.request):
        return f"run.jobs.{entry.method[0].lower()}{entry.method[1:]}"
    return PERMISSIONS[(entry.api, entry.method)]


def resource_of(request) -> str:
    """The resource a request acts on, for error messages."""
    if request is None:
        return ""
    for name in ("name", "parent", "resource"):
        if name in request.DESCRIPTOR.fields_by_name and getattr(request, name):
            return getattr(request, name)
    for f in request.DESCRIPTOR.fields:  # UpdateX: the body's name
        if f.message_type is not None and not f.is_repeated and request.HasField(f.name):
            inner = getattr(request, f.name)
            if "name" in inner.DESCRIPTOR.fields_by_name and inner.name:
                return inner.name
    if "project_id" in request.DESCRIPTOR.fields_by_name:
        return f"projects/{request.project_id}"
    if "resource_names" in request.DESCRIPTOR.fields_by_name and request.resource_names:  # Logging
        return request.resource_names[0]
    return ""


def project_of(entry) -> str:
    parts = resource_of(entry.request).split("/")
    return parts[1] if len(parts) > 1 and parts[0] == "projects" else (
        parts[2] if len(parts) > 2 and parts[0] == "operations" else "unknown")


# ------------------------------------------------------------------------------------------------
# Cloud Storage as the build service sees it


class MemoryStorage:
    """Objects kept in memory: for API tests that do not start the Cloud Storage emulator."""

    enabled = True

    def __init__(self):
        self.objects: dict[tuple[str, str], bytes] = {}

    def get(self, bucket: str, name: str, generation=None) -> bytes | None:
        return self.objects.get((bucket, name))

    def put(self, bucket: str, name: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.objects[(bucket, name)] = data


class EmulatorStorage:
    """The fake-gcs-server emulator, through the official client (anonymous, plain http)."""

    enabled = True

    def __init__(self, url: str):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        self.url = url.rstrip("/")
        self.client = storage.Client(project="lsdeploy-fakes", credentials=AnonymousCredentials(),
                                     client_options={"api_endpoint": self.url})

    def get(self, bucket: str, name: str, generation=None) -> bytes | None:
        from google.api_core import exceptions

        try:
            return self.client.bucket(bucket).blob(name, generation=generation).download_as_bytes()
        except exceptions.NotFound:
            return None

    def put(self, bucket: str, name: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        from google.api_core import exceptions

        try:
            self.client.bucket(bucket).blob(name).upload_from_string(data, content_type=content_type)
        except exceptions.NotFound:
            pass  # no such bucket: the real service would fail to write its log; the build goes on


# ------------------------------------------------------------------------------------------------


class FakeGoogleCloud:
    """Cloud Run v2, Cloud Build v1, Artifact Registry v1 and Secret Manager v1 on one local port.

    runner: start each ready Cloud Run revision as a local process (off for pure API tests).
    storage_url: the Cloud Storage emulator (defaults to none: an in-memory object store,
        `cloud.storage.put(bucket, name, data)`, stands in for the build sources). With it, a front
        (storage_iam.py) answers bucket IAM and forwards the rest: `cloud.env` points the deploy's
        clients at the front, and the bucket grants the build and the revisions need are enforced.
    operation_polls: how many polls a long-running operation (and a build) needs to finish.
    run_env: environment given to every revision process (e.g. STORAGE_EMULATOR_HOST), standing
        in for the network access a real Cloud Run container has.
    iam_delay: seconds before an IAM binding written through SetIamPolicy takes effect (Google:
        about 2 minutes, sometimes 7 or more); a revision created sooner cannot read the secret.
    engine: a container engine (tests/engine.py) for real builds and real revisions, "auto" for
        the one engine() finds (None where none exists: `cloud.revision_runner` says which ran),
        or None (default): builds on paper, revisions as local processes (runner.py).
    """

    def __init__(self, runner: bool = False, storage_url: str | None = None, operation_polls: int = 2,
                 ready_delay: float = 0.2, startup_deadline: float = 120.0, run_env: dict | None = None,
                 workdir: str | Path | None = None, require_secret_access: bool = True,
                 enforce_invoker: bool = True, iam_delay: float = 0.0, engine=None):
        if engine == "auto":
            from engine import engine as find_engine

            engine = find_engine()
        self.engine = engine  # real builds and containers (tests/engine.py), or None: on paper, processes
        self.server = FakeServer(operation_polls=operation_polls)
        self.iam = IamPropagation(iam_delay)  # seconds before a new IAM binding takes effect
        self.deployer: set[str] | None = None  # the caller's permissions (None: all); see restrict_deployer()
        self.caller = "user:deployer@example.com"  # who the caller is, for bindings on resources
        # organization policy iam.automaticIamGrantsForDefaultServiceAccounts: off in organizations
        # created since 3 May 2024 (the compute default account then holds no role)
        self.automatic_default_grants = True
        self.storage_url = storage_url
        # the fakes' own reads and writes (build sources, build logs) go to the emulator directly
        self.storage = EmulatorStorage(storage_url) if storage_url else MemoryStorage()
        self.bucket_iam = BucketIam(self)  # bucket policies and the uniform-access organization policy
        self.storage_front = StorageIamFront(self.bucket_iam, storage_url) if storage_url else None
        self.bucket_iam.enforce = self.storage_front is not None
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="gcp-fakes-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.artifactregistry = ArtifactRegistryFake(self)
        self.secretmanager = SecretManagerFake(self)
        self.cloudbuild = CloudBuildFake(self)
        self.run = CloudRunFake(self, runner=runner, ready_delay=ready_delay, startup_deadline=startup_deadline,
                                require_secret_access=require_secret_access, enforce_invoker=enforce_invoker)
        self.jobs = CloudRunJobsFake(self)  # Cloud Run jobs and their executions (after the services: shared IAM routes)
        self.serviceusage = ServiceUsageFake(self)
        self.iamadmin = IamAdminFake(self)
        self.resourcemanager = ResourceManagerFake(self)
        self.logging = CloudLoggingFake(self)  # the revisions' logs (entries.list)
        # revision processes reach the emulator directly: their state-bucket access is checked when
        # the revision is created (cloudrun_revisions.py), as the container's start-up check would
        self.run.extra_env = dict(run_env or ({"STORAGE_EMULATOR_HOST": storage_url} if storage_url else {}))

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> "FakeGoogleCloud":
        self.server.start()
        if self.storage_front is not None:
            self.storage_front.start()
        return self

    def stop(self) -> None:
        with self.server.lock:
            self.run.close()
            self.jobs.close()
        self.server.stop()
        if self.storage_front is not None:
            self.storage_front.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def revision_runner(self) -> str:
        """What builds images and runs revisions: "podman containers (real images)" or the fallback."""
        if self.engine is not None:
            return f"{self.engine.name} containers (real images)"
        return "local processes (builds on paper)"

    @property
    def log(self):
        return self.server.log

    @property
    def endpoint_env(self) -> dict[str, str]:
        """gcloud's endpoint override variables, all pointing at this server."""
        return {variable: self.url + "/" for variable in ENDPOINT_VARIABLES.values()}

    @property
    def env(self) -> dict[str, str]:
        env = dict(self.endpoint_env)
        if self.storage_front is not None:
            env["STORAGE_EMULATOR_HOST"] = self.storage_front.url
        return env

    def caller_env(self, account: str) -> dict:
        """The Run endpoint a revision or job task running as `account` calls (its requests are that
        account's, as the metadata server's token makes them on Google)."""
        return self.jobs.caller_env(account)

    @staticmethod
    def project_number(project: str) -> str:
        return project_number(project)

    # ---- faults ----------------------------------------------------------------------------
    def fault(self, api: str | None, method: str | None, error, times: int | None = None, match=None) -> Fault:
        """Answer `error(entry)` (an ApiError factory, or an ApiError) instead of handling the request."""
        factory = error if callable(error) else (lambda entry: error)
        return self.server.add_fault(Fault(api, method, factory, times, match))

    def deny(self, api: str, method: str | None = None, permission: str | None = None, times: int | None = None,
             match=None) -> Fault:
        """403 PERMISSION_DENIED (reason IAM_PERMISSION_DENIED) naming the permission the call needs."""
        return self.fault(api, method, lambda entry: permission_denied_error(
            permission or permission_of(entry) or permission_for(entry.api, entry.method), resource_of(entry.request)),
            times, match)

    def fresh_project(self) -> "FakeGoogleCloud":
        """A project as a new user gets it in an organization created after May 2024: only the default
        APIs enabled, Cloud Build running as the Compute Engine default account, which has no role
        (no automatic grants), builds only in Cloud Build's open regions, and buckets only with
        uniform bucket-level access (organization policy constraints/storage.uniformBucketLevelAccess)."""
        self.serviceusage.disable("run.googleapis.com", "cloudbuild.googleapis.com", "artifactregistry.googleapis.com",
                                  "secretmanager.googleapis.com", "iam.googleapis.com")
        self.cloudbuild.default_identity = "compute"
        self.automatic_default_grants = False
        self.cloudbuild.restrict_regions()
        self.bucket_iam.require_uniform_access = True
        return self

    def restrict_deployer(self, permissions) -> Fault:
        """The caller holds only `permissions`: every other call answers 403 IAM_PERMISSION_DENIED
        naming the permission it needs, and testIamPermissions answers only these."""
        self.deployer = set(permissions)
        return self.fault(None, None, lambda entry: permission_denied_error(
            permission_of(entry), resource_of(entry.request)),
            match=lambda entry: self.deployer is not None and entry.method not in ("TestIamPermissions", "GetOperation")
            and permission_of(entry) not in (None, *self.deployer))

    def disable_api(self, api: str, times: int | None = None) -> Fault:
        """Every call to `api` answers 403 with reason SERVICE_DISABLED, like an API not enabled."""
        return self.fault(api, None, lambda entry: service_disabled_error(
            api, project_number(project_of(entry))), times)

    def quota(self, api: str, method: str | None = None, times: int | None = 1) -> Fault:
        """429 RESOURCE_EXHAUSTED (reason RATE_LIMIT_EXCEEDED)."""
        return self.fault(api, method, lambda entry: quota_error(entry.api, project_number(project_of(entry))), times)

    def fail(self, api: str, method: str, status: str, message: str, times: int | None = 1) -> Fault:
        return self.fault(api, method, ApiError(status, message), times)

    def clear_faults(self) -> None:
        self.server.clear_faults()
