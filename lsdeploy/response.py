"""`ModelResponse` and `PredictionValue`: what `predict` may return.

Same names, constructor keywords and methods as the reference SDK (without pydantic).
Fields Label Studio understands beyond result/score/model_version (for example
`cluster`, `neighbors`, `mislabeling`) are kept as given.

Like the reference, a `ModelResponse` turns dict predictions into `PredictionValue`s (so
`prediction.result` works in model code and tests) and accepts label-studio-sdk's
`PredictionValue` or any other pydantic model, which it keeps as the caller's objects and
serializes with their own `model_dump()`.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional


class PredictionValue:
    """One prediction for one task: a list of result regions, a score, a model version."""

    def __init__(self, result: list | None = None, score: float | None = 0.0,
                 model_version: str | None = None, **extra: Any):
        self.result = list(result) if result is not None else []
        self.score = score
        self.model_version = model_version
        self.extra = extra

    def serialize(self) -> dict:
        out = dict(self.extra) if self.extra else {}
        out["result"] = [r.serialize() if hasattr(r, "serialize") else r for r in self.result] if self.result else []
        if self.score is not None:
            out["score"] = self.score
        if self.model_version:
            out["model_version"] = str(self.model_version)
        return out

    model_dump = serialize

    def __getattr__(self, name):  # extra fields read like attributes, as pydantic allowed
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(name)

    def __repr__(self):
        return f"PredictionValue({self.serialize()!r})"

    def __eq__(self, other):
        return isinstance(other, PredictionValue) and self.serialize() == other.serialize()

    @classmethod
    def from_dict(cls, data: dict) -> "PredictionValue":
        """A dict prediction as a PredictionValue; keys beyond result/score/model_version are kept."""
        extra = {k: v for k, v in data.items() if k not in ("result", "score", "model_version")}
        return cls(result=data.get("result"), score=data.get("score", 0.0), model_version=data.get("model_version"),
                   **extra)


def is_pydantic(item) -> bool:
    """A pydantic model (v2's model_dump, v1's dict), such as label-studio-sdk's PredictionValue."""
    return callable(getattr(item, "model_dump", None)) or (
        callable(getattr(item, "dict", None)) and hasattr(item, "__fields__"))


def dump(item) -> dict:
    """A foreign (pydantic) prediction as the dict Label Studio reads: its own serializer, with the
    fields it left unset (None) left out rather than sent as null."""
    data = item.model_dump() if callable(getattr(item, "model_dump", None)) else item.dict()
    return {k: v for k, v in data.items() if v is not None or k == "result"}


def _coerce(item):
    if isinstance(item, PredictionValue):
        return item
    if isinstance(item, dict):
        return PredictionValue.from_dict(item)
    if isinstance(item, (list, tuple)):
        return [_coerce(i) for i in item]
    if is_pydantic(item):
        return item
    raise TypeError(
        f"a prediction must be a dict, a PredictionValue (lsdeploy's or label-studio-sdk's), another "
        f"pydantic model or a list of them, not {type(item).__name__}"
    )


def _set_version(prediction, version: str) -> None:
    """Give a prediction without a model version `version` (a foreign object only if it has the field)."""
    if isinstance(prediction, dict):  # appended to .predictions after the response was made
        if not prediction.get("model_version"):
            prediction["model_version"] = version
    elif getattr(prediction, "model_version", "absent") in (None, ""):
        prediction.model_version = version


def _each(predictions) -> Iterable:
    for item in predictions:
        if isinstance(item, list):
            yield from item
        else:
            yield item


class ModelResponse:
    """Predictions for a batch of tasks, one item per task in task order."""

    def __init__(self, predictions: list | None = None, model_version: str | None = None, **extra: Any):
        if predictions is None:
            predictions = []
        if not isinstance(predictions, (list, tuple)):
            raise TypeError("ModelResponse(predictions=...) takes a list with one item per task")
        self.predictions = [_coerce(p) for p in predictions]
        self.model_version = model_version
        self.extra = extra

    def has_model_version(self) -> bool:
        return bool(self.model_version)

    def update_predictions_version(self) -> None:
        """Give every prediction without a model version the response's version."""
        if not self.model_version:
            return
        for p in _each(self.predictions):
            _set_version(p, str(self.model_version))

    def set_version(self, version: str) -> None:
        self.model_version = str(version)
        self.update_predictions_version()

    def serialize(self) -> dict:
        def one(p):
            if isinstance(p, list):
                return [one(i) for i in p]
            if isinstance(p, PredictionValue):
                return p.serialize()
            return dump(p) if is_pydantic(p) else p

        out = dict(self.extra)
        out["predictions"] = [one(p) for p in self.predictions]
        if self.model_version:
            out["model_version"] = str(self.model_version)
        return out

    model_dump = serialize

    def __repr__(self):
        return f"ModelResponse({self.serialize()!r})"


def serialize(response, model) -> list:
    """Apply the reference SDK's rules for model_version and return the `results` list."""
    if response is None:
        response = []
    if type(response) is list and all(type(p) is dict for p in response):
        version = None
        for prediction in response:  # the common case: plain dicts, no wrapping
            if not prediction.get("model_version"):
                version = version or str(model.model_version)
                prediction["model_version"] = version
        return response
    if type(response) is ModelResponse:
        results = _serialize_response(response, model)
        if results is not None:
            return results
    if isinstance(response, dict):
        if "predictions" not in response:
            raise TypeError("predict() returned a dict without 'predictions'; return a list or a ModelResponse")
        response = ModelResponse(**response)
    if not isinstance(response, (ModelResponse, list, tuple)) and is_pydantic(response) \
            and hasattr(response, "predictions"):
        return _serialize_foreign(response, model)
    if isinstance(response, (list, tuple)):
        response = ModelResponse(predictions=list(response))
    if not isinstance(response, ModelResponse):
        raise TypeError(f"predict() must return a list of predictions or a ModelResponse, not {type(response).__name__}")
    if response.has_model_version():
        response.update_predictions_version()
    else:
        response.set_version(model.model_version)
    return response.serialize()["predictions"]


def _serialize_foreign(response, model) -> list:
    """A ModelResponse of label-studio-sdk or the reference SDK (pydantic): its model version is
    set as the reference sets it, on the caller's own objects, then it is serialized as ours."""
    ours = ModelResponse(predictions=list(response.predictions or []), model_version=response.model_version)
    results = serialize(ours, model)
    if not response.model_version:
        response.model_version = ours.model_version
    return results


def _serialize_response(response: ModelResponse, model) -> Optional[list]:
    """`serialize` of a ModelResponse holding PredictionValues and dicts (what blueprints and
    most backends return), in one pass; None for anything else (nested lists, subclasses)."""
    version = response.model_version
    if version:
        version = str(version)
    else:
        version = response.model_version = str(model.model_version)
    results = []
    for prediction in response.predictions:
        kind = type(prediction)
        if kind is PredictionValue:
            if not prediction.model_version:
                prediction.model_version = version
            results.append(prediction.serialize())
        elif kind is dict:
            if not prediction.get("model_version"):
                prediction["model_version"] = version
            results.append(prediction)
        else:
            return None
    return results
