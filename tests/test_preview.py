"""`label-studio-ml preview`: real backends started as processes (the container's own command),
/setup and /predict sent as Label Studio sends them, every broken rule reported with its path.

No Docker engine runs on these machines: the engine path is tested for its selection and for the
exact commands it runs, through a stand-in `docker` client that records its argv and runs the
image's CMD as a local process."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import requests

from lsdeploy.errors import EXIT_ERROR, EXIT_INVALID, EXIT_REGISTER, EXIT_USAGE, LsdeployError
from lsdeploy.preview import (DockerRunner, PreviewSettings, choose_runner, dockerfile_env, engine_answers,
                              find_view, label_config_from_directory, load_annotations, load_tasks, process_env,
                              run_preview, stop_group, webhook_bodies)
from lsdeploy.serve import server_command

from support import CLI, TEXT_CONFIG, run_cli, wait_for

NER_CONFIG = """<View>
  <Labels name="ner" toName="text"><Label value="PER"/><Label value="LOC"/></Labels>
  <Text name="text" value="$text"/>
</View>"""

# predict() bodies of broken backends: (label config, predict body, rule, path)
BROKEN = {
    "misspelled-from-name": (TEXT_CONFIG, '''
        return [{"result": [{"from_name": "sentimnet", "to_name": "text", "type": "choices",
                             "value": {"choices": ["Positive"]}}], "score": 0.5} for _ in tasks]''',
        "from-name", "results[0].result[0].from_name"),
    "label-not-in-config": (TEXT_CONFIG, '''
        return [{"result": [{"from_name": "sentiment", "to_name": "text", "type": "choices",
                             "value": {"choices": ["positive"]}}], "score": 0.5} for _ in tasks]''',
        "choices", "results[0].result[0].value.choices[0]"),
    "type-mismatch": (TEXT_CONFIG, '''
        return [{"result": [{"from_name": "sentiment", "to_name": "text", "type": "labels",
                             "value": {"choices": ["Positive"]}}], "score": 0.5} for _ in tasks]''',
        "type", "results[0].result[0].type"),
    "span-out-of-range": (NER_CONFIG, '''
        out = []
        for task in tasks:
            text = task["data"]["text"]
            out.append({"result": [{"from_name": "ner", "to_name": "text", "type": "labels",
                                    "value": {"start": 0, "end": len(text) + 10, "labels": ["PER"]}}]})
        return out''',
        "region-range", "results[0].result[0].value.end"),
    "model-version-not-a-string": (TEXT_CONFIG, '''
        return [{"result": [], "model_version": {"name": "v1"}} for _ in tasks]''',
        "model-version", "results[0].model_version"),
    "wrong-count": (TEXT_CONFIG, '''
        return [{"result": [{"from_name": "sentiment", "to_name": "text", "type": "choices",
                             "value": {"choices": ["Positive"]}}]} for _ in tasks[1:]]''',
        "count", "results"),
}


def write_backend(directory: Path, predict_body: str, label_config: str = TEXT_CONFIG, fit_body: str = None,
                  extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fit = textwrap.indent(textwrap.dedent(fit_body), "    ") if fit_body else ""
    source = ("import time\nfrom lsdeploy.model import LabelStudioMLBase\n\n\n"
              "class Broken(LabelStudioMLBase):\n"
              f"{extra}"
              "    def predict(self, tasks, context=None, **kwargs):\n"
              f"{textwrap.indent(textwrap.dedent(predict_body).strip(), '        ')}\n\n"
              f"{fit}\n")
    (directory / "model.py").write_text(source)
    (directory / "label_config.xml").write_text(label_config)
    return directory


def settings_for(directory, label_config=None, **kwargs) -> PreviewSettings:
    if label_config is None:
        label_config = (Path(directory) / "label_config.xml").read_text()
    kwargs.setdefault("runner", "process")
    kwargs.setdefault("startup_timeout", 90)
    return PreviewSettings(directory=str(directory), label_config=label_config, env=dict(os.environ), **kwargs)


def assert_no_server(url):
    with pytest.raises(requests.ConnectionError):
        requests.get(url + "/health", timeout=2)


# -- real backends from both blueprints -------------------------------------------------------------
def test_default_blueprint_passes_preview_as_json(created):
    directory = created("default")
    done = run_cli("preview", directory, "--json", "--runner", "process", timeout=180)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # exactly one JSON object on stdout
    assert report["ok"] is True and report["exit_code"] == 0
    assert report["runner"] == "process" and report["runner_reason"] == "--runner process"
    (command,) = report["commands"]
    port = int(command[command.index("--port") + 1])
    assert command == server_command(str(directory.resolve()), port, "127.0.0.1")
    assert report["label_config_source"] == str(directory / "label_config.xml")
    assert report["tasks"] == 2 and report["tasks_source"] == "generated"
    assert report["model_version"] == "0.0.1"
    assert report["validation"] == {**report["validation"], "valid": True, "errors": 0, "warnings": 0}
    assert [t["predictions"] for t in report["validation"]["tasks"]] == [1, 1]
    assert [t["status"] for t in report["validation"]["tasks"]] == ["empty", "empty"]  # valid, nothing to show
    assert [r["result"] for r in report["response"]["results"]] == [[], []]
    assert report["fit"] is None
    # progress went to stderr, and the backend is gone
    assert "runner: process" in done.stderr and "POST /predict" in done.stderr
    assert_no_server(f"http://127.0.0.1:{port}")


def test_text_classifier_passes_and_learns_from_fit(created, tmp_path):
    directory = created("text-classifier")
    annotations = tmp_path / "export.json"
    texts = [("I love it, wonderful", "Positive"), ("awful, I hate it", "Negative"),
             ("great and lovely", "Positive"), ("terrible and bad", "Negative")]
    annotations.write_text(json.dumps([
        {"id": 100 + i, "data": {"text": text}, "annotations": [{"id": 500 + i, "result": [
            {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]}]}
        for i, (text, label) in enumerate(texts)]))
    result = run_preview(settings_for(directory, annotations=load_annotations(str(annotations)), fit_timeout=120))
    assert result.ok and result.exit_code == 0
    assert result.report.valid and not result.report.problems
    rows = [row for task in result.report.tasks for row in task.rows]
    assert len(rows) == 2 and all(row.type == "choices" and row.ok for row in rows)
    fit = result.fit
    assert fit.version_before == "0.0.1" and fit.version_after != fit.version_before and fit.finished
    assert [e.outcome for e in fit.events] and all(e.outcome in ("ok", "training") for e in fit.events)
    assert [e.annotation_id for e in fit.events] == [500, 501, 502, 503]
    assert result.report_after_fit.valid
    after = result.response_after_fit["results"]
    assert all(p["model_version"] == fit.version_after for p in after)
    assert {p["result"][0]["value"]["choices"][0] for p in after} <= {"Positive", "Negative"}


# -- broken backends: each fails with its rule and path ------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_backend_fails_with_rule_and_path(tmp_path, name):
    config, body, rule, path = BROKEN[name]
    directory = write_backend(tmp_path / name, body, config)
    result = run_preview(settings_for(directory))
    assert not result.ok and result.exit_code == EXIT_INVALID
    matching = [p for p in result.report.errors if p.rule == rule and p.path == path]
    assert matching, [str(p) for p in result.report.problems]
    assert path in str(matching[0]) and f"[{rule}]" in str(matching[0])


# One backend breaks every other rule, each in a region (or prediction field) of its own, so one
# server start covers them all; it also returns its predictions in reverse task order, each
# naming its task. (rule, path of the first task's result); the second task's are the same.
MANY_CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Image name="image" value="$image"/>
  <Choices name="sentiment" toName="text"><Choice value="Positive"/><Choice value="Negative"/></Choices>
  <Labels name="ner" toName="text"><Label value="PER"/><Label value="LOC"/></Labels>
  <RectangleLabels name="box" toName="image"><Label value="Thing"/></RectangleLabels>
  <Rating name="stars" toName="text" maxRating="5"/>
  <Number name="count" toName="text" min="0" max="10"/>
</View>"""
MANY_BROKEN = '''
    def box(**value):
        return {"from_name": "box", "to_name": "image", "type": "rectanglelabels",
                "value": {"rectanglelabels": ["Thing"], **value}}
    out = []
    for task in tasks:
        text = task["data"]["text"]
        out.append({"task": task["id"], "score": "high", "model_version": " ", "result": [
            {"from_name": "sentiment", "to_name": "image", "type": "choices", "value": {"choices": ["Positive"]}},
            {"from_name": "ner", "to_name": "text", "type": "labels", "value": {"start": 0, "end": 5, "labels": ["PERSON"]}},
            {"from_name": "stars", "to_name": "text", "type": "rating", "value": {"rating": 7}},
            {"from_name": "count", "to_name": "text", "type": "number", "value": {"number": 11}},
            box(x=10, y=10, width=20),
            box(x=120, y=10, width=20, height=20),
            box(x=10, y=-5, width=20, height=20),
            box(x=10, y=10, width=95, height=20),
            box(x=10, y=10, width=20, height=95),
            {"from_name": "ner", "to_name": "text", "type": "labels",
             "value": {"start": 0, "end": 5, "text": text[:5], "labels": ["PER"]}},
        ]})
    return out[::-1]'''
MANY = [
    ("to-name", "results[0].result[0].to_name"),
    ("labels", "results[0].result[1].value.labels[0]"),
    ("rating", "results[0].result[2].value.rating"),
    ("number", "results[0].result[3].value.number"),
    ("region-field", "results[0].result[4].value.height"),
    ("region-range", "results[0].result[5].value.x"),
    ("region-range", "results[0].result[6].value.y"),
    ("region-range", "results[0].result[7].value.width"),
    ("region-range", "results[0].result[8].value.height"),
    ("score", "results[0].score"),
    ("model-version", "results[0].model_version"),
    ("count", "results[0].task"),  # out of task order, named by the prediction
    ("region-text", "results[0].result[9].value.text"),  # out of task order, seen in a span's text
]


@pytest.fixture(scope="module")
def many_broken(tmp_path_factory):
    """(result, readable report, --json object) of one preview of the MANY_BROKEN backend."""
    from lsdeploy.commands.preview import render

    directory = write_backend(tmp_path_factory.mktemp("many") / "many", MANY_BROKEN, MANY_CONFIG)
    result = run_preview(settings_for(directory))
    return result, render(result), json.loads(json.dumps(result.to_dict()))


@pytest.mark.parametrize("rule,path", MANY, ids=[f"{rule}-{path}" for rule, path in MANY])
def test_each_rule_fails_a_running_backend_with_rule_and_path(many_broken, rule, path):
    result, text, data = many_broken
    assert not result.ok and result.exit_code == EXIT_INVALID and data["exit_code"] == EXIT_INVALID
    for index in (0, 1):
        where = path.replace("results[0]", f"results[{index}]")
        (problem,) = [p for p in result.report.errors if p.path == where]  # that one rule, nothing else
        assert problem.rule == rule and problem.task == index
        # readable: under its task's table, on the row it belongs to, with its rule
        assert f"\n      {problem}\n" in text or f"\n    {problem}\n" in text, text
        assert f"{where}: " in text and f"[{rule}]" in str(problem)
        assert {"rule": rule, "path": where, "task": index}.items() <= \
            next(p for p in data["validation"]["problems"] if p["path"] == where).items()
    region = re.match(r"results\[0\]\.result\[(\d+)\]", path)
    if region:  # its row of the table is marked, in the text and in --json
        k = int(region.group(1))
        assert re.search(rf"\n  results\[0\]\.result\[{k}\]\s+\S+\s+.*\s problem\n", text), text
        row = data["validation"]["tasks"][0]["rows"][k]
        assert row["ok"] is False and [(p["rule"], p["path"]) for p in row["problems"]] == [(rule, path)]


def test_many_broken_rules_report_nothing_else(many_broken):
    result, text, data = many_broken
    expected = {(rule, path.replace("results[0]", f"results[{i}]")) for rule, path in MANY for i in (0, 1)}
    assert {(p.rule, p.path) for p in result.report.errors} == expected
    assert [t["status"] for t in data["validation"]["tasks"]] == ["problem", "problem"]
    assert f"INVALID ({len(expected)} error(s), 0 warning(s))" in text
    assert "task 1 (id 1) results[0]: 1 prediction(s), 10 region(s) (score 'high', model_version ' '): problem" in text
    # out of order: each prediction names the other task, and its span text is the other task's
    assert "names task 2 but sits where task 1 (id 1) is (that task is at results[1])" in text
    assert "it is the text of task 2 (id 2): return the predictions in task order" in text


def test_backend_returning_no_predictions_fails_per_task(tmp_path):
    """predict() returns []: Label Studio stores nothing, so every task is a `count` error at its
    own path, and the report never says OK."""
    from lsdeploy.commands.preview import render

    directory = write_backend(tmp_path / "empty", "return []")
    result = run_preview(settings_for(directory))
    assert not result.ok and result.exit_code == EXIT_INVALID
    assert [(p.rule, p.path) for p in result.report.errors] == [("count", "results[0]"), ("count", "results[1]")]
    text = render(result)
    assert "OK" not in text
    assert "task 1 (id 1) results[0]: 0 prediction(s), 0 region(s): no prediction" in text
    assert "\n    results[1]: no prediction for task 2 (id 2): the results list is empty" in text
    assert text.endswith("INVALID (2 error(s), 0 warning(s))")
    data = result.to_dict()["validation"]
    assert [(p["rule"], p["path"], p["task"]) for p in data["problems"]] == [("count", "results[0]", 0),
                                                                             ("count", "results[1]", 1)]


def test_broken_backend_cli_report_names_rule_and_path(tmp_path):
    config, body, rule, path = BROKEN["label-not-in-config"]
    directory = write_backend(tmp_path / "bad", body, config)
    done = run_cli("preview", directory, "--runner", "process", timeout=180)
    assert done.returncode == EXIT_INVALID, done.stderr
    out = done.stdout
    assert "task 1 (id 1) results[0]" in out and "task 2 (id 2) results[1]" in out
    assert re.search(r"results\[0\]\.result\[0\]\s+choices\s+positive\s+problem", out), out
    assert f"{path}: choice 'positive' is not in <Choices name='sentiment'> (did you mean 'Positive'?)" in out
    assert f"[{rule}]" in out and "INVALID (2 error(s), 0 warning(s))" in out

    done = run_cli("preview", directory, "--runner", "process", "--json", timeout=180)
    assert done.returncode == EXIT_INVALID
    report = json.loads(done.stdout)
    assert report["ok"] is False and report["exit_code"] == EXIT_INVALID
    assert [(p["rule"], p["path"]) for p in report["validation"]["problems"]] == [
        ("choices", "results[0].result[0].value.choices[0]"), ("choices", "results[1].result[0].value.choices[0]")]


def test_http_error_from_predict_is_a_problem(tmp_path):
    directory = write_backend(tmp_path / "crash", 'raise RuntimeError("model file missing")')
    result = run_preview(settings_for(directory))
    assert result.exit_code == EXIT_INVALID
    (problem,) = result.report.errors
    assert problem.rule == "response" and "HTTP 500" in problem.message and "model file missing" in problem.message


def test_fit_failure_is_reported_and_fails(tmp_path):
    fit = '''
    def fit(self, event, data, **kwargs):
        time.sleep(1.0)  # longer than the webhook's wait: fails in the background
        raise ValueError("cannot train on " + event)
    '''
    directory = write_backend(tmp_path / "fitfail", 'return [{"result": []} for _ in tasks]', fit_body=fit)
    items = [{"data": {"text": "x"}, "annotations": [{"id": 1, "result": []}]}]
    result = run_preview(settings_for(directory, annotations=items, fit_timeout=60))
    assert result.report.valid
    assert not result.ok and result.exit_code == EXIT_ERROR
    assert [e.outcome for e in result.fit.events] == ["training"]
    assert result.fit.finished and result.fit.version_before == result.fit.version_after
    assert any("1 background fit(s) failed" in e for e in result.fit.errors), result.fit.errors


def test_failing_setup_is_a_backend_label_studio_cannot_connect(tmp_path):
    extra = '    def setup(self):\n        raise RuntimeError("weights file not found")\n\n'
    directory = write_backend(tmp_path / "nosetup", "return []", extra=extra)
    with pytest.raises(LsdeployError) as info:
        run_preview(settings_for(directory))
    assert info.value.exit_code == EXIT_REGISTER
    assert "POST /setup answered 500" in str(info.value) and "weights file not found" in str(info.value)
    log = Path(str(info.value).rsplit("full log: ", 1)[1])
    assert "weights file not found" in log.read_text()
    shutil.rmtree(log.parent)


def test_backend_that_cannot_start_is_one_line_and_exit_2(tmp_path):
    directory = tmp_path / "nomodel"
    directory.mkdir()
    (directory / "model.py").write_text("import not_a_module_anywhere\n")
    (directory / "label_config.xml").write_text(TEXT_CONFIG)
    done = run_cli("preview", directory, "--runner", "process", timeout=120)
    assert done.returncode == EXIT_USAGE
    (line,) = [l for l in done.stderr.splitlines() if l.startswith("error:")]
    assert "exited" in line and "not_a_module_anywhere" in line
    log = Path(line.rsplit("full log: ", 1)[1])  # kept for the user, since the message points at it
    assert "not_a_module_anywhere" in log.read_text()
    shutil.rmtree(log.parent)


def test_ctrl_c_stops_the_backend(tmp_path):
    directory = write_backend(tmp_path / "slow", 'time.sleep(120)\nreturn []')
    # Ctrl-C as a terminal sends it, whatever this test run inherited: a shell that starts a job in
    # the background (`bash .ci/run &`) has it ignore SIGINT, and Python then never raises
    # KeyboardInterrupt (its children inherit the ignored signal).
    proc = subprocess.Popen([*CLI, "preview", str(directory), "--runner", "process"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("POST /setup"):
                break
        started = next(l for l in lines if l.startswith("started"))
        port = int(re.search(r"--port (\d+)", started).group(1))
        pid = int(re.search(r"\(pid (\d+)\)", started).group(1))
        time.sleep(0.5)  # /predict is in flight (it sleeps for 120 s)
        proc.send_signal(signal.SIGINT)
        try:
            _, rest = proc.communicate(timeout=60)  # drains both pipes while it stops
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler prints where every thread is stuck
            _, rest = proc.communicate(timeout=30)
            pytest.fail("preview did not stop within 60 s of Ctrl-C:\n" + "".join(lines) + rest)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "stopping the backend" in rest + "".join(lines)
    assert "interrupted" in rest
    assert_no_server(f"http://127.0.0.1:{port}")
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
             timeout=30, message="backend process gone")


# -- inputs -------------------------------------------------------------------------------------------------
def test_label_config_sources(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Backend\n\n```xml\n<View>\n  <View style='x'><Text name='t' value='$t'/></View>\n"
                      "  <Choices name='c' toName='t'><Choice value='A'/></Choices>\n</View>\n```\nmore <View> text")
    config, source = label_config_from_directory(str(tmp_path))
    assert config.startswith("<View>") and config.endswith("</View>") and "<Choices" in config
    assert source.endswith("README.md (first <View> block)")
    (tmp_path / "label_config.xml").write_text(TEXT_CONFIG)
    assert label_config_from_directory(str(tmp_path)) == (TEXT_CONFIG, str(tmp_path / "label_config.xml"))
    assert find_view("no config here") is None
    assert label_config_from_directory(str(tmp_path / "missing")) is None


def test_no_label_config_is_a_usage_error(tmp_path):
    write_backend(tmp_path / "b", "return []")
    (tmp_path / "b" / "label_config.xml").unlink()
    done = run_cli("preview", tmp_path / "b", "--json", timeout=60)
    assert done.returncode == EXIT_USAGE
    body = json.loads(done.stdout)
    assert body["ok"] is False and body["exit_code"] == EXIT_USAGE and "--label-config FILE" in body["error"]
    done = run_cli("preview", tmp_path / "b", "--project", "3", timeout=60)
    assert done.returncode == EXIT_USAGE and "--label-studio-host" in done.stderr


def test_tasks_file_is_sent_as_label_studio_tasks(tmp_path):
    echo = '''
        self.set("seen", tasks)
        return [{"result": [], "model_version": "echo"} for _ in tasks]'''
    directory = write_backend(tmp_path / "echo", echo)
    tasks_file = tmp_path / "tasks.json"
    tasks_file.write_text(json.dumps([{"id": 42, "data": {"text": "hello"}}, {"text": "bare data"}]))
    tasks = load_tasks(str(tasks_file))
    result = run_preview(settings_for(directory, tasks=tasks, tasks_source=str(tasks_file), project_id=9))
    assert result.ok
    sent = result.tasks
    assert [t["id"] for t in sent] == [42, 2] and sent[1]["data"] == {"text": "bare data"}
    for task in sent:
        assert {"id", "data", "meta", "annotations", "predictions", "project"} <= set(task)
        assert task["project"] == 9 and task["annotations"] == [] and task["predictions"] == []


def test_load_annotations_shapes(tmp_path):
    export = [{"id": 1, "data": {"text": "a"}, "annotations": [{"id": 7, "result": []}]}]
    bare = [{"id": 8, "task": {"id": 2, "data": {"text": "b"}}, "result": []}]
    hooks = [{"action": "ANNOTATION_CREATED", "annotation": {"id": 9, "result": [], "task": 3},
              "task": {"id": 3, "data": {"text": "c"}}}]
    for items, ann_id, task_id in ((export, 7, 1), (bare, 8, 2), (hooks, 9, 3)):
        path = tmp_path / f"a{ann_id}.json"
        path.write_text(json.dumps(items))
        (body,) = webhook_bodies(load_annotations(str(path)), TEXT_CONFIG, 5, "0.0.1", "2026-01-01T00:00:00Z")
        assert body["action"] == "ANNOTATION_CREATED"
        assert set(body) == {"action", "annotation", "task", "project"}
        assert body["annotation"]["id"] == ann_id and body["annotation"]["task"] == task_id
        assert body["task"]["id"] == task_id and body["task"]["project"] == 5
        assert body["project"]["id"] == 5 and body["project"]["label_config"] == TEXT_CONFIG
        assert body["project"]["parsed_label_config"]["sentiment"]["to_name"] == ["text"]
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(LsdeployError) as info:
        load_annotations(str(empty))
    assert info.value.exit_code == EXIT_USAGE


def test_process_env_is_the_dockerfiles_without_container_paths_or_secrets(created, tmp_path):
    directory = created("default")
    env = dockerfile_env((directory / "Dockerfile").read_text())
    assert env["WORKERS"] == "1" and env["THREADS"] == "8" and env["MODEL_DIR"] == "/data/models"
    assert env["PYTHONUNBUFFERED"] == "1"
    settings = PreviewSettings(str(directory), TEXT_CONFIG, env={
        "PATH": "/usr/bin", "MODEL_STATE_URI": "gs://prod/state", "LABEL_STUDIO_API_KEY": "secret",
        "WORKERS": "4", "KEEP": "me"})
    child = process_env(settings, str(tmp_path / "state"))
    assert child["MODEL_DIR"] == str(tmp_path / "state") and child["WORKERS"] == "1"
    assert child["TASK_DATA_CACHE"] == str(tmp_path / "task-data")
    assert child["KEEP"] == "me" and child["PATH"] == "/usr/bin"
    assert "MODEL_STATE_URI" not in child and "LABEL_STUDIO_API_KEY" not in child and "PORT" not in child


# -- the engine path --------------------------------------------------------------------------------------
FAKE_DOCKER = r'''#!{python}
"""Stand-in Docker client: records argv; `run` starts the image's CMD as a local process."""
import json, os, signal, subprocess, sys, time
STATE = {state!r}
MODE = {mode!r}
args = sys.argv[1:]
with open(os.path.join(STATE, "calls.jsonl"), "a") as log:
    log.write(json.dumps(args) + "\n")
cmd = args[0] if args else ""
if cmd == "info":
    if MODE == "hang":
        time.sleep(30)
    if MODE == "down":
        sys.stderr.write("Cannot connect to the Docker daemon at unix:///var/run/docker.sock\n")
        sys.exit(1)
    print("28.2.2-standin")
elif cmd == "build":
    context = args[-1]
    with open(os.path.join(STATE, "context"), "w") as f:
        f.write(context)
    print("Successfully built standin")
elif cmd == "run":
    name = args[args.index("--name") + 1]
    env = dict(os.environ)
    i = 0
    while i < len(args):
        if args[i] == "--env":
            key, _, value = args[i + 1].partition("=")
            env[key] = value
            i += 2
        else:
            i += 1
    context = open(os.path.join(STATE, "context")).read()
    dockerfile = open(os.path.join(context, "Dockerfile")).read()
    cmd_line = [l for l in dockerfile.splitlines() if l.startswith("CMD ")][-1]
    argv = [context if a == "/app" else a for a in json.loads(cmd_line[4:])]
    argv[0] = os.path.join(os.path.dirname({python!r}), argv[0])
    env["MODEL_DIR"] = os.path.join(STATE, "models")
    proc = subprocess.Popen(argv, env=env, stdout=open(os.path.join(STATE, name + ".log"), "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    with open(os.path.join(STATE, name + ".pid"), "w") as f:
        f.write(str(proc.pid))
    print("c0ffee" + name[-6:])
elif cmd == "inspect":
    name = args[-1]
    pid = int(open(os.path.join(STATE, name + ".pid")).read())
    try:
        os.kill(pid, 0)
        print("true 0")
    except ProcessLookupError:
        print("false 1")
elif cmd == "logs":
    print(open(os.path.join(STATE, args[-1] + ".log")).read())
elif cmd == "stop":
    name = args[-1]
    pid = int(open(os.path.join(STATE, name + ".pid")).read())
    os.killpg(pid, signal.SIGTERM)
    for _ in range(300):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    print(name)
'''


def fake_docker(tmp_path, mode="up") -> tuple:
    state = tmp_path / "docker-state"
    state.mkdir()
    exe = tmp_path / "docker"
    exe.write_text(FAKE_DOCKER.format(python=sys.executable, state=str(state), mode=mode))
    exe.chmod(0o755)
    return str(exe), state


def calls(state) -> list:
    return [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]


def test_runner_selection(created, tmp_path):
    directory = created("default")
    (tmp_path / "up").mkdir()
    (tmp_path / "down").mkdir()
    up, _ = fake_docker(tmp_path / "up")
    down, _ = fake_docker(tmp_path / "down", mode="down")

    def pick(runner="auto", docker=up, where=directory):
        return choose_runner(PreviewSettings(str(where), TEXT_CONFIG, runner=runner, docker=docker))

    assert pick() == ("docker", f"a Docker engine answers `{up} info`")
    assert pick(docker=down) == ("process", f"no Docker engine answers `{down} info`")
    assert pick(docker="no-such-docker-client") == ("process", "no `no-such-docker-client` client on PATH")
    assert pick(runner="process") == ("process", "--runner process")
    bare = tmp_path / "bare"
    write_backend(bare, "return []")
    assert pick(where=bare) == ("process", "DIR has no Dockerfile")
    with pytest.raises(LsdeployError) as info:
        pick(runner="docker", docker=down)
    assert info.value.exit_code == EXIT_USAGE and "no Docker engine answers" in str(info.value)
    with pytest.raises(LsdeployError):
        pick(runner="docker", where=bare)


def test_engine_probe_is_bounded(tmp_path):
    hang, _ = fake_docker(tmp_path, mode="hang")
    started = time.monotonic()
    assert engine_answers(hang, timeout=1.0) is False
    assert time.monotonic() - started < 10


def test_docker_commands(created, tmp_path):
    directory = created("default")
    settings = PreviewSettings(str(directory), TEXT_CONFIG, platform="linux", model="model.py:NewModel")
    runner = DockerRunner(settings, 45678, str(tmp_path))
    context = str(directory.resolve())
    assert runner.image == "lsdeploy-preview-default:latest"
    assert runner.build_command == ["docker", "build", "--tag", runner.image, "--file",
                                    os.path.join(context, "Dockerfile"), context]
    assert runner.run_command == ["docker", "run", "--rm", "--detach", "--name", runner.name,
                                  "--network", "host", "--env", "PORT=45678", "--env", "HOST=127.0.0.1",
                                  "--env", "LSDEPLOY_MODEL=model.py:NewModel", runner.image]
    assert runner.stop_command == ["docker", "stop", "--time", "10", runner.name]
    assert runner.files_host == "127.0.0.1"
    mac = DockerRunner(PreviewSettings(str(directory), TEXT_CONFIG, platform="darwin", docker="podman"),
                       45678, str(tmp_path))
    assert mac.run_command == ["podman", "run", "--rm", "--detach", "--name", mac.name,
                               "--publish", "127.0.0.1:45678:9090", "--env", "PORT=9090",
                               "--add-host", "host.docker.internal:host-gateway", mac.image]
    assert mac.files_host == "host.docker.internal"


def test_engine_path_runs_exactly_those_commands(created, tmp_path):
    directory = created("default")
    docker, state = fake_docker(tmp_path)
    settings = settings_for(directory, runner="auto", docker=docker, platform="linux")
    result = run_preview(settings)
    assert result.ok and result.runner == "docker"
    build, run = result.commands
    recorded = calls(state)
    assert recorded[0] == ["info"]
    assert [docker] + recorded[1] == build and [docker] + recorded[2] == run
    assert recorded[-1][:3] == ["stop", "--time", "10"] and recorded[-1][-1] == run[run.index("--name") + 1]
    port = int(next(a for a in run if a.startswith("PORT=")).split("=")[1])
    assert_no_server(f"http://127.0.0.1:{port}")


IMAGE_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="Thing"/></RectangleLabels>
</View>"""


def test_image_backend_reads_sample_files_through_the_stand_in_label_studio(tmp_path):
    """Sample images are served like Label Studio uploads: only with the /setup token."""
    predict = '''
        import struct
        out = []
        for task in tasks:
            path = self.get_local_path(task["data"]["image"], task_id=task["id"])
            with open(path, "rb") as handle:
                width, height = struct.unpack(">II", handle.read(24)[16:24])
            out.append({"result": [{"from_name": "box", "to_name": "image", "type": "rectanglelabels",
                                    "original_width": width, "original_height": height,
                                    "value": {"x": 10, "y": 10, "width": 50, "height": 50,
                                              "rectanglelabels": ["Thing"]}}]})
        return out'''
    directory = write_backend(tmp_path / "img", predict, IMAGE_CONFIG)
    result = run_preview(settings_for(directory, sample_count=3))
    assert result.ok, [str(p) for p in result.report.problems]
    assert result.files_served == 3
    urls = [t["data"]["image"] for t in result.tasks]
    assert all(re.match(r"http://127\.0\.0\.1:\d+/data/upload/preview/sample-\d\.png$", u) for u in urls)
    sizes = {(r["result"][0]["original_width"], r["result"][0]["original_height"])
             for r in result.response["results"]}
    assert sizes == {(64, 48)}

    # the same files without the token are refused, as Label Studio refuses them
    anonymous = '''
        import urllib.request, urllib.error
        try:
            urllib.request.urlopen(tasks[0]["data"]["image"], timeout=10)
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"download refused: {exc.code}")
        return []'''
    directory = write_backend(tmp_path / "anon", anonymous, IMAGE_CONFIG)
    result = run_preview(settings_for(directory))
    (problem,) = result.report.errors
    assert problem.rule == "response" and "download refused: 401" in problem.message


# -- the label config of a real Label Studio project ---------------------------------------------------------
LS_TOKEN = "previewtoken0123456789"


def label_studio_bin():
    """LABEL_STUDIO_BIN, else the venv tests/labelstudio.sh installs, else `label-studio` on PATH."""
    cached = Path(os.environ.get("LSDEPLOY_CACHE") or Path.home() / ".cache" / "lsdeploy") / \
        f"label-studio-{os.environ.get('LABEL_STUDIO_VERSION', '1.23.2')}" / "bin" / "label-studio"
    return os.environ.get("LABEL_STUDIO_BIN") or (str(cached) if cached.is_file() else shutil.which("label-studio"))


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """A real Label Studio 1.23 on 127.0.0.1 with a known legacy token and its prediction validation on."""
    exe = label_studio_bin()
    if not exe:
        pytest.skip("Label Studio is not installed: run tests/labelstudio.sh install (or set LABEL_STUDIO_BIN)")
    from support import free_port

    data = tmp_path_factory.mktemp("ls-data")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k not in ("USERNAME", "PASSWORD", "HOST", "PORT")}
    env.update(ML_BLOCK_LOCAL_IP="false", SSRF_PROTECTION_ENABLED="false", LABEL_STUDIO_HOST=url,
               COLLECT_ANALYTICS="false", LATEST_VERSION_CHECK="false",
               # Label Studio's own prediction validation (off by default in 1.23): with it on, it
               # refuses a whole batch that does not fit the label config, so its verdict can be
               # compared with preview's
               fflag_feat_utc_210_prediction_validation_15082025="true")
    log = open(data / "label-studio.log", "w")
    proc = subprocess.Popen([exe, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
                             "--data-dir", str(data), "--username", "admin@example.com", "--password", "admin12345",
                             "--user-token", LS_TOKEN, "--enable-legacy-api-token"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def up():
            assert proc.poll() is None, (data / "label-studio.log").read_text()[-2000:]
            return requests.get(url + "/api/projects", headers={"Authorization": f"Token {LS_TOKEN}"},
                                timeout=5).status_code == 200
        wait_for(up, timeout=600, interval=1, message="Label Studio")
        yield url
    finally:
        stop_group(proc, 30)
        log.close()


@pytest.mark.e2e
def test_label_config_from_a_label_studio_project(label_studio, tmp_path):
    headers = {"Authorization": f"Token {LS_TOKEN}"}
    project = requests.post(label_studio + "/api/projects", headers=headers, timeout=30,
                            json={"title": "preview e2e", "label_config": NER_CONFIG}).json()
    # a backend written for the text config: its choices regions do not exist in this project's config
    config, body, _, _ = BROKEN["label-not-in-config"]
    directory = write_backend(tmp_path / "b", body.replace('"positive"', '"Positive"'), config)
    env = {"LABEL_STUDIO_API_KEY": LS_TOKEN}  # the key travels by environment, never on argv
    done = run_cli("preview", directory, "--json", "--runner", "process", "--project", project["id"],
                   "--label-studio-host", label_studio, env=env, timeout=180)
    assert done.returncode == EXIT_INVALID, done.stderr
    report = json.loads(done.stdout)
    assert report["label_config_source"] == f"Label Studio project {project['id']} at {label_studio}"
    problems = {(p["rule"], p["path"]) for p in report["validation"]["problems"]}
    assert ("from-name", "results[0].result[0].from_name") in problems
    assert LS_TOKEN not in done.stdout + done.stderr

    # a personal access token (a JWT) is exchanged for an access token first
    pat = requests.post(label_studio + "/api/token/", headers=headers, timeout=30)
    assert pat.status_code in (200, 201), pat.text
    token = pat.json()["token"]
    assert token.count(".") == 2
    done = run_cli("preview", directory, "--json", "--runner", "process", "--project", project["id"],
                   "--label-studio-host", label_studio, env={"LABEL_STUDIO_API_KEY": token}, timeout=180)
    assert done.returncode == EXIT_INVALID and json.loads(done.stdout)["label_config_source"].startswith("Label Studio")

    done = run_cli("preview", directory, "--project", project["id"], "--label-studio-host", label_studio,
                   env={"LABEL_STUDIO_API_KEY": "wrong-token-123"}, timeout=60)
    assert done.returncode == 3 and "refused the API key" in done.stderr and "wrong-token-123" not in done.stderr
    done = run_cli("preview", directory, "--project", "99999", "--label-studio-host", label_studio,
                   env={"LABEL_STUDIO_API_KEY": LS_TOKEN}, timeout=60)
    assert done.returncode == EXIT_USAGE and "no project 99999" in done.stderr


def test_a_server_that_took_the_port_first_is_not_mistaken_for_the_backend(created, monkeypatch):
    """free port -> someone else binds it -> our server exits "port in use": preview retries on
    another port and never validates the intruder's answers."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import lsdeploy.preview.run as preview_module

    class Intruder(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    intruders = []
    real_free_port = preview_module.free_port

    def free_port_then_taken(host="127.0.0.1"):
        port = real_free_port(host)
        if not intruders:
            server = HTTPServer(("127.0.0.1", port), Intruder)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            intruders.append(server)
        return port

    monkeypatch.setattr(preview_module, "free_port", free_port_then_taken)
    messages = []
    try:
        result = run_preview(settings_for(created("default")), progress=messages.append)
    finally:
        for server in intruders:
            server.shutdown()
            server.server_close()
    assert result.ok and result.model_version == "0.0.1"
    assert "the port was taken meanwhile; retrying on another one" in messages
    (command,) = result.commands
    assert int(command[command.index("--port") + 1]) != intruders[0].server_address[1]


# case -> (Label Studio stores the predictions, preview says valid). Label Studio does not check
# span offsets against the text: it stores such a span, which its editor then cannot show. It
# stores nothing when predict returns [], and an empty prediction for {"result": []}.
AGREEMENT = {
    "valid": (True, True),
    "no-predictions": (False, False),
    "empty-result": (True, True),
    "misspelled-from-name": (False, False),
    "label-not-in-config": (False, False),
    "type-mismatch": (False, False),
    "span-out-of-range": (True, False),
}


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(AGREEMENT))
def test_preview_agrees_with_label_studio(label_studio, tmp_path, name):
    """Register the same backend with a real Label Studio (its prediction validation on) and retrieve
    predictions for the same tasks: it refuses every batch preview calls invalid for a rule it
    checks too."""
    from support import Server

    rule = BROKEN[name][2] if name in BROKEN else "count"
    if name == "valid":
        config, body = NER_CONFIG, BROKEN["span-out-of-range"][1].replace("len(text) + 10", "len(text.split()[0])")
    elif name == "no-predictions":
        config, body = TEXT_CONFIG, "return []"
    elif name == "empty-result":
        config, body = TEXT_CONFIG, 'return [{"result": []} for _ in tasks]'
    else:
        config, body, _, _ = BROKEN[name]
    directory = write_backend(tmp_path / name, body, config)
    api = requests.Session()
    api.headers["Authorization"] = f"Token {LS_TOKEN}"
    project = api.post(label_studio + "/api/projects", json={"title": name, "label_config": config}, timeout=30).json()
    texts = ["Alice flew to Paris.", "Bob stayed in Berlin."]
    imported = api.post(f"{label_studio}/api/projects/{project['id']}/import", timeout=60,
                        json=[{"data": {"text": t}} for t in texts])
    assert imported.status_code == 201, imported.text
    with Server(directory) as server:
        # Label Studio gives the backend's /health 1 s: on a loaded machine a check can miss, so
        # registering and retrieving are retried (a few times, never more).
        for _ in range(3):
            registered = api.post(label_studio + "/api/ml", timeout=60,
                                  json={"url": server.url, "project": project["id"], "title": name})
            if registered.status_code == 201:
                break
        assert registered.status_code == 201, registered.text
        for _ in range(3):
            retrieved = api.post(f"{label_studio}/api/dm/actions?id=retrieve_tasks_predictions&project={project['id']}",
                                 json={"selectedItems": {"all": True, "excluded": []}}, timeout=120)
            if "POST /predict 200" in server.log():
                break
        assert "POST /predict 200" in server.log(), retrieved.text
    stored = api.get(f"{label_studio}/api/predictions?project={project['id']}", timeout=30).json()
    ls_stores, preview_valid = AGREEMENT[name]
    assert len(stored) == (len(texts) if ls_stores else 0), retrieved.text
    if name == "empty-result":
        assert [p["result"] for p in stored] == [[], []]
    elif not ls_stores and name in BROKEN:
        assert retrieved.status_code == 400 and "Error validating prediction" in retrieved.text

    tasks_file = tmp_path / "tasks.json"
    tasks_file.write_text(json.dumps([{"data": {"text": t}} for t in texts]))
    result = run_cli("preview", directory, "--json", "--runner", "process", "--project", project["id"],
                     "--label-studio-host", label_studio, "--tasks", tasks_file,
                     env={"LABEL_STUDIO_API_KEY": LS_TOKEN}, timeout=180)
    report = json.loads(result.stdout)
    assert report["ok"] is preview_valid and result.returncode == (0 if preview_valid else EXIT_INVALID)
    if not preview_valid:
        assert {p["rule"] for p in report["validation"]["problems"]} == {rule}
