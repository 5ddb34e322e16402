"""Finding and importing a backend's model class from its directory.

`load_model_class(directory, spec=None)`: `spec` is "file.py:Class", "file.py" or "Class".
Without it, `model.py` is used when present, otherwise the one top-level .py file that
defines a LabelStudioMLBase subclass. Every failure is a ModelLoadError naming the file
and the fix.
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

from .errors import ModelLoadError
from .model import LabelStudioMLBase

_SKIP = {"_wsgi.py", "setup.py", "conftest.py"}


def _candidates(directory: Path) -> list[Path]:
    model_py = directory / "model.py"
    if model_py.is_file():
        return [model_py]
    found = []
    for path in sorted(directory.glob("*.py")):
        if path.name in _SKIP or path.name.startswith("test"):
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if "LabelStudioMLBase" in text:
            found.append(path)
    return found


def parse_spec(spec: str) -> tuple[str | None, str | None]:
    if ":" in spec:
        file, cls = spec.rsplit(":", 1)
        return file or None, cls or None
    if spec.endswith(".py"):
        return spec, None
    return None, spec


def import_file(path: Path):
    """Import a backend file as a top-level module, with its directory on sys.path."""
    directory = str(path.parent.resolve())
    if directory not in sys.path:
        sys.path.insert(0, directory)
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        raise ModelLoadError(f"{exc.filename or path}:{exc.lineno}: syntax error: {exc.msg}; fix the file and retry") from None
    except ModuleNotFoundError as exc:
        sys.modules.pop(name, None)
        if (exc.name or "").split(".")[0] == "label_studio_ml":
            raise ModelLoadError(
                f"{path} imports label_studio_ml: port the backend with `label-studio-ml port {path.parent}` "
                "(--dry-run shows the changes first), or change those imports to lsdeploy yourself "
                "(from lsdeploy.model import LabelStudioMLBase; from lsdeploy.response import ModelResponse)"
            ) from None
        hint = f"pip install -r {path.parent / 'requirements.txt'}" if (path.parent / "requirements.txt").exists() \
            else f"pip install {exc.name}"
        raise ModelLoadError(f"importing {path} failed: no module named {exc.name!r}; install the backend's requirements ({hint})") from None
    except Exception as exc:  # noqa: BLE001 - user code may raise anything at import
        sys.modules.pop(name, None)
        raise ModelLoadError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    return module


def model_classes(module) -> list[type]:
    return [
        obj for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, LabelStudioMLBase) and obj is not LabelStudioMLBase and obj.__module__ == module.__name__
    ]


def load_model_class(directory, spec: str | None = None) -> type:
    directory = Path(directory)
    if not directory.exists():
        raise ModelLoadError(f"backend directory {directory} does not exist; create one with: label-studio-ml create {directory}")
    if not directory.is_dir():
        raise ModelLoadError(f"{directory} is not a directory; pass the backend's directory")
    file_name, class_name = parse_spec(spec) if spec else (None, None)
    if file_name:
        path = directory / file_name
        if not path.is_file():
            raise ModelLoadError(f"{path} does not exist; check the --model value (FILE.py:CLASS)")
        files = [path]
    else:
        files = _candidates(directory)
        if not files:
            raise ModelLoadError(
                f"no model.py (or other .py file with a LabelStudioMLBase subclass) in {directory}; "
                f"create one with: label-studio-ml create {directory}"
            )
    found: list[tuple[Path, type]] = []
    for path in files:
        module = import_file(path)
        found.extend((path, cls) for cls in model_classes(module))
    if class_name:
        matches = [(p, c) for p, c in found if c.__name__ == class_name]
        if not matches:
            names = ", ".join(c.__name__ for _, c in found) or "none"
            raise ModelLoadError(f"no LabelStudioMLBase subclass named {class_name} in {', '.join(map(str, files))} (found: {names})")
        return matches[0][1]
    if not found:
        raise ModelLoadError(
            f"no LabelStudioMLBase subclass in {', '.join(map(str, files))}; define "
            "`class MyModel(LabelStudioMLBase)` (from lsdeploy.model import LabelStudioMLBase)"
        )
    if len(found) > 1:
        names = ", ".join(f"{p.name}:{c.__name__}" for p, c in found)
        raise ModelLoadError(f"{len(found)} candidate model classes ({names}); choose one with --model {found[0][0].name}:{found[0][1].__name__}")
    return found[0][1]
