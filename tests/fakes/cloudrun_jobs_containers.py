"""A Cloud Run job task attempt run as the real image in the container engine (tests/engine.py),
where the FakeGoogleCloud has one; cloudrun_jobs_tasks.py runs it as a local process otherwise.

The attempt runs the image id the Artifact Registry fake recorded for the job's image, with the
job container's `command` as its ENTRYPOINT and `args` (or the execution's override args) as its
arguments, as Cloud Run does; on the host's network; its environment (the job's values, resolved
secrets, Cloud Run's job variables, the fakes' endpoints; no PORT) reaches the engine in a 0600 env
file, never in argv. `ContainerAttempt` answers what the jobs fake asks of a task's subprocess.Popen
(`poll`, `wait`), and `stop_attempt` / `signal_attempt` stop or signal either kind: SIGTERM then
SIGKILL after the grace for a stop, the signal itself for `kill_task` (SIGKILL, recorded as -9 like
a killed process) and `freeze_attempts` (SIGSTOP). Its log is appended to the execution's log and
the container removed once the attempt ends (`finish`).
"""
from __future__ import annotations

import os
import signal
import subprocess
import uuid

from lsdeploy.preview import stop_group


class ContainerAttempt:
    """One attempt's container, with the part of subprocess.Popen's interface the jobs fake uses."""

    def __init__(self, engine, image: str, label: str, command: list, args: list, env: dict, log_path: str):
        self.image = image  # the engine's image id
        self.name = f"lsdeploy-fake-{label}-{uuid.uuid4().hex[:6]}"
        self.log_path = log_path
        self.signals: set[int] = set()  # signals sent that end it (an exit of 128+n is then -n)
        self.argv = list(command) + list(args)
        self.container = engine.run(image, env, name=self.name, command=list(command[1:]) + list(args) if command
                                    else list(args) or None, entrypoint=command[0] if command else None)

    def _code(self, raw: int) -> int:
        return -(raw - 128) if raw > 128 and raw - 128 in self.signals else raw

    def poll(self) -> int | None:
        from engine import EngineError

        try:
            raw = self.container.exit_code()
        except EngineError:  # removed meanwhile
            return -signal.SIGKILL
        return None if raw is None else self._code(raw)

    def wait(self, timeout: float | None = None) -> int:
        """The exit code; subprocess.TimeoutExpired if it still runs after `timeout` seconds."""
        from engine import EngineError

        try:
            return self._code(self.container.wait(timeout if timeout is not None else 7 * 24 * 3600))
        except EngineError:
            code = self.poll()
            if code is None:
                raise subprocess.TimeoutExpired(self.argv, timeout) from None
            return code

    def send(self, sig: int) -> None:
        from engine import EngineError

        if sig not in (signal.SIGSTOP, signal.SIGCONT):
            self.signals.add(int(sig))
        try:
            self.container.kill(signal.Signals(sig).name)
        except EngineError:  # it exited meanwhile
            pass

    def stop(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds (Cloud Run's stop); returns once it exited."""
        if self.poll() is not None:
            return
        self.send(signal.SIGTERM)
        try:
            self.wait(grace)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            self.wait(30)

    def finish(self, header: str) -> None:
        """Append the container's log to the execution's, then remove the container."""
        try:
            text = self.container.logs()
        except Exception:  # noqa: BLE001 - a container the engine already forgot
            text = ""
        try:
            with open(self.log_path, "a", errors="replace") as log:
                log.write(f"{header}\n{text}" + ("" if text.endswith("\n") or not text else "\n"))
        except OSError:  # the fake was stopped meanwhile and its directory removed
            pass
        self.container.remove()


def stop_attempt(proc, grace: float) -> None:
    """Stop a task attempt (a process group or a container): SIGTERM, SIGKILL after `grace` s."""
    if isinstance(proc, ContainerAttempt):
        proc.stop(grace)
    else:
        stop_group(proc, grace)


def signal_attempt(proc, sig: int) -> None:
    """Send `sig` to a task attempt: its whole process group, or its container."""
    if isinstance(proc, ContainerAttempt):
        proc.send(sig)
    else:
        os.killpg(proc.pid, sig)
