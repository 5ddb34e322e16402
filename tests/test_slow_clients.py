"""Idle and slow clients against a real `label-studio-ml start` (1 worker x 8 threads, the
default): they must cost no worker thread, so a well-behaved client is answered as fast as on an
idle server, and the server closes them once CLIENT_TIMEOUT has passed."""
import http.client
import json
import socket
import statistics
import time

import pytest

from support import Server, SlowClients, predict_body, text_task

IDLE, SLOWLORIS = 200, 32
ROUNDS, SAMPLES = 6, 10  # idle, then under attack, in each round; medians of the pooled samples compared
PREDICT = json.dumps(predict_body([text_task(i, f"text {i}") for i in range(1, 6)])).encode()


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from lsdeploy.blueprints import create

    directory = tmp_path_factory.mktemp("slow-clients") / "backend"
    create(directory, blueprint="default")
    return directory


def timed(port, method, path, body=None, timeout=10.0) -> float:
    """Seconds for one request on a new connection, as a client without keep-alive sends it
    (a connection that waits behind others to be served is what this measures)."""
    began = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
    finally:
        conn.close()
    return time.perf_counter() - began


def sample(port, into: dict, samples=SAMPLES):
    for _ in range(samples):
        into["/health"].append(timed(port, "GET", "/health"))
        into["/predict"].append(timed(port, "POST", "/predict", PREDICT))


ATTACKER = r"""
import sys
sys.path.insert(0, sys.argv[4])
from support import SlowClients
attack = SlowClients(*map(int, sys.argv[1:4]))
print("ready", flush=True)
for line in sys.stdin:  # "count": how many the server has not closed; end of input: stop
    print(attack.still_open(), flush=True)
attack.close()
"""


class AttackProcess:
    """IDLE connections that send nothing and SLOWLORIS ones that send a header byte every 0.2 s
    (support.SlowClients), held by a process of their own (so that the client measured here
    shares nothing with them but the server)."""

    def __init__(self, port, idle=IDLE, slowloris=SLOWLORIS):
        import subprocess
        import sys
        from pathlib import Path

        self.proc = subprocess.Popen([sys.executable, "-c", ATTACKER, str(port), str(idle), str(slowloris),
                                      str(Path(__file__).resolve().parent)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def still_open(self) -> int:
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(10)


def test_idle_and_slowloris_connections_do_not_delay_others(backend):
    """200 connections that send nothing and 32 that trickle their headers, all open while a
    well-behaved client sends /health and /predict (each on a new connection): the median
    latency stays within 2x of the same server idle. (gunicorn's gthread worker gave each new
    connection a thread for up to 5 s before it sent a byte, and each trickling client a thread
    until CLIENT_TIMEOUT: the same requests waited for tens of seconds.)"""
    idle, loaded = {"/health": [], "/predict": []}, {"/health": [], "/predict": []}
    with Server(backend) as server:
        sample(server.port, {"/health": [], "/predict": []}, 5)  # warm up: the model, the store, the code paths
        for _ in range(ROUNDS):  # interleaved: a burst of load on a busy machine hits one phase of one round
            sample(server.port, idle)
            attack = AttackProcess(server.port)
            try:
                time.sleep(0.3)  # every attack connection accepted, the slow ones trickling
                sample(server.port, loaded)
                held = attack.still_open()
            finally:
                attack.close()
            assert held == IDLE + SLOWLORIS, f"the server closed {IDLE + SLOWLORIS - held} attack connections early"
    for path in ("/health", "/predict"):
        base, under = statistics.median(idle[path]), statistics.median(loaded[path])
        print(f"{path}: idle {base * 1000:.2f} ms, under attack {under * 1000:.2f} ms, ratio {under / base:.2f}")
        assert under / base <= 2, f"{path} median latency {under / base:.1f}x the idle server's"


def test_idle_and_slow_connections_are_closed_after_client_timeout(backend):
    """With CLIENT_TIMEOUT=1.5: a connection that sends nothing, one that trickles its head and
    one kept alive after an answer are closed (without an answer: there is no request to
    answer) once their time is up, and the server goes on serving."""
    with Server(backend, env={"CLIENT_TIMEOUT": "1.5"}) as server:
        began = time.monotonic()
        attack = SlowClients(server.port, idle=50, slowloris=8)
        try:
            closed = {}
            deadline = time.monotonic() + 15
            socks = attack.idle + attack.slow
            for sock in socks:
                sock.settimeout(max(deadline - time.monotonic(), 0.1))
            for i, sock in enumerate(socks):
                try:
                    data = sock.recv(65536)
                except socket.timeout:
                    data = None
                except ConnectionResetError:
                    data = b""
                closed[i] = (data, time.monotonic() - began)
        finally:
            attack.close()
        assert all(data == b"" for data, _ in closed.values()), {i: d for i, (d, _) in closed.items() if d != b""}
        took = sorted(t for _, t in closed.values())
        assert 1.4 < took[0] and took[-1] < 3.5, (took[0], took[-1])
        # a kept-alive connection waits `keepalive` (5 s) for its next request, then is closed
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
        conn.request("GET", "/health")
        assert conn.getresponse().read()
        answered = time.monotonic()
        assert conn.sock.recv(1) == b""
        assert 4.5 < time.monotonic() - answered < 7
        assert timed(server.port, "GET", "/health") < 5


def test_connections_over_the_limit_take_the_place_of_idle_ones(tmp_path):
    """At worker_connections (gunicorn's setting, 1000 by default) a new connection replaces the
    waiting connection that would expire first, instead of queueing behind idle ones."""
    import os
    import subprocess
    import sys

    import gunicorn.config

    from support import free_port, wait_for

    (tmp_path / "app.py").write_text("def app(environ, start_response):\n"
                                     "    start_response('200 OK', [('Content-Type', 'application/json')])\n"
                                     "    return [b'{}']\n")
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "--worker-class", "lsdeploy.worker.LsdeployWorker", "--threads", "2",
            "--worker-connections", "20", "--bind", f"127.0.0.1:{port}", "--chdir", str(tmp_path), "app:app"]
    if any(s.name == "control_socket_disable" for s in gunicorn.config.KNOWN_SETTINGS):
        argv.append("--no-control-socket")
    proc = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: timed(port, "GET", "/health", timeout=2) < 2, timeout=30, message="gunicorn")
        attack = SlowClients(port, idle=60, slowloris=4)
        try:
            time.sleep(0.5)
            took = [timed(port, "GET", "/health", timeout=5) for _ in range(5)]
            assert max(took) < 1, took
            assert attack.still_open() <= 20
        finally:
            attack.close()
    finally:
        proc.terminate()
        proc.wait(20)
