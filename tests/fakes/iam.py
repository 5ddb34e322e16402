"""IAM as the fakes enforce it: a binding takes effect only after a propagation delay.

Google says IAM changes take effect in about 2 minutes, sometimes 7 or more; Cloud Run checks
secret access when it creates a revision. `IamPropagation(delay)` remembers when each
(resource, role, member) binding was written, and `effective()` answers whether it applies yet,
so a test can make a just-granted permission fail the first revision like the real service does.
"""
from __future__ import annotations

import threading
import time


class IamPropagation:
    def __init__(self, delay: float = 0.0):
        self.delay = delay
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
                    if written is None or now - written >= self.delay:
                        return True
        return False
