"""What `connect` sets in a real Label Studio, and what it leaves: the project's prediction choice
that the Data Manager's "Prediction score" column needs (before, after, and after the model
retrains), backend settings made in Label Studio that a second connect keeps, and training that
Label Studio triggers twice when "Start model training on annotation submission" is on."""
from __future__ import annotations

import json

import pytest

from labelstudio_server import tasks_of, wait_label_studio_version
from lsdeploy.model import next_version
from support import wait_for
from test_labelstudio import NEGATIVE, POSITIVE, annotate, connect, trained_version

pytestmark = pytest.mark.e2e


def dm_scores(ls_api, pid) -> dict:
    """{task id: its "Prediction score"}, as the Data Manager's task list gives it to the UI's column
    (GET /api/tasks?project=P&fields=all: each task's predictions_score)."""
    data = ls_api.call("GET", "/api/tasks", "reading the Data Manager's tasks",
                       params={"project": pid, "fields": "all", "page_size": 1000})
    return {t["id"]: t["predictions_score"] for t in (data["tasks"] if isinstance(data, dict) else data)}


def predictions_of(ls_api, pid, version) -> dict:
    """Have Label Studio retrieve predictions (Data Manager > Actions > Retrieve Predictions) until every
    task has one of `version`; {task id: that prediction's score}. A retrieval stores nothing when
    Label Studio's 1 s health check of the backend misses, so it is repeated."""
    def attempt():
        ls_api.call("POST", "/api/dm/actions", "retrieving predictions",
                    params={"id": "retrieve_tasks_predictions", "project": pid},
                    json={"selectedItems": {"all": True, "excluded": []}})
        found = {}
        for task in tasks_of(ls_api, pid):
            scores = [p["score"] for p in ls_api.call("GET", "/api/predictions", "listing predictions",
                                                      params={"task": task["id"]}) if p["model_version"] == version]
            if not scores:
                return None
            found[task["id"]] = scores[0]
        return found

    return wait_for(attempt, timeout=120, interval=1.0, message=f"predictions of {version} for project {pid}")


def test_scores_show_after_connect_and_follow_a_retrained_model_after_connect_again(ls_api, label_studio, project,
                                                                                    backend):
    server = backend()
    pid = project(POSITIVE[:2] + NEGATIVE[:2])

    # Before: added as in Label Studio's UI, the project uses the backend's title ("live"), which no
    # prediction carries: the score column is empty although every task has a prediction.
    added = ls_api.call("POST", "/api/ml/", "adding the backend", json={"url": server.url, "project": pid,
                                                                        "title": "sentiment"})
    reg = ls_api.verify(added["id"], test_prediction=False)
    assert ls_api.get_project(pid)["model_version"] == "sentiment"
    first = predictions_of(ls_api, pid, reg.model_version)
    assert set(dm_scores(ls_api, pid).values()) == {None}

    # After connect: the project uses the backend's model version and the column shows its scores.
    done = connect(label_studio, server.url, pid)
    assert done.returncode == 0, done.stderr
    (out,) = json.loads(done.stdout)["registrations"]
    assert out["project_model_version"] == reg.model_version == ls_api.get_project(pid)["model_version"]
    assert dm_scores(ls_api, pid) == pytest.approx(first)
    # ... and the output says the one thing to do after a retraining.
    assert f"project {pid}: the Data Manager shows the scores of model version {reg.model_version}" in done.stderr
    assert "Settings > Annotation > Prelabeling" in done.stderr

    # Retrained (a new version, new predictions): Label Studio keeps the project on the old version.
    tasks = {t["data"]["text"]: t["id"] for t in tasks_of(ls_api, pid)}
    for text in POSITIVE[:2]:
        annotate(ls_api, tasks[text], "Positive")
    for text in NEGATIVE[:2]:
        annotate(ls_api, tasks[text], "Negative")
    retrained = trained_version(server, pid, 4, "ANNOTATION_CREATED")
    assert retrained != reg.model_version
    wait_label_studio_version(ls_api, reg.backend_id, retrained)
    second = predictions_of(ls_api, pid, retrained)
    assert second != pytest.approx(first)
    assert ls_api.get_project(pid)["model_version"] == reg.model_version
    assert dm_scores(ls_api, pid) == pytest.approx(first)

    # connect again leaves a version it cannot tell from imported predictions; --scores moves it.
    done = connect(label_studio, server.url, pid)
    assert done.returncode == 0, done.stderr
    assert ls_api.get_project(pid)["model_version"] == reg.model_version and "pass --scores" in done.stderr
    done = connect(label_studio, server.url, pid, args=["--scores"])
    assert done.returncode == 0, done.stderr
    assert ls_api.get_project(pid)["model_version"] == retrained
    assert dm_scores(ls_api, pid) == pytest.approx(second)


def test_a_new_project_gets_the_version_from_one_stored_prediction(ls_api, label_studio, project, backend):
    """Label Studio takes a version for the project only once it has a prediction of it: connect
    has it store the backend's prediction of one task; a project without tasks keeps the title and
    the output says what to do."""
    server = backend()
    pid = project(POSITIVE[:2] + NEGATIVE[:2])
    done = connect(label_studio, server.url, pid)
    assert done.returncode == 0, done.stderr
    (out,) = json.loads(done.stdout)["registrations"]
    assert ls_api.get_project(pid)["model_version"] == out["project_model_version"] == out["model_version"]
    stored = [s for s in dm_scores(ls_api, pid).values() if s is not None]
    assert len(stored) == 1 and 0 < stored[0] <= 1

    empty = project()
    done = connect(label_studio, server.url, empty)
    assert done.returncode == 0, done.stderr
    (out,) = json.loads(done.stdout)["registrations"]
    assert ls_api.get_project(empty)["model_version"] == out["project_model_version"] == out["title"]
    assert (f"project {empty}: the Data Manager's Prediction score column stays empty until the project uses "
            f"model version {out['model_version']}") in done.stderr
    assert f"pick {out['model_version']} in Settings > Annotation > Prelabeling" in done.stderr


def test_connect_again_keeps_what_was_changed_in_label_studio(ls_api, label_studio, project, backend):
    """Interactive pre-annotation, title, description and extra params set in Label Studio's UI stay
    when connect runs again without those options; options that are passed change them."""
    server = backend()
    pid = project(["good"])
    done = connect(label_studio, server.url, pid)
    assert done.returncode == 0, done.stderr
    (out,) = json.loads(done.stdout)["registrations"]
    assert (out["is_interactive"], out["title"]) == (False, f"lsdeploy {server.url}")
    ui = {"is_interactive": True, "title": "my sentiment model", "description": "set in the UI",
          "extra_params": {"threshold": 0.5}}
    ls_api.call("PATCH", f"/api/ml/{out['backend_id']}", "changing the backend as the UI does",
                json={"url": server.url, "project": pid, **ui})

    done = connect(label_studio, server.url, pid)
    assert done.returncode == 0, done.stderr
    saved = ls_api.get_backend(out["backend_id"])
    assert {key: saved[key] for key in ui} == ui

    done = connect(label_studio, server.url, pid, args=["--no-interactive", "--title", "renamed"])
    assert done.returncode == 0, done.stderr
    saved = ls_api.get_backend(out["backend_id"])
    assert (saved["is_interactive"], saved["title"], saved["description"]) == (False, "renamed", "set in the UI")


def test_connect_again_without_basic_auth_keeps_it(ls_api, label_studio, project, backend):
    """A backend connected with basic auth stays so (and its webhook keeps the header) when connect
    runs again without the credentials: annotations still reach it."""
    auth = ("lsuser", "s3cret-backend-pass")
    server = backend(basic_auth=auth)
    pid = project(POSITIVE[:1] + NEGATIVE[:1])
    done = connect(label_studio, server.url, pid, env={"BASIC_AUTH_USER": auth[0], "BASIC_AUTH_PASS": auth[1]})
    assert done.returncode == 0, done.stderr

    done = connect(label_studio, server.url, pid)
    assert done.returncode == 0, done.stderr
    (out,) = json.loads(done.stdout)["registrations"]
    assert out["basic_auth"] is True and out["state"] == "CO"
    (hook,) = ls_api.webhooks(pid)
    assert hook["headers"]["Authorization"].startswith("Basic ")
    tasks = {t["data"]["text"]: t["id"] for t in tasks_of(ls_api, pid)}
    annotate(ls_api, tasks[POSITIVE[0]], "Positive")
    trained_version(server, pid, 1, "ANNOTATION_CREATED")
    assert "POST /webhook 401" not in server.log()


def test_training_on_submission_sends_each_annotation_twice_and_the_version_moves_once(ls_api, project, backend):
    """With "Start model training on annotation submission" on, Label Studio sends START_TRAINING
    for each annotation besides the project webhook's ANNOTATION_CREATED: two fits. The
    text-classifier bumps its version only for the one that trained on something new, and a
    START_TRAINING with no new annotation keeps the version."""
    server = backend()
    pid = project(POSITIVE[:2] + NEGATIVE[:2])
    (reg,) = ls_api.register(server.url, [pid])
    ls_api.call("PATCH", f"/api/projects/{pid}", "turning on training on annotation submission",
                json={"start_training_on_annotation_update": True})
    tasks = {t["data"]["text"]: t["id"] for t in tasks_of(ls_api, pid)}

    annotate(ls_api, tasks[POSITIVE[0]], "Positive")
    trained_version(server, pid, 1, "ANNOTATION_CREATED")
    assert trained_version(server, pid, 1, "START_TRAINING") == next_version(reg.model_version)

    annotate(ls_api, tasks[NEGATIVE[0]], "Negative")
    trained_version(server, pid, 2, "ANNOTATION_CREATED")
    version = trained_version(server, pid, 2, "START_TRAINING")
    assert version == next_version(next_version(reg.model_version))

    ls_api.train(reg.backend_id)  # nothing new to learn from
    assert trained_version(server, pid, 3, "START_TRAINING") == version
