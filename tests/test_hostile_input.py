"""Hostile or broken input gets a JSON 4xx naming the field and the rule, never a 500 with
server details (issue 17): project ids, `params` that clash with predict()'s arguments, numbers
JSON does not have, a /setup naming another Label Studio, a task file the address rules refuse.
In-process (Flask's test client) and under a real gunicorn process."""
from __future__ import annotations

import json

import pytest

from lsdeploy import LabelStudioMLBase, create_app
from lsdeploy.state import SQLiteStore
from support import TEXT_CONFIG, Server, predict_body, text_task


class Files(LabelStudioMLBase):
    """Reads each task's text from the URL it holds (as image or audio backends do)."""

    def predict(self, tasks, context=None, **kwargs):
        out = []
        for task in tasks:
            text = task["data"]["text"]
            if text.startswith("http"):
                self.get_local_path(text, task_id=task["id"])
            out.append({"result": [], "score": 0.5})
        return out


@pytest.fixture
def client(model_dir):
    return create_app(Files, store=SQLiteStore(str(model_dir))).test_client()


@pytest.mark.parametrize("project", ["\ud800", "x" * 129, "a/b", "a:b", "a b.1700000000", "é"])
def test_a_project_id_outside_the_rule_is_a_400_naming_it(client, project):
    for path, body in (("/setup", {"project": project, "schema": TEXT_CONFIG}),
                       ("/predict", predict_body([text_task(1, "a")], project=project)),
                       ("/webhook", {"action": "START_TRAINING", "project": {"id": project}})):
        resp = client.post(path, data=json.dumps(body), content_type="application/json")
        assert resp.status_code == 400, (path, resp.get_data(as_text=True))
        assert "at most 128 letters, digits, '_' or '-'" in resp.json["error"]


def test_project_ids_label_studio_sends_are_taken(client):
    for project in ("3.1700000000", 3, "my_project-2", "x" * 128):
        assert client.post("/setup", json={"project": project, "schema": TEXT_CONFIG}).status_code == 200


@pytest.mark.parametrize("key", ["tasks", "self", "context"])
def test_params_that_clash_with_predicts_arguments_are_a_400(client, key):
    body = predict_body([text_task(1, "a")])
    body["params"] = {key: 1} if key != "context" else {"context": 5}
    resp = client.post("/predict", json=body)
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert key in resp.json["error"]


@pytest.mark.parametrize("raw", ['{"project": "1", "extra_params": {"t": NaN}}',
                                 '{"project": "1", "extra_params": {"t": Infinity}}',
                                 '{"project": "1", "extra_params": {"t": -Infinity}}'])
def test_numbers_json_does_not_have_are_a_400(client, raw):
    resp = client.post("/setup", data=raw, content_type="application/json")
    assert resp.status_code == 400 and "is not a JSON number" in resp.json["error"]


def test_a_number_too_large_to_store_is_a_400_naming_extra_params(client):
    resp = client.post("/setup", data='{"project": "1", "extra_params": {"t": 1e999}}',
                       content_type="application/json")
    assert resp.status_code == 400 and "'extra_params'" in resp.json["error"] and "1e999" in resp.json["error"]


def test_a_refused_task_file_costs_one_empty_prediction_not_the_batch(client):
    tasks = [text_task(1, "plain"), text_task(2, "http://169.254.169.254/latest/meta-data/"), text_task(3, "ok")]
    resp = client.post("/predict", json=predict_body(tasks))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    first, refused, third = resp.json["results"]
    assert first["score"] == 0.5 and third["score"] == 0.5
    assert refused["result"] == [] and refused["error"].startswith("task 2: ")
    assert "169.254.169.254" in refused["error"] and refused["model_version"]


def test_a_setup_naming_another_label_studio_is_ignored_when_label_studio_url_is_set(monkeypatch):
    from lsdeploy import taskdata

    monkeypatch.setenv("LABEL_STUDIO_URL", "https://ls.example.com")
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    taskdata.remember("41", "http://10.0.0.5:8080", "stolen-key")
    assert taskdata.connection("41") == taskdata.Connection("https://ls.example.com", None)
    taskdata.remember("42", "https://ls.example.com/", "good-key")  # the same origin: kept
    assert taskdata.connection("42") == taskdata.Connection("https://ls.example.com", "good-key")


def test_start_warns_that_setup_can_name_any_host_without_label_studio_url(monkeypatch):
    from lsdeploy.serve import ServeSettings, exposure_warning

    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_HOST", raising=False)
    settings = ServeSettings(directory=".", host="0.0.0.0", port=9090)
    assert "name any host as Label Studio in /setup" in exposure_warning(settings)
    monkeypatch.setenv("LABEL_STUDIO_URL", "https://ls.example.com")
    assert "/setup" not in exposure_warning(settings)


def test_hostile_input_under_gunicorn_is_json_4xx_and_leaves_the_server_up(tmp_path):
    (tmp_path / "model.py").write_text("from lsdeploy.model import LabelStudioMLBase\n"
                                       "class A(LabelStudioMLBase):\n"
                                       "    def predict(self, tasks, context=None, **kwargs):\n"
                                       "        return [{'result': [], 'score': 0.1} for _ in tasks]\n")
    with Server(tmp_path, env={"MODEL_DIR": str(tmp_path / "state")}) as server:
        cases = [
            ("/setup", '{"project": "\\ud800", "schema": null}'),
            ("/setup", json.dumps({"project": "p" * 300})),
            ("/predict", json.dumps({**predict_body([text_task(1, "a")]), "params": {"tasks": []}})),
            ("/setup", '{"project": "1", "extra_params": {"t": NaN}}'),
            ("/setup", '{"project": "1", "extra_params": {"t": 1e999}}'),
        ]
        for path, raw in cases:
            resp = server.request("POST", path, data=raw, headers={"Content-Type": "application/json"})
            assert resp.status_code == 400 and resp.headers["Content-Type"].startswith("application/json"), raw
            body = resp.json()
            assert set(body) == {"status", "error"} and body["status"] == 400
            assert str(tmp_path) not in body["error"] and "Traceback" not in body["error"]
        assert server.get("/health").status_code == 200
