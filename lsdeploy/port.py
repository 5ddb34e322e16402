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

import ast
import difflib
import hashlib
import importlib
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EXIT_USAGE, LsdeployError

REFERENCE = "label_studio_ml"
# The reference modules lsdeploy provides under the same names.
PORTED_MODULES = ("model", "response", "api", "utils")
# The reference's own training events (label_studio_ml.model.LabelStudioMLBase.TRAIN_EVENTS).
REFERENCE_TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")
TRAIN_EVENTS_LINES = (
    "# The reference SDK's training events (set by label-studio-ml port): fit sees no other event.",
    "TRAIN_EVENTS = (" + ", ".join(f'"{e}"' for e in REFERENCE_TRAIN_EVENTS) + ")",
)
SDK_REQUIREMENT = "lsdeploy[sdk]"
MANIFEST = os.path.join(".lsdeploy", "rendered.json")
RENDERED_MARK = "# Rendered by lsdeploy"
_SKIP_DIRS = {".git", ".venv", "venv", "env", "__pycache__", ".lsdeploy", "wheels", "node_modules", "site-packages",
              ".pytest_cache", ".mypy_cache", "data"}
# A Dockerfile line that installs the reference SDK: its git URL, a `label-studio-ml @ URL`
# requirement or `pip install label-studio-ml` (not lsdeploy's `label-studio-ml start`).
_REFERENCE_IN_TEXT = re.compile(r"label-studio-ml-backend|\blabel[-_]studio[-_]ml\s*(@|[<>=~!]=)|"
                                r"pip3? install[^\n]*\slabel[-_]studio[-_]ml\b(?![-_])")
_MODULE_PATH = re.compile(r"^label_studio_ml(\.[A-Za-z_]\w*)*$")


@dataclass
class Unported:
    """Something `port` left as it is, with where it is and what to do about it."""

    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


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
            path = self.directory / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if name.startswith("wheels/"):
                for old in path.parent.glob("lsdeploy-*.whl"):  # another version's wheel
                    if old.name != path.name:
                        old.unlink()
            path.write_bytes(data)
        return self.written


# -- Python ---------------------------------------------------------------------------------


@dataclass
class _Edit:
    line: int  # 1-based
    start: int  # column offsets in the line's characters
    end: int
    text: str


def _apply_edits(source: str, edits: list[_Edit], inserts: list[tuple[int, str]]) -> str:
    """Replace spans (same-line edits) and insert text before given lines (1-based)."""
    lines = source.splitlines(keepends=True)
    by_line: dict[int, list[_Edit]] = {}
    for edit in edits:
        by_line.setdefault(edit.line, []).append(edit)
    for number, line_edits in by_line.items():
        line = lines[number - 1]
        for edit in sorted(line_edits, key=lambda e: e.start, reverse=True):
            line = line[:edit.start] + edit.text + line[edit.end:]
        lines[number - 1] = line
    for number, text in sorted(inserts, key=lambda item: item[0], reverse=True):
        lines.insert(number - 1, text)
    return "".join(lines)


def _lsdeploy_has(module: str, name: str) -> bool:
    try:
        return hasattr(importlib.import_module(f"lsdeploy.{module}"), name)
    except ImportError:
        return False


def _parents(tree: ast.AST) -> dict:
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    return parents


def _is_reference(module: str | None) -> bool:
    return module is not None and (module == REFERENCE or module.startswith(REFERENCE + "."))


def _port_python(rel: str, source: str, unported: list) -> tuple[str, bool, list[str], bool]:
    """(new source, uses label-studio-sdk, model classes found, imports the reference)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        if REFERENCE in source:
            unported.append(Unported(rel, exc.lineno or 1, f"not Python this interpreter parses ({exc.msg}); "
                                                           "change its label_studio_ml imports to lsdeploy by hand"))
        return source, False, [], False
    text_lines = source.splitlines(keepends=True)
    edits: list[_Edit] = []
    inserts: list[tuple[int, str]] = []
    uses_sdk = False
    imports_reference = False
    base_names = {"label_studio_ml.model.LabelStudioMLBase"}  # names bound to the reference's LabelStudioMLBase
    module_names = set()  # REFERENCE when `import label_studio_ml[.x]` binds the package's own name

    def replace_at(line: int, col: int, old: str, new: str, chars: bool = False) -> None:
        if not chars:  # ast's column offsets count UTF-8 bytes
            col = len(text_lines[line - 1].encode("utf-8")[:col].decode("utf-8", errors="replace"))
        edits.append(_Edit(line, col, col + len(old), new))

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level:
            if _is_reference(node.module):
                imports_reference = True
                parts = node.module.split(".")
                names = [alias.name for alias in node.names]
                if len(parts) == 1:
                    ok = all(n in PORTED_MODULES for n in names)
                    for alias in node.names:
                        if alias.name == "model":
                            base_names.add(f"{alias.asname or alias.name}.LabelStudioMLBase")
                    missing = [n for n in names if n not in PORTED_MODULES]
                    what = f"from label_studio_ml import {', '.join(missing)}"
                else:
                    ok = len(parts) == 2 and parts[1] in PORTED_MODULES
                    missing = [n for n in names if n != "*" and not _lsdeploy_has(parts[1], n)] if ok else []
                    what = f"{node.module} (lsdeploy has no such module)" if not ok else ""
                    if ok and parts[1] == "model":
                        base_names.update(a.asname or a.name for a in node.names if a.name == "LabelStudioMLBase")
                if not ok:
                    unported.append(Unported(rel, node.lineno, f"{what}: not ported; lsdeploy provides only "
                                                               f"label_studio_ml.{{{','.join(PORTED_MODULES)}}}"))
                    continue
                match = re.compile(r"\bfrom\s+(label_studio_ml)\b").search(text_lines[node.lineno - 1])
                if match:
                    replace_at(node.lineno, match.start(1), REFERENCE, "lsdeploy", chars=True)
                if missing:
                    unported.append(Unported(rel, node.lineno, f"lsdeploy.{parts[1]} has no {', '.join(missing)}: "
                                                               "replace it in your code"))
            elif node.module and (node.module == "label_studio_sdk" or node.module.startswith("label_studio_sdk.")):
                uses_sdk = True
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "label_studio_sdk":
                    uses_sdk = True
                if not _is_reference(alias.name):
                    continue
                imports_reference = True
                parts = alias.name.split(".")
                if len(parts) > 2 or (len(parts) == 2 and parts[1] not in PORTED_MODULES):
                    unported.append(Unported(rel, node.lineno, f"import {alias.name}: not ported; lsdeploy provides "
                                                               f"only label_studio_ml.{{{','.join(PORTED_MODULES)}}}"))
                    continue
                if alias.asname and alias.name == f"{REFERENCE}.model":
                    base_names.add(f"{alias.asname}.LabelStudioMLBase")
                if not alias.asname:
                    module_names.add(REFERENCE)
                replace_at(alias.lineno, alias.col_offset, REFERENCE, "lsdeploy")
        elif isinstance(node, ast.Attribute) and node.attr == "label_interface":
            uses_sdk = True
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_PATH.match(node.value) \
                and "." in node.value:
            unported.append(Unported(rel, node.lineno, f"the string {node.value!r} names a label_studio_ml module "
                                                       "(a dynamic import or a mock target): change it by hand"))

    # Names used through a reference module: label_studio_ml.model.X, lsm.utils.Y, ...
    parents = _parents(tree)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Name) and node.id == REFERENCE and REFERENCE in module_names):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute) and parent.attr in PORTED_MODULES:
            replace_at(node.lineno, node.col_offset, REFERENCE, "lsdeploy")
        else:
            unported.append(Unported(rel, node.lineno, "label_studio_ml used for something lsdeploy does not "
                                                       "provide: change it by hand"))

    # TRAIN_EVENTS on each reference LabelStudioMLBase subclass that has none.
    classes = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        bases = [_base_name(base) for base in node.bases]
        if not any(b == "LabelStudioMLBase" or b.endswith(".LabelStudioMLBase") or b in base_names for b in bases):
            continue
        classes.append(node.name)
        if not any(b in base_names or b == "LabelStudioMLBase" and imports_reference for b in bases):
            continue  # lsdeploy's own LabelStudioMLBase: its TRAIN_EVENTS are the author's choice
        if any(_assigns(stmt, "TRAIN_EVENTS") for stmt in node.body):
            continue
        first = node.body[0]
        if first.lineno == node.lineno:
            unported.append(Unported(rel, node.lineno, f"class {node.name} is on one line: add "
                                                       f"{TRAIN_EVENTS_LINES[1]} to it by hand"))
            continue
        docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
            and isinstance(first.value.value, str)
        indent = " " * first.col_offset
        block = "".join(f"{indent}{line}\n" for line in TRAIN_EVENTS_LINES)
        inserts.append((first.end_lineno + 1 if docstring else first.lineno, block))  # after a docstring
    if not edits and not inserts:
        return source, uses_sdk, classes, imports_reference
    return _apply_edits(source, edits, inserts), uses_sdk, classes, imports_reference


def _base_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _base_name(node.value)
        return f"{inner}.{node.attr}" if inner else node.attr
    return ""


def _assigns(stmt: ast.stmt, name: str) -> bool:
    if isinstance(stmt, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets)
    if isinstance(stmt, ast.AnnAssign):
        return isinstance(stmt.target, ast.Name) and stmt.target.id == name
    return False


# -- requirements ---------------------------------------------------------------------------


def _requirement_name(line: str) -> tuple[str, set]:
    """(canonical name, extras) of a requirements line; ('', set()) for comments, options, paths."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    stripped = re.sub(r"(^|\s)#.*", "", line).strip()
    if not stripped or stripped.startswith("-"):
        return "", set()
    try:
        req = Requirement(stripped)
    except InvalidRequirement:
        return "", set()
    return canonicalize_name(req.name), set(req.extras)


def _installs_reference(line: str) -> bool:
    name, _ = _requirement_name(line)
    if name == "label-studio-ml":
        return True
    stripped = line.strip()
    return not stripped.startswith("#") and "label-studio-ml-backend" in stripped and "git+" in stripped


def _port_requirements(text: str, uses_sdk: bool) -> str:
    lines = text.splitlines(keepends=True)
    replacement = SDK_REQUIREMENT if uses_sdk else "lsdeploy"
    out = []
    for line in lines:
        if _installs_reference(line):
            out.append(replacement + ("\n" if line.endswith("\n") else ""))
        else:
            out.append(line)
    return "".join(out)


def _has_sdk_requirement(text: str) -> bool:
    for line in text.splitlines():
        name, extras = _requirement_name(line)
        if name == "lsdeploy" and "sdk" in extras:
            return True
    return False


# -- Dockerfile -----------------------------------------------------------------------------

_KNOWN_ENV = {"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PORT", "PIP_CACHE_DIR", "PIP_NO_CACHE_DIR",
              "PIP_DISABLE_PIP_VERSION_CHECK", "WORKERS", "THREADS", "MODEL_DIR", "HOST", "LOG_LEVEL",
              "DEBIAN_FRONTEND", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"}
_SHELL_SPLIT = re.compile(r"&&|\|\||;|\|")


def _instructions(text: str) -> list[tuple[int, str, str]]:
    """(first line, INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    out, buffer, start = [], "", 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, args = buffer.partition(" ")
        out.append((start, keyword.upper(), args.strip()))
        buffer = ""
    if buffer:
        keyword, _, args = buffer.partition(" ")
        out.append((start, keyword.upper(), args.strip()))
    return out


def _apt_packages(command: str) -> list[str]:
    packages = []
    for part in _SHELL_SPLIT.split(command):
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        for i, word in enumerate(words):
            if word in ("apt-get", "apt") and "install" in words[i + 1:]:
                for arg in words[words.index("install", i) + 1:]:
                    if not arg.startswith("-") and "$" not in arg and arg not in packages:
                        packages.append(arg)
                break
    return packages


def _run_is_understood(command: str) -> bool:
    """A RUN the rendered Dockerfile does in its own way: apt, pip installs of requirements files."""
    command = re.sub(r"--mount=\S+", "", command)
    for part in _SHELL_SPLIT.split(command):
        part = part.strip()
        if not part or part.startswith(("set ", "apt-get ", "apt ", "rm -rf /var/lib/apt", "fi", "then", "else")):
            continue
        if re.match(r"^(if \[.*\]\s*)?(then\s+)?(python3? -m )?pip3? install( --\S+)* (-r \S+\s*)+$", part):
            continue
        if re.match(r"^if \[", part):
            continue
        return False
    return True


def _installed_requirement_files(instructions) -> list[str]:
    files = []
    for _, keyword, args in instructions:
        if keyword == "RUN":
            files.extend(re.findall(r"-r\s+(\S+)", args))
    return files


def _dockerfile_installs_reference(text: str, directory: Path) -> bool:
    if _is_rendered(text):
        return False
    if _REFERENCE_IN_TEXT.search(text):
        return True
    for name in _installed_requirement_files(_instructions(text)):
        path = directory / name.lstrip("./") if not os.path.isabs(name) else None
        if path is not None and path.is_file() and any(_installs_reference(l) for l in path.read_text().splitlines()):
            return True
    return False


def _is_rendered(text: str) -> bool:
    """A Dockerfile lsdeploy rendered (its mark in the first lines)."""
    return any(line.startswith(RENDERED_MARK) for line in text.splitlines()[:3])


def _port_dockerfile(text: str, rendered: str, unported: list) -> str:
    """The rendered Dockerfile with the original's system packages; what it drops is listed."""
    instructions = _instructions(text)
    packages = []
    for line, keyword, args in instructions:
        if keyword == "FROM" and not re.match(r"^(--\S+\s+)*python:", args):
            unported.append(Unported("Dockerfile", line, f"FROM {args}: the new Dockerfile starts from "
                                                         "python:X-slim; change its FROM if the backend needs that image"))
        elif keyword == "RUN":
            found = _apt_packages(args)
            packages.extend(p for p in found if p not in packages)
            if not _run_is_understood(args):
                unported.append(Unported("Dockerfile", line, f"RUN {_short(args)}: not in the new Dockerfile; "
                                                             "add it there if the image needs it"))
        elif keyword == "ENV":
            names = re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", args) or args.split()[:1]
            extra = [n for n in names if n not in _KNOWN_ENV]
            if extra:
                unported.append(Unported("Dockerfile", line, f"ENV {', '.join(extra)}: not in the new Dockerfile; "
                                                             "add it there or set it when deploying (--env)"))
        elif keyword in ("ADD",) or (keyword == "COPY" and "--from" in args):
            unported.append(Unported("Dockerfile", line, f"{keyword} {_short(args)}: not in the new Dockerfile; "
                                                         "add it there if the image needs it"))
    if not packages:
        return rendered
    anchor = "WORKDIR /app\n"
    if anchor not in rendered:
        raise LsdeployError("the blueprint's Dockerfile has no 'WORKDIR /app' line to add system packages after; "
                            "this lsdeploy's Dockerfile template is damaged: reinstall lsdeploy", EXIT_USAGE)
    block = ("# System packages the backend's original Dockerfile installed (kept by label-studio-ml port).\n"
             "RUN apt-get update \\\n"
             f"    && apt-get install -y --no-install-recommends {' '.join(packages)} \\\n"
             "    && rm -rf /var/lib/apt/lists/*\n")
    return rendered.replace(anchor, anchor + block, 1)


def _port_dockerignore(text: str, wheel: str) -> str:
    """A backend's .dockerignore that lets the new Dockerfile's inputs (wheels/, requirements.txt)
    into the build and keeps lsdeploy's local state (.lsdeploy) out. The reference examples'
    `**` followed by exceptions would leave wheels/ out, and the image build would fail."""
    from .bundle import IgnoreRules

    rules = IgnoreRules(text.splitlines(), ".dockerignore", dialect="docker")
    rules.fixed = []  # as Docker reads the file, without the source bundle's own exclusions
    add = [line for line, needed in (("!wheels", rules.excluded(wheel, False)),
                                     ("!requirements.txt", rules.excluded("requirements.txt", False)),
                                     (".lsdeploy", not rules.excluded(".lsdeploy/state.sqlite3", False))) if needed]
    if not add:
        return text
    if text and not text.endswith("\n"):
        text += "\n"
    return text + ("# The Dockerfile installs wheels/ and requirements.txt; .lsdeploy is local state "
                   "(label-studio-ml port)\n") + "\n".join(add) + "\n"


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -- docker-compose and other text ----------------------------------------------------------


def _compose_services(text: str) -> list[tuple[str, int, list[str]]]:
    """(service, line, its lines) of a docker-compose file, read without a YAML library."""
    services, current, in_services, indent = [], None, False, None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:
            in_services = line.startswith("services:")
            current = None
            continue
        if not in_services:
            continue
        if indent is None:
            indent = depth
        if depth == indent and line.strip().endswith(":"):
            current = (line.strip()[:-1], number, [])
            services.append(current)
        elif current is not None and depth > indent:
            current[2].append(line.strip())
    return services


def _check_compose(rel: str, text: str, unported: list) -> None:
    for name, line, body in _compose_services(text):
        build = next((b for b in body if b.startswith("build:")), None)
        value = build[len("build:"):].strip().strip("'\"") if build is not None else None
        if value == "":
            contexts = [b[len("context:"):].strip().strip("'\"") for b in body if b.startswith("context:")]
            value = contexts[0] if contexts else None
        if value in (".", "./"):
            continue
        unported.append(Unported(rel, line, f"service {name!r} is not this backend (it does not build this "
                                            "directory): lsdeploy does not run it; keep it in your compose file or "
                                            "replace what the backend uses it for"))


def _check_text(rel: str, text: str, unported: list) -> None:
    for number, line in enumerate(text.splitlines(), 1):
        if re.search(r"\bCACHE_TYPE\s*[=:]\s*['\"]?redis", line, re.IGNORECASE):
            unported.append(Unported(rel, number, "CACHE_TYPE=redis: lsdeploy keeps state in SQLite (MODEL_DIR) or "
                                                  "Cloud Storage (MODEL_STATE_URI=gs://...), not Redis; drop it"))


# -- the plan -------------------------------------------------------------------------------


def _walk(directory: Path):
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            yield Path(root) / name


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_manifest(directory: Path) -> dict:
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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
    manifest = _read_manifest(directory)
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
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
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
        text = (directory / name).read_text(encoding="utf-8")
        if any(_installs_reference(line) for line in text.splitlines()):
            result.uses_reference = True
        new = _port_requirements(text, result.uses_sdk)
        if new != text:
            result.changes[name] = new.encode("utf-8")
    if result.uses_sdk:
        current = result.changes.get("requirements.txt")
        text = current.decode("utf-8") if current is not None else \
            ((directory / "requirements.txt").read_text(encoding="utf-8") if (directory / "requirements.txt").is_file() else "")
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
                from .blueprints import render_dockerfile

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

        from .wheel import build_wheel

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
            from .blueprints import FILES, Blueprint

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
        files[wheel] = _sha256(data if data is not None else (directory / wheel).read_bytes())
    ignore = result.changes.get(".dockerignore")
    if ignore is not None and not (directory / ".dockerignore").exists():
        files[".dockerignore"] = _sha256(ignore)  # the blueprint's, as create renders it
    dockerfile = result.changes.get("Dockerfile")
    if dockerfile is not None:
        from .blueprints import render_dockerfile

        if dockerfile.decode("utf-8") == render_dockerfile(directory):
            files["Dockerfile"] = _sha256(dockerfile)
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
