"""The same API through a real `label-studio-ml start` process (gunicorn, several workers)."""
import concurrent.futures
import signal
import textwrap
import threading
import time

import pytest
import requests

from support import Server, TEXT_CONFIG, memory_kb, predict_body, text_task, wait_for, worker_pid

COUNTER_MODEL = textwrap.dedent('''
    import time
    from lsdeploy.model import LabelStudioMLBase

    class Counter(LabelStudioMLBase):
        """Reads and writes state the way user code does: get, then set."""

        def predict(self, tasks, context=None, **kwargs):
            if tasks and tasks[0]["data"].get("sleep"):
                time.sleep(tasks[0]["data"]["sleep"])
            return [{"result": [], "score": 0.0, "n": self.get("n") or 0, "value": self.get("value")} for _ in tasks]

        def fit(self, event, data, **kwargs):
            if event == "PROJECT_UPDATED":
                self.set("value", data["value"])  # a plain write
                return {"value": data["value"]}
            n = self.get("n") or 0                  # read-modify-write with plain get/set
            time.sleep(0.01)
            self.set("n", n + 1)
            return {"n": n + 1}
''')


@pytest.fixture
def counter_dir(tmp_path):
    (tmp_path / "model.py").write_text(COUNTER_MODEL)
    return tmp_path


def test_every_endpoint_through_gunicorn(counter_dir):
    with Server(counter_dir, "--workers", "2", "--threads", "4") as server:
        health = server.get("/health").json()
        assert health["status"] == "UP" and health["model_class"] == "Counter"
        assert server.get("/").status_code == 200
        assert server.post("/setup", json={"project": "1.1", "schema": TEXT_CONFIG}).json() == {"model_version": "0.0.1"}
        results = server.post("/predict", json=predict_body([text_task(1, "a"), text_task(2, "b")])).json()["results"]
        assert len(results) == 2 and results[0]["model_version"] == "0.0.1"
        chunks = iter([b'{"tasks": [{"id": 1, "data": {"text": "a"}}', b"]}"])  # no Content-Length: chunked
        chunked = server.post("/predict", data=chunks, headers={"Content-Type": "application/json"})
        assert chunked.status_code == 200 and len(chunked.json()["results"]) == 1
        # 201 when fit finished within FIT_WAIT_SECONDS, 202 when it goes on (a loaded machine)
        assert server.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).status_code in (201, 202)
        assert server.post("/train", json={"annotations": [], "project": "1.1"}).status_code in (201, 202)
        assert server.get("/versions?project=1").json()["versions"] == ["0.0.1"]
        for _ in range(4):  # whichever of the two workers answers, it reports the whole server
            metrics = server.get("/metrics").text
            assert 'lsdeploy_requests_total{endpoint="/predict",method="POST",status="200"} 2\n' in metrics
            assert 'lsdeploy_request_duration_seconds_count{endpoint="/setup"} 1\n' in metrics
        bad = server.post("/predict", data="{", headers={"Content-Type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"].startswith("request body is not valid JSON")
        assert server.get("/missing").headers["Content-Type"].startswith("application/json")
    log = server.log()
    assert "POST /predict 200" in log and "GET /health 200" in log
    assert log.count("[lsdeploy.serve] serving Counter") == 1  # a worker never repeats what the master logged


def test_state_is_consistent_across_four_workers(counter_dir):
    """No stale read after another worker's write, no lost update under concurrent writes."""
    with Server(counter_dir, "--workers", "4", "--threads", "4") as server:
        session = requests.Session()
        for i in range(20):  # each write is visible to whichever worker answers next
            body = {"action": "PROJECT_UPDATED", "project": {"id": 1}, "value": i}
            assert server.post("/webhook", json=body).status_code in (201, 202)
            wait_for(lambda: session.post(server.url + "/predict", json=predict_body([text_task(1, "x")], project="1.1"))
                     .json()["results"][0]["value"] == i, timeout=30, message=f"write {i} applied")
            for _ in range(4):
                got = session.post(server.url + "/predict", json=predict_body([text_task(1, "x")], project="1.1")).json()
                assert got["results"][0]["value"] == i

        def fire(_):
            return server.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 2}}).status_code

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            statuses = list(pool.map(fire, range(10)))
        assert all(s in (201, 202) for s in statuses)

        def count():
            return server.post("/predict", json=predict_body([text_task(1, "x")], project="2.1")).json()["results"][0]["n"]

        wait_for(lambda: count() == 10, timeout=30, message="10 increments")
        time.sleep(0.5)
        assert count() == 10


def test_sigterm_finishes_in_flight_requests(counter_dir):
    server = Server(counter_dir, "--workers", "1", "--threads", "4").start()
    try:
        result = {}

        def slow():
            body = predict_body([{"id": 1, "data": {"sleep": 2}}], project="1.1")
            result["resp"] = requests.post(server.url + "/predict", json=body, timeout=30)

        thread = threading.Thread(target=slow)
        thread.start()
        time.sleep(0.7)
        server.proc.send_signal(signal.SIGTERM)
        thread.join(30)
        assert result["resp"].status_code == 200
        assert server.proc.wait(15) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(server.url + "/health", timeout=2)
    finally:
        server.stop()


def test_sigterm_finishes_queued_training(tmp_path):
    (tmp_path / "model.py").write_text(textwrap.dedent('''
        import time
        from lsdeploy.model import LabelStudioMLBase

        class Slow(LabelStudioMLBase):
            def fit(self, event, data, **kwargs):
                time.sleep(1.5)
                self.update("done", lambda v: (v or 0) + 1)
    '''))
    with Server(tmp_path) as server:
        assert server.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).status_code == 202
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0
    from lsdeploy.state import SQLiteStore

    assert SQLiteStore(str(tmp_path / ".lsdeploy")).get("1", "done") == 1


def test_basic_auth_through_gunicorn(counter_dir):
    env = {"BASIC_AUTH_USER": "labelstudio", "BASIC_AUTH_PASS": "pa55-word"}
    with Server(counter_dir, env=env) as server:
        assert server.get("/health").status_code == 200
        assert server.post("/predict", json=predict_body([])).status_code == 401
        assert server.post("/predict", json=predict_body([]), auth=("labelstudio", "pa55-word")).status_code == 200
    assert "pa55-word" not in server.log()


@pytest.mark.parametrize("store", ["sqlite", "gcs"])
def test_sigterm_under_load_loses_no_acknowledged_write(counter_dir, tmp_path, request, store):
    """SIGTERM while /predict and webhooks are in flight: the server exits within Cloud Run's
    10 s, every request it accepted is answered, and every acknowledged fit is in the store
    (local SQLite, or Cloud Storage on the fake-gcs-server emulator)."""
    env = {}
    if store == "gcs":
        import uuid

        emulator = request.getfixturevalue("gcs_emulator")
        bucket = f"sigterm-{uuid.uuid4().hex[:12]}"
        emulator.create_bucket(bucket)
        env = {"MODEL_STATE_URI": f"gs://{bucket}/state", **emulator.env}
    server = Server(counter_dir, "--workers", "2", "--threads", "4", env=env).start(timeout=90)
    acknowledged, answered, stop = [], [], threading.Event()

    def webhooks():
        while not stop.is_set():
            try:
                resp = requests.post(server.url + "/webhook", json={"action": "START_TRAINING", "project": {"id": 3}},
                                     timeout=30)
            except requests.ConnectionError:
                return  # the server stopped accepting: fine
            answered.append(resp.status_code)
            if resp.status_code in (201, 202):
                acknowledged.append(1)

    def predicts():
        while not stop.is_set():
            try:
                resp = requests.post(server.url + "/predict", json=predict_body([text_task(1, "x")], project="3.1"),
                                     timeout=30)
            except requests.ConnectionError:
                return
            answered.append(resp.status_code)

    threads = [threading.Thread(target=webhooks) for _ in range(3)] + [threading.Thread(target=predicts) for _ in range(3)]
    [t.start() for t in threads]
    wait_for(lambda: len(acknowledged) >= 10, timeout=60, message="some acknowledged webhooks")
    began = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0
    took = time.monotonic() - began
    stop.set()
    [t.join(30) for t in threads]
    server.stop()
    assert took < 10, f"shutdown took {took:.1f}s"
    assert set(answered) <= {200, 201, 202}, set(answered)
    if store == "gcs":
        from lsdeploy.state import GCSStore

        reader = GCSStore.from_uri(env["MODEL_STATE_URI"], environ={**emulator.env, "MODEL_DIR": str(tmp_path / "reader")})
        try:
            assert reader.get("3", "n") == len(acknowledged)
        finally:
            reader.close()
    else:
        from lsdeploy.state import SQLiteStore

        assert SQLiteStore(str(counter_dir / ".lsdeploy")).get("3", "n") == len(acknowledged)


def test_batches_and_bodies_are_bounded_by_default(counter_dir):
    """A batch of MAX_TASKS tasks (Label Studio sends every task lacking a prediction in one
    call) is answered in full; one task more, a body over MAX_REQUEST_BYTES (announced or
    chunked) is a JSON 413 naming the setting, and the worker lives on."""
    import http.client

    with Server(counter_dir) as server:
        tasks = [text_task(i, f"task number {i}") for i in range(10_000)]
        resp = server.post("/predict", json=predict_body(tasks), timeout=120)
        assert resp.status_code == 200 and len(resp.json()["results"]) == 10_000
        resp = server.post("/predict", json=predict_body(tasks + [text_task(10_000, "one more")]), timeout=120)
        assert resp.status_code == 413 and "MAX_TASKS (10000)" in resp.json()["error"]
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)  # announced, never sent
        conn.putrequest("POST", "/predict")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(16 * 1024 * 1024 + 1))
        conn.endheaders()
        answer = conn.getresponse()
        assert answer.status == 413
        assert b"larger than 16777216 bytes (MAX_REQUEST_BYTES)" in answer.read()
        conn.close()

        def chunks():  # about 17 MB without Content-Length
            yield b'{"tasks": [{"id": 1, "data": {"text": "'
            for _ in range(17):
                yield b"x" * 1_000_000
            yield b'"}}]}'

        resp = server.post("/predict", data=chunks(), headers={"Content-Type": "application/json"}, timeout=120)
        assert resp.status_code == 413
        assert resp.json()["error"] == "request body is larger than 16777216 bytes (MAX_REQUEST_BYTES)"
        assert server.get("/health").status_code == 200


def test_hostile_batch_leaves_worker_memory_bounded(counter_dir):
    """15 MB of empty tasks ({"tasks": [{}, {}, ...]}, 5,000,000 of them) once made a worker grow
    by 1.5 GB building as many predictions. Now it is refused after parsing (which costs at most
    about 25 times the body) and the memory is given back."""
    with Server(counter_dir, "--threads", "2") as server:
        pid = worker_pid(server)
        assert server.post("/predict", json=predict_body([text_task(1, "warm up")])).status_code == 200
        before = memory_kb(pid)
        body = b'{"tasks": [' + b",".join([b"{}"] * 5_000_000) + b"]}"
        resp = server.post("/predict", data=body, headers={"Content-Type": "application/json"}, timeout=120)
        assert resp.status_code == 413 and "MAX_TASKS" in resp.json()["error"]
        after = memory_kb(pid)
        peak_growth_mb = (after["VmHWM"] - before["VmHWM"]) / 1024
        assert peak_growth_mb < 40 * len(body) / 1e6, f"worker peak grew {peak_growth_mb:.0f} MB"
        assert (after["VmRSS"] - before["VmRSS"]) / 1024 < 100, (before, after)
        assert server.get("/health").status_code == 200


def test_trickling_clients_are_cut_off_and_others_are_served(counter_dir):
    """Clients that trickle their request (a byte now and then keeps every per-read timeout
    happy) lose their connection once CLIENT_TIMEOUT has passed since the request began, even
    when they hold every thread of the worker: one trickling its headers is disconnected, one
    trickling its body is answered 408. Meanwhile a well-behaved client is answered."""
    import socket

    with Server(counter_dir, "--threads", "2", env={"CLIENT_TIMEOUT": "1.5"}) as server:
        heads = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        in_headers = socket.create_connection(("127.0.0.1", server.port))
        in_headers.sendall(heads)
        in_body = socket.create_connection(("127.0.0.1", server.port))
        in_body.sendall(heads + b"Content-Length: 100000\r\n\r\n{")
        began = time.monotonic()
        stop = threading.Event()

        def trickle():
            while not stop.is_set():
                for sock in (in_headers, in_body):
                    try:
                        sock.sendall(b"X" if sock is in_headers else b" ")
                    except OSError:
                        pass
                stop.wait(0.2)

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            resp = server.post("/predict", json=predict_body([text_task(1, "x")]), timeout=30)
            assert resp.status_code == 200
            answers = {}
            for name, sock in (("headers", in_headers), ("body", in_body)):
                sock.settimeout(30)
                data = b""
                try:
                    while True:
                        piece = sock.recv(65536)
                        if not piece:
                            break
                        data += piece
                except ConnectionResetError:
                    pass
                answers[name] = (data, time.monotonic() - began)
        finally:
            stop.set()
            thread.join(5)
            in_headers.close()
            in_body.close()
        assert answers["headers"][0] == b"", answers["headers"]
        assert answers["body"][0].startswith(b"HTTP/1.1 408"), answers["body"]
        assert b"CLIENT_TIMEOUT" in answers["body"][0]
        for data, took in answers.values():
            assert 1.4 < took < 10, took
    assert "Traceback" not in server.log()
