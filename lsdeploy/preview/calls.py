"""What Label Studio sends a backend, and the /setup call, as a preview makes them."""
from __future__ import annotations

import json
from typing import Optional

from ..errors import EXIT_REGISTER, LsdeployError
from ..labelconfig import parse_config
from .inputs import annotation_pairs
from .runners import last_line


# -- what Label Studio sends ------------------------------------------------------------------------------
def ls_task(task: dict, index: int, project_id: int, now: str) -> dict:
    """A task as Label Studio's TaskSimpleSerializer sends it to /predict."""
    return {
        "id": task.get("id", index + 1),
        "data": task.get("data", {}),
        "meta": task.get("meta") or {},
        "created_at": task.get("created_at", now),
        "updated_at": task.get("updated_at", now),
        "is_labeled": bool(task.get("annotations")),
        "overlap": 1,
        "inner_id": task.get("inner_id", index + 1),
        "total_annotations": len(task.get("annotations") or []),
        "cancelled_annotations": 0,
        "total_predictions": len(task.get("predictions") or []),
        "annotations": task.get("annotations") or [],
        "predictions": task.get("predictions") or [],
        "file_upload": None,
        "updated_by": [],
        "project": project_id,
    }


def setup_body(label_config: str, project: str, hostname: str, token: str) -> dict:
    return {"project": project, "schema": label_config, "hostname": hostname, "access_token": token,
            "extra_params": {}}


def predict_body(tasks: list, project: str, label_config: str) -> dict:
    return {"tasks": tasks, "project": project, "label_config": label_config,
            "params": {"login": None, "password": None, "context": None}}


def webhook_bodies(items: list, label_config: str, project_id: int, model_version: Optional[str], now: str) -> list:
    """ANNOTATION_CREATED payloads shaped like Label Studio's webhooks: {action, annotation, task, project}."""
    project = {"id": project_id, "title": "lsdeploy preview", "label_config": label_config,
               "parsed_label_config": parse_config(label_config), "model_version": model_version or ""}
    bodies = []
    for n, (task, annotation) in enumerate(annotation_pairs(items)):
        task = ls_task(task, n, project_id, now)
        annotation = {"id": annotation.get("id", n + 1), "result": annotation.get("result") or [],
                      "was_cancelled": bool(annotation.get("was_cancelled", False)),
                      "ground_truth": bool(annotation.get("ground_truth", False)),
                      "created_at": annotation.get("created_at", now), "updated_at": annotation.get("updated_at", now),
                      "lead_time": annotation.get("lead_time", 1.0), "completed_by": annotation.get("completed_by", 1),
                      "task": task["id"], "project": project_id}
        bodies.append({"action": "ANNOTATION_CREATED", "annotation": annotation, "task": task, "project": project})
    return bodies


def metric(text: str, name: str, **labels) -> Optional[float]:
    """Sum of a Prometheus metric's samples whose labels include `labels`; None when absent."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            try:
                total += float(value)
                seen = True
            except ValueError:
                pass
    return total if seen else None

def error_text(resp) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict) and body.get("error"):
            return str(body["error"])[:300]
    except ValueError:
        pass
    return (resp.text or "").strip()[:200] or "empty body"


def setup(session, runner, label_config, project, hostname, token) -> str:
    import requests

    try:
        resp = session.post(runner.url + "/setup", data=json.dumps(setup_body(label_config, project, hostname, token)),
                            timeout=30)
    except requests.RequestException as exc:
        raise LsdeployError(f"POST /setup failed: {type(exc).__name__}", EXIT_REGISTER) from None
    if resp.status_code != 200:
        raise LsdeployError(f"POST /setup answered {resp.status_code}: {error_text(resp)}; Label Studio would "
                            f"mark the backend as Error: {last_line(runner.log_tail())}; full log: {runner.log_path}",
                            EXIT_REGISTER)
    try:
        version = resp.json().get("model_version")
    except (ValueError, AttributeError):
        version = None
    if not version:
        raise LsdeployError("POST /setup answered without a model_version: Label Studio needs "
                            "{\"model_version\": \"...\"}", EXIT_REGISTER)
    return str(version)
