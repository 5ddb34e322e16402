"""How a preview runs a backend: as a local process or a container image, and the stand-in
Label Studio that serves the sample files."""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional

from ..errors import EXIT_BUILD, EXIT_ERROR, EXIT_USAGE, LsdeployError
from .results import CONTAINER_PORT, UPLOAD_PREFIX, CONTAINER_ONLY_ENV, DROPPED_ENV, PreviewSettings


# -- runners -----------------------------------------------------------------------------------------
def dockerfile_env(text: str) -> dict:
    """KEY=VALUE pairs of the Dockerfile's ENV instructions (both syntaxes, continuations)."""
    import shlex

    env = {}
    joined = re.sub(r"\\\r?\n", " ", text)
    for line in joined.splitlines():
        line = line.strip()
        if not line.upper().startswith("ENV "):
            continue
        body = line[4:].strip()
        try:
            words = shlex.split(body, comments=True)
        except ValueError:
            continue
        if words and "=" not in words[0]:  # legacy `ENV KEY value with spaces`
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            if "=" in word:
                key, value = word.split("=", 1)
                env[key] = value
    return env


def process_env(settings: PreviewSettings, model_dir: str) -> dict:
    """The child's environment: the caller's, plus the Dockerfile's ENV where it applies outside
    the container, with a throwaway MODEL_DIR and nothing that points at real state or keys."""
    env = {k: v for k, v in settings.env.items() if k not in DROPPED_ENV}
    dockerfile = Path(settings.directory) / "Dockerfile"
    if dockerfile.is_file():
        for key, value in dockerfile_env(dockerfile.read_text(encoding="utf-8", errors="replace")).items():
            if key in CONTAINER_ONLY_ENV or "$" in value or value.startswith("/"):
                continue
            env[key] = value
    env["MODEL_DIR"] = model_dir
    # Downloaded task files go with the throwaway state, as they would in a fresh container.
    env["TASK_DATA_CACHE"] = os.path.join(os.path.dirname(model_dir), "task-data")
    env["PYTHONUNBUFFERED"] = "1"
    if settings.model:
        env["LSDEPLOY_MODEL"] = settings.model
    return env


def server_command(directory: str, port: int, host: str = "127.0.0.1", model: Optional[str] = None) -> list:
    from ..serve import server_command as command

    return command(str(directory), port, host, model)


def engine_answers(docker: str = "docker", timeout: float = 5.0) -> bool:
    """True when a Docker-compatible engine answers `docker info` within `timeout` seconds."""
    exe = shutil.which(docker)
    if not exe:
        return False
    try:
        # Plain `info` (no --format: Podman's template fields differ): exit 0 only when the
        # client reached an engine.
        done = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def choose_runner(settings: PreviewSettings, probe: Callable[[str], bool] = engine_answers) -> tuple:
    """(kind, reason): "docker" only when DIR has a Dockerfile and an engine answers."""
    has_dockerfile = (Path(settings.directory) / "Dockerfile").is_file()
    if settings.runner == "process":
        return "process", "--runner process"
    if settings.runner == "docker":
        if not has_dockerfile:
            raise LsdeployError(f"--runner docker needs {settings.directory}/Dockerfile: create the backend "
                                "with `label-studio-ml create`, or use --runner process", EXIT_USAGE)
        if not probe(settings.docker):
            raise LsdeployError(f"--runner docker: no Docker engine answers `{settings.docker} info`; start "
                                "Docker (or Podman), or use --runner process", EXIT_USAGE)
        return "docker", "--runner docker"
    if settings.runner != "auto":
        raise LsdeployError(f"unknown runner {settings.runner!r}: use auto, docker or process", EXIT_USAGE)
    if not has_dockerfile:
        return "process", "DIR has no Dockerfile"
    if not shutil.which(settings.docker):
        return "process", f"no `{settings.docker}` client on PATH"
    if not probe(settings.docker):
        return "process", f"no Docker engine answers `{settings.docker} info`"
    return "docker", f"a Docker engine answers `{settings.docker} info`"


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the process group `proc` leads (started with start_new_session=True), SIGKILL
    after `grace` seconds; returns once `proc` has exited."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


class ProcessRunner:
    """The container's server command as a local process group on 127.0.0.1."""

    kind = "process"

    def __init__(self, settings: PreviewSettings, port: int, workdir: str):
        self.settings = settings
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = os.path.join(workdir, "server.log")
        self.env = process_env(settings, os.path.join(workdir, "state"))
        argv = server_command(os.path.abspath(settings.directory), port, "127.0.0.1", settings.model)
        self.display = list(argv)
        self.command = [self._executable(argv[0])] + argv[1:]
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    def _executable(self, name: str) -> str:
        beside = Path(sys.executable).parent / name  # the same environment's entry point first
        if beside.is_file() and os.access(beside, os.X_OK):
            return str(beside)
        found = shutil.which(name, path=self.settings.env.get("PATH"))
        if found:
            return found
        raise LsdeployError(f"`{name}` is not installed on PATH: pip install lsdeploy", EXIT_USAGE)

    @property
    def commands(self) -> list:
        return [self.display]

    def start(self, progress) -> None:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self._started = time.monotonic()
        progress(f"started `{' '.join(self.display)}` (pid {self.proc.pid})")

    def exited(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def owns_port(self) -> bool:
        """True once our server is the one listening: gunicorn logged its bind, or (if its log says
        nothing) it has stayed up for 2 s, long past its own port check. Guards against another
        program that took the free port first answering /health in our place."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        if f"Listening at: http://127.0.0.1:{self.port}" in self.log_tail(200):
            return True
        return time.monotonic() - self._started >= 2.0

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = Path(self.log_path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, 15)  # gunicorn master and its workers: our group
        if self._log is not None and not self._log.closed:
            self._log.close()


class DockerRunner:
    """`docker build` DIR's Dockerfile, then `docker run` the image on 127.0.0.1."""

    kind = "docker"

    def __init__(self, settings: PreviewSettings, port: int, workdir: str):
        self.settings = settings
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = os.path.join(workdir, "build.log")
        directory = os.path.abspath(settings.directory)
        slug = re.sub(r"[^a-z0-9_.-]+", "-", Path(directory).name.lower()).strip("-.") or "backend"
        self.image = f"lsdeploy-preview-{slug}:latest"
        self.name = f"lsdeploy-preview-{os.getpid()}-{secrets.token_hex(3)}"
        docker = settings.docker
        self.build_command = [docker, "build", "--tag", self.image, "--file",
                              os.path.join(directory, "Dockerfile"), directory]
        run = [docker, "run", "--rm", "--detach", "--name", self.name]
        if settings.platform.startswith("linux"):
            # Host networking: the container reaches the preview's file server on 127.0.0.1, and
            # listens on 127.0.0.1 only.
            run += ["--network", "host", "--env", f"PORT={port}", "--env", "HOST=127.0.0.1"]
        else:
            # Docker Desktop: publish on the host's loopback; the file server is host.docker.internal.
            run += ["--publish", f"127.0.0.1:{port}:{CONTAINER_PORT}", "--env", f"PORT={CONTAINER_PORT}",
                    "--add-host", "host.docker.internal:host-gateway"]
        if settings.model:
            run += ["--env", f"LSDEPLOY_MODEL={settings.model}"]
        self.run_command = run + [self.image]
        self.stop_command = [docker, "stop", "--time", "10", self.name]
        self.logs_command = [docker, "logs", "--tail", "40", self.name]
        self.started = False

    @property
    def files_host(self) -> str:
        return "127.0.0.1" if self.settings.platform.startswith("linux") else "host.docker.internal"

    @property
    def commands(self) -> list:
        return [self.build_command, self.run_command]

    def start(self, progress) -> None:
        progress(f"building image {self.image}: `{' '.join(self.build_command)}`")
        with open(self.log_path, "wb") as log:
            done = subprocess.run(self.build_command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise LsdeployError(f"docker build failed (exit {done.returncode}): {last_line(self.log_tail())}; "
                                f"full log: {self.log_path}", EXIT_BUILD)
        progress(f"running `{' '.join(self.run_command)}`")
        done = subprocess.run(self.run_command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise LsdeployError(f"docker run failed: {last_line(done.stderr)}", EXIT_ERROR)
        self.started = True

    def owns_port(self) -> bool:
        return self.started  # `docker run` fails when the port is taken

    def exited(self) -> Optional[int]:
        if not self.started:
            return None
        done = subprocess.run([self.settings.docker, "inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}",
                               self.name], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            return -1  # gone (--rm removed it after it exited)
        running, _, code = done.stdout.strip().partition(" ")
        return None if running == "true" else int(code or -1)

    def log_tail(self, lines: int = 40) -> str:
        if self.started:
            done = subprocess.run(self.logs_command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            return (done.stdout + done.stderr)[-8000:]
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.started:
            subprocess.run(self.stop_command, capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
            self.started = False


def last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    for line in reversed(lines):  # the most telling line: an error, else the last one
        if re.search(r"error|exception|refused|denied|not found", line, re.I):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


# -- the stand-in Label Studio: serves sample files to the backend -----------------------------------
class FileServer:
    """Plays Label Studio's /data/upload/: the `hostname` sent in /setup. Files are served only to
    requests with `Authorization: Token <access_token>`, as Label Studio requires a key."""

    def __init__(self, files: dict, token: str, host: str = "127.0.0.1"):
        self.files = files
        self.token = token
        self.requests: list = []  # (path, status)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                name = self.path.split("?", 1)[0]
                status, body, ctype = 404, b'{"detail": "Not found."}', "application/json"
                auth = self.headers.get("Authorization", "")
                if name.startswith(UPLOAD_PREFIX + "/") and name[len(UPLOAD_PREFIX) + 1:] in outer.files:
                    if auth not in (f"Token {outer.token}", f"Bearer {outer.token}"):
                        status, body = 401, b'{"detail": "Authentication credentials were not provided."}'
                    else:
                        ctype, body = outer.files[name[len(UPLOAD_PREFIX) + 1:]]
                        status = 200
                outer.requests.append((name, status))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet: preview prints its own progress
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="lsdeploy-preview-files", daemon=True)

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}"

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
