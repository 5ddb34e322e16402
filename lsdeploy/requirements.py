"""Is a backend's requirements.txt satisfied by the Python that is about to serve it?

`start` checks before serving (a missing package otherwise shows up as a 500 on some later
request) and `create` prints the install line. Only what can be judged from installed
metadata is checked: versions, environment markers, one level of extras; URLs, paths and
pip options are left to pip.
"""
from __future__ import annotations

import re
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

from .errors import EXIT_USAGE, LsdeployError

# lsdeploy is what runs (and stands in for the reference SDK): a backend listing either needs nothing more.
_NOT_CHECKED = {"lsdeploy", "label-studio-ml"}
_ARCHIVES = (".whl", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")


_INCLUDE = re.compile(r"^(?:-r\s*|--requirement(?:\s*=\s*|\s+))(\S+)$")
MAX_INCLUDE_DEPTH = 5


def _logical_lines(text: str) -> list[str]:
    """Lines as pip reads them: a line ending in a backslash joined to the next, comments gone."""
    return [re.sub(r"(^|\s)#.*", "", line).strip() for line in text.replace("\\\n", "").splitlines()]


def requirement_lines(text: str) -> list[str]:
    """The requirement specifiers of a requirements file that name a package: without
    comments, options (-r, -e, --index-url, a line's own --hash), URLs and local paths."""
    lines = []
    for line in _logical_lines(text):
        line = re.split(r"\s+--?[A-Za-z]", line, maxsplit=1)[0]
        if (not line or line.startswith("-") or "://" in line or "/" in line or "\\" in line
                or line.lower().endswith(_ARCHIVES)):
            continue
        lines.append(line)
    return lines


def unmet_requirements(path) -> list[str]:
    """The requirements in `path` (a requirements.txt) that this Python does not satisfy, each
    with why: `scikit-learn>=1.3,<2 (not installed)`, `numpy>=2 (1.26.4 installed)`. Lines whose
    environment markers do not apply here are skipped, as are lsdeploy itself and whatever only
    pip can judge (URLs, paths, options)."""
    lines = _lines_with_includes(Path(path), 0, set())
    if not lines:
        return []
    # Imported here: about 30 ms, paid only by a backend that lists requirements.
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion

    def problem(req) -> Optional[str]:
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            return "not installed"
        try:
            if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
                return f"{dist.version} installed"
        except InvalidVersion:  # a legacy version string: pip installed it, pip may judge it
            return None
        for extra in sorted(req.extras):  # what the extra adds, one level deep
            for line in dist.requires or []:
                try:
                    dep = Requirement(line)
                except InvalidRequirement:
                    continue
                if dep.marker is None or not dep.marker.evaluate({"extra": extra}) or dep.marker.evaluate({"extra": ""}):
                    continue
                why = problem(Requirement(f"{dep.name}{dep.specifier}"))
                if why:
                    return f"its extra [{extra}] needs {dep.name}{dep.specifier}: {why}"
        return None

    unmet = []
    for line in lines:
        try:
            req = Requirement(line)
        except InvalidRequirement:  # something only pip understands
            continue
        if req.url or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        if canonicalize_name(req.name) in _NOT_CHECKED:
            # lsdeploy is what runs: its version is not in question, the extras it names are
            # (`lsdeploy[sdk]`, which port writes, needs label-studio-sdk installed).
            if not req.extras or canonicalize_name(req.name) != "lsdeploy":
                continue
            try:
                metadata.distribution("lsdeploy")
            except metadata.PackageNotFoundError:  # run from a source tree
                continue
            req = Requirement(f"lsdeploy[{','.join(sorted(req.extras))}]")
        why = problem(req)
        if why:
            unmet.append(f"{line} ({why})")
    return unmet


def _lines_with_includes(path: Path, depth: int, seen: set) -> list[str]:
    """requirement_lines of `path` and of the files it includes with -r (relative to it), as
    pip follows them, at most MAX_INCLUDE_DEPTH deep; a file missing here is pip's to report."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise LsdeployError(f"cannot read {path}: {exc.strerror}", EXIT_USAGE) from None
    seen.add(path.resolve())
    lines = requirement_lines(text)
    if depth < MAX_INCLUDE_DEPTH:
        for line in _logical_lines(text):
            match = _INCLUDE.match(line)
            if match and "://" not in match.group(1):
                included = path.parent / match.group(1)
                if included.resolve() not in seen:
                    lines += _lines_with_includes(included, depth + 1, seen)
    return lines


def install_command(requirements) -> str:
    """The command that installs `requirements` into the Python running this code."""
    return f"{shlex.quote(sys.executable or 'python3')} -m pip install -r {shlex.quote(str(requirements))}"
