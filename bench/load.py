"""Load on a created text-classifier backend: many concurrent /predict clients for a fixed
time, with and without training running on webhooks, side by side.

    python bench/load.py [--seconds 10] [--clients 16] [--workers 2] [--threads 8]

Prints requests, failures, throughput and p50/p99 latency for both runs; exits non-zero on any
failed /predict or a training webhook not answered 2xx. tests/test_load.py runs it briefly.
"""
from __future__ import annotations

import argparse
import http.client
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support import Server, annotation_event, predict_body, text_task  # noqa: E402

WORDS = {"Positive": ["great", "love", "wonderful", "excellent"], "Negative": ["awful", "hate", "terrible", "worst"]}


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def predict_load(port, seconds, clients, body):
    latencies, failures = [], []
    stop = time.perf_counter() + seconds

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.perf_counter() < stop:
            began = time.perf_counter()
            try:
                conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    failures.append(resp.status)
            except OSError as exc:
                failures.append(type(exc).__name__)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            latencies.append(time.perf_counter() - began)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return latencies, failures


def trainer(server, stop: threading.Event, counter: list):
    """Annotation webhooks (each one a fit) every 0.2 s; a status code or an exception name each."""
    i = 0
    while not stop.is_set():
        i += 1
        label = "Positive" if i % 2 else "Negative"
        text = " ".join(WORDS[label][j % 4] for j in range(i % 5 + 2)) + f" sample {i}"
        try:
            counter.append(server.post("/webhook", json=annotation_event(i, i, text, label)).status_code)
        except OSError as exc:  # requests' ConnectionError and Timeout are OSErrors
            counter.append(type(exc).__name__)
        stop.wait(0.2)


def main(argv=None) -> dict:
    """Run the load and print the table; returns, per case, the requests, failures, webhook
    answers and latencies in seconds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)

    base = tempfile.mkdtemp(prefix="lsdeploy-load-")
    try:
        return _run(args, Path(base) / "backend")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run(args, directory: Path) -> dict:
    from lsdeploy.blueprints import create

    create(directory, blueprint="text-classifier")
    body = json.dumps(predict_body([text_task(i, f"this is great sample {i}") for i in range(1, 6)])).encode()
    server = Server(directory, "--workers", str(args.workers), "--threads", str(args.threads),
                    env={"LOG_LEVEL": "WARNING"}).start()
    rows = []
    try:
        server.post("/webhook", json=annotation_event(1000, 1000, "great love", "Positive"))
        server.post("/webhook", json=annotation_event(1001, 1001, "awful hate", "Negative"))
        for label in ("without training", "with training", "without training", "with training"):
            stop, statuses = threading.Event(), []
            thread = None
            if label == "with training":
                thread = threading.Thread(target=trainer, args=(server, stop, statuses))
                thread.start()
            latencies, failures = predict_load(server.port, args.seconds / 2, args.clients, body)
            stop.set()
            if thread:
                thread.join()
            rows.append((label, latencies, failures, statuses))
    finally:
        server.stop()
    print(f"text-classifier backend, {args.workers} worker(s) x {args.threads} threads, {args.clients} /predict clients,"
          f" 5 tasks per request, two alternating rounds of {args.seconds / 2:g} s per case")
    cases = {}
    for label in ("without training", "with training"):
        lat = [x for r in rows if r[0] == label for x in r[1]]
        fails = [x for r in rows if r[0] == label for x in r[2]]
        webhooks = [x for r in rows if r[0] == label for x in r[3]]
        cases[label] = {"latencies": lat, "failed": fails, "webhooks": webhooks}
        print(f"  {label:17s} requests {len(lat):6d}  failed {len(fails):3d}  {len(lat) / args.seconds:7.1f} req/s"
              f"  p50 {percentile(lat, 0.5) * 1000:6.1f} ms  p99 {percentile(lat, 0.99) * 1000:6.1f} ms"
              + (f"  webhooks {len(webhooks)} (non-2xx: {sum(1 for s in webhooks if not _ok(s))})" if webhooks else ""))
    base = cases["without training"]["latencies"]
    loaded = cases["with training"]["latencies"]
    if not base or not loaded:
        raise SystemExit("no request was answered under load")
    print(f"  p99 ratio with/without training = {percentile(loaded, 0.99) / percentile(base, 0.99):.2f},"
          f" throughput ratio = {len(loaded) / len(base):.2f}")
    if any(r[2] for r in rows) or not all(_ok(s) for r in rows for s in r[3]):
        raise SystemExit("failed requests under load")
    return cases


def _ok(status) -> bool:
    return isinstance(status, int) and 200 <= status < 300


if __name__ == "__main__":
    main()
