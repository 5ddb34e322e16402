"""`preview`: run a backend once, the way its container runs, and prove its predictions are valid.

Flow (`run_preview(settings)` -> `PreviewResult`):
1. pick a runner: the Docker engine when one answers `docker info` (build DIR's Dockerfile and run
   the image), otherwise a local process running the container's own server command
   (`lsdeploy.serve.server_command`) with the Dockerfile's environment;
2. start a small file server that plays Label Studio's part: it is the `hostname` sent in /setup
   and serves the sample tasks' files under /data/upload/ to requests carrying the access token;
3. wait for /health, send /setup and /predict exactly as Label Studio 1.23 does, validate the
   answer with `lsdeploy.validate`;
4. with annotations, send them as ANNOTATION_CREATED webhooks, wait (bounded) for background
   training, read the model version again and predict once more;
5. stop the backend, always (errors and Ctrl-C included).

Nothing here reads os.environ: the CLI passes the environment in `PreviewSettings.env`.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional

from .errors import EXIT_ERROR, EXIT_INVALID, EXIT_REGISTER, EXIT_USAGE, EXIT_BUILD, LsdeployError
from .labelconfig import LabelConfigError, parse_config, parse_tags
from .validate import Problem, ValidationReport, sample_files, sample_tasks, validate_predictions

# Label Studio's own timeouts are 1 s (health), 3 s (setup), 100 s (predict): preview is more
# patient with the first two (a cold process imports the model), and keeps predict's.
DEFAULT_STARTUP_TIMEOUT = 120.0
DEFAULT_PREDICT_TIMEOUT = 100.0
DEFAULT_FIT_TIMEOUT = 120.0
CONTAINER_PORT = 9090  # EXPOSE and PORT of the blueprints' Dockerfile
UPLOAD_PREFIX = "/data/upload/preview"
# Keys of the Dockerfile's ENV that make no sense outside the container.
_CONTAINER_ONLY_ENV = {"PORT", "HOST", "PATH", "HOME", "PYTHONPATH", "MODEL_DIR", "LANG", "GPG_KEY"}
# Environment a preview never passes on: its state is throwaway, and the backend talks to the
# stand-in Label Studio (the file server), not to a real one with the user's key.
_DROPPED_ENV = ("MODEL_STATE_URI", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN", "LABEL_STUDIO_URL",
                "LABEL_STUDIO_HOST", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "PORT", "HOST")


# -- settings and results --------------------------------------------------------------------------
@dataclass
class PreviewSettings:
    directory: str
    label_config: str
    label_config_source: str = "given"
    tasks: Optional[list] = None  # None: generate sample tasks from the label config
    tasks_source: str = "generated"
    annotations: Optional[list] = None  # --fit: tasks with annotations, annotations, or webhook bodies
    runner: str = "auto"  # auto | docker | process
    docker: str = "docker"
    project_id: int = 1
    sample_count: int = 2
    model: Optional[str] = None
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    predict_timeout: float = DEFAULT_PREDICT_TIMEOUT
    fit_timeout: float = DEFAULT_FIT_TIMEOUT
    env: dict = field(default_factory=dict, repr=False)  # the caller's environment (process runner)
    platform: str = sys.platform


@dataclass
class FitEvent:
    task_id: object
    annotation_id: object
    status: int
    outcome: str  # ok | training | skipped | error
    detail: str = ""

    def to_dict(self) -> dict:
        return {"task_id": self.task_id, "annotation_id": self.annotation_id, "status": self.status,
                "outcome": self.outcome, "detail": self.detail}


@dataclass
class FitResult:
    version_before: Optional[str]
    version_after: Optional[str] = None
    events: list = field(default_factory=list)
    finished: bool = True  # False when background training outlived fit_timeout
    waited: float = 0.0
    errors: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.finished and not self.errors

    def to_dict(self) -> dict:
        return {"ok": self.ok, "model_version_before": self.version_before, "model_version_after": self.version_after,
                "changed": self.version_before != self.version_after, "finished": self.finished,
                "waited_seconds": round(self.waited, 2), "errors": list(self.errors),
                "events": [e.to_dict() for e in self.events]}


@dataclass
class PreviewResult:
    directory: str
    runner: str  # docker | process
    runner_reason: str
    commands: list  # argv lists actually run to start the backend
    label_config_source: str
    tasks_source: str
    tasks: list
    model_version: Optional[str]
    response: object
    report: ValidationReport
    fit: Optional[FitResult] = None
    response_after_fit: object = None
    report_after_fit: Optional[ValidationReport] = None
    seconds: dict = field(default_factory=dict)
    files_served: int = 0

    @property
    def reports(self) -> list:
        """The validation reports: of the predictions, and of those after --fit when it ran."""
        return [r for r in (self.report, self.report_after_fit) if r is not None]

    @property
    def ok(self) -> bool:
        return all(r.valid for r in self.reports) and (self.fit is None or self.fit.ok)

    @property
    def exit_code(self) -> int:
        if not all(r.valid for r in self.reports):
            return EXIT_INVALID
        return 0 if self.ok else EXIT_ERROR

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "exit_code": self.exit_code,
            "directory": self.directory,
            "runner": self.runner,
            "runner_reason": self.runner_reason,
            "commands": self.commands,
            "label_config_source": self.label_config_source,
            "tasks_source": self.tasks_source,
            "tasks": len(self.tasks),
            "model_version": self.model_version,
            "validation": self.report.to_dict(),
            "response": self.response,
            "fit": self.fit.to_dict() if self.fit else None,
            "validation_after_fit": self.report_after_fit.to_dict() if self.report_after_fit else None,
            "response_after_fit": self.response_after_fit,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "files_served": self.files_served,
        }


# -- inputs ----------------------------------------------------------------------------------------
def find_view(text: str) -> Optional[str]:
    """The first balanced <View>...</View> block in a text (a README, say)."""
    start = re.search(r"<View[\s>/]", text)
    if not start:
        return None
    depth = 0
    for match in re.finditer(r"<(/?)View\b[^>]*?(/?)>", text[start.start():]):
        closing, self_closing = match.group(1), match.group(2)
        if self_closing:
            continue
        depth += -1 if closing else 1
        if depth == 0:
            return text[start.start(): start.start() + match.end()]
    return None


def label_config_from_directory(directory: str) -> Optional[tuple]:
    """(config, source) from DIR/label_config.xml, or the first <View> in DIR/README.md."""
    base = Path(directory)
    path = base / "label_config.xml"
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    readme = base / "README.md"
    if readme.is_file():
        view = find_view(readme.read_text(encoding="utf-8", errors="replace"))
        if view:
            return view, f"{readme} (first <View> block)"
    return None


def fetch_label_config(host: str, api_key: str, project: int, timeout: float = 30.0) -> str:
    """The label config of a Label Studio project (GET /api/projects/{id}, either kind of key)."""
    from .labelstudio import LabelStudio

    project_data = LabelStudio(host, api_key, timeout=timeout).get_project(project)
    config = project_data.get("label_config") if isinstance(project_data, dict) else None
    if not config:
        raise LsdeployError(f"Label Studio project {project} has no label config yet: set one in its "
                            "settings, or pass --label-config FILE", EXIT_USAGE)
    return config


def _read_json(path: str, what: str):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise LsdeployError(f"cannot read {what} file {path}: {exc.strerror}", EXIT_USAGE) from None
    if path.endswith(".jsonl"):
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as exc:
            raise LsdeployError(f"{what} file {path} is not JSON Lines: {exc}", EXIT_USAGE) from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise LsdeployError(f"{what} file {path} is not JSON: {exc}", EXIT_USAGE) from None


def load_tasks(path: str) -> list:
    """Tasks in Label Studio's import format: a list of {"data": {...}} (or of bare data objects)."""
    raw = _read_json(path, "tasks")
    items = raw if isinstance(raw, list) else [raw]
    tasks = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise LsdeployError(f"tasks file {path}: item {i} is not an object; use Label Studio's "
                                "import format [{\"data\": {...}}, ...]", EXIT_USAGE)
        tasks.append(dict(item) if isinstance(item.get("data"), dict) else {"data": item})
    if not tasks:
        raise LsdeployError(f"tasks file {path} holds no tasks", EXIT_USAGE)
    return tasks


def load_annotations(path: str) -> list:
    """Annotations for --fit: a Label Studio JSON export (tasks with `annotations`), a list of
    annotations (each with `result` and `task`), or webhook bodies ({action, annotation, task})."""
    raw = _read_json(path, "annotations")
    items = raw if isinstance(raw, list) else [raw]
    if not all(isinstance(i, dict) for i in items):
        raise LsdeployError(f"annotations file {path} must hold JSON objects (a Label Studio export)", EXIT_USAGE)
    pairs = annotation_pairs(items)
    if not pairs:
        raise LsdeployError(f"annotations file {path} holds no annotations: export the project from Label "
                            "Studio (JSON) with at least one annotated task", EXIT_USAGE)
    return items


def annotation_pairs(items: list) -> list:
    """[(task, annotation)] from any of the accepted shapes."""
    pairs = []
    for item in items:
        if isinstance(item.get("annotations"), list):  # an exported task
            task = {k: v for k, v in item.items() if k not in ("annotations", "predictions")}
            pairs.extend((task, a) for a in item["annotations"] if isinstance(a, dict))
        elif isinstance(item.get("annotation"), dict):  # a webhook body
            task = item.get("task") if isinstance(item.get("task"), dict) else {"id": item["annotation"].get("task")}
            pairs.append((task, item["annotation"]))
        elif isinstance(item.get("result"), list):  # a bare annotation
            task = item.get("task")
            pairs.append((task if isinstance(task, dict) else {"id": task}, item))
    return pairs


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
    env = {k: v for k, v in settings.env.items() if k not in _DROPPED_ENV}
    dockerfile = Path(settings.directory) / "Dockerfile"
    if dockerfile.is_file():
        for key, value in dockerfile_env(dockerfile.read_text(encoding="utf-8", errors="replace")).items():
            if key in _CONTAINER_ONLY_ENV or "$" in value or value.startswith("/"):
                continue
            env[key] = value
    env["MODEL_DIR"] = model_dir
    # Downloaded task files go with the throwaway state, as they would in a fresh container.
    env["TASK_DATA_CACHE"] = os.path.join(os.path.dirname(model_dir), "task-data")
    env["PYTHONUNBUFFERED"] = "1"
    if settings.model:
        env["LSDEPLOY_MODEL"] = settings.model
    return env


# -- runners -----------------------------------------------------------------------------------------
def server_command(directory: str, port: int, host: str = "127.0.0.1", model: Optional[str] = None) -> list:
    from .serve import server_command as command

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
            raise LsdeployError(f"docker build failed (exit {done.returncode}): {_last_line(self.log_tail())}; "
                                f"full log: {self.log_path}", EXIT_BUILD)
        progress(f"running `{' '.join(self.run_command)}`")
        done = subprocess.run(self.run_command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise LsdeployError(f"docker run failed: {_last_line(done.stderr)}", EXIT_ERROR)
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


def _last_line(text: str) -> str:
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


# -- what Label Studio sends ------------------------------------------------------------------------------
def ls_task(task: dict, index: int, project_id: int, now: str) -> dict:
    """A task as Label Studio's TaskSimpleSerializer sends it to /predict."""
    return {
        "id": task.get("id", index + 1),
        "data": task.get("data", {}),
        "meta": task.get("meta") or {},
        "created_at": task.get("created_at", now),
        "updated_at": task.get("updated_at", now),
        "is_labeled": bool(task.get("annotations")),
        "overlap": 1,
        "inner_id": task.get("inner_id", index + 1),
        "total_annotations": len(task.get("annotations") or []),
        "cancelled_annotations": 0,
        "total_predictions": len(task.get("predictions") or []),
        "annotations": task.get("annotations") or [],
        "predictions": task.get("predictions") or [],
        "file_upload": None,
        "updated_by": [],
        "project": project_id,
    }


def setup_body(label_config: str, project: str, hostname: str, token: str) -> dict:
    return {"project": project, "schema": label_config, "hostname": hostname, "access_token": token,
            "extra_params": {}}


def predict_body(tasks: list, project: str, label_config: str) -> dict:
    return {"tasks": tasks, "project": project, "label_config": label_config,
            "params": {"login": None, "password": None, "context": None}}


def webhook_bodies(items: list, label_config: str, project_id: int, model_version: Optional[str], now: str) -> list:
    """ANNOTATION_CREATED payloads shaped like Label Studio's webhooks: {action, annotation, task, project}."""
    project = {"id": project_id, "title": "lsdeploy preview", "label_config": label_config,
               "parsed_label_config": parse_config(label_config), "model_version": model_version or ""}
    bodies = []
    for n, (task, annotation) in enumerate(annotation_pairs(items)):
        task = ls_task(task, n, project_id, now)
        annotation = {"id": annotation.get("id", n + 1), "result": annotation.get("result") or [],
                      "was_cancelled": bool(annotation.get("was_cancelled", False)),
                      "ground_truth": bool(annotation.get("ground_truth", False)),
                      "created_at": annotation.get("created_at", now), "updated_at": annotation.get("updated_at", now),
                      "lead_time": annotation.get("lead_time", 1.0), "completed_by": annotation.get("completed_by", 1),
                      "task": task["id"], "project": project_id}
        bodies.append({"action": "ANNOTATION_CREATED", "annotation": annotation, "task": task, "project": project})
    return bodies


def _metric(text: str, name: str, **labels) -> Optional[float]:
    """Sum of a Prometheus metric's samples whose labels include `labels`; None when absent."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            try:
                total += float(value)
                seen = True
            except ValueError:
                pass
    return total if seen else None


# -- the run -------------------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run_preview(settings: PreviewSettings, progress: Callable[[str], None] = lambda message: None,
                probe: Callable[[str], bool] = engine_answers) -> PreviewResult:
    import requests

    try:
        tags = parse_tags(settings.label_config)
    except LabelConfigError as exc:
        raise LsdeployError(f"label config from {settings.label_config_source}: {exc}", EXIT_USAGE) from None
    if not tags.controls:
        raise LsdeployError(f"the label config from {settings.label_config_source} has no control tags "
                            "(tags with name and toName): nothing to predict", EXIT_USAGE)
    if not Path(settings.directory).is_dir():
        raise LsdeployError(f"{settings.directory} is not a directory: pass a backend directory "
                            "(label-studio-ml create DIR makes one)", EXIT_USAGE)

    kind, reason = choose_runner(settings, probe)
    progress(f"runner: {kind} ({reason})")
    token = secrets.token_hex(20)
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    project = f"{settings.project_id}.{int(time.time())}"
    workdir = tempfile.mkdtemp(prefix="lsdeploy-preview-")
    runner = files = session = None
    keep_logs = False  # the work directory stays only when an error message points at a log in it
    try:
        runner = _make_runner(kind, settings, workdir)
        files = FileServer(sample_files(settings.label_config, settings.sample_count), token).start()
        hostname = files.url(getattr(runner, "files_host", "127.0.0.1"))
        if settings.tasks is None:
            raw_tasks = sample_tasks(settings.label_config, settings.sample_count, hostname + UPLOAD_PREFIX)
        else:
            raw_tasks = settings.tasks
        tasks = [ls_task(t, i, settings.project_id, now) for i, t in enumerate(raw_tasks)]
        seconds: dict = {}
        session = requests.Session()
        session.headers["Content-Type"] = "application/json"

        started = time.monotonic()
        for attempt in range(3):
            runner.start(progress)
            try:
                _wait_healthy(runner, session, settings.startup_timeout)
                break
            except LsdeployError:
                # Another program took the free port between our check and the server's bind.
                if attempt == 2 or runner.exited() is None or "is in use" not in runner.log_tail():
                    raise
                runner.stop()
                runner = _make_runner(kind, settings, workdir)
                progress("the port was taken meanwhile; retrying on another one")
        seconds["startup"] = time.monotonic() - started
        progress(f"healthy at {runner.url} after {seconds['startup']:.1f}s")

        version = _setup(session, runner, settings.label_config, project, hostname, token)
        progress(f"POST /setup: model_version {version!r}")

        started = time.monotonic()
        response, report = _predict(session, runner, tasks, project, settings)
        seconds["predict"] = time.monotonic() - started
        progress(f"POST /predict: {len(tasks)} task(s) in {seconds['predict']:.2f}s, "
                 f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)")

        fit = response_after = report_after = None
        if settings.annotations is not None:
            started = time.monotonic()
            fit = _fit(session, runner, settings, project, hostname, token, version, now, progress)
            seconds["fit"] = time.monotonic() - started
            response_after, report_after = _predict(session, runner, tasks, project, settings)
            progress(f"POST /predict after fit: {len(report_after.errors)} error(s)")
        return PreviewResult(
            directory=settings.directory, runner=kind, runner_reason=reason, commands=runner.commands,
            label_config_source=settings.label_config_source, tasks_source=settings.tasks_source, tasks=tasks,
            model_version=version, response=response, report=report, fit=fit,
            response_after_fit=response_after, report_after_fit=report_after, seconds=seconds,
            files_served=sum(1 for _, status in files.requests if status == 200),
        )
    except LsdeployError as exc:
        keep_logs = workdir in str(exc)
        raise
    finally:
        if session is not None:
            session.close()  # no idle keep-alive connection for the server to wait on
        try:
            if runner is not None:
                progress("stopping the backend")
                runner.stop()
        finally:
            if files is not None:
                files.stop()
            if not keep_logs:
                shutil.rmtree(workdir, ignore_errors=True)


def _make_runner(kind: str, settings: PreviewSettings, workdir: str):
    port = free_port()
    return DockerRunner(settings, port, workdir) if kind == "docker" else ProcessRunner(settings, port, workdir)


def _wait_healthy(runner, session, timeout: float) -> None:
    import requests

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        code = runner.exited()
        if code is not None:
            raise LsdeployError(f"the backend exited (code {code}) before answering /health: "
                                f"{_last_line(runner.log_tail())}; full log: {runner.log_path}", EXIT_USAGE)
        try:
            resp = session.get(runner.url + "/health", timeout=5)
            if resp.status_code == 200 and runner.owns_port():
                return
            last = f"HTTP {resp.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise LsdeployError(f"the backend did not answer GET /health within {timeout:.0f}s (last: {last}); "
                        f"Label Studio would show it as disconnected; full log: {runner.log_path}", EXIT_REGISTER)


def _error_text(resp) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict) and body.get("error"):
            return str(body["error"])[:300]
    except ValueError:
        pass
    return (resp.text or "").strip()[:200] or "empty body"


def _setup(session, runner, label_config, project, hostname, token) -> str:
    import requests

    try:
        resp = session.post(runner.url + "/setup", data=json.dumps(setup_body(label_config, project, hostname, token)),
                            timeout=30)
    except requests.RequestException as exc:
        raise LsdeployError(f"POST /setup failed: {type(exc).__name__}", EXIT_REGISTER) from None
    if resp.status_code != 200:
        raise LsdeployError(f"POST /setup answered {resp.status_code}: {_error_text(resp)}; Label Studio would "
                            f"mark the backend as Error: {_last_line(runner.log_tail())}; full log: {runner.log_path}",
                            EXIT_REGISTER)
    try:
        version = resp.json().get("model_version")
    except (ValueError, AttributeError):
        version = None
    if not version:
        raise LsdeployError("POST /setup answered without a model_version: Label Studio needs "
                            "{\"model_version\": \"...\"}", EXIT_REGISTER)
    return str(version)


def _predict(session, runner, tasks, project, settings) -> tuple:
    import requests

    body = predict_body(tasks, project, settings.label_config)
    try:
        resp = session.post(runner.url + "/predict", data=json.dumps(body), timeout=settings.predict_timeout)
    except requests.Timeout:
        problem = Problem("response", "$", f"POST /predict took longer than {settings.predict_timeout:.0f}s: "
                                           "Label Studio gives up then (ML_TIMEOUT_PREDICT) and stores nothing")
        return None, ValidationReport([problem], [], [problem])
    except requests.RequestException as exc:
        raise LsdeployError(f"POST /predict failed: {type(exc).__name__}: {_last_line(runner.log_tail())}; "
                            f"full log: {runner.log_path}", EXIT_ERROR) from None
    try:
        data = resp.json()
    except ValueError:
        data = None
    if resp.status_code != 200 or data is None:
        problem = Problem("response", "$", f"POST /predict answered HTTP {resp.status_code}: {_error_text(resp)} "
                                           "(Label Studio stores no predictions then)")
        return data, ValidationReport([problem], [], [problem])
    return data, validate_predictions(settings.label_config, tasks, data)


def _fit(session, runner, settings, project, hostname, token, version, now, progress) -> FitResult:
    import requests

    result = FitResult(version_before=version)
    bodies = webhook_bodies(settings.annotations, settings.label_config, settings.project_id, version, now)
    errors_before = _fit_errors(session, runner)
    background = False
    for body in bodies:
        ann = body["annotation"]
        try:
            resp = session.post(runner.url + "/webhook", data=json.dumps(body), timeout=30)
        except requests.RequestException as exc:
            result.events.append(FitEvent(body["task"]["id"], ann["id"], 0, "error", type(exc).__name__))
            result.errors.append(f"POST /webhook for annotation {ann['id']}: {type(exc).__name__}")
            continue
        try:
            answer = resp.json()
        except ValueError:
            answer = {}
        if resp.status_code == 201:
            outcome, detail = "ok", json.dumps(answer.get("result"), default=str)[:200]
        elif resp.status_code == 202:
            outcome, detail, background = "training", "fit continues in the background", True
        elif resp.status_code == 200:
            outcome, detail = "skipped", str(answer.get("reason") or answer.get("status") or "")
        else:
            outcome, detail = "error", _error_text(resp)
            result.errors.append(f"POST /webhook for annotation {ann['id']} answered {resp.status_code}: {detail}")
        result.events.append(FitEvent(body["task"]["id"], ann["id"], resp.status_code, outcome, detail))
    progress(f"sent {len(bodies)} ANNOTATION_CREATED webhook(s)")
    started = time.monotonic()
    if background:
        result.finished = _wait_training(session, runner, settings.fit_timeout, version, project, hostname, token,
                                         settings.label_config, progress)
    result.waited = time.monotonic() - started
    errors_after = _fit_errors(session, runner)
    if errors_before is not None and errors_after is not None and errors_after > errors_before:
        result.errors.append(f"{int(errors_after - errors_before)} background fit(s) failed: "
                             f"{_last_line(runner.log_tail())}")
    if not result.finished:
        result.errors.append(f"training was still running after {settings.fit_timeout:.0f}s (--fit-timeout)")
    result.version_after = _setup(session, runner, settings.label_config, project, hostname, token)
    progress(f"model version: {result.version_before} -> {result.version_after}")
    return result


def _fit_errors(session, runner) -> Optional[float]:
    try:
        resp = session.get(runner.url + "/metrics", timeout=10)
    except Exception:  # noqa: BLE001 - metrics are optional
        return None
    if resp.status_code != 200:
        return None
    return _metric(resp.text, "lsdeploy_fit_total", status="error") or 0.0


def _wait_training(session, runner, timeout, version, project, hostname, token, label_config, progress) -> bool:
    """Wait until queued training is done: the server's fit queue gauge is 0 (or, without
    metrics, the model version changed). False when `timeout` passed first."""
    progress(f"waiting for background training (up to {timeout:.0f}s)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            resp = session.get(runner.url + "/metrics", timeout=10)
            depth = _metric(resp.text, "lsdeploy_fit_queue_depth") if resp.status_code == 200 else None
        except Exception:  # noqa: BLE001
            depth = None
        if depth is not None:
            if depth == 0:
                return True
        elif _setup(session, runner, label_config, project, hostname, token) != version:
            return True
        time.sleep(0.25)
    return False
