"""`validate_predictions`: the walk over a /predict body, its predictions and their result items
(response shape, count and order, model_version, score, from_name/to_name/type, relations); the
checks of each item's `value` are in `values`."""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from typing import Any, Optional

from ..labelconfig import ControlTag, LabelConfigTags, ObjectTag, parse_tags
from .common import _did_you_mean, _fmt, _is_number, _join, _short_list
from .report import Problem, Row, TaskReport, ValidationReport, _summary
from .rules import _LABELS_ON_IMAGE, _LABELS_ON_VIDEO, ERROR, IMAGE_OBJECTS, KNOWN_CONTROLS, WARNING
from .values import _ValueChecks


def validate_predictions(label_config: str, tasks: list, response: Any) -> ValidationReport:
    """Check a /predict answer (`{"results": [...]}`, or the results list itself) for `tasks`
    (the tasks that were sent) against `label_config`. Raises LabelConfigError when the config
    itself is not XML."""
    validator = _Validator(parse_tags(label_config), list(tasks or []))
    validator.relation_labels = _relation_labels(label_config)
    return validator.run(response)


class _Validator(_ValueChecks):
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


def _relation_labels(label_config: str) -> set:
    """Values of <Relation> tags inside <Relations> (a tag without name/toName, so not a control)."""
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError:
        return set()
    return {r.attrib.get("alias") or r.attrib["value"] for group in root.iter("Relations")
            for r in group.iter("Relation") if r.attrib.get("value")}
