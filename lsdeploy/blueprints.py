"""Rendering a backend directory from a blueprint (Jinja templates in blueprints/).

A blueprint is a folder with `blueprint.json` (description, model class, requirements),
`model.py.j2`, `label_config.xml`, and optional overrides of the shared templates in
`_common/` (Dockerfile, docker-compose.yml, _wsgi.py, README.md, requirements.txt,
.dockerignore).
"""
from __future__ import annotations

import json
import os
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


# What create wrote into DIR: {"options": {blueprint, from, model_class}, "files": {path: sha256}}.
# It tells a directory create rendered and nobody changed since (running create again is then
# safe) from one with the user's work in it, and `deploy --from` keeps what the user edited.
MANIFEST = os.path.join(".lsdeploy", "rendered.json")


def file_digest(data: bytes) -> str:
    """How rendered.json records a file's content (create, `deploy --from`, port)."""
    import hashlib

    return hashlib.sha256(data).hexdigest()


def read_manifest(directory) -> dict:
    """DIR's rendered.json as written (create's options and files; port adds its own entry);
    {} when there is none or it is not a JSON object."""
    try:
        data = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_rendered(directory, target: str, data: bytes) -> None:
    """Write a rendered file into DIR; a new wheel replaces the other lsdeploy wheels in wheels/."""
    path = Path(directory) / target
    path.parent.mkdir(parents=True, exist_ok=True)
    if target.startswith("wheels/"):
        for old in path.parent.glob("lsdeploy-*.whl"):  # another version's wheel
            if old.name != path.name:
                old.unlink()
    path.write_bytes(data)


@dataclass
class Rendered:
    """What `render` did to a backend directory."""

    directory: Path
    status: str  # "created"; "updated": DIR was as rendered and the render changed; "unchanged"
    written: list[str]
    kept: list[str]  # rendered files the user edited, left as they are (keep_edited)
    requirements: list[str]  # the backend's own requirements (requirements.txt); lsdeploy comes from wheels/


def _read_manifest(directory: Path) -> tuple[dict, dict | None]:
    """(rendered file -> sha256, the options create was given: None when unknown)."""
    data = read_manifest(directory)
    if isinstance(data.get("files"), dict):
        options = data.get("options")
        return dict(data["files"]), options if isinstance(options, dict) else None
    return data, None  # an older lsdeploy's manifest: the files only


def _describe(options: dict) -> str:
    text = f"the {options.get('blueprint')} blueprint"
    if options.get("from"):
        text += f" with --from {Path(options['from']).name}:{options.get('model_class')}"
    return text


def _from_script(script: str) -> tuple[str, str, Path, list[str]]:
    """(model module, model class, script path, its requirements) for `create --from`."""
    from .loader import import_file, model_classes, parse_spec

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
    reqs = source.parent / "requirements.txt"
    extra_reqs = [line.strip() for line in reqs.read_text().splitlines()
                  if line.strip() and not line.startswith("#") and not line.strip().lower().startswith(("lsdeploy", "label-studio-ml"))] \
        if reqs.is_file() else []
    return source.stem, model_class, source, extra_reqs


def _refuse_changed(directory: Path, files: dict, recorded: dict | None, options: dict) -> None:
    """Raise unless DIR is what create rendered with these options and nobody changed since."""
    if recorded is None:
        raise LsdeployError(f"{directory} exists and is not empty; choose another directory or pass --force to overwrite", EXIT_USAGE)
    if recorded != options:
        raise LsdeployError(f"{directory} was created from {_describe(recorded)}, not {_describe(options)}; choose "
                            "another directory, or pass --force to render over it", EXIT_USAGE)
    changed = []
    for name, digest in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            changed.append(f"{name} (deleted)")
        elif file_digest(path.read_bytes()) != digest:
            changed.append(f"{name} (edited)")
    if changed:
        raise LsdeployError(f"{directory} has changes since lsdeploy created it: {', '.join(changed)}; pass --force to "
                            "render over them (they are lost), or choose another directory", EXIT_USAGE)


def render(directory, blueprint: str = "default", script: str | None = None, force: bool = False,
           keep_edited: bool = False) -> Rendered:
    """Render `blueprint` into `directory` (around a model script with `script`).

    A directory that is not empty is rendered into only with `force`, or when create rendered
    it with the same options and none of those files changed since: then only files whose
    render differs (a newer lsdeploy) are written, and nothing at all when none does.

    With `keep_edited` (re-rendering an existing backend, as `deploy --from` does), a rendered
    file (Dockerfile, requirements.txt, ...) that DIR already has is replaced only when it is
    still what lsdeploy last wrote there; a file the user wrote or edited is kept, and named in
    `Rendered.kept`."""
    import tempfile

    from .wheel import build_wheel

    directory = Path(directory)
    bp = Blueprint.load(blueprint)
    model_module, model_class, source, extra_reqs = _from_script(script) if script else ("model", None, None, None)
    options = {"blueprint": bp.name, "from": str(source.resolve()) if source else None,
               "model_class": model_class or bp.model_class}
    files, recorded = _read_manifest(directory)
    fresh = not (directory.exists() and any(directory.iterdir()))
    if not fresh and not force:
        _refuse_changed(directory, files, recorded, options)
    context = bp.context(directory, model_module, model_class, extra_reqs)

    planned = {target: bp.render(template, **context).encode("utf-8") for target, template in FILES.items()}
    if source is not None:
        if source.resolve() != (directory / source.name).resolve():
            planned[source.name] = source.read_bytes()
    else:
        planned["model.py"] = bp.render("model.py.j2", **context).encode("utf-8")
    if not (directory / "label_config.xml").exists() or source is None:
        planned["label_config.xml"] = (bp.path / "label_config.xml").read_bytes()
    with tempfile.TemporaryDirectory(prefix="lsdeploy-wheel-") as tmp:
        wheel = Path(build_wheel(tmp))
        planned[f"wheels/{wheel.name}"] = wheel.read_bytes()

    written, kept, record = [], [], {}  # record: the manifest's files after this render
    for target, data in planned.items():
        path = directory / target
        current = path.read_bytes() if path.is_file() else None
        if keep_edited and target in FILES and current is not None and current != data \
                and files.get(target) != file_digest(current):
            kept.append(target)  # the user's own or edited file
            if target in files:
                record[target] = files[target]
            continue
        record[target] = file_digest(data)
        if current == data and not force:
            continue
        write_rendered(directory, target, data)
        written.append(target)
    if source is not None and source.name not in planned and (fresh or force):
        written.append(source.name)  # the script is in DIR already
    if written or recorded != options or record != files:
        manifest = directory / MANIFEST
        try:
            manifest.parent.mkdir(exist_ok=True)
            manifest.write_text(json.dumps({"options": options, "files": record}, indent=1, sort_keys=True) + "\n")
        except OSError:  # a read-only state directory: edits of rendered files are then kept next time
            pass
    status = "created" if fresh or force else ("updated" if written else "unchanged")
    return Rendered(directory, status, written, kept, list(context["requirements"]))


def create(directory, blueprint: str = "default", script: str | None = None, force: bool = False,
           keep_edited: bool = False, kept: list | None = None) -> list[str]:
    """`render`, answering the files written (and adding the kept ones to `kept`)."""
    result = render(directory, blueprint=blueprint, script=script, force=force, keep_edited=keep_edited)
    if kept is not None:
        kept.extend(result.kept)
    return result.written
