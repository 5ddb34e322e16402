"""Where things live under gs://BUCKET/PREFIX/, and the body of a state object.

- ``state/p-<project>/k-<key>.json``: one object per key, ``{"v": value, "w": [ids]}``;
- ``state/p-<project>/a-<name>.json``: the pointer of an artifact ``{"v": {"sha256", "size", ...}}``;
- ``artifacts/p-<project>/<name>/<sha256>``: artifact contents, immutable, content-addressed;
- ``locks/p-<project>.json``: a training lease;
- ``queue/p-<project>/<event_id>.json``: the body of one queued event, written once, read and
  deleted by the project's training queue (bytes as given, up to 16 MiB). Outside ``state/``,
  so the snapshot's listing never sees (nor downloads) them.

A key of the snapshot is ``(kind, project, key)``, kind ``"k"`` (a key) or ``"a"`` (an artifact
pointer). Project and key are percent-encoded in object names.
"""
from __future__ import annotations

import json
import re
import urllib.parse
from typing import Any, Optional

from ...errors import StateError
from ..base import check_event_id, encode_value

MAX_VALUE_BYTES = 4 << 20  # far below the client's 8 MiB switch to resumable uploads
RECENT_WRITES = 16  # update ids kept in a state object ("w")
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def parse_uri(uri: str) -> tuple[str, str]:
    """'gs://bucket/some/prefix' -> ('bucket', 'some/prefix/'); 'gs://bucket' -> ('bucket', '')."""
    if not isinstance(uri, str) or not uri.startswith("gs://"):
        raise StateError(f"MODEL_STATE_URI={uri!r} is not a Cloud Storage URI: use gs://BUCKET/PREFIX")
    bucket, _, prefix = uri[len("gs://"):].partition("/")
    if not _BUCKET_NAME.match(bucket):
        raise StateError(f"MODEL_STATE_URI={uri!r}: {bucket!r} is not a valid bucket name "
                         "(lowercase letters, digits, '-', '_', '.'; 3 to 222 characters)")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")


def quote(text: str) -> str:
    return urllib.parse.quote(str(text), safe="")


def project_dir(project: str) -> str:
    return "p-" + quote(project)


def state_name(kind: str, project: str, key: str) -> str:
    """Object name (relative to PREFIX/state/) of a key ('k') or an artifact pointer ('a')."""
    return f"{project_dir(project)}/{kind}-{quote(key)}.json"


def event_name(project: str, event_id: str) -> str:
    """Object name (relative to PREFIX/queue/) of a queued event's body; ValueError for an id
    that could leave the project's folder."""
    return f"{project_dir(project)}/{check_event_id(event_id)}.json"


def parse_state_name(name: str) -> Optional[tuple]:
    project_part, _, leaf = name.partition("/")
    if not project_part.startswith("p-") or "/" in leaf or not leaf.endswith(".json") or leaf[1:2] != "-":
        return None
    kind = leaf[0]
    if kind not in ("k", "a"):
        return None
    return kind, urllib.parse.unquote(project_part[2:]), urllib.parse.unquote(leaf[2:-len(".json")])


def decode_body(data: bytes) -> dict:
    body = json.loads(data.decode("utf-8"))
    if not isinstance(body, dict) or "v" not in body:
        raise ValueError("not an lsdeploy state object")
    return body


def encode_body(value: Any, recent: Optional[list] = None) -> bytes:
    text = encode_value(value)
    body = f'{{"v":{text}' + (f',"w":{json.dumps(recent)}' if recent else "") + "}"
    data = body.encode("utf-8")
    if len(data) > MAX_VALUE_BYTES:
        raise ValueError(f"state value is {len(data)} bytes, more than {MAX_VALUE_BYTES >> 20} MiB: "
                         "keep big data in files with save_artifact()")
    return data
