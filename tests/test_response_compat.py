"""Predictions the way backends written for the reference SDK build them: label-studio-sdk's
PredictionValue (pydantic), the reference's pydantic ModelResponse, dicts inside a ModelResponse.
They reach Label Studio as the reference sends them, the caller's objects get the model version,
and fields Label Studio understands are kept."""
from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import pydantic
import pytest

from lsdeploy import LabelStudioMLBase, ModelResponse, PredictionValue, create_app
from lsdeploy.state import SQLiteStore
from support import TEXT_CONFIG, predict_body, text_task

ROOT = Path(__file__).resolve().parent.parent
REGION = {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": ["Positive"]}}


class SdkPrediction(pydantic.BaseModel):
    """Shaped like label-studio-sdk's PredictionValue (pydantic, no extra fields)."""
    model_config = pydantic.ConfigDict(protected_namespaces=())
    model_version: Optional[Any] = None
    score: Optional[float] = 0.0
    result: Optional[List[Dict[str, Any]]]


class ReferenceResponse(pydantic.BaseModel):
    """Shaped like the reference SDK's ModelResponse (pydantic)."""
    model_config = pydantic.ConfigDict(protected_namespaces=())
    model_version: Optional[str] = None
    predictions: List[Union[List[SdkPrediction], SdkPrediction]]

    def has_model_version(self) -> bool:
        return bool(self.model_version)


def test_dicts_in_a_model_response_become_prediction_values():
    response = ModelResponse(predictions=[{"result": [REGION], "score": 0.7, "cluster": 3}, {"result": []}])
    first, second = response.predictions
    assert isinstance(first, PredictionValue) and first.result == [REGION] and first.score == 0.7
    assert first.cluster == 3  # a field Label Studio understands, kept
    assert second.result == [] and second.score == 0.0  # the reference's default score
    response.set_version("v2")
    assert response.serialize()["predictions"] == [
        {"result": [REGION], "score": 0.7, "cluster": 3, "model_version": "v2"},
        {"result": [], "score": 0.0, "model_version": "v2"}]


def test_pydantic_predictions_are_kept_and_versioned():
    mine, theirs = SdkPrediction(result=[REGION], score=0.5), SdkPrediction(result=[REGION], model_version="old")
    response = ModelResponse(predictions=[mine, [theirs]])
    assert response.predictions[0] is mine and response.predictions[1][0] is theirs
    response.set_version("v3")
    assert mine.model_version == "v3" and theirs.model_version == "old"
    assert response.serialize()["predictions"] == [
        {"result": [REGION], "score": 0.5, "model_version": "v3"},
        [{"result": [REGION], "score": 0.0, "model_version": "old"}]]


def test_anything_else_is_refused_naming_what_is_accepted():
    with pytest.raises(TypeError, match=r"dict, a PredictionValue \(lsdeploy's or label-studio-sdk's\), another "
                                        r"pydantic model or a list of them, not int"):
        ModelResponse(predictions=[3])


class ReferenceStyle(LabelStudioMLBase):
    """Returns what predict() returned in a reference example, chosen by the task's text."""

    def predict(self, tasks, context=None, **kwargs):
        kind = tasks[0]["data"]["text"]
        if kind == "sdk-values":
            return ModelResponse(predictions=[SdkPrediction(result=[REGION], score=0.9) for _ in tasks])
        if kind == "reference-response":
            ReferenceStyle.returned = ReferenceResponse(predictions=[SdkPrediction(result=[REGION]) for _ in tasks])
            return ReferenceStyle.returned
        if kind == "reference-response-versioned":
            return ReferenceResponse(model_version="mine", predictions=[SdkPrediction(result=[REGION])])
        return ModelResponse(predictions=[{"result": [REGION], "score": 0.4, "neighbors": [1, 2]} for _ in tasks])


@pytest.mark.parametrize("text,expected", [
    ("sdk-values", {"result": [REGION], "score": 0.9, "model_version": "0.0.1"}),
    ("reference-response", {"result": [REGION], "score": 0.0, "model_version": "0.0.1"}),
    ("reference-response-versioned", {"result": [REGION], "score": 0.0, "model_version": "mine"}),
    ("dicts", {"result": [REGION], "score": 0.4, "neighbors": [1, 2], "model_version": "0.0.1"}),
])
def test_predict_answers_what_the_reference_sends(model_dir, text, expected):
    client = create_app(ReferenceStyle, store=SQLiteStore(str(model_dir))).test_client()
    resp = client.post("/predict", json=predict_body([text_task(1, text)], label_config=TEXT_CONFIG))
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.json["results"] == [expected]
    if text == "reference-response":  # the caller's own response object got the version, as the reference sets it
        assert ReferenceStyle.returned.model_version == "0.0.1"


SDK_SCRIPT = textwrap.dedent('''
    import json
    from label_studio_sdk.label_interface.objects import PredictionValue
    from lsdeploy.response import ModelResponse

    region = {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": ["Negative"]}}
    value = PredictionValue(result=[region], score=0.25)
    response = ModelResponse(predictions=[value, {"result": [region], "cluster": 1}])
    assert response.predictions[0] is value
    response.set_version("7")
    print(json.dumps({"serialized": response.serialize(), "caller_version": value.model_version}))
''')


def test_label_studio_sdk_prediction_value(tmp_path):
    """The real label-studio-sdk (from the Label Studio that the e2e tests install, which ships it):
    lsdeploy.response needs nothing but the standard library, so it runs in that environment."""
    from labelstudio_server import install

    python = install()
    done = subprocess.run([python, "-c", SDK_SCRIPT], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["caller_version"] == "7"
    region = {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": ["Negative"]}}
    assert out["serialized"] == {"model_version": "7", "predictions": [
        {"result": [region], "score": 0.25, "model_version": "7"},
        {"result": [region], "score": 0.0, "cluster": 1, "model_version": "7"}]}
