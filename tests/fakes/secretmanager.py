"""Secret Manager v1 fake: secrets, versions (add, get, list, access, enable/disable/destroy).

Like the real API, answers name secrets by project NUMBER (`projects/123456789012/secrets/S`)
even when the request used the project id; requests may use either. `latest` is an alias of
the newest enabled version.
"""
from __future__ import annotations

import re

import google_crc32c
from google.cloud import secretmanager_v1 as sm
from google.protobuf import empty_pb2

from .iam import Policies
from .server import (already_exists, etag_of, failed_precondition, invalid_argument, not_found, now_pb,
                     paginate, project_number, routes_from_transport, ApiError)

Secret = sm.Secret.pb()
SecretVersion = sm.SecretVersion.pb()
SECRET_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")
MAX_PAYLOAD = 64 * 1024


class SecretManagerFake:
    api = "secretmanager"

    def __init__(self, cloud):
        self.cloud = cloud
        self.secrets: dict[str, object] = {}  # canonical name -> Secret
        self.versions: dict[str, list] = {}  # canonical secret name -> [(SecretVersion, bytes)]
        self.policies = Policies(cloud)  # canonical secret name -> google.iam.v1.Policy
        self.project_accessors: set[str] = set()  # members granted secretAccessor on the whole project
        server = cloud.server
        server.add_routes(routes_from_transport(
            self.api, "google.cloud.secretmanager_v1.services.secret_manager_service.transports.rest",
            "SecretManagerServiceRestTransport"))
        for method in ("CreateSecret", "GetSecret", "ListSecrets", "DeleteSecret", "UpdateSecret", "AddSecretVersion",
                       "GetSecretVersion", "ListSecretVersions", "AccessSecretVersion", "EnableSecretVersion",
                       "DisableSecretVersion", "DestroySecretVersion", "GetIamPolicy", "SetIamPolicy",
                       "TestIamPermissions"):
            server.handle(self.api, method)(getattr(self, method))

    # ---- names -----------------------------------------------------------------------------
    @staticmethod
    def canonical(name: str) -> str:
        """`projects/my-project/secrets/s...` -> `projects/<number>/secrets/s...`."""
        parts = name.split("/")
        if len(parts) >= 2 and parts[0] == "projects":
            parts[1] = project_number(parts[1])
        return "/".join(parts)

    def _secret(self, name: str):
        secret = self.secrets.get(self.canonical(name))
        if secret is None:
            raise not_found(f"Secret [{self.canonical(name)}] not found or has no versions.")
        return secret

    def _version(self, name: str):
        name = self.canonical(name)
        secret_name, _, version_id = name.partition("/versions/")
        self._secret(secret_name)
        versions = self.versions[secret_name]
        if version_id == "latest":
            enabled = [v for v in versions if v[0].state == SecretVersion.State.ENABLED]
            if not enabled:
                raise not_found(f"Secret Version [{name}] not found.")
            return enabled[-1]
        for version in versions:
            if version[0].name == name:
                return version
        raise not_found(f"Secret Version [{name}] not found.")

    # ---- used by the Cloud Run fake and tests ----------------------------------------------
    def value(self, ref: str, version: str = "latest") -> bytes:
        """Resolve a Cloud Run secret reference (`S` or `projects/P/secrets/S`) in `project`.
        Raises ApiError (NOT_FOUND / FAILED_PRECONDITION) when it cannot be accessed."""
        message, data = self._version(f"{ref}/versions/{version or 'latest'}")
        if message.state != SecretVersion.State.ENABLED:
            raise failed_precondition(f"Secret Version [{message.name}] is in "
                                      f"{SecretVersion.State.Name(message.state)} state.")
        return data

    def grant_project_access(self, member: str) -> None:
        """Grant roles/secretmanager.secretAccessor on the project (test set-up: no API for it here)."""
        self.project_accessors.add(member)

    def can_access(self, secret: str, member: str) -> bool:
        """Whether `member` may read `secret`'s payloads (granted on the secret or on the project)."""
        name = self.canonical(secret)
        return member in self.project_accessors or self.policies.grants(
            name, member, ("roles/secretmanager.secretAccessor", "roles/secretmanager.admin", "roles/owner"))

    def all_values(self) -> list[bytes]:
        """Every payload ever stored (tests check none of them leaks into plain env values)."""
        return [data for versions in self.versions.values() for _, data in versions if data]

    # ---- secrets ---------------------------------------------------------------------------
    def CreateSecret(self, request, ctx):
        if not SECRET_ID.fullmatch(request.secret_id):
            raise invalid_argument(
                f"Secret ID [{request.secret_id}] must be 1-255 characters long and contain only letters, numbers, "
                f"hyphens and underscores.", "secret_id")
        is_global = "/locations/" not in request.parent
        if is_global and not request.secret.HasField("replication"):
            raise invalid_argument("Secret.replication must be specified.", "secret.replication")
        name = self.canonical(f"{request.parent}/secrets/{request.secret_id}")
        if name in self.secrets:
            raise already_exists(f"Secret [{name}] already exists.")
        secret = Secret()
        secret.CopyFrom(request.secret)
        secret.name = name
        now_pb(secret.create_time)
        secret.etag = etag_of(secret)
        self.secrets[name] = secret
        self.versions[name] = []
        return secret

    def GetSecret(self, request, ctx):
        return self._secret(request.name)

    def ListSecrets(self, request, ctx):
        prefix = self.canonical(request.parent) + "/secrets/"
        secrets = [s for n, s in sorted(self.secrets.items()) if n.startswith(prefix)]
        if request.filter:
            m = re.fullmatch(r"\s*(name|labels\.[\w-]+)\s*[:=]\s*\"?([^\"]*)\"?\s*", request.filter)
            if not m:
                raise invalid_argument(f"Invalid filter: {request.filter}", "filter")
            key, value = m.groups()
            if key == "name":
                secrets = [s for s in secrets if value in s.name.rsplit("/", 1)[-1]]
            else:
                secrets = [s for s in secrets if s.labels.get(key.split(".", 1)[1]) == value]
        page, token = paginate(secrets, request.page_size, request.page_token, default_size=25000)
        return sm.ListSecretsResponse.pb()(secrets=page, next_page_token=token, total_size=len(secrets))

    def DeleteSecret(self, request, ctx):
        secret = self._secret(request.name)
        if request.etag and request.etag != secret.etag:
            raise ApiError("ABORTED", "The etag provided in the request does not match the current etag of the "
                                      "secret.")
        name = self.canonical(request.name)
        del self.secrets[name]
        del self.versions[name]
        self.policies.by_name.pop(name, None)
        return empty_pb2.Empty()

    def UpdateSecret(self, request, ctx):
        secret = self._secret(request.secret.name)
        if not request.update_mask.paths:
            raise invalid_argument("update_mask must be specified.", "update_mask")
        request.update_mask.MergeMessage(request.secret, secret, replace_message_field=True,
                                         replace_repeated_field=True)
        secret.name = self.canonical(request.secret.name)
        secret.etag = etag_of(secret)
        return secret

    # ---- versions --------------------------------------------------------------------------
    def AddSecretVersion(self, request, ctx):
        secret = self._secret(request.parent)
        data = request.payload.data
        if len(data) > MAX_PAYLOAD:
            raise invalid_argument(f"Secret payload data cannot exceed {MAX_PAYLOAD} bytes.", "payload.data")
        if request.payload.HasField("data_crc32c"):
            if google_crc32c.value(data) != request.payload.data_crc32c:
                raise invalid_argument("Checksum mismatch: data corruption detected in the payload.",
                                       "payload.data_crc32c")
        versions = self.versions[secret.name]
        version = SecretVersion(name=f"{secret.name}/versions/{len(versions) + 1}", state=SecretVersion.State.ENABLED,
                                client_specified_payload_checksum=request.payload.HasField("data_crc32c"))
        now_pb(version.create_time)
        version.replication_status.automatic.SetInParent()
        version.etag = etag_of(version)
        versions.append((version, data))
        return version

    def GetSecretVersion(self, request, ctx):
        return self._version(request.name)[0]

    def ListSecretVersions(self, request, ctx):
        secret = self._secret(request.parent)
        versions = [v for v, _ in reversed(self.versions[secret.name])]  # newest first, like the API
        page, token = paginate(versions, request.page_size, request.page_token, default_size=25000)
        return sm.ListSecretVersionsResponse.pb()(versions=page, next_page_token=token, total_size=len(versions))

    def AccessSecretVersion(self, request, ctx):
        version, data = self._version(request.name)
        if version.state != SecretVersion.State.ENABLED:
            raise failed_precondition(f"Secret Version [{version.name}] is in "
                                      f"{SecretVersion.State.Name(version.state)} state.")
        response = sm.AccessSecretVersionResponse.pb()(name=version.name)
        response.payload.data = data
        response.payload.data_crc32c = google_crc32c.value(data)
        return response

    def _set_state(self, name: str, state):
        version, data = self._version(name)
        if version.state == SecretVersion.State.DESTROYED:
            raise failed_precondition(f"Secret Version [{version.name}] is in DESTROYED state.")
        version.state = state
        if state == SecretVersion.State.DESTROYED:
            now_pb(version.destroy_time)
            secret_name = version.name.split("/versions/")[0]
            self.versions[secret_name] = [(v, b"" if v is version else d) for v, d in self.versions[secret_name]]
        version.etag = etag_of(version)
        return version

    def EnableSecretVersion(self, request, ctx):
        return self._set_state(request.name, SecretVersion.State.ENABLED)

    def DisableSecretVersion(self, request, ctx):
        return self._set_state(request.name, SecretVersion.State.DISABLED)

    def DestroySecretVersion(self, request, ctx):
        return self._set_state(request.name, SecretVersion.State.DESTROYED)

    # ---- IAM -------------------------------------------------------------------------------
    def GetIamPolicy(self, request, ctx):
        return self.policies.get(self._secret(request.resource).name)

    def SetIamPolicy(self, request, ctx):
        return self.policies.set(self._secret(request.resource).name, request)

    def TestIamPermissions(self, request, ctx):
        self._secret(request.resource)
        return self.policies.test(request.permissions)
