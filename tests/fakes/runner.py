"""Run a Cloud Run revision as a local process, the way its container would run.

No container engine runs here, so the Cloud Run fake (when its runner is on) takes the source
bundle the image was built from, unpacks it into a private root directory, reads the Dockerfile
for what the container would execute (ENTRYPOINT/CMD, WORKDIR, ENV, where the source was
copied), maps container paths into that root (`/app` -> `<root>/app`), and starts the command
with Cloud Run's environment (`PORT`, `K_SERVICE`, `K_REVISION`, `K_CONFIGURATION`, the
service's env values and resolved secrets) plus `HOST=127.0.0.1`, so everything stays on the
loopback interface. Executables resolve from this interpreter's environment first
(`label-studio-ml`, `gunicorn`, `python`): the test venv stands in for the image's site-packages.

With a container engine the Cloud Run fake runs the real image instead (containers.py,
ContainerRevision, which shares `RevisionRun` and the startup check below); this runner is the
fallback where no engine exists.

`ServiceProxy` gives each service one stable URL (what Cloud Run's `uri` is) and forwards
every request to the revision that currently receives the traffic; it answers 503 like Cloud
Run when no revision is ready.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath

from lsdeploy.preview import stop_group


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Bundles


def bundle_files(data: bytes) -> dict[str, bytes]:
    """The regular files of a .tar.gz (or .tar, or .zip) source bundle: {posix path: bytes}.
    Raises ValueError when it is neither."""
    files: dict[str, bytes] = {}
    if data[:2] == b"PK":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for info in archive.infolist():
                    if not info.is_dir():
                        files[_clean(info.filename)] = archive.read(info)
            return files
        except zipfile.BadZipFile as exc:
            raise ValueError(f"not a valid zip archive: {exc}") from None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
            for member in archive.getmembers():
                if member.isfile():
                    files[_clean(member.name)] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ValueError(f"not a valid tar.gz archive: {exc}") from None
    return files


def _clean(name: str) -> str:
    path = PurePosixPath(name)
    parts = [p for p in path.parts if p not in ("", ".", "/")]
    if any(p == ".." for p in parts):
        raise ValueError(f"archive member escapes the build context: {name}")
    return "/".join(parts)


def unpack(data: bytes, destination: Path) -> None:
    for name, content in bundle_files(data).items():
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


# ---------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with comments dropped and line continuations joined."""
    instructions, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    if current.strip():
        keyword, _, rest = current.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _exec_or_shell(arguments: str):
    if arguments.startswith("["):
        try:
            value = json.loads(arguments)
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
        except ValueError:
            pass
    return ["/bin/sh", "-c", arguments]


def parse_dockerfile(text: str) -> dict:
    """What the final stage of a Dockerfile runs: entrypoint, cmd, workdir, env, source dest."""
    spec = {"entrypoint": [], "cmd": [], "workdir": "/", "env": {}, "source_dest": None, "user": None}
    for keyword, arguments in dockerfile_instructions(text):
        if keyword == "FROM":  # a new stage starts from scratch (as far as we can know)
            spec.update(entrypoint=[], cmd=[], workdir="/", env={}, source_dest=None)
        elif keyword == "WORKDIR":
            spec["workdir"] = str(PurePosixPath(spec["workdir"]) / _expand(arguments, spec["env"]))
        elif keyword == "ENV":
            tokens = shlex.split(arguments)
            if tokens and "=" not in tokens[0]:  # legacy `ENV KEY value with spaces`
                spec["env"][tokens[0]] = _expand(arguments.split(None, 1)[1] if len(tokens) > 1 else "", spec["env"])
            else:
                for token in tokens:
                    key, _, value = token.partition("=")
                    spec["env"][key] = _expand(value, spec["env"])
        elif keyword in ("COPY", "ADD"):
            tokens = [t for t in shlex.split(arguments) if not t.startswith("--")]
            if len(tokens) >= 2 and any(src in (".", "./") for src in tokens[:-1]):
                dest = PurePosixPath(spec["workdir"]) / tokens[-1]
                spec["source_dest"] = str(dest)
        elif keyword == "CMD":
            spec["cmd"] = _exec_or_shell(arguments)
        elif keyword == "ENTRYPOINT":
            spec["entrypoint"] = _exec_or_shell(arguments)
            spec["cmd"] = []
        elif keyword == "USER":
            spec["user"] = arguments
    if spec["source_dest"] is None:
        spec["source_dest"] = spec["workdir"] if spec["workdir"] != "/" else "/app"
    return spec


def _expand(value: str, env: dict) -> str:
    for key, replacement in sorted(env.items(), key=lambda kv: -len(kv[0])):
        value = value.replace("${" + key + "}", replacement).replace("$" + key, replacement)
    return value


# ---------------------------------------------------------------------------------------------
# Cloud Run's startup check (processes and containers alike)


def startup_check(port: int, startup: dict, stopped: threading.Event, exited) -> tuple[str, int | None]:
    """Cloud Run's startup check on 127.0.0.1:`port`: the HTTP startup probe path if one is set
    (`startup["path"]`, any 2xx/3xx), else a TCP connect, until `startup["deadline"]` seconds.
    `exited()` is the exit code once the server has exited, else None. Returns ("ready", None),
    ("exited", code), ("timeout", None), or ("stopped", None) once `stopped` is set."""
    deadline = time.monotonic() + startup.get("deadline", 240)
    path = startup.get("path")
    while not stopped.is_set() and time.monotonic() < deadline:
        code = exited()
        if code is not None:
            return "exited", code
        try:
            if path:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", path)
                status = conn.getresponse().status
                conn.close()
                if 200 <= status < 400:
                    return "ready", None
            else:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return "ready", None
        except OSError:
            pass
        time.sleep(0.1)
    return ("stopped" if stopped.is_set() else "timeout"), None


def start_failure(port: int) -> str:
    """Cloud Run's condition message for a revision whose container exited or never answered its
    startup probe: nothing of what it printed (that is in Cloud Logging: tests/fakes/cloudlogging.py)."""
    return (f"The user-provided container failed to start and listen on the port defined provided by the PORT={port} "
            f"environment variable within the allocated timeout. This can happen when the container port is "
            f"misconfigured or if the timeout is too short. The health check timeout can be extended. Logs for "
            f"this revision might contain more information.")


# ---------------------------------------------------------------------------------------------
# A revision's process


LOCAL_TOOLS = {"python", "python3", "label-studio-ml", "gunicorn", "pip"}


class RevisionRun:
    """What every way of running a revision shares (RevisionProcess here, ContainerRevision in
    containers.py): `state`, `message`, `port`, `termination`, `stopped`; `_launch()` starts it."""

    def cold_start(self, timeout: float = 60.0) -> bool:
        """Start a stopped (scaled to zero) revision again for a request, like Cloud Run does;
        True once it is ready."""
        with self._lock:
            if self.state == "stopped":
                self.port = free_port()
                self._launch()
        deadline = time.monotonic() + timeout
        while self.state == "starting" and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.state == "ready"

    def _fail(self, message: str) -> None:
        self.state = "failed"
        self.message = message

    def wait_stopped(self, timeout: float) -> dict | None:
        """`termination` once a stop (scale to zero, replacement) has ended it, else None."""
        return self.termination if self.stopped.wait(timeout) else None


class RevisionProcess(RevisionRun):
    """One revision's container, as a local process group on 127.0.0.1:<free port>."""

    def __init__(self, revision: str, bundle: bytes, container: dict, env: dict[str, str],
                 startup: dict, workdir_root: Path, extra_env: dict[str, str] | None = None):
        self.revision = revision
        self.bundle = bundle
        self.container = container  # {"command": [...], "args": [...], "working_dir": str}
        self.env = env
        self.startup = startup  # {"path": "/health" or None, "deadline": seconds}
        self.root = Path(tempfile.mkdtemp(prefix=f"run-{revision}-", dir=workdir_root))
        self.extra_env = dict(extra_env or {})
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.state = "starting"  # starting | ready | failed | stopped
        self.message = ""
        self.log_path = self.root / "container.log"
        self.termination: dict | None = None  # how the last stop ended: exit_code, seconds, killed
        self.stopped = threading.Event()  # set once a stop() has ended the process
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # container paths -> host paths under self.root
    def host_path(self, value: str) -> str:
        for prefix in self._mapped:
            if value == prefix or value.startswith(prefix.rstrip("/") + "/"):
                return str(self.root) + value
        return value

    def argv_and_env(self) -> tuple[list[str], dict[str, str], str]:
        files = bundle_files(self.bundle)
        dockerfile_name = self.container.get("dockerfile") or "Dockerfile"
        spec = parse_dockerfile(files.get(dockerfile_name, b"").decode("utf-8", "replace"))
        app_dir = spec["source_dest"]
        self._mapped = [app_dir]
        if spec["workdir"] != "/":
            self._mapped.append(spec["workdir"])
        for value in spec["env"].values():  # absolute paths the image creates (MODEL_DIR=/data/...)
            if value.startswith("/") and not os.path.exists(value) and " " not in value:
                self._mapped.append(value)
        (self.root / app_dir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        unpack(self.bundle, self.root / app_dir.lstrip("/"))
        for prefix in self._mapped:
            Path(str(self.root) + prefix).mkdir(parents=True, exist_ok=True)

        entrypoint = list(self.container.get("command") or spec["entrypoint"])
        cmd = list(self.container.get("args") or ([] if self.container.get("command") else spec["cmd"]))
        argv = entrypoint + cmd
        if not argv:
            raise RuntimeError("the image defines no command (no CMD or ENTRYPOINT in the Dockerfile)")
        argv = [self.host_path(a) for a in argv]
        if argv[:2] == ["/bin/sh", "-c"]:
            # Shell form: keep it listening on loopback (`--bind :$PORT` would bind every interface).
            argv[2] = argv[2].replace(" :$PORT", " 127.0.0.1:$PORT").replace(" :${PORT}", " 127.0.0.1:${PORT}")
            for prefix in self._mapped:
                argv[2] = argv[2].replace(f" {prefix}", f" {self.root}{prefix}")
        else:
            argv[0] = self._resolve(argv[0])
        cwd = self.host_path(self.container.get("working_dir") or spec["workdir"])
        if not os.path.isdir(cwd):
            cwd = str(self.root / app_dir.lstrip("/"))
        bin_dir = os.path.dirname(sys.executable)
        env = {
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.root),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "TMPDIR": str(self.root),
        }
        env.update({k: self.host_path(v) for k, v in spec["env"].items()})
        env.update(self.extra_env)
        env.update(self.env)  # the service's values and resolved secrets, then Cloud Run's own
        env.update({"PORT": str(self.port), "HOST": "127.0.0.1"})
        return argv, env, cwd

    @staticmethod
    def _resolve(executable: str) -> str:
        name = os.path.basename(executable)
        if name in LOCAL_TOOLS or not os.path.isabs(executable):
            if name.startswith("python"):
                return sys.executable
            local = os.path.join(os.path.dirname(sys.executable), name)
            if os.path.exists(local):
                return local
            return shutil.which(name) or executable
        return executable

    def start(self) -> "RevisionProcess":
        try:
            self.argv, self._env, self._cwd = self.argv_and_env()
        except (RuntimeError, ValueError) as exc:
            self._fail(f"The container could not be started: {exc}")
            return self
        return self._launch()

    def _launch(self) -> "RevisionProcess":
        self._stop = threading.Event()
        self.stopped.clear()
        self.state = "starting"
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, cwd=self._cwd, env={**self._env, "PORT": str(self.port)},
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        except OSError as exc:
            self._fail(f"The container could not be started: {exc}")
            return self
        finally:
            log.close()
        threading.Thread(target=self._probe, name=f"probe-{self.revision}", daemon=True).start()
        return self

    def _probe(self) -> None:
        outcome, _ = startup_check(self.port, self.startup, self._stop, self.proc.poll)
        if outcome == "ready":
            self.state = "ready"
        elif outcome == "exited":
            self._fail(start_failure(self.port))
        elif outcome == "timeout":
            self._fail(start_failure(self.port))
            self.stop()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds (Cloud Run allows 10 s)."""
        self._stop.set()
        if self.proc is not None:
            running, started = self.proc.poll() is None, time.monotonic()
            stop_group(self.proc, grace)
            if running:  # how it ended, as ContainerRevision reports it
                self.termination = {"exit_code": self.proc.returncode, "killed": self.proc.returncode == -9,
                                    "seconds": round(time.monotonic() - started, 2)}
        if self.state != "failed":
            self.state = "stopped"
        self.stopped.set()


    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# A service's stable URL


HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}


class ServiceProxy:
    """http://127.0.0.1:<port> for one service. `targets()` returns [(RevisionProcess, percent)] for
    the revisions receiving traffic; each request goes to one of them, chosen by weight like Cloud
    Run splits traffic, cold-starting it if it was scaled to zero. 503 when none can serve."""

    def __init__(self, targets, access=None):
        self.targets = targets
        self.access = access  # access(method, path, headers) -> None, or (status, html) to refuse
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                refusal = proxy.access(self.command, self.path, self.headers) if proxy.access else None
                if refusal is not None:
                    return self._answer(refusal[0], refusal[1].encode(), "text/html; charset=UTF-8")
                targets = [t for t in proxy.targets() if t[1] > 0]
                if not targets:
                    return self._answer(503, b"Service Unavailable", "text/html; charset=UTF-8")
                process = random.choices([t[0] for t in targets], weights=[t[1] for t in targets])[0]
                if process.state != "ready" and not process.cold_start():
                    return self._answer(503, b"Service Unavailable", "text/html; charset=UTF-8")
                port = process.port
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                headers["Host"] = f"127.0.0.1:{port}"
                headers["X-Forwarded-Proto"] = "http"
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    self.send_response(response.status, response.reason)
                    for key, value in response.getheaders():
                        if key.lower() not in HOP_BY_HOP:
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    conn.close()
                except OSError:
                    self._answer(503, b"Service Unavailable", "text/html; charset=UTF-8")

            def _answer(self, status, data, content_type):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _forward

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         name=f"proxy-{self.port}", daemon=True).start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
