"""IAM v1 fake: service accounts (get, create), their IAM policies and testIamPermissions.

The official Python client of this API (google-cloud-iam's iam_admin_v1) speaks gRPC only, so the
routes are the REST ones of Google's discovery document (`iam.googleapis.com/v1`), and every body
is still parsed into the real messages (google.cloud.iam_admin_v1, google.iam.v1).

`cloud.iamadmin.accounts` holds the service accounts; a project's compute default account
(`NUMBER-compute@developer.gserviceaccount.com`) exists from the start, as in a project with the
Compute Engine API. Whether the caller may act as an account (`iam.serviceAccounts.actAs`) is what
testIamPermissions answers: the caller's permissions (`cloud.deployer`), or a roles/iam.serviceAccountUser
binding on the account for the member `cloud.caller`.
"""
from __future__ import annotations

import re

from google.cloud.iam_admin_v1 import types as iam_types
from google.iam.v1 import iam_policy_pb2, policy_pb2

from .iam import Policies
from .server import Route, already_exists, compile_template, invalid_argument, not_found, project_number

ServiceAccount = iam_types.ServiceAccount.pb()
ACCOUNT_ID = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]")
ROUTES = [  # (method, http, template, body, request class, response class)
    ("GetServiceAccount", "GET", "/v1/{name=projects/*/serviceAccounts/*}", None,
     iam_types.GetServiceAccountRequest.pb(), ServiceAccount),
    ("CreateServiceAccount", "POST", "/v1/{name=projects/*}/serviceAccounts", "*",
     iam_types.CreateServiceAccountRequest.pb(), ServiceAccount),
    ("GetIamPolicy", "POST", "/v1/{resource=projects/*/serviceAccounts/*}:getIamPolicy", "*",
     iam_policy_pb2.GetIamPolicyRequest, policy_pb2.Policy),
    ("SetIamPolicy", "POST", "/v1/{resource=projects/*/serviceAccounts/*}:setIamPolicy", "*",
     iam_policy_pb2.SetIamPolicyRequest, policy_pb2.Policy),
    ("TestIamPermissions", "POST", "/v1/{resource=projects/*/serviceAccounts/*}:testIamPermissions", "*",
     iam_policy_pb2.TestIamPermissionsRequest, iam_policy_pb2.TestIamPermissionsResponse),
]


class IamAdminFake:
    api = "iam"

    def __init__(self, cloud):
        self.cloud = cloud
        self.accounts: dict[str, object] = {}      # email -> ServiceAccount
        self.policies = Policies(cloud)            # serviceAccounts/EMAIL -> Policy
        routes = []
        for method, http, template, body, request_cls, response_cls in ROUTES:
            regex, variables, has_verb = compile_template(template)
            routes.append(Route(self.api, method, http, template, regex, variables, body, request_cls,
                                response_cls, has_verb))
        cloud.server.add_routes(routes)
        for method, *_ in ROUTES:
            cloud.server.handle(self.api, method)(getattr(self, method))

    # ---- names -----------------------------------------------------------------------------
    def _email(self, name: str) -> str:
        m = re.fullmatch(r"projects/([^/]+)/serviceAccounts/([^/]+)", name)
        if not m:
            raise invalid_argument(f"Invalid service account name: {name}", "name")
        email = m.group(2)
        if email not in self.accounts:
            self._default_account(m.group(1), email)
        if email not in self.accounts:
            raise not_found(f"Unknown service account: {email}")
        return email

    def _default_account(self, project: str, email: str) -> None:
        """The compute default account exists in every project of these fakes."""
        m = re.fullmatch(r"(\d+)-compute@developer\.gserviceaccount\.com", email)
        if m and (project == "-" or project_number(project) == m.group(1)):
            self.accounts[email] = ServiceAccount(
                name=f"projects/{project}/serviceAccounts/{email}", email=email, project_id=project,
                unique_id=str(10**20 + int(m.group(1))), display_name="Compute Engine default service account")

    def add_account(self, project: str, account_id: str) -> str:
        """Create a service account directly (test set-up), bypassing the API and its log; its email."""
        email = f"{account_id}@{project}.iam.gserviceaccount.com"
        self.accounts[email] = ServiceAccount(name=f"projects/{project}/serviceAccounts/{email}", email=email,
                                              project_id=project, unique_id=str(10**20 + len(self.accounts)))
        return email

    def holds(self, email: str, permission: str) -> bool:
        """Whether the caller holds `permission` on the account."""
        if self.cloud.deployer is None or permission in self.cloud.deployer:
            return True
        return permission == "iam.serviceAccounts.actAs" and self.policies.grants(
            f"serviceAccounts/{email}", self.cloud.caller, ("roles/iam.serviceAccountUser", "roles/owner"))

    # ---- RPCs ------------------------------------------------------------------------------
    def GetServiceAccount(self, request, ctx):
        return self.accounts[self._email(request.name)]

    def CreateServiceAccount(self, request, ctx):
        project = request.name.split("/")[1]
        if not ACCOUNT_ID.fullmatch(request.account_id):
            raise invalid_argument("Account ID must be 6-30 characters: lowercase letters, digits and hyphens, "
                                   "starting with a letter.", "account_id")
        email = f"{request.account_id}@{project}.iam.gserviceaccount.com"
        if email in self.accounts:
            raise already_exists(f"Service account {request.account_id} already exists within project "
                                 f"projects/{project}.")
        account = ServiceAccount()
        account.CopyFrom(request.service_account)
        account.name = f"projects/{project}/serviceAccounts/{email}"
        account.email, account.project_id = email, project
        account.unique_id = str(10**20 + len(self.accounts))
        account.etag = b"MDEwMjE5MjA="
        self.accounts[email] = account
        return account

    def GetIamPolicy(self, request, ctx):
        return self.policies.get(f"serviceAccounts/{self._email(request.resource)}")

    def SetIamPolicy(self, request, ctx):
        return self.policies.set(f"serviceAccounts/{self._email(request.resource)}", request)

    def TestIamPermissions(self, request, ctx):
        email = self._email(request.resource)
        return iam_policy_pb2.TestIamPermissionsResponse(
            permissions=[p for p in request.permissions if self.holds(email, p)])
