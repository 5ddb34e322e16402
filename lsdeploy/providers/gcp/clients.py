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


class GcpApi:
    """The clients, operation polling (api_core polling; tests make it faster) and the interval
    between reads of a build's status and log."""

    def __init__(self, clients: GcpClients, polling=None, poll_interval: float = 2.0):
        self.clients = clients
        self.polling = polling
        self.poll_interval = poll_interval
        self.last_grant = None  # time.monotonic() of this run's latest IAM grant (IAM takes minutes to apply)

    def granted(self) -> None:
        import time

        self.last_grant = time.monotonic()

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
