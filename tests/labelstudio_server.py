"""A real Label Studio for the e2e tests: installed once into a cached venv by tests/labelstudio.sh,
started on 127.0.0.1 with a fresh data dir, a known user and a legacy token."""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from lsdeploy.preview import stop_group

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "labelstudio.sh"
USERNAME = "admin@example.com"
PASSWORD = "admin12345"
LEGACY_TOKEN = "lsdeploy-e2e-legacy-token-0123456789"


def install(timeout: float = 1800.0) -> str:
    """Create the cached venv when missing; returns its python."""
    done = subprocess.run(["bash", str(SCRIPT), "install"], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"installing Label Studio failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


@dataclass
class LabelStudioProcess:
    url: str
    port: int
    data_dir: str
    log_path: str
    proc: subprocess.Popen
    legacy_token: str = LEGACY_TOKEN
    pat: str = ""
    version: str = ""

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")[-5000:]

    def stop(self, timeout: float = 20.0) -> None:
        stop_group(self.proc, timeout)


def start(port: int, data_dir: str, log_path: str, timeout: float = 240.0, ml_block_local_ip: bool = False,
          ssrf_protection: bool = False, create_pat: bool = True) -> LabelStudioProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "LABEL_STUDIO_API_KEY")}
    env.update(LS_USERNAME=USERNAME, LS_PASSWORD=PASSWORD, LS_TOKEN=LEGACY_TOKEN,
               LS_ML_BLOCK_LOCAL_IP=str(ml_block_local_ip).lower(), LS_SSRF_PROTECTION=str(ssrf_protection).lower())
    log = open(log_path, "w")
    proc = subprocess.Popen(["bash", str(SCRIPT), "start", str(port), data_dir], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    ls = LabelStudioProcess(url=f"http://127.0.0.1:{port}", port=port, data_dir=data_dir, log_path=log_path, proc=proc)
    headers = {"Authorization": f"Token {LEGACY_TOKEN}"}
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"Label Studio exited with {proc.returncode}:\n{ls.log()}")
        try:
            # Label Studio silently moves to another port when ours is busy: ask it on ours, with our token.
            resp = requests.get(f"{ls.url}/api/version", headers=headers, timeout=5)
            if resp.status_code == 200:
                ls.version = resp.json().get("release", "")
                break
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            ls.stop()
            raise RuntimeError(f"Label Studio did not answer on {ls.url} within {timeout}s:\n{ls.log()}")
        time.sleep(0.5)
    if not create_pat:
        return ls
    # A personal access token can be read back only once, at creation.
    resp = requests.post(f"{ls.url}/api/token/", headers=headers, timeout=30)
    if resp.status_code != 201 and resp.status_code != 200:
        ls.stop()
        raise RuntimeError(f"creating a personal access token failed: {resp.status_code} {resp.text[:300]}")
    ls.pat = resp.json()["token"]
    return ls


def copy_data_dir(source: str, target: str) -> None:
    """A copy of a (running) Label Studio's data dir: a second instance starts in seconds, without
    migrations. The SQLite database is copied with the backup API (consistent while in use)."""
    import shutil
    import sqlite3

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.sqlite3", "*.sqlite3-*"))
    for db in Path(source).glob("*.sqlite3"):
        src, dst = sqlite3.connect(str(db)), sqlite3.connect(str(Path(target) / db.name))
        with dst:
            src.backup(dst)
        src.close()
        dst.close()


# -- helpers of the e2e tests ---------------------------------------------------------------
def import_tasks(ls_api, pid, texts) -> list:
    """Import text tasks; returns their ids in order."""
    before = {t["id"] for t in tasks_of(ls_api, pid)}
    ls_api.call("POST", f"/api/projects/{pid}/import", "importing tasks", json=[{"text": t} for t in texts])
    return sorted(t["id"] for t in tasks_of(ls_api, pid) if t["id"] not in before)


def tasks_of(ls_api, pid) -> list:
    data = ls_api.call("GET", "/api/tasks/", "listing tasks", params={"project": pid, "page_size": 1000})
    return data["tasks"] if isinstance(data, dict) else data


def fit_counts(metrics_text: str, event: str) -> dict:
    """{status: count} of the backend's fit() runs for `event`, and "queued": the training jobs
    queued or running, read from its /metrics (the whole server, every worker)."""
    counts = {"queued": None}
    for line in metrics_text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("lsdeploy_fit_total{") and f'event="{event}"' in name:
            status = name.split('status="', 1)[1].split('"', 1)[0]
            counts[status] = counts.get(status, 0) + int(float(value))
        elif name == "lsdeploy_fit_queue_depth":
            counts["queued"] = int(float(value))
    return counts


def wait_trained(get, fits: int, event: str, timeout: float = 120.0) -> dict:
    """Until the backend has run `fits` fit() calls for `event` and has nothing left queued; `get(path)`
    answers a GET on the backend (with its auth). A fit is counted once it returned, so this is the
    training itself done, not a side effect that can come first (a version bump after some of the
    events). Fails when any of those fits raised. Returns the counts (see fit_counts)."""
    from support import wait_for

    def done():
        resp = get("/metrics")
        resp.raise_for_status()
        counts = fit_counts(resp.text, event)
        ran = sum(v for k, v in counts.items() if k != "queued")
        return counts if ran >= fits and counts["queued"] == 0 else None

    counts = wait_for(done, timeout=timeout, interval=0.5, message=f"{fits} {event} fit() runs, none queued")
    assert counts.get("error", 0) == 0, f"{counts['error']} {event} fit() runs failed: {counts}"
    return counts


def wait_label_studio_version(ls_api, backend_id, version, timeout=60.0) -> str:
    """Until Label Studio shows `version` for the backend (each read of a backend re-reads /setup)."""
    from support import wait_for

    return wait_for(lambda: ls_api.get_backend(backend_id)["model_version"] == version and version,
                    timeout=timeout, interval=0.5, message=f"Label Studio to show model version {version} "
                                                           f"for backend {backend_id}")


class StubServer:
    """A local HTTP server on 127.0.0.1 that answers every request with one fixed `status`,
    `content_type` and `body`, and records the Authorization headers it received: stands where
    Label Studio or a backend should be, for the answers neither gives on purpose (a proxy's login
    page, a /health that answers 500)."""

    def __init__(self, status=200, content_type="application/json", body=b'{"email": "a@example.com"}'):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        stub = self
        self.authorizations = []

        class Handler(BaseHTTPRequestHandler):
            def answer(self):
                stub.authorizations.append(self.headers.get("Authorization"))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_DELETE = answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
