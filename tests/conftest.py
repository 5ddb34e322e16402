import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Tests never use a developer's Label Studio or Google settings by accident.
for _name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "LABEL_STUDIO_API_KEY", "MODEL_STATE_URI",
              "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "PORT", "HOST", "WORKERS", "THREADS", "LSDEPLOY_MODEL",
              "LSDEPLOY_METRICS_DIR"):
    os.environ.pop(_name, None)


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    """A fresh MODEL_DIR and process-wide store for in-process tests."""
    from lsdeploy.state import set_default_store

    directory = tmp_path / "state"
    monkeypatch.setenv("MODEL_DIR", str(directory))
    set_default_store(None)
    yield directory
    set_default_store(None)


@pytest.fixture
def created(tmp_path):
    """create(blueprint) -> path of a freshly rendered backend directory."""
    from lsdeploy.blueprints import create

    def make(blueprint="default", name=None, **kwargs):
        directory = tmp_path / (name or blueprint)
        create(directory, blueprint=blueprint, **kwargs)
        return directory

    return make


# Shared fixtures of the Google API fakes (tests/fakes/) and the Cloud Storage emulator.
from fakes.fixtures import gcp_clients, gcp_fakes, make_gcp_fakes  # noqa: E402,F401


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """One fake-gcs-server for the tests that do not stop it (each test uses its own buckets)."""
    from gcs_emulator import GCSEmulator

    emulator = GCSEmulator(tmp_path_factory.mktemp("fake-gcs") / "data").start()
    yield emulator
    emulator.stop()


@pytest.fixture
def own_emulator(tmp_path):
    """A fake-gcs-server of this test's own, free to be stopped and restarted."""
    from gcs_emulator import GCSEmulator

    emulator = GCSEmulator(tmp_path / "fake-gcs-data").start()
    yield emulator
    emulator.stop()


def pytest_report_header(config):
    """Which container engine the tests that build and run real images use (tests/engine.py)."""
    from engine import engine, why_no_engine

    eng = engine()
    if eng is None:
        return f"container engine: none, container tests skip ({why_no_engine()})"
    return f"container engine: {eng.name} ({why_no_engine()})"
