"""pytest fixtures for the Google API fakes. Use them with `pytest_plugins = ["fakes.fixtures"]` in
a conftest.py (tests/ is on sys.path), or import the names into a test module.

- `gcp_fakes`: the four APIs, runner off, in-memory Cloud Storage. Stopped after the test.
- `make_gcp_fakes(**options)`: a factory for other set-ups (runner=True, storage_url=emulator.url,
  operation_polls=..., engine="auto"); everything it started is stopped after the test, processes
  and containers included; the images real builds made are removed at the end of the session.
- `gcp_clients`: the official clients pointed at `gcp_fakes`, configured exactly like the deploy
  code configures them from CLOUDSDK_API_ENDPOINT_OVERRIDES_* (REST, anonymous credentials).
- `FAST_POLLING`: pass as `operation.result(polling=FAST_POLLING)` to poll every 50-500 ms
  instead of api_core's default 1 s, 1.5 s, 2.25 s...
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from google.api_core.future import polling

from .cloud import FakeGoogleCloud

_ENGINES_CLEANED_AT_EXIT: set[int] = set()  # engines whose cleanup() the session's end calls
FAST_POLLING = polling.DEFAULT_POLLING.with_delay(initial=0.05, maximum=0.5, multiplier=1.5).with_timeout(120)


def make_clients(endpoint: str) -> SimpleNamespace:
    """Official clients for an endpoint such as http://127.0.0.1:P (or the override URL with a `/`)."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import artifactregistry_v1, run_v2, secretmanager_v1
    from google.cloud.devtools import cloudbuild_v1

    endpoint = endpoint.rstrip("/")

    def options():
        return dict(credentials=AnonymousCredentials(), transport="rest",
                    client_options=ClientOptions(api_endpoint=endpoint))

    return SimpleNamespace(
        services=run_v2.ServicesClient(**options()),
        revisions=run_v2.RevisionsClient(**options()),
        builds=cloudbuild_v1.CloudBuildClient(**options()),
        registry=artifactregistry_v1.ArtifactRegistryClient(**options()),
        secrets=secretmanager_v1.SecretManagerServiceClient(**options()),
    )


@pytest.fixture
def make_gcp_fakes(request):
    started: list[FakeGoogleCloud] = []

    def make(**options) -> FakeGoogleCloud:
        cloud = FakeGoogleCloud(**options).start()
        started.append(cloud)
        if cloud.engine is not None and id(cloud.engine) not in _ENGINES_CLEANED_AT_EXIT:
            # the images real builds made (and their containers) go at the end of the session: until
            # then the engine's layers are the build cache of every test
            _ENGINES_CLEANED_AT_EXIT.add(id(cloud.engine))
            request.config.add_cleanup(cloud.engine.cleanup)
        return cloud

    yield make
    for cloud in reversed(started):
        cloud.stop()


@pytest.fixture
def gcp_fakes(make_gcp_fakes) -> FakeGoogleCloud:
    return make_gcp_fakes()


@pytest.fixture
def gcp_clients(gcp_fakes) -> SimpleNamespace:
    return make_clients(gcp_fakes.url)


__all__ = ["FAST_POLLING", "make_clients", "make_gcp_fakes", "gcp_fakes", "gcp_clients"]
