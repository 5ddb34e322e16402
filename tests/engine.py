"""The container engine the tests build and run real images with: Docker where a Docker engine
answers, else podman as tests/containers.sh installs it (with a local stand-in for
`python:3.11-slim`, since Docker Hub may be out of reach).

    eng = engine()                      # an Engine, or None: why_no_engine() says why
    image = eng.build(directory, "localhost/lsdeploy-test/default:1")
    box = eng.run(image, env={"LABEL_STUDIO_API_KEY": key}, port=free_port())
    box.kill("TERM"); box.wait(10); box.remove()

Environment is passed through a 0600 env file, never on the engine's command line (the brief
forbids secrets in the argv of child processes). Containers run with host networking and
`HOST=127.0.0.1`, so they listen on the loopback only. Everything an Engine creates (containers,
images built or tagged without keep=True) is removed by `cleanup()`, which the tests call once
per session.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator, Optional

BASE_IMAGE = "docker.io/library/python:3.11-slim"
CONTAINERS_SH = Path(__file__).resolve().parent / "containers.sh"
LABEL = "lsdeploy-tests"  # on every container the tests start (`--filter label=lsdeploy-tests`)
# the repositories of the images the tests and the fakes build; prune_stale() clears what a killed
# session left there
TEST_REPOSITORIES = ("localhost/lsdeploy-test/", "localhost/lsdeploy-fakes/")
STALE_AFTER = 12 * 3600  # seconds: no test session runs this long (CI allows 90 minutes)
ENGINES = ("docker", "podman")


class EngineError(RuntimeError):
    """An engine command failed; the message has the command's name and the end of its output."""


class BuildError(EngineError):
    def __init__(self, message: str, log: str):
        super().__init__(message)
        self.log = log


def _epoch(created: str) -> float:
    """Seconds since the epoch of an engine's `Created` ("2026-12-02 19:36:15.123456789 +0000 UTC"
    from podman's Go format, "2026-12-02T19:36:15.123456789Z" from Docker); +inf when unreadable,
    so nothing is removed on a time this cannot read."""
    text = created.strip().replace("T", " ", 1)
    match = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?:\.\d+)?\s*(Z|[+-]\d\d:?\d\d)?", text)
    if not match:
        return float("inf")
    zone = (match.group(2) or "+0000").replace("Z", "+0000").replace(":", "")
    try:
        return datetime.strptime(f"{match.group(1)} {zone}", "%Y-%m-%d %H:%M:%S %z").timestamp()
    except ValueError:
        return float("inf")


def _cache_dir() -> Path:
    return Path(os.environ.get("LSDEPLOY_CACHE") or Path.home() / ".cache" / "lsdeploy") / "containers"


def _answers(argv: list, timeout: float = 20.0) -> bool:
    if not shutil.which(argv[0]):
        return False
    try:
        return subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _detect() -> tuple:
    """(Engine or None, reason)."""
    forced = os.environ.get("LSDEPLOY_TEST_ENGINE", "")
    if forced and forced not in ENGINES:
        return None, f"LSDEPLOY_TEST_ENGINE must be docker or podman, not {forced!r}"
    if forced in ("", "docker") and _answers(["docker", "info"]):
        return Engine("docker"), "a Docker engine answers `docker info`"
    if forced == "docker":
        return None, "LSDEPLOY_TEST_ENGINE=docker, but `docker info` does not answer (is the daemon running?)"
    recorded = _cache_dir() / "unavailable"
    if not shutil.which("podman"):
        if recorded.is_file():
            return None, recorded.read_text().strip()
        return None, "no Docker engine answers and podman is not installed: run `bash tests/containers.sh install`"
    if not _answers(["podman", "image", "exists", BASE_IMAGE]):
        if recorded.is_file():  # what tests/containers.sh install said
            return None, recorded.read_text().strip()
        return None, f"podman has no {BASE_IMAGE} (the local stand-in): run `bash tests/containers.sh install`"
    return Engine("podman"), "podman, with the local base image from tests/containers.sh"


_detected: Optional[tuple] = None
_detect_lock = threading.Lock()


def engine() -> Optional["Engine"]:
    """The engine for this process (detected once), or None: see why_no_engine()."""
    global _detected
    with _detect_lock:
        if _detected is None:
            _detected = _detect()
            if _detected[0] is not None:
                _detected[0].prune_stale()
        return _detected[0]


def why_no_engine() -> str:
    """Why engine() is None (or which engine it found and why)."""
    engine()
    return _detected[1]


class Container:
    """A container started by Engine.run."""

    def __init__(self, eng: "Engine", cid: str, name: str, port: Optional[int]):
        self.engine = eng
        self.id = cid
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}" if port else None
        self.removed = False

    def inspect(self) -> dict:
        return self.engine.inspect(self.id, kind="container")

    @property
    def pid(self) -> int:
        """The host pid of the container's first process (0 once it has exited)."""
        return int(self.inspect()["State"]["Pid"] or 0)

    def running(self) -> bool:
        try:
            return bool(self.inspect()["State"]["Running"])
        except EngineError:
            return False

    def exit_code(self) -> Optional[int]:
        """The exit code once the container has stopped, else None."""
        state = self.inspect()["State"]
        return None if state["Running"] else int(state["ExitCode"])

    def logs(self) -> str:
        done = self.engine.call(["logs", self.id], check=False, timeout=60)
        return done.stdout + done.stderr

    def kill(self, sig: str = "TERM") -> None:
        self.engine.call(["kill", "--signal", str(sig).removeprefix("SIG"), self.id])

    def wait(self, timeout: float) -> int:
        """The exit code; EngineError if the container still runs after `timeout` seconds."""
        try:
            done = self.engine.call(["wait", self.id], timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EngineError(f"container {self.name} still running after {timeout:g} s") from None
        # podman may print one exit code per line when asked about several containers
        return int(done.stdout.strip().splitlines()[-1])

    def exec(self, command: list, user: Optional[str] = None) -> subprocess.CompletedProcess:
        argv = ["exec"] + (["--user", user] if user else []) + [self.id] + list(command)
        return self.engine.call(argv, check=False, timeout=60)

    def remove(self) -> None:
        if not self.removed:
            self.engine.call(["rm", "--force", self.id], check=False, timeout=60)
            self.removed = True
            self.engine._containers.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class Engine:
    def __init__(self, name: str):
        if name not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, not {name!r}")
        self.name = name
        self.exe = shutil.which(name) or name
        self._containers: set = set()
        self._images: set = set()  # tags to remove at cleanup
        self._lock = threading.Lock()

    def __repr__(self):
        return f"Engine({self.name!r})"

    # -- plumbing --------------------------------------------------------------------------------
    def call(self, args: list, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run([self.exe] + [str(a) for a in args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout, **kwargs)
        if check and done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise EngineError(f"{self.name} {args[0]} failed (exit {done.returncode}): " + " | ".join(tail))
        return done

    def inspect(self, ref: str, kind: str = "image") -> dict:
        done = self.call([kind, "inspect", ref], timeout=60)
        return json.loads(done.stdout)[0]

    # -- images ----------------------------------------------------------------------------------
    def build(self, context, tag: str, dockerfile=None, keep: bool = False, build_args: Optional[dict] = None,
              log_path=None, no_cache: bool = False, timeout: float = 1800) -> str:
        """Build `context` (its Dockerfile, or `dockerfile`) as `tag`; the image id ("sha256:...").
        Never pulls: the base image is local (podman: --pull=never). The image this replaces under
        `tag` is removed when nothing else uses it, so rebuilding keeps one image per tag. Without
        keep=True, cleanup() removes the image. no_cache=True: no layer is reused (a cold build).
        BuildError (with the log) on failure."""
        previous = self.image_id(tag) if self.exists(tag) else None
        with tempfile.TemporaryDirectory(prefix="lsdeploy-build-") as tmp:
            iidfile = os.path.join(tmp, "iid")
            argv = ["build", "--tag", tag, "--iidfile", iidfile]
            argv += ["--pull=never"] if self.name == "podman" else []
            argv += ["--no-cache"] if no_cache else []
            if dockerfile is not None:
                argv += ["--file", str(dockerfile)]
            for key, value in (build_args or {}).items():
                argv += ["--build-arg", f"{key}={value}"]
            argv.append(str(context))
            done = self.call(argv, check=False, timeout=timeout)
            log = done.stdout + done.stderr
            if log_path is not None:
                Path(log_path).write_text(log)
            if done.returncode != 0:
                tail = [line for line in log.strip().splitlines() if line.strip()][-8:]
                raise BuildError(f"{self.name} build of {context} failed (exit {done.returncode}): "
                                 + " | ".join(tail), log)
            image = Path(iidfile).read_text().strip()
        image = image if image.startswith("sha256:") else f"sha256:{image}"
        with self._lock:
            if not keep:
                self._images.add(tag)
        if previous and previous != image:
            self.call(["rmi", previous], check=False, timeout=120)  # still used elsewhere: kept
        return image

    def tag(self, src: str, dst: str, keep: bool = False) -> None:
        self.call(["tag", src, dst], timeout=60)
        if not keep:
            with self._lock:
                self._images.add(dst)

    def exists(self, ref: str) -> bool:
        if self.name == "podman":
            return self.call(["image", "exists", ref], check=False, timeout=60).returncode == 0
        return self.call(["image", "inspect", ref], check=False, timeout=60).returncode == 0

    def image_id(self, ref: str) -> str:
        """The image's id, "sha256:<64 hex>": the digest of its configuration, so the same image
        has the same id on every engine and a different image another."""
        image = self.inspect(ref)["Id"]
        return image if image.startswith("sha256:") else f"sha256:{image}"

    def digest(self, ref: str) -> str:
        """A stable sha256 digest naming the image's content, for a registry (the Artifact Registry
        fake) to record on push: the same image always has the same digest."""
        return self.image_id(ref)

    def remove_image(self, ref: str) -> bool:
        """Remove the image or tag; False when it was not there or a container still uses it."""
        with self._lock:
            self._images.discard(ref)
        return self.call(["rmi", ref], check=False, timeout=120).returncode == 0

    def size(self, ref: str) -> int:
        """The image's size in bytes (all its layers, the base included)."""
        return int(self.inspect(ref)["Size"])

    def config(self, ref: str) -> dict:
        """The image's run configuration: User, Cmd, Entrypoint, Env, WorkingDir, ExposedPorts..."""
        return self.inspect(ref)["Config"] or {}

    def history(self, ref: str) -> str:
        """Every layer's creating instruction, one per line (ARG and ENV values show up here)."""
        return self.call(["history", "--no-trunc", "--format", "{{.CreatedBy}}", ref], timeout=60).stdout

    def layer_ids(self, ref: str) -> list:
        """The digests of the image's filesystem layers, base first."""
        return list((self.inspect(ref).get("RootFS") or {}).get("Layers") or [])

    def layers(self, ref: str) -> list:
        """[(instruction, size in bytes)] newest first."""
        done = self.call(["history", "--no-trunc", "--format", "json", ref], check=False, timeout=60)
        if done.returncode == 0 and done.stdout.strip().startswith("["):
            return [(entry.get("CreatedBy") or entry.get("created_by", ""), int(entry.get("Size") or entry.get("size") or 0))
                    for entry in json.loads(done.stdout)]
        out = self.call(["history", "--no-trunc", "--human=false", "--format", "{{.Size}}\t{{.CreatedBy}}", ref]).stdout
        return [(line.split("\t", 1)[1], int(line.split("\t", 1)[0])) for line in out.splitlines() if "\t" in line]

    # -- an image's files ------------------------------------------------------------------------
    def _export(self, ref: str) -> Iterator[tuple]:
        """(member, tar) for every entry of the image's filesystem, streamed from `export` of a
        container created (not started) from it; the container is removed afterwards."""
        created = self.call(["create", "--label", LABEL, ref, "/nonexistent"], timeout=120).stdout.strip().splitlines()[-1]
        try:
            proc = subprocess.Popen([self.exe, "export", created], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    stdin=subprocess.DEVNULL)
            try:
                with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                    for member in tar:
                        yield member, tar
            finally:
                proc.stdout.close()
                proc.wait(120)
        finally:
            self.call(["rm", "--force", created], check=False, timeout=60)

    def files(self, ref: str) -> list:
        """Every path in the image's filesystem ("app/model.py", "usr/bin/python3.11", ...)."""
        return [member.name.removeprefix("./") for member, _ in self._export(ref)]

    def grep(self, ref: str, needle: bytes) -> list:
        """Paths of the image's files whose content or name contains `needle` (every file)."""
        return self.scan(ref, needle)[1]

    def scan(self, ref: str, needle: bytes) -> tuple:
        """(every path, the paths whose content, name or link target holds `needle`) in one pass
        over the image's filesystem."""
        paths, hits = [], []
        overlap = len(needle) - 1
        for member, tar in self._export(ref):
            name = member.name.removeprefix("./")
            paths.append(name)
            if needle in name.encode(errors="surrogateescape"):
                hits.append(name)
                continue
            if member.issym() or member.islnk():
                if needle in member.linkname.encode(errors="surrogateescape"):
                    hits.append(name)
                continue
            if not member.isfile():
                continue
            stream = tar.extractfile(member)
            tail = b""
            while chunk := stream.read(1 << 20):
                if needle in tail + chunk:
                    hits.append(name)
                    break
                tail = chunk[-overlap:] if overlap else b""
        return paths, hits

    def extract(self, ref: str, dest) -> Path:
        """The image's filesystem unpacked under `dest` (regular files and directories only)."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for member, tar in self._export(ref):
            if member.isdir() or member.isfile():
                tar.extract(member, dest, filter="data") if hasattr(tarfile, "data_filter") else tar.extract(member, dest)
        return dest

    # -- containers ------------------------------------------------------------------------------
    def run(self, ref: str, env: Optional[dict] = None, port: Optional[int] = None, name: Optional[str] = None,
            command: Optional[list] = None, volumes: Optional[dict] = None, user: Optional[str] = None,
            host: str = "127.0.0.1", entrypoint: Optional[str] = None) -> Container:
        """Start `ref` detached with host networking, PORT=port and HOST=host (the container then
        listens on the loopback only; no port: neither is set). `env` goes through a 0600 env file:
        no value is on the engine's command line. `volumes`: {host path: container path};
        `entrypoint` replaces the image's ENTRYPOINT (and its CMD: `command` is then the arguments)."""
        env = dict(env or {})
        if port is not None:
            env["PORT"] = str(port)
            env.setdefault("HOST", host)
        for key, value in env.items():
            if "\n" in str(value) or "=" in key or not key:
                raise ValueError(f"env {key!r}: an env file cannot carry this name or a value with a newline")
        name = name or f"lsdeploy-test-{os.getpid()}-{os.urandom(3).hex()}"
        with tempfile.TemporaryDirectory(prefix="lsdeploy-env-") as tmp:
            env_file = os.path.join(tmp, "env")
            fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.writelines(f"{key}={value}\n" for key, value in env.items())
            argv = ["run", "--detach", "--name", name, "--label", LABEL, "--network", "host", "--env-file", env_file]
            for source, target in (volumes or {}).items():
                argv += ["--volume", f"{source}:{target}"]
            if user:
                argv += ["--user", user]
            if entrypoint is not None:
                argv += ["--entrypoint", entrypoint]
            argv.append(ref)
            argv += list(command or [])
            done = self.call(argv, check=False, timeout=300)
        if done.returncode != 0:
            self.call(["rm", "--force", name], check=False, timeout=60)
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise EngineError(f"{self.name} run {ref} failed (exit {done.returncode}): " + " | ".join(tail))
        box = Container(self, done.stdout.strip().splitlines()[-1], name, port)
        with self._lock:
            self._containers.add(box)
        return box

    def prune_stale(self, older_than: float = STALE_AFTER, label: str = LABEL,
                    repositories: tuple = TEST_REPOSITORIES) -> list:
        """Remove what a test session that was killed left behind (its cleanup() never ran): the
        containers labelled `label`, and the tags under `repositories`, created more than
        `older_than` seconds ago. Sessions may share the engine's storage (two checkouts, CI beside
        a developer), so only what is older than any session is touched, and a tag is untagged
        (never forced). Best effort: the names removed."""
        cutoff = time.time() - older_than
        removed = []
        try:
            boxes = self.call(["ps", "--all", "--quiet", "--filter", f"label={label}"], check=False, timeout=60)
            for cid in boxes.stdout.split():
                done = self.call(["container", "inspect", "--format", "{{.Created}}", cid], check=False, timeout=60)
                if done.returncode == 0 and _epoch(done.stdout) < cutoff:
                    if self.call(["rm", "--force", cid], check=False, timeout=60).returncode == 0:
                        removed.append(cid)
            listed = self.call(["images", "--format", "{{.Repository}}:{{.Tag}}"], check=False, timeout=60)
            for ref in listed.stdout.split():
                if not ref.startswith(tuple(repositories)) or ref.endswith(":<none>"):
                    continue
                done = self.call(["image", "inspect", "--format", "{{.Created}}", ref], check=False, timeout=60)
                if done.returncode == 0 and _epoch(done.stdout) < cutoff:
                    if self.call(["rmi", ref], check=False, timeout=120).returncode == 0:
                        removed.append(ref)
        except (OSError, subprocess.TimeoutExpired):
            pass
        return removed

    def cleanup(self) -> None:
        """Remove every container this Engine started and every image it built or tagged
        without keep=True."""
        with self._lock:
            boxes, images = list(self._containers), list(self._images)
        for box in boxes:
            box.remove()
        for tag in images:
            self.remove_image(tag)
