"""What a request may carry: the rules the HTTP API checks before any model code runs, each
broken one a `BadRequest` (a JSON 4xx naming the field and the rule)."""
from __future__ import annotations

import math
import re


class BadRequest(Exception):
    """Client error with a message the caller can act on."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


PROJECT_ID = re.compile(r"[A-Za-z0-9_-]{0,128}")
# Names predict() takes itself: `params` keys that would clash with them in predict(tasks, context=..., **params)
PREDICT_ARGUMENTS = frozenset(("self", "tasks", "context"))


def project_id_of(value) -> str:
    """Label Studio sends the project as "<id>.<created_at epoch>" (predict, setup) or as an
    object with an id (webhooks). The id: up to 128 letters, digits, '_' or '-' (Label Studio's
    are numbers); anything else is a BadRequest naming the rule."""
    if isinstance(value, dict):
        value = value.get("id")
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadRequest("'project' must be a string like \"3.1700000000\", a number, or an object with an id")
    project_id = str(value).split(".", 1)[0]
    if not PROJECT_ID.fullmatch(project_id):
        raise BadRequest("'project' must be a project id of at most 128 letters, digits, '_' or '-' (Label Studio "
                         "sends a number, or \"<id>.<created_at>\")")
    return project_id


def training_event(kind: str, data: dict) -> tuple:
    """(event, project id, label config or None, the data fit() gets) of a training request:
    a webhook (`kind` "webhook") or the legacy /train call ("train"). BadRequest when it is not
    one. The trainer calls it again on the stored body when the event's turn comes."""
    if kind == "train":
        project_id = project_id_of(data.get("project"))
        label_config = data.get("label_config")
        if data.get("annotations") is not None and not isinstance(data["annotations"], list):
            raise BadRequest("'annotations' must be a list")
        if data.get("params") is not None and not isinstance(data["params"], dict):
            raise BadRequest("'params' must be an object")
        payload = {"annotations": data.get("annotations") or [],
                   "project": {"id": project_id, "label_config": label_config},
                   "params": data.get("params") or {}}
        event = "START_TRAINING"
    else:
        event = data.get("action")
        if not isinstance(event, str) or not event:
            raise BadRequest("not a Label Studio event: the body needs an 'action' string such as ANNOTATION_CREATED")
        project = data.get("project")
        project_id = project_id_of(project)
        label_config = project.get("label_config") if isinstance(project, dict) else None
        payload = {k: v for k, v in data.items() if k != "action"}
    if label_config is not None and not isinstance(label_config, str):
        raise BadRequest("'project.label_config' must be the label config XML string")
    return event, project_id, label_config, payload


def not_json(constant: str):
    """json.loads' hook for NaN, Infinity and -Infinity, which JSON does not have."""
    raise BadRequest(f"request body is not valid JSON: {constant} is not a JSON number")


def finite(value) -> bool:
    """No float in `value` is infinite (JSON's 1e999 parses as one; a store cannot keep it)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, list):
        return all(finite(v) for v in value)
    return True
