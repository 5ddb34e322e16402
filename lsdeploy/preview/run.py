"""`run_preview`: start the backend, /setup, /predict and validate; then --fit; always stop it."""
from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from ..errors import EXIT_ERROR, EXIT_REGISTER, EXIT_USAGE, LsdeployError
from ..labelconfig import LabelConfigError, parse_tags
from ..validate import Problem, ValidationReport, sample_files, sample_tasks, validate_predictions
from .calls import error_text, setup, ls_task, predict_body
from .fit import fit_annotations
from .results import UPLOAD_PREFIX, PreviewResult, PreviewSettings
from .runners import DockerRunner, FileServer, ProcessRunner, last_line, choose_runner, engine_answers


# -- the run -------------------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run_preview(settings: PreviewSettings, progress: Callable[[str], None] = lambda message: None,
                probe: Callable[[str], bool] = engine_answers) -> PreviewResult:
    import requests

    try:
        tags = parse_tags(settings.label_config)
    except LabelConfigError as exc:
        raise LsdeployError(f"label config from {settings.label_config_source}: {exc}", EXIT_USAGE) from None
    if not tags.controls:
        raise LsdeployError(f"the label config from {settings.label_config_source} has no control tags "
                            "(tags with name and toName): nothing to predict", EXIT_USAGE)
    if not Path(settings.directory).is_dir():
        raise LsdeployError(f"{settings.directory} is not a directory: pass a backend directory "
                            "(label-studio-ml create DIR makes one)", EXIT_USAGE)

    kind, reason = choose_runner(settings, probe)
    progress(f"runner: {kind} ({reason})")
    token = secrets.token_hex(20)
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    project = f"{settings.project_id}.{int(time.time())}"
    workdir = tempfile.mkdtemp(prefix="lsdeploy-preview-")
    runner = files = session = None
    keep_logs = False  # the work directory stays only when an error message points at a log in it
    try:
        runner = _make_runner(kind, settings, workdir)
        files = FileServer(sample_files(settings.label_config, settings.sample_count), token).start()
        hostname = files.url(getattr(runner, "files_host", "127.0.0.1"))
        if settings.tasks is None:
            raw_tasks = sample_tasks(settings.label_config, settings.sample_count, hostname + UPLOAD_PREFIX)
        else:
            raw_tasks = settings.tasks
        tasks = [ls_task(t, i, settings.project_id, now) for i, t in enumerate(raw_tasks)]
        seconds: dict = {}
        session = requests.Session()
        session.headers["Content-Type"] = "application/json"

        started = time.monotonic()
        for attempt in range(3):
            runner.start(progress)
            try:
                _wait_healthy(runner, session, settings.startup_timeout)
                break
            except LsdeployError:
                # Another program took the free port between our check and the server's bind.
                if attempt == 2 or runner.exited() is None or "is in use" not in runner.log_tail():
                    raise
                runner.stop()
                runner = _make_runner(kind, settings, workdir)
                progress("the port was taken meanwhile; retrying on another one")
        seconds["startup"] = time.monotonic() - started
        progress(f"healthy at {runner.url} after {seconds['startup']:.1f}s")

        version = setup(session, runner, settings.label_config, project, hostname, token)
        progress(f"POST /setup: model_version {version!r}")

        started = time.monotonic()
        response, report = _predict(session, runner, tasks, project, settings)
        seconds["predict"] = time.monotonic() - started
        progress(f"POST /predict: {len(tasks)} task(s) in {seconds['predict']:.2f}s, "
                 f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)")

        fit = response_after = report_after = None
        if settings.annotations is not None:
            started = time.monotonic()
            fit = fit_annotations(session, runner, settings, project, hostname, token, version, now, progress)
            seconds["fit"] = time.monotonic() - started
            response_after, report_after = _predict(session, runner, tasks, project, settings)
            progress(f"POST /predict after fit: {len(report_after.errors)} error(s)")
        return PreviewResult(
            directory=settings.directory, runner=kind, runner_reason=reason, commands=runner.commands,
            label_config_source=settings.label_config_source, tasks_source=settings.tasks_source, tasks=tasks,
            model_version=version, response=response, report=report, fit=fit,
            response_after_fit=response_after, report_after_fit=report_after, seconds=seconds,
            files_served=sum(1 for _, status in files.requests if status == 200),
        )
    except LsdeployError as exc:
        keep_logs = workdir in str(exc)
        raise
    finally:
        if session is not None:
            session.close()  # no idle keep-alive connection for the server to wait on
        try:
            if runner is not None:
                progress("stopping the backend")
                runner.stop()
        finally:
            if files is not None:
                files.stop()
            if not keep_logs:
                shutil.rmtree(workdir, ignore_errors=True)


def _make_runner(kind: str, settings: PreviewSettings, workdir: str):
    port = free_port()
    return DockerRunner(settings, port, workdir) if kind == "docker" else ProcessRunner(settings, port, workdir)


def _wait_healthy(runner, session, timeout: float) -> None:
    import requests

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        code = runner.exited()
        if code is not None:
            raise LsdeployError(f"the backend exited (code {code}) before answering /health: "
                                f"{last_line(runner.log_tail())}; full log: {runner.log_path}", EXIT_USAGE)
        try:
            resp = session.get(runner.url + "/health", timeout=5)
            if resp.status_code == 200 and runner.owns_port():
                return
            last = f"HTTP {resp.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise LsdeployError(f"the backend did not answer GET /health within {timeout:.0f}s (last: {last}); "
                        f"Label Studio would show it as disconnected; full log: {runner.log_path}", EXIT_REGISTER)


def _predict(session, runner, tasks, project, settings) -> tuple:
    import requests

    body = predict_body(tasks, project, settings.label_config)
    try:
        resp = session.post(runner.url + "/predict", data=json.dumps(body), timeout=settings.predict_timeout)
    except requests.Timeout:
        problem = Problem("response", "$", f"POST /predict took longer than {settings.predict_timeout:.0f}s: "
                                           "Label Studio gives up then (ML_TIMEOUT_PREDICT) and stores nothing")
        return None, ValidationReport([problem], [], [problem])
    except requests.RequestException as exc:
        raise LsdeployError(f"POST /predict failed: {type(exc).__name__}: {last_line(runner.log_tail())}; "
                            f"full log: {runner.log_path}", EXIT_ERROR) from None
    try:
        data = resp.json()
    except ValueError:
        data = None
    if resp.status_code != 200 or data is None:
        problem = Problem("response", "$", f"POST /predict answered HTTP {resp.status_code}: {error_text(resp)} "
                                           "(Label Studio stores no predictions then)")
        return data, ValidationReport([problem], [], [problem])
    return data, validate_predictions(settings.label_config, tasks, data)
