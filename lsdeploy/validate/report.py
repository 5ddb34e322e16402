"""What a check returns: Problem (one broken rule), Row (one result item), TaskReport (one
task's predictions) and ValidationReport (the whole /predict body)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from .common import _fmt, _is_number
from .rules import ERROR, LABEL_KEYS, WARNING


@dataclass(frozen=True)
class Problem:
    rule: str
    path: str
    message: str
    severity: str = ERROR
    task: Optional[int] = None  # index of the task in the request, when it belongs to one

    def __str__(self) -> str:
        tag = "" if self.severity == ERROR else f"{self.severity}: "
        return f"{tag}{self.path}: {self.message} [{self.rule}]"

    def to_dict(self) -> dict:
        return {"rule": self.rule, "path": self.path, "message": self.message,
                "severity": self.severity, "task": self.task}


@dataclass
class Row:
    """One result item (region) of one prediction: a line of the per-task table."""

    path: str
    type: str
    summary: str
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(p.severity == ERROR for p in self.problems)

    def to_dict(self) -> dict:
        return {"path": self.path, "type": self.type, "summary": self.summary, "ok": self.ok,
                "problems": [p.to_dict() for p in self.problems]}


@dataclass
class TaskReport:
    index: int
    task_id: Any
    path: str  # results[i]
    predictions: int = 0
    rows: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # about the prediction itself (score, version, ...)

    @property
    def ok(self) -> bool:
        """The task got at least one prediction, and nothing in it is an error."""
        return (self.predictions > 0 and not any(p.severity == ERROR for p in self.problems)
                and all(r.ok for r in self.rows))

    @property
    def status(self) -> str:
        """"no prediction", "problem", "empty" (valid, but no regions: Label Studio stores a
        prediction with nothing to pre-annotate) or "OK"."""
        if not self.predictions:
            return "no prediction"
        if not self.ok:
            return "problem"
        return "empty" if not self.rows else "OK"

    def to_dict(self) -> dict:
        return {"index": self.index, "task_id": self.task_id, "path": self.path, "ok": self.ok,
                "status": self.status, "predictions": self.predictions, "rows": [r.to_dict() for r in self.rows],
                "problems": [p.to_dict() for p in self.problems]}


@dataclass
class ValidationReport:
    problems: list  # every problem, in the order found
    tasks: list  # TaskReport per task (and per extra prediction beyond the tasks)
    general: list  # problems about the whole body (response, count)

    @property
    def errors(self) -> list:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def valid(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"valid": self.valid, "errors": len(self.errors), "warnings": len(self.warnings),
                "problems": [p.to_dict() for p in self.problems],
                "general": [p.to_dict() for p in self.general],
                "tasks": [t.to_dict() for t in self.tasks]}


def _summary(rtype: str, value: dict, width: int = 60) -> str:
    """A short human summary of a result value for the report table."""
    key = LABEL_KEYS.get(rtype)
    parts = []
    if rtype == "choices":
        choices = value.get("choices")
        parts.append(", ".join(map(str, choices)) if isinstance(choices, list) else _fmt(choices))
    elif rtype in ("rating", "number", "datetime"):
        parts.append(str(value.get(rtype)))
    elif rtype == "textarea":
        text = value.get("text")
        parts.append(" | ".join(map(str, text)) if isinstance(text, list) else str(text))
    elif rtype == "taxonomy":
        paths = value.get("taxonomy")
        parts.append(", ".join("/".join(map(str, p)) if isinstance(p, list) else str(p) for p in paths)
                     if isinstance(paths, list) else _fmt(paths))
    else:
        if key and isinstance(value.get(key), list):
            parts.append(", ".join(map(str, value[key])))
        if all(k in value for k in ("x", "y", "width", "height")):
            parts.append("x={x} y={y} w={width} h={height}".format(**{k: _num(value[k]) for k in ("x", "y", "width", "height")}))
        elif all(k in value for k in ("x", "y")):
            parts.append(f"x={_num(value['x'])} y={_num(value['y'])}")
        elif isinstance(value.get("points"), list):
            parts.append(f"{len(value['points'])} points")
        if "start" in value and "end" in value:
            parts.append(f"[{value['start']}:{value['end']}]")
        if isinstance(value.get("text"), str):
            parts.append(repr(value["text"]))
        if not parts:
            parts.append(json.dumps(value, default=str, sort_keys=True))
    text = " ".join(p for p in parts if p)
    return text if len(text) <= width else text[: width - 3] + "..."


def _num(v) -> str:
    return f"{v:.4g}" if _is_number(v) else str(v)
