"""The interactive-ner blueprint against a real Label Studio 1.23.2: connected with `--interactive`,
asked as the labeling UI asks (`POST /api/ml/{id}/interactive-annotating`), then taught by an
annotation and asked for batch predictions."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from labelstudio_server import import_tasks, tasks_of, wait_label_studio_version, wait_trained
from support import run_cli
from test_labelstudio import retrieve_predictions  # asks until Label Studio stored one per task

pytestmark = pytest.mark.e2e

# Appended to the rendered model.py: every /predict body is written to requests.jsonl beside it, so
# the test sees exactly what Label Studio sent. The blueprint's own predict() answers.
RECORDER = '''

def _record(predict):
    import functools
    import json as _json
    import pathlib

    from flask import request

    @functools.wraps(predict)
    def recording(self, tasks, context=None, **kwargs):
        with open(pathlib.Path(__file__).with_name("requests.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(_json.dumps(request.get_json()) + "\\n")
        return predict(self, tasks, context=context, **kwargs)

    return recording


InteractiveNER.predict = _record(InteractiveNER.predict)
'''

TEXT = "Ada Lovelace wrote to Babbage. Babbage replied to Ada Lovelace in London; Ada Lovelace smiled."
NEW = ["In London, Babbage met Ada Lovelace.", "Nothing to see."]


def spans(prediction):
    return [(r["value"]["start"], r["value"]["end"], r["value"]["text"], r["value"]["labels"])
            for r in prediction["result"]]


def recorded(directory: Path) -> list:
    path = directory / "requests.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_interactive_ner_with_label_studio(label_studio, ls_api, project, backend):
    server = backend(blueprint="interactive-ner")
    directory = Path(server.directory)
    config = (directory / "label_config.xml").read_text()
    server.stop()  # the recorder goes in: the same blueprint, every request written down
    (directory / "model.py").write_text((directory / "model.py").read_text() + RECORDER)
    server.start()

    pid = project([TEXT], label_config=config)
    done = run_cli("connect", server.url, "--project", pid, "--interactive", "--json",
                   env={"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.legacy_token})
    assert done.returncode == 0, done.stderr
    (reg,) = json.loads(done.stdout)["registrations"]
    backend_id, first_version = reg["backend_id"], reg["model_version"]
    assert ls_api.get_backend(backend_id)["is_interactive"] is True

    # The user labels the first "Babbage" as PER; the editor has saved it in their draft.
    (task,) = tasks_of(ls_api, pid)
    start = TEXT.index("Babbage")
    region = {"id": "u1", "from_name": "label", "to_name": "text", "type": "labels", "origin": "manual",
              "value": {"start": start, "end": start + 7, "text": "Babbage", "labels": ["PER"]}}
    ls_api.call("POST", f"/api/tasks/{task['id']}/drafts", "saving a draft",
                json={"result": [region], "lead_time": 2.0})
    before = len(recorded(directory))
    answer = ls_api.call("POST", f"/api/ml/{backend_id}/interactive-annotating", "interactive annotating",
                         json={"task": task["id"], "context": {"result": [region]}})
    assert "errors" not in answer, answer
    # What Label Studio gives the editor: the other Babbage, same label, not the user's own region.
    data = answer["data"]
    second = TEXT.index("Babbage", start + 1)
    assert spans(data) == [(second, second + 7, "Babbage", ["PER"])]
    assert data["score"] == 1.0 and data["result"][0]["score"] == 1.0 and data["model_version"] == first_version

    # What Label Studio sent: the context as the UI gave it, the task with the user's draft.
    (sent,) = recorded(directory)[before:]
    assert sent["params"] == {"login": None, "password": None, "context": {"result": [region]}}
    assert sent["project"].startswith(f"{pid}.") and sent["label_config"] == config.strip()
    (sent_task,) = sent["tasks"]
    assert sent_task["id"] == task["id"] and sent_task["data"] == {"text": TEXT}
    assert [d["result"] for d in sent_task["drafts"]] == [[region]]
    assert {"annotations", "predictions", "drafts", "project"} <= set(sent_task)

    # The user submits the annotation: the webhook teaches the backend those spans.
    result = [region] + [
        {"from_name": "label", "to_name": "text", "type": "labels",
         "value": {"start": s, "end": s + len(t), "text": t, "labels": [label]}}
        for t, label, s in (("Ada Lovelace", "PER", 0), ("London", "LOC", TEXT.index("London")))]
    ls_api.call("POST", f"/api/tasks/{task['id']}/annotations/", "annotating", json={"result": result})
    wait_trained(lambda path: server.get(path, timeout=10), 1, "ANNOTATION_CREATED")
    version = server.get(f"/versions?project={pid}", timeout=10).json()["model_version"]
    assert version != first_version
    wait_label_studio_version(ls_api, backend_id, version)
    # "Start training": the backend re-reads the project's annotations from Label Studio; they are
    # what the webhook taught, so the model and its version stay.
    ls_api.train(backend_id)
    wait_trained(lambda path: server.get(path, timeout=10), 1, "START_TRAINING")
    assert server.get(f"/versions?project={pid}", timeout=10).json()["model_version"] == version
    assert "could not read annotations" not in server.log()

    # Batch pre-annotation of new tasks: the learned spans, with the new model version.
    new_ids = import_tasks(ls_api, pid, NEW)
    predictions = retrieve_predictions(ls_api, pid)
    (labelled,), (empty,) = (predictions[i] for i in new_ids)
    assert [(t, labels) for _, _, t, labels in spans(labelled)] == [
        ("London", ["LOC"]), ("Babbage", ["PER"]), ("Ada Lovelace", ["PER"])]
    assert all(NEW[0][s:e] == t for s, e, t, _ in spans(labelled))
    assert labelled["model_version"] == empty["model_version"] == version
    assert empty["result"] == [] and empty["score"] == 0.0
    batch = [b for b in recorded(directory) if b["params"]["context"] is None]
    assert batch, "no batch /predict was recorded"
