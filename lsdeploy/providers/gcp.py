"""Cloud Run: build a backend's source bundle with Cloud Build and serve it on Cloud Run v2.

`GcpProvider(clients).deploy(settings, bundle, progress)`:
1. the image: one Artifact Registry GetTag for the bundle's digest; when the tag exists the
   upload and the build are skipped. Otherwise the repository and source bucket are created when
   missing, the bundle is uploaded create-only, and a Cloud Build build pulls the previous image
   of the service (`:latest`) for `--cache-from`, builds, and pushes `:src-<digest>` and `:latest`;
   its log is streamed from the logs bucket while it runs;
2. secrets: the basic-auth password (generated once, then reused) and the Label Studio key go to
   Secret Manager; the service references pinned versions, so an unchanged key makes no revision;
3. the Cloud Run service: image pinned by digest, MODEL_STATE_URI in a state bucket, resources,
   scaling, startup CPU boost, a startup probe on /health, cpu_idle=false, public invoker (Label
   Studio cannot send Google identity tokens) behind the backend's own basic auth. A spec
   fingerprint kept in a service annotation makes an unchanged redeploy send no update at all;
4. a warm-up GET /health (so Label Studio's 1 s health check meets a started instance), then
   registration with Label Studio through `lsdeploy.labelstudio`.

Clients are passed in (`GcpClients`); `GcpClients.from_env(environ, project)` builds them from
gcloud's endpoint overrides or Application Default Credentials. Google API errors become one
line naming the API, the resource and the fix (`google_error`).
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import re
import secrets as pysecrets
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..errors import EXIT_AUTH, EXIT_BUILD, EXIT_DEPLOY, EXIT_USAGE, LsdeployError
from .base import DeployResult, DestroyResult, PlanResult, Provider, RollbackResult, StatusResult, _quiet

SERVICE_RE = re.compile(r"^[a-z](?:[a-z0-9-]{0,47}[a-z0-9])?$")
REGION_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+$")
PROJECT_RE = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_ENV = {"PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION", "MODEL_STATE_URI", "BASIC_AUTH_USER",
                "BASIC_AUTH_PASS", "LABEL_STUDIO_API_KEY"}
SPEC_ANNOTATION = "lsdeploy.dev/spec-sha256"
MANAGED_LABEL = ("managed-by", "lsdeploy")
GPU_TYPES = ("nvidia-l4", "nvidia-rtx-pro-6000")
TERMINAL_BUILD = {"SUCCESS", "FAILURE", "INTERNAL_ERROR", "TIMEOUT", "CANCELLED", "EXPIRED"}

API_TITLES = {
    "run": ("Cloud Run Admin API", "run.googleapis.com"),
    "cloudbuild": ("Cloud Build API", "cloudbuild.googleapis.com"),
    "artifactregistry": ("Artifact Registry API", "artifactregistry.googleapis.com"),
    "secretmanager": ("Secret Manager API", "secretmanager.googleapis.com"),
    "storage": ("Cloud Storage JSON API", "storage.googleapis.com"),
}
# The role to grant for a refused permission, by permission prefix (most specific first).
ROLES = [
    ("run.services.setIamPolicy", "roles/run.admin"),
    ("run.", "roles/run.developer"),
    ("iam.serviceAccounts.actAs", "roles/iam.serviceAccountUser"),
    ("cloudbuild.", "roles/cloudbuild.builds.editor"),
    ("artifactregistry.repositories.create", "roles/artifactregistry.admin"),
    ("artifactregistry.packages.delete", "roles/artifactregistry.repoAdmin"),
    ("artifactregistry.versions.delete", "roles/artifactregistry.repoAdmin"),
    ("artifactregistry.", "roles/artifactregistry.writer"),
    ("secretmanager.versions.access", "roles/secretmanager.secretAccessor"),
    ("secretmanager.", "roles/secretmanager.admin"),
    ("storage.buckets.create", "roles/storage.admin"),
    ("storage.buckets.getIamPolicy", "roles/storage.admin"),
    ("storage.buckets.setIamPolicy", "roles/storage.admin"),
    ("storage.", "roles/storage.objectAdmin"),
]

DEFAULT_ROLES = {"run": "roles/run.developer", "cloudbuild": "roles/cloudbuild.builds.editor",
                 "artifactregistry": "roles/artifactregistry.writer", "secretmanager": "roles/secretmanager.admin",
                 "storage": "roles/storage.objectAdmin"}


class OperationTimeout(LsdeployError):
    """A long-running Google operation was not done by the deadline."""


class GoogleApiError(LsdeployError):
    """A Google API refused a call; the message names the API, the resource and the fix."""

    def __init__(self, message, exit_code=EXIT_DEPLOY, reason=""):
        super().__init__(message, exit_code)
        self.reason = reason


def role_for(permission: str) -> str:
    # Cloud Run reports permissions in lower case (iam.serviceaccounts.actAs)
    return next((role for prefix, role in ROLES if permission.lower().startswith(prefix.lower())),
                "a role that grants it")


def google_error(exc, api: str, action: str, resource: str, project: str = "", run_role: str = "") -> GoogleApiError:
    """One line for a google.api_core error: what failed, on what, and the fix. `run_role`: the role
    to name when a Cloud Run permission (or an unnamed one) is refused."""
    from google.api_core import exceptions as gexc

    title, service = API_TITLES.get(api, (api, f"{api}.googleapis.com"))
    reason = getattr(exc, "reason", None) or ""
    metadata = getattr(exc, "metadata", None) or {}
    message = (getattr(exc, "message", None) or str(exc)).split("\n")[0]
    project_flag = f" --project {project}" if project else ""
    if reason == "SERVICE_DISABLED" or "has not been used in project" in message or "it is disabled" in message:
        service = metadata.get("service") or service
        return GoogleApiError(f"{title} is not enabled in project {project or '?'} ({action} {resource}): run "
                              f"`gcloud services enable {service}{project_flag}` and retry in a minute",
                              EXIT_DEPLOY, "SERVICE_DISABLED")
    if isinstance(exc, gexc.Forbidden) or isinstance(exc, gexc.PermissionDenied):
        permission = metadata.get("permission") or ""
        if not permission:
            found = re.search(r"(?:[Pp]ermission '?|does not have )([a-zA-Z]+\.[a-zA-Z]+\.[a-zA-Z]+)", message)
            permission = found.group(1) if found else ""
        what = f"permission {permission}" if permission else "permission"
        if run_role and (not permission or permission.lower().startswith("run.")):
            role = run_role
        else:
            role = role_for(permission) if permission else DEFAULT_ROLES.get(api, "the roles listed in docs/deploy-gcp.md")
        return GoogleApiError(f"{title}: {action} {resource} was refused ({what} denied): grant the deploying "
                              f"identity {role} on project {project or '?'} (gcloud projects add-iam-policy-binding)",
                              EXIT_AUTH, "PERMISSION_DENIED")
    if isinstance(exc, (gexc.TooManyRequests, gexc.ResourceExhausted)):
        return GoogleApiError(f"{title}: {action} {resource} hit a quota or rate limit ({message}): wait and retry, "
                              "or request more quota in the console (IAM & Admin > Quotas)",
                              EXIT_DEPLOY, "QUOTA")
    if isinstance(exc, gexc.Unauthorized):
        return GoogleApiError(f"{title}: the Google credentials were refused ({message}): run `gcloud auth "
                              "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS to a service account key",
                              EXIT_AUTH, "UNAUTHENTICATED")
    return GoogleApiError(f"{title}: {action} {resource} failed: {type(exc).__name__}: {message}", EXIT_DEPLOY)


def auth_error(exc) -> LsdeployError:
    """One line for google.auth's RefreshError / TransportError: the login expired, was revoked or
    its token endpoint cannot be reached."""
    detail = str(exc.args[0] if exc.args else exc).split("\n")[0][:200]
    return LsdeployError(f"the Google login could not be used ({type(exc).__name__}: {detail}): run `gcloud auth "
                         "application-default login` again, or set GOOGLE_APPLICATION_CREDENTIALS to a service "
                         "account key file", EXIT_AUTH)


def _auth_errors(method):
    """Expired or revoked Google credentials surface on the first call of any client: one line."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        from google.auth import exceptions as aexc

        try:
            return method(*args, **kwargs)
        except (aexc.RefreshError, aexc.TransportError) as exc:
            raise auth_error(exc) from None
    return wrapper


# ------------------------------------------------------------------------------------------------
# clients


@dataclass
class GcpClients:
    services: object
    revisions: object
    builds: object
    registry: object
    secrets: object
    storage: object
    storage_emulated: bool = False  # fake-gcs-server: no bucket IAM endpoint

    @classmethod
    def from_env(cls, environ: dict, project: str) -> "GcpClients":
        """Clients for the environment: gcloud's CLOUDSDK_API_ENDPOINT_OVERRIDES_* (REST; anonymous
        credentials for plain http) and STORAGE_EMULATOR_HOST, else Application Default Credentials."""
        try:
            import google.auth
            from google.api_core.client_options import ClientOptions
            from google.auth.credentials import AnonymousCredentials
            from google.auth.exceptions import DefaultCredentialsError
            from google.cloud import artifactregistry_v1, run_v2, secretmanager_v1, storage
            from google.cloud.devtools import cloudbuild_v1
        except ImportError as exc:
            raise LsdeployError(f"the Google Cloud clients are not installed ({exc.name}): pip install "
                                "'lsdeploy[gcp]'", EXIT_USAGE) from None

        adc = []

        def credentials():
            if not adc:
                try:
                    adc.append(google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])[0])
                except DefaultCredentialsError:
                    raise LsdeployError(
                        "no Google credentials: run `gcloud auth application-default login`, or set "
                        "GOOGLE_APPLICATION_CREDENTIALS to a service account key file (or run where a service "
                        "account is attached)", EXIT_AUTH) from None
            return adc[0]

        def options(variable):
            endpoint = (environ.get(variable) or "").strip()
            if not endpoint:
                return {"credentials": credentials()}
            endpoint = re.sub(r"^(https?://[^/]+).*$", r"\1", endpoint.rstrip("/"))
            creds = AnonymousCredentials() if endpoint.startswith("http://") else credentials()
            return {"credentials": creds, "transport": "rest", "client_options": ClientOptions(api_endpoint=endpoint)}

        run_opts = options("CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN")
        emulator = (environ.get("STORAGE_EMULATOR_HOST") or "").strip()
        if emulator:
            if not emulator.startswith("http"):
                emulator = "http://" + emulator
            storage_client = storage.Client(project=project, credentials=AnonymousCredentials(),
                                            client_options={"api_endpoint": emulator.rstrip("/")})
        else:
            storage_client = storage.Client(project=project, credentials=credentials())
        return cls(
            services=run_v2.ServicesClient(**run_opts),
            revisions=run_v2.RevisionsClient(**run_opts),
            builds=cloudbuild_v1.CloudBuildClient(**options("CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDBUILD")),
            registry=artifactregistry_v1.ArtifactRegistryClient(**options("CLOUDSDK_API_ENDPOINT_OVERRIDES_ARTIFACTREGISTRY")),
            secrets=secretmanager_v1.SecretManagerServiceClient(**options("CLOUDSDK_API_ENDPOINT_OVERRIDES_SECRETMANAGER")),
            storage=storage_client,
            storage_emulated=bool(emulator),
        )


# ------------------------------------------------------------------------------------------------
# settings


@dataclass
class GcpSettings:
    project: str
    region: str
    service: str
    memory: str = "2Gi"
    cpu: str = "1"
    gpu: int = 0
    gpu_type: str = "nvidia-l4"
    min_instances: int = 1
    max_instances: int = 3
    concurrency: int = 8
    timeout: int = 300
    env: dict = field(default_factory=dict)
    secret_env: dict = field(default_factory=dict)   # NAME -> "secret[:version]" (existing secrets)
    service_account: Optional[str] = None
    ingress: str = "all"                             # all | internal | internal-and-cloud-load-balancing
    basic_auth: bool = True
    basic_auth_user: str = "labelstudio"
    labels: dict = field(default_factory=dict)
    repository: str = "lsdeploy"
    source_bucket: Optional[str] = None
    state_bucket: Optional[str] = None
    label_studio_url: Optional[str] = None
    label_studio_api_key: Optional[str] = field(default=None, repr=False)
    projects: list = field(default_factory=list)
    title: Optional[str] = None
    keep_images: int = 5                             # images (and their source bundles) kept per service
    prune: bool = True                               # delete older ones after a deploy
    build_timeout: int = 1800
    ready_timeout: float = 900.0                     # --wait-timeout: for the new revision to be ready
    warmup_timeout: float = 120.0

    def __post_init__(self):
        if self.label_studio_api_key:  # as the Label Studio client does: a key read from a file ends with a line break
            self.label_studio_api_key = self.label_studio_api_key.strip()

    @property
    def sources_bucket_name(self) -> str:
        return self.source_bucket or f"{self.project}-lsdeploy-sources"

    @property
    def state_bucket_name(self) -> str:
        return self.state_bucket or f"{self.project}-lsdeploy-state"

    @property
    def state_uri(self) -> str:
        return f"gs://{self.state_bucket_name}/{self.service}"

    @property
    def location(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    @property
    def service_name(self) -> str:
        return f"{self.location}/services/{self.service}"

    @property
    def repository_name(self) -> str:
        return f"{self.location}/repositories/{self.repository}"

    @property
    def image(self) -> str:
        return f"{self.region}-docker.pkg.dev/{self.project}/{self.repository}/{self.service}"

    def secret_id(self, what: str) -> str:
        return f"{self.service}-{what}"

    def validate(self) -> None:
        """Everything checkable before any API call; LsdeployError(EXIT_USAGE) names the fix."""
        def bad(message):
            raise LsdeployError(message, EXIT_USAGE)

        if not self.project:
            bad("no Google Cloud project: pass --gcp-project-id or set GCP_PROJECT")
        if not PROJECT_RE.match(self.project):
            bad(f"{self.project!r} is not a Google Cloud project id (6-30 characters: lowercase letters, digits, "
                "hyphens; starts with a letter): pass the id, not the name or number, with --gcp-project-id")
        if not REGION_RE.match(self.region or ""):
            bad(f"{self.region!r} is not a Cloud Run region (like us-central1 or europe-west4): pass --gcp-region")
        if not SERVICE_RE.match(self.service or ""):
            bad(f"{self.service!r} is not a valid Cloud Run service name: it must start with a lowercase letter, use "
                "only lowercase letters, digits and hyphens, not end with a hyphen, and have at most 49 characters; "
                "pass --service")
        if not re.match(r"^[0-9]+(\.[0-9]+)?(Mi|Gi)$", self.memory or ""):
            bad(f"--memory {self.memory!r}: use a size like 512Mi or 4Gi")
        if not re.match(r"^[0-9]+(\.[0-9]+)?$|^[0-9]+m$", self.cpu or ""):
            bad(f"--cpu {self.cpu!r}: use a number of CPUs like 1, 2, 4 or 8")
        if not 0 <= self.min_instances <= self.max_instances:
            bad(f"--min-instances {self.min_instances} must be between 0 and --max-instances {self.max_instances}")
        if not 1 <= self.concurrency <= 1000:
            bad("--concurrency must be between 1 and 1000")
        if not 1 <= self.timeout <= 3600:
            bad("--timeout must be between 1 and 3600 seconds")
        problem = resource_problem(_cpus(self.cpu), _mebibytes(self.memory), self.gpu)
        if problem:
            bad(f"--cpu {self.cpu} --memory {self.memory}{f' --gpu {self.gpu}' if self.gpu else ''}: {problem}")
        if self.gpu and self.gpu_type not in GPU_TYPES:
            bad(f"--gpu-type {self.gpu_type!r}: Cloud Run offers {', '.join(GPU_TYPES)}")
        if self.ready_timeout <= 0:
            bad(f"--wait-timeout {self.ready_timeout}: wait at least 1 second")
        if self.keep_images < 1:
            bad(f"--keep-images {self.keep_images}: keep at least 1 image (the serving one); pass --no-prune "
                "to keep every image")
        if self.ingress not in INGRESS:
            bad(f"--ingress {self.ingress!r}: choose one of {', '.join(INGRESS)}")
        for name in list(self.env) + list(self.secret_env):
            if not ENV_NAME_RE.match(name):
                bad(f"{name!r} is not an environment variable name")
            if name in RESERVED_ENV:
                bad(f"{name} is set by lsdeploy or Cloud Run; do not pass it with --env/--secret")
        for key, value in self.labels.items():
            if not LABEL_KEY_RE.match(key) or not LABEL_VALUE_RE.match(value):
                bad(f"label {key}={value}: keys and values use lowercase letters, digits, _ and - "
                    "(keys start with a letter, at most 63 characters)")
        if self.projects and not (self.label_studio_url and self.label_studio_api_key):
            bad("registering with Label Studio needs --label-studio-host and --label-studio-api-key "
                "(LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY)")


@dataclass
class SecretRefs:
    refs: dict = field(default_factory=dict)      # ENV -> (secret resource name, version)
    stored: list = field(default_factory=list)    # secrets lsdeploy wrote for this service
    member: Optional[str] = None                  # the service's identity, when known
    password: Optional[str] = field(default=None, repr=False)  # the basic-auth password


INGRESS = {"all": "INGRESS_TRAFFIC_ALL", "internal": "INGRESS_TRAFFIC_INTERNAL_ONLY",
           "internal-and-cloud-load-balancing": "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER"}


# Cloud Run's CPU and memory table (cloud.google.com/run/docs/configuring/services/cpu and
# .../memory-limits): whole CPUs above 1, memory from 512Mi (second generation) to 32Gi, and
# memory above a size needs a number of CPUs; a CPU count needs at least some memory.
CPU_CHOICES = (1, 2, 4, 6, 8)
MIN_CPUS_FOR_MEMORY = ((24 * 1024, 8), (16 * 1024, 6), (8 * 1024, 4), (4 * 1024, 2))  # more than MiB -> CPUs
MIN_MEMORY_FOR_CPUS = {4: 2 * 1024, 6: 4 * 1024, 8: 4 * 1024}                          # CPUs -> at least MiB


def resource_problem(cpus: float, mebibytes: float, gpus: int = 0) -> str:
    """What Cloud Run would refuse in these limits, with the fix ("" when they are allowed)."""
    if cpus < 1:
        # below 1 CPU Cloud Run requires request-based billing (cpu_idle) and concurrency 1, while
        # lsdeploy keeps CPU allocated so that training can run after a webhook is answered
        return ("Cloud Run allows less than 1 CPU only with request-based billing and concurrency 1, and lsdeploy "
                "keeps CPU always allocated for background training: pass --cpu 1 or more")
    if cpus not in CPU_CHOICES:
        return f"Cloud Run takes 1 CPU or a whole number of CPUs from {', '.join(map(str, CPU_CHOICES[1:]))}: " \
               f"pass --cpu {next(c for c in CPU_CHOICES if c >= cpus) if cpus <= 8 else 8}"
    if mebibytes < 512:
        return "Cloud Run needs at least 512Mi of memory (second generation): pass --memory 512Mi or more"
    if mebibytes > 32 * 1024:
        return "Cloud Run allows at most 32Gi of memory: pass --memory 32Gi or less"
    for above, need in MIN_CPUS_FOR_MEMORY:
        if mebibytes > above and cpus < need:
            return f"memory above {above // 1024}Gi needs at least {need} CPUs on Cloud Run: pass --cpu {need}"
    least = MIN_MEMORY_FOR_CPUS.get(int(cpus), 0)
    if mebibytes < least:
        return f"{int(cpus)} CPUs need at least {least // 1024}Gi of memory on Cloud Run: pass --memory {least // 1024}Gi"
    if gpus and (cpus < 4 or mebibytes < 16 * 1024):
        return "a GPU on Cloud Run needs at least 4 CPUs and 16Gi of memory: pass --cpu 4 --memory 16Gi"
    return ""


def _cpus(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def _mebibytes(value: str) -> float:
    number = float(value[:-2])
    return number * 1024 if value.endswith("Gi") else number


# ------------------------------------------------------------------------------------------------
# provider


class GcpProvider(Provider):
    name = "gcp"

    def __init__(self, clients: GcpClients, polling=None, poll_interval: float = 2.0, http_get=None,
                 labelstudio_factory: Optional[Callable] = None):
        self.clients = clients
        self.polling = polling                # api_core polling for operations (tests: faster)
        self.poll_interval = poll_interval    # build status / log polling
        self._http_get = http_get
        self._labelstudio_factory = labelstudio_factory

    # -- helpers ------------------------------------------------------------------------------
    def _call(self, api, action, resource, settings, fn, *args, **kwargs):
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as aexc

        try:
            return fn(*args, **kwargs)
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, api, action, resource, settings.project) from None
        except (aexc.RefreshError, aexc.TransportError) as exc:
            raise auth_error(exc) from None

    def _lookup(self, api, action, name, settings, fn):
        """fn(name=name), or None when the resource does not exist."""
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as aexc

        try:
            return fn(name=name)
        except gexc.NotFound:
            return None
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, api, action, name, settings.project) from None
        except (aexc.RefreshError, aexc.TransportError) as exc:
            raise auth_error(exc) from None

    def _result(self, operation, timeout, what: str):
        """operation.result(timeout); OperationTimeout (one line naming `what`) when it is not done."""
        kwargs = {"timeout": timeout}
        if self.polling is not None:
            kwargs["polling"] = self.polling
        try:
            return operation.result(**kwargs)
        except concurrent.futures.TimeoutError:
            raise OperationTimeout(f"{what} did not finish within {timeout:.0f} s: it may still be running; check "
                                   "it in the Google Cloud console and run the command again", EXIT_DEPLOY) from None

    # -- image --------------------------------------------------------------------------------
    def tag_name(self, settings, bundle) -> str:
        return f"src-{bundle.digest}"

    def find_image(self, settings, bundle) -> Optional[str]:
        """The image (pinned by digest) already built from this bundle, or None."""
        name = f"{settings.repository_name}/packages/{settings.service}/tags/{self.tag_name(settings, bundle)}"
        tag = self._lookup("artifactregistry", "reading tag", name, settings, self.clients.registry.get_tag)
        if tag is None:
            return None
        digest = tag.version.rsplit("/", 1)[-1]
        return f"{settings.image}@{digest}"

    def ensure_repository(self, settings, progress) -> None:
        from google.api_core import exceptions as gexc
        from google.cloud import artifactregistry_v1 as ar

        try:
            self.clients.registry.get_repository(name=settings.repository_name)
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
            op = self.clients.registry.create_repository(parent=settings.location, repository_id=settings.repository,
                                                         repository=repo)
            self._result(op, 300, f"creating Artifact Registry repository {settings.repository_name}")
        except gexc.AlreadyExists:
            pass  # created concurrently
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "artifactregistry", "creating repository", settings.repository_name,
                               settings.project) from None

    def ensure_bucket(self, settings, name: str, progress):
        from google.api_core import exceptions as gexc

        client = self.clients.storage
        try:
            bucket = client.lookup_bucket(name)
            if bucket is None:
                progress(f"creating Cloud Storage bucket gs://{name} in {settings.region}")
                try:
                    bucket = client.create_bucket(name, location=settings.region)
                except gexc.Conflict:
                    bucket = client.bucket(name)
                    if client.lookup_bucket(name) is None:
                        raise LsdeployError(f"the bucket name gs://{name} is taken by another project: choose "
                                            "another with --source-bucket/--state-bucket", EXIT_USAGE) from None
            return bucket
        except gexc.Forbidden as exc:
            error = google_error(exc, "storage", "using bucket", f"gs://{name}", settings.project)
            if error.reason == "PERMISSION_DENIED":
                error = GoogleApiError(f"{error}; bucket names are global: if gs://{name} belongs to another "
                                       "project, choose another name with --source-bucket/--state-bucket",
                                       error.exit_code, error.reason)
            raise error from None
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "storage", "using bucket", f"gs://{name}", settings.project) from None

    def upload(self, settings, bundle, progress) -> tuple:
        """(bucket, object, generation) of the bundle in the sources bucket (create-only upload)."""
        from google.api_core import exceptions as gexc

        bucket = self.ensure_bucket(settings, settings.sources_bucket_name, progress)
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

    def build_request(self, settings, bundle, source) -> object:
        from google.cloud.devtools import cloudbuild_v1 as cb
        from google.protobuf import duration_pb2

        bucket, name, generation = source
        tagged = f"{settings.image}:{self.tag_name(settings, bundle)}"
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
            logs_bucket=f"gs://{bucket}/{_logs_prefix(settings).rstrip('/')}",
            timeout=duration_pb2.Duration(seconds=settings.build_timeout),
            tags=["lsdeploy", settings.service],
        )
        return cb.CreateBuildRequest(parent=settings.location, project_id=settings.project, build=build)

    def build(self, settings, bundle, progress) -> tuple:
        """Upload and build; (image pinned by digest, build id). Raises EXIT_BUILD on failure."""
        from google.api_core import exceptions as gexc
        from google.cloud.devtools import cloudbuild_v1 as cb

        if settings.basic_auth:  # a password from an earlier deploy may have been pasted into a file
            self.check_secrets(settings, bundle, password=self.latest_secret_value(settings, "basic-auth-pass"))
        self.ensure_repository(settings, progress)
        source = self.upload(settings, bundle, progress)
        request = self.build_request(settings, bundle, source)
        try:
            operation = self.clients.builds.create_build(request=request)
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "cloudbuild", "starting a build in", settings.location, settings.project) from None
        meta = cb.BuildOperationMetadata.deserialize(operation.metadata.value) \
            if hasattr(operation.metadata, "value") else operation.metadata
        build = meta.build
        build_id = build.id
        progress(f"building image (Cloud Build {build_id}); logs: {build.log_url}")
        build_name = f"{settings.location}/builds/{build_id}"
        streamer = LogStreamer(self.clients.storage, build.logs_bucket, build_id, progress)
        deadline = time.monotonic() + settings.build_timeout + 300
        while True:
            build = self._call("cloudbuild", "reading build", build_name, settings,
                               self.clients.builds.get_build, name=build_name)
            streamer.poll()
            if cb.Build.Status(build.status).name in TERMINAL_BUILD:
                break
            if time.monotonic() > deadline:
                raise LsdeployError(f"build {build_id} did not finish in {settings.build_timeout + 300} s: see "
                                    f"{build.log_url}", EXIT_BUILD)
            time.sleep(self.poll_interval)
        streamer.poll()
        status = cb.Build.Status(build.status).name
        if status != "SUCCESS":
            failing = [f"step {i} ({s.id or s.name})" for i, s in enumerate(build.steps)
                       if cb.Build.Status(s.status).name in ("FAILURE", "TIMEOUT", "INTERNAL_ERROR")]
            detail = build.failure_info.detail or build.status_detail or status
            tail = " | ".join(streamer.tail(8))
            raise LsdeployError(f"the image build failed ({status}) at {failing[0] if failing else 'the build'}: "
                                f"{detail}; log tail: {tail or '(no log)'}; full log: {build.log_url}; "
                                "nothing was deployed", EXIT_BUILD)
        tagged = f"{settings.image}:{self.tag_name(settings, bundle)}"
        digest = next((img.digest for img in build.results.images if img.name == tagged), None)
        if not digest:
            raise LsdeployError(f"build {build_id} succeeded but pushed no {tagged}; see {build.log_url}", EXIT_BUILD)
        return f"{settings.image}@{digest}", build_id

    # -- secrets ------------------------------------------------------------------------------
    def check_secrets(self, settings, bundle, password: Optional[str] = None) -> None:
        """Refuse a bundle holding the Label Studio key or the basic-auth password: it would be
        uploaded and copied into the image."""
        for what, value in (("the Label Studio API key (--label-studio-api-key)", settings.label_studio_api_key),
                            ("the basic-auth password", password)):
            path = bundle.find(value) if value else ""
            if path:
                raise LsdeployError(f"{path} in {bundle.directory} contains {what}; nothing was uploaded: remove it "
                                    "from the file (keep secrets in .env, which is never bundled) or exclude the file "
                                    "in .gcloudignore", EXIT_USAGE)

    def latest_secret_value(self, settings, what: str) -> Optional[str]:
        """The latest value of the service's secret `what` (basic-auth-pass...), None when it has none."""
        from google.api_core import exceptions as gexc

        name = f"projects/{settings.project}/secrets/{settings.secret_id(what)}/versions/latest"
        try:
            return self.clients.secrets.access_secret_version(name=name).payload.data.decode("utf-8")
        except (gexc.NotFound, gexc.FailedPrecondition):
            return None
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "secretmanager", "reading", name, settings.project) from None

    def ensure_secret(self, settings, secret_id: str, value: Optional[str], progress,
                      generate: bool = False) -> tuple:
        """(version resource name, project number, value). With `generate`, the latest value is
        reused and a new one made only when the secret has none; otherwise `value` is stored
        when it differs from the latest version."""
        from google.api_core import exceptions as gexc
        from google.cloud import secretmanager_v1 as sm

        client = self.clients.secrets
        parent = f"projects/{settings.project}"
        name = f"{parent}/secrets/{secret_id}"
        try:
            secret = client.get_secret(name=name)
        except gexc.NotFound:
            progress(f"creating secret {secret_id} in Secret Manager")
            try:
                secret = client.create_secret(parent=parent, secret_id=secret_id, secret=sm.Secret(
                    replication=sm.Replication(automatic=sm.Replication.Automatic()),
                    labels={MANAGED_LABEL[0]: MANAGED_LABEL[1], "service": settings.service}))
            except gexc.GoogleAPICallError as exc:
                raise google_error(exc, "secretmanager", "creating secret", name, settings.project) from None
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "secretmanager", "reading secret", name, settings.project) from None
        number = secret.name.split("/")[1]
        current = None
        try:
            latest = client.access_secret_version(name=f"{secret.name}/versions/latest")
            current = (latest.name, latest.payload.data.decode("utf-8"))
        except (gexc.NotFound, gexc.FailedPrecondition):
            pass
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "secretmanager", "reading", f"{name}/versions/latest", settings.project) from None
        if generate and current is not None:
            return current[0], number, current[1]
        if generate:
            value = pysecrets.token_urlsafe(24)
        if current is not None and current[1] == value:
            return current[0], number, value
        import google_crc32c

        data = value.encode("utf-8")
        crc = google_crc32c.Checksum(data).hexdigest()
        try:
            version = client.add_secret_version(parent=secret.name, payload=sm.SecretPayload(
                data=data, data_crc32c=int(crc, 16)))
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "secretmanager", "adding a version to", name, settings.project) from None
        progress(f"stored a new version of secret {secret_id}")
        return version.name, number, value

    def secret_refs(self, settings, progress=_quiet, apply: bool = True,
                    checked: Optional[dict] = None) -> "SecretRefs":
        """The secrets the service reads: {ENV: (secret, version)}. With `apply` the basic-auth
        password and the Label Studio key are stored (a new version only when the value changed)
        and the service's identity may read them; without it nothing is written and versions that
        a deploy would add show as "new". `checked`: user_secrets() already read."""
        refs = SecretRefs()
        owned = []
        if apply and (settings.basic_auth or settings.label_studio_api_key or settings.secret_env):
            progress("storing secrets in Secret Manager")
        if settings.basic_auth:
            owned.append(("BASIC_AUTH_PASS", settings.secret_id("basic-auth-pass"), None, True))
        if settings.label_studio_api_key:
            owned.append(("LABEL_STUDIO_API_KEY", settings.secret_id("label-studio-api-key"),
                          settings.label_studio_api_key, False))
        for env_name, secret_id, value, generate in owned:
            if apply:
                version, number, plain = self.ensure_secret(settings, secret_id, value, progress, generate=generate)
                if generate:
                    refs.password = plain
                refs.member = refs.member or _member(settings, number)
                refs.stored.append(version.split("/versions/")[0])
            else:
                version = self.peek_secret(settings, secret_id, value, generate)
            refs.refs[env_name] = (version.split("/versions/")[0], version.rsplit("/", 1)[-1])
        user = []
        for env_name, (full, version, number) in (self.user_secrets(settings) if checked is None else checked).items():
            refs.member = refs.member or _member(settings, number)
            refs.refs[env_name] = (full, version)
            user.append(full)
        if apply:
            for secret_name in refs.stored:
                self.grant_accessor(settings, secret_name, refs.member)
            for secret_name in user:
                try:
                    self.grant_accessor(settings, secret_name, refs.member)
                except GoogleApiError as exc:
                    if exc.exit_code != EXIT_AUTH:
                        raise
                    # the deployer may not administer a secret it was given: the service may already read it
                    progress(f"note: could not grant {refs.member.split(':', 1)[-1]} read access to {secret_name} "
                             f"({exc.reason or 'permission denied'}); if the new revision cannot read it, run `gcloud "
                             f"secrets add-iam-policy-binding {secret_name} --member {refs.member} --role "
                             "roles/secretmanager.secretAccessor`")
        return refs

    def user_secrets(self, settings) -> dict:
        """{ENV: (secret name, version, project number)} of the secrets passed with --secret, each
        checked to exist."""
        found = {}
        for env_name, ref in sorted(settings.secret_env.items()):
            secret, _, version = ref.partition(":")
            full = secret if secret.startswith("projects/") else f"projects/{settings.project}/secrets/{secret}"
            found[env_name] = (full, version or "latest", self.existing_secret(settings, full, env_name))
        return found

    def existing_secret(self, settings, name: str, env_name: str) -> str:
        """The project number of a secret passed with --secret; a clear error when it is missing."""
        from google.api_core import exceptions as gexc

        try:
            secret = self.clients.secrets.get_secret(name=name)
        except gexc.NotFound:
            raise LsdeployError(f"--secret {env_name}={name.rsplit('/', 1)[-1]}: secret {name} does not exist: create "
                                f"it first (printf '%s' VALUE | gcloud secrets create {name.rsplit('/', 1)[-1]} "
                                f"--project {name.split('/')[1]} --data-file=-)", EXIT_USAGE) from None
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "secretmanager", "reading secret", name, settings.project) from None
        return secret.name.split("/")[1]

    def peek_secret(self, settings, secret_id: str, value: Optional[str], generate: bool) -> str:
        """The version a deploy would reference, read-only: the latest one when a deploy would keep
        it, else ".../versions/new"."""
        from google.api_core import exceptions as gexc

        name = f"projects/{settings.project}/secrets/{secret_id}"
        try:
            latest = self.clients.secrets.access_secret_version(name=f"{name}/versions/latest")
        except (gexc.NotFound, gexc.FailedPrecondition):
            return f"{name}/versions/new"
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "secretmanager", "reading", f"{name}/versions/latest", settings.project) from None
        if generate or latest.payload.data.decode("utf-8") == value:
            return latest.name
        return f"{name}/versions/new"

    def grant_accessor(self, settings, secret_name: str, member: str) -> None:
        """roles/secretmanager.secretAccessor for the service's identity on one secret."""
        role = "roles/secretmanager.secretAccessor"
        policy = self._call("secretmanager", "reading the IAM policy of", secret_name, settings,
                            self.clients.secrets.get_iam_policy, request={"resource": secret_name})
        for binding in policy.bindings:
            if binding.role == role and member in binding.members:
                return
        policy.bindings.add(role=role, members=[member])
        self._call("secretmanager", "granting the service access to", secret_name, settings,
                   self.clients.secrets.set_iam_policy, request={"resource": secret_name, "policy": policy})

    def grant_bucket_access(self, settings, bucket, member: str, progress=_quiet) -> None:
        """roles/storage.objectUser for the service's identity on the state bucket: every instance
        reads and writes model state there (MODEL_STATE_URI)."""
        from google.api_core import exceptions as gexc

        role = "roles/storage.objectUser"
        where = f"gs://{bucket.name}"
        try:
            policy = bucket.get_iam_policy(requested_policy_version=3)
        except gexc.NotFound:
            if self.clients.storage_emulated:
                progress(f"the storage emulator has no IAM: not granting {role} on {where}")
                return
            raise LsdeployError(f"reading the IAM policy of {where} failed: the bucket was not found", EXIT_DEPLOY) from None
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "storage", "reading the IAM policy of", where, settings.project) from None
        for binding in policy.bindings:
            if binding.get("role") == role and member in binding.get("members", ()):
                return
        policy.bindings.append({"role": role, "members": {member}})
        try:
            bucket.set_iam_policy(policy)
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "storage", "granting the service access to", where, settings.project) from None
        progress(f"granted {role} on {where} to {member.split(':', 1)[-1]}")

    # -- service ------------------------------------------------------------------------------
    def desired_service(self, settings, image: str, secret_refs: dict, spec_hash: str = ""):
        from google.cloud import run_v2
        from google.protobuf import duration_pb2

        env = [run_v2.EnvVar(name="MODEL_STATE_URI", value=settings.state_uri)]
        if settings.label_studio_url:
            from ..labelstudio import without_userinfo

            # without user info: a proxy password in the address would be a plain environment value
            env.append(run_v2.EnvVar(name="LABEL_STUDIO_URL", value=without_userinfo(settings.label_studio_url)))
        if settings.basic_auth:
            env.append(run_v2.EnvVar(name="BASIC_AUTH_USER", value=settings.basic_auth_user))
        env += [run_v2.EnvVar(name=k, value=v) for k, v in sorted(settings.env.items())]
        for env_name, (secret, version) in sorted(secret_refs.items()):
            env.append(run_v2.EnvVar(name=env_name, value_source=run_v2.EnvVarSource(
                secret_key_ref=run_v2.SecretKeySelector(secret=secret, version=version))))
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

    @staticmethod
    def spec_hash(service) -> str:
        from google.cloud import run_v2

        data = run_v2.Service.to_json(service, sort_keys=True, indent=None)
        return hashlib.sha256(data.encode()).hexdigest()

    def get_service(self, settings):
        return self._lookup("run", "reading service", settings.service_name, settings, self.clients.services.get_service)

    def apply_service(self, settings, desired, live, progress):
        """Create or update; returns (service after the operation, True when it changed)."""
        from google.api_core import exceptions as gexc

        if _up_to_date(live, desired):
            return live, False
        try:
            if live is None:
                progress(f"creating Cloud Run service {settings.service} in {settings.region}")
                op = self.clients.services.create_service(parent=settings.location, service=desired,
                                                          service_id=settings.service)
            else:
                progress(f"updating Cloud Run service {settings.service}")
                desired.name = settings.service_name
                op = self.clients.services.update_service(service=desired)
        except gexc.GoogleAPICallError as exc:
            verb = "creating" if live is None else "updating"
            # the service sets invoker_iam_disabled (Label Studio sends no Google identity token): that
            # needs run.services.setIamPolicy, which roles/run.developer lacks
            raise google_error(exc, "run", f"{verb} service", settings.service_name, settings.project,
                               run_role="roles/run.admin") from None
        progress("waiting for the new revision to be ready")
        try:
            service = self._result(op, settings.ready_timeout, f"deploying {settings.service}")
        except OperationTimeout:
            after = self.get_service(settings)
            revision = after.latest_created_revision.rsplit("/", 1)[-1] if after is not None else ""
            raise LsdeployError(f"Cloud Run service {settings.service}: revision {revision or '(not created yet)'} is "
                                f"still deploying after {settings.ready_timeout:.0f} s (--wait-timeout); Label Studio "
                                f"was not changed: follow it with `label-studio-ml status {settings.service} "
                                f"--gcp-project-id {settings.project} --gcp-region {settings.region}`, then deploy "
                                "again to register it", EXIT_DEPLOY) from None
        except gexc.GoogleAPICallError as exc:
            after = self.get_service(settings)
            message = getattr(exc, "message", None) or str(exc)
            if after is not None:
                ready, condition = _ready(after)
                message = condition or message
                serving = after.latest_ready_revision.rsplit("/", 1)[-1] or "none"
            else:
                serving = "none"
            if isinstance(exc, (gexc.Forbidden, gexc.TooManyRequests)):
                raise google_error(exc, "run", "deploying", settings.service_name, settings.project,
                                   run_role="roles/run.admin") from None
            raise LsdeployError(f"Cloud Run could not start the new revision of {settings.service}: {message} "
                                f"(traffic stays on the previous revision: {serving}); Label Studio was not "
                                "changed", EXIT_DEPLOY) from None
        return service, True

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
            time.sleep(min(self.poll_interval, 1.0))
        raise LsdeployError(f"{url}/health did not answer 200 within {settings.warmup_timeout:.0f} s ({last}): check "
                            "the service's logs in the Cloud Run console; Label Studio was not changed", EXIT_DEPLOY)

    # -- the interface ------------------------------------------------------------------------
    @_auth_errors
    def deploy(self, settings: GcpSettings, bundle, progress=_quiet) -> DeployResult:
        started = time.monotonic()
        settings.validate()
        self.check_secrets(settings, bundle)
        checked = self.user_secrets(settings)  # before anything is built or written
        progress(f"checking for an image of bundle {bundle.short_digest}")
        image = self.find_image(settings, bundle)
        build_id = None
        if image:
            progress(f"image for bundle {bundle.short_digest} exists: no upload, no build")
        else:
            image, build_id = self.build(settings, bundle, progress)
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
                state_member = _member(settings, str(bucket.project_number))
            if state_member:
                self.grant_bucket_access(settings, bucket, state_member, progress)
            else:
                progress(f"note: the service runs as the compute default service account, which needs "
                         f"roles/storage.objectUser on gs://{bucket.name}: run `gcloud storage buckets "
                         f"add-iam-policy-binding gs://{bucket.name} --member serviceAccount:$(gcloud projects describe "
                         f"{settings.project} --format='value(projectNumber)')-compute@developer.gserviceaccount.com "
                         "--role roles/storage.objectUser` (or pass --service-account)")
        service, changed = self.apply_service(settings, desired, live, progress)
        if changed:
            service = self.get_service(settings) or service
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
                pruned = self.prune(settings, self._serving_images(settings, service) | {image.rsplit("@", 1)[-1]},
                                    bundle=bundle, progress=progress)
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
            seconds=round(time.monotonic() - started, 3),
        )

    def register(self, settings, url, password) -> list:
        from .. import labelstudio

        factory = self._labelstudio_factory or labelstudio.LabelStudio
        client = factory(settings.label_studio_url, settings.label_studio_api_key)
        return client.register(url, settings.projects, title=settings.title or f"{settings.service} (Cloud Run)",
                               basic_auth=(settings.basic_auth_user, password) if settings.basic_auth else None)

    @_auth_errors
    def plan(self, settings, bundle) -> PlanResult:
        """What `deploy(settings, bundle)` would do; sends only reads (Get/List/Access)."""
        settings.validate()
        self.check_secrets(settings, bundle)  # deploy would refuse this bundle: so does its plan
        image = self.find_image(settings, bundle)
        if image is None and settings.basic_auth:
            self.check_secrets(settings, bundle, password=self.latest_secret_value(settings, "basic-auth-pass"))
        live = self.get_service(settings)
        refs = self.secret_refs(settings, apply=False)
        target = image or f"{settings.image}:{self.tag_name(settings, bundle)}"
        desired = self.desired_service(settings, target, refs.refs)
        if image and not any(version == "new" for _, version in refs.refs.values()):
            desired.annotations[SPEC_ANNOTATION] = self.spec_hash(desired)
        changes = service_changes(live, desired)
        if live is None:
            action = "create"
        elif _up_to_date(live, desired):
            action = "none"
        else:
            action = "update"
            if not changes:  # same settings; lsdeploy's own part of the spec (probe, annotations) differs
                changes = [{"field": "lsdeploy spec (startup probe, annotations)", "live": "older", "desired": "current"}]
        prune = []
        if settings.prune and (image is None or action != "none"):  # as deploy: only after a build or a change
            serving = self._serving_images(settings, live) | ({image.rsplit("@", 1)[-1]} if image else set())
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

    # -- pruning ------------------------------------------------------------------------------
    def _serving_images(self, settings, live) -> set:
        """Digests of the images of revisions that receive traffic (never pruned)."""
        if live is None:
            return set()
        serving = {t["revision"] for t in self._serving(live) if t["percent"]}
        return {rev.containers[0].image.rsplit("@", 1)[-1] for rev in self.list_revisions(settings)
                if rev.name.rsplit("/", 1)[-1] in serving and rev.containers and "@" in rev.containers[0].image}

    def prune_candidates(self, settings, keep_digests: set, new_image: bool = False, bundle=None) -> tuple:
        """([(version name, digest)], [blob]) a prune would delete: images of the service beyond the
        newest `keep_images` (counting an image this deploy is about to build) other than ones that
        serve traffic, the uploaded source bundles of images not kept, and build logs beyond the
        newest `keep_images`."""
        from google.api_core import exceptions as gexc
        from google.cloud import artifactregistry_v1 as ar

        package = f"{settings.repository_name}/packages/{settings.service}"
        try:
            versions = list(self.clients.registry.list_versions(request=ar.ListVersionsRequest(
                parent=package, view=ar.VersionView.FULL, order_by="create_time desc", page_size=500)))
        except gexc.NotFound:
            versions = []
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "artifactregistry", "listing the images of", package, settings.project) from None
        # newest first whatever order the server kept
        versions.sort(key=lambda v: (v.create_time.timestamp() if v.create_time else 0, v.name), reverse=True)
        keep = max(settings.keep_images - (1 if new_image else 0), 0)
        kept_sources = {bundle.digest} if bundle is not None else set()
        doomed = []
        for index, version in enumerate(versions):
            digest = version.name.rsplit("/", 1)[-1]
            sources = {t.name.rsplit("/tags/src-", 1)[-1] for t in version.related_tags if "/tags/src-" in t.name}
            if index < keep or digest in keep_digests:
                kept_sources |= sources
            else:
                doomed.append((version.name, digest))
        blobs = [b for b in self._blobs(settings, settings.sources_bucket_name, f"sources/{settings.service}/")
                 if b.name.rsplit("/", 1)[-1].removesuffix(".tar.gz") not in kept_sources]
        # build logs: the newest `keep_images` (a failed build's log included) stay
        logs = self._blobs(settings, settings.sources_bucket_name, _logs_prefix(settings))
        logs.sort(key=lambda b: (b.time_created.timestamp() if b.time_created else 0, b.name), reverse=True)
        return doomed, blobs + logs[keep:]

    def prune(self, settings, keep_digests: set, bundle=None, progress=_quiet) -> list:
        """Delete old images, source bundles and build logs of the service (see prune_candidates);
        returns what went."""
        from google.api_core import exceptions as gexc

        images, blobs = self.prune_candidates(settings, keep_digests, bundle=bundle)
        if not images and not blobs:
            return []
        progress(f"pruning {len(images)} old image(s) and {len(blobs)} source bundle(s)/build log(s) of {settings.service} "
                 f"(keeping the newest {settings.keep_images})")
        deleted = []
        for name, digest in images:
            try:
                # force: the src-<digest> tag goes with its version
                self._result(self.clients.registry.delete_version(request={"name": name, "force": True}), 300,
                             f"deleting image {name}")
            except gexc.NotFound:
                pass
            except gexc.GoogleAPICallError as exc:
                raise google_error(exc, "artifactregistry", "deleting image", name, settings.project) from None
            deleted.append(f"image {settings.image}@{digest}")
        self._delete_blobs(settings, settings.sources_bucket_name, blobs)
        deleted += [f"gs://{settings.sources_bucket_name}/{blob.name}" for blob in blobs]
        return deleted

    # -- operating a deployed service ----------------------------------------------------------
    def _label_studio(self, settings):
        """A Label Studio client when host, key and project(s) are known, else None."""
        if not (settings.label_studio_url and settings.label_studio_api_key and settings.projects):
            return None
        from .. import labelstudio

        factory = self._labelstudio_factory or labelstudio.LabelStudio
        return factory(settings.label_studio_url, settings.label_studio_api_key)

    def list_revisions(self, settings) -> list:
        """The service's revisions, newest first."""
        pager = self._call("run", "listing the revisions of", settings.service_name, settings,
                           self.clients.revisions.list_revisions, parent=settings.service_name)
        revisions = list(pager)
        revisions.sort(key=lambda r: r.create_time.timestamp() if r.create_time else 0, reverse=True)
        return revisions

    def _serving(self, live) -> list:
        """[{"revision", "percent", "tag"}] as Cloud Run reports the traffic (LATEST resolved)."""
        latest = live.latest_ready_revision.rsplit("/", 1)[-1]
        return [{"revision": t.revision or latest, "percent": t.percent, "tag": t.tag}
                for t in live.traffic_statuses]

    @_auth_errors
    def status(self, settings) -> StatusResult:
        live = self.get_service(settings)
        if live is None:
            return StatusResult(service=settings.service, exists=False)
        ready, message = _ready(live)
        revisions = []
        for rev in self.list_revisions(settings):
            rev_ready, rev_message = _revision_ready(rev)
            revisions.append({"revision": rev.name.rsplit("/", 1)[-1], "ready": rev_ready, "message": rev_message,
                              "image": rev.containers[0].image if rev.containers else "",
                              "created": rev.create_time.isoformat() if rev.create_time else ""})
        image = live.template.containers[0].image if live.template.containers else ""
        registrations = []
        client = self._label_studio(settings)
        if client is not None:
            url = live.uri.rstrip("/")
            for pid in settings.projects:
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
                    from ..labelstudio import STATE_NAMES

                    state = backend.get("state") or ""
                    registrations.append({"project": int(pid), "backend_id": int(backend["id"]), "state": state,
                                          "state_name": STATE_NAMES.get(state, state),
                                          "error_message": backend.get("error_message") or ""})
        return StatusResult(
            service=settings.service, exists=True, url=live.uri, ready=ready, message=message,
            latest_ready_revision=live.latest_ready_revision.rsplit("/", 1)[-1],
            latest_created_revision=live.latest_created_revision.rsplit("/", 1)[-1],
            traffic=self._serving(live), image=image,
            image_digest=image.split("@", 1)[1] if "@" in image else "",
            updated=live.update_time.isoformat() if live.update_time else "", labels=dict(live.labels),
            revisions=revisions, label_studio=registrations)

    @_auth_errors
    def rollback(self, settings, to_revision: Optional[str] = None, progress=_quiet) -> RollbackResult:
        """All traffic to `to_revision`, or to the newest ready revision older than the one serving now."""
        from google.api_core import exceptions as gexc
        from google.cloud import run_v2
        from google.protobuf import field_mask_pb2

        live = self.get_service(settings)
        if live is None:
            raise LsdeployError(f"service {settings.service} is not deployed in {settings.project}/{settings.region}: "
                                "check --gcp-project-id and --gcp-region", EXIT_USAGE)
        serving = [t["revision"] for t in self._serving(live) if t["percent"]]
        revisions = self.list_revisions(settings)
        ready = [r.name.rsplit("/", 1)[-1] for r in revisions if _revision_ready(r)[0]]
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
            if target not in serving and not self._image_exists(settings, by_name[target]):
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
                if self._image_exists(settings, by_name[name]):
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
        if serving == [target] and all(t["percent"] == 100 for t in self._serving(live) if t["revision"] == target):
            progress(f"{target} already serves all traffic")
            return RollbackResult(service=settings.service, from_revisions=serving, to_revision=target,
                                  traffic=self._serving(live), url=live.uri)
        progress(f"moving all traffic of {settings.service} from {', '.join(serving) or 'none'} to {target}")
        # The live service with only its traffic changed (and its etag: a concurrent change is refused),
        # under an update mask naming just `traffic`: no new revision.
        update = run_v2.Service.deserialize(run_v2.Service.serialize(live))
        update.traffic = [run_v2.TrafficTarget(
            type_=run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION, revision=target,
            percent=100)]
        request = run_v2.UpdateServiceRequest(service=update, update_mask=field_mask_pb2.FieldMask(paths=["traffic"]))
        try:
            op = self.clients.services.update_service(request=request)
            self._result(op, settings.ready_timeout, f"moving the traffic of {settings.service} to {target}")
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "run", "moving the traffic of", settings.service_name, settings.project) from None
        after = self.get_service(settings)
        traffic = self._serving(after) if after is not None else []
        if [t["revision"] for t in traffic if t["percent"]] != [target]:
            raise LsdeployError(f"Cloud Run did not move the traffic of {settings.service} to {target} (it reports "
                                f"{traffic}): check the service in the Cloud Run console", EXIT_DEPLOY)
        progress(f"{target} serves 100% of the traffic")
        return RollbackResult(service=settings.service, from_revisions=serving, to_revision=target,
                              traffic=traffic, url=after.uri)

    def _own_secrets(self, settings) -> list:
        """The Secret Manager secrets lsdeploy made for this service (never ones passed with --secret)."""
        from google.api_core import exceptions as gexc

        found = []
        for what in ("basic-auth-pass", "label-studio-api-key"):
            name = f"projects/{settings.project}/secrets/{settings.secret_id(what)}"
            try:
                secret = self.clients.secrets.get_secret(name=name)
            except gexc.NotFound:
                continue
            except gexc.GoogleAPICallError as exc:
                raise google_error(exc, "secretmanager", "reading secret", name, settings.project) from None
            if secret.labels.get(MANAGED_LABEL[0]) == MANAGED_LABEL[1] and secret.labels.get("service") == settings.service:
                found.append(name)
        return found

    def _blobs(self, settings, bucket: str, prefix: str) -> list:
        from google.api_core import exceptions as gexc

        try:
            return list(self.clients.storage.list_blobs(bucket, prefix=prefix))
        except gexc.NotFound:
            return []
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "storage", "listing", f"gs://{bucket}/{prefix}", settings.project) from None

    def _image_exists(self, settings, revision) -> bool:
        """Whether the revision's image is still in this service's Artifact Registry package (an
        image from elsewhere is taken to exist)."""
        image = revision.containers[0].image if revision.containers else ""
        ours = f"{settings.image}@"
        if not image.startswith(ours):
            return True
        name = f"{settings.repository_name}/packages/{settings.service}/versions/{image[len(ours):]}"
        return self._lookup("artifactregistry", "reading image", name, settings, self.clients.registry.get_version) \
            is not None

    def _delete_blobs(self, settings, bucket: str, blobs) -> None:
        from google.api_core import exceptions as gexc

        for blob in blobs:
            try:
                blob.delete()
            except gexc.NotFound:
                pass  # already gone: what was asked for
            except gexc.GoogleAPICallError as exc:
                raise google_error(exc, "storage", "deleting", f"gs://{bucket}/{blob.name}", settings.project) from None

    def _package(self, settings) -> Optional[str]:
        name = f"{settings.repository_name}/packages/{settings.service}"
        found = self._lookup("artifactregistry", "reading package", name, settings, self.clients.registry.get_package)
        return name if found is not None else None

    @_auth_errors
    def destroy_plan(self, settings, purge: bool = False) -> DestroyResult:
        """What destroy would delete; sends no mutating request."""
        settings.validate()
        result = DestroyResult(service=settings.service, purge=purge)
        live = self.get_service(settings)
        _check_managed(settings, live)
        if live is not None:
            result.deleted.append(settings.service_name)
        result.deleted += self._own_secrets(settings)
        if purge:
            package = self._package(settings)
            if package:
                result.deleted.append(f"{package} (every image of {settings.image})")
            for bucket, prefix, _ in _purged_prefixes(settings):
                if self._blobs(settings, bucket, prefix):
                    result.deleted.append(f"gs://{bucket}/{prefix}")
            result.kept += _shared_kept(settings)
        else:
            result.kept += _kept_without_purge(settings)
        return result

    @_auth_errors
    def destroy(self, settings, purge: bool = False, progress=_quiet) -> DestroyResult:
        """Unregister from Label Studio, delete the service and its secrets; with purge also its
        images, uploaded source bundles and model state. Safe to run again."""
        from google.api_core import exceptions as gexc

        settings.validate()
        result = DestroyResult(service=settings.service, purge=purge)
        live = self.get_service(settings)
        _check_managed(settings, live)
        client = self._label_studio(settings)
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
                self._result(self.clients.services.delete_service(name=settings.service_name), settings.ready_timeout,
                             f"deleting Cloud Run service {settings.service}")
            except gexc.NotFound:
                pass
            except gexc.GoogleAPICallError as exc:
                raise google_error(exc, "run", "deleting service", settings.service_name, settings.project) from None
            result.deleted.append(settings.service_name)
        for name in self._own_secrets(settings):
            progress(f"deleting secret {name.rsplit('/', 1)[-1]}")
            try:
                self.clients.secrets.delete_secret(name=name)
            except gexc.NotFound:
                pass
            except gexc.GoogleAPICallError as exc:
                raise google_error(exc, "secretmanager", "deleting secret", name, settings.project) from None
            result.deleted.append(name)
        if not purge:
            result.kept += _kept_without_purge(settings)
            return result
        package = self._package(settings)
        if package:
            progress(f"deleting every image of {settings.image}")
            try:
                self._result(self.clients.registry.delete_package(name=package), 300, f"deleting package {package}")
            except gexc.NotFound:
                pass
            except gexc.GoogleAPICallError as exc:
                raise google_error(exc, "artifactregistry", "deleting package", package, settings.project) from None
            result.deleted.append(f"{package} (every image of {settings.image})")
        for bucket, prefix, _ in _purged_prefixes(settings):
            blobs = self._blobs(settings, bucket, prefix)
            if not blobs:
                continue
            progress(f"deleting {len(blobs)} object(s) under gs://{bucket}/{prefix}")
            self._delete_blobs(settings, bucket, blobs)
            result.deleted.append(f"gs://{bucket}/{prefix}")
        result.kept += _shared_kept(settings)
        return result


def _up_to_date(live, desired) -> bool:
    """The live service already is `desired` (same spec fingerprint), ready and serving its latest
    revision: a deploy sends no update."""
    return live is not None and bool(desired.annotations.get(SPEC_ANNOTATION)) \
        and live.annotations.get(SPEC_ANNOTATION) == desired.annotations.get(SPEC_ANNOTATION) \
        and bool(live.latest_ready_revision) and live.latest_ready_revision == live.latest_created_revision \
        and _ready(live)[0] and _serves_latest(live)


def service_fields(service) -> dict:
    """What a user tunes on the service, flattened for a field-by-field diff. Secret references show
    as `secret-id:version`; plain environment values are compared but never shown."""
    from google.cloud import run_v2

    template = service.template
    container = template.containers[0] if template.containers else run_v2.Container()
    plain, secret_refs = {}, {}
    for env in container.env:
        ref = env.value_source.secret_key_ref
        if ref.secret:
            secret_refs[env.name] = f"{ref.secret.rsplit('/', 1)[-1]}:{ref.version or 'latest'}"
        else:
            plain[env.name] = hashlib.sha256(env.value.encode()).hexdigest()
    limits = container.resources.limits
    timeout = template.timeout
    seconds = int(timeout.total_seconds()) if hasattr(timeout, "total_seconds") else int(getattr(timeout, "seconds", 0))
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


def _check_managed(settings, live) -> None:
    """destroy removes only what lsdeploy deployed."""
    if live is not None and live.labels.get(MANAGED_LABEL[0]) != MANAGED_LABEL[1]:
        raise LsdeployError(f"Cloud Run service {settings.service} was not deployed by lsdeploy (no label "
                            f"{MANAGED_LABEL[0]}={MANAGED_LABEL[1]}): nothing was deleted; remove it with `gcloud run "
                            f"services delete {settings.service} --region {settings.region}`", EXIT_USAGE)


def _serves_latest(service) -> bool:
    """All traffic on the latest ready revision (not pinned elsewhere, as after a rollback)."""
    from google.cloud import run_v2

    latest = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST
    return [(t.type_, t.percent) for t in service.traffic] == [(latest, 100)]


def _logs_prefix(settings) -> str:
    return f"build-logs/{settings.service}/"


def _purged_prefixes(settings) -> list:
    """(bucket, prefix, what) of the service's objects that `destroy --purge` deletes."""
    return [(settings.sources_bucket_name, f"sources/{settings.service}/", "source bundles"),
            (settings.sources_bucket_name, _logs_prefix(settings), "build logs"),
            (settings.state_bucket_name, f"{settings.service}/", "model state")]


def _kept_without_purge(settings) -> list:
    return [f"images of {settings.image} (pass --purge)"] + [
        f"{what} gs://{bucket}/{prefix} (pass --purge)" for bucket, prefix, what in _purged_prefixes(settings)]


def _shared_kept(settings) -> list:
    return [f"gs://{settings.sources_bucket_name} and gs://{settings.state_bucket_name} (buckets shared by every "
            "service of the project)", f"{settings.repository_name} (repository shared by every service)"]


def _revision_ready(revision) -> tuple:
    from google.cloud import run_v2

    for cond in revision.conditions:
        if cond.type_ == "Ready":
            ok = cond.state == run_v2.Condition.State.CONDITION_SUCCEEDED
            return ok, "" if ok else cond.message
    return False, "not reported yet"


def _member(settings, project_number: str) -> str:
    account = settings.service_account or f"{project_number}-compute@developer.gserviceaccount.com"
    return f"serviceAccount:{account}"


def _ready(service) -> tuple:
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


class LogStreamer:
    """Prints a build's log as Cloud Build writes it to gs://<logs bucket>/log-<id>.txt."""

    def __init__(self, storage_client, logs_bucket: str, build_id: str, progress):
        self.progress = progress
        self.offset = 0
        self.partial = b""
        self.lines: list = []
        self.where = None
        self.client = storage_client
        if logs_bucket.startswith("gs://") and not logs_bucket.endswith(".googleusercontent.com"):
            bucket, _, prefix = logs_bucket[5:].partition("/")
            self.where = (bucket, f"{prefix.rstrip('/') + '/' if prefix else ''}log-{build_id}.txt")

    def poll(self) -> None:
        if self.where is None:
            return
        try:
            # A fresh Blob each time: a downloaded Blob remembers its generation, and the log
            # object gets a new generation at every write.
            blob = self.client.bucket(self.where[0]).blob(self.where[1])
            chunk = blob.download_as_bytes(start=self.offset)
        except Exception:  # noqa: BLE001 - 404 before the first write, 416 when nothing new
            return
        if not chunk:
            return
        self.offset += len(chunk)
        data = self.partial + chunk
        *complete, self.partial = data.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            self.progress(f"  build | {line}")

    def tail(self, count: int) -> list:
        lines = [line for line in self.lines if line.strip()]
        if self.partial.strip():
            lines.append(self.partial.decode("utf-8", "replace"))
        return lines[-count:]
