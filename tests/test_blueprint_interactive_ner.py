"""The interactive-ner blueprint: create it, then talk to it as Label Studio 1.23.2 does, through
Flask's test client and through a real `label-studio-ml start` process; preview on it."""
from __future__ import annotations

import copy
import json

import pytest

from lsdeploy.blueprints import available, create
from lsdeploy.validate import validate_predictions
from support import Server, run_cli

# The /predict body a real Label Studio 1.23.2 sent for `POST /api/ml/{id}/interactive-annotating
# {"task": 1, "context": {"result": [<the region>]}}` after the user saved a draft with that region
# (captured by a recording backend; tests/e2e/test_interactive_ner_e2e.py checks it again). The
# context is passed through as the UI sent it; the task comes with the user's drafts.
REGION = {"id": "abc123", "from_name": "label", "to_name": "text", "type": "labels",
          "value": {"start": 0, "end": 5, "text": "Alice", "labels": ["PER"]}, "origin": "manual"}
CAPTURED_CONFIG = ('<View>\n  <Labels name="label" toName="text">\n    <Label value="PER"/><Label value="ORG"/>\n'
                   '  </Labels>\n  <Text name="text" value="$text"/>\n</View>')
INTERACTIVE_BODY = {
    "tasks": [{
        "id": 1, "annotations": [],
        "drafts": [{"id": 1, "user": "admin@example.com", "created_username": "admin@example.com, 1",
                    "created_ago": "0\u00a0minutes", "result": [REGION], "lead_time": 1.5, "was_postponed": False,
                    "import_id": None, "created_at": "2026-12-02T10:27:15.969681Z",
                    "updated_at": "2026-12-02T10:27:15.969721Z", "task": 1, "annotation": None}],
        "predictions": [{"id": 1, "result": [], "model_version": "0.0.1", "created_ago": "0\u00a0minutes", "score": 0.0,
                         "cluster": None, "neighbors": None, "mislabeling": 0.0,
                         "created_at": "2026-12-02T10:27:15.329676Z", "updated_at": "2026-12-02T10:27:15.329718Z",
                         "model": None, "model_run": None, "task": 1, "project": 1}],
        "data": {"text": "Alice met Bob. Later Alice left."}, "meta": {},
        "created_at": "2026-12-02T10:27:10.569644Z", "updated_at": "2026-12-02T10:27:15.313296Z", "allow_skip": True,
        "inner_id": 1, "total_annotations": 0, "cancelled_annotations": 0, "total_predictions": 1,
        "comment_count": 0, "unresolved_comment_count": 0, "last_comment_updated_at": None, "project": 1,
        "updated_by": 1, "comment_authors": []}],
    "project": "1.1796207230",
    "label_config": CAPTURED_CONFIG,
    "params": {"login": None, "password": None, "context": {"result": [REGION]}},
}

CONFIG = """<View>
  <Labels name="label" toName="text">
    <Label value="PER"/>
    <Label value="ORG"/>
    <Label value="LOC"/>
    <Label value="MISC"/>
  </Labels>
  <Text name="text" value="$text"/>
</View>"""


def task(task_id, text, drafts=()):
    return {"id": task_id, "data": {"text": text}, "meta": {}, "annotations": [], "predictions": [],
            "drafts": [{"id": 90 + i, "result": list(d), "annotation": None} for i, d in enumerate(drafts)],
            "project": 1}


def region(text, phrase, label, occurrence=0, from_name="label"):
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(phrase, start + 1)
    return {"id": f"r{start}", "from_name": from_name, "to_name": "text", "type": "labels", "origin": "manual",
            "value": {"start": start, "end": start + len(phrase), "text": phrase, "labels": [label]}}


def body(tasks, context=None, project="1.1796207230", label_config=CONFIG):
    return {"tasks": tasks, "project": project, "label_config": label_config,
            "params": {"login": None, "password": None, "context": context}}


def event(annotation_id, text, regions, action="ANNOTATION_CREATED", task_id=None, label_config=CONFIG):
    task_id = annotation_id if task_id is None else task_id
    return {"action": action,
            "annotation": {"id": annotation_id, "task": task_id, "was_cancelled": False, "result": regions},
            "task": task(task_id, text), "project": {"id": 1, "title": "ner", "label_config": label_config}}


def spans(prediction):
    return [(r["value"]["start"], r["value"]["end"], r["value"]["text"], r["value"]["labels"], r["score"])
            for r in prediction["result"]]


def assert_valid(label_config, tasks, answer):
    report = validate_predictions(label_config, tasks, answer)
    assert report.valid and not report.problems, [str(p) for p in report.problems]


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    target = tmp_path_factory.mktemp("blueprint") / "ner"
    create(target, blueprint="interactive-ner")
    return target


class Backend:
    """Flask's test client or a real server, behind the same calls."""

    def __init__(self, post):
        self.post = post  # post(path, payload) -> response

    def predict(self, payload):
        resp = self.post("/predict", payload)
        assert resp.status_code == 200, _json(resp)
        return _json(resp)["results"]

    def fit(self, payload):
        resp = self.post("/webhook", payload)
        assert resp.status_code == 201, _json(resp)
        return _json(resp)["result"]


def _json(resp):
    return resp.json() if callable(getattr(resp, "json", None)) else resp.get_json()


@pytest.fixture(params=["test-client", "server"])
def ner(request, directory, tmp_path, monkeypatch):
    """The backend with a fresh state store, through Flask's test client, then as a real
    `label-studio-ml start` process."""
    monkeypatch.setenv("FIT_WAIT_SECONDS", "30")  # fits answer 201 with their result, even on a loaded machine
    if request.param == "server":
        with Server(directory, env={"MODEL_DIR": str(tmp_path / "state")}) as server:
            yield Backend(server.post)
        return
    from lsdeploy import create_app
    from lsdeploy.loader import load_model_class
    from lsdeploy.state import SQLiteStore, set_default_store

    set_default_store(None)
    client = create_app(load_model_class(directory), store=SQLiteStore(str(tmp_path / "state"))).test_client()
    yield Backend(lambda path, payload: client.post(path, json=payload))
    set_default_store(None)


# -- the blueprint -----------------------------------------------------------------------------------
def test_listed_dependency_free_and_documented(directory, tmp_path):
    assert "interactive-ner" in available()
    requirements = [line for line in (directory / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert requirements == []  # nothing beyond lsdeploy
    readme = (directory / "README.md").read_text()
    assert "## Interactive pre-annotation" in readme and "--interactive" in readme and "is_interactive" in readme
    assert "**Auto-Annotation**" in readme
    # the other blueprints' READMEs are rendered as before: no section, no leftover template syntax
    create(tmp_path / "plain", blueprint="default")
    plain = (tmp_path / "plain" / "README.md").read_text()
    assert "Interactive pre-annotation" not in plain and "{%" not in plain
    assert "(the key is read from `LABEL_STUDIO_API_KEY`).\n\n## Files\n" in plain
    assert '<Labels name="label" toName="text">' in (directory / "label_config.xml").read_text()


# -- interactive pre-annotation -----------------------------------------------------------------------
def test_the_interactive_request_label_studio_sends(ner):
    (prediction,) = ner.predict(copy.deepcopy(INTERACTIVE_BODY))
    # the other Alice, labelled as the user labelled the first; the user's own region is not repeated
    assert spans(prediction) == [(21, 26, "Alice", ["PER"], 1.0)]
    assert prediction["score"] == 1.0 and prediction["model_version"] == "0.0.1"
    (suggestion,) = prediction["result"]
    assert (suggestion["from_name"], suggestion["to_name"], suggestion["type"]) == ("label", "text", "labels")
    assert isinstance(suggestion["id"], str) and suggestion["id"]
    assert_valid(CAPTURED_CONFIG, INTERACTIVE_BODY["tasks"], {"results": [prediction]})


def test_interactive_leaves_out_what_the_user_labelled_and_overlaps(ner):
    text = "Bob Smith saw Bob. Bob Smith and Bob left; Bobby stayed. Bob"
    # the user labelled the first "Bob Smith" and the "Bob" at 14; their draft has the "Bob" at 33 as ORG
    regions = [region(text, "Bob Smith", "PER"), region(text, "Bob", "PER", occurrence=1)]
    draft = [region(text, "Bob", "ORG", occurrence=3)]
    assert (regions[1]["value"]["start"], draft[0]["value"]["start"]) == (14, 33)
    (prediction,) = ner.predict(body([task(1, text, drafts=[draft])], {"result": regions}))
    found = [(s, e, t, labels) for s, e, t, labels, _ in spans(prediction)]
    # "Bob Smith" at 19 wins over the "Bob" inside it; the "Bob"s at 0 (inside the user's region),
    # 14 (the user's) and 33 (the draft's) are not suggested; "Bobby" is another word
    assert found == [(19, 28, "Bob Smith", ["PER"]), (57, 60, "Bob", ["PER"])]
    assert_valid(CONFIG, [task(1, text)], {"results": [prediction]})


def test_overlapping_occurrences_of_one_span(ner):
    text = "ha ha ha ha ha"
    (prediction,) = ner.predict(body([task(1, text)], {"result": [region(text, "ha ha", "MISC")]}))
    # occurrences at 3, 6, 9 overlap the user's [0:5] or each other: leftmost first, no overlaps
    assert [(s, e) for s, e, *_ in spans(prediction)] == [(6, 11)]
    text = "New York City is not New York; York is"
    regions = [region(text, "New York", "LOC", occurrence=1), region(text, "York", "LOC", occurrence=2)]
    (prediction,) = ner.predict(body([task(1, text)], {"result": regions}))
    # at 0 both "New York" and "York" (at 4) match: the longer wins; "New York City" was not labelled
    assert [(s, e, t) for s, e, t, *_ in spans(prediction)] == [(0, 8, "New York")]


def test_unicode_offsets_are_code_points(ner):
    text = "😀 Zoë met Zoë, Zoëlle and ZOË. Cafe open, Café! Cafe\u0301 and 東京 東京タワー, 東京"
    zoe = region(text, "Zoë", "PER")
    assert text[zoe["value"]["start"]:zoe["value"]["end"]] == "Zoë" and zoe["value"]["start"] == 2
    (prediction,) = ner.predict(body([task(1, text)], {"result": [zoe, region(text, "Cafe", "ORG")]}))
    # whole words: not inside Zoëlle; "Cafe" + combining accent is another word; case-sensitive: not ZOË
    assert [(s, e, t) for s, e, t, *_ in spans(prediction)] == [(10, 13, "Zoë")]
    assert_valid(CONFIG, [task(1, text)], {"results": [prediction]})

    tokyo = region(text, "東京", "LOC")
    (prediction,) = ner.predict(body([task(1, text)], {"result": [tokyo]}))
    # whole words in a script without spaces: only the 東京 standing alone
    assert [(s, t) for s, _, t, *_ in spans(prediction)] == [(text.rindex("東京"), "東京")]
    for s, e, t, *_ in spans(prediction):
        assert text[s:e] == t


def test_extra_params_turn_off_case_and_whole_words(ner):
    resp = ner.post("/setup", {"project": "1.1796207230", "schema": CONFIG, "hostname": "http://127.0.0.1:1",
                               "access_token": "x", "extra_params": {"match_case": False, "whole_word": False}})
    assert resp.status_code == 200
    text = "Apple sells apples; APPLE. 東京タワーと東京"
    (prediction,) = ner.predict(body([task(1, text)], {"result": [region(text, "Apple", "ORG"),
                                                                   region(text, "東京", "LOC")]}))
    found = [(s, t, score) for s, _, t, _, score in spans(prediction)]
    assert found == [(12, "apple", 0.8), (20, "APPLE", 0.8), (text.rindex("東京"), "東京", 1.0)]
    assert prediction["score"] == pytest.approx((0.8 + 0.8 + 1.0) / 3, abs=1e-4)
    assert_valid(CONFIG, [task(1, text)], {"results": [prediction]})


def test_no_matches(ner):
    text = "Only Carol here."
    (prediction,) = ner.predict(body([task(1, text)], {"result": [region(text, "Carol", "PER")]}))
    assert prediction["result"] == [] and prediction["score"] == 0.0
    # a context without a labelled text span (another control, an empty list): nothing to suggest
    other = {"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": ["x"]}}
    for context in ({"result": [other]}, {"result": []}):
        (prediction,) = ner.predict(body([task(1, text)], context))
        assert prediction["result"] == [] and prediction["score"] == 0.0
    # batch prediction of a model that learned nothing yet: one empty prediction per task
    results = ner.predict(body([task(1, text), task(2, "")]))
    assert [(r["result"], r["score"], r["model_version"]) for r in results] == [([], 0.0, "0.0.1")] * 2


def test_matcher_finds_every_occurrence_a_plain_search_finds(directory):
    """The one-pass matcher (Aho-Corasick) against str.startswith at every offset: random texts and
    phrases over a small alphabet, so occurrences overlap and phrases share prefixes and suffixes."""
    import random

    from lsdeploy.loader import import_file

    Matcher = import_file(directory / "model.py").Matcher
    rng = random.Random(7)
    for _ in range(300):
        phrases = list({"".join(rng.choices("abAB ", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 12))})
        text = "".join(rng.choices("abAB ", k=rng.randint(0, 40)))
        for match_case in (True, False):
            fold = (lambda x: x) if match_case else str.lower
            expected = sorted((i, i + len(p), n) for n, p in enumerate(phrases) for i in range(len(text))
                              if fold(text).startswith(fold(p), i))
            assert sorted(Matcher(phrases, match_case).find(text)) == expected, (phrases, text, match_case)
    # lower case one for one: "İ" lowers to two characters, so it stays itself and offsets hold
    text = "İstanbul, istanbul, ISTANBUL"
    assert Matcher(["istanbul"], False).find(text) == [(10, 18, 0), (20, 28, 0)]
    assert Matcher(["İstanbul"], True).find(text) == [(0, 8, 0)]


# -- learning from annotations -----------------------------------------------------------------------
def test_fit_then_batch_prediction_and_the_version_rule(ner):
    first = "Alice works at Acme in Paris."
    taught = event(10, first, [region(first, "Alice", "PER"), region(first, "Acme", "ORG"),
                               region(first, "Paris", "LOC")])
    assert ner.fit(taught) == {"learned": True, "spans": 3, "model_version": "0.1.0"}
    new = [task(101, "Paris: Alice met Bob at Acme, then Alice left Paris."), task(102, "Nobody here.")]
    results = ner.predict(body(new))
    assert [r["model_version"] for r in results] == ["0.1.0", "0.1.0"]
    assert [(s, t, labels[0]) for s, _, t, labels, _ in spans(results[0])] == [
        (0, "Paris", "LOC"), (7, "Alice", "PER"), (24, "Acme", "ORG"), (35, "Alice", "PER"), (46, "Paris", "LOC")]
    assert results[0]["score"] == 1.0 and results[1]["result"] == [] and results[1]["score"] == 0.0
    assert_valid(CONFIG, new, {"results": results})

    # idempotent: the same event again, the same annotation updated without change, another
    # annotation that agrees: nothing new learned, the version stays
    assert ner.fit(taught) == {"learned": False, "spans": 3, "model_version": "0.1.0"}
    # START_TRAINING without Label Studio's address (no /setup yet) keeps what webhooks taught
    assert ner.fit({"action": "START_TRAINING", "project": {"id": 1, "label_config": CONFIG}}) == {
        "learned": False, "spans": 3, "model_version": "0.1.0"}
    assert ner.fit({**taught, "action": "ANNOTATION_UPDATED"})["model_version"] == "0.1.0"
    assert ner.fit(event(11, "Alice!", [region("Alice!", "Alice", "PER")]))["learned"] is False
    # an interactive request teaches nothing
    ner.predict(body([task(1, first)], {"result": [region(first, "Acme", "ORG")]}))
    assert ner.predict(body(new[:1]))[0]["model_version"] == "0.1.0"

    # a new span: a new version; a disagreement: the label given most often, scored by agreement
    assert ner.fit(event(12, "Bob and Alice", [region("Bob and Alice", "Bob", "PER")]))["model_version"] == "0.2.0"
    assert ner.fit(event(13, "Alice Corp", [region("Alice Corp", "Alice", "ORG")]))["model_version"] == "0.3.0"
    (prediction,) = ner.predict(body([task(103, "Alice")]))
    assert spans(prediction) == [(0, 5, "Alice", ["PER"], round(2 / 3, 4))]  # 2 PER (10, 11) against 1 ORG
    # an update that changes the label: the annotation now says ORG, 2 to 1 the other way
    assert ner.fit(event(11, "Alice!", [region("Alice!", "Alice", "ORG")], action="ANNOTATION_UPDATED"))[
        "model_version"] == "0.4.0"
    (prediction,) = ner.predict(body([task(103, "Alice")]))
    assert spans(prediction) == [(0, 5, "Alice", ["ORG"], round(2 / 3, 4))]
    # deleted annotations are forgotten; a skipped one teaches nothing
    resp = ner.fit({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 11}, {"id": 13}],
                    "project": {"id": 1, "label_config": CONFIG}})
    assert resp == {"learned": True, "spans": 4, "model_version": "0.5.0"}
    (prediction,) = ner.predict(body([task(103, "Alice")]))
    assert spans(prediction) == [(0, 5, "Alice", ["PER"], 1.0)]
    skipped = event(14, "Bob", [region("Bob", "Bob", "ORG")])
    skipped["annotation"]["was_cancelled"] = True
    assert ner.fit(skipped)["learned"] is False


def test_annotations_created_in_bulk(ner):
    """ANNOTATIONS_CREATED ("Create annotations from predictions"): lists of annotations and tasks."""
    texts = {1: "Ada met Grace.", 2: "Grace left Rome."}
    bulk = {"action": "ANNOTATIONS_CREATED", "project": {"id": 1, "label_config": CONFIG},
            "task": [task(2, texts[2]), task(1, texts[1])],
            "annotation": [{"id": 21, "task": 1, "result": [region(texts[1], "Ada", "PER")]},
                           {"id": 22, "task": 2, "result": [region(texts[2], "Rome", "LOC")]}]}
    assert ner.fit(bulk) == {"learned": True, "spans": 2, "model_version": "0.1.0"}
    (prediction,) = ner.predict(body([task(3, "Rome, said Ada.")]))
    assert [(t, labels) for _, _, t, labels, _ in spans(prediction)] == [("Rome", ["LOC"]), ("Ada", ["PER"])]


def test_ties_go_to_the_newest_annotation_and_replays_do_not_reorder(ner):
    ner.fit(event(1, "Jordan", [region("Jordan", "Jordan", "PER")]))
    assert ner.fit(event(2, "Jordan", [region("Jordan", "Jordan", "LOC")]))["model_version"] == "0.2.0"
    assert spans(ner.predict(body([task(9, "Jordan")]))[0]) == [(0, 6, "Jordan", ["LOC"], 0.5)]
    # the first annotation's webhook again (Label Studio retries): still LOC, same version
    assert ner.fit(event(1, "Jordan", [region("Jordan", "Jordan", "PER")])) == {
        "learned": False, "spans": 1, "model_version": "0.2.0"}


# -- a real `label-studio-ml start` process ------------------------------------------------------------
def test_real_server_interactive_fit_batch_and_restart(directory, tmp_path):
    env = {"MODEL_DIR": str(tmp_path / "state"), "FIT_WAIT_SECONDS": "30"}
    with Server(directory, "--workers", "2", env=env) as server:
        ner = Backend(server.post)
        (prediction,) = ner.predict(copy.deepcopy(INTERACTIVE_BODY))
        assert spans(prediction) == [(21, 26, "Alice", ["PER"], 1.0)]
        # batch prediction after a fit, on either worker: the state store is shared
        text = "Ada Lovelace met Charles Babbage."
        assert ner.fit(event(1, text, [region(text, "Ada Lovelace", "PER"), region(text, "Charles Babbage", "PER")],
                             label_config=CAPTURED_CONFIG))["model_version"] == "0.1.0"
        assert ner.fit(event(1, text, [region(text, "Ada Lovelace", "PER"), region(text, "Charles Babbage", "PER")],
                             label_config=CAPTURED_CONFIG))["learned"] is False
        tasks = [task(2, "Charles Babbage wrote to Ada Lovelace; Ada replied.")]
        for _ in range(4):
            (prediction,) = ner.predict(body(tasks, label_config=CAPTURED_CONFIG))
            assert [(t, labels) for _, _, t, labels, _ in spans(prediction)] == [
                ("Charles Babbage", ["PER"]), ("Ada Lovelace", ["PER"])]
            assert prediction["model_version"] == "0.1.0"
        assert server.get("/versions?project=1").json()["model_version"] == "0.1.0"
    with Server(directory, env=env) as server:  # a restart keeps what it learned
        (prediction,) = Backend(server.post).predict(body(tasks, label_config=CAPTURED_CONFIG))
        assert len(prediction["result"]) == 2 and prediction["model_version"] == "0.1.0"


# -- preview --------------------------------------------------------------------------------------------
def test_preview_validates_its_predictions_clean(directory, tmp_path):
    texts = ["Grace Hopper joined the Navy.", "Later Grace Hopper led COBOL; the Navy agreed. 😀 Grace Hopper"]
    tasks_file = tmp_path / "tasks.json"
    tasks_file.write_text(json.dumps([{"data": {"text": t}} for t in texts]))
    export = tmp_path / "export.json"
    first = texts[0]
    export.write_text(json.dumps([{"id": 1, "data": {"text": first}, "annotations": [{"id": 5, "result": [
        region(first, "Grace Hopper", "PER"), region(first, "Navy", "ORG")]}]}]))
    done = run_cli("preview", directory, "--json", "--runner", "process", "--tasks", tasks_file, "--fit", export,
                   timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["ok"] and report["validation"]["valid"] and report["validation"]["warnings"] == 0
    assert [r["result"] for r in report["response"]["results"]] == [[], []]  # nothing learned yet
    assert report["fit"]["model_version_before"] == "0.0.1" and report["fit"]["model_version_after"] == "0.1.0"
    after = report["validation_after_fit"]
    assert after["valid"] and after["errors"] == 0 and after["warnings"] == 0
    found = [[(r["value"]["text"], r["value"]["labels"][0]) for r in p["result"]]
             for p in report["response_after_fit"]["results"]]
    assert found == [[("Grace Hopper", "PER"), ("Navy", "ORG")],
                     [("Grace Hopper", "PER"), ("Navy", "ORG"), ("Grace Hopper", "PER")]]
