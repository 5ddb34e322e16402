"""IAM as the fakes enforce it: a binding takes effect only after a propagation delay.

Google says IAM changes take effect in about 2 minutes, sometimes 7 or more; Cloud Run checks
secret access when it creates a revision. `IamPropagation(delay)` remembers when each
(resource, role, member) binding was written, and `effective()` answers whether it applies yet,
so a test can make a just-granted permission fail the first revision like the real service does.
"""
from __future__ import annotations

import re
import threading
import time

from .errors import ApiError, invalid_argument
from .server import etag_of


class IamPropagation:
    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.only: tuple[str, ...] | None = None  # delay only resources whose name holds one of these
        self._written: dict[tuple[str, str, str], float] = {}
        self._lock = threading.Lock()

    def record(self, resource: str, before, after) -> None:
        """SetIamPolicy wrote `after` over `before` on `resource`: new bindings start propagating now."""
        old = {(b.role, m) for b in before.bindings for m in b.members}
        now = time.monotonic()
        with self._lock:
            for binding in after.bindings:
                for member in binding.members:
                    if (binding.role, member) not in old:
                        self._written[(resource, binding.role, member)] = now

    def effective(self, resource: str, policy, member: str, roles: tuple[str, ...]) -> bool:
        """Whether `member` holds one of `roles` in `policy` and the binding has propagated."""
        now = time.monotonic()
        with self._lock:
            for binding in policy.bindings:
                if binding.role in roles and member in binding.members:
                    written = self._written.get((resource, binding.role, member))
                    delay = self.delay if self.only is None or any(s in resource for s in self.only) else 0.0
                    if written is None or now - written >= delay:
                        return True
        return False


def read_policy(stored):
    from google.iam.v1 import policy_pb2

    policy = policy_pb2.Policy()
    policy.CopyFrom(stored)
    if not policy.etag:
        policy.etag = b"ACAB"  # what an empty policy's etag looks like
    return policy


def write_policy(stored, request):
    """SetIamPolicy: etag check (read-modify-write), role and member syntax, update_mask."""
    from google.iam.v1 import policy_pb2

    policy = request.policy
    if policy.etag and stored.etag and policy.etag != stored.etag:
        raise ApiError("ABORTED", "There were concurrent policy changes. Please retry the whole read-modify-write "
                                  "with exponential backoff.")
    for binding in policy.bindings:
        if not binding.role.startswith(("roles/", "projects/", "organizations/")):
            raise invalid_argument(f"Role {binding.role} is not supported for this resource.", "policy.bindings")
        for member in binding.members:
            if not (member in ("allUsers", "allAuthenticatedUsers") or re.fullmatch(
                    r"(user|serviceAccount|group|domain|principal|principalSet):.+", member)):
                raise invalid_argument(f"Invalid member: {member}", "policy.bindings.members")
    updated = policy_pb2.Policy()
    if request.update_mask.paths:
        updated.CopyFrom(stored)
        request.update_mask.MergeMessage(policy, updated, replace_repeated_field=True)
    else:
        updated.CopyFrom(policy)
    updated.version = updated.version or 1
    updated.etag = etag_of(updated).strip('"').encode()[:8]
    return updated


def has_role(policy, member: str, roles: tuple[str, ...]) -> bool:
    return any(b.role in roles and member in b.members for b in policy.bindings)


class Policies:
    """The IAM policies of one kind of resource: Get/SetIamPolicy (read-modify-write with etags,
    new bindings propagating through `cloud.iam`) and TestIamPermissions answering what the caller
    holds (`cloud.deployer`, None = every permission)."""

    def __init__(self, cloud):
        self.cloud = cloud
        self.by_name: dict[str, object] = {}

    def get(self, name: str):
        from google.iam.v1 import policy_pb2

        return read_policy(self.by_name.get(name, policy_pb2.Policy()))

    def set(self, name: str, request):
        from google.iam.v1 import policy_pb2

        before = self.by_name.get(name, policy_pb2.Policy())
        self.by_name[name] = write_policy(before, request)
        self.cloud.iam.record(name, before, self.by_name[name])
        return self.by_name[name]

    def test(self, permissions):
        from google.iam.v1 import iam_policy_pb2

        held = self.cloud.deployer
        return iam_policy_pb2.TestIamPermissionsResponse(
            permissions=[p for p in permissions if held is None or p in held])

    def grants(self, name: str, member: str, roles: tuple[str, ...]) -> bool:
        """Whether `member` holds one of `roles` on `name`, propagated."""
        policy = self.by_name.get(name)
        return policy is not None and self.cloud.iam.effective(name, policy, member, roles)
