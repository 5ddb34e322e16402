"""Secret Manager: the basic-auth password and the Label Studio key a service reads, the secrets
passed with --secret, and the service identity's access to them.

A secret never becomes a plain environment value: the service references a pinned version, so an
unchanged key makes no new version and no new revision. A bundle holding a secret is refused.
"""
from __future__ import annotations

import secrets as pysecrets
from dataclasses import dataclass, field
from typing import Optional

from ...errors import EXIT_AUTH, EXIT_USAGE, LsdeployError
from ..base import _quiet
from .errors import GoogleApiError, google_error
from .settings import MANAGED_LABEL


@dataclass
class SecretRefs:
    refs: dict = field(default_factory=dict)      # ENV -> (secret resource name, version)
    stored: list = field(default_factory=list)    # secrets lsdeploy wrote for this service
    member: Optional[str] = None                  # the service's identity, when known
    password: Optional[str] = field(default=None, repr=False)  # the basic-auth password


def check_secrets(settings, bundle, password: Optional[str] = None) -> None:
    """Refuse a bundle holding the Label Studio key or the basic-auth password: it would be
    uploaded and copied into the image."""
    for what, value in (("the Label Studio API key (--label-studio-api-key)", settings.label_studio_api_key),
                        ("the basic-auth password", password)):
        path = bundle.find(value) if value else ""
        if path:
            raise LsdeployError(f"{path} in {bundle.directory} contains {what}; nothing was uploaded: remove it "
                                "from the file (keep secrets in .env, which is never bundled) or exclude the file "
                                "in .gcloudignore", EXIT_USAGE)


def check_current_password(api, settings, bundle) -> None:
    """Refuse a bundle holding the service's current basic-auth password: one from an earlier
    deploy may have been pasted into a file."""
    if settings.basic_auth:
        check_secrets(settings, bundle, password=latest_secret_value(api, settings, "basic-auth-pass"))


def latest_secret_value(api, settings, what: str) -> Optional[str]:
    """The latest value of the service's secret `what` (basic-auth-pass...), None when it has none."""
    from google.api_core import exceptions as gexc

    name = f"projects/{settings.project}/secrets/{settings.secret_id(what)}/versions/latest"
    try:
        return api.clients.secrets.access_secret_version(name=name).payload.data.decode("utf-8")
    except (gexc.NotFound, gexc.FailedPrecondition):
        return None
    except gexc.GoogleAPICallError as exc:
        raise google_error(exc, "secretmanager", "reading", name, settings.project) from None


def ensure_secret(api, settings, secret_id: str, value: Optional[str], progress,
                  generate: bool = False) -> tuple:
    """(version resource name, project number, value). With `generate`, the latest value is
    reused and a new one made only when the secret has none; otherwise `value` is stored
    when it differs from the latest version."""
    from google.api_core import exceptions as gexc
    from google.cloud import secretmanager_v1 as sm

    client = api.clients.secrets
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


def secret_refs(api, settings, progress=_quiet, apply: bool = True,
                checked: Optional[dict] = None) -> SecretRefs:
    """The secrets the service reads: {ENV: (secret, version)}. With `apply` the basic-auth
    password and the Label Studio key are stored (a new version only when the value changed)
    and the service's identity may read them; without it nothing is written and versions that
    a deploy would add show as "new". `checked`: user_secrets() already read."""
    refs = SecretRefs()
    if settings.service_account or api.project_number:
        refs.member = member_for(settings, api.project_number or "")
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
            version, number, plain = ensure_secret(api, settings, secret_id, value, progress, generate=generate)
            if generate:
                refs.password = plain
            refs.member = refs.member or member_for(settings, number)
            refs.stored.append(version.split("/versions/")[0])
        else:
            version = peek_secret(api, settings, secret_id, value, generate)
        refs.refs[env_name] = (version.split("/versions/")[0], version.rsplit("/", 1)[-1])
    user = []
    for env_name, (full, version, number) in (user_secrets(api, settings) if checked is None else checked).items():
        if full.split("/")[1] == settings.project:
            # the runtime account is the service project's: a secret of another project names another number
            refs.member = refs.member or member_for(settings, number)
        refs.refs[env_name] = (full, version)
        user.append(full)
    if apply:
        for secret_name in refs.stored:
            grant_accessor(api, settings, secret_name, refs.member)
        for secret_name in user:
            if refs.member is None:
                progress(f"note: the service's identity (the compute default service account of project "
                         f"{settings.project}) needs roles/secretmanager.secretAccessor on {secret_name}: run `gcloud "
                         f"secrets add-iam-policy-binding {secret_name} --member serviceAccount:PROJECT_NUMBER-compute"
                         "@developer.gserviceaccount.com --role roles/secretmanager.secretAccessor` (or pass "
                         "--service-account)")
                continue
            try:
                grant_accessor(api, settings, secret_name, refs.member)
            except GoogleApiError as exc:
                if exc.exit_code != EXIT_AUTH:
                    raise
                # the deployer may not administer a secret it was given: the service may already read it
                progress(f"note: could not grant {refs.member.split(':', 1)[-1]} read access to {secret_name} "
                         f"({exc.reason or 'permission denied'}); if the new revision cannot read it, run `gcloud "
                         f"secrets add-iam-policy-binding {secret_name} --member {refs.member} --role "
                         "roles/secretmanager.secretAccessor`")
    return refs


def user_secrets(api, settings) -> dict:
    """{ENV: (secret name, version, project number)} of the secrets passed with --secret, each
    checked to exist."""
    found = {}
    for env_name, ref in sorted(settings.secret_env.items()):
        secret, _, version = ref.partition(":")
        full = secret if secret.startswith("projects/") else f"projects/{settings.project}/secrets/{secret}"
        found[env_name] = (full, version or "latest", existing_secret(api, settings, full, env_name))
    return found


def existing_secret(api, settings, name: str, env_name: str) -> str:
    """The project number of a secret passed with --secret; a clear error when it is missing."""
    from google.api_core import exceptions as gexc

    try:
        secret = api.clients.secrets.get_secret(name=name)
    except gexc.NotFound:
        raise LsdeployError(f"--secret {env_name}={name.rsplit('/', 1)[-1]}: secret {name} does not exist: create "
                            f"it first (printf '%s' VALUE | gcloud secrets create {name.rsplit('/', 1)[-1]} "
                            f"--project {name.split('/')[1]} --data-file=-)", EXIT_USAGE) from None
    except gexc.GoogleAPICallError as exc:
        raise google_error(exc, "secretmanager", "reading secret", name, settings.project) from None
    return secret.name.split("/")[1]


def peek_secret(api, settings, secret_id: str, value: Optional[str], generate: bool) -> str:
    """The version a deploy would reference, read-only: the latest one when a deploy would keep
    it, else ".../versions/new"."""
    from google.api_core import exceptions as gexc

    name = f"projects/{settings.project}/secrets/{secret_id}"
    try:
        latest = api.clients.secrets.access_secret_version(name=f"{name}/versions/latest")
    except (gexc.NotFound, gexc.FailedPrecondition):
        return f"{name}/versions/new"
    except gexc.GoogleAPICallError as exc:
        raise google_error(exc, "secretmanager", "reading", f"{name}/versions/latest", settings.project) from None
    if generate or latest.payload.data.decode("utf-8") == value:
        return latest.name
    return f"{name}/versions/new"


def grant_accessor(api, settings, secret_name: str, member: str) -> None:
    """roles/secretmanager.secretAccessor for the service's identity on one secret."""
    role = "roles/secretmanager.secretAccessor"
    policy = api.call("secretmanager", "reading the IAM policy of", secret_name, settings,
                      api.clients.secrets.get_iam_policy, request={"resource": secret_name})
    for binding in policy.bindings:
        if binding.role == role and member in binding.members:
            return
    policy.bindings.add(role=role, members=[member])
    api.call("secretmanager", "granting the service access to", secret_name, settings,
             api.clients.secrets.set_iam_policy, request={"resource": secret_name, "policy": policy})
    api.granted("runtime", secret_name)


def own_secrets(api, settings) -> list:
    """The Secret Manager secrets lsdeploy made for this service (never ones passed with --secret)."""
    from google.api_core import exceptions as gexc

    found = []
    for what in ("basic-auth-pass", "label-studio-api-key"):
        name = f"projects/{settings.project}/secrets/{settings.secret_id(what)}"
        try:
            secret = api.clients.secrets.get_secret(name=name)
        except gexc.NotFound:
            continue
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "secretmanager", "reading secret", name, settings.project) from None
        if secret.labels.get(MANAGED_LABEL[0]) == MANAGED_LABEL[1] and secret.labels.get("service") == settings.service:
            found.append(name)
    return found


def member_for(settings, project_number: str) -> str:
    """The identity the service runs as: --service-account, else the compute default one."""
    account = settings.service_account or f"{project_number}-compute@developer.gserviceaccount.com"
    return f"serviceAccount:{account}"
