"""The source bundle a deploy builds from: the backend's files, packed deterministically.

`SourceBundle.from_directory(directory)` collects what the image build needs:

- every file of DIR except what `.gcloudignore` (or, without one, `.dockerignore`) excludes, and
  never VCS data, virtual environments, caches or lsdeploy's local state (ALWAYS_EXCLUDED);
- `wheels/lsdeploy-<version>-py3-none-any.whl`: the wheel of the lsdeploy running this code
  (`lsdeploy.wheel.build_wheel`), replacing any lsdeploy wheel DIR already has, so the image runs
  the same lsdeploy as the CLI that deployed it even when that version is on no package index;
- `Dockerfile`: DIR's own when it has one (a backend written for the reference SDK deploys
  unchanged), otherwise the blueprint's (`lsdeploy.blueprints.render_dockerfile`).

It is packed as a tar.gz with sorted entries, fixed times, owners and modes and no gzip name or
time: the same files give the same bytes, so the sha256 `digest` names the content. A deploy
uses it to skip upload and build when an image for that digest already exists.

Ignore files use gitignore syntax (what gcloud documents for .gcloudignore): `#` comments,
`!` negation, a leading `/` anchors to DIR, a trailing `/` matches directories only, `*`, `?`,
`[...]` within one path part and `**` across parts; a pattern without `/` matches at any depth.
`.gcloudignore`'s `#!include:FILE` includes another ignore file. The ignore files themselves are
bundled (Docker reads .dockerignore in the build).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EXIT_USAGE, LsdeployError

# Never in a bundle, whatever the ignore files say.
ALWAYS_EXCLUDED = (".git/", ".hg/", ".svn/", "__pycache__/", "*.pyc", "*.pyo", ".pytest_cache/", ".mypy_cache/",
                   ".ruff_cache/", ".tox/", ".nox/", ".venv/", "venv/", ".lsdeploy/", ".DS_Store", ".ipynb_checkpoints/")
MAX_BUNDLE_BYTES = 512 * 1024 * 1024
_FIXED_MTIME = 315532800  # 1980-01-01, like the wheel


@dataclass(frozen=True)
class BundleFile:
    path: str          # archive path, posix, relative
    size: int
    mode: int          # 0o644 or 0o755
    source: str        # where it came from: "directory", "wheel", "blueprint"


@dataclass
class SourceBundle:
    directory: str
    files: list = field(default_factory=list)          # BundleFile, sorted by path
    data: bytes = field(default=b"", repr=False)        # the tar.gz
    digest: str = ""                                     # sha256 hex of `data`
    dockerfile: str = "own"                              # "own" or "blueprint:<name>"
    dockerfile_text: str = field(default="", repr=False)
    ignore_file: str = ""                                # ".gcloudignore", ".dockerignore" or ""

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def short_digest(self) -> str:
        return self.digest[:12]

    def write(self, path) -> str:
        Path(path).write_bytes(self.data)
        return str(path)

    def to_dict(self) -> dict:
        return {"directory": self.directory, "digest": self.digest, "size": self.size, "dockerfile": self.dockerfile,
                "ignore_file": self.ignore_file or None, "files": [f.path for f in self.files]}

    @classmethod
    def from_directory(cls, directory, blueprint: str = "default") -> "SourceBundle":
        from .blueprints import render_dockerfile
        from .wheel import build_wheel

        root = Path(directory)
        if not root.is_dir():
            raise LsdeployError(f"backend directory {root} does not exist; create one with: label-studio-ml create {root}",
                                EXIT_USAGE)
        ignore = IgnoreRules.for_directory(root)
        entries: dict[str, tuple[bytes, int, str]] = {}
        for rel in walk(root, ignore):
            path = root / rel
            if rel.startswith("wheels/") and Path(rel).name.startswith("lsdeploy-") and rel.endswith(".whl"):
                continue  # replaced by this lsdeploy's wheel below
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise LsdeployError(f"cannot read {path}: {exc.strerror}; fix its permissions or exclude it in "
                                    ".gcloudignore", EXIT_USAGE) from None
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            entries[rel] = (data, mode, "directory")
        with tempfile.TemporaryDirectory(prefix="lsdeploy-wheel-") as tmp:
            wheel = Path(build_wheel(tmp))
            entries[f"wheels/{wheel.name}"] = (wheel.read_bytes(), 0o644, "wheel")
        dockerfile = "own"
        if "Dockerfile" not in entries:
            if (root / "Dockerfile").is_file():
                raise LsdeployError(f"{root / 'Dockerfile'} is excluded by {ignore.source}; the build needs it: "
                                    "remove it from the ignore file", EXIT_USAGE)
            text = render_dockerfile(root, blueprint)
            entries["Dockerfile"] = (text.encode(), 0o644, "blueprint")
            dockerfile = f"blueprint:{blueprint}"
        data = pack({name: (content, mode) for name, (content, mode, _) in entries.items()})
        if len(data) > MAX_BUNDLE_BYTES:
            raise LsdeployError(f"the source bundle of {root} is {len(data) // (1024 * 1024)} MiB: exclude data, models "
                                "and caches in .gcloudignore (load large files from Cloud Storage at start-up)", EXIT_USAGE)
        files = [BundleFile(name, len(content), mode, source) for name, (content, mode, source) in sorted(entries.items())]
        return cls(directory=str(root), files=files, data=data, digest=hashlib.sha256(data).hexdigest(),
                   dockerfile=dockerfile, dockerfile_text=entries["Dockerfile"][0].decode("utf-8", "replace"),
                   ignore_file=ignore.source)


def pack(entries: dict) -> bytes:
    """tar.gz of {archive path: (bytes, mode)}: sorted, fixed metadata, no gzip name or time."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directories = set()
        for name in sorted(entries):
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                directories.add("/".join(parts[:i]))
        for name in sorted(set(entries) | directories):
            info = tarfile.TarInfo(name)
            info.mtime = _FIXED_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if name in directories and name not in entries:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
                continue
            content, mode = entries[name]
            info.size = len(content)
            info.mode = mode
            tar.addfile(info, io.BytesIO(content))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def walk(root: Path, ignore: "IgnoreRules") -> list:
    """Relative posix paths of the files under root that the rules keep (sorted)."""
    kept = []
    for current, dirs, files in os.walk(root, followlinks=False):
        rel_dir = Path(current).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        keep_dirs = []
        for name in sorted(dirs):
            rel = rel_dir + name
            full = Path(current) / name
            if full.is_symlink() or _is_virtualenv(full) or ignore.excluded(rel, is_dir=True):
                continue
            keep_dirs.append(name)
        dirs[:] = keep_dirs
        for name in sorted(files):
            rel = rel_dir + name
            full = Path(current) / name
            if not full.is_file() or ignore.excluded(rel, is_dir=False):
                continue  # broken links, sockets, fifos
            kept.append(rel)
    return sorted(kept)


def _is_virtualenv(path: Path) -> bool:
    return (path / "pyvenv.cfg").is_file() or (path / "conda-meta").is_dir()


class IgnoreRules:
    """gitignore-style rules; later rules win, `!` re-includes."""

    def __init__(self, lines=(), source: str = ""):
        self.source = source
        self.rules: list[tuple[re.Pattern, bool, bool]] = []  # (regex, negated, dir_only)
        for line in ALWAYS_EXCLUDED:
            self.add(line)
        self._fixed = len(self.rules)
        for line in lines:
            self.add(line)

    @classmethod
    def for_directory(cls, root: Path) -> "IgnoreRules":
        for name in (".gcloudignore", ".dockerignore"):
            path = root / name
            if path.is_file():
                return cls(_read_ignore(path, root), name)
        return cls()

    def add(self, line: str) -> None:
        line = line.rstrip("\n").rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            return
        line = line.strip()
        negated = line.startswith("!")
        if negated:
            line = line[1:]
        dir_only = line.endswith("/")
        line = line.strip("/") if dir_only else line
        anchored = line.startswith("/") or "/" in line
        line = line.lstrip("/")
        if not line:
            return
        self.rules.append((re.compile(_translate(line, anchored)), negated, dir_only))

    def excluded(self, rel: str, is_dir: bool) -> bool:
        # A path is excluded when it or one of its parent directories is; a fixed rule always wins.
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            prefix_is_dir = is_dir or i < len(parts)
            for pattern, negated, dir_only in self.rules[:self._fixed]:
                if (not dir_only or prefix_is_dir) and pattern.fullmatch(prefix):
                    return True
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            prefix_is_dir = is_dir or i < len(parts)
            state = False
            for pattern, negated, dir_only in self.rules[self._fixed:]:
                if dir_only and not prefix_is_dir:
                    continue
                if pattern.fullmatch(prefix):
                    state = not negated
            if state:
                return True
        return False


def _read_ignore(path: Path, root: Path, depth: int = 0) -> list:
    lines = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("#!include:") and depth < 5:
            included = root / line[len("#!include:"):].strip()
            if included.is_file():
                lines += _read_ignore(included, root, depth + 1)
            continue
        lines.append(line)
    return lines


def _translate(pattern: str, anchored: bool) -> str:
    out = [] if anchored else ["(?:.*/)?"]
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == len(pattern):
            out.append("/.*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1:end].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end + 1
        elif c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)
