"""Checks of one result item's `value` for its control tag: choices, taxonomy, labels, rating,
number, text, and the geometry of regions (boxes, polygons, points, brushes, video frames,
intervals, text/HyperText/paragraph spans).

`_ValueChecks` is a mixin of `validator._Validator`, which provides `add(rule, path, message,
severity)`, `tasks`, `_task_index` and `_task_name(i)`."""
from __future__ import annotations

from typing import Optional

from ..labelconfig import ControlTag, ObjectTag
from .common import _did_you_mean, _fmt, _is_int, _is_number, _join, _short_list
from .rules import _EPS, LABEL_KEYS, WARNING


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


class _ValueChecks:
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
