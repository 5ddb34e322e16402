"""Service Usage v1 fake (which APIs a project has enabled) and the SERVICE_DISABLED answers of
the APIs it disables.

A project starts with every API enabled; `disable(*services)` turns some off, like a brand-new
project where only a few are on. Every request to a disabled API's fake then answers Google's
real error (403 PERMISSION_DENIED, ErrorInfo reason SERVICE_DISABLED), and BatchGetServices /
GetService report it DISABLED until EnableService / BatchEnableServices turns it on (a long-running
operation, as in the real API). Names use the project number, as the real API answers.
"""
from __future__ import annotations

import re

from google.cloud.service_usage_v1 import types as su

from .server import (SERVICE_TITLES, invalid_argument, project_number, routes_from_transport,
                     service_disabled_error)

Service = su.Service.pb()

TITLES = {
    "run.googleapis.com": "Cloud Run Admin API", "cloudbuild.googleapis.com": "Cloud Build API",
    "artifactregistry.googleapis.com": "Artifact Registry API", "secretmanager.googleapis.com": "Secret Manager API",
    "storage.googleapis.com": "Cloud Storage API", "iam.googleapis.com": "Identity and Access Management (IAM) API",
    "serviceusage.googleapis.com": "Service Usage API", "logging.googleapis.com": "Cloud Logging API",
    "cloudresourcemanager.googleapis.com": "Cloud Resource Manager API",
}
# the fake API that answers for a service name
FAKE_API = {service: api for api, (service, _) in SERVICE_TITLES.items()}


class ServiceUsageFake:
    api = "serviceusage"

    def __init__(self, cloud):
        self.cloud = cloud
        self.disabled: set[str] = set()
        server = cloud.server
        server.add_routes(routes_from_transport(
            self.api, "google.cloud.service_usage_v1.services.service_usage.transports.rest",
            "ServiceUsageRestTransport"))
        for method in ("GetService", "BatchGetServices", "EnableService", "BatchEnableServices", "ListServices"):
            server.handle(self.api, method)(getattr(self, method))
        server.handle(self.api, "GetOperation")(server._get_operation)
        # a disabled API answers SERVICE_DISABLED to everything
        cloud.fault(None, None, lambda entry: service_disabled_error(entry.api, project_number(
            _project_of(entry))), match=lambda entry: SERVICE_TITLES.get(entry.api, ("",))[0] in self.disabled)

    def disable(self, *services: str) -> None:
        self.disabled.update(services)

    # ---- messages --------------------------------------------------------------------------
    def _service(self, project: str, service: str):
        number = project_number(project)
        message = Service(name=f"projects/{number}/services/{service}", parent=f"projects/{number}",
                          state=1 if service in self.disabled else 2)   # 1 DISABLED, 2 ENABLED
        message.config.name = service
        message.config.title = TITLES.get(service, service)
        return message

    @staticmethod
    def _parse(name: str):
        m = re.fullmatch(r"(projects|folders|organizations)/([^/]+)/services/([^/]+)", name)
        if not m:
            raise invalid_argument(f"Invalid service name: {name}", "name")
        return m.group(2), m.group(3)

    def _enable(self, project: str, services: list[str]):
        for service in services:
            if service not in TITLES and not service.endswith(".googleapis.com"):
                raise invalid_argument(f"Not found or permission denied for service(s): {service}.")
        self.disabled.difference_update(services)
        name = f"operations/acf.p2-{project_number(project)}-{self.cloud.server.operation_id()}"
        response = su.BatchEnableServicesResponse.pb()(services=[self._service(project, s) for s in services])
        metadata = su.OperationMetadata.pb()(resource_names=[f"services/{s}/projectSettings/{project_number(project)}"
                                                             for s in services])
        return self.cloud.server.new_operation(name, self.api, lambda: metadata, lambda: response).to_pb()

    # ---- RPCs ------------------------------------------------------------------------------
    def GetService(self, request, ctx):
        return self._service(*self._parse(request.name))

    def BatchGetServices(self, request, ctx):
        if len(request.names) > 30:
            raise invalid_argument("At most 30 services can be requested.", "names")
        project = request.parent.split("/")[1]
        wanted = [self._parse(n) for n in request.names]
        if any(p not in (project, project_number(project)) for p, _ in wanted):
            raise invalid_argument("Every name must be in the parent.", "names")
        return su.BatchGetServicesResponse.pb()(services=[self._service(p, s) for p, s in wanted])

    def ListServices(self, request, ctx):
        project = request.parent.split("/")[1]
        return su.ListServicesResponse.pb()(services=[self._service(project, s) for s in sorted(TITLES)])

    def EnableService(self, request, ctx):
        project, service = self._parse(request.name)
        return self._enable(project, [service])

    def BatchEnableServices(self, request, ctx):
        if len(request.service_ids) > 20:
            raise invalid_argument("At most 20 services can be enabled in one request.", "service_ids")
        return self._enable(request.parent.split("/")[1], list(request.service_ids))


def _project_of(entry) -> str:
    from .cloud import project_of

    return project_of(entry)
