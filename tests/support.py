"""Helpers shared by the test suite: free ports, and a real `label-studio-ml start` process."""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "lsdeploy.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, message: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message} (last error: {last!r})")


def run_cli(*args, env=None, cwd=None, timeout=120, input=None) -> subprocess.CompletedProcess:
    """Run `label-studio-ml ARGS` in a child process; returns the completed process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=timeout, input=input)


_LOGS: list[str] = []


@atexit.register
def _remove_logs():
    for path in _LOGS:
        try:
            os.unlink(path)
        except OSError:
            pass


class Server:
    """`label-studio-ml start DIR` as a real process on 127.0.0.1 (gunicorn underneath)."""

    def __init__(self, directory, *args, env=None, port=None, auth=None):
        self.directory = str(directory)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = list(args)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.auth = auth
        self.proc: subprocess.Popen | None = None
        self.log_path = None

    def start(self, wait: bool = True, timeout: float = 60.0):
        import tempfile

        fd, self.log_path = tempfile.mkstemp(prefix="lsdeploy-server-", suffix=".log")
        _LOGS.append(self.log_path)
        self._log = os.fdopen(fd, "w")
        self.proc = subprocess.Popen(
            [*CLI, "start", self.directory, "--port", str(self.port), "--host", "127.0.0.1", *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
        )
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 60.0):
        def healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            return requests.get(self.url + "/health", timeout=2).status_code == 200

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if healthy():
                    return
            except RuntimeError:
                raise
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.05)
        raise AssertionError(f"server on {self.url} not healthy after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        if self.log_path is None:
            return ""
        if not self._log.closed:
            self._log.flush()
        return Path(self.log_path).read_text(errors="replace")

    def request(self, method, path, **kwargs):
        kwargs.setdefault("timeout", 30)
        if self.auth and "auth" not in kwargs:
            kwargs["auth"] = self.auth
        return requests.request(method, self.url + path, **kwargs)

    def post(self, path, json=None, **kwargs):
        return self.request("POST", path, json=json, **kwargs)

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


TEXT_CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text" choice="single">
    <Choice value="Positive"/>
    <Choice value="Negative"/>
    <Choice value="Neutral"/>
  </Choices>
</View>"""


def predict_body(tasks, project="1.1700000000", label_config=TEXT_CONFIG, context=None):
    """A /predict body exactly as Label Studio 1.23 sends it."""
    return {
        "tasks": tasks,
        "project": project,
        "label_config": label_config,
        "params": {"login": None, "password": None, "context": context},
    }


def text_task(task_id, text, project=1):
    return {"id": task_id, "data": {"text": text}, "meta": {}, "annotations": [], "predictions": [],
            "project": project, "created_at": "2026-11-27T00:00:00Z", "updated_at": "2026-11-27T00:00:00Z"}


def annotation_event(task_id, annotation_id, text, label, project=1, label_config=TEXT_CONFIG,
                     action="ANNOTATION_CREATED"):
    """A webhook body shaped like Label Studio's ANNOTATION_CREATED payload."""
    return {
        "action": action,
        "annotation": {
            "id": annotation_id, "task": task_id, "was_cancelled": False, "ground_truth": False,
            "result": [{"id": f"r{annotation_id}", "from_name": "sentiment", "to_name": "text", "type": "choices",
                        "value": {"choices": [label]}, "origin": "manual"}],
        },
        "task": text_task(task_id, text, project),
        "project": {"id": project, "title": "test", "label_config": label_config},
    }


def backend_dir(parent, model_source: str, name: str = "backend") -> Path:
    """A backend directory under `parent` whose model.py is `model_source`."""
    directory = Path(parent) / name
    directory.mkdir()
    (directory / "model.py").write_text(model_source)
    return directory


def wait_jobs_done(get, answers, timeout: float = 120.0) -> list:
    """Until the training job of every webhook answer (201 or 202) is done, by GET /jobs/<job>
    (`get(path)` answers a GET on the backend); fails at once on a failed job. The job views."""
    views = []
    for answer in answers:
        assert answer.status_code in (201, 202), answer.text
        job = answer.json()["job"]

        def done(job=job):
            view = get(f"/jobs/{job}").json()
            assert view.get("state") != "failed", view
            return view if view.get("state") == "done" else None

        views.append(wait_for(done, timeout=timeout, interval=0.1, message=f"training job {job} done"))
    return views


def worker_pid(server) -> int:
    """The pid of a Server's (first) gunicorn worker."""
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
    return int(wait_for(lambda: children.read_text().split(), timeout=30, message="a gunicorn worker")[0])


def memory_kb(pid: int) -> dict:
    """{"VmRSS": kB, "VmHWM": kB} of a process."""
    fields = (line.split(":") for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {name: int(value.split()[0]) for name, value in fields if name in ("VmRSS", "VmHWM")}


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its children (a gunicorn master and its workers)."""
    tick, total, pids = os.sysconf("SC_CLK_TCK"), 0.0, [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            pids += [int(c) for c in open(f"/proc/{pid}/task/{task}/children").read().split()]
        for p in pids:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    except FileNotFoundError:
        pass
    return total


class SlowClients:
    """`idle` connections that send nothing and `slowloris` ones that send a header byte every
    0.2 s, against 127.0.0.1:port (tests/test_slow_clients.py, bench/slowloris.py)."""

    def __init__(self, port: int, idle: int, slowloris: int):
        self.idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(idle)]
        self.slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(slowloris)]
        for sock in self.slow:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self):
        while not self.stop.wait(0.2):
            for sock in self.slow:
                try:
                    sock.sendall(b"a")
                except OSError:
                    pass

    def still_open(self) -> int:
        """How many of these connections the server has not closed."""
        count = 0
        for sock in self.idle + self.slow:
            try:
                count += sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) != b""
            except BlockingIOError:
                count += 1
            except OSError:
                pass
        return count

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for sock in self.idle + self.slow:
            sock.close()
