"""Helpers shared by the tests that drive the gcp provider against the Google API fakes."""
from __future__ import annotations

import pytest

from fakes.fixtures import FAST_POLLING

from lsdeploy.blueprints import create
from lsdeploy.bundle import SourceBundle
from lsdeploy.providers.gcp import GcpClients, GcpProvider, GcpSettings

PROJECT = "demo-project"
REGION = "europe-west4"


@pytest.fixture
def backend(tmp_path):
    """A backend directory rendered from the default blueprint."""
    directory = tmp_path / "backend"
    create(directory)
    return directory


def provider_for(cloud, **kwargs) -> GcpProvider:
    return GcpProvider(GcpClients.from_env(cloud.env, PROJECT), polling=FAST_POLLING, poll_interval=0.1, **kwargs)


def settings_for(service, buckets=None, **kwargs) -> GcpSettings:
    # each test has its own buckets (the emulator is shared): named after the service unless given
    buckets = buckets or service
    kwargs.setdefault("source_bucket", f"src-{buckets}")
    kwargs.setdefault("state_bucket", f"state-{buckets}")
    return GcpSettings(project=PROJECT, region=REGION, service=service, min_instances=0, **kwargs)


def deploy(cloud, directory, settings, lines=None):
    return provider_for(cloud).deploy(settings, SourceBundle.from_directory(directory),
                                      (lines.append if lines is not None else lambda m: None))
