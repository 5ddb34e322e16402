"""`sample_tasks` and `sample_files`: tasks whose data fits a label config's object tags, and the
files (PNG, WAV, CSV, text) they link to, for when the user has no tasks of their own."""
from __future__ import annotations

import base64
import io
import math
import struct
import wave
import xml.etree.ElementTree as ET
import zlib
from typing import Optional

from ..labelconfig import ObjectTag, parse_tags

SAMPLE_TEXTS = (
    "Alice Johnson flew from Paris to Berlin on Monday to meet the team at ACME Corporation.",
    "The new phone has a bright screen, but the battery is empty before lunch.",
    "Dr. Kim presented the results at a conference in Tokyo in March, and the audience loved it.",
)
SAMPLE_PARAGRAPHS = (
    ("Alice", "Hi Bob, did the package arrive?"),
    ("Bob", "Yes, this morning. Everything was intact."),
    ("Alice", "Great, thanks for letting me know!"),
)


def sample_files(label_config: str, count: int = 2) -> dict:
    """Files the sample tasks link to: {name: (content type, bytes)}."""
    tags = parse_tags(label_config)
    files = {}
    for i in range(count):
        for obj in tags.objects.values():
            kind = obj.type.lower()
            if kind == "image":
                files[f"sample-{i + 1}.png"] = ("image/png", _png(64, 48, i))
            elif kind in ("audio", "audioplus"):
                files[f"sample-{i + 1}.wav"] = ("audio/wav", _wav(440 + 110 * i))
            elif kind == "timeseries":
                files[f"{obj.name}-{i + 1}.csv"] = ("text/csv", _timeseries_csv(label_config, obj, i).encode())
            elif kind in ("text", "hypertext") and obj.attrs.get("valueType") == "url":
                body = SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]
                if kind == "hypertext":
                    body = f"<div><p>{body}</p></div>"
                files[f"sample-{i + 1}.{'html' if kind == 'hypertext' else 'txt'}"] = (
                    "text/html" if kind == "hypertext" else "text/plain", body.encode())
    return files


def sample_tasks(label_config: str, count: int = 2, files_url: Optional[str] = None) -> list:
    """`count` tasks whose data fits the label config's object tags, keyed by each object's value
    ($name). Files (images, audio, time series) link to `files_url` (a server that serves
    `sample_files`) or, without it, are inline data: URIs."""
    tags = parse_tags(label_config)
    files = sample_files(label_config, count)

    def link(name: str) -> str:
        if files_url:
            return f"{files_url.rstrip('/')}/{name}"
        ctype, body = files[name]
        return f"data:{ctype};base64,{base64.b64encode(body).decode()}"

    tasks = []
    for i in range(count):
        text = SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]
        data: dict = {}
        for obj in tags.objects.values():
            kind = obj.type.lower()
            if kind == "image":
                url = link(f"sample-{i + 1}.png")
                data[obj.value] = [url] if obj.attrs.get("valueList") else url
            elif kind in ("audio", "audioplus"):
                data[obj.value] = link(f"sample-{i + 1}.wav")
            elif kind == "video":
                data[obj.value] = f"{(files_url or 'http://127.0.0.1').rstrip('/')}/sample-{i + 1}.mp4"
            elif kind == "timeseries":
                if obj.attrs.get("valueType") == "json":
                    data[obj.value] = _timeseries_columns(label_config, obj, i)
                else:
                    data[obj.value] = link(f"{obj.name}-{i + 1}.csv")
            elif kind == "paragraphs":
                name_key, text_key = obj.attrs.get("nameKey", "author"), obj.attrs.get("textKey", "text")
                data[obj.value] = [{name_key: a, text_key: t} for a, t in SAMPLE_PARAGRAPHS]
            elif kind == "table":
                data[obj.value] = {"Name": "Alice", "City": "Paris", "Age": 31 + i}
            elif kind in ("text", "hypertext") and obj.attrs.get("valueType") == "url":
                data[obj.value] = link(f"sample-{i + 1}.{'html' if kind == 'hypertext' else 'txt'}")
            elif kind == "hypertext":
                data[obj.value] = f"<div><p>{text}</p></div>"
            else:
                data.setdefault(obj.value, text)
        for control in tags.controls.values():  # dynamic choices/labels read from task data
            dynamic = control.attrs.get("value", "")
            if dynamic.startswith("$") and dynamic[1:] not in data:
                data[dynamic[1:]] = [{"value": f"Option {c}"} for c in "ABC"]
        tasks.append({"id": i + 1, "data": data})
    return tasks


def _channels(label_config: str, obj: ObjectTag) -> list:
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError:
        return []
    for node in root.iter(obj.type):
        if node.attrib.get("name") == obj.name:
            return [c.attrib["column"] for c in node.iter("Channel") if c.attrib.get("column")]
    return []


def _timeseries_columns(label_config: str, obj: ObjectTag, seed: int) -> dict:
    time_column = obj.attrs.get("timeColumn") or "time"
    columns = _channels(label_config, obj) or ["value"]
    rows = 50
    data = {time_column: list(range(rows))}
    for c, column in enumerate(columns):
        data[column] = [round(math.sin((t + seed * 7) / (4.0 + c)) * 10, 3) for t in range(rows)]
    return data


def _timeseries_csv(label_config: str, obj: ObjectTag, seed: int) -> str:
    data = _timeseries_columns(label_config, obj, seed)
    sep = obj.attrs.get("sep", ",")
    names = list(data)
    lines = [sep.join(names)]
    for r in range(len(data[names[0]])):
        lines.append(sep.join(str(data[n][r]) for n in names))
    return "\n".join(lines) + "\n"


def _png(width: int, height: int, seed: int) -> bytes:
    rows = bytearray()
    for y in range(height):
        rows.append(0)  # filter: none
        for x in range(width):
            rows += bytes(((x * 4 + seed * 60) % 256, (y * 5) % 256, (128 + seed * 40) % 256))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(rows))) + chunk(b"IEND", b"")


def _wav(freq: float, seconds: float = 0.5, rate: int = 8000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * freq * t / rate)))
                               for t in range(int(rate * seconds))))
    return out.getvalue()
