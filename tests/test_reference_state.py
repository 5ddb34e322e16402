"""A backend ported from the reference SDK keeps its state: `MODEL_DIR/cache.db`, the SQLite
table the reference writes (`cache(project_id, key, value)`, string values), is copied into
lsdeploy's store on the first start, once, without replacing what lsdeploy has."""
from __future__ import annotations

import json
import logging
import sqlite3
import textwrap

import pytest

from lsdeploy.serve import ServeSettings, build_app
from lsdeploy.state import SQLiteStore
from lsdeploy.state.reference import MARKER_KEY, MARKER_PROJECT, import_reference_state

CONFIG = '<View><Text name="text" value="$text"/><Choices name="sentiment" toName="text">' \
         '<Choice value="Positive"/><Choice value="Negative"/></Choices></View>'


def write_reference_cache(directory, rows):
    """cache.db as the reference SDK's SqliteCache writes it: its table, REPLACE INTO, strings."""
    directory.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(directory / "cache.db") as conn:
        conn.execute("""
            CREATE TABLE IF NOT EXISTS cache (
                project_id TEXT NOT NULL,
                key TEXT NOT NULL,
                value TEXT NOT NULL,
                PRIMARY KEY (project_id, key)
            );
        """)
        for project, key, value in rows:
            assert isinstance(value, str)  # the reference refuses anything else ('Value must be a string')
            conn.execute("REPLACE INTO cache (project_id, key, value) VALUES (?, ?, ?);", (project, key, value))
    conn.close()
    return directory / "cache.db"


ROWS = [
    ("3", "model_version", "SentimentModel-v0.0.7"),
    ("3", "label_config", CONFIG),
    ("3", "parsed_label_config", json.dumps({"sentiment": {"type": "Choices"}})),
    ("3", "extra_params", '{"threshold": 0.5}'),
    ("7", "counter", "12"),
    ("", "model_version", "0.0.1"),
]


@pytest.fixture
def store(tmp_path):
    store = SQLiteStore(str(tmp_path / "lsdeploy-state"))
    yield store
    store.close()


def test_every_missing_key_is_copied_as_the_string_it_was_and_lsdeploy_values_are_kept(tmp_path, store):
    write_reference_cache(tmp_path / "backend", ROWS)
    store.set("3", "model_version", "lsdeploy-written")  # lsdeploy's own value wins (create-only)

    record = import_reference_state(store, str(tmp_path / "elsewhere"), str(tmp_path / "backend"))

    assert record["keys"] == 6 and record["copied"] == 5
    assert record["source"] == str(tmp_path / "backend" / "cache.db")
    assert store.get("3", "model_version") == "lsdeploy-written"
    assert store.get("3", "label_config") == CONFIG
    assert store.get("3", "extra_params") == '{"threshold": 0.5}'  # the string, not a parsed dict
    assert store.get("7", "counter") == "12"  # a string, as the reference's get answers it
    assert store.get("", "model_version") == "0.0.1"
    assert store.get(MARKER_PROJECT, MARKER_KEY)["copied"] == 5


def test_the_import_runs_once(tmp_path, store):
    cache = write_reference_cache(tmp_path, ROWS[:1])
    assert import_reference_state(store, str(tmp_path))["copied"] == 1
    store.delete("3", "model_version")
    with sqlite3.connect(cache) as conn:
        conn.execute("REPLACE INTO cache (project_id, key, value) VALUES ('9', 'late', 'x');")
    conn.close()

    assert import_reference_state(store, str(tmp_path)) is None
    assert not store.has("3", "model_version") and not store.has("9", "late")


def test_without_a_cache_db_nothing_is_imported_or_recorded(tmp_path, store):
    assert import_reference_state(store, str(tmp_path), None) is None
    assert not store.has(MARKER_PROJECT, MARKER_KEY)


def test_an_unreadable_cache_db_is_logged_and_tried_again_next_start(tmp_path, store, caplog):
    (tmp_path / "cache.db").write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.WARNING, logger="lsdeploy.state.reference"):
        assert import_reference_state(store, str(tmp_path)) is None
    assert "cannot read the reference SDK's state" in caplog.text and str(tmp_path / "cache.db") in caplog.text
    assert not store.has(MARKER_PROJECT, MARKER_KEY)

    (tmp_path / "cache.db").unlink()
    write_reference_cache(tmp_path, ROWS[:1])
    assert import_reference_state(store, str(tmp_path))["copied"] == 1


MODEL = textwrap.dedent('''
    from lsdeploy.model import LabelStudioMLBase
    from lsdeploy.response import ModelResponse


    class SentimentModel(LabelStudioMLBase):
        def predict(self, tasks, context=None, **kwargs):
            return ModelResponse(predictions=[{"result": [], "score": float(self.get("counter") or 0)} for _ in tasks])
''')


@pytest.mark.parametrize("where", ["backend directory", "MODEL_DIR"])
def test_a_started_backend_keeps_the_reference_model_version_and_keys(tmp_path, model_dir, where):
    """build_app (what `start` runs in the master) imports cache.db from the reference's
    MODEL_DIR: the backend directory (its default, '.') or MODEL_DIR (its Docker setting)."""
    backend = tmp_path / "backend"
    backend.mkdir()
    (backend / "model.py").write_text(MODEL)
    write_reference_cache(backend if where == "backend directory" else model_dir,
                          [("3", "model_version", "SentimentModel-v0.0.7"), ("3", "counter", "4")])

    client = build_app(ServeSettings(directory=str(backend))).test_client()

    setup = client.post("/setup", json={"project": "3.1700000000", "schema": CONFIG, "hostname": "",
                                        "access_token": "", "extra_params": None})
    assert setup.status_code == 200, setup.get_json()
    assert setup.get_json()["model_version"] == "SentimentModel-v0.0.7"
    predict = client.post("/predict", json={"tasks": [{"id": 1, "data": {"text": "hi"}}], "project": "3.1700000000",
                                            "label_config": CONFIG})
    assert predict.status_code == 200, predict.get_json()
    result = predict.get_json()["results"][0]
    assert result["model_version"] == "SentimentModel-v0.0.7" and result["score"] == 4.0
    # another project starts fresh
    other = client.post("/setup", json={"project": "5.1700000000", "schema": CONFIG})
    assert other.get_json()["model_version"] == "0.0.1"
