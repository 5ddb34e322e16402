"""Porting the files around the code: requirements, Dockerfile, .dockerignore, docker-compose."""
from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from ..errors import EXIT_USAGE, LsdeployError
from .names import _REFERENCE_IN_TEXT, RENDERED_MARK, SDK_REQUIREMENT, Unported


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
    from ..bundle import IgnoreRules

    rules = IgnoreRules(text.splitlines(), ".dockerignore", dialect="docker")
    rules.fixed = []  # as Docker reads the file, without the source bundle's own exclusions
    add = [line for line, needed in (("!wheels", rules.excluded(wheel, False)),
                                     ("!requirements.txt", rules.excluded("requirements.txt", False)),
                                     (".lsdeploy", not rules.excluded(".lsdeploy/state.sqlite3", False))) if needed]
    # Never in an image, whatever exceptions the original makes (the reference examples let
    # docker-compose.yml in): the secrets of a local run, the repository, compose files.
    local = [pattern for pattern, sample in (("**/.env", ".env"), ("**/.env.*", ".env.local"), (".git", ".git/config"),
                                             ("docker-compose*.yml", "docker-compose.yml"),
                                             ("docker-compose*.yaml", "docker-compose.yaml"))
             if not rules.excluded(sample, False)]
    if not add and not local:
        return text
    if text and not text.endswith("\n"):
        text += "\n"
    if add:
        text += ("# The Dockerfile installs wheels/ and requirements.txt; .lsdeploy is local state "
                 "(label-studio-ml port)\n") + "\n".join(add) + "\n"
    if local:
        text += "# Secrets of a local run, the repository and compose files never go into the image\n" + \
                "\n".join(local) + "\n"
    return text


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
