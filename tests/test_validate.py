"""Unit tests of lsdeploy.validate: valid predictions pass, each broken rule is named with its path."""
import base64
import copy
import json
import struct
import wave
import io
from pathlib import Path

import pytest

from lsdeploy.labelconfig import LabelConfigError, parse_tags
from lsdeploy.validate import RULES, sample_files, sample_tasks, validate_predictions

TEXT = "Alice Johnson flew from Paris to Berlin on Monday."

CLASSIFY = """
<View>
  <Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text" choice="single-radio">
    <Choice value="Positive"/><Choice value="Negative"/><Choice value="Neutral" alias="Meh"/>
  </Choices>
  <Choices name="topics" toName="text" choice="multiple">
    <Choice value="Travel"/><Choice value="Business"/><Choice value="Sports"/>
  </Choices>
</View>"""

NER = """
<View>
  <Labels name="ner" toName="text"><Label value="PER"/><Label value="LOC"/><Label value="DAY"/></Labels>
  <Text name="text" value="$text"/>
  <Relations><Relation value="travels_to"/></Relations>
</View>"""

IMAGE = """
<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels>
  <PolygonLabels name="poly" toName="image"><Label value="Road"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="image"><Label value="Eye"/></KeyPointLabels>
  <EllipseLabels name="ell" toName="image"><Label value="Ball"/></EllipseLabels>
  <BrushLabels name="brush" toName="image"><Label value="Sky"/></BrushLabels>
</View>"""

FORM = """
<View>
  <Text name="text" value="$text"/>
  <Rating name="stars" toName="text" maxRating="10"/>
  <Rating name="quick" toName="text"/>
  <Number name="count" toName="text" min="0" max="100"/>
  <TextArea name="summary" toName="text"/>
  <DateTime name="when" toName="text" only="date"/>
  <Taxonomy name="tax" toName="text">
    <Choice value="Animal"><Choice value="Cat"/><Choice value="Dog"/></Choice>
    <Choice value="Plant"/>
  </Taxonomy>
  <Magic name="custom" toName="text" spell="yes"/>
</View>"""

MEDIA = """
<View>
  <HyperText name="page" value="$html"/>
  <HyperTextLabels name="html_ner" toName="page"><Label value="Title"/></HyperTextLabels>
  <Paragraphs name="dialog" value="$dialog"/>
  <ParagraphLabels name="speaker" toName="dialog"><Label value="Question"/></ParagraphLabels>
  <Audio name="audio" value="$audio"/>
  <Labels name="sound" toName="audio"><Label value="Speech"/></Labels>
  <TimeSeries name="ts" value="$csv" valueType="url" timeColumn="t">
    <Channel column="temp"/><Channel column="hum"/>
  </TimeSeries>
  <TimeSeriesLabels name="events" toName="ts"><Label value="Peak"/></TimeSeriesLabels>
  <Choices name="dyn" toName="page" value="$options"/>
</View>"""


def body(*results, version="v1", score=0.9):
    return {"results": [{"result": list(r), "score": score, "model_version": version} for r in results]}


def region(from_name, to_name, rtype, value, **extra):
    return {"from_name": from_name, "to_name": to_name, "type": rtype, "value": value, **extra}


def tasks_for(*datas):
    return [{"id": i + 1, "data": d} for i, d in enumerate(datas)]


def valid_classify():
    return body(
        [region("sentiment", "text", "choices", {"choices": ["Positive"]}),
         region("topics", "text", "choices", {"choices": ["Travel", "Business"]}, score=0.7)],
        [region("sentiment", "text", "choices", {"choices": ["Meh"]})],
    )


def valid_ner():
    return body([
        {"id": "a", **region("ner", "text", "labels", {"start": 0, "end": 13, "text": "Alice Johnson", "labels": ["PER"]})},
        {"id": "b", **region("ner", "text", "labels", {"start": 24, "end": 29, "text": "Paris", "labels": ["LOC"]})},
        {"type": "relation", "from_id": "a", "to_id": "b", "direction": "right", "labels": ["travels_to"]},
    ])


def valid_image():
    return body([
        region("box", "image", "rectanglelabels", {"x": 10, "y": 20, "width": 90, "height": 30,
                                                   "rotation": 0, "rectanglelabels": ["Car"]},
               original_width=640, original_height=480),
        region("box", "image", "rectanglelabels", {"x": 33.333333, "y": 0, "width": 66.666667, "height": 100,
                                                   "rectanglelabels": ["Person"]}),
        region("poly", "image", "polygonlabels", {"points": [[0, 0], [100, 0], [50, 100]], "polygonlabels": ["Road"]}),
        region("kp", "image", "keypointlabels", {"x": 50, "y": 50, "width": 1, "keypointlabels": ["Eye"]}),
        region("ell", "image", "ellipselabels", {"x": 50, "y": 50, "radiusX": 10, "radiusY": 5, "ellipselabels": ["Ball"]}),
        region("brush", "image", "brushlabels", {"format": "rle", "rle": [0, 1, 2, 255], "brushlabels": ["Sky"]}),
    ])


def valid_form():
    return body([
        region("stars", "text", "rating", {"rating": 10}),
        region("quick", "text", "rating", {"rating": 5}),
        region("count", "text", "number", {"number": 42.5}),
        region("summary", "text", "textarea", {"text": ["A trip to Berlin."]}),
        region("when", "text", "datetime", {"datetime": "2024-03-01"}),
        region("tax", "text", "taxonomy", {"taxonomy": [["Animal", "Cat"], ["Plant"]]}),
        region("custom", "text", "magic", {"anything": {"goes": True}}),
    ])


def media_task():
    return {"id": 7, "data": {
        "html": "<p>Hello</p>", "dialog": [{"author": "A", "text": "Why?"}, {"author": "B", "text": "Because."}],
        "audio": "http://127.0.0.1/a.wav", "csv": "http://127.0.0.1/t.csv",
        "options": [{"value": "Red"}, {"value": "Blue", "children": [{"value": "Navy"}]}],
    }}


def valid_media():
    return body([
        region("html_ner", "page", "hypertextlabels", {"start": "/p[1]/text()[1]", "end": "/p[1]/text()[1]",
                                                       "startOffset": 0, "endOffset": 5, "hypertextlabels": ["Title"]}),
        region("speaker", "dialog", "paragraphlabels", {"start": "0", "end": 1, "startOffset": 0, "endOffset": 4,
                                                        "paragraphlabels": ["Question"]}),
        region("sound", "audio", "labels", {"start": 0.5, "end": 1.25, "labels": ["Speech"]}),
        region("events", "ts", "timeserieslabels", {"start": 3, "end": 9, "instant": False, "timeserieslabels": ["Peak"]}),
        region("dyn", "page", "choices", {"choices": ["Navy"]}),
    ])


CASES = {
    "classify": (CLASSIFY, lambda: tasks_for({"text": TEXT}, {"text": "Meh."}), valid_classify),
    "ner": (NER, lambda: tasks_for({"text": TEXT}), valid_ner),
    "image": (IMAGE, lambda: tasks_for({"image": "http://127.0.0.1/x.png"}), valid_image),
    "form": (FORM, lambda: tasks_for({"text": TEXT}), valid_form),
    "media": (MEDIA, lambda: [media_task()], valid_media),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_valid_predictions_pass(name):
    config, tasks, response = CASES[name]
    report = validate_predictions(config, tasks(), response())
    assert report.problems == []
    assert report.valid
    assert all(t.ok for t in report.tasks)
    assert sum(len(t.rows) for t in report.tasks) == sum(len(r["result"]) for r in response()["results"])


def mutate(case, fn):
    config, tasks, response = CASES[case]
    resp = copy.deepcopy(response())
    tasks = tasks()
    fn(resp, tasks)
    return validate_predictions(config, tasks, resp)


def r0(resp, k):
    return resp["results"][0]["result"][k]


def setv(k, key, value):
    def fn(resp, tasks):
        r0(resp, k)["value"][key] = value
    return fn


BROKEN = [
    # (case, mutation, rule, path)
    ("classify", lambda r, t: r["results"].pop(), "count", "results"),
    ("classify", lambda r, t: r["results"].pop(), "count", "results[1]"),
    ("classify", lambda r, t: t.append({"id": 3, "data": {"text": "x"}}), "count", "results"),
    ("classify", lambda r, t: t.append({"id": 3, "data": {"text": "x"}}), "count", "results[2]"),
    ("classify", lambda r, t: r["results"].__setitem__(1, []), "count", "results[1]"),
    ("classify", lambda r, t: r["results"][0].update(task=2), "count", "results[0].task"),
    ("classify", lambda r, t: r["results"][1].pop("model_version"), "model-version", "results[1].model_version"),
    ("classify", lambda r, t: r["results"][0].update(model_version=""), "model-version", "results[0].model_version"),
    ("classify", lambda r, t: r["results"][0].update(model_version=" "), "model-version", "results[0].model_version"),
    ("classify", lambda r, t: r["results"][0].update(model_version=None), "model-version", "results[0].model_version"),
    ("classify", lambda r, t: r["results"][0].update(model_version={"v": 1}), "model-version",
     "results[0].model_version"),
    ("classify", lambda r, t: r["results"][0].update(score="high"), "score", "results[0].score"),
    ("classify", lambda r, t: r0(r, 1).update(score=[1]), "score", "results[0].result[1].score"),
    ("classify", lambda r, t: r["results"][1].pop("result"), "prediction", "results[1].result"),
    ("classify", lambda r, t: r["results"].__setitem__(1, "Positive"), "prediction", "results[1]"),
    ("classify", lambda r, t: r["results"][0]["result"].append("Positive"), "region", "results[0].result[2]"),
    ("classify", lambda r, t: r0(r, 0).pop("value"), "region", "results[0].result[0].value"),
    ("classify", lambda r, t: r0(r, 0).update(from_name="sentimnet"), "from-name", "results[0].result[0].from_name"),
    ("classify", lambda r, t: r0(r, 0).pop("from_name"), "from-name", "results[0].result[0].from_name"),
    ("classify", lambda r, t: r0(r, 0).update(to_name="txt"), "to-name", "results[0].result[0].to_name"),
    ("classify", lambda r, t: r0(r, 0).update(type="labels"), "type", "results[0].result[0].type"),
    ("classify", setv(0, "choices", ["Positive", "Negative"]), "choices", "results[0].result[0].value.choices"),
    ("classify", setv(1, "choices", ["Travel", "Cooking"]), "choices", "results[0].result[1].value.choices[1]"),
    ("classify", setv(0, "choices", "Positive"), "choices", "results[0].result[0].value.choices"),
    ("classify", setv(0, "choices", ["Neutral"]), "choices", "results[0].result[0].value.choices[0]"),
    ("ner", setv(0, "labels", ["PERSON"]), "labels", "results[0].result[0].value.labels[0]"),
    ("ner", lambda r, t: r0(r, 0)["value"].pop("labels"), "labels", "results[0].result[0].value.labels"),
    ("ner", setv(0, "end", 500), "region-range", "results[0].result[0].value.end"),
    ("ner", setv(0, "start", -1), "region-range", "results[0].result[0].value.start"),
    ("ner", setv(1, "end", 20), "region-range", "results[0].result[1].value.end"),
    ("ner", setv(0, "start", "0"), "region-field", "results[0].result[0].value.start"),
    ("ner", lambda r, t: r0(r, 0)["value"].pop("end"), "region-field", "results[0].result[0].value.end"),
    ("ner", setv(0, "text", "Alice"), "region-text", "results[0].result[0].value.text"),
    ("ner", lambda r, t: r0(r, 2).update(to_id="zzz"), "relation", "results[0].result[2].to_id"),
    ("ner", lambda r, t: r0(r, 2).update(labels=["likes"]), "relation", "results[0].result[2].labels[0]"),
    ("image", setv(0, "x", 120), "region-range", "results[0].result[0].value.x"),
    ("image", setv(0, "width", 95), "region-range", "results[0].result[0].value.width"),
    ("image", setv(0, "height", 81), "region-range", "results[0].result[0].value.height"),
    ("image", setv(0, "y", -3), "region-range", "results[0].result[0].value.y"),
    ("image", lambda r, t: r0(r, 0)["value"].pop("height"), "region-field", "results[0].result[0].value.height"),
    ("image", setv(0, "x", "10"), "region-field", "results[0].result[0].value.x"),
    ("image", lambda r, t: r0(r, 0).update(original_width=0), "region-field", "results[0].result[0].original_width"),
    ("image", setv(0, "rectanglelabels", ["Bus"]), "labels", "results[0].result[0].value.rectanglelabels[0]"),
    ("image", lambda r, t: r0(r, 0).update(type="polygonlabels"), "type", "results[0].result[0].type"),
    ("image", setv(2, "points", [[0, 0], [101, 0], [50, 100]]), "region-range", "results[0].result[2].value.points[1]"),
    ("image", setv(3, "y", 100.5), "region-range", "results[0].result[3].value.y"),
    ("image", setv(4, "radiusX", 150), "region-range", "results[0].result[4].value.radiusX"),
    ("image", setv(5, "rle", []), "region-field", "results[0].result[5].value.rle"),
    ("form", setv(0, "rating", 11), "rating", "results[0].result[0].value.rating"),
    ("form", setv(1, "rating", 6), "rating", "results[0].result[1].value.rating"),
    ("form", setv(1, "rating", 0), "rating", "results[0].result[1].value.rating"),
    ("form", setv(1, "rating", 2.5), "rating", "results[0].result[1].value.rating"),
    ("form", setv(2, "number", 101), "number", "results[0].result[2].value.number"),
    ("form", setv(2, "number", -1), "number", "results[0].result[2].value.number"),
    ("form", setv(2, "number", "7"), "number", "results[0].result[2].value.number"),
    ("form", setv(3, "text", [1]), "textarea", "results[0].result[3].value.text[0]"),
    ("form", setv(3, "text", None), "textarea", "results[0].result[3].value.text"),
    ("form", setv(4, "datetime", 20240301), "datetime", "results[0].result[4].value.datetime"),
    ("form", setv(5, "taxonomy", [["Animal", "Horse"]]), "taxonomy", "results[0].result[5].value.taxonomy[0][1]"),
    ("form", setv(5, "taxonomy", ["Animal"]), "taxonomy", "results[0].result[5].value.taxonomy[0]"),
    ("form", lambda r, t: r0(r, 6).update(from_name="custm"), "from-name", "results[0].result[6].from_name"),
    ("media", setv(0, "startOffset", -1), "region-field", "results[0].result[0].value.startOffset"),
    ("media", setv(0, "hypertextlabels", ["Body"]), "labels", "results[0].result[0].value.hypertextlabels[0]"),
    ("media", lambda r, t: r0(r, 0)["value"].update(htmllabels=r0(r, 0)["value"].pop("hypertextlabels")),
     "labels", "results[0].result[0].value.hypertextlabels"),
    ("classify", lambda r, t: r0(r, 0).update(type="choice"), "type", "results[0].result[0].type"),
    ("media", setv(1, "end", 2), "region-range", "results[0].result[1].value.end"),
    ("media", setv(2, "end", 0.1), "region-range", "results[0].result[2].value.end"),
    ("media", setv(2, "start", "0:01"), "region-field", "results[0].result[2].value.start"),
    ("media", lambda r, t: r0(r, 3)["value"].pop("start"), "region-field", "results[0].result[3].value.start"),
    ("media", setv(4, "choices", ["Green"]), "choices", "results[0].result[4].value.choices[0]"),
]


@pytest.mark.parametrize("case,fn,rule,path", BROKEN,
                         ids=[f"{c}-{rule}-{path}" for c, _, rule, path in BROKEN])
def test_each_broken_rule_is_named_with_its_path(case, fn, rule, path):
    report = mutate(case, fn)
    assert not report.valid
    assert rule in RULES
    matching = [p for p in report.errors if p.rule == rule and p.path == path]
    assert matching, [str(p) for p in report.problems]
    text = str(matching[0])
    assert path in text and f"[{rule}]" in text
    # the problem also shows in the task's table, on the row (or prediction) it belongs to
    if path.startswith("results[") and matching[0].task is not None:
        task = report.tasks[matching[0].task]
        placed = task.problems + [p for row in task.rows for p in row.problems]
        assert matching[0] in placed
        assert not task.ok


def test_misspelled_from_name_suggests_the_control():
    report = mutate("classify", lambda r, t: r0(r, 0).update(from_name="sentimnet"))
    (problem,) = report.errors
    assert "did you mean 'sentiment'" in problem.message


WARNED = [
    # displayable, but probably not what the backend meant: (case, mutation, rule, path)
    ("classify", lambda r, t: r0(r, 0).update(type="Choices"), "type", "results[0].result[0].type"),
    ("form", lambda r, t: r0(r, 6).update(type="Magic"), "type", "results[0].result[6].type"),
    ("classify", setv(0, "choices", []), "choices", "results[0].result[0].value.choices"),
    ("ner", setv(0, "labels", []), "labels", "results[0].result[0].value.labels"),
    ("ner", lambda r, t: r0(r, 0)["value"].update(end=0, text=""), "region-range", "results[0].result[0].value.end"),
    ("image", setv(2, "points", [[0, 0], [10, 0]]), "region-field", "results[0].result[2].value.points"),
    ("classify", lambda r, t: r["results"][0].update(score="0.5"), "score", "results[0].score"),
]


@pytest.mark.parametrize("case,fn,rule,path", WARNED, ids=[f"{c}-{rule}-{path}" for c, _, rule, path in WARNED])
def test_warnings_keep_the_report_valid(case, fn, rule, path):
    report = mutate(case, fn)
    assert report.valid
    (warning,) = report.warnings
    assert (warning.rule, warning.path) == (rule, path)
    assert str(warning).startswith(f"warning: {path}: ") and str(warning).endswith(f"[{rule}]")


def test_numeric_string_score_is_a_warning():
    report = mutate("classify", lambda r, t: r["results"][0].update(score="0.5"))
    assert report.valid
    (warning,) = report.warnings
    assert warning.rule == "score" and warning.path == "results[0].score"


def test_choice_alias_is_the_stored_value():
    report = mutate("classify", setv(0, "choices", ["Meh"]))
    assert report.valid


def test_unknown_control_checks_only_names_and_type():
    report = mutate("form", setv(6, "whatever", [1, 2, 3]))
    assert report.valid


def test_rotated_box_may_extend_past_the_edge():
    def fn(resp, tasks):
        r0(resp, 0)["value"].update(x=80, width=40, rotation=30)
    assert mutate("image", fn).valid


def test_no_predictions_at_all_is_an_error_per_task():
    """An empty results list: Label Studio stores nothing ("results field must be a list with at
    least one item"), so every task is an error of its own, named by its path."""
    config, tasks, _ = CASES["classify"]
    report = validate_predictions(config, tasks(), {"results": []})
    assert not report.valid and not report.warnings and report.general == []
    assert [(p.rule, p.path, p.task) for p in report.errors] == [("count", "results[0]", 0), ("count", "results[1]", 1)]
    assert "no prediction for task 1 (id 1)" in report.errors[0].message
    assert "stores no prediction for any task" in report.errors[0].message
    assert [t.status for t in report.tasks] == ["no prediction", "no prediction"]
    assert [t.problems for t in report.tasks] == [[report.errors[0]], [report.errors[1]]]


def test_a_task_left_without_a_prediction_is_named():
    config, tasks, response = CASES["classify"]
    resp = response()
    resp["results"].pop()
    report = validate_predictions(config, tasks(), resp)
    assert [(p.rule, p.path) for p in report.errors] == [("count", "results"), ("count", "results[1]")]
    assert report.general == [report.errors[0]]
    assert [t.status for t in report.tasks] == ["OK", "no prediction"]
    assert "1 prediction(s) came back for 2 task(s)" in report.errors[1].message


def test_empty_result_list_is_valid_and_shown_as_empty():
    """The model predicted nothing for the task: Label Studio stores that prediction (no regions,
    the task counts as predicted for this model version), so it is valid, with its own status."""
    config, tasks, response = CASES["classify"]
    report = validate_predictions(config, tasks(), body([], response()["results"][1]["result"]))
    assert report.valid and not report.problems
    assert [t.status for t in report.tasks] == ["empty", "OK"]
    assert [t["status"] for t in report.to_dict()["tasks"]] == ["empty", "OK"]


@pytest.mark.parametrize("version,words", [
    (None, "is null: Label Studio rejects the whole batch"),
    ("", "is blank"),
    (" ", "is blank"),
])
def test_model_version_messages_say_what_label_studio_does(version, words):
    config, tasks, response = CASES["classify"]
    resp = response()
    resp["results"][0]["model_version"] = version
    (problem,) = validate_predictions(config, tasks(), resp).errors
    assert problem.rule == "model-version" and words in problem.message
    del resp["results"][0]["model_version"]
    (problem,) = validate_predictions(config, tasks(), resp).errors
    assert "is missing: Label Studio falls back to the version /setup reported" in problem.message


def test_results_out_of_task_order_are_caught_when_detectable():
    """Predictions carry no task id in Label Studio's protocol, so order shows only when a
    prediction names its task, or a span's text is another task's."""
    config, tasks, response = CASES["classify"]
    resp = response()
    resp["results"][0]["task"], resp["results"][1]["task"] = 2, 1
    report = validate_predictions(config, tasks(), resp)
    assert [(p.rule, p.path) for p in report.errors] == [("count", "results[0].task"), ("count", "results[1].task")]
    assert "names task 2 but sits where task 1 (id 1) is (that task is at results[1])" in report.errors[0].message
    resp["results"][0]["task"], resp["results"][1]["task"] = 1, "2"  # in order (ids compared as text)
    assert validate_predictions(config, tasks(), resp).valid
    resp["results"][0]["task"], resp["results"][1]["task"] = {"id": 1, "data": {}}, {"id": 1, "data": {}}
    (problem,) = validate_predictions(config, tasks(), resp).errors  # the task object echoed back
    assert (problem.rule, problem.path) == ("count", "results[1].task")

    other = "Bob went to Rome."
    first = valid_ner()["results"][0]
    second = {"result": [region("ner", "text", "labels", {"start": 0, "end": 3, "text": "Bob", "labels": ["PER"]})],
              "model_version": "v1"}
    swapped = {"results": [second, first]}
    report = validate_predictions(NER, tasks_for({"text": TEXT}, {"text": other}), swapped)
    problems = {(p.rule, p.path): p for p in report.errors}
    assert ("region-text", "results[0].result[0].value.text") in problems
    assert "it is the text of task 2 (id 2): return the predictions in task order" in \
        problems[("region-text", "results[0].result[0].value.text")].message
    assert validate_predictions(NER, tasks_for({"text": TEXT}, {"text": other}), {"results": [first, second]}).valid


def test_several_predictions_per_task_are_each_checked():
    config, tasks, response = CASES["classify"]
    resp = response()
    first = resp["results"][0]
    second = copy.deepcopy(first)
    second["result"][0]["value"]["choices"] = ["Nope"]
    resp["results"][0] = [first, second]
    report = validate_predictions(config, tasks(), resp)
    (problem,) = report.errors
    assert problem.path == "results[0][1].result[0].value.choices[0]"
    assert report.tasks[0].predictions == 2


@pytest.mark.parametrize("resp,path", [
    ({"predictions": []}, "results"),
    ({"results": {"a": 1}}, "results"),
    ("nope", "$"),
])
def test_body_shape(resp, path):
    report = validate_predictions(CLASSIFY, tasks_for({"text": "x"}), resp)
    (problem,) = report.errors
    assert problem.rule == "response" and problem.path == path


def test_results_list_may_be_passed_directly():
    config, tasks, response = CASES["ner"]
    assert validate_predictions(config, tasks(), response()["results"]).valid


def test_span_text_is_not_checked_when_text_is_a_url():
    config = NER.replace('value="$text"', 'value="$text" valueType="url"')
    resp = valid_ner()
    resp["results"][0]["result"][0]["value"]["end"] = 5000
    assert validate_predictions(config, tasks_for({"text": "http://127.0.0.1/a.txt"}), resp).valid


def test_report_rows_and_json_shape():
    config, tasks, response = CASES["ner"]
    resp = response()
    resp["results"][0]["result"][1]["value"]["labels"] = ["CITY"]
    report = validate_predictions(config, tasks(), resp)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["valid"] is False and data["errors"] == 1 and data["warnings"] == 0
    rows = data["tasks"][0]["rows"]
    assert [r["path"] for r in rows] == [f"results[0].result[{k}]" for k in range(3)]
    assert [r["ok"] for r in rows] == [True, False, True]
    assert rows[0]["type"] == "labels" and "PER" in rows[0]["summary"] and "Alice Johnson" in rows[0]["summary"]
    assert rows[1]["problems"][0]["rule"] == "labels"
    assert data["problems"][0]["path"] == "results[0].result[1].value.labels[0]"


def test_bad_label_config_raises():
    with pytest.raises(LabelConfigError):
        validate_predictions("<View><Text", [], {"results": []})


# -- sample tasks -------------------------------------------------------------------------------
def test_sample_tasks_fit_every_object_tag():
    tasks = sample_tasks(IMAGE + "", count=3)
    assert [t["id"] for t in tasks] == [1, 2, 3]
    url = tasks[0]["data"]["image"]
    assert url.startswith("data:image/png;base64,")
    png = base64.b64decode(url.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (64, 48)
    assert tasks[0]["data"]["image"] != tasks[1]["data"]["image"]


def test_sample_tasks_media_and_files_url():
    tasks = sample_tasks(MEDIA, count=2, files_url="http://127.0.0.1:5555/data/upload/preview")
    data = tasks[1]["data"]
    objects = parse_tags(MEDIA).objects
    assert set(data) == {o.value for o in objects.values()} | {"options"}
    assert data["audio"] == "http://127.0.0.1:5555/data/upload/preview/sample-2.wav"
    assert data["csv"] == "http://127.0.0.1:5555/data/upload/preview/ts-2.csv"
    assert data["dialog"][0].keys() == {"author", "text"}
    assert data["html"].startswith("<div>")
    assert [o["value"] for o in data["options"]] == ["Option A", "Option B", "Option C"]
    files = sample_files(MEDIA, count=2)
    ctype, csv = files["ts-2.csv"]
    assert ctype == "text/csv" and csv.decode().splitlines()[0] == "t,temp,hum"
    with wave.open(io.BytesIO(files["sample-1.wav"][1])) as w:
        assert w.getframerate() == 8000 and w.getnframes() == 4000


def test_sample_tasks_for_text_configs_let_spans_validate():
    tasks = sample_tasks(NER, count=2)
    text = tasks[0]["data"]["text"]
    assert isinstance(text, str) and len(text.split()) > 5
    end = text.index(" ")
    resp = body([region("ner", "text", "labels", {"start": 0, "end": end, "text": text[:end], "labels": ["PER"]})],
                [])
    assert validate_predictions(NER, tasks, resp).valid


# -- against Label Studio's own prediction validator ----------------------------------------------------
LS_CHECK = r"""
import json, sys
from label_studio_sdk.label_interface import LabelInterface
out = []
for config, prediction in json.load(sys.stdin):
    try:
        out.append(LabelInterface(config).validate_prediction(prediction, return_errors=True))
    except Exception as exc:  # noqa: BLE001
        out.append([f"{type(exc).__name__}: {exc}"])
json.dump(out, sys.stdout)
"""


def label_studio_python():
    from test_preview import label_studio_bin

    exe = label_studio_bin()
    if not exe:
        pytest.skip("Label Studio is not installed: run tests/labelstudio.sh install (or set LABEL_STUDIO_BIN)")
    return str(Path(exe).parent / "python")


def ls_verdicts(pairs) -> list:
    import subprocess

    done = subprocess.run([label_studio_python(), "-c", LS_CHECK], input=json.dumps(pairs), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def predictions_of(case, fn=None):
    config, tasks, response = CASES[case]
    resp = copy.deepcopy(response())
    if fn is not None:
        fn(resp, tasks())
    items = [p for item in resp["results"] for p in (item if isinstance(item, list) else [item])]
    return [(config, p) for p in items if isinstance(p, dict) and isinstance(p.get("result"), list)]


@pytest.mark.e2e
def test_label_studio_accepts_what_preview_accepts_and_refuses_a_subset_of_what_it_rejects():
    """Label Studio 1.23's own validator (label_studio_sdk.LabelInterface.validate_prediction, used
    when its prediction validation is on) accepts every prediction preview calls valid, including
    those preview only warns about; whatever it refuses, preview rejects too."""
    valid = [pair for case in CASES for pair in predictions_of(case)]
    warned = [pair for case, fn, _, _ in WARNED for pair in predictions_of(case, fn)]
    verdicts = ls_verdicts(valid + warned)
    assert verdicts == [[]] * len(verdicts), [v for v in verdicts if v]

    broken = [(i, pair) for i, (case, fn, _, _) in enumerate(BROKEN) for pair in predictions_of(case, fn)]
    verdicts = ls_verdicts([pair for _, pair in broken])
    refused = {i for (i, _), errors in zip(broken, verdicts) if errors}
    for i in refused:
        case, fn, _, _ = BROKEN[i]
        assert not mutate(case, fn).valid  # preview rejects it as well, with its rule and path
    assert len(refused) >= len(BROKEN) // 2  # most broken cases are ones Label Studio itself refuses
