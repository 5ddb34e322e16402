"""Google API errors as one line naming the API, the action, the resource and the fix.

`google_error` turns a google.api_core error into a `GoogleApiError` (a refused permission names
the role to grant, a disabled API the `gcloud services enable` command); `auth_error` does the same
for an expired, revoked or unreachable Google login, and `auth_errors` applies it to a whole call.
"""
from __future__ import annotations

import functools
import re

from ...errors import EXIT_AUTH, EXIT_DEPLOY, LsdeployError

API_TITLES = {
    "run": ("Cloud Run Admin API", "run.googleapis.com"),
    "cloudbuild": ("Cloud Build API", "cloudbuild.googleapis.com"),
    "artifactregistry": ("Artifact Registry API", "artifactregistry.googleapis.com"),
    "secretmanager": ("Secret Manager API", "secretmanager.googleapis.com"),
    "storage": ("Cloud Storage JSON API", "storage.googleapis.com"),
    "serviceusage": ("Service Usage API", "serviceusage.googleapis.com"),
    "iam": ("Identity and Access Management (IAM) API", "iam.googleapis.com"),
    "cloudresourcemanager": ("Cloud Resource Manager API", "cloudresourcemanager.googleapis.com"),
    "logging": ("Cloud Logging API", "logging.googleapis.com"),
}
# The role to grant for a refused permission, by permission prefix (most specific first).
ROLES = [
    ("run.services.setIamPolicy", "roles/run.admin"),
    ("run.", "roles/run.developer"),
    ("iam.serviceAccounts.actAs", "roles/iam.serviceAccountUser"),
    ("iam.serviceAccounts.create", "roles/iam.serviceAccountAdmin"),
    ("iam.serviceAccounts.get", "roles/iam.serviceAccountUser"),
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
    ("logging.", "roles/logging.viewer"),
]

DEFAULT_ROLES = {"run": "roles/run.developer", "cloudbuild": "roles/cloudbuild.builds.editor",
                 "artifactregistry": "roles/artifactregistry.writer", "secretmanager": "roles/secretmanager.admin",
                 "storage": "roles/storage.objectAdmin", "iam": "roles/iam.serviceAccountUser",
                 "logging": "roles/logging.viewer"}


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


def auth_errors(method):
    """Expired or revoked Google credentials surface on the first call of any client: one line."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        from google.auth import exceptions as aexc

        try:
            return method(*args, **kwargs)
        except (aexc.RefreshError, aexc.TransportError) as exc:
            raise auth_error(exc) from None
    return wrapper
