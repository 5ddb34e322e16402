"""--fit: annotations sent as ANNOTATION_CREATED webhooks, and the wait for their training."""
from __future__ import annotations

import json
import time
from typing import Optional

from .calls import error_text, metric, setup, webhook_bodies
from .results import FitEvent, FitResult
from .runners import last_line


def fit_annotations(session, runner, settings, project, hostname, token, version, now, progress) -> FitResult:
    """Send the annotations as webhooks; wait (up to --fit-timeout) for the fits that went on in
    the background, through GET /jobs/<job> (a backend without it: the queue gauge of /metrics)."""
    import requests

    result = FitResult(version_before=version)
    bodies = webhook_bodies(settings.annotations, settings.label_config, settings.project_id, version, now)
    errors_before = _fit_errors(session, runner)
    jobs = []
    for body in bodies:
        ann = body["annotation"]
        try:
            resp = session.post(runner.url + "/webhook", data=json.dumps(body), timeout=30)
        except requests.RequestException as exc:
            result.events.append(FitEvent(body["task"]["id"], ann["id"], 0, "error", type(exc).__name__))
            result.errors.append(f"POST /webhook for annotation {ann['id']}: {type(exc).__name__}")
            continue
        try:
            answer = resp.json()
        except ValueError:
            answer = {}
        if resp.status_code == 201:
            outcome, detail = "ok", json.dumps(answer.get("result"), default=str)[:200]
        elif resp.status_code == 202 and answer.get("status") == "retrying":
            outcome, detail = "error", str(answer.get("error") or "fit failed")
            result.errors.append(f"POST /webhook for annotation {ann['id']}: {detail} (the server retries it)")
        elif resp.status_code == 202:
            outcome, detail = "training", "fit continues in the background"
            jobs.append(answer.get("job"))
        elif resp.status_code == 200:
            outcome, detail = "skipped", str(answer.get("reason") or answer.get("status") or "")
        else:
            outcome, detail = "error", error_text(resp)
            result.errors.append(f"POST /webhook for annotation {ann['id']} answered {resp.status_code}: {detail}")
        result.events.append(FitEvent(body["task"]["id"], ann["id"], resp.status_code, outcome, detail))
    progress(f"sent {len(bodies)} ANNOTATION_CREATED webhook(s)")
    started = time.monotonic()
    failures = _wait_jobs(session, runner, jobs, settings.fit_timeout, progress) if jobs and all(jobs) else None
    if failures is None and jobs:  # no job endpoint: the queue gauge, and the count of failed fits
        result.finished = _wait_training(session, runner, settings.fit_timeout, version, project, hostname, token,
                                         settings.label_config, progress)
        errors_after = _fit_errors(session, runner)
        if errors_before is not None and errors_after is not None and errors_after > errors_before:
            failures = [last_line(runner.log_tail())] * int(errors_after - errors_before)
    elif failures is not None:
        result.finished = failures.pop() is None  # its last item: None once every job ended
    result.waited = time.monotonic() - started
    if failures:
        result.errors.append(f"{len(failures)} background fit(s) failed: {failures[0]}")
    if not result.finished:
        result.errors.append(f"training was still running after {settings.fit_timeout:.0f}s (--fit-timeout)")
    result.version_after = setup(session, runner, settings.label_config, project, hostname, token)
    progress(f"model version: {result.version_before} -> {result.version_after}")
    return result


def _wait_jobs(session, runner, jobs: list, timeout: float, progress) -> Optional[list]:
    """Until every job is done or failed (a job whose fit raised and is retrying counts as
    failed: a preview reports the first failure). The errors, then None when all ended or
    "unfinished" when `timeout` passed; None when the backend has no job endpoint."""
    progress(f"waiting for {len(jobs)} background fit(s) (up to {timeout:.0f}s)")
    deadline = time.monotonic() + timeout
    pending, errors = list(jobs), []
    while pending:
        for job in list(pending):
            try:
                resp = session.get(f"{runner.url}/jobs/{job}", timeout=10)
            except Exception:  # noqa: BLE001 - the backend went away: reported by what follows
                continue
            if resp.status_code == 404 and job == jobs[0] and not errors and len(pending) == len(jobs):
                return None
            if resp.status_code != 200:
                continue
            view = resp.json()
            if view.get("state") in ("done", "failed", "retrying"):
                pending.remove(job)
                if view["state"] != "done":
                    attempt = f" (attempt {view.get('attempts')}, retrying)" if view["state"] == "retrying" else ""
                    errors.append(f"{view.get('error') or 'fit failed'}{attempt}")
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    return errors + [None if not pending else "unfinished"]


def _fit_errors(session, runner) -> Optional[float]:
    try:
        resp = session.get(runner.url + "/metrics", timeout=10)
    except Exception:  # noqa: BLE001 - metrics are optional
        return None
    if resp.status_code != 200:
        return None
    return metric(resp.text, "lsdeploy_fit_total", status="error") or 0.0


def _wait_training(session, runner, timeout, version, project, hostname, token, label_config, progress) -> bool:
    """Wait until queued training is done: the server's fit queue gauge is 0 (or, without
    metrics, the model version changed). False when `timeout` passed first."""
    progress(f"waiting for background training (up to {timeout:.0f}s)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            resp = session.get(runner.url + "/metrics", timeout=10)
            depth = metric(resp.text, "lsdeploy_fit_queue_depth") if resp.status_code == 200 else None
        except Exception:  # noqa: BLE001
            depth = None
        if depth is not None:
            if depth == 0:
                return True
        elif setup(session, runner, label_config, project, hostname, token) != version:
            return True
        time.sleep(0.25)
    return False
