"""The whole loop against a real Label Studio (tests/labelstudio.sh installs and starts it):
connect, predictions, training from annotation webhooks and from START_TRAINING, basic auth,
interactive pre-annotation, failures, disconnect."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from labelstudio_server import StubServer, import_tasks, tasks_of, wait_label_studio_version, wait_trained
from lsdeploy.errors import EXIT_AUTH, EXIT_REGISTER, EXIT_USAGE
from support import free_port, run_cli, wait_for

pytestmark = pytest.mark.e2e

LABELS = {"Positive", "Negative", "Neutral"}
POSITIVE = ["good great wonderful", "great lovely happy day", "wonderful good film", "happy great joy"]
NEGATIVE = ["bad awful terrible", "terrible sad horrible day", "awful bad film", "horrible sad misery"]


def ls_env(label_studio, key=None, **extra):
    return {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": key or label_studio.legacy_token,
            **extra}


def connect(label_studio, url, *projects, key=None, args=(), env=None):
    done = run_cli("connect", url, *[a for p in projects for a in ("--project", p)], "--json", *args,
                   env=ls_env(label_studio, key, **(env or {})))
    return done


def choices(prediction) -> list:
    return [c for region in prediction["result"] for c in region["value"]["choices"]]


def retrieve_predictions(ls_api, pid, timeout=120.0) -> dict:
    """Ask Label Studio to fetch predictions for every task; returns {task id: [predictions]}.
    Label Studio stores none when its 1 s health check of the backend misses (a loaded machine),
    and each retrieval sends only the tasks still without one: repeat until every task has one."""
    def attempt():
        ls_api.call("POST", "/api/dm/actions", "retrieving predictions",
                    params={"id": "retrieve_tasks_predictions", "project": pid},
                    json={"selectedItems": {"all": True, "excluded": []}})
        found = {t["id"]: ls_api.call("GET", "/api/predictions", "listing predictions", params={"task": t["id"]})
                 for t in tasks_of(ls_api, pid)}
        return found if all(found.values()) else None

    return wait_for(attempt, timeout=timeout, interval=1.0, message=f"predictions for every task of project {pid}")


def annotate(ls_api, task_id, label):
    return ls_api.call("POST", f"/api/tasks/{task_id}/annotations/", "annotating", json={"result": [
        {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]})


def trained_version(server, pid, fits: int, event: str) -> str:
    """Once the backend has run `fits` fit() calls for `event` (none failed, none queued): the model
    version it now serves for project `pid`, the one that reflects all of those events."""
    wait_trained(lambda path: server.get(path, timeout=10), fits, event)
    return server.get(f"/versions?project={pid}", timeout=10).json()["model_version"]


def assert_clean(ls_api, pid):
    assert ls_api.backends(pid) == []
    assert ls_api.webhooks(pid) == []


def test_connect_with_legacy_key_and_personal_access_token(label_studio, ls_api, project, backend):
    server = backend()
    pid = project(["good", "bad"])

    done = connect(label_studio, server.url, pid)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    (reg,) = out["registrations"]
    assert (reg["state"], reg["created"], reg["project"]) == ("CO", True, pid)
    assert reg["model_version"] and reg["test_prediction"]["ok"]
    assert "legacy token" in done.stderr
    assert label_studio.legacy_token not in done.stdout + done.stderr

    # Same URL again with a personal access token: updated, never duplicated.
    done = connect(label_studio, server.url + "/", pid, key=label_studio.pat, args=["--title", "sentiment"])
    assert done.returncode == 0, done.stderr
    (again,) = json.loads(done.stdout)["registrations"]
    assert again["backend_id"] == reg["backend_id"] and again["created"] is False
    assert again["title"] == "sentiment" and again["state"] == "CO"
    assert "personal access token" in done.stderr
    assert label_studio.pat not in done.stdout + done.stderr
    assert [b["id"] for b in ls_api.backends(pid)] == [reg["backend_id"]]
    assert [h["url"] for h in ls_api.webhooks(pid)] == [server.url + "/webhook"]

    # Plain text output, options from the environment only.
    done = run_cli("connect", env=ls_env(label_studio, label_studio.pat, LSDEPLOY_BACKEND_URL=server.url,
                                         LABEL_STUDIO_PROJECT=str(pid)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"project {pid}: backend {reg['backend_id']} updated, state CO, model version "
                                   f"{reg['model_version']}, test prediction: ok")


def test_connect_errors_name_cause_and_fix(label_studio, ls_api, project, backend):
    server = backend()
    pid = project()

    bad = connect(label_studio, server.url, pid, key="not-a-valid-key-123")
    assert bad.returncode == EXIT_AUTH
    assert "refused the API key" in bad.stderr and "LABEL_STUDIO_API_KEY" in bad.stderr
    assert "not-a-valid-key-123" not in bad.stderr

    forged = label_studio.pat[:-4] + ("AAAA" if not label_studio.pat.endswith("AAAA") else "BBBB")
    bad = connect(label_studio, server.url, pid, key=forged)
    assert bad.returncode == EXIT_AUTH and "personal access token" in bad.stderr
    assert forged not in bad.stderr

    missing = connect(label_studio, server.url, 999999)
    assert missing.returncode == EXIT_USAGE
    assert "no project 999999" in missing.stderr and "--project" in missing.stderr

    # An unreachable URL: a clear message, nothing registered.
    dead = f"http://127.0.0.1:{free_port()}"
    done = connect(label_studio, dead, pid)
    assert done.returncode == EXIT_REGISTER, done.stderr
    assert "cannot reach the backend" in done.stderr and "health check failed" in done.stderr
    assert_clean(ls_api, pid)


def test_predictions_then_annotations_retrain(label_studio, ls_api, project, backend):
    server = backend()
    pid = project(POSITIVE + NEGATIVE)
    (reg,) = ls_api.register(server.url, [pid])
    first_version = reg.model_version

    # (2) One prediction per task, with the backend's model version and valid choices.
    predictions = retrieve_predictions(ls_api, pid)
    assert len(predictions) == len(POSITIVE + NEGATIVE)
    for task_id, preds in predictions.items():
        assert len(preds) == 1, (task_id, preds)
        assert preds[0]["model_version"] == first_version
        assert choices(preds[0]) and set(choices(preds[0])) <= LABELS

    # (3) Annotations reach the backend through the project webhook; fit retrains.
    tasks = {t["data"]["text"]: t["id"] for t in tasks_of(ls_api, pid)}
    for text in POSITIVE:
        annotate(ls_api, tasks[text], "Positive")
    for text in NEGATIVE:
        annotate(ls_api, tasks[text], "Negative")
    # Every annotation reached the backend (training runs after the webhook answered).
    latest = trained_version(server, pid, len(POSITIVE + NEGATIVE), "ANNOTATION_CREATED")
    assert "POST /webhook 401" not in server.log()
    assert latest != first_version
    wait_label_studio_version(ls_api, reg.backend_id, latest)

    # New tasks are predicted by the retrained model: its version, and the labels it learned.
    new_ids = import_tasks(ls_api, pid, [POSITIVE[0], NEGATIVE[0]])
    retrieved = retrieve_predictions(ls_api, pid)
    pos, neg = (retrieved[tid] for tid in new_ids)
    assert len(pos) == 1 and len(neg) == 1
    assert pos[0]["model_version"] == neg[0]["model_version"] == latest != first_version
    assert choices(pos[0]) == ["Positive"] and choices(neg[0]) == ["Negative"]


def test_start_training_fetches_annotations_from_label_studio(label_studio, ls_api, project, backend):
    """(4) POST /api/ml/{id}/train: START_TRAINING without annotations in the payload; the backend
    reads the project's annotations back through Label Studio's API (hostname/access_token of /setup)."""
    server = backend()
    pid = project(POSITIVE[:2] + NEGATIVE[:2])
    tasks = {t["data"]["text"]: t["id"] for t in tasks_of(ls_api, pid)}
    for text in POSITIVE[:2]:
        annotate(ls_api, tasks[text], "Positive")
    for text in NEGATIVE[:2]:
        annotate(ls_api, tasks[text], "Negative")  # before the backend exists: no webhook sees these
    (reg,) = ls_api.register(server.url, [pid])
    ls_api.train(reg.backend_id)
    version = trained_version(server, pid, 1, "START_TRAINING")
    assert version != reg.model_version
    wait_label_studio_version(ls_api, reg.backend_id, version)
    new_ids = import_tasks(ls_api, pid, [NEGATIVE[0]])
    preds = retrieve_predictions(ls_api, pid)[new_ids[0]]
    assert len(preds) == 1 and choices(preds[0]) == ["Negative"] and preds[0]["model_version"] == version


def test_basic_auth_backend(label_studio, ls_api, project, backend):
    """(5) Basic auth: Label Studio connects, predicts, and annotation webhooks carry the header."""
    auth = ("lsuser", "s3cret-backend-pass")
    server = backend(basic_auth=auth)
    pid = project(POSITIVE[:2] + NEGATIVE[:2])
    assert requests.post(server.url + "/webhook", json={"action": "PING"}, timeout=10).status_code == 401

    without = connect(label_studio, server.url, pid)
    assert without.returncode == EXIT_REGISTER
    assert "requires basic auth" in without.stderr and "BASIC_AUTH_USER" in without.stderr
    assert_clean(ls_api, pid)

    done = connect(label_studio, server.url, pid,
                   env={"BASIC_AUTH_USER": auth[0], "BASIC_AUTH_PASS": auth[1]})
    assert done.returncode == 0, done.stderr
    assert auth[1] not in done.stdout + done.stderr
    (reg,) = json.loads(done.stdout)["registrations"]
    assert reg["state"] == "CO" and reg["basic_auth"] is True
    (hook,) = ls_api.webhooks(pid)
    assert hook["headers"]["Authorization"].startswith("Basic ")

    predictions = retrieve_predictions(ls_api, pid)
    assert all(len(p) == 1 and set(choices(p[0])) <= LABELS for p in predictions.values())

    tasks = {t["data"]["text"]: t["id"] for t in tasks_of(ls_api, pid)}
    annotate(ls_api, tasks[POSITIVE[0]], "Positive")
    annotate(ls_api, tasks[NEGATIVE[0]], "Negative")
    version = trained_version(server, pid, 2, "ANNOTATION_CREATED")
    assert version != reg["model_version"]
    wait_label_studio_version(ls_api, reg["backend_id"], version)
    # The only 401 on /webhook is the unauthenticated probe above.
    assert server.log().count("POST /webhook 401") == 1


ECHO_MODEL = '''
from lsdeploy.model import LabelStudioMLBase


class Echo(LabelStudioMLBase):
    """Answers with the choice of the context it received (Neutral without one), and the number of
    context regions as its score: what Label Studio passed on is visible in the prediction."""

    def predict(self, tasks, context=None, **kwargs):
        regions = (context or {}).get("result") or []
        choice = regions[0]["value"]["choices"][0] if regions else "Neutral"
        return [{"result": [{"from_name": "sentiment", "to_name": "text", "type": "choices",
                             "value": {"choices": [choice]}}], "score": float(len(regions))} for _ in tasks]
'''


def test_interactive_preannotation(label_studio, ls_api, project, backend):
    """(6) Interactive pre-annotation: the context reaches the backend and its result comes back."""
    server = backend(blueprint="default", model_py=ECHO_MODEL)
    pid = project(["good and great"])
    (reg,) = ls_api.register(server.url, [pid], interactive=True)
    assert reg.is_interactive
    (task,) = tasks_of(ls_api, pid)
    resp = ls_api.call("POST", f"/api/ml/{reg.backend_id}/interactive-annotating", "interactive annotating",
                       json={"task": task["id"], "context": {"result": [
                           {"from_name": "sentiment", "to_name": "text", "type": "choices",
                            "value": {"choices": ["Negative"]}}]}})
    assert "errors" not in resp, resp
    assert choices(resp["data"]) == ["Negative"] and resp["data"]["score"] == 1.0
    assert resp["data"]["model_version"] == reg.model_version
    # Without a context the same task is predicted otherwise: the answer above came from the context.
    (plain,) = retrieve_predictions(ls_api, pid)[task["id"]]
    assert choices(plain) == ["Neutral"] and plain["score"] == 0.0


BROKEN_MODEL = '''
from lsdeploy.model import LabelStudioMLBase


class Broken(LabelStudioMLBase):
    def predict(self, tasks, context=None, **kwargs):
        raise RuntimeError("the model exploded on purpose")
'''


def test_backend_whose_predict_raises(label_studio, ls_api, project, backend):
    """(7) Label Studio reports the failure; the backend keeps serving; connect registers nothing."""
    server = backend(blueprint="default", model_py=BROKEN_MODEL)
    pid = project(["some text"])

    done = connect(label_studio, server.url, pid)
    assert done.returncode == EXIT_REGISTER
    assert "test prediction failed" in done.stderr and "nothing was registered" in done.stderr
    # Label Studio only says "did not return any predictions"; the backend's own reason is quoted.
    assert "the backend answered 500: RuntimeError: the model exploded on purpose" in done.stderr
    assert_clean(ls_api, pid)

    (reg,) = ls_api.register(server.url, [pid], verify=False)
    test = ls_api.test_prediction(reg.backend_id)
    assert not test["ok"] and "did not return any predictions" in test["detail"]
    assert requests.get(server.url + "/health", timeout=10).json()["status"] == "UP"
    direct = requests.post(server.url + "/predict", json={"tasks": [{"id": 1, "data": {"text": "x"}}],
                                                          "label_config": "<View/>"}, timeout=30)
    assert direct.status_code >= 400 and "exploded" in direct.text and direct.headers["Content-Type"].startswith(
        "application/json")
    assert ls_api.verify(reg.backend_id, test_prediction=False).state == "CO"


def test_disconnect_leaves_nothing_behind(label_studio, ls_api, project, backend):
    """(8) disconnect by URL and by backend id, across projects."""
    server = backend(basic_auth=("u", "p4ss"))
    first, second = project(), project()
    (a, b) = ls_api.register(server.url, [first, second], basic_auth=("u", "p4ss"))
    assert a.backend_id != b.backend_id

    done = run_cli("disconnect", server.url, "--project", first, "--json", env=ls_env(label_studio, label_studio.pat))
    assert done.returncode == 0, done.stderr
    (removed,) = json.loads(done.stdout)["removed"]
    assert removed["backend_ids"] == [a.backend_id] and len(removed["webhook_ids"]) == 1
    assert_clean(ls_api, first)

    # An id from another project than the one given: said so, nothing removed.
    wrong = run_cli("disconnect", "--backend-id", b.backend_id, "--project", first, env=ls_env(label_studio))
    assert wrong.returncode == EXIT_USAGE, wrong.stderr
    assert f"backend {b.backend_id} belongs to project {second}, not project {first}" in wrong.stderr
    assert [x["id"] for x in ls_api.backends(second)] == [b.backend_id]

    done = run_cli("disconnect", "--backend-id", b.backend_id, env=ls_env(label_studio, LABEL_STUDIO_PROJECT=str(second)))
    assert done.returncode == 0, done.stderr
    assert_clean(ls_api, second)

    again = run_cli("disconnect", server.url, "--project", second, env=ls_env(label_studio))
    assert again.returncode == 0 and "nothing to remove" in again.stdout
    gone = run_cli("disconnect", "--backend-id", b.backend_id, env=ls_env(label_studio))
    assert gone.returncode == 0 and f"no ML backend {b.backend_id} (nothing to remove)" in gone.stdout


def test_disconnect_by_id_uses_the_backends_project(label_studio, ls_api, project, backend):
    server = backend()
    pid = project()
    (reg,) = ls_api.register(server.url, [pid])
    done = run_cli("disconnect", "--backend-id", reg.backend_id, "--json", env=ls_env(label_studio))
    assert done.returncode == 0, done.stderr
    (removed,) = json.loads(done.stdout)["removed"]
    assert removed["project"] == pid and removed["backend_ids"] == [reg.backend_id]
    assert_clean(ls_api, pid)


def test_personal_access_token_is_exchanged_and_renewed(label_studio):
    from lsdeploy.labelstudio import LabelStudio

    client = LabelStudio(label_studio.url, label_studio.pat)
    assert client.key_kind == "personal access token"
    assert label_studio.pat not in repr(client)
    assert client.whoami()["email"]
    first = client._LabelStudio__access
    assert first and first != label_studio.pat

    client._LabelStudio__access_expires = 0  # expired: exchanged again before the next call
    client.whoami()
    second = client._LabelStudio__access
    assert second != first

    client._LabelStudio__access = second[:-6] + "xxxxxx"  # refused (401): renewed once, then retried
    assert client.whoami()["email"]
    assert client._LabelStudio__access not in (second, second[:-6] + "xxxxxx")

    # A short-lived access token given directly is used as it is.
    direct = LabelStudio(label_studio.url, client._LabelStudio__access)
    assert direct.key_kind == "access token" and direct.whoami()["email"]


@pytest.mark.parametrize("ml_block_local_ip, ssrf_protection", [
    (True, True),   # Label Studio's defaults: the backend is refused
    (False, True),  # backend calls allowed, its auto-created webhook refused
])
def test_ssrf_settings_are_named(label_studio_with, backend, ml_block_local_ip, ssrf_protection):
    """A Label Studio that refuses a backend (or its webhook) on 127.0.0.1: the message says which
    Label Studio setting allows it, and nothing is registered."""
    from lsdeploy.labelstudio import LabelStudio

    ls = label_studio_with(ml_block_local_ip=ml_block_local_ip, ssrf_protection=ssrf_protection)
    server = backend(blueprint="default")
    api = LabelStudio(ls.url, ls.legacy_token)
    pid = api.call("POST", "/api/projects/", "creating a project", json={"title": "ssrf check"})["id"]
    done = connect(ls, server.url, pid)
    assert done.returncode == EXIT_REGISTER, done.stderr
    assert "ML_BLOCK_LOCAL_IP=false" in done.stderr and "SSRF_PROTECTION_ENABLED=false" in done.stderr
    if not ml_block_local_ip:
        assert "refused its webhook" in done.stderr and "nothing was registered" in done.stderr
    assert api.backends(pid) == [] and api.webhooks(pid) == []


FILE_CONFIG = """<View><Image name="image" value="$image"/>
<Choices name="kind" toName="image"><Choice value="png"/><Choice value="other"/></Choices></View>"""

FILE_MODEL = '''
from lsdeploy import LabelStudioMLBase


class FileReader(LabelStudioMLBase):
    """Reads each task's uploaded file through Label Studio (its address and key come from /setup)."""

    def predict(self, tasks, context=None, **kwargs):
        out = []
        for task in tasks:
            with open(self.get_local_path(task["data"]["image"], task_id=task["id"]), "rb") as handle:
                data = handle.read()
            kind = "png" if data.startswith(b"\\x89PNG") else "other"
            out.append({"result": [{"from_name": "kind", "to_name": "image", "type": "choices",
                                    "value": {"choices": [kind]}}], "score": len(data) / 1e6})
        return out
'''

PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"
       b"\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82")


@pytest.mark.parametrize("kind", ["legacy", "pat"])
def test_backend_reads_uploaded_files_with_what_setup_sends(label_studio, ls_api, project, backend, kind):
    """A task file uploaded to Label Studio is read by the backend with the address and key Label
    Studio sends in /setup: the backend's own environment has neither."""
    server = backend(blueprint="default", model_py=FILE_MODEL)
    pid = project(label_config=FILE_CONFIG)
    resp = requests.post(f"{label_studio.url}/api/projects/{pid}/import", files={"file": ("dot.png", PNG, "image/png")},
                         headers={"Authorization": f"Token {label_studio.legacy_token}"}, timeout=60)
    assert resp.status_code == 201, resp.text
    (task,) = tasks_of(ls_api, pid)
    assert task["data"]["image"].startswith("/data/upload/")

    done = connect(label_studio, server.url, pid, key=label_studio.pat if kind == "pat" else None)
    assert done.returncode == 0, done.stderr
    predictions = retrieve_predictions(ls_api, pid, timeout=60)
    (prediction,) = predictions[task["id"]]
    assert choices(prediction) == ["png"] and prediction["score"] == pytest.approx(len(PNG) / 1e6)
    assert label_studio.legacy_token not in server.log() and label_studio.pat not in server.log()


def test_task_files_with_a_personal_access_token_and_a_refused_setup_key(label_studio, ls_api, project, tmp_path,
                                                                         monkeypatch):
    """The key in the backend's environment may be a personal access token (exchanged, never sent
    as it is), and it is the fallback when Label Studio refuses the key /setup sent."""
    from lsdeploy.taskdata import TaskDataError, get_local_path

    pid = project(label_config=FILE_CONFIG)
    resp = requests.post(f"{label_studio.url}/api/projects/{pid}/import", files={"file": ("dot.png", PNG, "image/png")},
                         headers={"Authorization": f"Token {label_studio.legacy_token}"}, timeout=60)
    assert resp.status_code == 201, resp.text
    (task,) = tasks_of(ls_api, pid)
    url = task["data"]["image"]
    with pytest.raises(TaskDataError, match=r"refused \(401\)"):
        get_local_path(url, label_studio_url=label_studio.url, token="not-a-key", cache_dir=str(tmp_path / "a"))
    path = get_local_path(url, label_studio_url=label_studio.url, token=label_studio.pat, cache_dir=str(tmp_path / "b"))
    assert open(path, "rb").read() == PNG
    path = get_local_path(url, label_studio_url=label_studio.url, token="expired-or-revoked",
                          fallback_token=label_studio.pat, cache_dir=str(tmp_path / "c"))
    assert open(path, "rb").read() == PNG


def test_failed_multi_project_connect_registers_nothing(label_studio, ls_api, project, backend):
    """The text classifier fits project 1 and not project 2 (an Image config): connect fails on
    project 2, quotes the backend's reason, and removes what it had created in project 1."""
    server = backend()
    text, image = project(["good"]), project(label_config=FILE_CONFIG)

    done = connect(label_studio, server.url, text, image)
    assert done.returncode == EXIT_REGISTER, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert f"failed Label Studio's /setup call for project {image}" in error
    assert "; the backend answered 400: label config has no choices control tag" in error
    assert "removed again what this run had created before: backend " in error and f"in project {text}" in error
    assert_clean(ls_api, text)
    assert_clean(ls_api, image)

    # A backend that was already there is updated, not removed: the line says which one.
    (reg,) = ls_api.register(server.url, [text])
    done = connect(label_studio, server.url, text, image)
    assert done.returncode == EXIT_REGISTER, done.stderr
    assert (f"updated before this failure, keeping the new settings: backend {reg.backend_id} in project {text}"
            in done.stderr)
    assert [b["id"] for b in ls_api.backends(text)] == [reg.backend_id] and ls_api.backends(image) == []


PICKY_MODEL = '''
from pathlib import Path

from lsdeploy.model import LabelStudioMLBase

REFUSE = Path(__file__).resolve().parent / "refuse-extra-params"


class Picky(LabelStudioMLBase):
    def setup(self):
        if "<Image" in (self.label_config or ""):
            raise ValueError("this model reads text; the label config has an Image")

    def set_extra_params(self, extra_params):
        if REFUSE.exists():
            raise ValueError("extra params are refused since refuse-extra-params exists")
        super().set_extra_params(extra_params)

    def predict(self, tasks, context=None, **kwargs):
        return [{"result": [{"from_name": "sentiment", "to_name": "text", "type": "choices",
                             "value": {"choices": ["Neutral"]}}], "score": 0.5} for _ in tasks]
'''


def test_setup_failures_quote_the_backend(label_studio, ls_api, project, backend):
    """Label Studio reports a failed /setup as "500 Server Error ... for url"; connect repeats the
    call and quotes the backend's own reason, both when Label Studio refuses to register (400) and
    when it registers the backend and then shows it in state ER."""
    server = backend(blueprint="default", model_py=PICKY_MODEL)
    image = project(label_config=FILE_CONFIG)
    done = connect(label_studio, server.url, image)
    assert done.returncode == EXIT_REGISTER, done.stderr
    assert f"failed Label Studio's /setup call for project {image}" in done.stderr
    assert "the backend answered 500: ValueError: this model reads text; the label config has an Image" in done.stderr
    assert_clean(ls_api, image)

    # State ER: Label Studio checks a PATCH with the extra params it was sent (none), then calls
    # /setup with those it stores, which the backend now refuses.
    text = project(["good"])
    (reg,) = ls_api.register(server.url, [text], extra_params={"threshold": 0.5})
    (Path(server.directory) / "refuse-extra-params").write_text("")
    done = connect(label_studio, server.url, text)
    assert done.returncode == EXIT_REGISTER, done.stderr
    assert f"Label Studio reports an error for the backend {server.url} in project {text}" in done.stderr
    assert "the backend answered 500: ValueError: extra params are refused" in done.stderr
    assert f"backend {reg.backend_id} stays registered" in done.stderr


def test_health_answering_500_is_the_backends_answer(label_studio, ls_api, project):
    """A /health that answers 500 is not "cannot reach": Label Studio reached it; its own error is quoted."""
    down = StubServer(status=500, body=b'{"status": "DOWN", "error": "model file missing"}')
    try:
        pid = project()
        done = connect(label_studio, down.url, pid)
    finally:
        down.close()
    assert done.returncode == EXIT_REGISTER, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert f"reached the backend at {down.url} but its /health answered 500: model file missing;" in error
    assert "check the backend's log" in error
    assert "cannot reach" not in error
    assert_clean(ls_api, pid)


NO_VERSION_MODEL = '''
from lsdeploy.model import LabelStudioMLBase


class NoVersion(LabelStudioMLBase):
    @property
    def model_version(self):
        return ""

    def predict(self, tasks, context=None, **kwargs):
        return []
'''


def test_empty_model_version_fails_the_check(label_studio, ls_api, project, backend):
    server = backend(blueprint="default", model_py=NO_VERSION_MODEL)
    pid = project()
    done = connect(label_studio, server.url, pid)
    assert done.returncode == EXIT_REGISTER, done.stderr
    assert f"Label Studio shows no model version for the backend {server.url} in project {pid}" in done.stderr
    assert "(its /setup answers '' here)" in done.stderr and "nothing was registered" in done.stderr
    assert_clean(ls_api, pid)
