"""Idle and slow clients against `label-studio-ml start`, and /predict throughput, with lsdeploy's
worker (the working tree) and the one it replaced (a git revision), side by side.

    python bench/slowloris.py [--baseline HEAD] [--rounds 3] [--samples 30] [--idle 200]
                              [--slowloris 32] [--seconds 4] [--clients 8] [--threads 8]

The baseline's lsdeploy/ is taken from git (`git archive REV lsdeploy`) into a temporary
directory, the candidate's is a copy of the working tree's made at start; each server is
`python -m lsdeploy.cli start` (1 worker, --threads 8: the defaults) with its own tree first on
PYTHONPATH, serving the same created `default` backend, with the installed gunicorn.

1. Latency of a well-behaved client (a new connection per request, /health and /predict
   alternating, --samples of each) on an idle server and while --idle connections that send
   nothing and --slowloris connections that send a header byte every 0.2 s are open; paired
   rounds (idle, then under attack), medians, and the ratio under attack / idle per round. A
   request not answered within 5 s ends its phase (printed as "> 5 s").
2. /predict throughput: --clients keep-alive clients for --seconds, then --clients clients on a
   new connection per request, baseline and candidate alternating (the order flips every
   round); requests per second and the ratio candidate / baseline per round and their median,
   and the servers' CPU time per request (less sensitive to a busy machine than throughput).
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support import SlowClients, cpu_seconds, free_port, predict_body, text_task  # noqa: E402

BODY = json.dumps(predict_body([text_task(i, f"text {i}") for i in range(1, 11)])).encode()
TIMEOUT = 5.0


def source_tree(rev, work: Path, name: str) -> tuple[Path, str]:
    """(directory for PYTHONPATH, description): lsdeploy/ of `rev` from git, or of the working tree."""
    dest = work / f"src-{name}"
    if rev is None:
        shutil.copytree(ROOT / "lsdeploy", dest / "lsdeploy", ignore=shutil.ignore_patterns("__pycache__"))
        return dest, "working tree"
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True,
                         check=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", sha, "lsdeploy"], capture_output=True,
                             check=True).stdout
    dest.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest)
    return dest, f"{rev} ({sha})"


class Server:
    def __init__(self, name, source: Path, backend: Path, work: Path, threads: int):
        self.name, self.port = name, free_port()
        self.log = open(work / f"server-{name}.log", "w")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), os.environ.get("PYTHONPATH", "")]),
               "MODEL_DIR": str(work / f"state-{name}"), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "lsdeploy.cli", "start", str(backend), "--port",
                                      str(self.port), "--host", "127.0.0.1", "--threads", str(threads)],
                                     cwd=work, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                request(self.port, "GET", "/health")
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit(f"{name} server exited with {self.proc.returncode}") from None
                time.sleep(0.05)
        raise SystemExit(f"{name} server not healthy after 60 s")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def request(port, method, path, body=None, conn=None) -> float:
    """Seconds for one request (on `conn`, or a new connection)."""
    began = time.perf_counter()
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise OSError(f"{method} {path} answered {resp.status}")
    finally:
        if own:
            conn.close()
    return time.perf_counter() - began


def latencies(port, samples) -> dict:
    """Median seconds of /health and /predict (None: a request took longer than TIMEOUT)."""
    lat = {"/health": [], "/predict": []}
    try:
        for _ in range(samples):
            lat["/health"].append(request(port, "GET", "/health"))
            lat["/predict"].append(request(port, "POST", "/predict", BODY))
    except (socket.timeout, TimeoutError):
        return {path: None for path in lat}
    return {path: statistics.median(values) for path, values in lat.items()}


def throughput(port, seconds, clients, keepalive, done=None) -> float:
    counts, errors = [0] * clients, []
    stop = time.perf_counter() + seconds

    def client(i):
        conn = None
        while time.perf_counter() < stop:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                request(port, "POST", "/predict", BODY, conn)
            except OSError as exc:
                errors.append(exc)
                return
            counts[i] += 1
            if not keepalive:
                conn.close()
                conn = None

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    if errors:
        raise SystemExit(f"/predict failed: {errors[0]}")
    if done is not None:
        done.append(sum(counts))
    return sum(counts) / (time.perf_counter() - began)


def fmt(seconds):
    return f"> {TIMEOUT:g} s" if seconds is None else f"{seconds * 1000:7.2f} ms"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--idle", type=int, default=200)
    parser.add_argument("--slowloris", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    began, load_before = time.monotonic(), os.getloadavg()[0]
    import gunicorn

    from lsdeploy.blueprints import create

    work = Path(tempfile.mkdtemp(prefix="lsdeploy-slowloris-"))
    servers = {}
    try:
        create(work / "backend", blueprint="default")
        sources = {"baseline": source_tree(args.baseline, work, "baseline"), "candidate": source_tree(None, work, "candidate")}
        for name, (source, _) in sources.items():
            servers[name] = Server(name, source, work / "backend", work, args.threads)
        print(f"gunicorn {gunicorn.__version__}, 1 worker x {args.threads} threads, `default` backend, "
              f"/predict of 10 tasks; baseline: {sources['baseline'][1]}, candidate: {sources['candidate'][1]}")
        for name, server in servers.items():
            latencies(server.port, 5)  # warm up
            throughput(server.port, 1.0, args.clients, True)

        print(f"\n1. well-behaved client (new connection per request, median of {args.samples}), idle server vs "
              f"{args.idle} idle + {args.slowloris} slowloris connections open")
        for name, server in servers.items():
            ratios = {"/health": [], "/predict": []}
            for r in range(args.rounds):
                idle = latencies(server.port, args.samples)
                attack = SlowClients(server.port, args.idle, args.slowloris)
                time.sleep(0.5)  # every connection accepted, the slow ones trickling
                try:
                    loaded = latencies(server.port, args.samples)
                finally:
                    attack.close()
                for path in ratios:
                    ratio = None if loaded[path] is None or idle[path] is None else loaded[path] / idle[path]
                    ratios[path].append(ratio)
                    print(f"  {name:9s} round {r + 1}  {path:8s}  idle {fmt(idle[path])}  under attack {fmt(loaded[path])}"
                          f"  ratio {'-' if ratio is None else f'{ratio:.2f}'}")
                if any(v is None for v in loaded.values()):
                    time.sleep(TIMEOUT)  # the server frees what the attack held
            for path, values in ratios.items():
                done = [v for v in values if v is not None]
                print(f"  {name:9s} {path:8s} median ratio under attack / idle = "
                      + (f"{statistics.median(done):.2f}" if len(done) == len(values) else
                         f"not measured: {len(values) - len(done)} of {len(values)} round(s) had a request over "
                         f"{TIMEOUT:g} s"))

        print(f"\n2. /predict throughput, {args.clients} clients, {args.rounds} alternating rounds of {args.seconds:g} s")
        for keepalive in (True, False):
            rates, cpu = {"baseline": [], "candidate": []}, {"baseline": [], "candidate": []}
            for r in range(args.rounds):
                order = ["baseline", "candidate"] if r % 2 == 0 else ["candidate", "baseline"]
                for name in order:
                    before, done = cpu_seconds(servers[name].proc.pid), []
                    rates[name].append(throughput(servers[name].port, args.seconds, args.clients, keepalive, done))
                    cpu[name].append((cpu_seconds(servers[name].proc.pid) - before) / done[0] * 1e6)
            per_round = [c / b for c, b in zip(rates["candidate"], rates["baseline"])]
            label = "keep-alive" if keepalive else "new connection per request"
            print(f"  {label}:")
            for name in ("baseline", "candidate"):
                print(f"    {name:9s} median {statistics.median(rates[name]):7.1f} req/s   rounds: "
                      + ", ".join(f"{v:.0f}" for v in rates[name]))
            print(f"    throughput ratio candidate / baseline = {statistics.median(per_round):.3f} (median of rounds: "
                  + ", ".join(f"{v:.3f}" for v in per_round) + ")")
            c_base, c_cand = statistics.median(cpu["baseline"]), statistics.median(cpu["candidate"])
            print(f"    server CPU per request: baseline {c_base:.0f} us, candidate {c_cand:.0f} us, "
                  f"ratio candidate / baseline = {c_cand / c_base:.3f}")
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nwall time {time.monotonic() - began:.0f} s; load average (1 min) before {load_before:.2f}, "
          f"after {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPU(s)")


if __name__ == "__main__":
    main()
