"""/metrics: the registry's shared file format, and one server's numbers across gunicorn workers."""
import concurrent.futures
import glob
import json
import os
import re
import signal
import struct
import tempfile
import textwrap

import pytest
import requests

from lsdeploy.metrics import Metrics, entries
from support import Server, predict_body, text_task, wait_for

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse(text):
    """Prometheus text format 0.0.4, strictly: HELP and TYPE once per metric and before its
    samples; every sample line well formed; a histogram's buckets cumulative, ending at +Inf
    with its count. Returns {(sample name, labels as a sorted tuple): value}."""
    assert text.endswith("\n")
    helps, types, samples, current = set(), {}, {}, None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helps, f"HELP {name} twice"
            helps.add(name)
            current = name
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in types and name == current, f"TYPE {name} misplaced"
            assert kind in ("counter", "gauge", "histogram", "untyped")
            types[name] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"bad sample line {line!r}"
            name, labels, value = match.group(1), match.group(2) or "", match.group(3)
            base = re.sub(r"_(bucket|count|sum)$", "", name) if types.get(current) == "histogram" else name
            assert base == current, f"{name} outside its metric {current}"
            key = (name, tuple(sorted(LABEL.findall(labels))))
            assert key not in samples, f"{line!r} twice"
            samples[key] = float(value)
    for name, kind in types.items():
        if kind != "histogram":
            continue
        series = {}
        for (sample, labels), value in samples.items():
            if sample == name + "_bucket":
                rest = tuple(pair for pair in labels if pair[0] != "le")
                le = dict(labels)["le"]
                series.setdefault(rest, []).append((float("inf") if le == "+Inf" else float(le), value))
        for rest, buckets in series.items():
            counts = [v for _, v in sorted(buckets)]
            assert counts == sorted(counts), f"{name}{rest} buckets not cumulative"
            assert sorted(buckets)[-1][0] == float("inf")
            assert counts[-1] == samples[(name + "_count", rest)]
    return samples


def described(directory=None):
    metrics = Metrics(directory)
    metrics.describe("t_requests_total", "counter", "requests")
    metrics.describe("t_duration_seconds", "histogram", "latency")
    metrics.describe("t_depth", "gauge", "queue depth")
    metrics.describe("t_info", "gauge", "info")
    return metrics


def test_in_process_registry_renders_valid_text():
    metrics = described()
    metrics.constant("t_info", 1, version="1.2")
    for latency in (0.001, 0.02, 0.02, 7.0, 1000.0):
        metrics.record([("t_requests_total", (("endpoint", "/p"), ("status", 200)))],
                       ("t_duration_seconds", (("endpoint", "/p"),)), latency)
    metrics.inc("t_requests_total", 2, endpoint="/q", status=500)
    metrics.set("t_depth", 3)
    metrics.set("t_depth", 2)
    assert metrics.path is None
    samples = parse(metrics.render())
    assert samples[("t_requests_total", (("endpoint", "/p"), ("status", "200")))] == 5
    assert samples[("t_requests_total", (("endpoint", "/q"), ("status", "500")))] == 2
    assert samples[("t_depth", ())] == 2
    assert samples[("t_info", (("version", "1.2"),))] == 1
    bucket = lambda le: samples[("t_duration_seconds_bucket", (("endpoint", "/p"), ("le", le)))]  # noqa: E731
    assert (bucket("0.005"), bucket("0.025"), bucket("5"), bucket("10"), bucket("100"), bucket("+Inf")) == (1, 3, 3, 4, 4, 5)
    assert samples[("t_duration_seconds_sum", (("endpoint", "/p"),))] == pytest.approx(1007.041)


def test_two_registries_in_one_directory_are_summed(tmp_path):
    a, b = described(str(tmp_path)), described(str(tmp_path))
    tricky = 'a "quoted" \\ back\nslash, {brace}=ü'
    for metrics, n in ((a, 3), (b, 4)):
        for _ in range(n):
            metrics.record([("t_requests_total", (("endpoint", tricky),))], ("t_duration_seconds", ()), 0.2)
        metrics.set("t_depth", n)
    b.inc("t_requests_total", 1000000007, endpoint="/big")
    assert a.path != b.path and sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in (a.path, b.path))
    for metrics in (a, b):  # any process's scrape sees the whole server
        text = metrics.render()
        samples = parse(text)
        assert samples[("t_requests_total", (("endpoint", 'a \\"quoted\\" \\\\ back\\nslash, {brace}=ü'),))] == 7
        assert 't_requests_total{endpoint="a \\"quoted\\" \\\\ back\\nslash, {brace}=ü"} 7\n' in text
        assert "t_requests_total{endpoint=\"/big\"} 1000000007\n" in text  # no 1e+09 rounding
        assert samples[("t_duration_seconds_count", ())] == 7
        assert samples[("t_duration_seconds_bucket", (("le", "0.1"),))] == 0
        assert samples[("t_duration_seconds_bucket", (("le", "0.25"),))] == 7
        assert samples[("t_duration_seconds_sum", ())] == pytest.approx(1.4)
        assert samples[("t_depth", ())] == 7  # both files belong to a live process
        assert text.count("# TYPE t_requests_total counter") == 1


def test_file_format(tmp_path):
    metrics = described(str(tmp_path))
    metrics.inc("t_requests_total", endpoint='x"y')
    metrics.observe("t_duration_seconds", 0.03, endpoint="/p")
    data = open(metrics.path, "rb").read()
    used = struct.unpack_from("Q", data, 0)[0]
    assert 8 < used <= len(data) and used % 8 == 0
    klen, count = struct.unpack_from("II", data, 8)
    key = data[16:16 + klen]
    assert json.loads(key) == ["c", "t_requests_total", [["endpoint", 'x"y']]] and count == 1
    found = list(entries(data))
    assert [json.loads(k)[0] for k, _ in found] == ["c", "h"]
    assert found[0][1] == (1.0,)
    hist = found[1][1]
    assert len(hist) == 15 and hist[3] == 1 and sum(hist[:14]) == 1 and hist[14] == pytest.approx(0.03)
    # a reader stops at the published length: an entry being appended is invisible
    torn = bytearray(data)
    struct.pack_into("Q", torn, 0, used - 8)
    assert [json.loads(k)[0] for k, _ in entries(bytes(torn))] == ["c"]
    assert list(entries(b"")) == [] and list(entries(b"\0" * 8)) == []


def test_growth_keeps_every_value(tmp_path):
    metrics = described(str(tmp_path))
    for i in range(2000):  # far past the first mapping's size
        metrics.inc("t_requests_total", i + 1, endpoint=f"/e{i}")
    assert os.path.getsize(metrics.path) > 16 * 1024
    samples = parse(metrics.render())
    assert all(samples[("t_requests_total", (("endpoint", f"/e{i}"),))] == i + 1 for i in range(2000))


def test_forked_child_writes_its_own_file_and_dead_gauges_drop(tmp_path):
    metrics = described(str(tmp_path))
    metrics.inc("t_requests_total", endpoint="/p")
    metrics.set("t_depth", 1)
    pid = os.fork()
    if pid == 0:  # the child: what a gunicorn worker does after fork
        code = 1
        try:
            metrics.inc("t_requests_total", 10, endpoint="/p")
            metrics.set("t_depth", 5)
            code = 0 if metrics.path.startswith(os.path.join(str(tmp_path), f"{os.getpid()}-")) else 2
        finally:
            os._exit(code)
    child_file = None
    try:
        wait_for(lambda: len(os.listdir(tmp_path)) == 2, timeout=30, message="the child's file")
        child_file = next(n for n in os.listdir(tmp_path) if n.startswith(f"{pid}-"))
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    samples = parse(metrics.render())
    assert samples[("t_requests_total", (("endpoint", "/p"),))] == 11  # the dead child's counts stay
    assert samples[("t_depth", ())] == 1  # its gauge does not
    metrics.retire(pid)  # what the gunicorn master does when a worker exits
    assert child_file not in os.listdir(tmp_path) and any(n.startswith(f"dead-{pid}-") for n in os.listdir(tmp_path))
    samples = parse(metrics.render())
    assert samples[("t_requests_total", (("endpoint", "/p"),))] == 11 and samples[("t_depth", ())] == 1


def test_create_app_without_directory_keeps_metrics_in_process(model_dir, monkeypatch):
    from lsdeploy import LabelStudioMLBase, create_app

    class Nothing(LabelStudioMLBase):
        def predict(self, tasks, context=None, **kwargs):
            return []

    monkeypatch.delenv("LSDEPLOY_METRICS_DIR", raising=False)
    client = create_app(Nothing).test_client()
    client.post("/predict", json=predict_body([]))
    samples = parse(client.get("/metrics").get_data(as_text=True))
    assert samples[("lsdeploy_requests_total", (("endpoint", "/predict"), ("method", "POST"), ("status", "200")))] == 1
    assert client.application.extensions["lsdeploy"]["metrics"].path is None
    info = [k for k in samples if k[0] == "lsdeploy_info"]
    assert len(info) == 1 and dict(info[0][1])["model_class"] == "Nothing"


# -- through a real server ----------------------------------------------------------------------
MODEL = textwrap.dedent('''
    from lsdeploy.model import LabelStudioMLBase

    class Plain(LabelStudioMLBase):
        def predict(self, tasks, context=None, **kwargs):
            return [{"result": [], "score": 0.5} for _ in tasks]
''')
PREDICT = ("lsdeploy_requests_total", (("endpoint", "/predict"), ("method", "POST"), ("status", "200")))
METRICS = ("lsdeploy_requests_total", (("endpoint", "/metrics"), ("method", "GET"), ("status", "200")))


def metrics_dirs(master_pid):
    bases = {"/dev/shm", tempfile.gettempdir()}
    return [d for base in bases for d in glob.glob(os.path.join(base, f"lsdeploy-metrics-{master_pid}-*"))]


def worker_pids(master_pid):
    pids = []
    for task in os.listdir(f"/proc/{master_pid}/task"):
        pids += [int(p) for p in open(f"/proc/{master_pid}/task/{task}/children").read().split()]
    return sorted(pids)


def per_worker(directory, key):
    """{file name: value of `key`} read straight from each worker's file."""
    out = {}
    for name in os.listdir(directory):
        for raw, values in entries(open(os.path.join(directory, name), "rb").read()):
            kind, metric, labels = json.loads(raw)
            if (metric, tuple((k, str(v)) for k, v in labels)) == key:
                out[name] = values[0]
    return out


def scrape(server):
    resp = requests.get(server.url + "/metrics", timeout=30)  # a new connection: any worker may answer
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    return parse(resp.text)


@pytest.fixture
def plain_dir(tmp_path):
    (tmp_path / "model.py").write_text(MODEL)
    return tmp_path


def test_metrics_count_every_request_of_every_worker(plain_dir):
    with Server(plain_dir, "--workers", "2", "--threads", "2") as server:
        (directory,) = metrics_dirs(server.proc.pid)
        sent = 0

        def predict_until_both_workers_served():
            nonlocal sent
            for _ in range(5):
                body = predict_body([text_task(1, "a"), text_task(2, "b")])
                assert requests.post(server.url + "/predict", json=body, timeout=30).status_code == 200
                sent += 1
            return len(per_worker(directory, PREDICT)) == 2

        wait_for(predict_until_both_workers_served, timeout=120, interval=0, message="both workers serving /predict")
        assert sum(per_worker(directory, PREDICT).values()) == sent

        def scrape_until_both_workers_answered():
            samples = scrape(server)  # right after the requests: counted whichever worker answers
            assert samples[PREDICT] == sent
            assert samples[("lsdeploy_request_duration_seconds_count", (("endpoint", "/predict"),))] == sent
            assert samples[("lsdeploy_predictions_total", ())] == 2 * sent
            assert samples.get(("lsdeploy_fit_queue_depth", ()), 0) == 0
            assert len([k for k in samples if k[0] == "lsdeploy_info"]) == 1
            return len(per_worker(directory, METRICS)) == 2

        wait_for(scrape_until_both_workers_answered, timeout=120, interval=0, message="scrapes answered by both workers")
        # one more request, then a scrape: counted at once
        assert requests.post(server.url + "/predict", json=predict_body([text_task(3, "c")]), timeout=30).status_code == 200
        assert scrape(server)[PREDICT] == sent + 1

        def burst(_):  # concurrent requests on every thread of both workers, scrapes among them
            if _ % 10 == 0:
                return scrape(server)[PREDICT] >= sent + 1
            body = predict_body([text_task(1, "a")])
            return requests.post(server.url + "/predict", json=body, timeout=30).status_code == 200

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert all(pool.map(burst, range(200)))
        samples = scrape(server)
        assert samples[PREDICT] == sent + 1 + 180
        assert samples[("lsdeploy_request_duration_seconds_count", (("endpoint", "/predict"),))] == sent + 1 + 180
    assert metrics_dirs(server.proc.pid) == []  # the master removed its directory


def test_killed_worker_does_not_make_counters_go_backwards(plain_dir):
    with Server(plain_dir, "--workers", "2", "--threads", "2") as server:
        (directory,) = metrics_dirs(server.proc.pid)
        sent = 0
        while len(per_worker(directory, PREDICT)) < 2:
            assert requests.post(server.url + "/predict", json=predict_body([text_task(1, "a")]), timeout=30).status_code == 200
            sent += 1
            assert sent < 2000, "one worker got every request"
        before = worker_pids(server.proc.pid)
        assert len(before) == 2
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(worker_pids(server.proc.pid)) == 2 and victim not in worker_pids(server.proc.pid),
                 timeout=60, message="gunicorn replacing the killed worker")
        wait_for(lambda: any(n.startswith(f"dead-{victim}-") for n in os.listdir(directory)), timeout=30,
                 message="the master retiring the killed worker's file")
        for _ in range(6):
            assert scrape(server)[PREDICT] == sent
        for _ in range(4):
            assert requests.post(server.url + "/predict", json=predict_body([text_task(1, "a")]), timeout=30).status_code == 200
        assert scrape(server)[PREDICT] == sent + 4


def test_unusable_directory_never_fails_a_request(tmp_path):
    directory = tmp_path / "gone"
    directory.mkdir()
    metrics = described(str(directory))
    metrics.inc("t_requests_total", endpoint="/p")
    for name in os.listdir(directory):  # a temp cleaner removes the files and the directory
        os.unlink(directory / name)
    directory.rmdir()
    other = described(str(directory))  # a process that starts after that
    other.inc("t_requests_total", endpoint="/p")
    other.record([("t_requests_total", (("endpoint", "/p"),))], ("t_duration_seconds", ()), 0.1)
    assert other.path is None
    samples = parse(other.render())
    assert samples[("t_requests_total", (("endpoint", "/p"),))] == 2
    assert samples[("t_duration_seconds_count", ())] == 1
    metrics.inc("t_requests_total", endpoint="/p")  # the first one still writes into its mapping


def test_metrics_directory_is_locked_and_leftovers_are_removed(tmp_path):
    import fcntl
    import subprocess
    import sys

    from lsdeploy.serve import metrics_directory

    stale = tmp_path / "lsdeploy-metrics-1-stale"  # left by a server killed outright
    stale.mkdir()
    (stale / ".lock").touch()
    (stale / "5-0.db").write_bytes(b"\0" * 8)
    held = tmp_path / "lsdeploy-metrics-2-held"  # a live server's, in another process
    held.mkdir()
    (held / ".lock").touch()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f'''
        import fcntl, os, sys
        fd = os.open({str(held / ".lock")!r}, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        sys.stdin.read()
    ''')], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        other = tmp_path / "unrelated"
        other.mkdir()
        directory = metrics_directory(str(tmp_path))
        assert directory is not None and os.path.basename(directory).startswith(f"lsdeploy-metrics-{os.getpid()}-")
        assert not stale.exists() and held.exists() and other.exists()
        fd = os.open(os.path.join(directory, ".lock"), os.O_RDONLY)
        try:  # this process holds its own directory's lock (another open file cannot take it)
            with pytest.raises(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert metrics_directory(str(tmp_path / "missing")) is None
