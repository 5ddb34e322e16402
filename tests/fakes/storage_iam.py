"""Bucket IAM for the Cloud Storage emulator. fake-gcs-server has none (`GET /storage/v1/b/B/iam`
answers 404), so a small HTTP front on 127.0.0.1 forwards every request to it unchanged and answers
the JSON API's bucket IAM methods itself, by Google's documented rules (the JSON API reference for
buckets getIamPolicy / setIamPolicy / testIamPermissions, and Cloud Storage's IAM roles page):
policies with `kind: storage#policy`, `resourceId: projects/_/buckets/B` and etags ("CAE=" first),
412 for a stale etag, roles and members in Google's forms, `allUsers` refused under public access
prevention, the caller's permissions (`cloud.deployer`) for get / set / testPermissions, new
bindings taking effect after the cloud's propagation delay (`cloud.iam`), the emulator's own 404 for
a missing bucket, errors in the JSON API's shape. It also applies the organization policy
`constraints/storage.uniformBucketLevelAccess` to bucket creation. docs/fakes.md has the details.

`BucketIam.allows(bucket, principal, permission)` is what the other fakes ask: Cloud Build before
it fetches a build's source, Cloud Run before a revision whose container keeps its state in a
bucket (`MODEL_STATE_URI`) starts.
"""
from __future__ import annotations

import base64
import http.client
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .server import project_number

# What each Cloud Storage role grants on a bucket and its objects (the storage.* part of Google's
# table; `*` stands for every permission of that resource).
ROLE_PERMISSIONS = {
    "roles/storage.admin": ("storage.buckets.*", "storage.objects.*"),
    "roles/storage.objectAdmin": ("storage.objects.*",),
    "roles/storage.objectUser": ("storage.objects.create", "storage.objects.delete", "storage.objects.get",
                                 "storage.objects.list", "storage.objects.restore", "storage.objects.update"),
    "roles/storage.objectViewer": ("storage.objects.get", "storage.objects.list"),
    "roles/storage.objectCreator": ("storage.objects.create",),
    "roles/storage.bucketViewer": ("storage.buckets.get", "storage.buckets.list"),
    "roles/storage.legacyBucketOwner": ("storage.buckets.get", "storage.buckets.update",
                                        "storage.buckets.getIamPolicy", "storage.buckets.setIamPolicy",
                                        "storage.objects.list", "storage.objects.create", "storage.objects.delete"),
    "roles/storage.legacyBucketWriter": ("storage.buckets.get", "storage.objects.list", "storage.objects.create",
                                         "storage.objects.delete"),
    "roles/storage.legacyBucketReader": ("storage.buckets.get", "storage.objects.list"),
    "roles/storage.legacyObjectOwner": ("storage.objects.get", "storage.objects.update",
                                        "storage.objects.getIamPolicy", "storage.objects.setIamPolicy"),
    "roles/storage.legacyObjectReader": ("storage.objects.get",),
}
PUBLIC_MEMBERS = ("allUsers", "allAuthenticatedUsers")
MEMBER_FORM = re.compile(r"(user|serviceAccount|group|domain|principal|principalSet|projectOwner|projectEditor|"
                         r"projectViewer|deleted:user|deleted:serviceAccount|deleted:group):\S+")
CUSTOM_ROLE = re.compile(r"(projects|organizations)/[^/]+/roles/[A-Za-z0-9_.]+")
UNIFORM_ACCESS = "constraints/storage.uniformBucketLevelAccess"


def grants(role: str, permission: str) -> bool:
    return any(p == permission or (p.endswith(".*") and permission.startswith(p[:-1]))
               for p in ROLE_PERMISSIONS.get(role, ()))


def roles_granting(permission: str) -> tuple[str, ...]:
    return tuple(role for role in ROLE_PERMISSIONS if grants(role, permission))


def policy_etag(counter: int) -> bytes:
    """Cloud Storage policy etags are a small protobuf (field 1 = a counter): b"\\x08\\x01" is "CAE="."""
    out, n = bytearray(b"\x08"), counter
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class StorageError(Exception):
    """An answer in the JSON API's error shape."""

    def __init__(self, code: int, message: str, reason: str, **extra):
        super().__init__(message)
        self.code, self.message, self.reason, self.extra = code, message, reason, extra

    def body(self) -> bytes:
        error = {"message": self.message, "domain": "global", "reason": self.reason, **self.extra}
        return json.dumps({"error": {"code": self.code, "message": self.message, "errors": [error]}}).encode()


def forbidden(who: str, permission: str, kind: str = "bucket") -> StorageError:
    return StorageError(403, f"{who} does not have {permission} access to the Google Cloud Storage {kind}. "
                             f"Permission '{permission}' denied on resource (or it may not exist).", "forbidden")


def precondition(message: str) -> StorageError:
    return StorageError(412, message, "conditionNotMet", locationType="header", location="If-Match")


def invalid(message: str) -> StorageError:
    return StorageError(400, message, "invalid")


@dataclass
class BucketInfo:
    """What the front saw when the bucket was created through it (fake-gcs-server keeps neither)."""

    project: str = ""
    uniform_access: bool = False
    public_access_prevention: str = "inherited"


class BucketIam:
    """The bucket policies (read-modify-write with etags, new bindings propagating through
    `cloud.iam`), what the front learnt of each bucket, and the organization policy."""

    def __init__(self, cloud):
        self.cloud = cloud
        self.enforce = False  # the checks of the other fakes apply (on once a front serves the policies)
        self.require_uniform_access = False  # organization policy constraints/storage.uniformBucketLevelAccess
        self.buckets: dict[str, BucketInfo] = {}
        self.policies: dict[str, object] = {}  # bucket -> google.iam.v1 Policy (etag: the counter's bytes)
        self.counters: dict[str, int] = {}
        # (GetIamPolicy | SetIamPolicy | TestIamPermissions | InsertBucket, bucket, HTTP status)
        self.calls: list[tuple[str, str, int]] = []
        self.lock = threading.RLock()

    @staticmethod
    def resource(bucket: str) -> str:
        return f"projects/_/buckets/{bucket}"

    # ---- policies ------------------------------------------------------------------------------
    def policy(self, bucket: str):
        """The bucket's policy: the one set last, else what a new bucket gets (the project's
        owners, editors and viewers through Cloud Storage's convenience values; unknown for a
        bucket created elsewhere, whose policy then starts empty)."""
        from google.iam.v1 import policy_pb2

        with self.lock:
            if bucket in self.policies:
                return self.policies[bucket]
            policy = policy_pb2.Policy(version=1, etag=policy_etag(self.counters.get(bucket, 1)))
            info = self.buckets.get(bucket)
            if info is not None and info.project:
                p = info.project
                policy.bindings.add(role="roles/storage.legacyBucketOwner", members=[f"projectEditor:{p}",
                                                                                     f"projectOwner:{p}"])
                policy.bindings.add(role="roles/storage.legacyBucketReader", members=[f"projectViewer:{p}"])
                if info.uniform_access:
                    policy.bindings.add(role="roles/storage.legacyObjectOwner", members=[f"projectEditor:{p}",
                                                                                         f"projectOwner:{p}"])
                    policy.bindings.add(role="roles/storage.legacyObjectReader", members=[f"projectViewer:{p}"])
            return policy

    def set_policy(self, bucket: str, body) -> object:
        """SetIamPolicy with the body the client sent (kind and resourceId are ignored, as documented)."""
        if not isinstance(body, dict) or not isinstance(body.get("bindings") or [], list):
            raise invalid("Invalid JSON payload: the policy must be an object with a list of bindings.")
        with self.lock:  # the etag check and the write are one step, as on Google
            current = self.policy(bucket)
            etag = body.get("etag")
            if etag and decode_etag(etag) != current.etag:
                raise precondition("Precondition Failed")
            policy = self._validated(bucket, body)
            self.counters[bucket] = self.counters.get(bucket, 1) + 1
            policy.etag = policy_etag(self.counters[bucket])
            self.policies[bucket] = policy
        self.cloud.iam.record(self.resource(bucket), current, policy)
        return policy

    def _validated(self, bucket: str, body: dict):
        from google.iam.v1 import policy_pb2

        info = self.buckets.get(bucket, BucketInfo())
        version = body.get("version") or 1
        if not isinstance(version, int) or version not in (1, 3):
            raise invalid(f"Invalid policy version: {version!r}.")
        policy = policy_pb2.Policy(version=version)
        for binding in body.get("bindings") or []:
            role, members = (binding.get("role"), binding.get("members")) if isinstance(binding, dict) else (None, None)
            if not isinstance(role, str) or not (role.startswith("roles/") or CUSTOM_ROLE.fullmatch(role)):
                raise invalid(f"Role {role!r} is not a valid role: use roles/... or a custom role's full name.")
            if role.startswith("roles/storage.") and role not in ROLE_PERMISSIONS:
                raise invalid(f"Role ({role}) does not exist in the resource's hierarchy.")
            if not isinstance(members, list) or not members:
                raise invalid(f"The binding of {role} names no members.")
            for member in members:
                if not isinstance(member, str) or not (member in PUBLIC_MEMBERS or MEMBER_FORM.fullmatch(member)):
                    raise invalid(f"Invalid member: {member!r}.")
                if member in PUBLIC_MEMBERS and info.public_access_prevention == "enforced":
                    raise precondition("The member bindings allUsers and allAuthenticatedUsers are not allowed since "
                                       "public access prevention is enforced.")
            added = policy.bindings.add(role=role, members=members)
            condition = binding.get("condition")
            if condition:
                if policy.version < 3 or not isinstance(condition, dict):
                    raise invalid("A binding with a condition needs policy version 3 and a condition object.")
                added.condition.title = str(condition.get("title", ""))
                added.condition.description = str(condition.get("description", ""))
                added.condition.expression = str(condition.get("expression", ""))
        return policy

    def grant(self, bucket: str, member: str, role: str) -> None:
        """A grant made by hand (the console, `gcloud storage buckets add-iam-policy-binding`)."""
        policy = self.policy(bucket)
        bindings = [{"role": b.role, "members": list(b.members)} for b in policy.bindings]
        bindings.append({"role": role, "members": [member]})
        self.set_policy(bucket, {"bindings": bindings, "version": policy.version})

    def to_json(self, bucket: str, policy) -> dict:
        out = {"kind": "storage#policy", "resourceId": self.resource(bucket), "version": policy.version or 1,
               "etag": base64.b64encode(policy.etag).decode(), "bindings": []}
        for b in policy.bindings:
            binding = {"role": b.role, "members": list(b.members)}
            if b.HasField("condition"):
                binding["condition"] = {"title": b.condition.title, "description": b.condition.description,
                                        "expression": b.condition.expression}
            out["bindings"].append(binding)
        return out

    # ---- who may do what -----------------------------------------------------------------------
    def project_wide(self, principal: str, bucket: str) -> bool:
        """Accounts that reach every bucket of their project through a project role: the legacy
        Cloud Build account (roles/cloudbuild.builds.builder) and the Compute Engine default account
        while it is the project's Editor (automatic grants, before May 2024)."""
        email = principal.split(":", 1)[-1]
        info = self.buckets.get(bucket)
        m = re.fullmatch(r"(\d+)(?:@cloudbuild\.gserviceaccount\.com|-compute@developer\.gserviceaccount\.com)", email)
        if m is None or (info is not None and info.project and project_number(info.project) != m.group(1)):
            return False
        return email.endswith("@cloudbuild.gserviceaccount.com") or self.cloud.automatic_default_grants

    def _matches(self, member: str, principal: str) -> bool:
        email = principal.split(":", 1)[-1]
        if member == principal or member == "allUsers" or (member == "allAuthenticatedUsers" and principal):
            return True
        kind, _, value = member.partition(":")
        if kind == "domain":
            return email.endswith("@" + value)
        if kind in ("projectOwner", "projectEditor", "projectViewer"):
            owners = {self.cloud.caller}
            editors = {f"serviceAccount:{project_number(value)}-compute@developer.gserviceaccount.com"} \
                if self.cloud.automatic_default_grants else set()
            holders = owners if kind == "projectOwner" else owners | editors
            return principal in holders
        return False

    def allows(self, bucket: str, principal: str, permission: str) -> bool:
        """Whether `principal` (`serviceAccount:EMAIL`) holds `permission` on the bucket, with the
        bindings written through setIamPolicy counted only once they have propagated."""
        if self.project_wide(principal, bucket):
            return True
        policy = self.policy(bucket)
        roles = roles_granting(permission)
        members = {m for b in policy.bindings if b.role in roles for m in b.members}
        resource = self.resource(bucket)
        return any(self._matches(m, principal) and self.cloud.iam.effective(resource, policy, m, roles) for m in members)

    def missing(self, bucket: str, principal: str, permissions) -> list[str]:
        return [p for p in permissions if not self.allows(bucket, principal, p)]

    def caller_may(self, permission: str) -> bool:
        return self.cloud.deployer is None or permission in self.cloud.deployer

    # ---- what the front sees -------------------------------------------------------------------
    def check_create(self, body) -> None:
        if self.require_uniform_access and not uniform_access_of(body):
            raise precondition(f"Request violates constraint '{UNIFORM_ACCESS}'")

    def check_update(self, body) -> None:
        config = (body.get("iamConfiguration") or {}) if isinstance(body, dict) else {}
        turned_off = (config.get("uniformBucketLevelAccess") or {}).get("enabled") is False
        if self.require_uniform_access and turned_off:
            raise precondition(f"Request violates constraint '{UNIFORM_ACCESS}'")

    def updated(self, bucket: str, body) -> None:
        config = (body.get("iamConfiguration") or {}) if isinstance(body, dict) else {}
        with self.lock:
            info = self.buckets.get(bucket)
            if info is None or not config:
                return
            if "uniformBucketLevelAccess" in config:
                info.uniform_access = uniform_access_of(body)
            info.public_access_prevention = config.get("publicAccessPrevention") or info.public_access_prevention

    def created(self, bucket: str, project: str, body) -> None:
        config = (body or {}).get("iamConfiguration") or {}
        with self.lock:
            self.buckets[bucket] = BucketInfo(project, uniform_access_of(body),
                                              config.get("publicAccessPrevention") or "inherited")
            self.policies.pop(bucket, None)
            self.counters.pop(bucket, None)

    def deleted(self, bucket: str) -> None:
        with self.lock:
            self.buckets.pop(bucket, None)
            self.policies.pop(bucket, None)
            self.counters.pop(bucket, None)

    def note(self, method: str, bucket: str, status: int) -> None:
        with self.lock:
            self.calls.append((method, bucket, status))


def decode_etag(etag) -> bytes | None:
    try:
        return base64.b64decode(etag, validate=True)
    except (ValueError, TypeError):
        return None


def uniform_access_of(body) -> bool:
    config = (body.get("iamConfiguration") or {}) if isinstance(body, dict) else {}
    return bool((config.get("uniformBucketLevelAccess") or config.get("bucketPolicyOnly") or {}).get("enabled"))


# ------------------------------------------------------------------------------------------------
# The HTTP front

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "content-length", "expect"}
BUCKET_IAM = re.compile(r"/storage/v1/b/([^/]+)/iam(/testPermissions)?")
BUCKET = re.compile(r"/storage/v1/b/([^/]+)")
CHUNK = 64 * 1024


class StorageIamFront:
    """127.0.0.1:<free port> in front of the emulator at `target_url`: the bucket IAM methods are
    answered from `iam` (a BucketIam), everything else is forwarded unchanged, bodies streamed both
    ways (resumable, multipart and media uploads, ranged downloads, XML paths); the emulator's URLs
    in answers (resumable session `Location`, `selfLink`, `mediaLink`) are rewritten to the front's
    so that the client keeps talking to it. `requests` logs (method, path, status)."""

    def __init__(self, iam: BucketIam, target_url: str, port: int = 0):
        target = urllib.parse.urlsplit(target_url.rstrip("/"))
        self.iam = iam
        self.target_host, self.target_port = target.hostname, target.port or 80
        self.target_url = f"{target.scheme}://{target.netloc}"
        self.requests: list[tuple[str, str, int]] = []
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                front.handle(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # a client hanging up is not news
                pass

        self.server = Server(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="storage-iam-front", daemon=True)

    def start(self) -> "StorageIamFront":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- one request -------------------------------------------------------------------------
    def handle(self, handler) -> None:
        parsed = urllib.parse.urlsplit(handler.path)
        query = urllib.parse.parse_qs(parsed.query)
        method = handler.command
        iam = BUCKET_IAM.fullmatch(parsed.path)
        try:
            if iam is not None and (method, bool(iam.group(2))) in (("GET", False), ("PUT", False), ("GET", True)):
                bucket = urllib.parse.unquote(iam.group(1))
                body = read_json(handler)
                if not self._exists(handler, bucket):
                    return
                self._answer(handler, 200, self._iam(method, bool(iam.group(2)), bucket, query, body))
                return
            if method == "POST" and parsed.path == "/storage/v1/b":
                self._insert(handler, query)
                return
            bucket = BUCKET.fullmatch(parsed.path)
            if bucket is not None and method in ("PATCH", "PUT"):
                body = read_json(handler)
                self.iam.check_update(body)
                if self.forward(handler, json.dumps(body).encode() if body is not None else b"") == 200:
                    self.iam.updated(urllib.parse.unquote(bucket.group(1)), body)
                return
            status = self.forward(handler)
            if bucket is not None and method == "DELETE" and status == 204:
                self.iam.deleted(urllib.parse.unquote(bucket.group(1)))
        except StorageError as exc:
            if iam is not None:
                self.iam.note(self._method(method, bool(iam.group(2))), urllib.parse.unquote(iam.group(1)), exc.code)
            self._answer(handler, exc.code, exc.body(), raw=True)
        except OSError:
            raise  # the client hung up
        except Exception as exc:  # noqa: BLE001 - a bug of the fake: say so instead of dropping the connection
            self._answer(handler, 500, StorageError(500, f"storage IAM front: {type(exc).__name__}: {exc}",
                                                    "backendError").body(), raw=True)

    def _insert(self, handler, query: dict) -> None:
        """Bucket creation: the organization policy first, then the emulator; the front remembers
        the bucket's project and access settings for its default policy and checks."""
        body = read_json(handler)
        name = body.get("name", "") if isinstance(body, dict) else ""
        try:
            self.iam.check_create(body)
        except StorageError as exc:
            self.iam.note("InsertBucket", name, exc.code)
            raise
        status = self.forward(handler, json.dumps(body).encode() if body is not None else b"")
        if status == 200 and name:
            self.iam.created(name, (query.get("project") or [""])[0], body)
        self.iam.note("InsertBucket", name, status)

    @staticmethod
    def _method(method: str, test: bool) -> str:
        return "TestIamPermissions" if test else "GetIamPolicy" if method == "GET" else "SetIamPolicy"

    def _iam(self, method: str, test: bool, bucket: str, query: dict, body) -> dict:
        iam, name = self.iam, self._method(method, test)
        who = self.iam.cloud.caller.split(":", 1)[-1]
        if test:
            wanted = query.get("permissions") or []
            held = [p for p in wanted if iam.caller_may(p)]
            out = {"kind": "storage#testIamPermissionsResponse"}
            if held:
                out["permissions"] = held
            iam.note(name, bucket, 200)
            return out
        needed = "storage.buckets.getIamPolicy" if method == "GET" else "storage.buckets.setIamPolicy"
        if not iam.caller_may(needed):
            raise forbidden(who, needed)
        if method == "GET":
            requested = (query.get("optionsRequestedPolicyVersion") or ["1"])[0]
            if requested not in ("0", "1", "3"):
                raise invalid(f"Invalid requested policy version: {requested}.")
            policy = iam.policy(bucket)
            if any(b.HasField("condition") for b in policy.bindings) and requested != "3":
                raise invalid("The policy has conditions: request it with optionsRequestedPolicyVersion=3.")
        else:
            policy = iam.set_policy(bucket, body)
        iam.note(name, bucket, 200)
        return iam.to_json(bucket, policy)

    def _exists(self, handler, bucket: str) -> bool:
        """A bucket the emulator does not know answers what the emulator answers for it (404)."""
        status, headers, data = self._call("GET", f"/storage/v1/b/{urllib.parse.quote(bucket, safe='')}")
        if status == 200:
            return True
        handler.send_response(status)
        for key, value in headers:
            if key.lower() not in HOP_BY_HOP:
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
        return False

    def _call(self, method: str, path: str):
        conn = http.client.HTTPConnection(self.target_host, self.target_port, timeout=60)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def _answer(self, handler, status: int, body, raw: bool = False) -> None:
        data = body if raw else json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json; charset=UTF-8")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)
        with self.iam.lock:
            self.requests.append((handler.command, handler.path, status))

    # ---- forwarding --------------------------------------------------------------------------
    def forward(self, handler, body: bytes | None = None) -> int:
        """Send the request on to the emulator (its body streamed unless already read) and stream the
        answer back. A refused connection is passed on as a dropped one (the client's retries apply)."""
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP}
        chunked = "chunked" in (handler.headers.get("Transfer-Encoding") or "").lower()
        conn = http.client.HTTPConnection(self.target_host, self.target_port, timeout=300)
        try:
            if body is not None:
                conn.request(handler.command, handler.path, body=body, headers={**headers,
                                                                                 "Content-Length": str(len(body))})
            elif chunked:
                conn.request(handler.command, handler.path, body=read_chunks(handler.rfile), headers=headers,
                             encode_chunked=True)
            else:
                length = int(handler.headers.get("Content-Length") or 0)
                conn.request(handler.command, handler.path, headers={**headers, "Content-Length": str(length)},
                             body=Limited(handler.rfile, length) if length else None)
            response = conn.getresponse()
        except OSError:
            conn.close()
            handler.close_connection = True
            with self.iam.lock:
                self.requests.append((handler.command, handler.path, 0))
            return 0
        try:
            self._relay(handler, response)
        finally:
            conn.close()
        with self.iam.lock:
            self.requests.append((handler.command, handler.path, response.status))
        return response.status

    def _relay(self, handler, response) -> None:
        handler.send_response(response.status)
        content_type = response.getheader("Content-Type") or ""
        for key, value in response.getheaders():
            if key.lower() in HOP_BY_HOP:
                continue
            if key.lower() == "location":
                value = value.replace(self.target_url, self.url)
            handler.send_header(key, value)
        no_body = handler.command == "HEAD" or response.status in (204, 304) or 100 <= response.status < 200
        if no_body:
            handler.send_header("Content-Length", response.getheader("Content-Length") or "0")
            handler.end_headers()
            response.read()
            return
        if content_type.startswith("application/json") and not response.getheader("Content-Encoding"):
            # small: the emulator's own URLs (selfLink, mediaLink) become the front's
            data = response.read().replace(self.target_url.encode(), self.url.encode())
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return
        length = response.getheader("Content-Length")
        if length is not None:
            handler.send_header("Content-Length", length)
            handler.end_headers()
            while chunk := response.read(CHUNK):
                handler.wfile.write(chunk)
            return
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        while chunk := response.read(CHUNK):
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        handler.wfile.write(b"0\r\n\r\n")


class Limited:
    """The first `length` bytes of a stream, read in blocks (http.client sends file-like bodies so)."""

    def __init__(self, stream, length: int):
        self.stream, self.left = stream, length

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.stream.read(size)
        self.left -= len(data)
        return data


def read_chunks(stream):
    """The decoded chunks of a chunked request body."""
    while True:
        size = int(stream.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while stream.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return
        yield stream.read(size)
        stream.readline()


def read_json(handler):
    """The (small) JSON body of a request the front answers or inspects; None without one."""
    if "chunked" in (handler.headers.get("Transfer-Encoding") or "").lower():
        data = b"".join(read_chunks(handler.rfile))
    else:
        length = int(handler.headers.get("Content-Length") or 0)
        data = handler.rfile.read(length) if length else b""
    if not data.strip():
        return None
    try:
        return json.loads(data)
    except ValueError:
        raise invalid("Invalid JSON payload received.") from None
