"""Running a backend under gunicorn: what `label-studio-ml start` and every container run.

Options come from `ServeSettings` (the CLI fills it from flags and PORT/HOST/WORKERS/THREADS).
The app is built in the master process after the model class is imported (so a broken
backend fails once, with one line, before any worker starts); each worker opens its own
state store after fork and finishes queued training before it exits.
"""
from __future__ import annotations

import atexit
import errno
import gc
import logging
import logging.config
import os
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import EXIT_USAGE, LsdeployError

logger = logging.getLogger("lsdeploy.serve")

# Cloud Run sends SIGTERM and kills 10 s later: finish in-flight work within 8 s.
GRACEFUL_TIMEOUT = 8


@dataclass
class ServeSettings:
    directory: str
    port: int = 9090
    host: str = "127.0.0.1"
    workers: int = 1
    threads: int = 8
    model: Optional[str] = None
    basic_auth: Optional[tuple] = field(default=None, repr=False)
    log_level: str = "INFO"
    debug: bool = False
    graceful_timeout: int = GRACEFUL_TIMEOUT
    client_timeout: float = 30.0
    check_requirements: bool = True  # DIR/requirements.txt must be installed before serving


# Where these exist, the process runs in a container: Docker, Podman, Cloud Run (services and jobs), Kubernetes.
CONTAINER_FILES = ("/.dockerenv", "/run/.containerenv")
CONTAINER_ENV = ("K_SERVICE", "CLOUD_RUN_JOB", "KUBERNETES_SERVICE_HOST")


def in_container(environ, exists=os.path.exists) -> bool:
    return any(environ.get(name) for name in CONTAINER_ENV) or any(exists(path) for path in CONTAINER_FILES)


def default_host(environ, exists=os.path.exists) -> str:
    """Where `start` listens without --host / HOST: this machine only, except in a container,
    whose port is published from outside (the rendered Dockerfile also sets HOST=0.0.0.0)."""
    return "0.0.0.0" if in_container(environ, exists) else "127.0.0.1"


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def exposure_warning(settings: "ServeSettings") -> Optional[str]:
    """The warning `start` logs when anyone who reaches this machine may call the model."""
    if settings.basic_auth or is_loopback(settings.host):
        return None
    setup = "" if os.environ.get("LABEL_STUDIO_URL") or os.environ.get("LABEL_STUDIO_HOST") else (
        ", and name any host as Label Studio in /setup, from which the backend then reads task files (inside "
        "your network too): set LABEL_STUDIO_URL to trust only your Label Studio")
    return (f"listening on {settings.host}:{settings.port} without basic auth: anyone who can reach this address can "
            f"call the model{setup}; set BASIC_AUTH_USER and BASIC_AUTH_PASS, or --host 127.0.0.1 (HOST) when only "
            "this machine needs it")


def server_command(directory: str, port: int, host: str = "0.0.0.0", model: Optional[str] = None) -> list[str]:
    """The argv a container runs (and preview runs as a local process). Secrets go by
    environment (BASIC_AUTH_PASS, LABEL_STUDIO_API_KEY), never on this command line."""
    argv = ["label-studio-ml", "start", str(directory), "--port", str(port), "--host", host]
    if model:
        argv += ["--model", model]
    return argv


class StderrHandler(logging.Handler):
    """Log lines to stderr without slowing requests down.

    INFO lines (one per request) are appended to an in-memory buffer that a background thread
    writes out every FLUSH_SECONDS in one write(2); a request thread never blocks on the stream,
    never waits on a handler lock held across I/O, and never hands the GIL over for a syscall
    (each of which costs a busy multi-threaded worker more than the log line itself). WARNING and
    above are written at once. The buffer is flushed at exit; at most FLUSH_SECONDS of INFO lines
    can be lost if the process is killed outright.
    """

    FLUSH_SECONDS = 0.1

    def __init__(self, fd: int = 2):
        super().__init__()
        self.fd = fd
        self._pending: list[str] = []
        self._flusher_pid = None
        self._flushing = False  # this process's flusher thread runs
        self._wake = threading.Event()
        self._plain = None  # the formatter write_line has checked it can stand in for
        self._second = (None, "")  # (epoch second, its asctime text)
        # The parent writes its buffered lines before a fork, so a worker never writes them again.
        ref = weakref.ref(self)
        os.register_at_fork(before=lambda: _call(ref, "flush"), after_in_child=lambda: _call(ref, "_forget"))

    def _forget(self):
        self._pending = []
        self._flushing = False

    def write_line(self, name: str, message: str) -> bool:
        """An INFO line of logger `name`, formatted as PLAIN_FORMAT would, without building a
        LogRecord (the server's one access line per request). False when this handler's
        formatter is not the plain one: then the caller logs the usual way."""
        formatter = self.formatter
        if formatter is not self._plain:
            if not _is_plain(formatter):
                return False
            self._plain = formatter
        now = time.time()
        second = int(now)
        cached = self._second
        if cached[0] != second:  # asctime as logging.Formatter.formatTime writes it
            cached = self._second = (second, time.strftime("%Y-%m-%d %H:%M:%S", formatter.converter(now)))
        self._pending.append(f"[{cached[1]},{int((now - second) * 1000):03d}] [INFO] [{name}] {message}\n")
        if not self._flushing:  # reset in a forked child, which starts its own flusher
            self._start_flusher()
        return True

    def handle(self, record):
        if not self.filter(record):
            return False
        try:
            line = self.format(record) + "\n"
        except Exception:  # noqa: BLE001 - logging must never break a request
            self.handleError(record)
            return False
        if record.levelno >= logging.WARNING:
            self.flush()
            self._write(line)
        else:
            self._pending.append(line)  # list.append is atomic under the GIL
            if not self._flushing:
                self._start_flusher()
        return True

    def emit(self, record):  # pragma: no cover - handle() does the work
        self.handle(record)

    def _start_flusher(self):
        with self.lock:  # once per process (a forked worker starts its own)
            if self._flushing and self._flusher_pid == os.getpid():
                return
            self._flusher_pid = os.getpid()
            threading.Thread(target=self._flush_loop, name="lsdeploy-log", daemon=True).start()
            atexit.register(self.flush)
            self._flushing = True

    def _flush_loop(self):
        while True:
            self._wake.wait(self.FLUSH_SECONDS)
            self.flush()

    def flush(self):
        with self.lock:
            pending, self._pending = self._pending, []
        if pending:
            self._write("".join(pending))

    def _write(self, text: str):
        data = text.encode("utf-8", "replace")
        while data:
            try:
                written = os.write(self.fd, data)
            except InterruptedError:
                continue
            except OSError:
                return  # stderr closed: nothing sensible to do
            data = data[written:]


def _call(ref, method: str) -> None:
    handler = ref()
    if handler is not None:
        getattr(handler, method)()


PLAIN_FORMAT = "[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s"


def _is_plain(formatter) -> bool:
    return (type(formatter) is logging.Formatter and formatter._fmt == PLAIN_FORMAT and formatter.datefmt is None
            and formatter.default_time_format == "%Y-%m-%d %H:%M:%S" and formatter.default_msec_format == "%s,%03d"
            and logging.getLevelName(logging.INFO) == "INFO")


def configure_logging(level: str = "INFO") -> None:
    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": PLAIN_FORMAT}},
        "handlers": {"stderr": {"()": StderrHandler, "formatter": "plain"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
    })


def check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise LsdeployError(f"port {port} on {host} is in use: stop what uses it or choose another with --port (PORT)", EXIT_USAGE) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise LsdeployError(f"cannot listen on {host}: no such address on this machine; use --host 0.0.0.0 or 127.0.0.1", EXIT_USAGE) from None
            raise LsdeployError(f"cannot listen on {host}:{port}: {exc.strerror}", EXIT_USAGE) from None


def check_requirements(directory) -> None:
    """Fail before serving when DIR/requirements.txt is not installed here: otherwise the
    server starts and a later request fails on a missing module."""
    from .requirements import install_command, unmet_requirements

    path = Path(directory) / "requirements.txt"
    unmet = unmet_requirements(path)
    if unmet:
        raise LsdeployError(f"{path} is not satisfied in this Python: {'; '.join(unmet)}; install it with: "
                            f"{install_command(path)} (or skip this check: --no-check-requirements, "
                            "LSDEPLOY_CHECK_REQUIREMENTS=0)", EXIT_USAGE)


def build_app(settings: ServeSettings, metrics_dir: Optional[str] = None):
    """Import the backend, check its state store, and build the WSGI app."""
    from .loader import load_model_class
    from .server import create_app
    from .state import default_store, set_default_store
    from .state.reference import import_reference_state

    model_class = load_model_class(settings.directory, settings.model)
    os.environ.setdefault("MODEL_DIR", os.path.join(os.path.abspath(settings.directory), ".lsdeploy"))
    store = default_store()  # fails here, once, when the store is unusable
    import_reference_state(store, os.environ.get("MODEL_DIR"), settings.directory)  # a ported backend's cache.db
    store.close()
    set_default_store(None)  # each worker opens its own after fork
    return create_app(model_class, basic_auth=settings.basic_auth, debug=settings.debug, metrics_dir=metrics_dir)


_METRICS_PREFIX = "lsdeploy-metrics-"


def metrics_directory(base: Optional[str] = None) -> Optional[str]:
    """A new private directory for the workers' metrics files (in /dev/shm when there is one:
    memory, never written back to disk), or None when no temporary directory is writable (then
    each worker reports its own metrics). The directory stays locked (flock on its `.lock`)
    while this server or any of its workers lives; directories nobody holds, left by servers
    that were killed outright, are removed first."""
    import fcntl
    import shutil
    import tempfile

    try:
        if base is None:
            shm = os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK)
            base = "/dev/shm" if shm else tempfile.gettempdir()
        names = os.listdir(base)
    except OSError as exc:
        names, failure = [], exc
    else:
        failure = None
    for name in names:
        if not name.startswith(_METRICS_PREFIX):
            continue
        path = os.path.join(base, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            fd = os.open(os.path.join(path, ".lock"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live server's
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
    try:
        if failure is not None:
            raise failure
        directory = tempfile.mkdtemp(prefix=f"{_METRICS_PREFIX}{os.getpid()}-", dir=base)
        fd = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until the last process of this server exits
    except OSError as exc:
        logger.warning("no writable temporary directory for shared metrics (%s): /metrics reports the "
                       "worker that answers", exc)
        return None
    return directory


def bounded_worker_class(client_timeout: float):
    """The gunicorn worker class `start` runs: lsdeploy.worker's, where idle and slow clients hold
    no thread, a client gets `client_timeout` seconds to send each whole request (CLIENT_TIMEOUT)
    and may stall at most that long while reading the answer, and every answer is JSON."""
    from .worker import worker_class

    return worker_class(client_timeout)


def run(settings: ServeSettings) -> None:
    configure_logging(settings.log_level)
    if settings.debug and _reloader_child():
        _serve_debug_child(settings)
        return
    check_port(settings.host, settings.port)
    if settings.check_requirements:
        check_requirements(settings.directory)
    if warning := exposure_warning(settings):
        logger.warning(warning)
    if settings.debug:
        app = build_app(settings)  # a broken backend fails here, once, before the reloader starts
        logger.warning("debug mode: Flask's reloading development server, not for production")
        # The reloader runs the same command again as a child that serves (and is run again on
        # each change) on the socket this process opens. The child's end of this pipe reads EOF
        # when this process is gone, however it ended: the child then stops too.
        read_end, _ = os.pipe()  # the write end is not inherited: only this process holds it
        os.set_inheritable(read_end, True)
        os.environ[_PARENT_PIPE] = str(read_end)
        _run_debug_server(settings, app)
        return
    import shutil

    master = os.getpid()
    metrics_dir = metrics_directory()

    def remove_metrics_dir():
        if metrics_dir and os.getpid() == master:  # a worker unwinds through this code too when it exits
            shutil.rmtree(metrics_dir, ignore_errors=True)

    try:
        app = build_app(settings, metrics_dir)
        _serve(settings, app)
    finally:
        remove_metrics_dir()


_PARENT_PIPE = "LSDEPLOY_RELOADER_PIPE"


def _reloader_child() -> bool:
    from werkzeug.serving import is_running_from_reloader

    return is_running_from_reloader()


def _serve_debug_child(settings: ServeSettings) -> None:
    """The reloader's child: serve on the socket the parent opened (and checked)."""
    import signal

    pipe = os.environ.get(_PARENT_PIPE, "")
    if pipe.isdigit():
        def stop_with_parent():
            try:
                while os.read(int(pipe), 1):
                    pass
            except OSError:
                pass
            os.kill(os.getpid(), signal.SIGTERM)  # the reloader's handler exits

        threading.Thread(target=stop_with_parent, name="lsdeploy-parent", daemon=True).start()
    try:
        app = build_app(settings)
    except LsdeployError as exc:
        # A file saved half-edited: say why in one line, answer every request with it, and keep
        # watching the backend's files; the next save restarts this child with the fixed code.
        logger.error("%s; fix it and save: the server reloads", exc)
        app = _broken_app(str(exc))
    _run_debug_server(settings, app)


def _broken_app(message: str):
    from flask import Flask, jsonify

    app = Flask("lsdeploy-broken")
    body = {"status": 500, "error": f"the backend does not load: {message}; fix it and save (--debug reloads)"}

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    @app.route("/<path:path>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def broken(path):
        return jsonify(body), 500

    return app


class _NoRequestLines(logging.Filter):
    """werkzeug's own line per request (with the query string): lsdeploy logs each request already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return '"%s" %s %s' not in str(record.msg)


def _run_debug_server(settings: ServeSettings, app) -> None:
    # Flask's interactive debugger is left out: every exception already becomes a JSON 500 with
    # its traceback, and its console would be one more door into this process. The reloader also
    # watches the backend's own Python files, which a failed import left out of sys.modules.
    logging.getLogger("werkzeug").addFilter(_NoRequestLines())
    ext = app.extensions.get("lsdeploy")  # None for the stub that reports a broken save
    if ext is not None and os.environ.get("WERKZEUG_RUN_MAIN") == "true":  # the reloader's serving child
        ext["trainer"].start()  # resume what the last run left queued
    watched = [str(path) for path in Path(settings.directory).rglob("*.py")
               if not {".venv", "venv", ".lsdeploy", "__pycache__", "wheels"} & set(path.parts)]
    app.run(host=settings.host, port=settings.port, debug=True, use_reloader=True, use_debugger=False, threaded=True,
            extra_files=watched)


def _serve(settings: ServeSettings, app) -> None:
    from gunicorn.app.base import BaseApplication

    graceful = settings.graceful_timeout

    def post_worker_init(worker):
        from .state import default_store

        default_store()  # open this worker's store before its first request
        app.extensions["lsdeploy"]["trainer"].start()  # resume what a stopped or dead worker left queued
        gc.freeze()  # see below: the same for what the worker itself set up

    def worker_exit(server, worker):
        ext = app.extensions["lsdeploy"]
        for handler in logging.getLogger().handlers:
            handler.flush()
        # The running fit may finish within the grace period; queued events stay in the store.
        left = ext["trainer"].stop(max(graceful - 1, 1))
        if not left["finished"]:
            logger.warning("training job %s did not finish within the grace period: it runs again, as its next "
                           "attempt, when a worker starts", left["running"])
        if left["queued"]:
            logger.info("%d training event(s) left queued in the state store, not lost: they train when a "
                        "worker starts", left["queued"])

    def child_exit(server, worker):  # in the master, after a worker exited
        app.extensions["lsdeploy"]["metrics"].retire(worker.pid)

    bind = f"[{settings.host}]:{settings.port}" if ":" in settings.host else f"{settings.host}:{settings.port}"
    options = {
        "bind": bind,
        "workers": settings.workers,
        "threads": settings.threads,
        "worker_class": bounded_worker_class(settings.client_timeout),
        "timeout": 0,  # predictions may take long; Cloud Run enforces its request timeout
        "graceful_timeout": graceful,
        "keepalive": 5,
        "accesslog": None,  # the app logs one line per request itself
        "errorlog": "-",
        "loglevel": settings.log_level.lower(),
        "post_worker_init": post_worker_init,
        "worker_exit": worker_exit,
        "child_exit": child_exit,
        "proc_name": "lsdeploy",
        # gunicorn >= 24 opens a control socket at a fixed path in $HOME: two servers on one
        # machine would fight over it, and nothing here uses it.
        "control_socket_disable": True,
    }

    class Application(BaseApplication):
        def load_config(self):
            for key, value in options.items():
                if key in self.cfg.settings:  # settings differ across gunicorn versions
                    self.cfg.set(key, value)

        def load(self):
            return app

    logger.info("serving %s on %s (%d worker(s) x %d thread(s))",
                app.extensions["lsdeploy"]["model_class"].__name__, bind, settings.workers, settings.threads)
    # Everything imported and built so far (Flask, the backend's modules, its libraries) lives
    # as long as the process: move it out of the cyclic garbage collector's reach. Otherwise
    # each full collection walks all of it, which costs a busy worker about a tenth of its
    # throughput, and touches every page shared with the master after fork.
    gc.freeze()
    Application().run()
