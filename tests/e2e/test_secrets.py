"""Secrets never leak: start, connect, preview and deploy run with recognisable secret values,
and none of them appears in a log line, CLI output, error message, child-process argv, rendered
file, the backend's state directory (.lsdeploy), uploaded source, or plain environment value sent
to Cloud Run; failures (a refused key, a revision that cannot start) included."""
from __future__ import annotations

import json
import os
import tarfile
import threading
import time

import pytest
import requests

from gcs_emulator import GCSEmulator
from labelstudio_server import LEGACY_TOKEN
from support import Server, TEXT_CONFIG, predict_body, run_cli, text_task

pytestmark = pytest.mark.e2e

BASIC_PASS = "bap-SECRET-0f9e8d7c6b5a"
WRONG_KEY = "lsk-WRONG-SECRET-31d2c4"


class ArgvWatch:
    """Scans every process's argv while commands run; records any that holds a secret."""

    def __init__(self, secrets):
        self.secrets = [s.encode() for s in secrets]
        self.hits, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._scan, daemon=True)

    def _scan(self):
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    argv = open(f"/proc/{pid}/cmdline", "rb").read()
                except OSError:
                    continue
                if any(s in argv for s in self.secrets):
                    self.hits.append(argv.replace(b"\0", b" ")[:200])
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def assert_clean(text, secrets, where):
    for secret in secrets:
        assert secret not in text, f"a secret appears in {where}"


def test_no_secret_leaks_anywhere(label_studio, project, make_gcp_fakes, tmp_path):
    pat = label_studio.pat
    secrets = [LEGACY_TOKEN, pat, BASIC_PASS, WRONG_KEY]
    directory = tmp_path / "sentiment"
    assert run_cli("create", directory, "--blueprint", "text-classifier").returncode == 0
    pid = project(["good great", "bad awful"])
    outputs = []

    with ArgvWatch(secrets) as watch:
        # the watch sees a secret on a command line (so its silence below means something)
        import subprocess
        import sys

        subprocess.run([sys.executable, "-c", "import time; time.sleep(0.3)", BASIC_PASS], check=True)
        assert watch.hits, "the argv watch works"
        watch.hits.clear()
        # start: basic auth from the environment, Label Studio's key arriving in /setup
        server = Server(directory, env={"BASIC_AUTH_USER": "labelstudio", "BASIC_AUTH_PASS": BASIC_PASS},
                        auth=("labelstudio", BASIC_PASS)).start()
        try:
            server.post("/setup", json={"project": f"{pid}.1", "schema": TEXT_CONFIG, "hostname": label_studio.url,
                                        "access_token": LEGACY_TOKEN})
            bad = requests.post(server.url + "/predict", json=predict_body([text_task(1, "x")]),
                                auth=("labelstudio", WRONG_KEY), timeout=30)
            assert bad.status_code == 401
            outputs.append(bad.text)
            server.post("/predict", json=predict_body([text_task(1, "good")]),
                        headers={"X-Api-Key": LEGACY_TOKEN})
            server.post("/webhook", json={"action": "START_TRAINING", "project": {"id": pid, "label_config": TEXT_CONFIG}})

            # connect (a personal access token), and a refused key
            env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": pat,
                   "BASIC_AUTH_USER": "labelstudio", "BASIC_AUTH_PASS": BASIC_PASS}
            done = run_cli("connect", server.url, "--project", pid, "--json", env=env, timeout=300)
            assert done.returncode == 0, done.stderr
            outputs += [done.stdout, done.stderr]
            refused = run_cli("connect", server.url, "--project", pid, env={**env, "LABEL_STUDIO_API_KEY": WRONG_KEY})
            assert refused.returncode == 3
            outputs += [refused.stdout, refused.stderr]
            done = run_cli("disconnect", server.url, "--project", pid, env=env, timeout=300)
            assert done.returncode == 0, done.stderr
            outputs += [done.stdout, done.stderr]
        finally:
            server.stop()
        outputs.append(server.log())

        # preview with the key in the environment and the label config from the project
        done = run_cli("preview", directory, "--project", pid, "--label-studio-host", label_studio.url, "--json",
                       env={"LABEL_STUDIO_API_KEY": LEGACY_TOKEN}, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        outputs += [done.stdout, done.stderr]
        refused = run_cli("preview", directory, "--project", pid, "--label-studio-host", label_studio.url,
                          env={"LABEL_STUDIO_API_KEY": WRONG_KEY}, timeout=300)
        assert refused.returncode == 3, refused.stdout + refused.stderr
        outputs += [refused.stdout, refused.stderr]

        # deploy to the fakes; the generated basic-auth password is read back from Secret Manager
        gcs = GCSEmulator(tmp_path / "fake-gcs").start()
        try:
            cloud = make_gcp_fakes(runner=True, storage_url=gcs.url)
            env = {**cloud.env, "GCP_PROJECT": "secret-project", "GCP_REGION": "us-central1",
                   "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN,
                   "LSDEPLOY_MIN_INSTANCES": "0"}
            done = run_cli("deploy", "gcp", directory, "--project", pid, "--json", env=env, timeout=600)
            assert done.returncode == 0, done.stderr
            outputs += [done.stdout, done.stderr]
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            client = storage.Client(project="secret-project", credentials=AnonymousCredentials(),
                                    client_options={"api_endpoint": gcs.url})
            generated = []
            for entry in cloud.log.filter(api="secretmanager", method="AddSecretVersion"):
                data = entry.body.get("payload", {}).get("data")
                if data:
                    import base64

                    generated.append(base64.b64decode(data).decode())
            assert LEGACY_TOKEN in generated, "the Label Studio key went to Secret Manager"
            service_secrets = [s for s in generated if s != LEGACY_TOKEN]
            assert service_secrets, "a basic-auth password was generated"
            all_secrets = secrets + service_secrets
            # no plain env value sent to Cloud Run holds a secret
            sent_env = [var for entry in cloud.log.filter(api="run")
                        for container in (entry.body or {}).get("template", {}).get("containers", [])
                        for var in container.get("env", [])]
            assert any(var.get("valueSource") for var in sent_env), "secret references were sent"
            for entry in cloud.log.filter(api="run"):
                for container in (entry.body or {}).get("template", {}).get("containers", []):
                    for var in container.get("env", []):
                        assert_clean(var.get("value", ""), all_secrets, f"Cloud Run env {var.get('name')}")
                assert_clean(json.dumps(entry.body or {}), all_secrets, f"a Cloud Run request ({entry.method})")
            for entry in cloud.log.filter(api="cloudbuild"):
                assert_clean(json.dumps(entry.body or {}), all_secrets, "a Cloud Build request")
            # the uploaded source bundle and the rendered files hold none
            for bucket in client.list_buckets():
                for blob in client.list_blobs(bucket.name):
                    if blob.name.endswith((".tar.gz", ".tgz")):
                        local = tmp_path / "bundle.tgz"
                        blob.download_to_filename(str(local))
                        with tarfile.open(local) as archive:
                            for member in archive.getmembers():
                                if member.isfile():
                                    text = archive.extractfile(member).read().decode("utf-8", "replace")
                                    assert_clean(text, all_secrets, f"bundled file {member.name}")

            # failing deploys: a refused key, and a revision that cannot start while its process
            # holds the key and the basic-auth password (its log tail is what deploy shows)
            refused = run_cli("deploy", "gcp", directory, "--project", pid, env={**env, "LABEL_STUDIO_API_KEY": WRONG_KEY},
                              timeout=300)
            assert refused.returncode == 3, refused.stdout + refused.stderr
            outputs += [refused.stdout, refused.stderr]
            model_py = directory / "model.py"
            model_py.write_text(model_py.read_text() + "\nimport os\nif os.environ.get('K_SERVICE'):\n"
                                "    raise RuntimeError('this revision cannot start')\n")
            failed = run_cli("deploy", "gcp", directory, "--project", pid, env=env, timeout=600)
            assert failed.returncode == 5, failed.stdout + failed.stderr
            assert "this revision cannot start" in failed.stdout + failed.stderr, "the revision's log tail is shown"
            outputs += [failed.stdout, failed.stderr]
        finally:
            gcs.stop()
        time.sleep(0.1)

    state = [path for path in (directory / ".lsdeploy").rglob("*") if path.is_file()]
    assert state, "the backend kept state in .lsdeploy (so scanning it means something)"
    for path in directory.rglob("*"):
        if path.is_file():
            assert_clean(path.read_bytes().decode("utf-8", "replace"), all_secrets, f"file {path.relative_to(directory)}")
    for text in outputs:
        assert_clean(text, all_secrets, "CLI output or a server log")
    assert watch.hits == [], f"secrets in child-process argv: {watch.hits}"
