"""`label-studio-ml port DIR`: turn a backend written for the reference SDK (`label_studio_ml`)
into an lsdeploy backend, in place.

What it changes, each only where needed (so porting a ported DIR changes nothing):
- Python imports of `label_studio_ml.model/.response/.api/.utils` (every form: `from x import`,
  `import x.y as z`, `from label_studio_ml import utils`, and the names they are used through);
- on each LabelStudioMLBase subclass without TRAIN_EVENTS, the reference's training events, so
  its `fit` never sees an event it was not written for (lsdeploy's default is every data event);
- requirements files: a line installing the reference SDK becomes lsdeploy, and `lsdeploy[sdk]`
  is added to requirements.txt when the code uses label-studio-sdk (imports it or uses
  `label_interface`);
- a Dockerfile that installs the reference SDK becomes the blueprint's (its `apt-get install`
  packages kept), with wheels/ (this lsdeploy) as `create` writes it, and .lsdeploy/rendered.json.

What it cannot port (other label_studio_ml modules, Redis caches, docker-compose services that
are not the backend, Dockerfile steps the new one lacks) is listed with file:line, never guessed.
"""
from __future__ import annotations

import codecs
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..blueprints import FILES, MANIFEST, Blueprint, file_digest, read_manifest, render_dockerfile, write_rendered
from ..errors import EXIT_USAGE, LsdeployError
from .names import REFERENCE, _REFERENCE_IN_TEXT, SDK_REQUIREMENT, _SKIP_DIRS, Unported
from .python import _port_python
from .files import _check_compose, _check_text, _dockerfile_installs_reference, _has_sdk_requirement, _installs_reference, _is_rendered, _port_dockerfile, _port_dockerignore, _port_requirements


@dataclass
class PortPlan:
    """The files `port` would write (relative path -> new bytes) and what it cannot port."""

    directory: Path
    changes: dict = field(default_factory=dict)
    unported: list = field(default_factory=list)
    uses_sdk: bool = False
    model_class: str | None = None
    was_ported: bool = False  # a port of this DIR is recorded in .lsdeploy/rendered.json
    uses_reference: bool = False  # any file of DIR refers to the reference SDK

    @property
    def written(self) -> list[str]:
        return sorted(self.changes)

    def diff(self) -> str:
        """A unified diff of what `apply` would write (binary files named only)."""
        out = []
        for name in self.written:
            if name == MANIFEST:
                continue
            path = self.directory / name
            old = path.read_bytes() if path.is_file() else None
            new = self.changes[name]
            try:
                old_text = None if old is None else old.decode("utf-8")
                new_text = new.decode("utf-8")
            except UnicodeDecodeError:
                out.append(f"Binary file {name} {'added' if old is None else 'changed'}\n")
                continue
            for line in difflib.unified_diff(
                    [] if old_text is None else old_text.splitlines(keepends=True), new_text.splitlines(keepends=True),
                    fromfile="/dev/null" if old_text is None else f"a/{name}", tofile=f"b/{name}"):
                out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
        return "".join(out)

    def apply(self) -> list[str]:
        for name, data in self.changes.items():
            write_rendered(self.directory, name, data)
        return self.written


# -- the plan -------------------------------------------------------------------------------


def _walk(directory: Path):
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            yield Path(root) / name


def _text(path: Path, rel: str) -> str:
    """A file's text: UTF-8 (a BOM allowed) or UTF-16 with its BOM (what PowerShell's `pip freeze >`
    writes; pip reads both). Anything else is one line saying what to do. Written back as UTF-8."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LsdeployError(f"{rel} is not UTF-8 text: save it as UTF-8 and run port again", EXIT_USAGE) from None


def plan(directory) -> PortPlan:
    """What porting `directory` would change; nothing is written."""
    directory = Path(directory)
    if not directory.exists():
        raise LsdeployError(f"{directory} does not exist; pass the directory of a backend written for label_studio_ml",
                            EXIT_USAGE)
    if not directory.is_dir():
        raise LsdeployError(f"{directory} is not a directory; pass the backend's directory (the one with model.py)",
                            EXIT_USAGE)
    result = PortPlan(directory)
    manifest = read_manifest(directory)
    result.was_ported = isinstance(manifest.get("port"), dict)
    python_files, texts = [], []
    for path in _walk(directory):
        rel = path.relative_to(directory).as_posix()
        if path.suffix == ".py":
            python_files.append((rel, path))
        elif path.suffix in (".yml", ".yaml", ".env", ".sh", ".txt", ".cfg", ".ini", ".toml", ".json") \
                or path.name.startswith("Dockerfile"):
            texts.append((rel, path))
    classes = []
    for rel, path in python_files:
        try:
            source = _text(path, rel)
        except LsdeployError as exc:  # listed, not guessed: it may import label_studio_ml
            result.unported.append(Unported(rel, 1, str(exc)))
            continue
        new, uses_sdk, found, imports_reference = _port_python(rel, source, result.unported)
        result.uses_sdk |= uses_sdk
        result.uses_reference |= imports_reference
        classes.extend((rel, name) for name in found)
        if new != source:
            result.changes[rel] = new.encode("utf-8")
    model_files = [c for c in classes if c[0] == "model.py"] or classes
    if model_files:
        result.model_class = model_files[0][1]

    # requirements files (top level)
    requirement_files = sorted(p.name for p in directory.glob("requirements*.txt") if p.is_file())
    for name in requirement_files:
        text = _text(directory / name, name)
        if any(_installs_reference(line) for line in text.splitlines()):
            result.uses_reference = True
        new = _port_requirements(text, result.uses_sdk)
        if new != text:
            result.changes[name] = new.encode("utf-8")
    if result.uses_sdk:
        current = result.changes.get("requirements.txt")
        text = current.decode("utf-8") if current is not None else \
            (_text(directory / "requirements.txt", "requirements.txt") if (directory / "requirements.txt").is_file() else "")
        if not _has_sdk_requirement(text):
            if text and not text.endswith("\n"):
                text += "\n"
            text += f"# label-studio-sdk, which this backend uses (label-studio-ml port)\n{SDK_REQUIREMENT}\n"
            result.changes["requirements.txt"] = text.encode("utf-8")

    # Dockerfiles, compose files, other text
    wants_wheel = False
    for rel, path in texts:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        _check_text(rel, text, result.unported)
        base = path.name
        if path.parent == directory and base == "Dockerfile":
            if _dockerfile_installs_reference(text, directory):
                result.uses_reference = True
                new = _port_dockerfile(text, render_dockerfile(directory), result.unported)
                result.changes["Dockerfile"] = new.encode("utf-8")
                wants_wheel = True
            elif _is_rendered(text):
                wants_wheel = True  # lsdeploy's Dockerfile: keep its wheels/ this lsdeploy
        elif base.startswith("Dockerfile") and _REFERENCE_IN_TEXT.search(text):
            result.unported.append(Unported(rel, 1, "this Dockerfile installs label_studio_ml: only DIR/Dockerfile is "
                                             "replaced; build from it, or port this one by hand"))
        elif base.startswith(("docker-compose", "compose")) and base.endswith((".yml", ".yaml")):
            _check_compose(rel, text, result.unported)
    wheel_name = None
    if wants_wheel:
        import tempfile

        from ..wheel import build_wheel

        with tempfile.TemporaryDirectory(prefix="lsdeploy-wheel-") as tmp:
            wheel = Path(build_wheel(tmp))
            target = wheel_name = f"wheels/{wheel.name}"
            data = wheel.read_bytes()
            current = directory / target
            if not current.is_file() or current.read_bytes() != data:
                result.changes[target] = data
        ignore = directory / ".dockerignore"
        if ignore.is_file():
            text = ignore.read_text(encoding="utf-8", errors="replace")
            new = _port_dockerignore(text, wheel_name)
            if new != text:
                result.changes[".dockerignore"] = new.encode("utf-8")
        else:  # the blueprint's: no state, secrets, virtualenvs or VCS data in the image

            blueprint = Blueprint.load("default")
            result.changes[".dockerignore"] = blueprint.render(FILES[".dockerignore"],
                                                               **blueprint.context(directory)).encode("utf-8")
    result.uses_reference |= bool(result.changes)
    result.unported.sort(key=lambda u: (u.path, u.line))
    if result.changes:
        result.changes[MANIFEST] = _manifest(directory, manifest, result, wheel_name).encode("utf-8")
    return result


def _manifest(directory: Path, manifest: dict, result: PortPlan, wheel: str | None) -> str:
    """rendered.json with the files port rendered (Dockerfile, wheels): `deploy --from` may
    then bring them up to date. A Dockerfile with the original's system packages is not
    listed: a later render would drop them, so it is kept as the user's own. The options stay
    what create recorded (none for a ported DIR, so `create` treats it as someone else's)."""
    files = dict(manifest.get("files") or {}) if isinstance(manifest.get("files"), dict) else {}
    if wheel is not None:
        for old in [f for f in files if f.startswith("wheels/")]:
            del files[old]
        data = result.changes.get(wheel)
        files[wheel] = file_digest(data if data is not None else (directory / wheel).read_bytes())
    ignore = result.changes.get(".dockerignore")
    if ignore is not None and not (directory / ".dockerignore").exists():
        files[".dockerignore"] = file_digest(ignore)  # the blueprint's, as create renders it
    dockerfile = result.changes.get("Dockerfile")
    if dockerfile is not None:
        if dockerfile.decode("utf-8") == render_dockerfile(directory):
            files["Dockerfile"] = file_digest(dockerfile)
        else:
            files.pop("Dockerfile", None)
    data = {"options": manifest.get("options"), "files": files,
            "port": {"from": REFERENCE, "model_class": result.model_class}}
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def port(directory, dry_run: bool = False) -> PortPlan:
    """Port `directory` in place (or only plan it with `dry_run`)."""
    result = plan(directory)
    if not dry_run and result.changes:
        result.apply()
    return result
