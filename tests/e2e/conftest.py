"""Fixtures of the end-to-end tests: one real Label Studio per session (installed into a cached
venv on first use by tests/labelstudio.sh), a project per test, real `label-studio-ml start`
backends on 127.0.0.1."""
from __future__ import annotations

import time
import uuid

import pytest

import labelstudio_server
from labelstudio_server import import_tasks
from support import TEXT_CONFIG, Server, free_port, run_cli


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A running Label Studio: .url, .legacy_token, .pat (personal access token), .version."""
    started = time.monotonic()
    labelstudio_server.install()
    base = tmp_path_factory.mktemp("label-studio")
    ls = labelstudio_server.start(free_port(), str(base / "data"), str(base / "label-studio.log"))
    print(f"\nLabel Studio {ls.version} on {ls.url} ready in {time.monotonic() - started:.1f}s")
    yield ls
    ls.stop()


@pytest.fixture(scope="session")
def label_studio_with(label_studio, tmp_path_factory):
    """label_studio_with(ml_block_local_ip=True, ssrf_protection=True): another Label Studio with
    those settings (its defaults refuse backends and webhooks on 127.0.0.1), started from a copy of
    the first one's data (same user and token, no migrations). One per combination per session."""
    started = {}

    def make(ml_block_local_ip=True, ssrf_protection=True):
        key = (ml_block_local_ip, ssrf_protection)
        if key not in started:
            base = tmp_path_factory.mktemp("label-studio-ssrf")
            labelstudio_server.copy_data_dir(label_studio.data_dir, str(base / "data"))
            started[key] = labelstudio_server.start(
                free_port(), str(base / "data"), str(base / "label-studio.log"),
                ml_block_local_ip=ml_block_local_ip, ssrf_protection=ssrf_protection, create_pat=False)
        return started[key]

    yield make
    for ls in started.values():
        ls.stop()


@pytest.fixture(scope="session")
def ls_api(label_studio):
    """lsdeploy's client with the legacy token (the tests' own view of Label Studio)."""
    from lsdeploy.labelstudio import LabelStudio

    return LabelStudio(label_studio.url, label_studio.legacy_token, timeout=120)


@pytest.fixture
def project(ls_api):
    """project(texts=[...], label_config=TEXT_CONFIG) -> id of a new project with those tasks."""
    made = []

    def make(texts=(), label_config=TEXT_CONFIG):
        data = ls_api.call("POST", "/api/projects/", "creating a project",
                            json={"title": f"e2e {uuid.uuid4().hex[:8]}", "label_config": label_config})
        pid = data["id"]
        made.append(pid)
        if texts:
            import_tasks(ls_api, pid, texts)
        return pid

    yield make
    for pid in made:
        ls_api.request("DELETE", f"/api/projects/{pid}/")


@pytest.fixture
def backend(tmp_path):
    """backend(blueprint="text-classifier", basic_auth=None, model_py=None) -> a running Server."""
    servers = []

    def make(blueprint="text-classifier", basic_auth=None, model_py=None):
        directory = tmp_path / f"backend-{len(servers)}"
        done = run_cli("create", directory, "--blueprint", blueprint)
        assert done.returncode == 0, done.stderr
        if model_py is not None:
            (directory / "model.py").write_text(model_py)
        env = {}
        if basic_auth:
            env = {"BASIC_AUTH_USER": basic_auth[0], "BASIC_AUTH_PASS": basic_auth[1]}
        server = Server(directory, env=env, auth=basic_auth)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()
