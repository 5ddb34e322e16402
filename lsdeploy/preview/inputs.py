"""What a preview reads: the label config, sample tasks and annotations (from files, the
backend's directory, or Label Studio)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from ..errors import EXIT_USAGE, LsdeployError


# -- inputs ----------------------------------------------------------------------------------------
def find_view(text: str) -> Optional[str]:
    """The first balanced <View>...</View> block in a text (a README, say)."""
    start = re.search(r"<View[\s>/]", text)
    if not start:
        return None
    depth = 0
    for match in re.finditer(r"<(/?)View\b[^>]*?(/?)>", text[start.start():]):
        closing, self_closing = match.group(1), match.group(2)
        if self_closing:
            continue
        depth += -1 if closing else 1
        if depth == 0:
            return text[start.start(): start.start() + match.end()]
    return None


def label_config_from_directory(directory: str) -> Optional[tuple]:
    """(config, source) from DIR/label_config.xml, or the first <View> in DIR/README.md."""
    base = Path(directory)
    path = base / "label_config.xml"
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    readme = base / "README.md"
    if readme.is_file():
        view = find_view(readme.read_text(encoding="utf-8", errors="replace"))
        if view:
            return view, f"{readme} (first <View> block)"
    return None


def fetch_label_config(host: str, api_key: str, project: int, timeout: float = 30.0) -> str:
    """The label config of a Label Studio project (GET /api/projects/{id}, either kind of key)."""
    from ..labelstudio import LabelStudio

    project_data = LabelStudio(host, api_key, timeout=timeout).get_project(project)
    config = project_data.get("label_config") if isinstance(project_data, dict) else None
    if not config:
        raise LsdeployError(f"Label Studio project {project} has no label config yet: set one in its "
                            "settings, or pass --label-config FILE", EXIT_USAGE)
    return config


def _read_json(path: str, what: str):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise LsdeployError(f"cannot read {what} file {path}: {exc.strerror}", EXIT_USAGE) from None
    if path.endswith(".jsonl"):
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as exc:
            raise LsdeployError(f"{what} file {path} is not JSON Lines: {exc}", EXIT_USAGE) from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise LsdeployError(f"{what} file {path} is not JSON: {exc}", EXIT_USAGE) from None


def load_tasks(path: str) -> list:
    """Tasks in Label Studio's import format: a list of {"data": {...}} (or of bare data objects)."""
    raw = _read_json(path, "tasks")
    items = raw if isinstance(raw, list) else [raw]
    tasks = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise LsdeployError(f"tasks file {path}: item {i} is not an object; use Label Studio's "
                                "import format [{\"data\": {...}}, ...]", EXIT_USAGE)
        tasks.append(dict(item) if isinstance(item.get("data"), dict) else {"data": item})
    if not tasks:
        raise LsdeployError(f"tasks file {path} holds no tasks", EXIT_USAGE)
    return tasks


def load_annotations(path: str) -> list:
    """Annotations for --fit: a Label Studio JSON export (tasks with `annotations`), a list of
    annotations (each with `result` and `task`), or webhook bodies ({action, annotation, task})."""
    raw = _read_json(path, "annotations")
    items = raw if isinstance(raw, list) else [raw]
    if not all(isinstance(i, dict) for i in items):
        raise LsdeployError(f"annotations file {path} must hold JSON objects (a Label Studio export)", EXIT_USAGE)
    pairs = annotation_pairs(items)
    if not pairs:
        raise LsdeployError(f"annotations file {path} holds no annotations: export the project from Label "
                            "Studio (JSON) with at least one annotated task", EXIT_USAGE)
    return items


def annotation_pairs(items: list) -> list:
    """[(task, annotation)] from any of the accepted shapes."""
    pairs = []
    for item in items:
        if isinstance(item.get("annotations"), list):  # an exported task
            task = {k: v for k, v in item.items() if k not in ("annotations", "predictions")}
            pairs.extend((task, a) for a in item["annotations"] if isinstance(a, dict))
        elif isinstance(item.get("annotation"), dict):  # a webhook body
            task = item.get("task") if isinstance(item.get("task"), dict) else {"id": item["annotation"].get("task")}
            pairs.append((task, item["annotation"]))
        elif isinstance(item.get("result"), list):  # a bare annotation
            task = item.get("task")
            pairs.append((task if isinstance(task, dict) else {"id": task}, item))
    return pairs


