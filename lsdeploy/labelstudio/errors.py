"""What goes wrong talking to Label Studio, in words a user can act on: the error type, Label
Studio's own words from an error answer, addresses without user info, project ids as users give
them."""
from __future__ import annotations

import re
from typing import Optional

from ..errors import EXIT_ERROR, EXIT_USAGE, LsdeployError


class LabelStudioError(LsdeployError):
    """Label Studio refused or failed a request; the message names the cause and the fix."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR, status: Optional[int] = None):
        super().__init__(message, exit_code)
        self.status = status



def _project_id(project) -> int:
    """A project id from 5, "5", or the "5.1700000000" form Label Studio sends to backends."""
    try:
        return int(str(project).split(".")[0])
    except ValueError:
        raise LabelStudioError(f"{project!r} is not a Label Studio project id (a number)", EXIT_USAGE) from None



def _reason(resp) -> str:
    """Label Studio's own words for an error answer, flattened to one line."""
    try:
        body = resp.json()
    except ValueError:
        text = (resp.text or "").strip()
        if re.match(r"<(!doctype|html)", text, re.I):  # a web page: its title says most
            title = re.search(r"<title[^>]*>([^<]*)</title>", text, re.I)
            return " ".join(title.group(1).split())[:300] if title else f"HTTP {resp.status_code} (a web page)"
        return text.splitlines()[0][:300] if text else f"HTTP {resp.status_code}"
    parts = []
    if isinstance(body, dict):
        errors = body.get("validation_errors") or {}
        for source in (errors, body):
            if not isinstance(source, dict):
                continue
            for key, value in source.items():
                if key in ("id", "status_code", "version", "exc_info", "validation_errors"):
                    continue
                if key == "detail" and errors:
                    continue  # "Validation error": the details say more
                values = value if isinstance(value, list) else [value]
                text = "; ".join(str(v) for v in values)
                parts.append(text if key in ("detail", "non_field_errors", "error", "errors") else f"{key}: {text}")
    elif isinstance(body, list):
        parts = [str(v) for v in body]
    else:
        parts = [str(body)]
    line = " ".join(" ".join(parts).split())
    # Label Studio's messages carry an HTML link; keep the words.
    line = re.sub(r"<a [^>]*>([^<]*)</a>", r"\1", line)
    return line[:600] or f"HTTP {resp.status_code}"


def without_userinfo(url: str) -> str:
    """`url` with any user:password@ part removed, for messages."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    return f"{scheme}{sep}{netloc.rpartition('@')[2]}{slash}{path}"
