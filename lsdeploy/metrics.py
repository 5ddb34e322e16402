"""A small Prometheus text-format registry (no client library in the base install).

Counters are per process: with several gunicorn workers each scrape sees the worker that
answered it, which is how Prometheus' own client behaves without its multiprocess mode."""
from __future__ import annotations

import bisect
import threading
from collections import defaultdict

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 100.0)


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels)
    return "{" + body + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self._gauges: dict[str, dict[tuple, float]] = defaultdict(dict)
        self._hist: dict[tuple, list] = {}
        self._help: dict[str, tuple[str, str]] = {}

    def describe(self, name: str, kind: str, text: str) -> None:
        self._help[name] = (kind, text)

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        with self._lock:
            self._counters[name][tuple(sorted(labels.items()))] += value

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._gauges[name][tuple(sorted(labels.items()))] = value

    def observe(self, name: str, value: float, **labels) -> None:
        self.record(None, (name, tuple(sorted(labels.items()))), value)

    def record(self, counters, hist_key, value: float) -> None:
        """The hot path: several counter increments and one histogram observation under one
        lock acquisition. `counters` is a list of (name, sorted label tuple)."""
        index = bisect.bisect_left(_BUCKETS, value)  # stored per bucket, summed when rendered
        with self._lock:
            for name, labels in counters or ():
                self._counters[name][labels] += 1
            hist = self._hist.get(hist_key)
            if hist is None:
                hist = self._hist[hist_key] = [[0] * (len(_BUCKETS) + 1), 0, 0.0]
            hist[0][index] += 1
            hist[1] += 1
            hist[2] += value

    def render(self) -> str:
        lines = []
        with self._lock:
            names = sorted(set(self._counters) | set(self._gauges) | {k[0] for k in self._hist})
            for name in names:
                kind, text = self._help.get(name, ("untyped", name))
                lines.append(f"# HELP {name} {text}")
                lines.append(f"# TYPE {name} {kind}")
                for labels, value in sorted(self._counters.get(name, {}).items()):
                    lines.append(f"{name}{_labels(labels)} {value:g}")
                for labels, value in sorted(self._gauges.get(name, {}).items()):
                    lines.append(f"{name}{_labels(labels)} {value:g}")
                for (hname, labels), (buckets, count, total) in sorted(self._hist.items()):
                    if hname != name:
                        continue
                    cumulative = 0
                    for bound, n in zip(_BUCKETS, buckets):
                        cumulative += n
                        lines.append(f"{name}_bucket{_labels(labels + (('le', f'{bound:g}'),))} {cumulative}")
                    lines.append(f"{name}_bucket{_labels(labels + (('le', '+Inf'),))} {count}")
                    lines.append(f"{name}_count{_labels(labels)} {count}")
                    lines.append(f"{name}_sum{_labels(labels)} {total:.6f}")
        return "\n".join(lines) + "\n"
