"""The reference SDK's `label_studio_ml.utils`, same names, signatures and results, so a ported
backend's `from lsdeploy.utils import ...` keeps working.

Written for lsdeploy (nothing here is copied); where the reference asserts, this raises the same
AssertionError so callers that catch it behave alike. `get_image_size` needs Pillow and
`compare_nested_structures` needs pytest: both are imported only when called.
"""
from __future__ import annotations

import difflib
import logging
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

# The data key the reference uses for a task without a value name (`$undefined$` in a config).
DATA_UNDEFINED_NAME = "$undefined$"

__all__ = [
    "DATA_UNDEFINED_NAME", "InMemoryLRUDictCache", "compare_nested_structures", "get_choice",
    "get_first_tag_keys", "get_image_size", "get_single_tag_keys", "is_preload_needed", "is_skipped",
    "is_valid_url", "match_labels",
]


def get_single_tag_keys(parsed_label_config: Dict, control_type: str, object_type: str) -> Tuple[str, str, str, List]:
    """(from_name, to_name, value, labels) of a config with exactly one control tag of
    `control_type` bound to one object tag of `object_type` (e.g. one Choices on one Text).
    `parsed_label_config` is `LabelStudioMLBase.parsed_label_config`."""
    assert len(parsed_label_config) == 1, (
        "Please check your Labeling Interface configuration: the model needs exactly one control tag, "
        f"the config has {len(parsed_label_config)}")
    from_name, info = next(iter(parsed_label_config.items()))
    assert info["type"] == control_type, (
        f'Label config has control tag "<{info["type"]}>" but "<{control_type}>" is expected for this model.')
    assert len(info["to_name"]) == 1, f"control tag {from_name!r} must point to exactly one object tag"
    assert len(info["inputs"]) == 1, f"control tag {from_name!r} must have exactly one input"
    assert info["inputs"][0]["type"] == object_type, (
        f'control tag {from_name!r} is bound to "<{info["inputs"][0]["type"]}>", "<{object_type}>" is expected')
    return from_name, info["to_name"][0], info["inputs"][0]["value"], info["labels"]


def get_first_tag_keys(parsed_label_config: Dict, control_type: str, object_type: str) -> Tuple[Optional[str], Optional[Dict]]:
    """(from_name, info) of the first control tag of `control_type` with an input of
    `object_type`; (None, None) when there is none."""
    for from_name, info in parsed_label_config.items():
        if info["type"] == control_type and any(i["type"] == object_type for i in info["inputs"]):
            return from_name, info
    return None, None


def is_skipped(completion: Dict) -> bool:
    """True for a task whose single annotation was skipped (cancelled)."""
    annotations = completion["annotations"]
    if len(annotations) != 1:
        return False
    return bool(annotations[0].get("skipped", False) or annotations[0].get("was_cancelled", False))


def get_choice(completion: Dict) -> str:
    """The first choice of the first region of the task's first annotation."""
    return completion["annotations"][0]["result"][0]["value"]["choices"][0]


def get_image_size(filepath: str) -> Tuple[int, int]:
    """(width, height) of an image as it is shown (EXIF orientation applied). Needs Pillow."""
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ImportError("get_image_size needs Pillow: pip install Pillow") from None
    with Image.open(filepath) as image:
        return ImageOps.exif_transpose(image).size


class InMemoryLRUDictCache:
    """A dict of at most `capacity` items; the least recently read or written goes first."""

    def __init__(self, capacity: int = 1):
        self.cache: "OrderedDict[Any, Any]" = OrderedDict()
        self.capacity = capacity

    def __contains__(self, key) -> bool:
        return key in self.cache

    def get(self, key):
        """The value, or None; a hit makes it the most recent."""
        if key not in self.cache:
            return None
        self.cache.move_to_end(key)
        return self.cache[key]

    def put(self, key, value) -> None:
        if key in self.cache:
            self.cache.move_to_end(key)
        elif len(self.cache) >= self.capacity:
            self.cache.popitem(last=False)
        self.cache[key] = value

    def __str__(self) -> str:
        return str(self.cache)


def match_labels(input: str, labels: List[str]) -> List[str]:  # noqa: A002 - the reference's name
    """For each line of `input` (a model's free-text answer), the label most similar to it."""
    matched = []
    for line in input.splitlines():
        ratios = [difflib.SequenceMatcher(None, line, label).ratio() for label in labels]
        matched.append(labels[ratios.index(max(ratios))])
    return matched


def is_valid_url(path: str) -> bool:
    """A URL with both a scheme and a host."""
    try:
        parts = urlsplit(path)
    except ValueError:
        return False
    return bool(parts.scheme and parts.netloc)


def is_preload_needed(url: str) -> bool:
    """Does this task value name a file to download (an upload, a local or cloud storage file, a
    URL) or a path on this machine, rather than being the data itself?"""
    if url.startswith(("upload", "/upload")):
        url = "/data/" + url.lstrip("/")
    return (url.startswith("/data/upload")
            or (url.startswith("/data/") and "?d=" in url)
            or url.startswith(("s3:", "gs:", "azure-blob:"))
            or is_valid_url(url)
            or os.path.exists(url))


def compare_nested_structures(a, b, path: str = "", rel: float = 1e-4, abs: Optional[float] = None) -> None:  # noqa: A002
    """Assert that two nests of dicts and lists are equal, floats within `rel`/`abs` (pytest.approx).
    Raises AssertionError naming the first path that differs."""
    from pytest import approx

    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"Keys mismatch at {path}"
        for key in a:
            compare_nested_structures(a[key], b[key], f"{path}.{key}", rel, abs)
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"List size mismatch at {path}"
        for i, (x, y) in enumerate(zip(a, b)):
            compare_nested_structures(x, y, f"{path}[{i}]", rel, abs)
    elif isinstance(a, float) and isinstance(b, float):
        assert a == approx(b, rel=rel, abs=abs), f"Mismatch at {path}"
    else:
        assert a == b, f"Mismatch at {path}"
