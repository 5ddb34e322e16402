"""Fixtures of the tests on real container images: the engine (tests/engine.py), and each
backend's image built once per session from what `label-studio-ml create` / `port` wrote."""
from __future__ import annotations

import os

import pytest

from engine import engine, why_no_engine


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.container)


@pytest.fixture(scope="session")
def eng():
    """The container engine; the test skips without one (fails in CI, which must run them).
    Every container and image the session created is removed at its end."""
    found = engine()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the container tests, but there is no engine: {why_no_engine()}")
        pytest.skip(why_no_engine())
    yield found
    found.cleanup()
