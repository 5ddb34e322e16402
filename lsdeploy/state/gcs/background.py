"""Writes given ``wait=`` (the ones made on the request path while a model is built): the caller
waits at most that long, not at all while storage is degraded, and the write goes on in a
background thread: it lands, or an error is logged. `close` gives the unfinished ones a moment
and says how many are lost."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

logger = logging.getLogger("lsdeploy.state.gcs")


class BackgroundWrites:
    def __init__(self, uri: str, degraded: Callable[[], bool]):
        self.uri = uri
        self.degraded = degraded  # whether storage is known not to answer now
        self.after_fork()

    def after_fork(self) -> None:
        # Threads do not survive fork: the parent's writes are the parent's.
        self._lock = threading.Lock()  # guards _threads
        self._threads: set = set()  # writes that outlived their caller's wait

    def run(self, wait: Optional[float], what: str, write: Callable[[], None]) -> None:
        """Run `write`; with `wait`, return after at most that long (at once while storage is
        degraded) and let the write finish in a background thread: it lands, or an error is
        logged. An error raised while the caller still waits is the caller's."""
        if wait is None:
            write()
            return
        done = threading.Event()
        guard = threading.Lock()
        state = {"waiting": True, "error": None}

        def run():
            try:
                write()
            except BaseException as exc:  # noqa: BLE001 - the caller's, or logged
                with guard:
                    if state["waiting"]:
                        state["error"] = exc
                        return
                logger.error("%s was not written to %s: %s", what, self.uri, exc)
            finally:
                done.set()
                with self._lock:
                    self._threads.discard(thread)

        thread = threading.Thread(target=run, name="lsdeploy-gcs-write", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()
        done.wait(0 if self.degraded() else wait)
        with guard:
            state["waiting"] = False
            error = state["error"]
        if error is not None:
            raise error
        if not done.is_set():
            logger.warning("%s is still being written to %s (storage is slow or unreachable); it lands in "
                           "the background or an error is logged", what, self.uri)

    def close(self, seconds: float = 5.0) -> None:
        """Wait up to `seconds` for the writes still going on, then log how many are lost."""
        deadline = time.monotonic() + seconds
        with self._lock:
            pending = list(self._threads)
        for thread in pending:
            thread.join(max(0.0, deadline - time.monotonic()))
        unfinished = [t for t in pending if t.is_alive()]
        if unfinished:
            logger.error("%d background write(s) to %s not finished at shutdown", len(unfinished), self.uri)
