"""The Google clients a deploy uses, and how they are called.

`GcpClients` holds the official clients; `GcpClients.from_env(environ, project)` builds them from
gcloud's endpoint overrides (`CLOUDSDK_API_ENDPOINT_OVERRIDES_*`, `STORAGE_EMULATOR_HOST`) or
Application Default Credentials. `GcpApi` is the clients plus how to wait on them (operation
polling, the status polling interval), with calls whose errors are one line.
"""
from __future__ import annotations

import concurrent.futures
import re
from dataclasses import dataclass

from ...errors import EXIT_AUTH, EXIT_DEPLOY, EXIT_USAGE, LsdeployError
from .errors import OperationTimeout, auth_error, google_error
from .rest import RestClient
from .run_logs import LoggingRest


@dataclass
class GcpClients:
    services: object
    revisions: object
    builds: object
    registry: object
    secrets: object
    storage: object
    storage_emulated: bool = False  # fake-gcs-server: no bucket IAM endpoint
    service_usage: object = None    # which APIs are enabled (preflight); None: not checked
    projects: object = None         # Resource Manager: the deployer's permissions (preflight)
    iam: object = None              # IamRest: service accounts (the build's identity)
    jobs: object = None             # Cloud Run jobs (--training job)
    executions: object = None       # their executions (status)
    logging: object = None          # LoggingRest: why a new revision did not start (its log)

    @classmethod
    def from_env(cls, environ: dict, project: str) -> "GcpClients":
        """Clients for the environment: gcloud's CLOUDSDK_API_ENDPOINT_OVERRIDES_* (REST; anonymous
        credentials for plain http) and STORAGE_EMULATOR_HOST, else Application Default Credentials."""
        try:
            import google.auth
            from google.api_core.client_options import ClientOptions
            from google.auth.credentials import AnonymousCredentials
            from google.auth.exceptions import DefaultCredentialsError
            from google.cloud import (artifactregistry_v1, resourcemanager_v3, run_v2, secretmanager_v1,
                                      service_usage_v1, storage)
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

        def project_options(variable):
            # with a user's Application Default Credentials, Google bills Service Usage, Resource
            # Manager and IAM calls to a quota project, and refuses them without one: the deploy's
            opts = options(variable)
            if "client_options" not in opts and hasattr(opts["credentials"], "with_quota_project"):
                opts["credentials"] = opts["credentials"].with_quota_project(project)
            return opts

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
            service_usage=service_usage_v1.ServiceUsageClient(
                **project_options("CLOUDSDK_API_ENDPOINT_OVERRIDES_SERVICEUSAGE")),
            projects=resourcemanager_v3.ProjectsClient(
                **project_options("CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDRESOURCEMANAGER")),
            iam=IamRest.from_options(project_options("CLOUDSDK_API_ENDPOINT_OVERRIDES_IAM")),
            jobs=run_v2.JobsClient(**run_opts),
            executions=run_v2.ExecutionsClient(**run_opts),
            logging=LoggingRest.from_options(project_options("CLOUDSDK_API_ENDPOINT_OVERRIDES_LOGGING")),
        )


class IamRest(RestClient):
    """IAM v1 over REST (service accounts; Google's Python client of this API speaks gRPC only)."""

    default_endpoint = "https://iam.googleapis.com"

    def _call(self, method: str, path: str, body=None) -> dict:
        return self.request(method, f"v1/{path}", body)

    def get_service_account(self, name: str) -> dict:
        return self._call("GET", name)

    def create_service_account(self, project: str, account_id: str, display_name: str, description: str) -> dict:
        return self._call("POST", f"projects/{project}/serviceAccounts", {
            "accountId": account_id, "serviceAccount": {"displayName": display_name, "description": description}})

    def test_iam_permissions(self, resource: str, permissions: list) -> list:
        return self._call("POST", f"{resource}:testIamPermissions", {"permissions": permissions}).get("permissions", [])


class GcpApi:
    """The clients, operation polling (api_core polling; tests make it faster) and the interval
    between reads of a build's status and log."""

    def __init__(self, clients: GcpClients, polling=None, poll_interval: float = 2.0):
        self.clients = clients
        self.polling = polling
        self.poll_interval = poll_interval
        self.last_grants = {}  # "runtime" / "build" -> time.monotonic() of this run's latest IAM grant to it
        self.granted_on = {}   # "runtime" / "build" -> names of what was granted (secret ids, buckets, repositories)
        self.project_number = None  # the service project's number, once preflight has read it
        self.unchecked_grants = []  # grants this run could not check: ("runtime" / "build", what, the command)

    def granted(self, identity: str, resource: str) -> None:
        """An IAM grant to the service's ("runtime") or the build's ("build") identity on `resource`
        was written now: IAM takes minutes to apply it."""
        import time

        self.last_grants[identity] = time.monotonic()
        self.granted_on.setdefault(identity, set()).add(resource.rstrip("/").rsplit("/", 1)[-1])

    def just_granted(self, identity: str, message: str):
        """Seconds since this run granted `identity` something that `message` names; None when it did not."""
        if any(name and name in message for name in self.granted_on.get(identity, ())):
            return self.since_grant(identity)
        return None

    def since_grant(self, identity: str):
        """Seconds since this run's latest grant to `identity`, None when it made none."""
        import time

        granted = self.last_grants.get(identity)
        return None if granted is None else time.monotonic() - granted

    def call(self, api, action, resource, settings, fn, *args, **kwargs):
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as aexc

        try:
            return fn(*args, **kwargs)
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, api, action, resource, settings.project) from None
        except (aexc.RefreshError, aexc.TransportError) as exc:
            raise auth_error(exc) from None

    def lookup(self, api, action, name, settings, fn):
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

    def result(self, operation, timeout, what: str):
        """operation.result(timeout); OperationTimeout (one line naming `what`) when it is not done."""
        kwargs = {"timeout": timeout}
        if self.polling is not None:
            kwargs["polling"] = self.polling
        try:
            return operation.result(**kwargs)
        except concurrent.futures.TimeoutError:
            raise OperationTimeout(f"{what} did not finish within {timeout:.0f} s: it may still be running; check "
                                   "it in the Google Cloud console and run the command again", EXIT_DEPLOY) from None
