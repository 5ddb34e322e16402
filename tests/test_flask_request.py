"""Model code that reads flask.request, as the reference SDK allows (one of its examples takes
Label Studio's address and key from the /setup body that way): the body is readable in setup(),
predict() and fit(), through Flask's test client and under a real gunicorn process."""
from __future__ import annotations

import pytest

from lsdeploy import create_app
from lsdeploy.state import SQLiteStore
from labelstudio_server import wait_trained
from support import TEXT_CONFIG, Server, annotation_event, predict_body, text_task

MODEL = '''
import flask
from lsdeploy.model import LabelStudioMLBase


class Peeker(LabelStudioMLBase):
    """Answers with what it read from flask.request: the setup body's hostname, and in predict
    the task count from get_json() and the length of get_data()."""

    def setup(self):
        body = flask.request.get_json(silent=True) or {}
        if body.get("hostname"):
            self.set("seen_hostname", body["hostname"])

    def predict(self, tasks, context=None, **kwargs):
        body = flask.request.get_json()
        raw = flask.request.get_data()
        note = f"{len(body['tasks'])} tasks, {len(raw)} bytes, hostname {self.get('seen_hostname')}"
        return [{"result": [{"from_name": "sentiment", "to_name": "text", "type": "choices",
                             "value": {"choices": ["Neutral"]}}], "score": 0.5, "note": note} for _ in tasks]

    def fit(self, event, data, **kwargs):
        self.set("fit_saw", flask.request.get_json()["annotation"]["id"])
        return {"ok": True}
'''


def load_peeker(tmp_path):
    from lsdeploy.loader import load_model_class

    directory = tmp_path / "peeker"
    directory.mkdir()
    (directory / "model.py").write_text(MODEL)
    return directory, load_model_class(str(directory))


def exercise(post):
    setup = post("/setup", {"project": "3.1700000000", "schema": TEXT_CONFIG,
                            "hostname": "http://ls.example.com:8080", "access_token": "k", "extra_params": {}})
    assert setup.status_code == 200, setup.text
    body = predict_body([text_task(1, "a"), text_task(2, "b")], project="3.1700000000")
    resp = post("/predict", body)
    assert resp.status_code == 200, resp.text
    (first, _) = resp.json()["results"]
    assert first["note"].startswith("2 tasks, ") and first["note"].endswith(", hostname http://ls.example.com:8080")
    assert int(first["note"].split(", ")[1].split()[0]) > 100  # the whole body, not an empty read
    hook = post("/webhook", annotation_event(1, 77, "a", "Positive", project=3))
    assert hook.status_code in (201, 202), hook.text


def test_flask_request_in_model_code_with_the_test_client(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("FIT_WAIT_SECONDS", "20")
    _, model_class = load_peeker(tmp_path)
    store = SQLiteStore(str(model_dir))
    client = create_app(model_class, store=store).test_client()

    class Answer:
        def __init__(self, resp):
            self.status_code, self.text = resp.status_code, resp.get_data(as_text=True)
            self.json = lambda: resp.json

    exercise(lambda path, body: Answer(client.post(path, json=body)))
    assert store.get("3", "fit_saw") == 77


@pytest.mark.parametrize("fit_wait", ["20", "0"])  # fit within the webhook, and on the training thread after it
def test_flask_request_in_model_code_under_gunicorn(tmp_path, fit_wait):
    directory, _ = load_peeker(tmp_path)
    with Server(directory, env={"FIT_WAIT_SECONDS": fit_wait, "MODEL_DIR": str(tmp_path / "state")}) as server:
        exercise(lambda path, body: server.post(path, body))
        counts = wait_trained(lambda path: server.get(path, timeout=10), 1, "ANNOTATION_CREATED", timeout=60)
        assert counts.get("ok") == 1 and "fit failed" not in server.log()
    assert SQLiteStore(str(tmp_path / "state")).get("3", "fit_saw") == 77
