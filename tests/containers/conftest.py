"""Fixtures of the tests on real container images: the engine (tests/engine.py), and each
backend's image built once per session from what `label-studio-ml create` / `port` wrote."""
from __future__ import annotations

import os
import threading

import pytest

from engine import engine, why_no_engine
from images import BLUEPRINTS, BuiltImage, created_backend, plant_local_files


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


@pytest.fixture(scope="session")
def built(eng, tmp_path_factory):
    """built(name, make) -> BuiltImage: the image of the backend directory `make(parent)` writes,
    built once per session (with the local files of plant_local_files beside its code)."""
    cache: dict = {}
    lock = threading.Lock()
    # a tag of this session's own: sessions may share the engine's storage, and a pid alone can
    # repeat across pid namespaces (a CI container beside a developer's shell)
    session = f"{os.getpid()}-{os.urandom(3).hex()}"

    def build(name: str, make) -> BuiltImage:
        with lock:
            if name not in cache:
                directory = make(tmp_path_factory.mktemp(f"image-{name}"))
                plant_local_files(directory)
                tag = f"localhost/lsdeploy-test/{name}:{session}"
                image = eng.build(directory, tag, log_path=directory.parent / "build.log")
                config = (directory / "label_config.xml").read_text()
                cache[name] = BuiltImage(name, directory, tag, image, config)
            return cache[name]

    return build


@pytest.fixture(scope="session", params=BLUEPRINTS)
def blueprint_image(request, built) -> BuiltImage:
    return built(request.param, created_backend(request.param))
