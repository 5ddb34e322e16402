"""The HTTP server a Label Studio ML backend runs: `create_app(model_class)`.

Speaks what Label Studio 1.23 sends (see README "HTTP API"):
GET /health, GET /, POST /setup, POST /predict, POST /webhook, GET /versions, POST /train,
GET /metrics. Every answer is JSON (metrics: Prometheus text), errors included.

- One model instance per (project, label config), reused across requests (`lsdeploy.pool`);
  `setup()` runs once per instance.
- Training runs on a background thread per worker process (`lsdeploy.training`): a webhook is
  answered with the fit result when fit finishes within FIT_WAIT_SECONDS (default 0.5 s),
  otherwise with 202 and a job id while training goes on. Label Studio gives a webhook 1 s. The
  queue is bounded (TRAINING_QUEUE_MAX_JOBS, TRAINING_QUEUE_MAX_BYTES per worker): past it, 503
  with Retry-After. On shutdown the worker finishes queued training before it exits (within
  gunicorn's graceful timeout).
- Fits of one project are serialized across the workers sharing a store (`StateStore.lock`).
- Job mode (LSDEPLOY_TRAINING=job, `lsdeploy.dispatch`): fit never runs here; a webhook is queued
  and a Cloud Run job execution (`label-studio-ml train`) runs it (docs/training-jobs.md).
- Limits (see docs/hardening.md): a body over MAX_REQUEST_BYTES (16 MiB) or a /predict batch of
  more than MAX_TASKS tasks (10,000) is a JSON 413 naming the setting; a client that does not send
  its whole request within CLIENT_TIMEOUT is answered 408 (the deadline is kept by
  lsdeploy.serve's worker, which makes reading the body raise TimeoutError).
- Logs: one line per request (method, path, status, latency). Never a body, a query string
  or a header.
- GET /metrics: Prometheus text about the whole server; under `label-studio-ml start` the
  workers share their values through files in a private directory (see lsdeploy.metrics).
"""
from __future__ import annotations

import io
import json
import logging
import os
import time
import traceback
from typing import Optional

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from . import __version__, taskdata
from .access import access_log, authorized, direct_handler, printable_path
from .errors import EXIT_USAGE, LsdeployError, StateError
from .inputs import PREDICT_ARGUMENTS, BadRequest, finite, not_json, project_id_of, training_event
from .http1 import CHUNK_ERRORS, CHUNKED_ERROR
from .labelconfig import LabelConfigError
from .metrics import Metrics
from .model import LabelStudioMLBase, request_write
from .pool import ModelPool
from .response import serialize
from .state import StateStore
from . import jobs
from .jobs import DONE_KEPT, JobQueue, QueueFull, job_id, parse_job_id
from .training import DEFAULT_POLL_SECONDS, Trainer
from . import executions
from .dispatch import dispatcher_from
from .executions import RunApiError

logger = logging.getLogger("lsdeploy.server")

HEALTH_PATH = "/health"  # the one path served without basic auth (container probes)
# A parsed JSON body can take up to about 25 times its size in memory (many tiny objects), so
# the body limit bounds what one request can cost; 16 MiB holds about 10,000 tasks as Label
# Studio serializes them.
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
# Label Studio sends every selected task that lacks a prediction in one /predict call.
DEFAULT_MAX_TASKS = 10_000
# What an unauthenticated GET /health shows of the store when basic auth is on (no bucket URI,
# no raw error text).
_PUBLIC_STORE_FIELDS = ("store", "status", "snapshot_age_seconds", "refresh_seconds", "degraded_for_seconds", "detail")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise LsdeployError(f"{name}={raw!r} must be a whole number, at least 1", EXIT_USAGE)
    return value


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def create_app(model_class, store: Optional[StateStore] = None, basic_auth: Optional[tuple] = None,
               debug: bool = False, max_content_length: Optional[int] = None,
               metrics_dir: Optional[str] = None, max_tasks: Optional[int] = None,
               training: Optional[str] = None) -> Flask:
    """The Flask app serving `model_class`.

    `store` defaults to the process-wide store from the environment (MODEL_STATE_URI or SQLite
    under MODEL_DIR), created in each worker process on first use. `basic_auth` is
    (user, password); BASIC_AUTH_USER/BASIC_AUTH_PASS are read when it is not given.
    `metrics_dir` (or LSDEPLOY_METRICS_DIR): a directory private to one server, shared by its
    worker processes, so /metrics reports all of them (see lsdeploy.metrics); without it the
    metrics are this process's. `max_content_length` (MAX_REQUEST_BYTES) and `max_tasks`
    (MAX_TASKS) bound what one request may carry. `training` (LSDEPLOY_TRAINING): "service"
    runs fit in this server's background threads; "job" never does: each event is queued and a
    Cloud Run job execution (LSDEPLOY_TRAINING_JOB) drains the project (docs/training-jobs.md).
    """
    if not (isinstance(model_class, type) and issubclass(model_class, LabelStudioMLBase)):
        raise TypeError(f"{model_class!r} is not a subclass of lsdeploy.LabelStudioMLBase")
    if basic_auth is None:
        user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
        basic_auth = (user, password) if user and password else None
    if basic_auth is not None and not (basic_auth[0] and basic_auth[1]):
        raise ValueError("basic auth needs both a user and a password")

    app = Flask("lsdeploy")
    app.config["MAX_CONTENT_LENGTH"] = max_content_length or int(os.environ.get("MAX_REQUEST_BYTES", DEFAULT_MAX_BYTES))
    max_tasks = max_tasks or int(os.environ.get("MAX_TASKS", DEFAULT_MAX_TASKS))
    app.json.sort_keys = False
    metrics = Metrics(metrics_dir or os.environ.get("LSDEPLOY_METRICS_DIR") or None)
    metrics.describe("lsdeploy_requests_total", "counter", "HTTP requests by endpoint and status")
    metrics.describe("lsdeploy_request_errors_total", "counter", "HTTP requests answered 5xx")
    metrics.describe("lsdeploy_request_duration_seconds", "histogram", "HTTP request latency")
    metrics.describe("lsdeploy_predictions_total", "counter", "Predictions returned")
    metrics.describe("lsdeploy_fit_total", "counter", "fit() runs by event and outcome")
    metrics.describe("lsdeploy_fit_duration_seconds", "histogram", "fit() duration")
    metrics.describe("lsdeploy_fit_queue_depth", "gauge", "Training events queued or running (the whole store)")
    metrics.describe("lsdeploy_fit_failed_jobs", "gauge", "Training events kept as failed (the whole store)")
    metrics.describe("lsdeploy_fit_refused_total", "counter", "Training events refused with 503: the queue was full")
    metrics.describe("lsdeploy_info", "gauge", "Server version and model class")
    metrics.constant("lsdeploy_info", 1, version=__version__, model_class=model_class.__name__)
    pool = ModelPool(model_class, store, int(os.environ.get("MODEL_CACHE_SIZE", 32)))
    queue = JobQueue(lambda: pool.store,
                     max_jobs=_env_int("TRAINING_QUEUE_MAX_JOBS", jobs.DEFAULT_MAX_JOBS),
                     max_bytes=_env_int("TRAINING_QUEUE_MAX_BYTES", jobs.DEFAULT_MAX_BYTES),
                     max_attempts=_env_int("TRAINING_MAX_ATTEMPTS", jobs.DEFAULT_MAX_ATTEMPTS),
                     retry_seconds=_env_float("TRAINING_RETRY_SECONDS", jobs.DEFAULT_RETRY_SECONDS))
    trainer = Trainer(queue, None, metrics, poll_seconds=_env_float("TRAINING_POLL_SECONDS", DEFAULT_POLL_SECONDS))
    dispatcher = dispatcher_from(training or os.environ.get("LSDEPLOY_TRAINING"), os.environ, queue,
                                 trainer.poll_seconds)  # None: fit runs in this server
    fit_wait = _env_float("FIT_WAIT_SECONDS", 0.5)
    app.extensions["lsdeploy"] = {"pool": pool, "trainer": dispatcher or trainer, "metrics": metrics,
                                  "model_class": model_class}

    # -- plumbing ------------------------------------------------------------------------
    json_default = app.json.default

    def reply(body, status: int = 200) -> Response:
        """A JSON answer (what jsonify makes, without its per-call lookups)."""
        return Response(json.dumps(body, default=json_default, separators=(",", ":")) + "\n",
                        status=status, mimetype="application/json")

    def error(message: str, status: int):
        return reply({"status": status, "error": message}, status)

    config = app.config

    def too_large() -> str:
        return f"request body is larger than {config['MAX_CONTENT_LENGTH']} bytes (MAX_REQUEST_BYTES)"

    def body_json() -> dict:
        environ = request._get_current_object().environ
        ctype = environ.get("CONTENT_TYPE", "")
        if ctype != "application/json":
            ctype = ctype.split(";", 1)[0].strip().lower()
            if ctype and ctype != "application/json" and not ctype.endswith("+json") and ctype != "text/plain":
                raise BadRequest(f"Content-Type {ctype} is not supported: send application/json", 415)
        length = environ.get("CONTENT_LENGTH", "")
        limit = config["MAX_CONTENT_LENGTH"]
        stream = environ["wsgi.input"]
        try:
            if length.isdigit() and "HTTP_TRANSFER_ENCODING" not in environ:
                size = int(length)
                if limit is not None and size > limit:
                    raise BadRequest(too_large(), 413)
                raw = stream.read(size)  # the common case: read once, straight from the server
                if len(raw) != size:
                    raise BadRequest("the client stopped sending the request body before Content-Length bytes")
            else:  # chunked: read up to the limit; one byte more means the body is too large
                raw = stream.read() if limit is None else stream.read(limit + 1)
                if limit is not None and len(raw) > limit:
                    raise BadRequest(too_large(), 413)
        except CHUNK_ERRORS:  # the server's parser of a chunked body (OSError subclasses before gunicorn 24)
            raise BadRequest(CHUNKED_ERROR) from None
        except TimeoutError:  # the server's deadline for the whole request (CLIENT_TIMEOUT)
            raise BadRequest("the client did not send the whole request in time (CLIENT_TIMEOUT)", 408) from None
        except OSError:  # a reset connection
            raise BadRequest("the client stopped sending the request body") from None
        if not raw:
            raise BadRequest("request body is empty: send a JSON object")
        # Model code may read flask.request as under the reference SDK (get_json(), get_data()):
        # it reads the body this function has read, within the same limits.
        environ["wsgi.input"] = io.BytesIO(raw)
        environ["CONTENT_LENGTH"] = str(len(raw))
        environ["wsgi.input_terminated"] = True
        try:
            data = json.loads(raw, parse_constant=not_json)
        except RecursionError:
            # The parser's own recursion guard bounds nesting (about 1000 levels).
            raise BadRequest("request body is nested too deeply") from None
        except ValueError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}"[:300]) from None
        if not isinstance(data, dict):
            raise BadRequest(f"request body must be a JSON object, not {type(data).__name__}")
        return data

    # Around Flask, once per request: basic auth, then one metrics record and one access-log
    # line with status and latency (also for answers Flask's error handlers made).
    unauthorized = (json.dumps({"status": 401, "error": "authentication required: this backend uses basic auth "
                                "(set the same user and password in Label Studio's model settings)"},
                               separators=(",", ":")) + "\n").encode()
    unauthorized_headers = [("Content-Type", "application/json"), ("Content-Length", str(len(unauthorized))),
                            ("WWW-Authenticate", 'Basic realm="lsdeploy"')]
    credentials = (basic_auth[0].encode(), basic_auth[1].encode()) if basic_auth is not None else None
    flask_wsgi = app.wsgi_app
    routes: dict[str, str] = {}
    keys: dict[tuple, tuple] = {}
    perf_counter = time.perf_counter

    def metric_keys(endpoint: str, method: str, status: int) -> tuple:
        found = keys.get((endpoint, method, status))
        if found is None:
            label = method if method in _METHODS else "other"
            counters = [("lsdeploy_requests_total", (("endpoint", endpoint), ("method", label), ("status", status)))]
            if status >= 500:
                counters.append(("lsdeploy_request_errors_total", (("endpoint", endpoint),)))
            found = (tuple(counters), ("lsdeploy_request_duration_seconds", (("endpoint", endpoint),)))
            if len(keys) < 10_000:
                keys[(endpoint, method, status)] = found
        return found

    def lsdeploy_wsgi(environ, start_response):
        started = perf_counter()
        path = environ.get("PATH_INFO") or "/"
        if credentials is not None and path != HEALTH_PATH and not authorized(environ.get("HTTP_AUTHORIZATION"), credentials):
            start_response("401 UNAUTHORIZED", list(unauthorized_headers))
            result, status = [unauthorized], 401
        else:
            seen = []

            def capture(status_line, headers, exc_info=None):
                seen.append(status_line)
                return start_response(status_line, headers, exc_info)

            try:
                result = flask_wsgi(environ, capture)
            except BaseException:
                _finish(environ, path, 500, perf_counter() - started)
                raise
            status = int(seen[-1][:3]) if seen else 500
        _finish(environ, path, status, perf_counter() - started)
        return result

    def endpoint_of(path: str, method: str) -> str:
        """The route's rule for a path not in `routes`: one added to the app after create_app."""
        try:
            rule, _ = app.url_map.bind("localhost").match(path, method=method, return_rule=True)
        except Exception:  # noqa: BLE001 - NotFound, MethodNotAllowed, RequestRedirect
            return "unmatched"
        if "<" not in rule.rule:
            routes[rule.rule] = rule.rule
        return rule.rule

    def _finish(environ, path, status, elapsed):
        method = environ.get("REQUEST_METHOD", "")
        if status == 404 or status == 405:
            endpoint = "unmatched"
        else:
            endpoint = routes.get(path) or endpoint_of(path, method)
        counters, hist_key = metric_keys(endpoint, method, status)
        metrics.record(counters, hist_key, elapsed)
        if access_log.isEnabledFor(logging.INFO):
            if not (path.isascii() and path.isprintable()):
                path = printable_path(path)
            message = f"{method} {path} {status} {elapsed * 1000:.1f}ms"
            handler = direct_handler()
            if handler is None or not handler.write_line(access_log.name, message):
                # makeRecord + handle: the record logger.info builds, without the stack walk
                access_log.handle(access_log.makeRecord(access_log.name, logging.INFO, "", 0, message, None, None))

    app.wsgi_app = lsdeploy_wsgi

    @app.errorhandler(BadRequest)
    def _bad(exc: BadRequest):
        return error(str(exc), exc.status)

    @app.errorhandler(LabelConfigError)
    def _label_config(exc: LabelConfigError):  # a label config the request carried (or the store kept)
        return error(str(exc), 400)

    @app.errorhandler(StateError)
    def _state(exc: StateError):  # the state store cannot be used: neither the request's fault nor a bug
        logger.error("%s %s failed: %s", request.method, request.path, exc)
        return error(str(exc), 503)

    @app.errorhandler(RunApiError)
    def _run_api(exc: RunApiError):  # job mode: an execution could not be started or read
        body = {"status": exc.status, "error": str(exc)}
        if getattr(exc, "event_job", None):
            body.update(job=exc.event_job, detail="the training event is stored and stays queued: it trains in the "
                                                  "next execution, started by the next webhook or the server's poller")
        answer = reply(body, exc.status)
        if exc.retry_after:
            answer.headers["Retry-After"] = str(exc.retry_after)
        return answer

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        messages = {
            404: f"no such endpoint: {request.method} {request.path}; see GET /health",
            405: f"{request.method} is not allowed on {request.path}",
            413: too_large(),
        }
        return error(messages.get(exc.code, exc.description or exc.name), exc.code or 500)

    @app.errorhandler(Exception)
    def _crash(exc: Exception):
        logger.error("%s %s failed: %s: %s", request.method, request.path, type(exc).__name__, exc)
        body = {"status": 500, "error": f"{type(exc).__name__}: {exc}"}
        if debug:
            body["traceback"] = traceback.format_exc()
            logger.error("traceback:\n%s", body["traceback"])
        return reply(body, 500)

    # -- endpoints -------------------------------------------------------------------------
    @app.get("/")
    @app.get(HEALTH_PATH)
    def health():
        body = {"status": "UP", "model_class": model_class.__name__, "version": __version__}
        try:
            state = pool.store.health()
        except Exception as exc:  # noqa: BLE001 - health must answer
            state = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        if credentials is not None and not authorized(request.headers.get("Authorization"), credentials):
            state = {k: v for k, v in state.items() if k in _PUBLIC_STORE_FIELDS}
        body["store"] = state
        if request.args.get("project") is not None:  # the version serving now (a training job may have published it)
            try:  # health answers 200 whatever it is asked (probes, Label Studio)
                project_id = project_id_of(request.args.get("project"))
                body.update(project=project_id, model_version=current_version(project_id))
            except BadRequest as exc:
                body["project_error"] = str(exc)
        if state.get("status") not in (None, "ok"):
            body["status"] = "DEGRADED" if state.get("status") == "degraded" else "UP"
        # Label Studio only checks for 200; a degraded store still serves predictions.
        return reply(body)

    @app.post("/setup")
    def setup():
        data = body_json()
        project_id = project_id_of(data.get("project"))
        schema = data.get("schema")
        if schema is not None and not isinstance(schema, str):
            raise BadRequest("'schema' must be the label config XML string")
        hostname, token = data.get("hostname"), data.get("access_token")
        if isinstance(hostname, str) or isinstance(token, str):
            try:
                taskdata.remember(project_id, hostname if isinstance(hostname, str) else None,
                                  token if isinstance(token, str) else None)
            except taskdata.TaskDataError as exc:  # an address or key longer than any real one
                raise BadRequest(str(exc)) from None
        extra = data.get("extra_params")
        if extra not in (None, "", {}):  # as the reference: empty extra_params keep the stored ones
            if isinstance(extra, str):
                try:
                    extra = json.loads(extra)
                except ValueError:
                    raise BadRequest("'extra_params' must be a JSON object (or a string holding one)") from None
            if not isinstance(extra, dict):
                raise BadRequest("'extra_params' must be a JSON object")
            if not finite(extra):
                raise BadRequest("'extra_params' holds a number too large to store (such as 1e999): send finite "
                                 "numbers")
            # Stored before the model is got: a new instance's setup() sees them, and an instance
            # set up with other ones is replaced (see ModelPool.get). A model that overrides
            # set_extra_params (to check or transform them) gets its call on every /setup that
            # carries them, as under the reference; otherwise unchanged ones cost no write.
            if model_class.set_extra_params is not LabelStudioMLBase.set_extra_params:
                pool.get(project_id, schema).set_extra_params(extra)
            elif pool.store.get(project_id, "extra_params") != extra:
                request_write(pool.store.set, project_id, "extra_params", extra)
        model = pool.get(project_id, schema)
        return reply({"model_version": model.model_version})

    @app.post("/predict")
    def predict():
        data = body_json()
        tasks = data.get("tasks")
        if tasks is None:
            raise BadRequest("'tasks' is missing: send {\"tasks\": [{\"id\": 1, \"data\": {...}}], ...}")
        if type(tasks) is not list:  # parsed JSON: exactly list and dict
            raise BadRequest("'tasks' must be a list of task objects")
        if len(tasks) > max_tasks:
            raise BadRequest(f"{len(tasks)} tasks in one request is more than MAX_TASKS ({max_tasks}): "
                             "retrieve predictions for fewer tasks at a time, or raise MAX_TASKS", 413)
        for i, task in enumerate(tasks):
            if type(task) is not dict:
                raise BadRequest("'tasks' must be a list of task objects")
            if "data" in task and type(task["data"]) is not dict:
                raise BadRequest(f"tasks[{i}].data must be an object")
        label_config = data.get("label_config")
        if label_config is not None and not isinstance(label_config, str):
            raise BadRequest("'label_config' must be the label config XML string")
        params = data.get("params")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise BadRequest("'params' must be an object")
        params = dict(params)
        context = params.pop("context", None)
        if context is not None and not isinstance(context, dict):
            raise BadRequest("'params.context' must be an object or null")
        clash = sorted(PREDICT_ARGUMENTS & params.keys())
        if clash:
            raise BadRequest(f"'params' may not hold {', '.join(repr(k) for k in clash)}: predict() takes "
                             f"{', '.join(clash)} itself; rename the key")
        model = pool.get(project_id_of(data.get("project")), label_config)
        try:
            results = serialize(model.predict(tasks, context=context, **params), model)
        except taskdata.TaskDataError:
            if len(tasks) < 2:
                raise
            results = predict_each(model, tasks, context, params)
        metrics.add(_PREDICTIONS, len(results))
        return reply({"results": results})

    def predict_each(model, tasks, context, params) -> list:
        """A task file the address rules (or Label Studio) refused failed the batch: predict task
        by task, so one bad file costs one prediction, which comes back empty with the reason."""
        results = []
        for task in tasks:
            try:
                results.extend(serialize(model.predict([task], context=context, **params), model))
            except taskdata.TaskDataError as exc:
                logger.warning("no prediction for task %s: %s", task.get("id"), exc)
                results.append({"result": [], "score": 0.0, "model_version": str(model.model_version),
                                "error": f"task {task.get('id')}: {exc}"})
        return results

    @app.post("/webhook")
    def webhook():
        data = body_json()
        event, project_id, label_config, _ = training_event("webhook", data)
        if event not in model_class.TRAIN_EVENTS:
            return reply({"status": "skipped", "event": event,
                          "reason": f"{model_class.__name__}.TRAIN_EVENTS does not include {event}"})
        return queue_fit("webhook", event, project_id, label_config)

    @app.post("/train")
    def train():
        """Legacy training call: {annotations, project, label_config, params}."""
        event, project_id, label_config, _ = training_event("train", body_json())
        return queue_fit("train", event, project_id, label_config)

    def queue_fit(kind, event, project_id, label_config):
        """Store the event in the project's durable queue, then wait FIT_WAIT_SECONDS for its fit."""
        # The model the event will train, built now: a config it refuses is a 400 here, not a failed job.
        if label_config is not None or pool.latest(project_id) is None:
            pool.get(project_id, label_config)
        body = request.get_data()  # what body_json read: the request as received
        if dispatcher is not None:
            return dispatch_fit(kind, event, project_id, body)
        try:
            job, outcome = trainer.submit(project_id, kind, event, body)
        except QueueFull as exc:
            metrics.inc("lsdeploy_fit_refused_total", event=event)
            answer = error(str(exc), 503)
            answer.headers["Retry-After"] = str(exc.retry_after)
            return answer
        finished = outcome.done.wait(fit_wait)
        trainer.forget(job)
        if not finished:
            return reply({"status": "training", "job": job,
                          "detail": f"fit runs in the background, in order after the project's earlier events; "
                                    f"see GET /jobs/{job}"}, 202)
        if outcome.status == "done":
            try:
                json.dumps(outcome.result)
                result = outcome.result
            except (TypeError, ValueError):
                result = repr(outcome.result)
            return reply({"status": "ok", "result": result, "job": job, "model_version": outcome.model_version}, 201)
        message = f"fit failed: {type(outcome.error).__name__}: {outcome.error}"
        if outcome.status == "retrying":
            return reply({"status": "retrying", "job": job, "error": message,
                          "retry_in_seconds": round(outcome.retry_in, 1)}, 202)
        status = 503 if isinstance(outcome.error, StateError) else 500
        return reply({"status": status, "error": message, "job": job}, status)

    def dispatch_fit(kind, event, project_id, body):
        """Job mode: the event is queued and an execution runs (or will run) it; 202 at once."""
        try:
            started = dispatcher.submit(project_id, kind, event, body)
        except QueueFull as exc:
            metrics.inc("lsdeploy_fit_refused_total", event=event)
            answer = error(str(exc), 503)
            answer.headers["Retry-After"] = str(exc.retry_after)
            return answer
        name = started["execution"]
        detail = (f"queued; training execution {name} runs it, in order after the project's earlier events "
                  f"(GET /jobs/{name} for the execution, GET /jobs/{started['event_job']} for the event)" if name else
                  f"queued; a training execution is being started for the project (GET /jobs/{started['event_job']})")
        return reply({"status": "queued", **started, "detail": detail}, 202)

    def run_fit(project_id, entry, body):
        """The trainer's call for one queued event: the model of its label config, and fit()
        within a request context holding the event as received (model code may read
        flask.request there, as under the reference SDK)."""
        kind = entry.get("kind") or "webhook"
        event, project_id, label_config, payload = training_event(kind, json.loads(body))
        model = pool.latest(project_id) if label_config is None else None
        model = model or pool.get(project_id, label_config)
        path = "/train" if kind == "train" else "/webhook"
        with app.test_request_context(path, method="POST", data=body, content_type="application/json"):
            result = model.process_event(event, payload, job_id(project_id, entry["id"]), {})
        return result, model.model_version

    trainer.run_fit = run_fit

    @app.get("/jobs/<path:job>")
    def job_status(job):
        if dispatcher is not None and job.startswith(dispatcher.jobs.job + "/executions/"):
            execution = dispatcher.execution(job)
            if execution is None:
                raise BadRequest(f"no training execution {job!r} (the Run API keeps the last 1,000 executions and "
                                 "those of the last 7 days)", 404)
            return reply(executions.view(execution, job))
        project_id, token, entry = find_job(job)
        return reply(jobs.view(job, project_id, entry))

    @app.post("/jobs/<path:job>/retry")
    def job_retry(job):
        project_id, token, entry = find_job(job)
        if entry.get("state") != "failed":
            raise BadRequest(f"job {job} is {entry.get('state')}, not failed: only a failed job can be retried", 409)
        entry = trainer.queue.retry(project_id, token) or entry
        (dispatcher or trainer).notify(project_id)  # job mode: an execution runs it, never this server
        return reply(jobs.view(job, project_id, entry), 202)

    def find_job(job):
        parsed = parse_job_id(job)
        entry = trainer.queue.lookup(*parsed, fresh=True) if parsed else None
        if entry is None:
            raise BadRequest(f"no training job {job!r}: use the 'job' a webhook answered; finished jobs are kept "
                             f"for the last {DONE_KEPT} events of a project", 404)
        return parsed[0], parsed[1], entry

    @app.get("/versions")
    def versions():
        current = current_version(project_id_of(request.args.get("project")))
        return reply({"versions": [current], "model_version": current})

    def current_version(project_id):
        """The project's model version as this instance reads it now: one a `train` process or
        a job execution published is seen within the store's refresh bound, without a restart."""
        model = pool.latest(project_id)
        return model.model_version if model else (pool.store.get(project_id, "model_version")
                                                  or model_class.INITIAL_MODEL_VERSION)

    @app.get("/metrics")
    def prometheus():
        try:  # the queue as the store holds it: every worker and instance, counted once
            queued, failed = trainer.queue.depth()
            metrics.constant("lsdeploy_fit_queue_depth", queued)
            metrics.constant("lsdeploy_fit_failed_jobs", failed)
        except Exception as exc:  # noqa: BLE001 - /metrics answers while the store fails
            logger.warning("training queue depth unavailable for /metrics: %s", exc)
        return Response(metrics.render(), mimetype="text/plain; version=0.0.4")

    @app.get("/openapi.json")
    def openapi():
        return Response(openapi_document(), mimetype="application/json")

    routes.update((rule.rule, rule.rule) for rule in app.url_map.iter_rules() if "<" not in rule.rule)
    return app


_OPENAPI: Optional[str] = None


def openapi_document() -> str:
    """The OpenAPI document of this API (lsdeploy/openapi.json, shipped in the package)."""
    global _OPENAPI
    if _OPENAPI is None:
        with open(os.path.join(os.path.dirname(__file__), "openapi.json"), encoding="utf-8") as handle:
            _OPENAPI = handle.read()
    return _OPENAPI


_PREDICTIONS = ("lsdeploy_predictions_total", ())
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
