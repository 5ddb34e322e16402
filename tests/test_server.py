"""The HTTP API through Flask's test client (the same app runs under gunicorn in test_gunicorn)."""
import base64
import threading
import time

import pytest

from lsdeploy import LabelStudioMLBase, ModelResponse, PredictionValue, create_app
from lsdeploy.state import SQLiteStore
from support import TEXT_CONFIG, annotation_event, predict_body, text_task


class Echo(LabelStudioMLBase):
    """Predicts 'Positive' when the text says good; counts fits; records what it saw."""

    setups = []
    fits = []

    def setup(self):
        Echo.setups.append((self.project_id, self.label_config))

    def predict(self, tasks, context=None, **kwargs):
        if any(t["data"].get("text") == "boom" for t in tasks):
            raise ValueError("cannot predict boom")
        label = "Positive" if context else None
        return [
            {"result": [{"from_name": "sentiment", "to_name": "text", "type": "choices",
                         "value": {"choices": [label or ("Positive" if "good" in t["data"]["text"] else "Negative")]}}],
             "score": 0.9, "cluster": 3}
            for t in tasks
        ]

    def fit(self, event, data, **kwargs):
        Echo.fits.append((event, data))
        if data.get("slow"):
            time.sleep(data["slow"])
        if data.get("fail"):
            raise RuntimeError("training exploded")
        return {"n": self.update("n", lambda v: (v or 0) + 1)}


@pytest.fixture
def app(model_dir, monkeypatch):
    Echo.setups, Echo.fits = [], []
    monkeypatch.setenv("FIT_WAIT_SECONDS", "20")  # quick fits answer 201 even on a loaded machine
    return create_app(Echo, store=SQLiteStore(str(model_dir)))


@pytest.fixture
def client(app):
    return app.test_client()


def test_health_and_root(client):
    for path in ("/health", "/"):
        resp = client.get(path)
        assert resp.status_code == 200
        assert resp.json["status"] == "UP" and resp.json["model_class"] == "Echo"
        assert resp.json["store"]["store"] == "sqlite"


def test_setup_returns_model_version_and_keeps_extra_params(client):
    resp = client.post("/setup", json={"project": "4.1700000000", "schema": TEXT_CONFIG,
                                       "hostname": "http://ls:8080", "access_token": "tok",
                                       "extra_params": {"threshold": 0.7}})
    assert resp.status_code == 200 and resp.json == {"model_version": "0.0.1"}
    model = client.application.extensions["lsdeploy"]["pool"].get("4", TEXT_CONFIG)
    assert model.extra_params == {"threshold": 0.7}
    assert model.label_studio_url == "http://ls:8080"


def test_predict_fills_model_version_and_keeps_extra_fields(client):
    resp = client.post("/predict", json=predict_body([text_task(1, "good"), text_task(2, "bad")]))
    assert resp.status_code == 200
    results = resp.json["results"]
    assert [r["result"][0]["value"]["choices"] for r in results] == [["Positive"], ["Negative"]]
    assert all(r["model_version"] == "0.0.1" and r["cluster"] == 3 for r in results)


def test_predict_passes_context(client):
    body = predict_body([text_task(1, "bad")], context={"result": [{"type": "keypointlabels"}]})
    assert client.post("/predict", json=body).json["results"][0]["result"][0]["value"]["choices"] == ["Positive"]


def test_model_instance_is_reused_per_project_and_config(client):
    for _ in range(3):
        client.post("/predict", json=predict_body([text_task(1, "good")]))
        client.post("/setup", json={"project": "1.1700000000", "schema": TEXT_CONFIG})
    assert Echo.setups == [("1", TEXT_CONFIG)]
    client.post("/predict", json=predict_body([text_task(1, "good")], project="2.1"))
    client.post("/predict", json=predict_body([text_task(1, "good")], label_config=TEXT_CONFIG + " "))
    assert len(Echo.setups) == 3


def test_model_response_with_own_version(model_dir):
    class Versioned(LabelStudioMLBase):
        def predict(self, tasks, context=None, **kwargs):
            return ModelResponse(model_version="mv-9", predictions=[PredictionValue(result=[]) for _ in tasks])

    client = create_app(Versioned, store=SQLiteStore(str(model_dir))).test_client()
    results = client.post("/predict", json=predict_body([text_task(1, "x")])).json["results"]
    assert results == [{"result": [], "score": 0.0, "model_version": "mv-9"}]


@pytest.mark.parametrize("body,kwargs,status,message", [
    (None, {"data": "not json", "content_type": "application/json"}, 400, "not valid JSON"),
    (None, {"data": "", "content_type": "application/json"}, 400, "empty"),
    ([1, 2], {}, 400, "must be a JSON object"),
    ({"project": "1.1"}, {}, 400, "'tasks' is missing"),
    ({"tasks": {"id": 1}}, {}, 400, "'tasks' must be a list"),
    ({"tasks": [1, 2]}, {}, 400, "'tasks' must be a list"),
    ({"tasks": [{"id": 1, "data": "x"}]}, {}, 400, "tasks[0].data must be an object"),
    ({"tasks": [], "params": "x"}, {}, 400, "'params' must be an object"),
    ({"tasks": [], "label_config": 5}, {}, 400, "'label_config' must be"),
    ({"tasks": [], "project": [1]}, {}, 400, "'project' must be"),
    (None, {"data": "a=b", "content_type": "application/x-www-form-urlencoded"}, 415, "Content-Type"),
])
def test_predict_bad_input_is_json_4xx(client, body, kwargs, status, message):
    resp = client.post("/predict", json=body, **kwargs) if body is not None else client.post("/predict", **kwargs)
    assert resp.status_code == status
    assert resp.is_json and message in resp.json["error"]


def test_deeply_nested_json_is_refused(client):
    body = '{"tasks": [], "x": ' + "[" * 5000 + "]" * 5000 + "}"
    resp = client.post("/predict", data=body, content_type="application/json")
    assert resp.status_code == 400 and resp.is_json


def test_oversize_body_is_413_json(model_dir):
    client = create_app(Echo, store=SQLiteStore(str(model_dir)), max_content_length=1000).test_client()
    resp = client.post("/predict", json={"tasks": [text_task(1, "x" * 2000)]})
    assert resp.status_code == 413 and "larger than 1000 bytes" in resp.json["error"]


def test_user_exception_is_json_500_without_traceback(client):
    resp = client.post("/predict", json=predict_body([text_task(1, "boom")]))
    assert resp.status_code == 500 and resp.is_json
    assert resp.json["error"] == "ValueError: cannot predict boom"
    assert "traceback" not in resp.json and "Traceback" not in resp.get_data(as_text=True)
    assert client.get("/health").status_code == 200  # still serving


def test_debug_mode_adds_traceback(model_dir):
    client = create_app(Echo, store=SQLiteStore(str(model_dir)), debug=True).test_client()
    resp = client.post("/predict", json=predict_body([text_task(1, "boom")]))
    assert resp.status_code == 500 and "Traceback" in resp.json["traceback"]


def test_unknown_routes_and_methods_are_json(client):
    assert client.get("/nope").status_code == 404 and client.get("/nope").is_json
    resp = client.get("/predict")
    assert resp.status_code == 405 and resp.is_json and "GET is not allowed" in resp.json["error"]


@pytest.mark.parametrize("event", ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "START_TRAINING",
                                   "TASKS_CREATED", "PROJECT_UPDATED", "ANNOTATIONS_CREATED", "TASKS_DELETED"])
def test_every_data_event_reaches_fit_exactly_once(client, event):
    body = {"action": event, "project": {"id": 5, "label_config": TEXT_CONFIG}, "payload": event}
    resp = client.post("/webhook", json=body)
    assert resp.status_code == 201, resp.json
    assert resp.json["status"] == "ok" and resp.json["result"] == {"n": 1}
    assert [(e, d["payload"]) for e, d in Echo.fits] == [(event, event)]
    assert "action" not in Echo.fits[0][1]


def test_annotation_webhook_payload_reaches_fit(client):
    resp = client.post("/webhook", json=annotation_event(3, 11, "good stuff", "Positive"))
    assert resp.status_code == 201
    (event, data), = Echo.fits
    assert event == "ANNOTATION_CREATED" and data["annotation"]["id"] == 11 and data["task"]["id"] == 3


def test_events_outside_train_events_are_skipped(model_dir):
    class Picky(Echo):
        TRAIN_EVENTS = ("START_TRAINING",)

    Echo.fits = []
    client = create_app(Picky, store=SQLiteStore(str(model_dir))).test_client()
    resp = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1}})
    assert resp.status_code == 200 and resp.json["status"] == "skipped"
    assert Echo.fits == []


@pytest.mark.parametrize("event", ["REVIEW_CREATED", "PROJECT_DELETED", "MAKE_COFFEE_V2"])
def test_events_outside_train_events_are_skipped_never_refused(client, event):
    """A newer Label Studio may send events nobody has seen yet: 200 skipped, never a 4xx, no fit."""
    Echo.fits = []
    resp = client.post("/webhook", json={"action": event, "project": {"id": 1}})
    assert resp.status_code == 200 and resp.json["status"] == "skipped" and resp.json["event"] == event
    assert Echo.fits == []


def test_annotation_deleted_reaches_fit(client):
    """ANNOTATION_DELETED is one of the reference SDK's training events."""
    Echo.fits = []
    resp = client.post("/webhook", json={"action": "ANNOTATION_DELETED", "project": {"id": 1},
                                         "annotation": {"id": 5}})
    assert resp.status_code == 201, resp.json
    assert [event for event, _ in Echo.fits] == ["ANNOTATION_DELETED"]


@pytest.mark.parametrize("body,message", [
    ({"project": {"id": 1}}, "needs an 'action'"),
    ({"action": 5}, "needs an 'action'"),
    ({"action": "START_TRAINING", "project": {"id": 1, "label_config": 7}}, "label_config"),
])
def test_webhook_rejects_what_is_not_an_event(client, body, message):
    resp = client.post("/webhook", json=body)
    assert resp.status_code == 400 and message in resp.json["error"]


def test_slow_fit_answers_202_and_finishes_in_background(model_dir, monkeypatch):
    monkeypatch.setenv("FIT_WAIT_SECONDS", "0.3")
    Echo.fits = []
    client = create_app(Echo, store=SQLiteStore(str(model_dir))).test_client()
    started = time.monotonic()
    resp = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 9}, "slow": 3})
    assert time.monotonic() - started < 2.5
    assert resp.status_code == 202 and resp.json["status"] == "training"
    trainer = client.application.extensions["lsdeploy"]["trainer"]
    assert trainer.wait_idle(20)
    assert len(Echo.fits) == 1
    pool = client.application.extensions["lsdeploy"]["pool"]
    assert pool.store.get("9", "n") == 1


def test_failing_fit_is_json_500_when_no_retry_is_left(client, monkeypatch):
    monkeypatch.setenv("TRAINING_MAX_ATTEMPTS", "1")
    client = create_app(Echo, store=client.application.extensions["lsdeploy"]["pool"].store).test_client()
    resp = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}, "fail": True})
    assert resp.status_code == 500 and resp.json["error"] == "fit failed: RuntimeError: training exploded"
    assert client.get("/health").status_code == 200


class FlakyFit(LabelStudioMLBase):
    """fit() raises on its first `fail_times` deliveries, then trains; records what it was told."""

    fail_times = 1
    seen = []

    def fit(self, event, data, **kwargs):
        FlakyFit.seen.append((kwargs.get("job_id"), self.delivery["attempt"], self.delivery["job_id"]))
        if len(FlakyFit.seen) <= FlakyFit.fail_times:
            raise RuntimeError("storage hiccup")
        self.set("trained", data["annotation"]["id"])
        return {"ok": True}


def test_a_fit_that_fails_is_retried_then_succeeds_and_the_job_says_so(model_dir, monkeypatch):
    monkeypatch.setenv("FIT_WAIT_SECONDS", "20")
    monkeypatch.setenv("TRAINING_RETRY_SECONDS", "0.2")
    FlakyFit.fail_times, FlakyFit.seen = 1, []
    app = create_app(FlakyFit, store=SQLiteStore(str(model_dir)))
    client = app.test_client()
    resp = client.post("/webhook", json=annotation_event(1, 7, "good", "Positive", project=4))
    assert resp.status_code == 202 and resp.json["status"] == "retrying", resp.json
    assert resp.json["error"] == "fit failed: RuntimeError: storage hiccup" and resp.json["retry_in_seconds"] == 0.2
    job = resp.json["job"]
    assert job.startswith("4-")
    assert app.extensions["lsdeploy"]["trainer"].wait_idle(20)
    assert [attempt for _, attempt, _ in FlakyFit.seen] == [1, 2]
    assert all(given == job and seen == job for given, _, seen in FlakyFit.seen)  # job_id= and self.delivery
    view = client.get(f"/jobs/{job}").json
    assert view["state"] == "done" and view["attempts"] == 2 and view["event"] == "ANNOTATION_CREATED"
    assert app.extensions["lsdeploy"]["pool"].store.get("4", "trained") == 7
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'lsdeploy_fit_total{event="ANNOTATION_CREATED",status="error"} 1' in metrics
    assert 'lsdeploy_fit_total{event="ANNOTATION_CREATED",status="ok"} 1' in metrics
    assert "lsdeploy_fit_queue_depth 0" in metrics


def test_a_fit_that_keeps_failing_is_kept_as_failed_and_can_be_retried(model_dir, monkeypatch):
    monkeypatch.setenv("FIT_WAIT_SECONDS", "0")
    monkeypatch.setenv("TRAINING_RETRY_SECONDS", "0.05")
    monkeypatch.setenv("TRAINING_MAX_ATTEMPTS", "3")
    FlakyFit.fail_times, FlakyFit.seen = 3, []
    app = create_app(FlakyFit, store=SQLiteStore(str(model_dir)))
    client = app.test_client()
    first = client.post("/webhook", json=annotation_event(1, 7, "good", "Positive", project=4)).json["job"]
    second = client.post("/webhook", json=annotation_event(2, 8, "bad", "Negative", project=4)).json["job"]
    assert app.extensions["lsdeploy"]["trainer"].wait_idle(20)
    failed = client.get(f"/jobs/{first}").json
    assert failed["state"] == "failed" and failed["attempts"] == 3
    assert failed["error"] == "RuntimeError: storage hiccup"
    assert client.get(f"/jobs/{second}").json["state"] == "done"  # the queue went on after it
    assert "lsdeploy_fit_failed_jobs 1" in client.get("/metrics").get_data(as_text=True)
    assert client.post(f"/jobs/{second}/retry").status_code == 409
    again = client.post(f"/jobs/{first}/retry")
    assert again.status_code == 202 and again.json["state"] == "queued" and again.json["sequence"] == 3
    assert app.extensions["lsdeploy"]["trainer"].wait_idle(20)
    assert client.get(f"/jobs/{first}").json["state"] == "done"
    assert app.extensions["lsdeploy"]["pool"].store.get("4", "trained") == 7


@pytest.mark.parametrize("job", ["4-0123456789abcdef", "nothing", "4-", "4-a/b"])
def test_an_unknown_job_is_a_json_404(client, job):
    resp = client.get(f"/jobs/{job}")
    assert resp.status_code == 404 and resp.is_json and "no training job" in resp.json["error"]


def test_legacy_train_endpoint(client):
    resp = client.post("/train", json={"annotations": [{"id": 1}], "project": "3.1", "label_config": TEXT_CONFIG})
    assert resp.status_code == 201
    (event, data), = Echo.fits
    assert event == "START_TRAINING" and data["annotations"] == [{"id": 1}] and data["project"]["id"] == "3"


def test_versions(client):
    client.post("/setup", json={"project": "3.1", "schema": TEXT_CONFIG})
    assert client.get("/versions?project=3").json == {"versions": ["0.0.1"], "model_version": "0.0.1"}


def test_metrics_are_prometheus_text(client):
    client.post("/predict", json=predict_body([text_task(1, "good"), text_task(2, "bad")]))
    client.post("/predict", json=predict_body([text_task(1, "boom")]))
    text = client.get("/metrics").get_data(as_text=True)
    assert 'lsdeploy_requests_total{endpoint="/predict",method="POST",status="200"} 1' in text
    assert 'lsdeploy_request_errors_total{endpoint="/predict"} 1' in text
    assert "lsdeploy_predictions_total 2" in text
    assert 'lsdeploy_request_duration_seconds_count{endpoint="/predict"} 2' in text
    assert "# TYPE lsdeploy_request_duration_seconds histogram" in text


def _basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_protects_all_but_health(model_dir):
    client = create_app(Echo, store=SQLiteStore(str(model_dir)), basic_auth=("ls", "s3cret-pass")).test_client()
    assert client.get("/health").status_code == 200
    for method, path in (("GET", "/"), ("POST", "/predict"), ("POST", "/setup"), ("POST", "/webhook"),
                         ("GET", "/metrics"), ("GET", "/versions")):
        resp = client.open(path, method=method, json={})
        assert resp.status_code == 401 and resp.is_json, path
        assert resp.headers["WWW-Authenticate"].startswith("Basic")
    assert client.post("/predict", json=predict_body([]), headers=_basic("ls", "wrong")).status_code == 401
    ok = client.post("/predict", json=predict_body([text_task(1, "good")]), headers=_basic("ls", "s3cret-pass"))
    assert ok.status_code == 200


def test_basic_auth_from_environment(model_dir, monkeypatch):
    monkeypatch.setenv("BASIC_AUTH_USER", "u")
    monkeypatch.setenv("BASIC_AUTH_PASS", "p")
    client = create_app(Echo, store=SQLiteStore(str(model_dir))).test_client()
    assert client.post("/setup", json={"project": "1.1"}).status_code == 401
    assert client.post("/setup", json={"project": "1.1"}, headers=_basic("u", "p")).status_code == 200


def test_logs_one_line_per_request_and_no_bodies_or_tokens(client, caplog):
    caplog.set_level("DEBUG")
    client.post("/setup", json={"project": "1.1", "schema": TEXT_CONFIG, "access_token": "TOKEN-abc123-secret"})
    client.post("/predict", json=predict_body([text_task(1, "PRIVATE-TEXT")]), headers={"Authorization": "Token TOKEN-abc123-secret"})
    access = [r.getMessage() for r in caplog.records if r.name == "lsdeploy.access"]
    assert len(access) == 2 and access[1].startswith("POST /predict 200 ")
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert "TOKEN-abc123-secret" not in everything and "PRIVATE-TEXT" not in everything


def test_setup_runs_once_under_concurrent_first_requests(client):
    errors = []

    def hit():
        try:
            assert client.post("/predict", json=predict_body([text_task(1, "good")], project="77.1")).status_code == 200
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=hit) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert [s for s in Echo.setups if s[0] == "77"] == [("77", TEXT_CONFIG)]


@pytest.mark.parametrize("header,ok", [
    ("Basic " + base64.b64encode(b"ls:pa:ss").decode(), True),  # the password may hold a colon
    ("basic " + base64.b64encode(b"ls:pa:ss").decode(), True),  # the scheme is case-insensitive
    ("Basic  " + base64.b64encode(b"ls:pa:ss").decode() + " ", True),
    ("Basic " + base64.b64encode(b"ls:pa:s").decode(), False),
    ("Basic " + base64.b64encode(b"lsx:pa:ss").decode(), False),
    ("Basic " + base64.b64encode(b"ls").decode(), False),
    ("Basic " + base64.b64encode(b"ls:pa:ss\xff").decode(), False),
    ("Basic not*base64", False),
    ("Bearer " + base64.b64encode(b"ls:pa:ss").decode(), False),
    ("", False),
])
def test_basic_auth_header_forms(model_dir, header, ok):
    client = create_app(Echo, store=SQLiteStore(str(model_dir)), basic_auth=("ls", "pa:ss")).test_client()
    resp = client.post("/predict", json=predict_body([]), headers={"Authorization": header} if header else {})
    assert resp.status_code == (200 if ok else 401) and resp.is_json
    text = client.get("/metrics", headers=_basic("ls", "pa:ss")).get_data(as_text=True)
    status = 200 if ok else 401
    assert f'lsdeploy_requests_total{{endpoint="/predict",method="POST",status="{status}"}} 1\n' in text


def test_unicode_basic_auth(model_dir):
    client = create_app(Echo, store=SQLiteStore(str(model_dir)), basic_auth=("jürgen", "pässwörd")).test_client()
    good = base64.b64encode("jürgen:pässwörd".encode()).decode()
    assert client.post("/predict", json=predict_body([]), headers={"Authorization": "Basic " + good}).status_code == 200
    latin1 = base64.b64encode("jürgen:pässwörd".encode("latin-1")).decode()
    assert client.post("/predict", json=predict_body([]), headers={"Authorization": "Basic " + latin1}).status_code == 401


def test_unmatched_and_wrong_method_are_labelled_unmatched(client):
    client.get("/nope")
    client.get("/predict")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'lsdeploy_requests_total{endpoint="unmatched",method="GET",status="404"} 1\n' in text
    assert 'lsdeploy_requests_total{endpoint="unmatched",method="GET",status="405"} 1\n' in text
    client.open("/predict", method="BREW")
    assert 'lsdeploy_requests_total{endpoint="unmatched",method="other",status="405"} 1\n' in client.get("/metrics").get_data(as_text=True)


def test_access_line_written_directly_matches_the_log_format(client):
    """Under `label-studio-ml start` the access line goes straight into the buffered stderr
    handler without a LogRecord; it must read exactly as the formatter would write it, and a
    path cannot start a second line."""
    import logging
    import os
    import re

    from lsdeploy.serve import StderrHandler, configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    read_fd, write_fd = os.pipe()
    try:
        configure_logging("INFO")
        (handler,) = root.handlers
        assert isinstance(handler, StderrHandler)
        handler.fd = write_fd
        client.post("/predict", json=predict_body([text_task(1, "good")]))
        client.get("/a%0Ab\u00e9")
        logging.getLogger("lsdeploy.access").info("%s %s %s %.1fms", "GET", "/x", 200, 1.25)  # the usual way
        handler.flush()
        os.close(write_fd)
        write_fd = None
        lines = os.read(read_fd, 65536).decode().splitlines()
    finally:
        if write_fd is not None:
            os.close(write_fd)
        os.close(read_fd)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    access = [line for line in lines if "[lsdeploy.access]" in line]
    stamp = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\] \[INFO\] \[lsdeploy\.access\] "
    assert re.fullmatch(stamp + r"POST /predict 200 \d+\.\dms", access[0]), access
    assert re.fullmatch(stamp + r"GET /a\\nb\u00e9 404 \d+\.\dms", access[1]), access
    assert re.fullmatch(stamp + r"GET /x 200 1\.2ms", access[2]), access
    assert len(access) == 3


def test_routes_added_to_the_app_are_labelled_by_their_rule(app):
    @app.get("/custom")
    def custom():
        return {"ok": True}

    @app.get("/items/<int:item>")
    def item(item):
        return {"item": item}

    client = app.test_client()
    assert client.get("/custom").status_code == 200
    assert client.get("/items/7").status_code == 200 and client.get("/items/8").status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    assert 'lsdeploy_requests_total{endpoint="/custom",method="GET",status="200"} 1\n' in text
    assert 'lsdeploy_requests_total{endpoint="/items/<int:item>",method="GET",status="200"} 2\n' in text


def test_default_limits_and_their_variables(model_dir, monkeypatch):
    from lsdeploy.server import DEFAULT_MAX_BYTES, DEFAULT_MAX_TASKS

    assert DEFAULT_MAX_BYTES == 16 * 1024 * 1024 and DEFAULT_MAX_TASKS == 10_000
    app = create_app(Echo, store=SQLiteStore(str(model_dir)))
    assert app.config["MAX_CONTENT_LENGTH"] == DEFAULT_MAX_BYTES
    monkeypatch.setenv("MAX_REQUEST_BYTES", "5000")
    monkeypatch.setenv("MAX_TASKS", "2")
    client = create_app(Echo, store=SQLiteStore(str(model_dir))).test_client()
    assert client.post("/predict", json=predict_body([text_task(1, "good"), text_task(2, "bad")])).status_code == 200
    resp = client.post("/predict", json=predict_body([text_task(i, "good") for i in range(3)]))
    assert resp.status_code == 413 and resp.json["error"].startswith("3 tasks in one request is more than MAX_TASKS (2)")
    resp = client.post("/predict", json=predict_body([text_task(1, "x" * 6000)]))
    assert resp.status_code == 413 and "larger than 5000 bytes (MAX_REQUEST_BYTES)" in resp.json["error"]


def test_batch_over_max_tasks_is_413_before_predict(model_dir):
    Echo.setups = []
    client = create_app(Echo, store=SQLiteStore(str(model_dir)), max_tasks=100).test_client()
    resp = client.post("/predict", data='{"tasks": [' + ",".join(["{}"] * 101) + "]}", content_type="application/json")
    assert resp.status_code == 413 and resp.is_json
    assert resp.json["error"] == ("101 tasks in one request is more than MAX_TASKS (100): "
                                  "retrieve predictions for fewer tasks at a time, or raise MAX_TASKS")
    assert Echo.setups == []  # refused before any model work


def test_chunked_body_over_the_limit_is_413_like_content_length(model_dir):
    import io

    client = create_app(Echo, store=SQLiteStore(str(model_dir)), max_content_length=1000).test_client()
    body = ('{"tasks": [{"id": 1, "data": {"text": "' + "x" * 2000 + '"}}]}').encode()
    resp = client.post("/predict", input_stream=io.BytesIO(body), content_type="application/json",
                       headers={"Transfer-Encoding": "chunked"})
    assert resp.status_code == 413 and resp.json["error"] == "request body is larger than 1000 bytes (MAX_REQUEST_BYTES)"
    small = b'{"tasks": [{"id": 1, "data": {"text": "good"}}]}'
    resp = client.post("/predict", input_stream=io.BytesIO(small), content_type="application/json",
                       headers={"Transfer-Encoding": "chunked"})
    assert resp.status_code == 200 and len(resp.json["results"]) == 1


def test_request_deadline_while_reading_the_body_is_408(client):
    """The gunicorn worker makes reading the body raise TimeoutError once CLIENT_TIMEOUT is over."""
    import io

    class Trickle(io.BytesIO):
        def read(self, *args):
            raise TimeoutError("the client did not send its request within 1 s (CLIENT_TIMEOUT)")

    resp = client.post("/predict", input_stream=Trickle(), content_type="application/json",
                       headers={"Content-Length": "100"})
    assert resp.status_code == 408 and resp.is_json and "CLIENT_TIMEOUT" in resp.json["error"]


@pytest.fixture
def text_classifier(tmp_path, monkeypatch):
    from lsdeploy.blueprints import create
    from lsdeploy.loader import load_model_class

    create(tmp_path / "tc", blueprint="text-classifier")
    return load_model_class(str(tmp_path / "tc")), (tmp_path / "tc" / "label_config.xml").read_text()


@pytest.mark.parametrize("path,body", [
    ("/setup", {"project": "1.1", "schema": "<View"}),
    ("/predict", {"project": "2.1", "label_config": "<View", "tasks": [{"id": 1, "data": {"text": "a"}}]}),
    ("/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": 4, "label_config": "<View"}}),
    ("/setup", {"project": "5.1", "schema": "<!DOCTYPE x><View/>"}),
])
def test_malformed_label_config_is_json_400(text_classifier, model_dir, path, body):
    model_class, _ = text_classifier
    client = create_app(model_class, store=SQLiteStore(str(model_dir))).test_client()
    resp = client.post(path, json=body)
    assert resp.status_code == 400 and resp.is_json, resp.get_data(as_text=True)
    assert resp.json["error"].startswith("label config ")


@pytest.mark.parametrize("path,body", [
    ("/setup", {"project": "6.1", "schema": "<View><Text name='t' value='$text'/></View>"}),
    ("/predict", {"project": "7.1", "label_config": "<View/>", "tasks": [{"id": 1, "data": {"text": "a"}}]}),
])
def test_label_config_without_the_models_tags_is_json_400(text_classifier, model_dir, path, body):
    """The text-classifier needs Choices on a Text tag: another config is the request's problem."""
    model_class, _ = text_classifier
    client = create_app(model_class, store=SQLiteStore(str(model_dir))).test_client()
    resp = client.post(path, json=body)
    assert resp.status_code == 400 and resp.is_json, resp.get_data(as_text=True)
    assert "no choices control tag bound to a" in resp.json["error"]


def test_a_refused_label_config_is_not_stored_and_leaves_nothing_behind(text_classifier, model_dir):
    """A config the model's setup() refuses (400) must not replace the project's good one, and each
    refused config (up to MAX_REQUEST_BYTES) must not stay in the worker's memory."""
    model_class, good = text_classifier
    store = SQLiteStore(str(model_dir))
    app = create_app(model_class, store=store)
    client = app.test_client()
    assert client.post("/setup", json={"project": "9.1", "schema": good}).status_code == 200
    assert store.get("9", "label_config") == good

    pool = app.extensions["lsdeploy"]["pool"]
    before = (len(pool._models), len(pool._key_locks))
    padding = "<!--" + "x" * 1_000_000 + "-->"
    for i in range(5):
        refused = f"<View>{padding}<Text name='t{i}' value='$text'/></View>"
        resp = client.post("/setup", json={"project": "9.1", "schema": refused})
        assert resp.status_code == 400 and "no choices control tag" in resp.json["error"]
        resp = client.post("/predict", json={"project": "9.1", "label_config": refused,
                                            "tasks": [{"id": 1, "data": {"text": "a"}}]})
        assert resp.status_code == 400
    assert store.get("9", "label_config") == good
    assert (len(pool._models), len(pool._key_locks)) == before

    # the project still predicts with its stored config (a request without one)
    resp = client.post("/predict", json={"project": "9.1", "tasks": [{"id": 1, "data": {"text": "a"}}]})
    assert resp.status_code == 200 and len(resp.json["results"]) == 1


def test_setup_with_an_oversized_address_or_key_is_json_400(client):
    for field in ("hostname", "access_token"):
        value = "http://ls.example.com/" + "x" * 100_000 if field == "hostname" else "k" * 100_000
        resp = client.post("/setup", json={"project": "8.1", "schema": "<View/>", field: value})
        assert resp.status_code == 400 and resp.is_json, resp.get_data(as_text=True)
        assert f"'{field}' is longer than" in resp.json["error"] and value not in resp.json["error"]


class ExposedStore(SQLiteStore):
    def health(self):
        return {"store": "gcs", "status": "degraded", "uri": "gs://private-bucket/prefix",
                "error": "Forbidden: 403 private-bucket denied for sa@project.iam", "degraded_for_seconds": 3.0,
                "detail": "Cloud Storage unreachable: serving the last known state; writes are retried"}


def test_unauthenticated_health_hides_store_details_when_basic_auth_is_on(model_dir):
    client = create_app(Echo, store=ExposedStore(str(model_dir)), basic_auth=("ls", "pw")).test_client()
    public = client.get("/health")
    assert public.status_code == 200 and public.json["status"] == "DEGRADED"
    assert public.json["store"] == {"store": "gcs", "status": "degraded", "degraded_for_seconds": 3.0,
                                    "detail": "Cloud Storage unreachable: serving the last known state; writes are retried"}
    assert "private-bucket" not in public.get_data(as_text=True)
    full = client.get("/health", headers=_basic("ls", "pw")).json["store"]
    assert full["uri"] == "gs://private-bucket/prefix" and full["error"].startswith("Forbidden")
    # without basic auth there is nobody to hide from: the details help whoever runs it
    open_client = create_app(Echo, store=ExposedStore(str(model_dir))).test_client()
    assert open_client.get("/health").json["store"]["uri"] == "gs://private-bucket/prefix"


def test_unauthenticated_health_hides_a_store_exception(model_dir):
    class Broken(SQLiteStore):
        def health(self):
            raise OSError("cannot reach gs://private-bucket: token for sa@project expired")

    client = create_app(Echo, store=Broken(str(model_dir)), basic_auth=("ls", "pw")).test_client()
    resp = client.get("/health")
    assert resp.status_code == 200 and resp.json["store"] == {"status": "error"}
    assert client.get("/health", headers=_basic("ls", "pw")).json["store"]["error"].startswith("OSError: cannot reach")


class Configured(LabelStudioMLBase):
    """Reads extra_params in setup(), as a backend that takes its threshold from Label Studio."""

    setups = []

    def setup(self):
        Configured.setups.append(dict(self.extra_params))
        self.threshold = self.extra_params.get("threshold", 0.5)

    def predict(self, tasks, context=None, **kwargs):
        return [{"result": [], "score": self.threshold} for _ in tasks]


def test_extra_params_reach_setup_and_existing_instances(model_dir):
    """setup() sees the extra_params of the /setup that created it; new ones from a later /setup,
    here or in another worker sharing the store, give the next request an instance set up with
    them; unchanged ones keep the instance."""
    Configured.setups = []
    store = SQLiteStore(str(model_dir))
    here, other = (create_app(Configured, store=store).test_client() for _ in range(2))

    def setup(client, extra):
        return client.post("/setup", json={"project": "4.1", "schema": TEXT_CONFIG, "extra_params": extra})

    def score(client):
        return client.post("/predict", json=predict_body([text_task(1, "a")], project="4.1")).json["results"][0]["score"]

    assert setup(here, {"threshold": 0.7}).status_code == 200
    assert Configured.setups == [{"threshold": 0.7}] and score(here) == 0.7
    assert score(other) == 0.7 and len(Configured.setups) == 2  # the other worker's own instance

    assert setup(here, {"threshold": 0.7}).status_code == 200  # unchanged: instances reused
    assert setup(here, "").status_code == 200 and setup(here, {}).status_code == 200  # empty keeps them
    assert score(here) == score(other) == 0.7 and len(Configured.setups) == 2

    assert setup(here, '{"threshold": 0.9}').status_code == 200  # a JSON string, as older Label Studio sends
    assert Configured.setups[-1] == {"threshold": 0.9} and score(here) == 0.9
    assert score(other) == 0.9  # changed in another worker: rebuilt on its next request
    assert len(Configured.setups) == 4
    resp = other.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 4}})
    assert resp.status_code == 201 and len(Configured.setups) == 4  # the up-to-date instance trains


class Checked(Configured):
    """Overrides set_extra_params to refuse what it cannot use, as reference backends may."""

    def set_extra_params(self, extra_params):
        if not isinstance(extra_params.get("threshold", 0.5), float):
            raise ValueError("threshold must be a number between 0 and 1")
        super().set_extra_params(extra_params)


def test_a_models_own_set_extra_params_is_called(model_dir):
    Configured.setups = []
    store = SQLiteStore(str(model_dir))
    client = create_app(Checked, store=store).test_client()
    body = {"project": "5.1", "schema": TEXT_CONFIG}
    assert client.post("/setup", json={**body, "extra_params": {"threshold": 0.6}}).status_code == 200
    # the override runs on an instance set up before them; the next one sees them
    assert Configured.setups == [{}, {"threshold": 0.6}]
    generation = store._generation()
    for _ in range(3):  # Label Studio sends the same ones on every /setup: no write, no new setup()
        assert client.post("/setup", json={**body, "extra_params": {"threshold": 0.6}}).status_code == 200
    assert store._generation() == generation and len(Configured.setups) == 2
    resp = client.post("/setup", json={**body, "extra_params": {"threshold": "high"}})
    assert resp.status_code == 500 and "threshold must be a number" in resp.json["error"]
    resp = client.post("/predict", json=predict_body([text_task(1, "a")], project="5.1"))
    assert resp.json["results"][0]["score"] == 0.6 and Configured.setups == [{}, {"threshold": 0.6}]
