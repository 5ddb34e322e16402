"""The rendered docker-compose.yml works as the quickstart says: `docker compose up --build` (here
podman-compose, where Docker runs Docker Compose) builds the image and serves the backend on the
published port, with the secrets of its .env applied (basic auth), and model state in /data
writable by the image's user."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import requests

from checks import prediction_problems
from images import created_backend
from support import free_port, wait_for


def compose_command(eng) -> list:
    if eng.name == "docker":
        return ["docker", "compose"]
    exe = shutil.which("podman-compose")
    if not exe:
        pytest.skip("podman-compose is not installed: run bash tests/containers.sh install")
    return [exe]


def test_compose_up_serves_the_backend_with_the_env_files_basic_auth(eng, tmp_path):
    directory = created_backend("default")(tmp_path)
    port = free_port()
    compose = directory / "docker-compose.yml"
    text = compose.read_text()
    assert '- "9090:9090"' in text
    # Another host port (9090 may be busy on this machine), on the loopback only.
    compose.write_text(text.replace('- "9090:9090"', f'- "127.0.0.1:{port}:9090"'))
    (directory / ".env").write_text("BASIC_AUTH_USER=labelstudio\nBASIC_AUTH_PASS=compose-test-pass\n")
    command = compose_command(eng) + ["--project-name", f"lsdeploy-compose-{port}", "--file", str(compose)]
    up = subprocess.run(command + ["up", "--detach", "--build"], cwd=directory, capture_output=True, text=True,
                        timeout=900)
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        url = f"http://127.0.0.1:{port}"

        project = f"lsdeploy-compose-{port}"

        def health():
            try:
                resp = requests.get(url + "/health", timeout=2)
                if resp.status_code == 200:
                    return resp.json()
            except requests.RequestException:
                pass
            states = eng.call(["ps", "--all", "--filter", f"label=com.docker.compose.project={project}",
                               "--format", "{{.Status}}"]).stdout
            if "Exited" in states:
                logs = subprocess.run(command + ["logs"], cwd=directory, capture_output=True, text=True, timeout=120)
                return {"status": f"the service exited: {states.strip()}: {(logs.stdout + logs.stderr)[-1500:]}"}
            return None

        assert wait_for(health, timeout=90, interval=0.2, message="/health of the compose service")["status"] == "UP"
        label_config = (directory / "label_config.xml").read_text()
        refused = requests.post(url + "/setup", json={"project": "1.1", "schema": label_config}, timeout=10)
        assert refused.status_code == 401  # BASIC_AUTH_* from .env reached the service
        session_auth = ("labelstudio", "compose-test-pass")
        assert prediction_problems(url, label_config, auth=session_auth) == []
        # Model state goes to the compose volume, writable by the image's user.
        health = requests.get(url + "/health", auth=session_auth, timeout=10).json()
        assert health["store"]["status"] == "ok", health
        written = requests.post(url + "/webhook", auth=session_auth, timeout=10, json={
            "action": "START_TRAINING", "project": {"id": 1, "label_config": label_config}})
        assert written.status_code in (200, 201, 202), written.text
    finally:
        logs = subprocess.run(command + ["logs"], cwd=directory, capture_output=True, text=True, timeout=120)
        down = subprocess.run(command + ["down", "--volumes"], cwd=directory, capture_output=True, text=True,
                              timeout=300)
        for image in eng.call(["images", "--format", "{{.Repository}}:{{.Tag}}"]).stdout.split():
            if f"lsdeploy-compose-{port}" in image:
                eng.remove_image(image)
    assert down.returncode == 0, down.stderr[-2000:]
    assert "compose-test-pass" not in logs.stdout + logs.stderr
