"""Checking a backend's /predict answer against the label config, as Label Studio would need it.

Label Studio stores whatever a backend returns and shows nothing when it does not fit the
label config: a misspelled `from_name`, a label that is not in the config, a result `type`
that does not match the control tag, a span outside the text. `validate_predictions` finds
those before the backend ships; `preview` runs it on a live backend and `deploy` can run it
as a pre-flight check.

Every problem has a rule id (see RULES), a message and the JSON path of the offending value
in the /predict body, for example ``results[0].result[1].value.choices[0]``.

`sample_tasks` builds tasks from a label config's object tags when the user has none.
"""
from __future__ import annotations

import base64
import difflib
import io
import json
import math
import struct
import wave
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional

from .labelconfig import ControlTag, LabelConfigTags, ObjectTag, parse_tags

ERROR = "error"
WARNING = "warning"

# rule id -> what it requires (docs/preview.md lists the same table)
RULES = {
    "response": "the /predict body is a JSON object with a `results` list",
    "count": "one prediction per task, in task order: no task without one, none naming another task",
    "prediction": "each prediction is an object with a `result` list",
    "model-version": "each prediction has a non-empty `model_version`",
    "score": "`score` (per prediction and per region) is a number when present",
    "region": "each result item is an object with from_name, to_name, type and an object `value`",
    "from-name": "`from_name` is the name of a control tag in the label config",
    "to-name": "`to_name` is one of that control tag's object tags (its toName)",
    "type": "`type` is the control tag's name in lower case (Choices -> choices)",
    "choices": "choices are defined in the config; one only unless choice=\"multiple\"",
    "labels": "labels of a region are defined in the control tag",
    "rating": "rating is a whole number within 1..maxRating (default 5)",
    "number": "number is a number within the tag's min..max",
    "textarea": "textarea `text` is a string or a list of strings",
    "taxonomy": "taxonomy is a list of paths whose items are defined in the config",
    "datetime": "datetime is a string",
    "pairwise": "pairwise `selected` is \"left\" or \"right\"",
    "region-field": "region fields are present with the right types (start/end, x/y/width/height, points, ...)",
    "region-range": "regions lie inside their object: spans inside the text, image regions within 0..100 %",
    "region-text": "a span's `text` equals the task text between start and end",
    "relation": "a relation joins two region ids of the same result, with labels from <Relations>",
}

# Control tags whose regions carry labels, and the value key that holds them.
LABEL_KEYS = {
    "labels": "labels",
    "rectanglelabels": "rectanglelabels",
    "polygonlabels": "polygonlabels",
    "ellipselabels": "ellipselabels",
    "keypointlabels": "keypointlabels",
    "brushlabels": "brushlabels",
    "hypertextlabels": "hypertextlabels",  # older editors wrote "htmllabels"
    "paragraphlabels": "paragraphlabels",
    "timeserieslabels": "timeserieslabels",
    "timelinelabels": "timelinelabels",
    "vectorlabels": "vectorlabels",
}
IMAGE_OBJECTS = {"image"}
# Result types a plain <Labels> tag produces on an image (with a shape tool) or a video.
_LABELS_ON_IMAGE = {"labels", "rectanglelabels", "polygonlabels", "ellipselabels", "keypointlabels", "brushlabels"}
_LABELS_ON_VIDEO = {"labels", "videorectangle"}
# Controls whose values this module checks; any other control gets from_name/to_name/type only.
KNOWN_CONTROLS = set(LABEL_KEYS) | {
    "choices", "rectangle", "polygon", "ellipse", "keypoint", "brush", "textarea", "rating",
    "number", "datetime", "taxonomy", "videorectangle", "pairwise",
}
_EPS = 1e-4  # floating-point slack for x + width <= 100


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


def validate_predictions(label_config: str, tasks: list, response: Any) -> ValidationReport:
    """Check a /predict answer (`{"results": [...]}`, or the results list itself) for `tasks`
    (the tasks that were sent) against `label_config`. Raises LabelConfigError when the config
    itself is not XML."""
    validator = _Validator(parse_tags(label_config), list(tasks or []))
    validator.relation_labels = _relation_labels(label_config)
    return validator.run(response)


def _join(path: str, key) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)[:40]


def _short_list(items, limit: int = 12) -> str:
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "") if items else "(none)"


def _data_value(task: Optional[dict], key: str):
    """task.data[key]; a dotted key reads nested objects. None when absent."""
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        return None
    data = task["data"]
    if key in data:
        return data[key]
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


class _Validator:
    def __init__(self, tags: LabelConfigTags, tasks: list):
        self.tags = tags
        self.tasks = tasks
        self.problems: list[Problem] = []
        self.general: list[Problem] = []
        self.reports: list[TaskReport] = []
        self._sink: list = self.general
        self._task_index: Optional[int] = None
        self.relation_labels: set = set()

    def add(self, rule: str, path: str, message: str, severity: str = ERROR) -> None:
        problem = Problem(rule, path, message, severity, self._task_index)
        self.problems.append(problem)
        self._sink.append(problem)

    # -- body ------------------------------------------------------------------------------
    def run(self, response) -> ValidationReport:
        results = self._results(response)
        if results is not None:
            self._check_count(results)
            for i, item in enumerate(results):
                report = self._task_report(i)
                if isinstance(item, list):  # several predictions for one task
                    report.predictions = len(item)
                    if not item:
                        self.add("count", report.path, f"{self._task_name(i)} got an empty list of predictions, so "
                                 "Label Studio stores none for it: return one prediction per task, with "
                                 "\"result\": [] when the model has nothing for it")
                    for j, pred in enumerate(item):
                        self._prediction(pred, f"results[{i}][{j}]", i, report)
                else:
                    report.predictions = 1
                    self._prediction(item, report.path, i, report)
            for i in range(len(results), len(self.tasks)):
                report = self._task_report(i)
                why = ("the results list is empty, and then Label Studio stores no prediction for any task"
                       if not results else f"{len(results)} prediction(s) came back for {len(self.tasks)} task(s)")
                self.add("count", report.path, f"no prediction for {self._task_name(i)}: {why}; return one "
                         "prediction per task, with \"result\": [] when the model has nothing for it")
            self._task_index = None
            self._sink = self.general
        return ValidationReport(self.problems, self.reports, self.general)

    def _task(self, i: int):
        """The task results[i] answers (None beyond the tasks sent)."""
        return self.tasks[i] if i < len(self.tasks) else None

    def _task_id(self, i: int):
        task = self._task(i)
        return task.get("id") if isinstance(task, dict) else None

    def _task_report(self, i: int) -> TaskReport:
        """A new TaskReport for results[i]; problems found from now on belong to it."""
        report = TaskReport(i, self._task_id(i), f"results[{i}]")
        self.reports.append(report)
        self._task_index = i
        self._sink = report.problems
        return report

    def _task_name(self, i: int) -> str:
        task_id = self._task_id(i)
        return f"task {i + 1}" + (f" (id {task_id})" if task_id is not None else "")

    def _results(self, response):
        if isinstance(response, list):
            return response
        if not isinstance(response, dict):
            self.add("response", "$", f"the /predict body must be a JSON object with a 'results' list, "
                                      f"not {type(response).__name__}")
            return None
        if "results" not in response:
            keys = ", ".join(sorted(map(str, response))) or "none"
            self.add("response", "results", f"the /predict body has no 'results' list (keys: {keys}); "
                                            "Label Studio reads predictions from 'results'")
            return None
        results = response["results"]
        if not isinstance(results, list):
            self.add("response", "results", f"'results' must be a list with one prediction per task, "
                                            f"not {type(results).__name__}")
            return None
        return results

    def _check_count(self, results: list) -> None:
        """The batch as a whole; each task left without a prediction gets its own `count` error."""
        n, m = len(results), len(self.tasks)
        if n and n != m:
            self.add("count", "results",
                     f"{n} prediction(s) for {m} task(s): Label Studio needs one per task, in task order; with "
                     "another count it stores none of them (with exactly one, it asks again task by task)")

    # -- one prediction ------------------------------------------------------------------------
    def _prediction(self, pred, path: str, index: int, report: TaskReport) -> None:
        task = self._task(index)
        if not isinstance(pred, dict):
            self.add("prediction", path, f"a prediction must be an object with a 'result' list, "
                                         f"not {type(pred).__name__}")
            return
        self._order(pred, path, index)
        self._model_version(pred, _join(path, "model_version"))
        if "score" in pred:
            self._score(pred["score"], _join(path, "score"), "score",
                        "Label Studio rejects the whole batch of predictions")
        result = pred.get("result")
        if "result" not in pred:
            self.add("prediction", _join(path, "result"),
                     "the prediction has no 'result' list: Label Studio skips it (and logs an error)")
            return
        if not isinstance(result, list):
            self.add("prediction", _join(path, "result"),
                     f"'result' must be a list of regions, not {type(result).__name__}")
            return
        ids = {r.get("id") for r in result if isinstance(r, dict) and isinstance(r.get("id"), str)}
        for k, region in enumerate(result):
            row = Row(_join(_join(path, "result"), k), "", "")
            report.rows.append(row)
            self._sink = row.problems
            self._region(region, row, task, ids)
            self._sink = report.problems

    def _order(self, pred: dict, path: str, index: int) -> None:
        """A prediction that names its task (`task`, which Label Studio ignores) must sit at that
        task's position: Label Studio pairs predictions with tasks by position only."""
        named = pred.get("task")
        if isinstance(named, dict):  # the whole task echoed back
            named = named.get("id")
        ids = [self._task_id(j) for j in range(len(self.tasks))]
        if (not isinstance(named, (int, str)) or isinstance(named, bool) or index >= len(ids) or ids[index] is None
                or str(named) == str(ids[index])):
            return
        where = [j for j, task_id in enumerate(ids) if str(task_id) == str(named)]
        found = f" (that task is at results[{where[0]}])" if where else ""
        self.add("count", _join(path, "task"),
                 f"this prediction names task {_fmt(named)} but sits where {self._task_name(index)} is{found}: "
                 "Label Studio pairs predictions with tasks by position and would store it on the wrong "
                 "task; return the predictions in task order")

    def _model_version(self, pred: dict, path: str) -> None:
        """Label Studio 1.23 stores a missing version as the backend's /setup version (other callers
        get none), refuses the batch on null, and trims a blank one to no version at all."""
        fix = ("return ModelResponse(predictions=..., model_version=self.model_version) or set it on "
               "each prediction")
        if "model_version" not in pred:
            self.add("model-version", path, f"model_version is missing: Label Studio falls back to the "
                                            f"version /setup reported, other clients get none; {fix}")
            return
        version = pred["model_version"]
        if version is None:
            self.add("model-version", path, f"model_version is null: Label Studio rejects the whole batch; {fix}")
        elif isinstance(version, str) and not version.strip():
            self.add("model-version", path, f"model_version {version!r} is blank: Label Studio stores the "
                                            f"prediction without a version; {fix}")
        elif not isinstance(version, (str, int, float)) or isinstance(version, bool):
            self.add("model-version", path, f"model_version must be a string, not {type(version).__name__}")

    def _score(self, score, path: str, what: str, consequence: str) -> None:
        if score is None or _is_number(score):
            return
        if isinstance(score, str):
            try:
                if math.isfinite(float(score)):
                    self.add("score", path, f"{what} is the string {score!r}: Label Studio converts it, but "
                                            "return a number", WARNING)
                    return
            except ValueError:
                pass
        self.add("score", path, f"{what} must be a number, not {_fmt(score)}: {consequence}")

    # -- one result item -------------------------------------------------------------------------
    def _region(self, region, row: Row, task, ids: set) -> None:
        path = row.path
        if not isinstance(region, dict):
            row.type = "?"
            self.add("region", path, f"a result item must be an object, not {type(region).__name__}")
            return
        rtype = region.get("type")
        row.type = rtype if isinstance(rtype, str) else "?"
        value = region.get("value")
        row.summary = _summary(row.type, value) if isinstance(value, dict) else ""
        if "score" in region:
            self._score(region["score"], _join(path, "score"), "region score", "Label Studio cannot show it")
        for key in ("original_width", "original_height"):  # image size in pixels, beside `value`
            if key in region and region[key] is not None and not (_is_number(region[key]) and region[key] > 0):
                self.add("region-field", _join(path, key), f"{key} must be a positive number of pixels, "
                                                           f"not {_fmt(region[key])}")
        if rtype == "relation":
            row.summary = f"{region.get('from_id')} -> {region.get('to_id')}"
            self._relation(region, path, ids)
            return
        from_name, to_name = region.get("from_name"), region.get("to_name")
        control = None
        if not isinstance(from_name, str) or not from_name:
            self.add("from-name", _join(path, "from_name"),
                     f"from_name is missing: name the control tag ({_short_list(self.tags.controls)})")
        else:
            control = self.tags.controls.get(from_name)
            if control is None:
                self.add("from-name", _join(path, "from_name"),
                         f"from_name {from_name!r} is not a control tag in the label config"
                         f"{_did_you_mean(from_name, self.tags.controls)} (control tags: "
                         f"{_short_list(self.tags.controls)})")
        obj = None
        if not isinstance(to_name, str) or not to_name:
            self.add("to-name", _join(path, "to_name"), "to_name is missing: name the object tag the "
                                                        "region belongs to (the control tag's toName)")
        elif control is not None:
            if to_name not in control.to_name:
                self.add("to-name", _join(path, "to_name"),
                         f"to_name {to_name!r} is not an object tag of control {control.name!r}"
                         f"{_did_you_mean(to_name, control.to_name)} (its toName: {_short_list(control.to_name)})")
            else:
                obj = self.tags.objects.get(to_name)
        elif to_name not in self.tags.objects:
            self.add("to-name", _join(path, "to_name"),
                     f"to_name {to_name!r} is not an object tag in the label config"
                     f"{_did_you_mean(to_name, self.tags.objects)}")
        type_ok = False
        if control is not None:
            expected = _expected_types(control, obj)
            if not isinstance(rtype, str) or not rtype:
                self.add("type", _join(path, "type"),
                         f"type is missing: control {control.name!r} is <{control.type}>, so type is "
                         f"{_one_of(expected)}")
            elif rtype.lower() in expected and rtype not in expected:
                # Label Studio compares types case-insensitively; its own results are lower case.
                self.add("type", _join(path, "type"),
                         f"type {rtype!r} should be {rtype.lower()!r} (lower case, as Label Studio writes it)",
                         WARNING)
                rtype = rtype.lower()
                type_ok = True
            elif rtype not in expected:
                self.add("type", _join(path, "type"),
                         f"type {rtype!r} does not match control {control.name!r} (<{control.type}>): "
                         f"expected {_one_of(expected)}")
            else:
                type_ok = True
        if not isinstance(value, dict):
            self.add("region", _join(path, "value"),
                     "value is missing: put the region's content in an object under 'value'" if value is None
                     else f"value must be an object, not {type(value).__name__}")
            return
        if control is None or not type_ok:
            return
        if control.type.lower() not in KNOWN_CONTROLS:
            return  # unknown control tag: from_name, to_name and type are all we know
        self._value(control, obj, rtype, value, _join(path, "value"), task)

    def _relation(self, region: dict, path: str, ids: set) -> None:
        for key in ("from_id", "to_id"):
            ref = region.get(key)
            if not isinstance(ref, str) or not ref:
                self.add("relation", _join(path, key), f"a relation needs {key}: the id of a region in "
                                                       "the same result")
            elif ref not in ids:
                self.add("relation", _join(path, key), f"{key} {ref!r} is not the id of a region in this "
                                                       f"prediction's result (ids: {_short_list(sorted(ids))})")
        direction = region.get("direction")
        if direction is not None and direction not in ("right", "left", "bi"):
            self.add("relation", _join(path, "direction"),
                     f"direction {_fmt(direction)} is not one of 'right', 'left', 'bi'")
        labels = region.get("labels")
        allowed = self.relation_labels
        if labels is not None:
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                self.add("relation", _join(path, "labels"), "relation labels must be a list of strings")
            elif allowed:
                for i, label in enumerate(labels):
                    if label not in allowed:
                        self.add("relation", _join(_join(path, "labels"), i),
                                 f"relation label {label!r} is not in <Relations> (allowed: {_short_list(allowed)})")

    # -- values ------------------------------------------------------------------------------------
    def _value(self, control: ControlTag, obj: Optional[ObjectTag], rtype: str, value: dict, path: str, task):
        kind = control.type.lower()
        otype = obj.type.lower() if obj is not None else ""
        if kind == "choices":
            self._choices(control, value, path, task)
        elif kind == "taxonomy":
            self._taxonomy(control, value, path, task)
        elif kind == "rating":
            self._rating(control, value, path)
        elif kind == "number":
            self._number(control, value, path)
        elif kind == "textarea":
            self._textarea(value, path)
        elif kind == "datetime":
            if not isinstance(value.get("datetime"), str):
                self.add("datetime", _join(path, "datetime"), "value.datetime must be a date/time string")
        elif kind == "pairwise":
            if value.get("selected") not in ("left", "right"):
                self.add("pairwise", _join(path, "selected"),
                         f"value.selected must be 'left' or 'right', not {_fmt(value.get('selected'))}")
        if rtype in LABEL_KEYS:
            self._labels(control, LABEL_KEYS[rtype], value, path, task)
        elif rtype == "videorectangle" and "labels" in value:
            self._labels(control, "labels", value, path, task)
        self._geometry(rtype, otype, obj, value, path, task)

    def _allowed(self, control: ControlTag, task) -> Optional[set]:
        """Labels/choices the config allows; None when they cannot be known (dynamic from an API)."""
        allowed = set(control.labels)
        dynamic = control.attrs.get("value", "")
        if dynamic.startswith("$"):
            items = _data_value(task, dynamic[1:])
            if not isinstance(items, list):
                return None
            allowed |= set(_dynamic_values(items))
        if control.attrs.get("apiUrl"):
            return None
        return allowed if allowed else None

    def _choices(self, control, value, path, task):
        choices = value.get("choices")
        cpath = _join(path, "choices")
        if choices is None:
            self.add("choices", cpath, "value.choices is missing: a list with the chosen value(s)")
            return
        if not isinstance(choices, list):
            self.add("choices", cpath, f"value.choices must be a list such as [{_first(control.labels)!r}], "
                                       f"not {type(choices).__name__}")
            return
        if not choices:
            self.add("choices", cpath, "value.choices is empty: Label Studio shows no choice", WARNING)
            return
        mode = control.attrs.get("choice", "single")
        if mode in ("single", "single-radio") and len(choices) > 1:
            self.add("choices", cpath, f"{len(choices)} choices for <Choices name={control.name!r}> with "
                                       f"choice={mode!r}: only one is allowed (set choice=\"multiple\" "
                                       "in the config to allow several)")
        allowed = self._allowed(control, task)
        for i, choice in enumerate(choices):
            items = choice if isinstance(choice, list) else [choice]  # allowNested paths
            for item in items:
                self._allowed_name("choices", "choice", control, item, allowed, _join(cpath, i))

    def _taxonomy(self, control, value, path, task):
        paths = value.get("taxonomy")
        tpath = _join(path, "taxonomy")
        if not isinstance(paths, list) or not paths:
            self.add("taxonomy", tpath, "value.taxonomy must be a non-empty list of paths, "
                                        "such as [[\"Animal\", \"Cat\"]]")
            return
        allowed = self._allowed(control, task)
        for i, item in enumerate(paths):
            if not isinstance(item, list) or not item or not all(isinstance(x, str) for x in item):
                self.add("taxonomy", _join(tpath, i), f"each taxonomy entry is a list of strings (a path), "
                                                      f"not {_fmt(item)}")
                continue
            for j, name in enumerate(item):
                if allowed is not None and name not in allowed:
                    self.add("taxonomy", _join(_join(tpath, i), j),
                             f"{name!r} is not a choice of <Taxonomy name={control.name!r}>"
                             f"{_did_you_mean(name, allowed)}")

    def _labels(self, control, key: str, value, path, task):
        labels = value.get(key)
        lpath = _join(path, key)
        if labels is None:
            legacy = " (\"htmllabels\" is the old name of this key)" if "htmllabels" in value else ""
            self.add("labels", lpath, f"value.{key} is missing: the region's label(s), for example "
                                      f"[{_first(control.labels)!r}]{legacy}")
            return
        if not isinstance(labels, list):
            self.add("labels", lpath, f"value.{key} must be a list of label names, not {type(labels).__name__}")
            return
        if not labels:
            self.add("labels", lpath, f"value.{key} is empty: the region has no label", WARNING)
            return
        if control.attrs.get("choice") in ("single", "single-radio") and len(labels) > 1:
            self.add("labels", lpath, f"{len(labels)} labels for <{control.type} name={control.name!r}> "
                                      "with choice=\"single\"")
        allowed = self._allowed(control, task)
        for i, label in enumerate(labels):
            self._allowed_name("labels", "label", control, label, allowed, _join(lpath, i))

    def _allowed_name(self, rule: str, noun: str, control, name, allowed, path) -> None:
        """One choice or label: a string the control allows (`allowed` None: any)."""
        if not isinstance(name, str):
            self.add(rule, path, f"a {noun} must be a string, not {_fmt(name)}")
        elif allowed is not None and name not in allowed:
            self.add(rule, path, f"{noun} {name!r} is not in <{control.type} name={control.name!r}>"
                                 f"{_did_you_mean(name, allowed)} (allowed: {_short_list(control.labels or allowed)})")

    def _rating(self, control, value, path):
        rating = value.get("rating")
        rpath = _join(path, "rating")
        try:
            top = int(control.attrs.get("maxRating", 5))
        except ValueError:
            top = 5
        if not _is_number(rating) or float(rating) != int(rating):
            self.add("rating", rpath, f"value.rating must be a whole number within 1..{top}, not {_fmt(rating)}")
        elif not 1 <= rating <= top:
            self.add("rating", rpath, f"rating {_fmt(rating)} is outside 1..{top} "
                                      f"(maxRating of <Rating name={control.name!r}>)")

    def _number(self, control, value, path):
        number = value.get("number")
        npath = _join(path, "number")
        if not _is_number(number):
            self.add("number", npath, f"value.number must be a number, not {_fmt(number)}")
            return
        low, high = _float_attr(control.attrs, "min"), _float_attr(control.attrs, "max")
        if (low is not None and number < low) or (high is not None and number > high):
            bounds = f"{'' if low is None else f'{low:g}'}..{'' if high is None else f'{high:g}'}"
            self.add("number", npath, f"number {_fmt(number)} is outside {bounds} (min/max of "
                                      f"<Number name={control.name!r}>)")

    def _textarea(self, value, path):
        text = value.get("text")
        tpath = _join(path, "text")
        if isinstance(text, str):
            return
        if not isinstance(text, list):
            self.add("textarea", tpath, f"value.text must be a list of strings, not {_fmt(text)}")
            return
        for i, item in enumerate(text):
            if not isinstance(item, str):
                self.add("textarea", _join(tpath, i), f"each text entry must be a string, not {_fmt(item)}")

    # -- regions ------------------------------------------------------------------------------------
    def _geometry(self, rtype: str, otype: str, obj, value: dict, path: str, task):
        if rtype in ("rectanglelabels", "rectangle"):
            self._box(value, path)
        elif rtype in ("polygonlabels", "polygon"):
            self._polygon(value, path)
        elif rtype in ("ellipselabels", "ellipse"):
            self._points(value, path, ("x", "y"))
            for key in ("radiusX", "radiusY"):
                self._bounded(value, path, key, 0, 100, "percent of the image size")
        elif rtype in ("keypointlabels", "keypoint"):
            self._points(value, path, ("x", "y"))
        elif rtype in ("brushlabels", "brush"):
            self._brush(value, path)
        elif rtype == "videorectangle":
            self._video(value, path)
        elif rtype == "hypertextlabels" or (rtype == "labels" and otype == "hypertext"):
            self._xpath_span(value, path)
        elif rtype == "paragraphlabels":
            self._paragraph_span(value, path, obj, task)
        elif rtype == "timeserieslabels":
            self._interval(value, path, numeric=False)
        elif rtype == "labels" and otype in ("audio", "audioplus", "video"):
            self._interval(value, path, numeric=True)
        elif rtype == "labels" and otype == "text":
            self._text_span(value, path, obj, task)

    def _need_numbers(self, value, path, keys, what) -> bool:
        ok = True
        for key in keys:
            if key not in value:
                self.add("region-field", _join(path, key), f"{what} needs {', '.join(keys)}: {key} is missing")
                ok = False
            elif not _is_number(value[key]):
                self.add("region-field", _join(path, key), f"{key} must be a number, not {_fmt(value[key])}")
                ok = False
        return ok

    def _bounded(self, value, path, key, low, high, unit) -> None:
        if key not in value:
            return
        if not _is_number(value[key]):
            self.add("region-field", _join(path, key), f"{key} must be a number, not {_fmt(value[key])}")
        elif not low - _EPS <= value[key] <= high + _EPS:
            self.add("region-range", _join(path, key), f"{key}={value[key]:g} is outside {low}..{high} ({unit})")

    def _box(self, value, path):
        if not self._need_numbers(value, path, ("x", "y", "width", "height"), "a rectangle"):
            return
        for key in ("x", "y", "width", "height"):
            self._bounded(value, path, key, 0, 100, "percent of the image size")
        x, y, w, h = (value[k] for k in ("x", "y", "width", "height"))
        rotation = value.get("rotation") or 0
        if "rotation" in value and value["rotation"] is not None and not _is_number(value["rotation"]):
            self.add("region-field", _join(path, "rotation"), f"rotation must be a number of degrees, "
                                                              f"not {_fmt(value['rotation'])}")
            return
        if rotation == 0 and 0 <= x <= 100 and 0 <= w <= 100 and x + w > 100 + _EPS:
            self.add("region-range", _join(path, "width"),
                     f"x + width = {x + w:g} > 100: the box extends past the right edge of the image "
                     "(coordinates are percent of the image size, not pixels)")
        if rotation == 0 and 0 <= y <= 100 and 0 <= h <= 100 and y + h > 100 + _EPS:
            self.add("region-range", _join(path, "height"),
                     f"y + height = {y + h:g} > 100: the box extends past the bottom edge of the image "
                     "(coordinates are percent of the image size, not pixels)")

    def _points(self, value, path, keys):
        if self._need_numbers(value, path, keys, "a point"):
            for key in keys:
                self._bounded(value, path, key, 0, 100, "percent of the image size")

    def _polygon(self, value, path):
        points = value.get("points")
        ppath = _join(path, "points")
        if not isinstance(points, list):
            self.add("region-field", ppath, "a polygon needs points: a list of [x, y] pairs in percent")
            return
        if len(points) < 3:
            self.add("region-field", ppath, f"a polygon with {len(points)} point(s) encloses nothing", WARNING)
        for i, point in enumerate(points):
            if not (isinstance(point, list) and len(point) == 2 and all(_is_number(c) for c in point)):
                self.add("region-field", _join(ppath, i), f"each point is [x, y] with numbers, not {_fmt(point)}")
            elif not all(-_EPS <= c <= 100 + _EPS for c in point):
                self.add("region-range", _join(ppath, i),
                         f"point {_fmt(point)} is outside 0..100 (percent of the image size)")

    def _brush(self, value, path):
        fmt = value.get("format", "rle")
        if fmt != "rle":
            self.add("region-field", _join(path, "format"), f"brush format must be 'rle', not {_fmt(fmt)}")
            return
        rle = value.get("rle")
        if not isinstance(rle, list) or not rle or not all(_is_int(v) and 0 <= v <= 255 for v in rle):
            self.add("region-field", _join(path, "rle"), "a brush region needs rle: a non-empty list of "
                                                         "bytes (0..255), as label-studio-converter encodes it")

    def _video(self, value, path):
        sequence = value.get("sequence")
        spath = _join(path, "sequence")
        if not isinstance(sequence, list) or not sequence:
            self.add("region-field", spath, "a video rectangle needs sequence: a non-empty list of frames "
                                            "{frame, x, y, width, height, enabled}")
            return
        for i, frame in enumerate(sequence):
            fpath = _join(spath, i)
            if not isinstance(frame, dict):
                self.add("region-field", fpath, "each sequence entry must be an object")
                continue
            if not (_is_int(frame.get("frame")) and frame["frame"] >= 1):
                self.add("region-field", _join(fpath, "frame"), f"frame must be a frame number >= 1, "
                                                                f"not {_fmt(frame.get('frame'))}")
            self._box(frame, fpath)

    def _interval(self, value, path, numeric: bool):
        start, end = value.get("start"), value.get("end")
        for key in ("start", "end"):
            if key not in value:
                self.add("region-field", _join(path, key), f"the region needs start and end: {key} is missing")
                return
        if numeric:
            for key in ("start", "end"):
                if not _is_number(value[key]):
                    self.add("region-field", _join(path, key), f"{key} must be a number of seconds, "
                                                               f"not {_fmt(value[key])}")
                    return
                if value[key] < 0:
                    self.add("region-range", _join(path, key), f"{key}={value[key]:g} is negative")
        if _is_number(start) and _is_number(end) and start > end:
            self.add("region-range", _join(path, "end"), f"end {end:g} is before start {start:g}")

    def _text_span(self, value, path, obj, task):
        for key in ("start", "end"):
            if key not in value:
                self.add("region-field", _join(path, key),
                         f"a text span needs start and end (character offsets into the text): {key} is missing")
                return
            if not _is_int(value[key]):
                self.add("region-field", _join(path, key),
                         f"{key} must be an integer character offset, not {_fmt(value[key])}")
                return
        start, end = value["start"], value["end"]
        text = None
        if obj is not None and obj.attrs.get("valueType", "text") != "url":
            text = _data_value(task, obj.value)
        size = len(text) if isinstance(text, str) else None
        if start < 0 or (size is not None and start > size):
            self.add("region-range", _join(path, "start"),
                     f"start {start} is outside the text (0..{size if size is not None else ''})")
            return
        if end < start:
            self.add("region-range", _join(path, "end"), f"end {end} is before start {start}")
            return
        if size is not None and end > size:
            self.add("region-range", _join(path, "end"),
                     f"end {end} is past the end of the text ({size} characters in data.{obj.value})")
            return
        if start == end:
            self.add("region-range", _join(path, "end"), f"empty span: start and end are both {start}", WARNING)
        if isinstance(text, str) and "text" in value:
            given = value["text"]
            if given != text[start:end]:
                self.add("region-text", _join(path, "text"),
                         f"text {_fmt(given)} does not match the task text at [{start}:{end}], which is "
                         f"{text[start:end]!r} (offsets count Python characters of data.{obj.value})"
                         f"{self._other_task_hint(obj.value, start, end, given)}")

    def _other_task_hint(self, key: str, start: int, end: int, given) -> str:
        """When a span's text is that of another task, the results are likely out of task order."""
        for j, other in enumerate(self.tasks):
            text = _data_value(other, key)
            if j != self._task_index and isinstance(text, str) and given and text[start:end] == given:
                return (f"; it is the text of {self._task_name(j)}: return the predictions in task order "
                        f"(Label Studio pairs them with tasks by position)")
        return ""

    def _xpath_span(self, value, path):
        for key in ("start", "end"):
            if not isinstance(value.get(key), str):
                self.add("region-field", _join(path, key),
                         f"a HyperText span needs {key}: an XPath string such as '/p[1]/text()[1]'")
        for key in ("startOffset", "endOffset"):
            if not (_is_int(value.get(key)) and value[key] >= 0):
                self.add("region-field", _join(path, key),
                         f"{key} must be a character offset (integer >= 0), not {_fmt(value.get(key))}")

    def _paragraph_span(self, value, path, obj, task):
        paragraphs = _data_value(task, obj.value) if obj is not None else None
        count = len(paragraphs) if isinstance(paragraphs, list) else None
        for key in ("start", "end"):
            raw = value.get(key)
            index = raw if _is_int(raw) else (int(raw) if isinstance(raw, str) and raw.isdigit() else None)
            if index is None:
                self.add("region-field", _join(path, key),
                         f"{key} must be a paragraph index (an integer or a string of digits), not {_fmt(raw)}")
            elif count is not None and index >= count:
                self.add("region-range", _join(path, key),
                         f"{key} paragraph {index} does not exist ({count} paragraphs in data.{obj.value})")
        for key in ("startOffset", "endOffset"):
            if key in value and not (_is_int(value[key]) and value[key] >= 0):
                self.add("region-field", _join(path, key),
                         f"{key} must be a character offset (integer >= 0), not {_fmt(value[key])}")


def _expected_types(control: ControlTag, obj: Optional[ObjectTag]) -> set:
    kind = control.type.lower()
    if kind == "labels" and obj is not None:
        otype = obj.type.lower()
        if otype in IMAGE_OBJECTS:
            return set(_LABELS_ON_IMAGE)
        if otype == "video":
            return set(_LABELS_ON_VIDEO)
    return {kind}


def _one_of(types: set) -> str:
    ordered = sorted(types, key=lambda t: (t != "labels", t))
    return repr(ordered[0]) if len(ordered) == 1 else "one of " + ", ".join(map(repr, ordered))


def _did_you_mean(name: str, candidates) -> str:
    matches = difflib.get_close_matches(name, [str(c) for c in candidates], n=1, cutoff=0.6)
    if not matches:
        lowered = {str(c).lower(): str(c) for c in candidates}
        if name.lower() in lowered:
            matches = [lowered[name.lower()]]
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def _first(labels) -> str:
    return next(iter(labels), "Label")


def _float_attr(attrs: dict, key: str) -> Optional[float]:
    try:
        return float(attrs[key]) if key in attrs else None
    except ValueError:
        return None


def _dynamic_values(items) -> list:
    """Values of dynamic choices/labels in task data: [{"value", "children": [...]}, ...]."""
    out, stack = [], list(items)
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("value"), str):
                out.append(item["value"])
            if isinstance(item.get("alias"), str):
                out.append(item["alias"])
            stack.extend(item.get("children") or [])
        elif isinstance(item, str):
            out.append(item)
    return out


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


# -- sample tasks ---------------------------------------------------------------------------------
SAMPLE_TEXTS = (
    "Alice Johnson flew from Paris to Berlin on Monday to meet the team at ACME Corporation.",
    "The new phone has a bright screen, but the battery is empty before lunch.",
    "Dr. Kim presented the results at a conference in Tokyo in March, and the audience loved it.",
)
SAMPLE_PARAGRAPHS = (
    ("Alice", "Hi Bob, did the package arrive?"),
    ("Bob", "Yes, this morning. Everything was intact."),
    ("Alice", "Great, thanks for letting me know!"),
)


def sample_files(label_config: str, count: int = 2) -> dict:
    """Files the sample tasks link to: {name: (content type, bytes)}."""
    tags = parse_tags(label_config)
    files = {}
    for i in range(count):
        for obj in tags.objects.values():
            kind = obj.type.lower()
            if kind == "image":
                files[f"sample-{i + 1}.png"] = ("image/png", _png(64, 48, i))
            elif kind in ("audio", "audioplus"):
                files[f"sample-{i + 1}.wav"] = ("audio/wav", _wav(440 + 110 * i))
            elif kind == "timeseries":
                files[f"{obj.name}-{i + 1}.csv"] = ("text/csv", _timeseries_csv(label_config, obj, i).encode())
            elif kind in ("text", "hypertext") and obj.attrs.get("valueType") == "url":
                body = SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]
                if kind == "hypertext":
                    body = f"<div><p>{body}</p></div>"
                files[f"sample-{i + 1}.{'html' if kind == 'hypertext' else 'txt'}"] = (
                    "text/html" if kind == "hypertext" else "text/plain", body.encode())
    return files


def sample_tasks(label_config: str, count: int = 2, files_url: Optional[str] = None) -> list:
    """`count` tasks whose data fits the label config's object tags, keyed by each object's value
    ($name). Files (images, audio, time series) link to `files_url` (a server that serves
    `sample_files`) or, without it, are inline data: URIs."""
    tags = parse_tags(label_config)
    files = sample_files(label_config, count)

    def link(name: str) -> str:
        if files_url:
            return f"{files_url.rstrip('/')}/{name}"
        ctype, body = files[name]
        return f"data:{ctype};base64,{base64.b64encode(body).decode()}"

    tasks = []
    for i in range(count):
        text = SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]
        data: dict = {}
        for obj in tags.objects.values():
            kind = obj.type.lower()
            if kind == "image":
                url = link(f"sample-{i + 1}.png")
                data[obj.value] = [url] if obj.attrs.get("valueList") else url
            elif kind in ("audio", "audioplus"):
                data[obj.value] = link(f"sample-{i + 1}.wav")
            elif kind == "video":
                data[obj.value] = f"{(files_url or 'http://127.0.0.1').rstrip('/')}/sample-{i + 1}.mp4"
            elif kind == "timeseries":
                if obj.attrs.get("valueType") == "json":
                    data[obj.value] = _timeseries_columns(label_config, obj, i)
                else:
                    data[obj.value] = link(f"{obj.name}-{i + 1}.csv")
            elif kind == "paragraphs":
                name_key, text_key = obj.attrs.get("nameKey", "author"), obj.attrs.get("textKey", "text")
                data[obj.value] = [{name_key: a, text_key: t} for a, t in SAMPLE_PARAGRAPHS]
            elif kind == "table":
                data[obj.value] = {"Name": "Alice", "City": "Paris", "Age": 31 + i}
            elif kind in ("text", "hypertext") and obj.attrs.get("valueType") == "url":
                data[obj.value] = link(f"sample-{i + 1}.{'html' if kind == 'hypertext' else 'txt'}")
            elif kind == "hypertext":
                data[obj.value] = f"<div><p>{text}</p></div>"
            else:
                data.setdefault(obj.value, text)
        for control in tags.controls.values():  # dynamic choices/labels read from task data
            dynamic = control.attrs.get("value", "")
            if dynamic.startswith("$") and dynamic[1:] not in data:
                data[dynamic[1:]] = [{"value": f"Option {c}"} for c in "ABC"]
        tasks.append({"id": i + 1, "data": data})
    return tasks


def _relation_labels(label_config: str) -> set:
    """Values of <Relation> tags inside <Relations> (a tag without name/toName, so not a control)."""
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError:
        return set()
    return {r.attrib.get("alias") or r.attrib["value"] for group in root.iter("Relations")
            for r in group.iter("Relation") if r.attrib.get("value")}


def _channels(label_config: str, obj: ObjectTag) -> list:
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError:
        return []
    for node in root.iter(obj.type):
        if node.attrib.get("name") == obj.name:
            return [c.attrib["column"] for c in node.iter("Channel") if c.attrib.get("column")]
    return []


def _timeseries_columns(label_config: str, obj: ObjectTag, seed: int) -> dict:
    time_column = obj.attrs.get("timeColumn") or "time"
    columns = _channels(label_config, obj) or ["value"]
    rows = 50
    data = {time_column: list(range(rows))}
    for c, column in enumerate(columns):
        data[column] = [round(math.sin((t + seed * 7) / (4.0 + c)) * 10, 3) for t in range(rows)]
    return data


def _timeseries_csv(label_config: str, obj: ObjectTag, seed: int) -> str:
    data = _timeseries_columns(label_config, obj, seed)
    sep = obj.attrs.get("sep", ",")
    names = list(data)
    lines = [sep.join(names)]
    for r in range(len(data[names[0]])):
        lines.append(sep.join(str(data[n][r]) for n in names))
    return "\n".join(lines) + "\n"


def _png(width: int, height: int, seed: int) -> bytes:
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter: none
        for x in range(width):
            rows += bytes(((x * 4 + seed * 60) % 256, (y * 5) % 256, (128 + seed * 40) % 256))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(rows))) + chunk(b"IEND", b"")


def _wav(freq: float, seconds: float = 0.5, rate: int = 8000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * freq * t / rate)))
                               for t in range(int(rate * seconds))))
    return out.getvalue()
