"""Resource Manager v3 fake: the project (its number), its IAM policy, and testIamPermissions
answering what the deploying identity holds.

`cloud.deployer` (tests/fakes/cloud.py) says which permissions the caller has; None means every
permission (the fakes' default). TestIamPermissions answers the subset the caller holds, as the
real API does, so a preflight can name what is missing before anything is created.
"""
from __future__ import annotations

import re

from google.cloud.resourcemanager_v3 import types as rm

from .iam import Policies
from .server import not_found, project_number, routes_from_transport

Project = rm.Project.pb()


class ResourceManagerFake:
    api = "cloudresourcemanager"

    def __init__(self, cloud):
        self.cloud = cloud
        self.policies = Policies(cloud)
        server = cloud.server
        server.add_routes(routes_from_transport(
            self.api, "google.cloud.resourcemanager_v3.services.projects.transports.rest", "ProjectsRestTransport"))
        for method in ("GetProject", "GetIamPolicy", "SetIamPolicy", "TestIamPermissions"):
            server.handle(self.api, method)(getattr(self, method))

    @staticmethod
    def _project(name: str) -> str:
        m = re.fullmatch(r"projects/([^/]+)", name)
        if not m:
            raise not_found(f"Project {name} not found or permission denied.")
        return m.group(1)

    def GetProject(self, request, ctx):
        project = self._project(request.name)
        number = project_number(project)
        return Project(name=f"projects/{number}", project_id=project if not project.isdigit() else project,
                       state=1, display_name=project)

    def GetIamPolicy(self, request, ctx):
        return self.policies.get(f"projects/{project_number(self._project(request.resource))}")

    def SetIamPolicy(self, request, ctx):
        return self.policies.set(f"projects/{project_number(self._project(request.resource))}", request)

    def TestIamPermissions(self, request, ctx):
        self._project(request.resource)
        return self.policies.test(request.permissions)
