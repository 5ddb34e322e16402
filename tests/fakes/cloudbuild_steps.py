"""The steps of a Cloud Build build, run on paper as a Docker daemon would run them (cloudbuild.py
owns the builds; this module only executes their steps).

- `gcr.io/cloud-builders/docker` steps, and `docker ...` commands inside `bash -c` (joined with
  `&&` / `;`, `|| exit 0` tolerated): `build` (`-t`, `-f`, `--cache-from`, the context and the
  step's `dir`) checks the Dockerfile and every COPY/ADD source exist in the context after
  `.dockerignore` (docker.py), and makes an image whose digest depends only on the context's files
  and the Dockerfile path; `tag`; `push` to the Artifact Registry fake, refused without
  `roles/artifactregistry.writer` for the build's account (propagated: `cloud.iam`) unless it has
  project-wide access; `pull` (for `--cache-from`).
- Any other step is recorded in the log and succeeds.

With a container engine (`cloud.engine`, tests/engine.py) the build is real: after the same checks,
`docker build` builds the context with the engine (never pulling: the base image is local; layers
the engine already holds are reused, which is what `--cache-from` gives on Cloud Build), the image
is the engine's (its id is the digest a push records), a failing build fails the step with the
engine's log tail, and `docker pull` of an image the Artifact Registry fake holds re-tags it in the
build's daemon. Without an engine, builds happen on paper: the digest is derived from the context.
"""
from __future__ import annotations

import hashlib
import io
import re
import shlex
import subprocess
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

from .artifactregistry import PushError, parse_image
from .docker import DOCKER_BUILDERS, copy_source_missing, dockerignore_patterns, dockerignored
from .runner import dockerfile_instructions


class BuildTimeout(Exception):
    """A step ran past the build's `timeout`: `lines` is what its log got so far."""

    def __init__(self, lines: list):
        super().__init__("build timeout")
        self.lines = lines


class BuildSteps:
    """Runs a build's steps; `daemon` (local tag -> (digest, bundle, dockerfile)) is the build's
    Docker daemon, `files` the unpacked source (None when no storage backend holds it)."""

    LOG_TAIL = 20  # lines of a failed engine build shown in the Cloud Build log

    def __init__(self, cloud):
        self.cloud = cloud

    def may_push(self, record, repository: str) -> bool:
        identity = getattr(record, "identity", "")
        if identity.endswith("@cloudbuild.gserviceaccount.com"):
            return True  # the legacy Cloud Build account holds roles/cloudbuild.builds.builder
        if identity.endswith("-compute@developer.gserviceaccount.com") and self.cloud.automatic_default_grants:
            return True  # Editor on the project, granted automatically before May 2024
        return self.cloud.artifactregistry.can_push(repository, f"serviceAccount:{identity}")

    def push(self, record, image_ref, local):
        digest, bundle, dockerfile = local[:3]
        parts = parse_image(image_ref)
        if parts is not None:
            repository = f"projects/{parts['project']}/locations/{parts['location']}/repositories/{parts['repo']}"
            if repository in self.cloud.artifactregistry.repositories and not self.may_push(record, repository):
                raise PushError(f'denied: Permission "artifactregistry.repositories.uploadArtifacts" denied on '
                                f'resource "{repository}" (or it may not exist)')
        with self.cloud.server.lock:  # a real build runs on its own thread
            image = self.cloud.artifactregistry.push(image_ref, digest, bundle or b"", dockerfile, record.build.id,
                                                     local=local[3] if len(local) > 3 else "",
                                                     size=local[4] if len(local) > 4 else 0)
        record.pushed.append(image)
        return image

    def run(self, record, step, files, daemon) -> tuple[bool, list[str]]:
        args = list(step.args)
        name = step.name
        if step.entrypoint in ("bash", "sh", "/bin/bash", "/bin/sh") and len(args) >= 2 and args[0] == "-c":
            return self._run_shell(record, args[1], files, daemon)
        if name not in DOCKER_BUILDERS and not name.endswith("/docker"):
            return True, [f"(lsdeploy fake: step {name} {' '.join(args)} recorded, not executed)"]
        return self._docker(record, args, step.dir_, files, daemon)

    def _run_shell(self, record, script, files, daemon):
        """Only `docker ...` commands (joined with && / || exit 0 / ;) are understood in a shell step."""
        lines, ok = [], True
        for command in re.split(r"\s*(?:&&|;)\s*", script.strip()):
            tolerant = False
            if re.search(r"\|\|\s*(exit 0|true)\s*$", command):
                command, tolerant = re.sub(r"\|\|\s*(exit 0|true)\s*$", "", command).strip(), True
            words = shlex.split(command)
            if words and words[0] == "docker":
                step_ok, step_lines = self._docker(record, words[1:], "", files, daemon)
            else:
                step_ok, step_lines = True, [f"(lsdeploy fake: {command!r} recorded, not executed)"]
            lines.extend(step_lines)
            if not step_ok and not tolerant:
                return False, lines
        return ok, lines

    def _docker(self, record, args, step_dir, files, daemon) -> tuple[bool, list[str]]:
        if not args:
            return False, ["docker: no command"]
        command, rest = args[0], args[1:]
        if command == "build":
            return self._docker_build(record, rest, step_dir, files, daemon)
        if command == "tag" and len(rest) == 2:
            if rest[0] not in daemon:
                return False, [f"Error response from daemon: No such image: {rest[0]}"]
            daemon[rest[1]] = daemon[rest[0]]
            return True, []
        if command == "push" and rest:
            ref = [a for a in rest if not a.startswith("-")][-1]
            local = daemon.get(ref)
            if local is None:
                return False, [f"An image does not exist locally with the tag: {ref}"]
            try:
                image = self.push(record, ref, local)
            except PushError as exc:
                return False, [f"The push refers to repository [{ref}]", str(exc)]
            return True, [f"The push refers to repository [{ref.split('@')[0].rsplit(':', 1)[0]}]",
                          f"{ref.rsplit(':', 1)[-1] if ':' in ref.split('/')[-1] else 'latest'}: digest: "
                          f"{image.digest} size: 1234"]
        if command == "pull" and rest:
            ref = rest[-1]
            image = self.cloud.artifactregistry.resolve(ref)
            if image is None:
                return False, [f"Error response from daemon: manifest for {ref} not found: manifest unknown"]
            if self.cloud.engine is not None and not image.local:
                return False, [f"Error response from daemon: manifest for {ref} not found: manifest unknown "
                               f"(lsdeploy fake: the image was not built by the container engine)"]
            daemon[ref] = (image.digest, image.bundle, image.dockerfile, image.local, image.size)
            return True, [f"Digest: {image.digest}", f"Status: Downloaded newer image for {ref}"]
        return True, [f"(lsdeploy fake: docker {command} recorded, not executed)"]

    def _docker_build(self, record, args, step_dir, files, daemon):
        tags, dockerfile, cache_from, context = [], None, [], None
        i = 0
        while i < len(args):
            arg = args[i]
            value = None
            if arg in ("-t", "--tag", "-f", "--file", "--cache-from", "--build-arg", "--network", "--target",
                       "--platform", "--label"):
                value = args[i + 1] if i + 1 < len(args) else ""
                i += 2
            elif arg.startswith("--") and "=" in arg:
                arg, value = arg.split("=", 1)
                i += 1
            elif arg.startswith("-"):
                i += 1
                continue
            else:
                context = arg
                i += 1
                continue
            if arg in ("-t", "--tag"):
                tags.append(value)
            elif arg in ("-f", "--file"):
                dockerfile = value
            elif arg == "--cache-from":
                cache_from.append(value)
        if context is None:
            return False, ['"docker build" requires exactly 1 argument.']
        base = "/".join(p for p in (step_dir, context) if p and p != ".").strip("/")
        if files is None:
            context_files = {}
        else:
            context_files = {n[len(base) + 1:] if base else n: c for n, c in files.items()
                             if not base or n.startswith(base + "/")}
        sent = len(context_files)
        if ".dockerignore" in context_files:
            patterns = dockerignore_patterns(context_files[".dockerignore"].decode("utf-8", "replace"))
            context_files = {n: c for n, c in context_files.items() if not dockerignored(n, patterns)}
        dockerfile = dockerfile or "Dockerfile"
        lines = []
        for ref in cache_from:
            found = ref in daemon or self.cloud.artifactregistry.resolve(ref) is not None
            record.cache_from.append((ref, found))
        if files is not None and dockerfile not in context_files:
            where = f"/workspace/{base + '/' if base else ''}{dockerfile}"
            return False, [f"unable to evaluate symlinks in Dockerfile path: lstat {where}: no such file or directory"]
        tree = hashlib.sha256()
        for path in sorted(context_files):
            tree.update(path.encode() + b"\0" + hashlib.sha256(context_files[path]).digest())
        if files is None:  # no storage backend: derive the digest from the source reference
            src = record.build.source.storage_source
            tree.update(f"gs://{src.bucket}/{src.object_}#{src.generation}".encode())
        digest = "sha256:" + hashlib.sha256(b"lsdeploy-fake-image\0" + dockerfile.encode() + b"\0"
                                            + tree.digest()).hexdigest()
        lines.append(f"Sending build context to Docker daemon  {sum(map(len, context_files.values()))}B")
        instructions = dockerfile_instructions(context_files.get(dockerfile, b"").decode("utf-8", "replace"))
        cached = {ref for ref, found in record.cache_from if found}
        real = self.cloud.engine is not None and files is not None  # the engine prints its own steps
        for n, (keyword, arguments) in enumerate(instructions, 1):
            if not real:
                lines.append(f"Step {n}/{len(instructions)} : {keyword} {arguments}")
            missing = copy_source_missing(keyword, arguments, context_files) if files is not None else None
            if missing is not None:
                lines.append(f"{keyword} failed: file not found in build context or excluded by .dockerignore: "
                             f"stat {missing}: file does not exist")
                return False, lines
            if cached and keyword not in ("COPY", "ADD") and not real:
                lines.append(" ---> Using cache")
        local, size = "", 0
        if real:
            built = self._engine_build(record, context_files, dockerfile, args)
            if isinstance(built, list):
                return False, lines + built
            local, size, engine_lines = built
            lines.extend(engine_lines)
            digest = local  # the image's own id: a sha256 of its configuration, stable per image
        lines.append(f"Successfully built {digest[7:19]}")
        bundle = record.bundle
        if (base or len(context_files) < sent) and files is not None:  # the image holds the context only
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
                for path in sorted(context_files):
                    info = tarfile.TarInfo(path)
                    info.size = len(context_files[path])
                    archive.addfile(info, io.BytesIO(context_files[path]))
            bundle = buffer.getvalue()
        for tag in tags:
            daemon[tag] = (digest, bundle, dockerfile, local, size)
            lines.append(f"Successfully tagged {tag}")
        return True, lines

    def _engine_build(self, record, context_files: dict, dockerfile: str, args: list):
        """Build the context for real: (image id, size, engine log lines), or the failing step's
        log lines (the engine's log tail) when the build fails."""
        from engine import BuildError, EngineError

        engine = self.cloud.engine
        build_args = {}
        for i, arg in enumerate(args):
            value = args[i + 1] if arg == "--build-arg" and i + 1 < len(args) else (
                arg.split("=", 1)[1] if arg.startswith("--build-arg=") else None)
            if value is not None and "=" in value:
                key, _, val = value.partition("=")
                if key != "BUILDKIT_INLINE_CACHE":  # BuildKit's; the engine's layers are the cache here
                    build_args[key] = val
        with tempfile.TemporaryDirectory(prefix="build-", dir=self.cloud.workdir) as tmp:
            context = Path(tmp) / "workspace"
            for name, content in context_files.items():
                target = context / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
            log_path = Path(tmp) / "engine.log"
            # a tag of its own per build: parallel test sessions share the engine's storage
            tag = f"localhost/lsdeploy-fakes/{record.build.id or uuid.uuid4()}:{len(record.engine_images)}"
            remaining = record.deadline - time.monotonic() if record.deadline else 1800
            if remaining <= 0:
                raise BuildTimeout([])
            try:
                image = engine.build(context, tag, dockerfile=context / dockerfile, build_args=build_args,
                                     log_path=log_path, timeout=remaining)
            except subprocess.TimeoutExpired as exc:  # the engine's build was killed at the build's deadline
                output = exc.stdout or b""
                text = output.decode("utf-8", "replace") if isinstance(output, bytes) else output
                raise BuildTimeout([line for line in text.splitlines() if line.strip()][-self.LOG_TAIL:]) from None
            except BuildError as exc:
                tail = [line for line in exc.log.splitlines() if line.strip()][-self.LOG_TAIL:]
                return tail + [f"error building image: {engine.name} build exited with a non-zero status"]
            except EngineError as exc:
                return [f"error building image: {exc}"]
            log = log_path.read_text(errors="replace").splitlines()
            record.engine_images.append(image)
            record.engine_log.extend(log)
            return image, engine.size(image), [line for line in log if line.strip()]

