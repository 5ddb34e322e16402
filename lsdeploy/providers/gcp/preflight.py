"""Preflight: before anything is written, is the project ready for a deploy?

1. The APIs a deploy calls are enabled (Service Usage `BatchGetServices`); with `enable` the
   missing ones are enabled (`BatchEnableServices`, waited for), otherwise they are listed with the
   one `gcloud services enable` line.
2. The deploying identity holds the permissions a deploy needs (`testIamPermissions` on the
   project; what the project does not grant is looked for on the existing buckets, repository and
   secrets, where docs/ci.md's least-privilege recipe grants it), reported as the roles to grant.
3. It may act as the accounts the service and the build run as (`iam.serviceAccounts.actAs`);
   when the build's account (`lsdeploy-builder`) is still to be created, it may create it and act
   as it (identity.py).

`preflight()` returns a `Readiness`; `require()` raises one line naming everything missing. The
Service Usage answer names the project by number, which the deploy needs for the compute default
service account (`api.project_number`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import EXIT_AUTH, EXIT_DEPLOY, EXIT_USAGE, LsdeployError
from .errors import google_error
from .identity import BUILDER_ID, build_account

# The APIs a deploy calls, with their titles.
REQUIRED_APIS = {
    "run.googleapis.com": "Cloud Run Admin API",
    "cloudbuild.googleapis.com": "Cloud Build API",
    "artifactregistry.googleapis.com": "Artifact Registry API",
    "secretmanager.googleapis.com": "Secret Manager API",
    "storage.googleapis.com": "Cloud Storage API",
    "iam.googleapis.com": "Identity and Access Management (IAM) API",
    "cloudresourcemanager.googleapis.com": "Cloud Resource Manager API",
}
# permission -> the predefined role that grants it (the one to name when it is missing)
PERMISSION_ROLES = {
    "run.services.get": "roles/run.admin", "run.services.create": "roles/run.admin",
    "run.services.update": "roles/run.admin", "run.services.setIamPolicy": "roles/run.admin",
    "run.operations.get": "roles/run.admin",
    "cloudbuild.builds.create": "roles/cloudbuild.builds.editor", "cloudbuild.builds.get": "roles/cloudbuild.builds.editor",
    "artifactregistry.repositories.get": "roles/artifactregistry.reader",
    "artifactregistry.tags.get": "roles/artifactregistry.reader",
    "artifactregistry.repositories.create": "roles/artifactregistry.admin",
    "secretmanager.secrets.get": "roles/secretmanager.admin", "secretmanager.secrets.create": "roles/secretmanager.admin",
    "secretmanager.secrets.getIamPolicy": "roles/secretmanager.admin",
    "secretmanager.secrets.setIamPolicy": "roles/secretmanager.admin",
    "secretmanager.versions.access": "roles/secretmanager.admin", "secretmanager.versions.add": "roles/secretmanager.admin",
    "storage.buckets.get": "roles/storage.admin", "storage.buckets.create": "roles/storage.admin",
    "storage.objects.create": "roles/storage.objectUser", "storage.objects.get": "roles/storage.objectUser",
    "storage.objects.list": "roles/storage.objectUser",
}
# what `--training job` adds: the training job, and granting the service's identity the right to run it
JOB_PERMISSION_ROLES = {
    "run.jobs.get": "roles/run.admin", "run.jobs.create": "roles/run.admin", "run.jobs.update": "roles/run.admin",
    "run.jobs.getIamPolicy": "roles/run.admin", "run.jobs.setIamPolicy": "roles/run.admin",
}
# what creating the build's account needs, on the project
BUILDER_ROLES = {"iam.serviceAccounts.create": "roles/iam.serviceAccountAdmin",
                 "iam.serviceAccounts.actAs": "roles/iam.serviceAccountUser"}
STORAGE_OBJECT_PERMISSIONS = ("storage.buckets.get", "storage.objects.create", "storage.objects.get",
                              "storage.objects.list")
SECRET_PERMISSIONS = ("secretmanager.secrets.get", "secretmanager.secrets.getIamPolicy",
                      "secretmanager.secrets.setIamPolicy", "secretmanager.versions.access",
                      "secretmanager.versions.add")


@dataclass
class Readiness:
    project: str
    project_number: str = ""
    disabled_apis: list = field(default_factory=list)     # service names
    enabled_now: list = field(default_factory=list)       # enabled by this run (--enable-apis)
    missing: dict = field(default_factory=dict)           # role -> [permissions]
    act_as: list = field(default_factory=list)            # service accounts the deployer may not act as
    act_as_build: list = field(default_factory=list)      # the build's account, the same
    accounts_missing: list = field(default_factory=list)  # --build-service-account that does not exist
    notes: list = field(default_factory=list)             # what could not be checked, and why

    @property
    def ready(self) -> bool:
        return not (self.disabled_apis or self.missing or self.act_as or self.act_as_build or self.accounts_missing)

    def enable_command(self) -> str:
        return f"gcloud services enable {' '.join(self.disabled_apis)} --project {self.project}"

    def problems(self) -> list:
        out = []
        if self.disabled_apis:
            titles = ", ".join(REQUIRED_APIS.get(s, s) for s in self.disabled_apis)
            out.append(f"APIs not enabled in project {self.project}: {titles}: run `{self.enable_command()}` "
                       "(or deploy with --enable-apis) and retry in a minute")
        if self.missing:
            roles = "; ".join(f"{role} ({', '.join(sorted(perms))})" for role, perms in sorted(self.missing.items()))
            out.append(f"the deploying identity lacks permissions in project {self.project}: grant {roles} "
                       f"(gcloud projects add-iam-policy-binding {self.project} --member YOUR_IDENTITY --role ROLE)")
        for email in self.act_as:
            out.append(f"the deploying identity may not deploy a service that runs as {email} "
                       f"(iam.serviceAccounts.actAs): grant it roles/iam.serviceAccountUser on that account (gcloud iam "
                       f"service-accounts add-iam-policy-binding {email} --project {self.project} --member "
                       "YOUR_IDENTITY --role roles/iam.serviceAccountUser)")
        for email in self.act_as_build:
            out.append(f"the deploying identity may not run builds as {email} (iam.serviceAccounts.actAs): grant it "
                       f"roles/iam.serviceAccountUser on that account (gcloud iam service-accounts "
                       f"add-iam-policy-binding {email} --project {self.project} --member YOUR_IDENTITY --role "
                       "roles/iam.serviceAccountUser)")
        for email in self.accounts_missing:
            out.append(f"--build-service-account {email}: the service account does not exist in project "
                       f"{self.project}: create it, or leave the option out (lsdeploy then creates {BUILDER_ID})")
        return out

    def lines(self) -> list:
        out = [f"project {self.project}" + (f" (number {self.project_number})" if self.project_number else "")]
        out.append("APIs: " + ("all enabled" if not self.disabled_apis else
                               "not enabled: " + ", ".join(self.disabled_apis)))
        if self.enabled_now:
            out.append("enabled now: " + ", ".join(self.enabled_now))
        out.append("permissions: " + ("all held" if not self.missing else "missing: " + "; ".join(
            f"{role} ({', '.join(sorted(perms))})" for role, perms in sorted(self.missing.items()))))
        if self.act_as or self.act_as_build:
            out.append("may not act as: " + ", ".join(self.act_as + self.act_as_build))
        out += [f"note: {note}" for note in self.notes]
        out += [f"to do: {problem}" for problem in self.problems()]
        out.append("ready to deploy" if self.ready else "not ready: fix the above and run --check again")
        return out

    def to_dict(self) -> dict:
        return {"project": self.project, "project_number": self.project_number, "ready": self.ready,
                "disabled_apis": self.disabled_apis, "enabled_now": self.enabled_now,
                "missing_roles": {role: sorted(perms) for role, perms in sorted(self.missing.items())},
                "act_as_missing": self.act_as + self.act_as_build,
                "accounts_missing": self.accounts_missing,
                "notes": self.notes, "problems": self.problems()}


def preflight(api, settings, enable: bool = False, progress=lambda m: None) -> Readiness:
    """What the project lacks for a deploy; sends only reads (and, with `enable`, the enabling)."""
    found = Readiness(settings.project)
    if getattr(api.clients, "service_usage", None) is not None:
        _check_apis(api, settings, found, enable, progress)
    if getattr(api.clients, "projects", None) is not None and not found.disabled_apis:
        _check_permissions(api, settings, found)
    if found.project_number:
        api.project_number = found.project_number
    if getattr(api.clients, "iam", None) is not None and not found.disabled_apis:
        _check_act_as(api, settings, found)
        _check_builder(api, settings, found)
    return found


def require(readiness: Readiness) -> None:
    """One line naming everything missing; exit 3 when a permission is, else 5."""
    if not readiness.ready:
        denied = readiness.missing or readiness.act_as or readiness.act_as_build
        raise LsdeployError("; ".join(readiness.problems()),
                            EXIT_AUTH if denied else EXIT_USAGE if readiness.accounts_missing else EXIT_DEPLOY)


def _check_apis(api, settings, found, enable, progress) -> None:
    from google.api_core import exceptions as gexc

    client = api.clients.service_usage
    parent = f"projects/{settings.project}"
    try:
        answer = client.batch_get_services(request={"parent": parent, "names": [
            f"{parent}/services/{service}" for service in REQUIRED_APIS]})
    except gexc.Forbidden as exc:
        if (getattr(exc, "reason", "") or "") == "SERVICE_DISABLED":
            found.disabled_apis.append("serviceusage.googleapis.com")
            return
        found.notes.append("could not list the enabled APIs (serviceusage.services.get denied: grant "
                           "roles/serviceusage.serviceUsageViewer to check them)")
        return
    except gexc.GoogleAPICallError as exc:
        raise google_error(exc, "serviceusage", "listing the enabled APIs of", parent, settings.project) from None
    for service in answer.services:
        found.project_number = found.project_number or service.name.split("/")[1]
        if service.state.name != "ENABLED":
            found.disabled_apis.append(service.config.name or service.name.rsplit("/", 1)[-1])
    if found.disabled_apis and enable:
        progress(f"enabling {', '.join(found.disabled_apis)} in project {settings.project}")
        try:
            operation = client.batch_enable_services(request={"parent": parent, "service_ids": found.disabled_apis})
            api.result(operation, 600, f"enabling APIs in project {settings.project}")
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "serviceusage", "enabling APIs in", parent, settings.project) from None
        found.enabled_now, found.disabled_apis = found.disabled_apis, []


def _check_permissions(api, settings, found) -> None:
    from google.api_core import exceptions as gexc

    resource = f"projects/{settings.project}"
    roles = {**PERMISSION_ROLES, **(JOB_PERMISSION_ROLES if settings.training == "job" else {})}
    wanted = sorted(roles)
    try:
        held = set(api.clients.projects.test_iam_permissions(resource=resource, permissions=wanted).permissions)
    except gexc.GoogleAPICallError as exc:
        found.notes.append(f"could not test the deploying identity's permissions ({type(exc).__name__})")
        return
    missing = set(wanted) - held
    # what the project does not grant may be granted on the resources themselves (docs/ci.md)
    missing = _on_buckets(api, settings, missing, found)
    missing = _on_repository(api, settings, missing)
    missing = _on_secrets(api, settings, missing)
    for permission in sorted(missing):
        found.missing.setdefault(roles[permission], []).append(permission)


def _on_buckets(api, settings, missing: set, found) -> set:
    if not missing & (set(STORAGE_OBJECT_PERMISSIONS) | {"storage.buckets.create"}):
        return missing
    from google.api_core import exceptions as gexc

    names = [settings.sources_bucket_name, settings.state_bucket_name]
    exist = []
    for name in names:
        try:
            bucket = api.clients.storage.lookup_bucket(name)
        except gexc.GoogleAPICallError:
            bucket = None  # no storage.buckets.get: reported below
        if bucket is not None:
            exist.append(bucket)
    if len(exist) == len(names):
        missing = missing - {"storage.buckets.create"}
    if not exist:
        return missing
    left = set()
    for permission in missing & set(STORAGE_OBJECT_PERMISSIONS):
        for bucket in exist:
            try:
                if permission not in bucket.test_iam_permissions([permission]):
                    left.add(permission)
            except gexc.GoogleAPICallError:
                left.add(permission)
    return (missing - set(STORAGE_OBJECT_PERMISSIONS)) | left


def _on_repository(api, settings, missing: set) -> set:
    wanted = {p for p in missing if p.startswith("artifactregistry.")}
    if not wanted:
        return missing
    from google.api_core import exceptions as gexc

    try:
        api.clients.registry.get_repository(name=settings.repository_name)
    except gexc.NotFound:
        return missing - (wanted - {"artifactregistry.repositories.create"})  # created by the deploy: admin needed
    except gexc.GoogleAPICallError:
        return missing
    left = wanted - {"artifactregistry.repositories.create"}
    try:
        answer = api.clients.registry.test_iam_permissions(request={"resource": settings.repository_name,
                                                                    "permissions": sorted(left)})
        left -= set(answer.permissions)
    except gexc.GoogleAPICallError:
        pass
    return (missing - wanted) | left


def _on_secrets(api, settings, missing: set) -> set:
    wanted = missing & set(SECRET_PERMISSIONS)
    if not wanted:
        return missing
    from google.api_core import exceptions as gexc

    owned = [w for w, on in (("basic-auth-pass", settings.basic_auth),
                            ("label-studio-api-key", bool(settings.label_studio_api_key))) if on]
    if not owned:
        return missing - set(SECRET_PERMISSIONS) - {"secretmanager.secrets.create"}
    left = set()
    for what in owned:
        name = f"projects/{settings.project}/secrets/{settings.secret_id(what)}"
        try:
            answer = api.clients.secrets.test_iam_permissions(request={"resource": name,
                                                                       "permissions": sorted(wanted)})
            left |= wanted - set(answer.permissions)
        except gexc.NotFound:
            left |= wanted | ({"secretmanager.secrets.create"} & missing)
        except gexc.GoogleAPICallError:
            left |= wanted
    return (missing - set(SECRET_PERMISSIONS) - {"secretmanager.secrets.create"}) | left


def _check_act_as(api, settings, found) -> None:
    """The service runs as --service-account or the compute default account: deploying it needs
    iam.serviceAccounts.actAs on that account (roles/iam.serviceAccountUser)."""
    email = settings.service_account or (
        f"{found.project_number}-compute@developer.gserviceaccount.com" if found.project_number else "")
    if email and _may_act_as(api, settings, email, found) is False:
        found.act_as.append(email)


def _may_act_as(api, settings, email: str, found):
    """Whether the deploying identity holds iam.serviceAccounts.actAs on the account; None (and a
    note) when that could not be tested."""
    from google.api_core import exceptions as gexc

    try:
        held = api.clients.iam.test_iam_permissions(f"projects/{settings.project}/serviceAccounts/{email}",
                                                    ["iam.serviceAccounts.actAs"])
    except gexc.GoogleAPICallError as exc:
        found.notes.append(f"could not test iam.serviceAccounts.actAs on {email} ({type(exc).__name__})")
        return None
    return "iam.serviceAccounts.actAs" in held


def _check_builder(api, settings, found) -> None:
    """The build's account (identity.py): when it exists, the deployer must be allowed to act as
    it; when deploy is to create it (`lsdeploy-builder`), to create service accounts and to act
    as them (a grant on the project: the account has no policy of its own yet)."""
    from google.api_core import exceptions as gexc

    try:
        email = build_account(api, settings)
    except LsdeployError as exc:  # `compute` without a project number
        found.notes.append(str(exc))
        return
    name = f"projects/{settings.project}/serviceAccounts/{email}"
    try:
        api.clients.iam.get_service_account(name)
    except gexc.NotFound:
        if settings.build_service_account:
            found.accounts_missing.append(email)
            return
        wanted = ["iam.serviceAccounts.actAs", "iam.serviceAccounts.create"]
        try:
            held = set(api.clients.projects.test_iam_permissions(
                resource=f"projects/{settings.project}", permissions=wanted).permissions)
        except (gexc.GoogleAPICallError, AttributeError) as exc:
            found.notes.append(f"could not test the right to create {email} ({type(exc).__name__})")
            return
        for permission in wanted:
            if permission not in held:
                role = BUILDER_ROLES[permission]
                found.missing.setdefault(role, []).append(permission)
        return
    except gexc.GoogleAPICallError as exc:
        found.notes.append(f"could not read the build's service account {email} ({type(exc).__name__})")
        return
    if _may_act_as(api, settings, email, found) is False:
        found.act_as_build.append(email)
