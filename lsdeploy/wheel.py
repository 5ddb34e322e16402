"""lsdeploy's own wheel, built from the running installation.

A created or deployed backend installs exactly the lsdeploy that rendered it, even when that
version is on no package index the image build can reach. The wheel is assembled from the
installed package's files (source checkout or site-packages alike) with fixed timestamps and
sorted entries: the same installation gives the same bytes, so source bundles stay
content-addressed.
"""
from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from importlib import metadata
from pathlib import Path

import lsdeploy

_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_SKIP_DIRS = {"__pycache__"}


def _package_files() -> list[tuple[str, Path]]:
    """(archive name, path) for every file of the lsdeploy package, blueprints included."""
    root = Path(lsdeploy.__file__).resolve().parent
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not (_SKIP_DIRS & set(path.relative_to(root).parts)) and path.suffix != ".pyc":
            files.append(("lsdeploy/" + path.relative_to(root).as_posix(), path))
    if not (root / "blueprints").is_dir():  # source checkout: blueprints/ sits beside the package
        bp_root = root.parent / "blueprints"
        for path in sorted(bp_root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files.append(("lsdeploy/blueprints/" + path.relative_to(bp_root).as_posix(), path))
    return files


def _metadata_text() -> str:
    meta = metadata.metadata("lsdeploy")
    lines = [f"Metadata-Version: {meta.get('Metadata-Version', '2.1')}", "Name: lsdeploy", f"Version: {lsdeploy.__version__}"]
    for key in ("Summary", "Requires-Python"):
        if meta.get(key):
            lines.append(f"{key}: {meta[key]}")
    for key in ("Requires-Dist", "Provides-Extra"):
        for value in meta.get_all(key) or []:
            lines.append(f"{key}: {value}")
    return "\n".join(lines) + "\n"


def wheel_name() -> str:
    return f"lsdeploy-{lsdeploy.__version__}-py3-none-any.whl"


def build_wheel(dest_dir: str) -> str:
    """Write lsdeploy's wheel into `dest_dir` (replacing other lsdeploy wheels); its path."""
    os.makedirs(dest_dir, exist_ok=True)
    for old in Path(dest_dir).glob("lsdeploy-*.whl"):
        old.unlink()
    dist_info = f"lsdeploy-{lsdeploy.__version__}.dist-info"
    entries: list[tuple[str, bytes]] = [(name, path.read_bytes()) for name, path in _package_files()]
    entries.append((f"{dist_info}/METADATA", _metadata_text().encode()))
    entries.append((f"{dist_info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: lsdeploy\nRoot-Is-Purelib: true\nTag: py3-none-any\n"))
    entries.append((f"{dist_info}/entry_points.txt", b"[console_scripts]\nlabel-studio-ml = lsdeploy.cli:main\n"))
    record = []
    for name, data in entries:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    entries.append((f"{dist_info}/RECORD", ("\n".join(record) + "\n").encode()))
    target = os.path.join(dest_dir, wheel_name())
    tmp = target + ".part"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            info = zipfile.ZipInfo(name, _FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    os.replace(tmp, target)
    return target
