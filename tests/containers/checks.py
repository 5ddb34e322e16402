"""What a backend's image must do to run on Cloud Run, as check functions that answer the problems
found (an empty list: none). The tests on good images expect none; the tests on broken Dockerfiles
run the same functions and expect them to name the defect.

- `image_problems`: from the image alone: a non-root user, CMD/ENTRYPOINT in exec form (a shell as
  PID 1 does not pass SIGTERM on), none of `.env`, `.git`, `docker-compose*.yml`, `.lsdeploy` in its
  files, and a given secret in none of its files, its configuration or its history.
- `serve_problems`: from a running container: `/health` UP on the `PORT` it was given, its server
  not root, /setup and /predict answered with predictions that fit the label config (preview's
  validator), and SIGTERM ending it with exit 0 within Cloud Run's 10 s.
"""
from __future__ import annotations

import fnmatch
import json
import time
from pathlib import PurePosixPath
from typing import Optional

import requests

from engine import Container, Engine, EngineError
from lsdeploy.preview.calls import predict_body, setup_body
from lsdeploy.validate import sample_tasks, validate_predictions
from support import free_port

CLOUD_RUN_GRACE = 10.0  # Cloud Run sends SIGKILL this long after SIGTERM
SHELLS = {"sh", "/bin/sh", "bash", "/bin/bash", "/usr/bin/sh", "/usr/bin/bash", "dash", "/bin/dash"}
LOCAL_ONLY = (".env", ".env.*", ".git", "docker-compose*.yml", "docker-compose*.yaml", "compose.yml", "compose.yaml",
              ".lsdeploy")
PROJECT = "1.1700000000"


def local_only_files(paths) -> list:
    """The paths (of an image's files) that are a local file the image must not hold, or inside one."""
    found = []
    for path in paths:
        parts = PurePosixPath(path).parts
        if any(fnmatch.fnmatchcase(part, pattern) for part in parts for pattern in LOCAL_ONLY):
            found.append(path)
    return found


def image_problems(eng: Engine, ref: str, secret: Optional[str] = None) -> list:
    problems = []
    config = eng.config(ref)
    user = (config.get("User") or "").split(":")[0]
    if user in ("", "root", "0"):
        problems.append(f"runs as root (User {config.get('User') or ''!r}): add a user and `USER` it in the Dockerfile")
    for field in ("Entrypoint", "Cmd"):
        argv = config.get(field) or []
        if len(argv) >= 2 and argv[0] in SHELLS and argv[1] == "-c":
            problems.append(f"{field.upper()} is in shell form ({' '.join(argv)!r}): the shell is PID 1 and "
                            f"SIGTERM never reaches the server; write it in exec form, "
                            f"{field.upper()} [\"label-studio-ml\", \"start\", \"/app\"]")
            break
    files, hits = eng.scan(ref, secret.encode()) if secret else (eng.files(ref), [])
    leaked = local_only_files(files)
    if leaked:
        problems.append(f"holds local files a .dockerignore must keep out: {', '.join(sorted(leaked)[:8])}")
    if secret:
        if hits:
            problems.append(f"the secret is in the image's files: {', '.join(hits[:8])}")
        if secret in json.dumps(config) or secret in eng.history(ref):
            problems.append("the secret is in the image's configuration or history (ENV, ARG, LABEL)")
    return problems


def _health(url: str) -> Optional[dict]:
    try:
        resp = requests.get(url + "/health", timeout=2)
    except requests.RequestException:
        return None
    return resp.json() if resp.status_code == 200 else None


def wait_healthy(box: Container, timeout: float = 60.0) -> Optional[str]:
    """None once /health answers UP on the container's port; else the problem (the container
    exited first, or nothing answered within `timeout`), with the end of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = _health(box.url)
        if health is not None:
            if health.get("status") == "UP":
                return None
            return f"/health answered {health}"
        code = box.exit_code()
        if code is not None:
            return f"the container exited (code {code}) before /health answered UP: {log_tail(box)}"
        time.sleep(0.1)
    return f"nothing answered /health UP on PORT={box.port} within {timeout:.0f} s: {log_tail(box)}"


def log_tail(box: Container, lines: int = 6) -> str:
    text = [line for line in box.logs().splitlines() if line.strip()]
    return " | ".join(text[-lines:])


def server_uid(box: Container) -> Optional[int]:
    """The real uid of the container's first process, as the host sees it."""
    try:
        status = open(f"/proc/{box.pid}/status").read()
    except (OSError, EngineError):
        done = box.exec(["id", "-u"])
        return int(done.stdout.strip()) if done.returncode == 0 else None
    return int(status.split("Uid:")[1].split()[0])


def prediction_problems(url: str, label_config: str, count: int = 2, auth: Optional[tuple] = None) -> list:
    """/setup then /predict as Label Studio sends them; the validator's errors, if any."""
    session = requests.Session()
    session.auth = auth
    resp = session.post(url + "/setup", json=setup_body(label_config, PROJECT, "http://127.0.0.1:1", "test-token"),
                        timeout=30)
    if resp.status_code != 200:
        return [f"/setup answered HTTP {resp.status_code}: {resp.text[:300]}"]
    tasks = sample_tasks(label_config, count)
    resp = session.post(url + "/predict", json=predict_body(tasks, PROJECT, label_config), timeout=100)
    if resp.status_code != 200:
        return [f"/predict answered HTTP {resp.status_code}: {resp.text[:300]}"]
    report = validate_predictions(label_config, tasks, resp.json())
    return [f"invalid prediction: {p.to_dict()}" for p in report.errors]


def stop_problems(box: Container, grace: float = CLOUD_RUN_GRACE) -> list:
    """SIGTERM as Cloud Run sends it: the container must exit 0 within `grace` seconds."""
    started = time.monotonic()
    box.kill("TERM")
    try:
        code = box.wait(grace)
    except EngineError:
        box.kill("KILL")
        return [f"still running {grace:g} s after SIGTERM (Cloud Run would SIGKILL it): {log_tail(box)}"]
    took = time.monotonic() - started
    if code != 0:
        return [f"exited with code {code} on SIGTERM after {took:.1f} s: {log_tail(box)}"]
    return []


def serve_problems(eng: Engine, ref: str, label_config: str, env: Optional[dict] = None,
                   volumes: Optional[dict] = None) -> list:
    """Run the image on a free PORT and check it serves, predicts validly and stops on SIGTERM."""
    port = free_port()
    box = eng.run(ref, env=env, port=port, volumes=volumes)
    try:
        problem = wait_healthy(box)
        if problem:
            return [problem]
        problems = []
        uid = server_uid(box)
        if uid in (None, 0):
            problems.append(f"the server runs as {'root' if uid == 0 else 'an unknown user'}")
        problems += prediction_problems(box.url, label_config)
        problems += stop_problems(box)
        return problems
    finally:
        box.remove()
