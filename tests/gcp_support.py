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


def change(directory, note):
    """A code change: the next bundle (and image) differs."""
    (directory / "model.py").write_text((directory / "model.py").read_text() + f"\n# {note}\n")


def cli_env(cloud, buckets):
    """The environment a CLI run against the fakes needs, with buckets of its own."""
    return {**cloud.env, "GCP_PROJECT": PROJECT, "GCP_REGION": REGION, "LSDEPLOY_SOURCE_BUCKET": f"src-{buckets}",
            "LSDEPLOY_STATE_BUCKET": f"state-{buckets}"}


@pytest.fixture
def api_cloud_fast(make_gcp_fakes, gcs_emulator):
    """Fakes without the runner: revisions become ready (or, with `run.never_ready`, fail) like
    Cloud Run reports them, without starting the backend."""
    return make_gcp_fakes(storage_url=gcs_emulator.url)
