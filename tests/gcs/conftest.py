"""Fixtures for the Cloud Storage state tests: a real fake-gcs-server on 127.0.0.1."""
from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gcs_emulator import FaultProxy  # noqa: E402


@pytest.fixture
def bucket(gcs_emulator):
    name = f"state-{uuid.uuid4().hex[:12]}"
    gcs_emulator.create_bucket(name)
    return name


@pytest.fixture
def fault_proxy():
    """fault_proxy(emulator) -> a FaultProxy in front of it (stopped after the test)."""
    proxies = []

    def make(emulator):
        proxy = FaultProxy(emulator.port).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def make_store(tmp_path):
    """make_store(endpoint, "gs://bucket/prefix", **kwargs) -> GCSStore (closed after the test)."""
    from lsdeploy.state.gcs import GCSStore

    stores = []

    def make(endpoint, uri, environ=None, **kwargs):
        env = {"STORAGE_EMULATOR_HOST": endpoint.url,
               "MODEL_DIR": str(tmp_path / f"model-dir-{len(stores)}"), **(environ or {})}
        store = GCSStore.from_uri(uri, environ=env, **kwargs)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()
