"""The identity a build runs as, and exactly the grants it needs.

Since 2024 new projects run Cloud Build as the Compute Engine default service account, and in
organizations created on or after 3 May 2024 that account holds no role at all. So lsdeploy names
the build's account itself (`build.service_account`): by default a dedicated `lsdeploy-builder`
account that the first deploy creates, or `--build-service-account compute` (the Compute Engine
default account) or any account's email. Before the build is submitted:

- the deploying identity must be allowed to act as it (`iam.serviceAccounts.actAs`, in
  roles/iam.serviceAccountUser): checked with testIamPermissions, else an error naming the role,
  the account and the command;
- it gets roles/storage.objectUser on the sources bucket (it reads the uploaded source and writes
  its log there: the build logs to that bucket only, GCS_ONLY, so the deploy can stream it) and
  roles/artifactregistry.writer on the repository (it pulls the cache image and pushes). Each grant
  reads the policy first and writes only when the account lacks the role.
"""
from __future__ import annotations

from ...errors import EXIT_AUTH, EXIT_USAGE, LsdeployError
from ..base import _quiet
from .errors import google_error
from .storage import grant_bucket_access

BUILDER_ID = "lsdeploy-builder"


def build_account(api, settings) -> str:
    """The email of the account the build runs as."""
    chosen = settings.build_service_account
    if not chosen:
        return f"{BUILDER_ID}@{settings.project}.iam.gserviceaccount.com"
    if chosen == "compute":
        if not api.project_number:
            raise LsdeployError("--build-service-account compute: the project number is unknown (the Service Usage "
                                "API could not be read): pass the account's email, "
                                "PROJECT_NUMBER-compute@developer.gserviceaccount.com", EXIT_USAGE)
        return f"{api.project_number}-compute@developer.gserviceaccount.com"
    return chosen


def prepare(api, settings, progress=_quiet) -> str:
    """Make sure the build's account exists, may be used by the deployer and holds its grants;
    returns `projects/P/serviceAccounts/EMAIL` for build.service_account."""
    email = build_account(api, settings)
    name = f"projects/{settings.project}/serviceAccounts/{email}"
    if api.clients.iam is not None:
        _ensure_account(api, settings, email, name, progress)
        _check_act_as(api, settings, email, name)
    return name


def grant_build_access(api, settings, bucket, email: str, progress=_quiet) -> None:
    """The build's account reads the source and writes its log in the sources bucket, and pushes to
    the repository."""
    member = f"serviceAccount:{email}"
    grant_bucket_access(api, settings, bucket, member, progress, role="roles/storage.objectUser",
                        why="the build's service account", identity="build")
    _grant_repository(api, settings, member, progress)


def _ensure_account(api, settings, email, name, progress) -> None:
    from google.api_core import exceptions as gexc

    try:
        api.clients.iam.get_service_account(name)
        return
    except gexc.NotFound:
        if settings.build_service_account:
            raise LsdeployError(f"--build-service-account {email}: the service account does not exist in project "
                                f"{settings.project}: create it, or leave the option out (lsdeploy then creates "
                                f"{BUILDER_ID})", EXIT_USAGE) from None
    except gexc.GoogleAPICallError as exc:
        raise google_error(exc, "iam", "reading service account", email, settings.project) from None
    progress(f"creating service account {email} for Cloud Build (once)")
    try:
        api.clients.iam.create_service_account(settings.project, BUILDER_ID, "lsdeploy image builds",
                                               "Runs the Cloud Build builds of `label-studio-ml deploy gcp`")
    except gexc.Conflict:
        pass  # created concurrently
    except gexc.GoogleAPICallError as exc:
        error = google_error(exc, "iam", "creating service account", email, settings.project)
        if error.reason == "PERMISSION_DENIED":
            error.args = (f"{error.args[0].split(': grant')[0]}: grant the deploying identity "
                          f"roles/iam.serviceAccountAdmin on project {settings.project}, or pass "
                          "--build-service-account with an existing account",)
        raise error from None


def _check_act_as(api, settings, email, name) -> None:
    from google.api_core import exceptions as gexc

    try:
        held = api.clients.iam.test_iam_permissions(name, ["iam.serviceAccounts.actAs"])
    except gexc.GoogleAPICallError as exc:
        raise google_error(exc, "iam", "testing permissions on", email, settings.project) from None
    if "iam.serviceAccounts.actAs" not in held:
        raise LsdeployError(
            f"the deploying identity may not run builds as {email} (iam.serviceAccounts.actAs denied): grant it "
            f"roles/iam.serviceAccountUser on that account: `gcloud iam service-accounts add-iam-policy-binding "
            f"{email} --project {settings.project} --member YOUR_IDENTITY --role roles/iam.serviceAccountUser`; "
            "nothing was built", EXIT_AUTH)


def _grant_repository(api, settings, member, progress) -> None:
    from google.api_core import exceptions as gexc

    role = "roles/artifactregistry.writer"
    resource = settings.repository_name
    command = (f"gcloud artifacts repositories add-iam-policy-binding {settings.repository} --location "
               f"{settings.region} --project {settings.project} --member {member} --role {role}")
    try:
        policy = api.clients.registry.get_iam_policy(request={"resource": resource})
    except gexc.Forbidden:
        progress(f"note: the deploying identity may not read the IAM policy of repository {settings.repository}; "
                 f"the build's service account needs {role} there: if it is not granted yet, run `{command}`")
        return
    except gexc.GoogleAPICallError as exc:
        raise google_error(exc, "artifactregistry", "reading the IAM policy of", resource, settings.project) from None
    if any(b.role == role and member in b.members for b in policy.bindings):
        return
    policy.bindings.add(role=role, members=[member])
    try:
        api.clients.registry.set_iam_policy(request={"resource": resource, "policy": policy})
    except gexc.GoogleAPICallError as exc:
        error = google_error(exc, "artifactregistry", f"granting {role} to {member} on", resource, settings.project)
        if error.reason == "PERMISSION_DENIED":
            error.args = (f"{error.args[0].split(': grant')[0]}: grant the deploying identity "
                          f"roles/artifactregistry.repoAdmin on the repository, or run `{command}` once",)
        raise error from None
    api.granted("build", resource)
    progress(f"granted {role} on repository {settings.repository} to {member.split(':', 1)[-1]}")
