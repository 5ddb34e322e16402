import pytest

from lsdeploy import LabelStudioMLBase, ModelResponse, PredictionValue
from lsdeploy.model import next_version
from lsdeploy.state import StateStore
from support import TEXT_CONFIG


class Model(LabelStudioMLBase):
    setups = 0

    def setup(self):
        type(self).setups += 1


def test_state_is_per_project(model_dir):
    a, b = Model(project_id="1"), Model(project_id="2")
    a.set("k", {"x": [1, 2]})
    assert a.get("k") == {"x": [1, 2]} and a.has("k")
    assert b.get("k") is None and not b.has("k")
    assert Model(project_id="1").get("k") == {"x": [1, 2]}


def test_initial_model_version_and_bump(model_dir):
    model = Model(project_id="1", label_config=TEXT_CONFIG)
    assert model.model_version == "0.0.1"
    assert model.bump_model_version() == "0.1.0"
    assert model.model_version == "0.1.0"
    assert Model(project_id="1").model_version == "0.1.0"  # persisted, not reset


@pytest.mark.parametrize("old,new", [("0.0.1", "0.1.0"), ("2.9.3", "2.10.0"), ("model-v7", "model-v8"),
                                     ("v009", "v010"), ("abc", "abc.1"), (None, "1")])
def test_next_version(old, new):
    assert next_version(old) == new


def test_label_config_and_parsed(model_dir):
    model = Model(project_id="7", label_config=TEXT_CONFIG)
    assert model.label_config == TEXT_CONFIG and model.get("label_config") == TEXT_CONFIG
    assert model.parsed_label_config["sentiment"]["labels"] == ["Positive", "Negative", "Neutral"]
    assert Model(project_id="7").label_config == TEXT_CONFIG  # read back from the store
    assert model.get_first_tag_occurence("Choices", "Text") == ("sentiment", "text", "text")


def test_extra_params_accept_dict_and_json(model_dir):
    model = Model(project_id="1")
    assert model.extra_params == {}
    model.set_extra_params({"threshold": 0.5})
    assert model.extra_params == {"threshold": 0.5}
    model.set_extra_params('{"a": 1}')
    assert model.extra_params == {"a": 1}


def test_model_start_keeps_an_existing_version(model_dir):
    """The initial model_version is created only where there is none (create-only)."""
    from lsdeploy.state import default_store

    store = default_store()
    store.set("1", "model_version", "3.0.0")
    assert Model(project_id="1").model_version == "3.0.0"
    store.create("1", "model_version", "0.0.1")
    store.create("1", "fresh", {"a": 1})
    assert store.get("1", "model_version") == "3.0.0" and store.get("1", "fresh") == {"a": 1}


class DictStore(StateStore):
    """A store of another kind: only get and update, the rest from StateStore."""

    def __init__(self):
        self.data = {}

    def get(self, project, key, default=None):
        return self.data.get((project, key), default)

    def update(self, project, key, fn, default=None):
        self.data[(project, key)] = fn(self.data.get((project, key), default))
        return self.data[(project, key)]


def test_create_falls_back_to_update_in_other_stores():
    store = DictStore()
    store.create("1", "k", "first")
    store.create("1", "k", "second")
    assert store.get("1", "k") == "first"


def test_a_store_with_the_older_set_signature_still_works():
    """A store written before `set` took `wait=`: building a model writes to it at once."""
    class OldStore(DictStore):
        def set(self, project, key, value):
            self.data[(project, key)] = value

    store = OldStore()
    model = Model.__new__(Model)
    model._store = store  # as the server's model pool gives each model its store
    model.__init__(project_id="3", label_config=TEXT_CONFIG)
    assert store.data[("3", "label_config")] == TEXT_CONFIG and model.model_version == "0.0.1"


def test_update_is_atomic_read_modify_write(model_dir):
    model = Model(project_id="1")
    assert model.update("n", lambda v: (v or 0) + 1) == 1
    assert model.update("n", lambda v: v + 1) == 2


def test_artifacts_round_trip(model_dir, tmp_path):
    model = Model(project_id="1")
    assert model.load_artifact("weights.bin") is None
    src = tmp_path / "w"
    src.write_bytes(b"\x00\x01weights")
    model.save_artifact("weights.bin", str(src))
    assert open(model.load_artifact("weights.bin"), "rb").read() == b"\x00\x01weights"
    with pytest.raises(ValueError, match="not allowed"):
        model.save_artifact("../escape", str(src))


def test_non_json_values_are_refused_with_advice(model_dir):
    with pytest.raises(TypeError, match="save_artifact"):
        Model(project_id="1").set("obj", object())


def test_label_interface_says_how_to_get_it(model_dir):
    try:
        import label_studio_sdk  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"lsdeploy\[sdk\]"):
            Model(project_id="1", label_config=TEXT_CONFIG).label_interface
    else:  # pragma: no cover - only where the sdk extra is installed
        assert Model(project_id="1", label_config=TEXT_CONFIG).label_interface is not None


def test_build_label_map(model_dir):
    config = """<View><Image name="image" value="$image"/>
      <RectangleLabels name="label" toName="image">
        <Label value="Airplane"/><Label value="Car" predicted_values="car, truck"/>
      </RectangleLabels></View>"""
    model = Model(project_id="1", label_config=config)
    assert model.build_label_map("label", ["car", "truck", "airplane"]) == {
        "car": "Car", "truck": "Car", "airplane": "Airplane"}


def test_model_response_fills_model_versions():
    response = ModelResponse(predictions=[PredictionValue(result=[], score=0.5),
                                          {"result": [], "model_version": "mine"},
                                          [PredictionValue(result=[]), PredictionValue(result=[], model_version="x")]])
    assert not response.has_model_version()
    response.set_version("2.0.0")
    out = response.serialize()["predictions"]
    assert out[0]["model_version"] == "2.0.0"
    assert out[1]["model_version"] == "mine"
    assert [p["model_version"] for p in out[2]] == ["2.0.0", "x"]


def test_prediction_value_keeps_extra_fields():
    value = PredictionValue(result=[{"a": 1}], score=0.3, cluster=4, mislabeling=0.1)
    assert value.serialize() == {"result": [{"a": 1}], "score": 0.3, "cluster": 4, "mislabeling": 0.1}
    assert value.cluster == 4
    with pytest.raises(TypeError, match="one item per task"):
        ModelResponse(predictions="nope")


def test_preload_task_data_keeps_none_and_plain_values(model_dir, tmp_path, monkeypatch):
    """A None inside task data stayed a RecursionError (None meant "the whole data" again)."""
    model = Model(project_id="1")
    downloaded = tmp_path / "a.txt"
    downloaded.write_text("file text")
    asked = []
    monkeypatch.setattr(model, "get_local_path", lambda url, task_id=None, **kw: asked.append((url, task_id)) or str(downloaded))
    def new_task():
        return {"id": 7, "data": {"text": "hi", "meta": None, "tags": [None, 3, {"deep": None}],
                                  "doc": "/data/upload/1/a.txt"}}

    task = new_task()
    assert model.preload_task_data(task) == {"text": "hi", "meta": None, "tags": [None, 3, {"deep": None}],
                                             "doc": "file text"}
    assert model.preload_task_data(new_task(), read_file=False)["doc"] == str(downloaded)
    assert model.preload_task_data(task, task["data"]["tags"]) == [None, 3, {"deep": None}]
    assert asked == [("/data/upload/1/a.txt", 7)] * 2
    # an explicit None is a missing value, as the reference's examples pass it (data.get(key))
    assert model.preload_task_data(task, task["data"].get("image")) is None
    # a dict is filled in place, as the reference does: callers may read task["data"] afterwards
    data = {"doc": "/data/upload/1/a.txt", "n": 1}
    assert model.preload_task_data(task, data) is data and data == {"doc": "file text", "n": 1}
