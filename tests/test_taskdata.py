"""Reading task files: the key goes only to Label Studio's host; local and internal URLs are
refused unless allowed; downloads are bounded."""
import http.server
import threading

import pytest

from lsdeploy import taskdata
from lsdeploy.taskdata import TaskDataError, get_local_path


class Recorder(http.server.BaseHTTPRequestHandler):
    seen: list = []
    redirect_to = None
    body = b"file-bytes"

    def do_GET(self):
        Recorder.seen.append((self.server.server_port, self.path, self.headers.get("Authorization")))
        if self.path.startswith("/redirect") and Recorder.redirect_to:
            self.send_response(302)
            self.send_header("Location", Recorder.redirect_to)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(Recorder.body)))
        self.end_headers()
        self.wfile.write(Recorder.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hosts():
    servers = []
    for _ in range(2):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    Recorder.seen, Recorder.redirect_to, Recorder.body = [], None, b"file-bytes"
    yield [f"http://127.0.0.1:{s.server_port}" for s in servers]
    for server in servers:
        server.shutdown()


def test_label_studio_upload_gets_the_key(hosts, tmp_path):
    ls = hosts[0]
    path = get_local_path("/data/upload/1/a.txt", label_studio_url=ls, token="legacy-key", cache_dir=str(tmp_path))
    assert open(path, "rb").read() == b"file-bytes"
    assert Recorder.seen[-1][1:] == ("/data/upload/1/a.txt", "Token legacy-key")
    import base64
    import json

    access = "e30." + base64.urlsafe_b64encode(json.dumps({"token_type": "access"}).encode()).decode().rstrip("=") + ".sig"
    get_local_path("/data/upload/1/b.txt", label_studio_url=ls, token=access, cache_dir=str(tmp_path))
    assert Recorder.seen[-1][2] == f"Bearer {access}"  # a JWT access token goes as it is


def test_key_never_goes_to_another_host(hosts, tmp_path, monkeypatch):
    ls, other = hosts
    monkeypatch.setenv("TASK_DATA_ALLOW_PRIVATE", "true")  # both hosts are loopback here
    get_local_path(other + "/x.txt", label_studio_url=ls, token="legacy-key", cache_dir=str(tmp_path))
    assert Recorder.seen[-1][2] is None
    Recorder.redirect_to = other + "/landing.txt"  # Label Studio redirecting elsewhere: key dropped
    get_local_path(ls + "/redirect", label_studio_url=ls, token="legacy-key", cache_dir=str(tmp_path))
    assert Recorder.seen[-2][2] == "Token legacy-key" and Recorder.seen[-1][1:] == ("/landing.txt", None)


def test_internal_and_local_urls_are_refused(hosts, tmp_path, monkeypatch):
    with pytest.raises(TaskDataError, match="internal address; set TASK_DATA_ALLOW_PRIVATE=true"):
        get_local_path(hosts[1] + "/x", label_studio_url="http://ls.example:8080", cache_dir=str(tmp_path))
    with pytest.raises(TaskDataError, match="TASK_DATA_ALLOW_LOCAL"):
        get_local_path("file:///etc/passwd", cache_dir=str(tmp_path))
    with pytest.raises(TaskDataError, match="TASK_DATA_ALLOW_LOCAL"):
        get_local_path("/etc/passwd".lstrip("/"), cache_dir=str(tmp_path))
    local = tmp_path / "ok.txt"
    local.write_text("hi")
    monkeypatch.setenv("TASK_DATA_ALLOW_LOCAL", "true")
    assert get_local_path(f"file://{local}", cache_dir=str(tmp_path)) == str(local)


def test_size_limit_and_failures(hosts, tmp_path, monkeypatch):
    monkeypatch.setenv("TASK_DATA_MAX_BYTES", "5")
    with pytest.raises(TaskDataError, match="larger than TASK_DATA_MAX_BYTES=5"):
        get_local_path("/data/upload/big", label_studio_url=hosts[0], cache_dir=str(tmp_path))
    assert not any(p.name.startswith(".part") for p in tmp_path.iterdir())
    with pytest.raises(TaskDataError, match="connect the backend to Label Studio"):
        get_local_path("/data/upload/x", label_studio_url=None, cache_dir=str(tmp_path))
    with pytest.raises(TaskDataError, match="task id"):
        get_local_path("s3://bucket/key", label_studio_url=hosts[0], cache_dir=str(tmp_path))


def test_connection_from_setup_is_kept_in_memory_and_hidden(monkeypatch):
    taskdata.remember("42", "http://ls:8080/", "secret-key-xyz")
    conn = taskdata.connection("42")
    assert conn.url == "http://ls:8080" and conn.token == "secret-key-xyz"
    assert "secret-key-xyz" not in repr(conn)
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://env:1")
    assert taskdata.connection("43").url == "http://env:1"
