"""A Cloud Run revision run as the real image, in a container engine (tests/engine.py), with the
same interface as runner.RevisionProcess so the Cloud Run fake, its proxy and the tests use either.

The container runs the image the Cloud Build fake built (its ENTRYPOINT/CMD, user, ENV and files
as they are in the image), on the host's network so that it can only be reached on 127.0.0.1:

- environment: the service's values, its secret references resolved (Secret Manager fake), Cloud
  Run's own `PORT`, `K_SERVICE`, `K_REVISION`, `K_CONFIGURATION`, plus `HOST=127.0.0.1` and the
  fakes' endpoints (`run_env`: the Cloud Storage emulator), as the process runner gives them. The
  values reach the engine in an env file of mode 0600 (never in its argv: tests/engine.py);
- readiness: Cloud Run's startup check (the HTTP probe path if set, any 2xx/3xx, else a TCP
  connect) within the probe's deadline; a container that exits first fails the revision with
  Cloud Run's message and the end of its log;
- stop (scale to zero, replacement, deletion): SIGTERM, then SIGKILL 10 s later, like Cloud Run;
  `termination` says which ended it (`exit_code`, `seconds`, `killed`), and the log ends with the
  line Cloud Run writes;
- `cold_start()` runs a new container from the same image when traffic comes back to a revision.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

from .runner import RevisionRun, free_port, start_failure, startup_check

STOP_GRACE = 10.0  # Cloud Run: SIGKILL 10 s after SIGTERM


class ContainerRevision(RevisionRun):
    """One revision's container: the real image in the engine, on 127.0.0.1:<free port>."""

    def __init__(self, revision: str, engine, image: str, container: dict, env: dict[str, str], startup: dict,
                 workdir_root: Path, extra_env: dict[str, str] | None = None):
        self.revision = revision
        self.engine = engine
        self.image = image  # the engine's image id (what the Artifact Registry fake's digest names)
        self.container_spec = container  # {"command": [...], "args": [...], "working_dir": str}
        self.env = env
        self.startup = startup  # {"path": "/health" or None, "deadline": seconds}
        self.root = Path(tempfile.mkdtemp(prefix=f"run-{revision}-", dir=workdir_root))
        self.extra_env = dict(extra_env or {})
        self.log_path = self.root / "container.log"
        self.port = free_port()
        self.container = None  # the engine's Container while one runs
        self.containers: list[str] = []  # every container started for this revision (cold starts add one)
        self.state = "starting"  # starting | ready | failed | stopped
        self.message = ""
        self.termination: dict | None = None  # how the last container ended: exit_code, seconds, killed
        self.stopped = threading.Event()  # set once a stop() has ended the container
        self.argv: list[str] = []  # the container's command override, if the service sets one
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # ---- what the container gets -----------------------------------------------------------
    def environment(self) -> dict[str, str]:
        env = dict(self.extra_env)
        env.update(self.env)  # the service's values and resolved secrets, then Cloud Run's own
        env.update({"PORT": str(self.port), "HOST": "127.0.0.1"})
        return env

    def _command(self) -> list[str] | None:
        command = list(self.container_spec.get("command") or [])
        args = list(self.container_spec.get("args") or [])
        if command or args:
            return command + args if command else args
        return None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "ContainerRevision":
        return self._launch()

    def _launch(self) -> "ContainerRevision":
        """Start the container off the caller's thread (the fake answers API calls meanwhile)."""
        self._stop = threading.Event()
        self.stopped.clear()
        self.state = "starting"
        self.argv = self._command() or []
        threading.Thread(target=self._run_and_probe, name=f"container-{self.revision}", daemon=True).start()
        return self

    def _run_and_probe(self) -> None:
        name = f"lsdeploy-fake-{self.revision}-{uuid.uuid4().hex[:6]}"
        try:
            container = self.engine.run(self.image, self.environment(), self.port, name=name,
                                        command=self._command())
        except Exception as exc:  # noqa: BLE001 - the engine's refusal is the revision's failure
            self._fail(f"The container could not be started: {str(exc).strip().splitlines()[-1] if str(exc) else exc}")
            return
        with self._lock:
            self.container = container
            self.containers.append(name)
        if self._stop.is_set():  # stopped while the engine was starting it
            self._retire(container)
            return
        self._probe(container)

    @staticmethod
    def _exited(container) -> int | None:
        """The container's exit code once it stopped, else None."""
        from engine import EngineError

        try:
            return container.exit_code()
        except EngineError:  # removed meanwhile
            return -1

    def _probe(self, container) -> None:
        checked = [0.0]

        def exited():  # asking the engine costs a process: twice a second at most
            if time.monotonic() - checked[0] < 0.5:
                return None
            checked[0] = time.monotonic()
            return self._exited(container)

        outcome, _ = startup_check(self.port, self.startup, self._stop, exited)
        if outcome == "ready":
            self.state = "ready"
        elif outcome == "exited":
            self._retire(container)
            self._fail(start_failure(self.port))
        elif outcome == "timeout":
            self._stop.set()
            self._retire(container)
            self._fail(start_failure(self.port))

    def _retire(self, container) -> None:
        """Stop (if it still runs), keep the log of, and remove a container that failed to start."""
        with self._lock:
            if self.container is container:
                self.container = None
        self._terminate(container)

    # ---- logs ----------------------------------------------------------------------------------
    def _save_log(self, container, note: str = "") -> None:
        try:
            text = container.logs()
        except Exception:  # noqa: BLE001 - a container the engine already forgot
            text = ""
        try:
            with open(self.log_path, "a", errors="replace") as log:
                log.write(text if text.endswith("\n") or not text else text + "\n")
                if note:
                    log.write(note + "\n")
        except OSError:  # the fake was stopped meanwhile and its directory removed
            pass

    def log_text(self) -> str:
        """Everything the revision's containers wrote (the running one's log so far included)."""
        saved = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        container = self.container
        if container is not None and self.state in ("starting", "ready"):
            try:
                saved += container.logs()
            except Exception:  # noqa: BLE001
                pass
        return saved

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ---- stop ----------------------------------------------------------------------------------
    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds (Cloud Run allows 10 s); the container is removed."""
        self._stop.set()
        with self._lock:
            container, self.container = self.container, None
        if container is not None:
            self._terminate(container, grace)
        if self.state != "failed":
            self.state = "stopped"
        self.stopped.set()

    def _terminate(self, container, grace: float = STOP_GRACE) -> None:
        from engine import EngineError

        started = time.monotonic()
        killed = False
        code = self._exited(container)
        if code is None:
            try:
                container.kill("TERM")
            except EngineError:  # it exited meanwhile
                pass
            try:
                code = container.wait(grace)
            except EngineError:
                killed = True
                try:
                    container.kill("KILL")
                    code = container.wait(30)
                except EngineError:
                    code = self._exited(container)
        seconds = time.monotonic() - started
        self.termination = {"exit_code": code, "seconds": round(seconds, 2), "killed": killed}
        note = (f"Container terminated on signal 9: it was still running {grace:g} s after SIGTERM (a process "
                f"that is not PID 1, or that ignores SIGTERM, never stops by itself: a shell-form CMD does that)."
                if killed else f"Container called exit({code}).")
        self._save_log(container, note)
        try:
            container.remove()
        except Exception:  # noqa: BLE001 - already gone
            pass

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
