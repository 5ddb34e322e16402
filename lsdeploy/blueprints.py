"""Rendering a backend directory from a blueprint (Jinja templates in blueprints/).

A blueprint is a folder with `blueprint.json` (description, model class, requirements),
`model.py.j2`, `label_config.xml`, and optional overrides of the shared templates in
`_common/` (Dockerfile, docker-compose.yml, _wsgi.py, README.md, requirements.txt,
.dockerignore).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import EXIT_USAGE, LsdeployError

# Rendered file -> template name (looked up in the blueprint first, then in _common).
FILES = {
    "Dockerfile": "Dockerfile.j2",
    "docker-compose.yml": "docker-compose.yml.j2",
    "_wsgi.py": "_wsgi.py.j2",
    "README.md": "README.md.j2",
    "requirements.txt": "requirements.txt.j2",
    ".dockerignore": "dockerignore.j2",
}


def blueprints_dir() -> Path:
    here = Path(__file__).resolve().parent
    installed = here / "blueprints"  # inside the wheel
    return installed if installed.is_dir() else here.parent / "blueprints"  # source checkout


def available() -> list[str]:
    return sorted(p.name for p in blueprints_dir().iterdir() if (p / "blueprint.json").is_file())


@dataclass
class Blueprint:
    name: str
    path: Path
    description: str
    model_class: str
    requirements: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, name: str) -> "Blueprint":
        path = blueprints_dir() / name
        if not (path / "blueprint.json").is_file():
            raise LsdeployError(f"no blueprint named {name!r}; choose one of: {', '.join(available())}", EXIT_USAGE)
        meta = json.loads((path / "blueprint.json").read_text())
        return cls(name, path, meta["description"], meta["model_class"], list(meta.get("requirements", [])))

    def environment(self):
        import jinja2

        return jinja2.Environment(
            loader=jinja2.FileSystemLoader([str(self.path), str(self.path.parent / "_common")]),
            keep_trailing_newline=True,
            undefined=jinja2.StrictUndefined,
            autoescape=False,
        )

    def render(self, template: str, **context) -> str:
        return self.environment().get_template(template).render(**context)

    def context(self, directory: Path, model_module: str = "model", model_class: str | None = None,
                requirements: list[str] | None = None) -> dict:
        return {
            "name": directory.name,
            "blueprint": self.name,
            "description": self.description,
            "model_module": model_module,
            "model_class": model_class or self.model_class,
            "requirements": self.requirements if requirements is None else requirements,
            "lsdeploy_version": __version__,
            "python_version": f"{sys.version_info.major}.{sys.version_info.minor}",
        }


def render_dockerfile(directory: Path, blueprint: str = "default") -> str:
    """The Dockerfile a backend directory without its own would get."""
    bp = Blueprint.load(blueprint)
    return bp.render(FILES["Dockerfile"], **bp.context(Path(directory)))


MANIFEST = os.path.join(".lsdeploy", "rendered.json")  # rendered file -> sha256 of what was written


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def create(directory, blueprint: str = "default", script: str | None = None, force: bool = False,
           keep_edited: bool = False, kept: list | None = None) -> list[str]:
    """Render `blueprint` into `directory` (from a model script with `script`); the files written.

    With `keep_edited` (re-rendering an existing backend, as `deploy --from` does), a rendered
    file (Dockerfile, requirements.txt, ...) that DIR already has is replaced only when it is
    still what lsdeploy last wrote there (DIR/.lsdeploy/rendered.json); a file the user wrote or
    edited is kept, and its name added to `kept`."""
    from .loader import import_file, model_classes, parse_spec
    from .wheel import build_wheel

    directory = Path(directory)
    bp = Blueprint.load(blueprint)
    if directory.exists() and any(directory.iterdir()) and not force:
        raise LsdeployError(f"{directory} exists and is not empty; choose another directory or pass --force to overwrite", EXIT_USAGE)
    model_module, model_class, source, extra_reqs = "model", None, None, None
    if script:
        file_name, model_class = parse_spec(script)
        source = Path(file_name or "")
        if not source.is_file():
            raise LsdeployError(f"model script {source} does not exist; pass --from path/to/script.py[:Class]", EXIT_USAGE)
        classes = [c.__name__ for c in model_classes(import_file(source))]
        if model_class is None:
            if not classes:
                raise LsdeployError(f"no LabelStudioMLBase subclass in {source}; define one or pass --from {source}:Class", EXIT_USAGE)
            if len(classes) > 1:
                raise LsdeployError(f"{len(classes)} candidate classes in {source} ({', '.join(classes)}); "
                                    f"choose one with --from {source}:{classes[0]}", EXIT_USAGE)
            model_class = classes[0]
        elif model_class not in classes:
            raise LsdeployError(f"{source} has no LabelStudioMLBase subclass named {model_class} (found: {', '.join(classes) or 'none'})", EXIT_USAGE)
        model_module = source.stem
        reqs = source.parent / "requirements.txt"
        extra_reqs = [line.strip() for line in reqs.read_text().splitlines()
                      if line.strip() and not line.startswith("#") and not line.strip().lower().startswith(("lsdeploy", "label-studio-ml"))] \
            if reqs.is_file() else []
    directory.mkdir(parents=True, exist_ok=True)
    context = bp.context(directory, model_module, model_class, extra_reqs)
    written = []
    manifest_path = directory / MANIFEST
    try:
        previous = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        previous = {}
    rendered = dict(previous) if isinstance(previous, dict) else {}
    for target, template in FILES.items():
        data = bp.render(template, **context).encode("utf-8")
        path = directory / target
        if keep_edited and path.is_file():
            current = path.read_bytes()
            if current != data and rendered.get(target) != _sha256(current):
                if kept is not None:
                    kept.append(target)  # the user's own or edited file
                continue
        path.write_bytes(data)
        rendered[target] = _sha256(data)
        written.append(target)
    try:
        manifest_path.parent.mkdir(exist_ok=True)
        manifest_path.write_text(json.dumps(rendered, indent=1, sort_keys=True) + "\n")
    except OSError:  # a read-only state directory: edits of rendered files are then kept next time
        pass
    if source is not None:
        if source.resolve() != (directory / source.name).resolve():
            shutil.copy2(source, directory / source.name)
        written.append(source.name)
    else:
        (directory / "model.py").write_text(bp.render("model.py.j2", **context))
        written.append("model.py")
    if not (directory / "label_config.xml").exists() or source is None:
        shutil.copy2(bp.path / "label_config.xml", directory / "label_config.xml")
        written.append("label_config.xml")
    wheel = build_wheel(str(directory / "wheels"))
    written.append(os.path.relpath(wheel, directory))
    return written
