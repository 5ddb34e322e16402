"""Faithful local fakes of Google's control-plane APIs (Cloud Run v2, Cloud Build v1, Artifact
Registry v1, Secret Manager v1) for tests and benchmarks. See docs/fakes.md."""
from .cloud import ENDPOINT_VARIABLES, EmulatorStorage, FakeGoogleCloud, MemoryStorage
from .server import ApiError, LoggedRequest, RequestLog

__all__ = ["FakeGoogleCloud", "ApiError", "RequestLog", "LoggedRequest", "ENDPOINT_VARIABLES", "MemoryStorage",
           "EmulatorStorage"]
