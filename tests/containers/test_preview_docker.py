"""`label-studio-ml preview DIR --runner docker --docker ENGINE` against the real engine: it builds
DIR's Dockerfile, runs the image, sends /setup and /predict like Label Studio, validates every
prediction, and with --fit trains the model in the container and predicts again."""
from __future__ import annotations

import json

from images import created_backend
from support import run_cli

ANNOTATED = [
    {"id": i, "data": {"text": text},
     "annotations": [{"id": i, "result": [{"from_name": "sentiment", "to_name": "text", "type": "choices",
                                           "value": {"choices": [label]}}]}]}
    for i, (text, label) in enumerate([("good great fine", "Positive"), ("bad awful poor", "Negative"),
                                       ("great good", "Positive"), ("awful bad", "Negative")], start=1)
]


def test_preview_runs_the_text_classifier_image_and_trains_it(eng, tmp_path):
    directory = created_backend("text-classifier")(tmp_path)
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps(ANNOTATED))
    done = run_cli("preview", directory, "--runner", "docker", "--docker", eng.exe, "--fit", annotations, "--json",
                   timeout=900)
    image = "lsdeploy-preview-text-classifier:latest"
    try:
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout)
        assert result["ok"] is True and result["runner"] == "docker", result
        assert result["commands"][0][:2] == [eng.exe, "build"], result["commands"]
        assert result["validation"]["valid"] and result["validation_after_fit"]["valid"], result
        fit = result["fit"]
        assert fit["ok"] and fit["changed"] and len(fit["events"]) == 4, fit
    finally:
        eng.remove_image(image)
    assert eng.call(["ps", "--all", "--filter", "name=lsdeploy-preview-", "--format", "{{.Names}}"]).stdout.strip() == ""
