"""What the Cloud Build fake's Docker does with a build context: the builder images it recognises,
`.dockerignore` with Docker's rules (patterns anchored at the context, matched part by part like
Go's filepath.Match, `**` for any depth, the last matching line wins) and the check that every
COPY/ADD source is in the context."""
from __future__ import annotations

import fnmatch
import json
import posixpath
import re
import shlex

DOCKER_BUILDERS = ("gcr.io/cloud-builders/docker", "docker", "gcr.io/cloud-builders/docker:latest")


def dockerignore_patterns(text: str) -> list[tuple[bool, list[str]]]:
    """(exception, pattern split in path parts) per line of a .dockerignore, as Docker reads it."""
    patterns = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        line = line.strip()
        exception = line.startswith("!")
        line = line[1:].strip() if exception else line
        parts = [p for p in posixpath.normpath(line).split("/") if p and p != "."] if line else []
        if parts:
            patterns.append((exception, parts))
    return patterns


def _parts_match(pattern: list[str], path: list[str]) -> bool:
    """Go's filepath.Match part by part, plus `**` for any number of parts."""
    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(_parts_match(pattern[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], pattern[0]) and _parts_match(pattern[1:], path[1:])


def dockerignored(name: str, patterns) -> bool:
    """Whether Docker leaves `name` out of the build context: the last pattern matching it or a
    parent directory decides; the Dockerfile and .dockerignore are always sent."""
    if name in ("Dockerfile", ".dockerignore"):
        return False
    parts = name.split("/")
    excluded = False
    for exception, pattern in patterns:
        if any(_parts_match(pattern, parts[:i]) for i in range(1, len(parts) + 1)):
            excluded = not exception
    return excluded


def copy_source_missing(keyword: str, arguments: str, context: dict) -> str | None:
    """The first source of a COPY/ADD that the build context lacks (None when all are there), as
    Docker checks them: `.` is the whole context, a glob must match something, a directory is
    there when a file is under it. Copies --from another stage or image and ADD URLs are not checked."""
    if keyword not in ("COPY", "ADD"):
        return None
    words = []
    if arguments.startswith("["):
        try:
            words = json.loads(arguments)
        except ValueError:
            words = []
    if not words:
        words = shlex.split(arguments)
    flags = [w for w in words if w.startswith("--")]
    if any(f.startswith("--from") for f in flags):
        return None
    sources = [w for w in words if not w.startswith("--")][:-1]
    directories = {"/".join(path.split("/")[:i]) for path in context for i in range(1, path.count("/") + 1)}
    for source in sources:
        if keyword == "ADD" and re.match(r"^(https?://|git@)", source):
            continue
        name = posixpath.normpath(source).lstrip("/")
        if name in (".", ""):
            continue
        if any(c in name for c in "*?["):
            if not any(fnmatch.fnmatchcase(path, name) for path in list(context) + sorted(directories)):
                return source
        elif name not in context and name not in directories:
            return source
    return None
