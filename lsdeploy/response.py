"""`ModelResponse` and `PredictionValue`: what `predict` may return.

Same names, constructor keywords and methods as the reference SDK (without pydantic).
Fields Label Studio understands beyond result/score/model_version (for example
`cluster`, `neighbors`, `mislabeling`) are kept as given.
"""
from __future__ import annotations

from typing import Any, Iterable


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


def _coerce(item):
    if isinstance(item, (PredictionValue, dict)):
        return item
    if isinstance(item, (list, tuple)):
        return [_coerce(i) for i in item]
    raise TypeError(
        f"a prediction must be a dict, a PredictionValue or a list of them, not {type(item).__name__}"
    )


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
            if isinstance(p, dict):
                if not p.get("model_version"):
                    p["model_version"] = str(self.model_version)
            elif not p.model_version:
                p.model_version = str(self.model_version)

    def set_version(self, version: str) -> None:
        self.model_version = str(version)
        self.update_predictions_version()

    def serialize(self) -> dict:
        def one(p):
            if isinstance(p, list):
                return [one(i) for i in p]
            return p.serialize() if isinstance(p, PredictionValue) else p

        out = dict(self.extra)
        out["predictions"] = [p if type(p) is dict else one(p) for p in self.predictions]
        if self.model_version:
            out["model_version"] = str(self.model_version)
        return out

    model_dump = serialize

    def __repr__(self):
        return f"ModelResponse({self.serialize()!r})"
