"""lsdeploy.utils: the reference SDK's utilities that ported backends import, same results."""
from __future__ import annotations

import pytest

from lsdeploy import LabelStudioMLBase
from lsdeploy.utils import (DATA_UNDEFINED_NAME, InMemoryLRUDictCache, compare_nested_structures, get_choice,
                            get_first_tag_keys, get_image_size, get_single_tag_keys, is_preload_needed, is_skipped,
                            is_valid_url, match_labels)

IMAGE_CONFIG = """<View><Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels></View>"""
TWO_CONTROLS = """<View><Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text"><Choice value="Positive"/></Choices>
  <Labels name="ner" toName="text"><Label value="PER"/></Labels></View>"""


def parsed(config):
    return LabelStudioMLBase(project_id="1", label_config=config).parsed_label_config


def test_get_single_tag_keys(model_dir):
    assert get_single_tag_keys(parsed(IMAGE_CONFIG), "RectangleLabels", "Image") == \
        ("label", "image", "image", ["Car", "Person"])
    with pytest.raises(AssertionError, match='"<Choices>" is expected'):
        get_single_tag_keys(parsed(IMAGE_CONFIG), "Choices", "Image")
    with pytest.raises(AssertionError, match="exactly one control tag"):
        get_single_tag_keys(parsed(TWO_CONTROLS), "Choices", "Text")


def test_get_first_tag_keys(model_dir):
    from_name, info = get_first_tag_keys(parsed(TWO_CONTROLS), "Labels", "Text")
    assert from_name == "ner" and info["labels"] == ["PER"] and info["to_name"] == ["text"]
    assert get_first_tag_keys(parsed(TWO_CONTROLS), "Labels", "Image") == (None, None)


def test_is_skipped_and_get_choice():
    task = {"annotations": [{"result": [{"value": {"choices": ["Positive", "Neutral"]}}], "was_cancelled": False}]}
    assert is_skipped(task) is False and get_choice(task) == "Positive"
    assert is_skipped({"annotations": [{"result": [], "was_cancelled": True}]}) is True
    assert is_skipped({"annotations": [{"result": [], "skipped": True}]}) is True
    assert is_skipped({"annotations": [{"skipped": True}, {"skipped": True}]}) is False  # only a single annotation


def test_get_image_size_applies_exif_orientation(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 20)).save(tmp_path / "plain.png")
    assert get_image_size(str(tmp_path / "plain.png")) == (40, 20)
    rotated = Image.new("RGB", (40, 20))
    exif = rotated.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees when shown
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    assert get_image_size(str(tmp_path / "rotated.jpg")) == (20, 40)


def test_in_memory_lru_dict_cache():
    cache = InMemoryLRUDictCache(capacity=2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)  # evicts b
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.get("b") is None
    cache.put("a", 10)
    assert cache.get("a") == 10 and list(cache.cache.items()) == [("c", 3), ("a", 10)]
    assert str(cache) == str(cache.cache)


def test_match_labels_picks_the_closest_label_per_line():
    assert match_labels("positive\nNegativ\nneutral-ish", ["Positive", "Negative", "Neutral"]) == \
        ["Positive", "Negative", "Neutral"]
    assert match_labels("", ["A"]) == []


@pytest.mark.parametrize("value,expected", [
    ("https://example.com/a.jpg", True), ("s3://bucket/key.jpg", True), ("gs://b/k", True),
    ("azure-blob://c/k", True), ("/data/upload/1/a.jpg", True), ("upload/1/a.jpg", True),
    ("/upload/1/a.jpg", True), ("/data/local-files/?d=images/a.jpg", True), ("/data/local-files/a.jpg", False),
    ("just some text", False), ("http:/broken", False),
])
def test_is_preload_needed(value, expected):
    assert is_preload_needed(value) is expected


def test_is_preload_needed_for_an_existing_path(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    assert is_preload_needed(str(tmp_path / "x.txt")) is True
    assert is_valid_url("http://h/p") and not is_valid_url("/p") and not is_valid_url("http://[::1")


def test_compare_nested_structures():
    compare_nested_structures({"a": [1.0, {"b": 0.30000001}]}, {"a": [1.0, {"b": 0.3}]})
    with pytest.raises(AssertionError, match=r"Mismatch at \.a\[1\]\.b"):
        compare_nested_structures({"a": [1.0, {"b": 0.31}]}, {"a": [1.0, {"b": 0.3}]})
    with pytest.raises(AssertionError, match="Keys mismatch at .a"):
        compare_nested_structures({"a": {"x": 1}}, {"a": {"y": 1}})
    with pytest.raises(AssertionError, match="List size mismatch at "):
        compare_nested_structures([1], [1, 2])


def test_data_undefined_name():
    assert DATA_UNDEFINED_NAME == "$undefined$"
