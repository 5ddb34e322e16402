"""Throughput and start-up of a created `default` backend vs a bare Flask app.

Both run under gunicorn with the same settings (1 worker, 8 threads, gthread) and answer the
same /predict body with the same JSON work; the same client loads them in alternating rounds
(A B A B ...), so machine noise hits both alike. Prints ratios (lsdeploy / bare): throughput
should be >= 0.9, start-up (spawn to first healthy /health) close to 1.

    python bench/serve.py [--rounds 4] [--seconds 4] [--clients 8]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support import TEXT_CONFIG, cpu_seconds, free_port, predict_body, text_task  # noqa: E402

BARE_APP = textwrap.dedent('''
    from flask import Flask, jsonify, request

    app = Flask(__name__)

    @app.get("/health")
    def health():
        return jsonify({"status": "UP", "model_class": "Bare"})

    @app.post("/predict")
    def predict():
        data = request.get_json(force=True)
        tasks = data["tasks"]
        return jsonify({"results": [{"result": [], "score": 0.0, "model_version": "0.0.1"} for _ in tasks]})
''')

THREADS = os.environ.get("BENCH_THREADS", "8")
GUNICORN = ["--workers", "1", "--threads", THREADS, "--worker-class", "gthread", "--timeout", "0",
            "--graceful-timeout", "8", "--keep-alive", "5", "--no-control-socket"]


def _gunicorn_flags():
    import gunicorn.config as cfg

    has_control_socket = any(s.name == "control_socket_disable" for s in cfg.KNOWN_SETTINGS)
    return [f for f in GUNICORN if f != "--no-control-socket" or has_control_socket]


def start(kind: str, workdir: Path, port: int) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "INFO"), "MODEL_DIR": str(workdir / f"state-{port}")}
    if kind == "lsdeploy":
        argv = [sys.executable, "-m", "lsdeploy.cli", "start", str(workdir / "backend"),
                "--port", str(port), "--host", "127.0.0.1", "--workers", "1", "--threads", THREADS]
    else:
        argv = [sys.executable, "-m", "gunicorn", *_gunicorn_flags(), "--bind", f"127.0.0.1:{port}",
                "--chdir", str(workdir), "bare:app"]
    began = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, time.perf_counter() - began
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{kind} server exited with {proc.returncode}")
        if time.perf_counter() - began > 60:
            raise SystemExit(f"{kind} server not healthy after 60 s")
        time.sleep(0.01)


def load(port: int, seconds: float, clients: int, body: bytes, counter: list | None = None) -> float:
    """Requests per second from `clients` keep-alive connections for `seconds`."""
    counts = [0] * clients
    errors = []
    stop = time.perf_counter() + seconds

    def worker(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Content-Type": "application/json"}
        while time.perf_counter() < stop:
            conn.request("POST", "/predict", body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors.append(resp.status)
                return
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    if errors:
        raise SystemExit(f"requests failed with {errors[:3]}")
    if counter is not None:
        counter.append(sum(counts))
    return sum(counts) / (time.perf_counter() - began)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--starts", type=int, default=5)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]

    from lsdeploy.blueprints import create

    workdir = Path(tempfile.mkdtemp(prefix="lsdeploy-bench-"))
    create(workdir / "backend", blueprint="default")
    (workdir / "bare.py").write_text(BARE_APP)
    body = json.dumps(predict_body([text_task(i, f"text {i}") for i in range(1, 11)], label_config=TEXT_CONFIG)).encode()

    starts = {"lsdeploy": [], "bare": []}
    for _ in range(args.starts):
        for kind in ("lsdeploy", "bare"):
            proc, took = start(kind, workdir, free_port())
            starts[kind].append(took)
            proc.terminate()
            proc.wait()

    servers = {}
    for kind in ("lsdeploy", "bare"):
        port = free_port()
        servers[kind] = (start(kind, workdir, port)[0], port)
    rates = {"lsdeploy": [], "bare": []}
    cpu = {"lsdeploy": [], "bare": []}
    try:
        for kind, (_, port) in servers.items():
            load(port, 1.0, args.clients, body)  # warm up
        for _ in range(args.rounds):
            for kind, (proc, port) in servers.items():
                before, done = cpu_seconds(proc.pid), []
                rates[kind].append(load(port, args.seconds, args.clients, body, done))
                cpu[kind].append((cpu_seconds(proc.pid) - before) / done[0] * 1e6)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    ours, bare = statistics.median(rates["lsdeploy"]), statistics.median(rates["bare"])
    s_ours, s_bare = statistics.median(starts["lsdeploy"]), statistics.median(starts["bare"])
    print(f"/predict throughput (10 tasks/request, {args.clients} clients, {args.rounds} alternating rounds of {args.seconds:g} s)")
    print(f"  lsdeploy {ours:8.1f} req/s   rounds: {', '.join(f'{r:.0f}' for r in rates['lsdeploy'])}")
    print(f"  bare     {bare:8.1f} req/s   rounds: {', '.join(f'{r:.0f}' for r in rates['bare'])}")
    print(f"  throughput ratio lsdeploy/bare = {ours / bare:.3f}  (target >= 0.9)   per round: "
          f"{', '.join(f'{a / b:.2f}' for a, b in zip(rates['lsdeploy'], rates['bare']))}")
    c_ours, c_bare = statistics.median(cpu["lsdeploy"]), statistics.median(cpu["bare"])
    print(f"  server CPU per request: lsdeploy {c_ours:.0f} us, bare {c_bare:.0f} us, ratio bare/lsdeploy = {c_bare / c_ours:.3f}")
    print(f"start to first healthy /health (median of {args.starts})")
    print(f"  lsdeploy {s_ours:.3f} s   bare {s_bare:.3f} s   start-up ratio lsdeploy/bare = {s_ours / s_bare:.3f}")
    print(f"machine load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPU(s)")


if __name__ == "__main__":
    main()
