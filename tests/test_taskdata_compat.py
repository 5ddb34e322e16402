"""Task files as the reference SDK's backends and their tests read them: downloads go through
`requests`, so a test that mocks them with `responses` works unchanged (no network, no DNS), and
the same kinds of values are preloaded (upload/ paths of older tasks, local files where allowed)."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import responses

from lsdeploy import LabelStudioMLBase, taskdata
from lsdeploy.taskdata import TaskDataError


class ImageModel(LabelStudioMLBase):
    def predict(self, tasks, context=None, **kwargs):
        path = self.get_local_path(tasks[0]["data"]["image"], task_id=tasks[0]["id"])
        with open(path, "rb") as handle:
            return [{"result": [], "score": len(handle.read())}]


@pytest.fixture
def no_label_studio(monkeypatch, tmp_path):
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "LABEL_STUDIO_API_KEY", "TASK_DATA_ALLOW_LOCAL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TASK_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(taskdata, "_connections", OrderedDict())  # what /setup sent, for these tests only


@responses.activate
def test_a_download_mocked_with_responses_is_served_by_the_mock(model_dir, no_label_studio):
    responses.add(responses.GET, "https://example.com/images/cat.jpg", body=b"\xff\xd8 fake jpeg", status=200)
    model = ImageModel(project_id="1")
    assert model.predict([{"id": 1, "data": {"image": "https://example.com/images/cat.jpg"}}]) == \
        [{"result": [], "score": 12}]
    (call,) = responses.calls
    assert call.request.url == "https://example.com/images/cat.jpg" and "Authorization" not in call.request.headers


@responses.activate
def test_label_studio_uploads_get_the_key_and_old_upload_paths_resolve(model_dir, no_label_studio):
    taskdata.remember("2", "https://ls.example.com", "legacy-key-123")
    responses.add(responses.GET, "https://ls.example.com/data/upload/2/a.png", body=b"png bytes")
    model = ImageModel(project_id="2")
    for value in ("upload/2/a.png", "/upload/2/a.png", "/data/upload/2/a.png"):
        assert taskdata.is_preload_needed(value)
        with open(model.get_local_path(value, task_id=5), "rb") as handle:
            assert handle.read() == b"png bytes"
    assert responses.calls[0].request.headers["Authorization"] == "Token legacy-key-123"
    assert len(responses.calls) == 1  # the same file, cached


@responses.activate
def test_a_mocked_refusal_and_redirect_are_handled_as_real_ones(model_dir, no_label_studio):
    responses.add(responses.GET, "https://example.com/moved.jpg", status=302,
                  headers={"Location": "https://cdn.example.com/real.jpg"})
    responses.add(responses.GET, "https://cdn.example.com/real.jpg", body=b"abc")
    responses.add(responses.GET, "https://example.com/secret.jpg", status=403)
    model = ImageModel(project_id="3")
    with open(model.get_local_path("https://example.com/moved.jpg"), "rb") as handle:
        assert handle.read() == b"abc"
    with pytest.raises(TaskDataError, match=r"reading task file https://example.com/secret.jpg was refused \(403\)"):
        model.get_local_path("https://example.com/secret.jpg")


def test_local_files_are_preloaded_only_where_allowed(model_dir, no_label_studio, tmp_path, monkeypatch):
    local = tmp_path / "doc.txt"
    local.write_text("local text")
    task = {"id": 1, "data": {"text": str(local), "plain": "just words"}}
    model = ImageModel(project_id="4")
    assert model.preload_task_data(task) == task["data"]  # not allowed: the value is the data
    monkeypatch.setenv("TASK_DATA_ALLOW_LOCAL", "true")
    assert taskdata.is_preload_needed(str(local)) and not taskdata.is_preload_needed("just words")
    assert model.preload_task_data(task) == {"text": "local text", "plain": "just words"}
