"""The source bundle a deploy builds from: the backend's files, packed deterministically.

`SourceBundle.from_directory(directory)` collects what the image build needs:

- every file of DIR except what `.gcloudignore` (or, without one, `.dockerignore`) excludes, and
  never VCS data, virtual environments, caches or lsdeploy's local state (ALWAYS_EXCLUDED);
- `wheels/lsdeploy-<version>-py3-none-any.whl`: the wheel of the lsdeploy running this code
  (`lsdeploy.wheel.build_wheel`), replacing any lsdeploy wheel DIR already has, so the image runs
  the same lsdeploy as the CLI that deployed it even when that version is on no package index;
- `Dockerfile`: DIR's own when it has one (a backend written for the reference SDK deploys
  unchanged), otherwise the blueprint's (`lsdeploy.blueprints.render_dockerfile`), which installs
  `requirements.txt`: an empty one is bundled when DIR has none.

It is packed as a tar.gz with sorted entries, fixed times, owners and modes and no gzip name or
time: the same files give the same bytes, so the sha256 `digest` names the content. A deploy
uses it to skip upload and build when an image for that digest already exists.

Each ignore file is read with its own tool's rules:

- `.gcloudignore`: gitignore syntax (what gcloud documents): `#` comments, `!` negation, a leading
  `/` anchors to DIR, a trailing `/` matches directories only, `*`, `?`, `[...]` within one path
  part and `**` across parts; a pattern without `/` matches at any depth. `#!include:FILE`
  includes another ignore file.
- `.dockerignore`: Docker's syntax (the build reads it the same way): every pattern is anchored
  at DIR (`data` is DIR/data, never DIR/pkg/data; only `**` reaches deeper), a leading `/` and a
  trailing `/` are dropped, `*`, `?` and `[...]` stay within one path part (Go's filepath.Match),
  `**` matches any number of directories; a pattern excludes what it matches and everything
  under it, and the last matching line wins, so a `!` exception re-includes a file even inside an
  excluded directory.

The ignore files themselves are bundled (Docker reads .dockerignore in the build). Secrets never
are: `.env` files and docker-compose files (where users write keys and passwords) are always
excluded, and `SourceBundle.find(values)` names a bundled file that contains a given secret.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import posixpath
import re
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EXIT_USAGE, LsdeployError

# Never in a bundle, whatever the ignore files say (gitignore rules: at any depth). `.env` files and
# docker-compose files hold the keys and passwords of a local run: the image must not.
ALWAYS_EXCLUDED = (".git/", ".hg/", ".svn/", "__pycache__/", "*.pyc", "*.pyo", ".pytest_cache/", ".mypy_cache/",
                   ".ruff_cache/", ".tox/", ".nox/", ".venv/", "venv/", ".lsdeploy/", ".DS_Store", ".ipynb_checkpoints/",
                   ".env", ".env.*", "docker-compose*.yml", "docker-compose*.yaml", "compose.yml", "compose.yaml")
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

    def find(self, value: str) -> str:
        """The path of the first bundled file whose content contains `value` ("" when none does)."""
        needle = value.encode("utf-8")
        with tarfile.open(fileobj=io.BytesIO(self.data), mode="r:gz") as tar:
            for member in tar:
                if member.isfile() and needle in tar.extractfile(member).read():
                    return member.name
        return ""

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
            if "requirements.txt" not in entries:
                if (root / "requirements.txt").is_file():
                    raise LsdeployError(f"{root / 'requirements.txt'} is excluded by {ignore.source}; the build "
                                        "needs it: remove it from the ignore file", EXIT_USAGE)
                # the blueprint's Dockerfile installs requirements.txt: a backend without one has none
                entries["requirements.txt"] = (b"", 0o644, "blueprint")
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
            if full.is_symlink() or _is_virtualenv(full) or ignore.prunes(rel):
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
    """What a bundle leaves out: ALWAYS_EXCLUDED (gitignore rules), then one ignore file's lines in
    its tool's dialect: "gitignore" (.gcloudignore) or "docker" (.dockerignore)."""

    def __init__(self, lines=(), source: str = "", dialect: str = "gitignore"):
        self.source = source
        self.dialect = dialect
        compile_rule = _docker_rule if dialect == "docker" else _gitignore_rule
        self.fixed = [rule for rule in map(_gitignore_rule, ALWAYS_EXCLUDED) if rule]
        # (regex, negated, dir_only)
        self.rules: list[tuple[re.Pattern, bool, bool]] = [rule for rule in map(compile_rule, lines) if rule]

    @classmethod
    def for_directory(cls, root: Path) -> "IgnoreRules":
        gcloudignore, dockerignore = root / ".gcloudignore", root / ".dockerignore"
        if gcloudignore.is_file():
            return cls(_read_ignore(gcloudignore, root), ".gcloudignore")
        if dockerignore.is_file():
            return cls(dockerignore.read_text(encoding="utf-8-sig", errors="replace").splitlines(), ".dockerignore",
                       dialect="docker")
        return cls()

    def prunes(self, rel: str) -> bool:
        """Whether the walk can skip directory `rel` entirely. Docker descends into an excluded
        directory when an exception (`!`) could re-include something inside it."""
        if self.dialect == "docker" and any(negated for _, negated, _ in self.rules):
            return _matches_any(self.fixed, rel, is_dir=True)
        return self.excluded(rel, is_dir=True)

    def excluded(self, rel: str, is_dir: bool) -> bool:
        if _matches_any(self.fixed, rel, is_dir):
            return True  # a fixed rule always wins
        parts = rel.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if self.dialect == "docker":
            if rel in ("Dockerfile", ".dockerignore"):
                return False  # Docker sends both to the builder even when the file lists them
            # The last pattern matching the path or one of its parents decides.
            state = False
            for pattern, negated, _ in self.rules:
                if any(pattern.fullmatch(prefix) for prefix in prefixes):
                    state = not negated
            return state
        # gitignore: a path is excluded when it or one of its parent directories is (an excluded
        # directory cannot be re-included from inside).
        for i, prefix in enumerate(prefixes, 1):
            prefix_is_dir = is_dir or i < len(parts)
            state = False
            for pattern, negated, dir_only in self.rules:
                if (not dir_only or prefix_is_dir) and pattern.fullmatch(prefix):
                    state = not negated
            if state:
                return True
        return False


def _matches_any(rules, rel: str, is_dir: bool) -> bool:
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        prefix_is_dir = is_dir or i < len(parts)
        if any((not dir_only or prefix_is_dir) and pattern.fullmatch(prefix) for pattern, _, dir_only in rules):
            return True
    return False


def _gitignore_rule(line: str):
    line = line.rstrip("\n").rstrip("\r")
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    line = line.strip()
    negated = line.startswith("!")
    if negated:
        line = line[1:]
    dir_only = line.endswith("/")
    line = line.strip("/") if dir_only else line
    anchored = line.startswith("/") or "/" in line
    line = line.lstrip("/")
    if not line:
        return None
    return re.compile(_translate(line, anchored)), negated, dir_only


def _docker_rule(line: str):
    """One .dockerignore line as Docker reads it: `#` in column 1 is a comment; the pattern is
    trimmed, cleaned like Go's filepath.Clean (so a trailing `/` goes) and a leading `/` dropped."""
    if line.startswith("#"):
        return None
    line = line.strip()
    negated = line.startswith("!")
    if negated:
        line = line[1:].strip()
    if not line:
        return None
    line = posixpath.normpath(line).lstrip("/")
    if line in ("", "."):
        return None
    return re.compile(_docker_regex(line)), negated, False


def _docker_regex(pattern: str) -> str:
    """Go's filepath.Match plus `**` (moby's patternmatcher): `*`, `?` and `[...]` stay within one
    path part; `**` (and `**/`) match any number of directories, a final `**` anything."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            out.append(".*" if i >= len(pattern) else "(?:.*/)?")
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[" and pattern.find("]", i + 1) != -1:
            end = pattern.find("]", i + 1)
            out.append("[" + pattern[i + 1:end].replace("[", "\\[") + "]")
            i = end + 1
        elif c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


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
