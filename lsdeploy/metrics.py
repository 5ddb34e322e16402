"""Prometheus metrics of the server, in the text format (no client library in the base install).

Every value lives in a slot of a flat float64 array; a (name, labels) key owns one slot (a
histogram owns one per bucket plus one for the sum), appended the first time the key is seen.
An increment is then one dictionary lookup and one in-place add under a lock.

Where the array lives:
- `Metrics()`: in this process (a bytearray). Flask's test client, `create_app` used directly,
  the `--debug` development server.
- `Metrics(directory)`: `label-studio-ml start` passes a private directory that the gunicorn
  master creates (and removes at exit). Each worker process maps its own file `<pid>-<n>.db` there
  and writes its values straight into it; /metrics, whichever worker answers, reads every file
  and adds them up. A scrape is therefore about the whole server and counts every request
  answered before it, by any worker.

Merging: counters and histograms are summed over every file, files of exited workers included
(so counters never go backwards when a worker dies or is replaced); gauges are summed over live
workers only. Constants (`lsdeploy_info`) belong to the app and are rendered as set.

File format (native byte order; one writer, the owning process; any number of readers):
    offset 0: uint64 bytes in use. An entry is complete before this count covers it, so a
              reader never sees half an entry.
    entries:  uint32 key length, uint32 number of values, the key (UTF-8 JSON
              `[kind, name, [[label, value], ...]]`, kind "c" counter, "g" gauge, "h" histogram),
              zero padding to a multiple of 8, then the float64 values. A histogram's values are
              its non-cumulative bucket counts (the last one +Inf) followed by the sum.
"""
from __future__ import annotations

import bisect
import itertools
import json
import logging
import mmap
import os
import struct
import threading
import time
import weakref
from collections import defaultdict
from typing import Iterator, Optional

logger = logging.getLogger("lsdeploy.metrics")

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 100.0)
_HIST_VALUES = len(_BUCKETS) + 2  # one per bucket, +Inf, then the sum
_SUM = len(_BUCKETS) + 1
# Native formats: packed with one memcpy, so an aligned 8-byte store (the header, a value) is
# never seen half-written by a reader.
_HEADER = struct.Struct("Q")
_ENTRY = struct.Struct("II")
_INITIAL_SIZE = 16 * 1024
_KIND = {"counter": "c", "gauge": "g", "histogram": "h"}


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels)
    return "{" + body + "}"


def _escape(value: str) -> str:
    """A label value in the text format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    value = float(value)
    if value.is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(value)


class _Arena:
    """A growable array of float64 slots with the entry layout above, in a bytearray or in a
    file mapped into memory (shared with readers in other processes)."""

    def __init__(self, directory: Optional[str] = None):
        self.path = None
        self.fd = None
        if directory is not None:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
            while self.fd is None:
                path = os.path.join(directory, f"{os.getpid()}-{next(_serial)}.db")
                try:
                    self.fd = os.open(path, flags, 0o600)
                except FileExistsError:  # left by an earlier process that had this pid
                    continue
                self.path = path
        self.used = _HEADER.size
        self._map(_INITIAL_SIZE)
        _HEADER.pack_into(self.buf, 0, self.used)

    def _map(self, size: int) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, size)  # zero-filled
            buf = mmap.mmap(self.fd, size)
        else:
            buf = bytearray(size)
            if getattr(self, "buf", None) is not None:
                buf[:self.used] = self.buf[:self.used]
        old = getattr(self, "_views", None)
        self.buf = buf
        base = memoryview(buf)
        self.values = base.cast("d")
        self._views = (base, self.values)
        if old is not None:  # nobody else holds them: every write happens under the owner's lock
            owner = old[0].obj
            for view in reversed(old):
                view.release()
            if isinstance(owner, mmap.mmap):
                owner.close()

    def add(self, key: bytes, count: int) -> int:
        """Append an entry of `count` zero values; returns the index of its first value."""
        start = (self.used + _ENTRY.size + len(key) + 7) & ~7
        end = start + 8 * count
        if end > len(self.buf):
            size = len(self.buf)
            while size < end:
                size *= 2
            self._map(size)
        _ENTRY.pack_into(self.buf, self.used, len(key), count)
        self.buf[self.used + _ENTRY.size:self.used + _ENTRY.size + len(key)] = key
        self.used = end
        _HEADER.pack_into(self.buf, 0, end)  # publish: the entry is complete
        return start // 8

    def snapshot(self) -> bytes:
        return bytes(self.buf[:self.used])


_serial = itertools.count()


def _dead_name(directory: str, name: str) -> str:
    return os.path.join(directory, f"dead-{name[:-3]}-{time.time_ns()}.db")


def entries(data: bytes) -> Iterator[tuple[bytes, tuple]]:
    """(key, values) of every complete entry of one file's bytes."""
    if len(data) < _HEADER.size:
        return
    used = min(_HEADER.unpack_from(data, 0)[0], len(data))
    pos = _HEADER.size
    while pos + _ENTRY.size <= used:
        length, count = _ENTRY.unpack_from(data, pos)
        key_at = pos + _ENTRY.size
        start = (key_at + length + 7) & ~7
        end = start + 8 * count
        if end > used:
            return
        yield bytes(data[key_at:key_at + length]), struct.unpack_from(f"{count}d", data, start)
        pos = end


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Metrics:
    """Counters, gauges and histograms; `directory` shares them between worker processes."""

    def __init__(self, directory: Optional[str] = None):
        self.directory = directory
        self._help: dict[str, tuple[str, str]] = {}
        self._constants: dict[str, dict[tuple, float]] = defaultdict(dict)
        self._decoded: dict[bytes, tuple] = {}
        self._reset()
        if directory is not None:
            ref = weakref.ref(self)

            def after_fork():  # a forked worker writes its own file, never its parent's
                metrics = ref()
                if metrics is not None:
                    metrics._reset()

            os.register_at_fork(after_in_child=after_fork)

    def _reset(self) -> None:
        arena = getattr(self, "_arena", None)
        if arena is not None and arena.fd is not None:  # the parent's file, inherited by fork
            try:
                os.close(arena.fd)
            except OSError:
                pass
        self._lock = threading.Lock()
        self._slots: dict[tuple, int] = {}
        self._arena: Optional[_Arena] = None
        self._values = None

    @property
    def path(self) -> Optional[str]:
        """This process's file (None in-process, or before its first value)."""
        return self._arena.path if self._arena is not None else None

    def describe(self, name: str, kind: str, text: str) -> None:
        self._help[name] = (kind, text)

    def constant(self, name: str, value: float, **labels) -> None:
        """A value of the app itself (the same in every worker), such as lsdeploy_info."""
        self._constants[name][tuple(sorted(labels.items()))] = value

    def _slot(self, kind: str, key: tuple, count: int) -> int:
        """Index of the first value of `key` (called with the lock held)."""
        slot = self._slots.get(key)
        if slot is None:
            encoded = json.dumps([kind, key[0], [list(pair) for pair in key[1]]],
                                 separators=(",", ":")).encode()
            try:
                if self._arena is None:
                    self._arena = _Arena(self.directory)
                slot = self._arena.add(encoded, count)
            except OSError as exc:
                if self._arena is not None and self._arena.path is None:
                    raise
                # The directory is gone or full: go on in memory (scrapes answered by this
                # process still add these values; the file keeps what it had). Never fail a request.
                logger.warning("metrics file in %s unusable (%s): this worker keeps new values in memory",
                               self.directory, exc)
                self._arena = _Arena(None)
                self._slots = {}
                slot = self._arena.add(encoded, count)
            self._slots[key] = slot
            self._values = self._arena.values
        return slot

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            slot = self._slot("c", key, 1)
            self._values[slot] += value

    def add(self, key: tuple, value: float) -> None:
        """`inc` with a ready (name, sorted label tuple) key."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slot("c", key, 1)
            self._values[slot] += value

    def set(self, name: str, value: float, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            slot = self._slot("g", key, 1)
            self._values[slot] = value

    def observe(self, name: str, value: float, **labels) -> None:
        self.record((), (name, tuple(sorted(labels.items()))), value)

    def record(self, counters, hist_key, value: float) -> None:
        """The hot path: counter increments and one histogram observation under one lock
        acquisition. `counters` and `hist_key` are (name, sorted label tuple) keys."""
        index = bisect.bisect_left(_BUCKETS, value)
        with self._lock:
            for key in counters:
                slot = self._slots.get(key)
                if slot is None:
                    slot = self._slot("c", key, 1)
                self._values[slot] += 1.0
            base = self._slots.get(hist_key)
            if base is None:
                base = self._slot("h", hist_key, _HIST_VALUES)
            values = self._values
            values[base + index] += 1.0
            values[base + _SUM] += value

    # -- reading ---------------------------------------------------------------------------
    def _sources(self) -> Iterator[tuple[bytes, bool]]:
        """(file bytes, belongs to a live process) of every process of the server."""
        if self.directory is None:
            with self._lock:
                data = self._arena.snapshot() if self._arena is not None else b""
            yield data, True
            return
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            names = []
        for name in sorted(names):
            if not name.endswith(".db"):
                continue
            live = not name.startswith("dead-")
            path = os.path.join(self.directory, name)
            if live and not os.path.exists(path):  # retired since listdir: read it as dead
                path, live = _find_dead(self.directory, name), False
            try:
                with open(path or "", "rb") as handle:
                    data = handle.read()
            except FileNotFoundError:
                continue
            pid = name.split("-", 1)[0]
            yield data, live and pid.isdigit() and _alive(int(pid))
        with self._lock:
            memory = self._arena.snapshot() if self._arena is not None and self._arena.path is None else None
        if memory is not None:
            yield memory, True

    def _decode(self, key: bytes) -> tuple:
        decoded = self._decoded.get(key)
        if decoded is None:
            kind, name, labels = json.loads(key)
            decoded = self._decoded[key] = (kind, name, tuple(tuple(pair) for pair in labels))
        return decoded

    def collect(self) -> tuple[dict, dict, dict]:
        """(counters, gauges, histograms) merged over the server's processes:
        {name: {labels: value}} twice, then {(name, labels): (bucket counts, sum)}."""
        counters: dict = defaultdict(lambda: defaultdict(float))
        gauges: dict = defaultdict(lambda: defaultdict(float))
        hists: dict = {}
        for data, live in self._sources():
            for key, values in entries(data):
                try:
                    kind, name, labels = self._decode(key)
                except (ValueError, TypeError):  # not an entry this version wrote
                    continue
                if kind == "c":
                    counters[name][labels] += values[0]
                elif kind == "g":
                    if live:
                        gauges[name][labels] += values[0]
                elif kind == "h" and len(values) == _HIST_VALUES:
                    hist = hists.get((name, labels))
                    if hist is None:
                        hists[(name, labels)] = [list(values[:_SUM]), values[_SUM]]
                    else:
                        hist[0] = [a + b for a, b in zip(hist[0], values)]
                        hist[1] += values[_SUM]
        return counters, gauges, hists

    def render(self) -> str:
        counters, gauges, hists = self.collect()
        by_name: dict = defaultdict(list)
        for (name, labels), hist in hists.items():
            by_name[name].append((labels, hist))
        names = sorted(set(counters) | set(gauges) | set(by_name) | set(self._constants))
        order = lambda item: tuple((k, str(v)) for k, v in item[0])  # noqa: E731
        lines = []
        for name in names:
            kind = "histogram" if name in by_name else "counter" if name in counters else "gauge"
            kind, text = self._help.get(name, (kind, name))
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            for group in (counters.get(name, {}), gauges.get(name, {}), self._constants.get(name, {})):
                for labels, value in sorted(group.items(), key=order):
                    lines.append(f"{name}{_labels(labels)} {_number(value)}")
            for labels, (buckets, total) in sorted(by_name.get(name, ()), key=order):
                cumulative = 0.0
                for bound, n in zip(_BUCKETS, buckets):
                    cumulative += n
                    lines.append(f"{name}_bucket{_labels(labels + (('le', f'{bound:g}'),))} {_number(cumulative)}")
                count = _number(cumulative + buckets[-1])
                lines.append(f"{name}_bucket{_labels(labels + (('le', '+Inf'),))} {count}")
                lines.append(f"{name}_count{_labels(labels)} {count}")
                lines.append(f"{name}_sum{_labels(labels)} {total:.6f}")
        return "\n".join(lines) + "\n"

    # -- the gunicorn master -----------------------------------------------------------------
    def retire(self, pid: int) -> None:
        """Mark the files of an exited worker: its counters stay, its gauges no longer count
        (a later process may get the same pid)."""
        if self.directory is None:
            return
        prefix = f"{pid}-"
        for name in os.listdir(self.directory):
            if name.startswith(prefix) and name.endswith(".db"):
                try:
                    os.replace(os.path.join(self.directory, name), _dead_name(self.directory, name))
                except FileNotFoundError:
                    pass


def _find_dead(directory: str, name: str) -> Optional[str]:
    prefix = f"dead-{name[:-3]}-"
    found = sorted(n for n in os.listdir(directory) if n.startswith(prefix))
    return os.path.join(directory, found[-1]) if found else None
