"""create -> start -> /predict for each blueprint; the rendered Dockerfile; lsdeploy's wheel."""
import hashlib
import json
import re
import zipfile

import pytest

from lsdeploy.blueprints import available
from labelstudio_server import wait_trained
from support import Server, annotation_event, predict_body, text_task, wait_jobs_done

TEXTS = {
    "Positive": ["I love this, wonderful and great", "great product, love it", "wonderful, excellent, great job",
                 "so happy, love love love"],
    "Negative": ["terrible, awful, hate it", "awful experience, terrible support", "hate this, worst ever",
                 "horrible and terrible"],
}


def test_blueprints_are_listed():
    assert available() == ["default", "interactive-ner", "text-classifier"]


def test_default_blueprint_serves_one_prediction_per_task(created):
    directory = created("default")
    with Server(directory) as server:
        tasks = [text_task(i, f"text {i}") for i in range(1, 4)]
        results = server.post("/predict", json=predict_body(tasks)).json()["results"]
        assert results == [{"result": [], "score": 0.0, "model_version": "0.0.1"}] * 3
        fit = server.post("/webhook", json=annotation_event(1, 1, "x", "Positive"))
        assert fit.status_code == 201 and fit.json()["result"]["annotations_seen"] == 1


def _choices(server, texts, project="1.1"):
    tasks = [text_task(i, t) for i, t in enumerate(texts, 1)]
    results = server.post("/predict", json=predict_body(tasks, project=project)).json()["results"]
    return [(r["result"][0]["value"]["choices"][0], r["score"], r["model_version"]) for r in results]


def test_text_classifier_learns_from_annotations_and_survives_restart(created):
    directory = created("text-classifier")
    probe = ["love it, great and wonderful", "terrible, hate it, awful"]
    with Server(directory, "--workers", "2") as server:
        before = _choices(server, probe)
        assert [c for c, _, _ in before] == ["Positive", "Positive"]  # untrained: first label
        assert all(score == pytest.approx(1 / 3, abs=1e-3) for _, score, _ in before)
        assert {v for _, _, v in before} == {"0.0.1"}

        annotation_id = 0
        for label, texts in TEXTS.items():
            for text in texts:
                annotation_id += 1
                resp = server.post("/webhook", json=annotation_event(annotation_id, annotation_id, text, label))
                assert resp.status_code in (201, 202)

        # Every annotation trained (each webhook is one fit, on either worker), none queued.
        wait_trained(lambda path: server.get(path, timeout=10), annotation_id, "ANNOTATION_CREATED")
        after = _choices(server, probe)
        assert [c for c, _, _ in after] == ["Positive", "Negative"] and after[0][2] != "0.0.1"
        assert all(score > 0.5 for _, score, _ in after)
        version = after[0][2]
        # START_TRAINING retrains from the kept dataset; with nothing new the version stays.
        resp = server.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1, "label_config": predict_body([])["label_config"]}})
        assert resp.status_code in (201, 202)
        wait_trained(lambda path: server.get(path, timeout=10), 1, "START_TRAINING")
        assert _choices(server, probe) == after
    with Server(directory) as server:  # a restart keeps the trained model
        restarted = _choices(server, probe)
        assert [c for c, _, _ in restarted] == ["Positive", "Negative"] and restarted[0][2] == version


def test_text_classifier_forgets_deleted_annotations(created):
    directory = created("text-classifier")
    with Server(directory) as server:
        answers = [server.post("/webhook", json=annotation_event(1, 1, "great", "Positive")),
                   server.post("/webhook", json=annotation_event(2, 2, "awful", "Negative")),
                   server.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 2}],
                                                 "project": {"id": 1,
                                                             "label_config": predict_body([])["label_config"]}})]
        wait_jobs_done(server.get, answers)  # the fits themselves, not the stop (which leaves the queue)
    from lsdeploy.state import SQLiteStore

    with open(SQLiteStore(str(directory / ".lsdeploy")).load_artifact("1", "dataset.json")) as handle:
        assert set(json.load(handle)) == {"1"}  # the training set is an artifact: no state value limit


def test_dockerfile_layers_user_port_and_command(created):
    text = (created("text-classifier") / "Dockerfile").read_text()
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-slim$", text, re.M)
    deps, code = text.index("COPY requirements.txt"), text.index("COPY --chown=app . /app")
    assert deps < text.index("pip install") < code  # the dependency layer comes before the code
    assert "USER app" in text and "useradd" in text
    assert 'CMD ["label-studio-ml", "start", "/app"]' in text  # exec form: SIGTERM reaches gunicorn
    assert "PORT=9090" in text
    ignore = (created("default", name="d2") / ".dockerignore").read_text().split()
    assert {".git", ".venv", "**/__pycache__", ".lsdeploy"} <= set(ignore)
    requirements = (created("text-classifier", name="tc2") / "requirements.txt").read_text()
    assert "scikit-learn" in requirements


def test_wheel_is_deterministic_and_complete(tmp_path):
    from lsdeploy.wheel import build_wheel

    first = build_wheel(str(tmp_path / "a"))
    second = build_wheel(str(tmp_path / "b"))
    digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
    assert digest(first) == digest(second)
    names = zipfile.ZipFile(first).namelist()
    assert "lsdeploy/server.py" in names and "lsdeploy/blueprints/_common/Dockerfile.j2" in names
    assert "lsdeploy/blueprints/text-classifier/model.py.j2" in names
    meta = zipfile.ZipFile(first).read("lsdeploy-0.1.0.dist-info/METADATA").decode()
    assert re.search(r"^Requires-Dist: flask", meta, re.M | re.I)
    assert "Provides-Extra: gcs" in meta
    assert not any("__pycache__" in n for n in names)


def test_rerendering_from_a_script_keeps_the_users_own_and_edited_files(tmp_path):
    """`deploy --from` renders DIR again on every run: files lsdeploy wrote and nobody touched
    are replaced, files the user wrote or edited are kept (and named)."""
    from lsdeploy.blueprints import create

    script = tmp_path / "my_model.py"
    script.write_text("from lsdeploy import LabelStudioMLBase\n\n\nclass Mine(LabelStudioMLBase):\n"
                      "    def predict(self, tasks, context=None, **kwargs):\n        return []\n")
    directory = tmp_path / "mine"
    create(directory, script=str(script))
    (directory / "requirements.txt").write_text("torch==2.4.0\n")          # edited by the user
    (directory / "README.md").unlink()                                     # deleted: rendered again
    untouched = (directory / "_wsgi.py").read_text()
    (directory / "_wsgi.py").write_text("stale render\n")                  # an old render, not edited...
    manifest = json.loads((directory / ".lsdeploy" / "rendered.json").read_text())
    manifest["files"]["_wsgi.py"] = hashlib.sha256(b"stale render\n").hexdigest()  # ...as the manifest knows
    (directory / ".lsdeploy" / "rendered.json").write_text(json.dumps(manifest))
    script.write_text(script.read_text() + "# a change\n")

    kept = []
    written = create(directory, script=str(script), force=True, keep_edited=True, kept=kept)
    assert kept == ["requirements.txt"]
    assert (directory / "requirements.txt").read_text() == "torch==2.4.0\n"
    assert {"README.md", "_wsgi.py", "Dockerfile", "my_model.py"} <= set(written)
    assert (directory / "_wsgi.py").read_text() == untouched
    assert (directory / "my_model.py").read_text().endswith("# a change\n")
    # the edit stays the user's on the next run too
    kept = []
    create(directory, script=str(script), force=True, keep_edited=True, kept=kept)
    assert kept == ["requirements.txt"]

    # a directory with its own Dockerfile and no manifest (written by hand, or by an older lsdeploy)
    own = tmp_path / "own"
    own.mkdir()
    (own / "Dockerfile").write_text("FROM python:3.12-slim\nCOPY . /app\nCMD [\"label-studio-ml\", \"start\", \"/app\"]\n")
    kept = []
    create(own, script=str(script), force=True, keep_edited=True, kept=kept)
    assert kept == ["Dockerfile"] and (own / "Dockerfile").read_text().startswith("FROM python:3.12-slim\nCOPY")


def test_rendering_an_untouched_directory_again_writes_only_what_changed(tmp_path):
    from lsdeploy.blueprints import MANIFEST, render

    directory = tmp_path / "b"
    assert render(directory).status == "created"
    stamps = {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}
    again = render(directory)
    assert (again.status, again.written) == ("unchanged", [])
    assert {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()} == stamps

    # what an older lsdeploy rendered and nobody touched since: brought up to date
    fresh = {name: (directory / name).read_bytes() for name in ("Dockerfile", "wheels/lsdeploy-0.1.0-py3-none-any.whl")}
    manifest = json.loads((directory / MANIFEST).read_text())
    (directory / "Dockerfile").write_text("# rendered by an older lsdeploy\n")
    (directory / "wheels" / "lsdeploy-0.1.0-py3-none-any.whl").rename(directory / "wheels" / "lsdeploy-0.0.9-py3-none-any.whl")
    files = manifest["files"]
    files["Dockerfile"] = hashlib.sha256(b"# rendered by an older lsdeploy\n").hexdigest()
    files["wheels/lsdeploy-0.0.9-py3-none-any.whl"] = files.pop("wheels/lsdeploy-0.1.0-py3-none-any.whl")
    (directory / MANIFEST).write_text(json.dumps(manifest))
    updated = render(directory)
    assert (updated.status, updated.written) == ("updated", ["Dockerfile", "wheels/lsdeploy-0.1.0-py3-none-any.whl"])
    assert {name: (directory / name).read_bytes() for name in fresh} == fresh
    assert [p.name for p in (directory / "wheels").iterdir()] == ["lsdeploy-0.1.0-py3-none-any.whl"]
    assert render(directory).status == "unchanged"  # the old wheel is forgotten, not missed
