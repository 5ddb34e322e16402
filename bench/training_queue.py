"""Webhook throughput and /predict latency with the durable training queue against the in-memory
queue it replaced, side by side.

    python bench/training_queue.py [--baseline 33d35a4] [--candidate REV] [--rounds 5] [--webhooks 200]
                          [--clients 4] [--serial 40] [--fit-ms 20] [--workers 2] [--threads 8]
                          [--quick]

The baseline (default 33d35a4, the last commit whose workers kept webhook events in memory) is
taken from git with `git archive` into a temporary directory; the candidate is a copy of the
working tree's lsdeploy/ made at start (or --candidate REV, taken like the baseline). Both are
served by a real `label-studio-ml start` (`python -m lsdeploy.cli start`) from this same Python,
each with its own source tree first on PYTHONPATH and its own MODEL_DIR (SQLite), on 127.0.0.1,
--workers 2, FIT_WAIT_SECONDS=0. The backend, written to a temporary directory, has a trivial
predict() and a fit() that sleeps --fit-ms. The model file records which lsdeploy the process
loading it imported, and GET /jobs/<id> on a webhook's job tells the two queues apart (the
in-memory queue has no such route): both are checked and printed before anything is measured.

Each round measures baseline and candidate one after the other (the order alternates between
rounds, so machine noise and drift hit both alike), on the servers started once:

- /predict latency while idle: --predict-clients clients, one request each every
  --predict-pause seconds, for --idle seconds, nothing training;
- webhooks: --webhooks ANNOTATION_CREATED webhooks (one project) sent by --clients keep-alive
  client threads as fast as they are answered: throughput (webhooks / time until the last is
  answered), answer latency, and the time until every fit is done (lsdeploy_fit_total on
  /metrics reaching the count, polled every 20 ms); the same /predict clients run throughout:
  their latency while the webhooks stream in, and while the queue drains afterwards;
- one client sending --serial webhooks one after another (no /predict clients; their fits run
  meanwhile, as they would): the answer latency of a single webhook, which is where storing an
  event shows. Then the fits are waited for.

Before the rounds, --warmup webhooks (120) per server: every worker has built its model, and the
durable queue's history of the project holds the 100 finished jobs it keeps, as in service (the
index of pending events is one value rewritten by every enqueue, claim and finish; the history
is rewritten once per finished event).

Prints one table per metric (baseline, candidate and candidate / baseline per round, then the
median ratio and a verdict), the cost of persisting one event (candidate's answer latency minus
the baseline's) next to the configured fit time, and the wall time. Exits non-zero only on
errors: a server that does not start or imports the wrong lsdeploy, a webhook or /predict not
answered 2xx, a fit that failed or never ran; never because of a ratio. `--quick` is a short
smoke run (1 round, 40 webhooks).
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASELINE = "33d35a4"

TEXT_CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text" choice="single">
    <Choice value="Positive"/>
    <Choice value="Negative"/>
  </Choices>
</View>"""

MODEL = textwrap.dedent('''
    import os
    import time

    import lsdeploy
    from lsdeploy.model import LabelStudioMLBase

    # Which lsdeploy this server process imported: bench/training_queue.py checks it is the tree it meant.
    with open(os.environ["BENCH_ORIGIN_FILE"], "a") as _origin:
        _origin.write(f"{os.getpid()} {os.path.dirname(os.path.abspath(lsdeploy.__file__))}\\n")

    FIT_SECONDS = float(os.environ.get("BENCH_FIT_SECONDS", "0.02"))


    class QueueBench(LabelStudioMLBase):
        """A trivial predict(); a fit() that takes BENCH_FIT_SECONDS."""

        def predict(self, tasks, context=None, **kwargs):
            return [{"result": [], "score": 0.0} for _ in tasks]

        def fit(self, event, data, **kwargs):
            time.sleep(FIT_SECONDS)
            return {"fitted": event}
''')


# -- payloads (the shapes Label Studio sends) ---------------------------------------------------
def text_task(task_id: int, text: str, project: int = 1) -> dict:
    return {"id": task_id, "data": {"text": text}, "meta": {}, "annotations": [], "predictions": [],
            "project": project, "created_at": "2026-11-27T00:00:00Z", "updated_at": "2026-11-27T00:00:00Z"}


def annotation_event(task_id: int, annotation_id: int, project: int = 1) -> bytes:
    label = "Positive" if annotation_id % 2 else "Negative"
    return json.dumps({
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": annotation_id, "task": task_id, "was_cancelled": False, "ground_truth": False,
                       "result": [{"id": f"r{annotation_id}", "from_name": "sentiment", "to_name": "text",
                                   "type": "choices", "value": {"choices": [label]}, "origin": "manual"}]},
        "task": text_task(task_id, f"sample text number {task_id}", project),
        "project": {"id": project, "title": "bench", "label_config": TEXT_CONFIG},
    }).encode()


PREDICT_BODY = json.dumps({"tasks": [text_task(1, "sample text")], "project": "1.1700000000",
                           "label_config": TEXT_CONFIG,
                           "params": {"login": None, "password": None, "context": None}}).encode()
JSON = {"Content-Type": "application/json"}


# -- source trees -------------------------------------------------------------------------------
def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def source_tree(rev, work: Path, name: str) -> tuple[Path, str]:
    """(directory to put first on PYTHONPATH, description): a copy of the working tree's
    lsdeploy/ for rev None, otherwise lsdeploy/ of that commit extracted from `git archive`."""
    if rev is None:  # a copy: the run measures one tree even if the files change meanwhile
        head = git("rev-parse", "--short", "HEAD")
        dirty = (git("diff", "--name-only", "HEAD", "--", "lsdeploy").split()
                 + git("ls-files", "--others", "--exclude-standard", "--", "lsdeploy").split())
        dest = work / f"src-{name}-worktree"
        shutil.copytree(ROOT / "lsdeploy", dest / "lsdeploy", ignore=shutil.ignore_patterns("__pycache__"))
        changed = f", uncommitted: {', '.join(dirty)}" if dirty else ""
        return dest, f"working tree, copied at start (HEAD {head}{changed})"
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", sha, "lsdeploy"],
                             capture_output=True)
    if archive.returncode:
        raise SystemExit(f"git archive {sha} lsdeploy: {archive.stderr.decode(errors='replace').strip()}")
    archive = archive.stdout
    dest = work / f"src-{name}-{sha[:12]}"
    dest.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest)
    if not (dest / "lsdeploy" / "__init__.py").is_file():
        raise SystemExit(f"{rev} has no lsdeploy package")
    subject = git("log", "-1", "--format=%s", sha)
    return dest, f"{sha[:7]} ({subject[:60]}{'...' if len(subject) > 60 else ''})"


# -- servers --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m lsdeploy.cli start` with `source` first on PYTHONPATH, in its own session (so the
    gunicorn master and its workers can be stopped as one group)."""

    def __init__(self, name: str, source: Path, backend: Path, work: Path, args):
        self.name = name
        self.source = source
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.origin_file = work / f"origin-{name}.txt"
        self.log_path = work / f"server-{name}.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "WARNING", "MODEL_STATE_URI": "",
                    "MODEL_DIR": str(work / f"state-{name}"), "FIT_WAIT_SECONDS": "0",
                    "BENCH_FIT_SECONDS": str(args.fit_ms / 1000), "BENCH_ORIGIN_FILE": str(self.origin_file),
                    "PYTHONPATH": os.pathsep.join([str(source)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        self.argv = [args.python, "-m", "lsdeploy.cli", "start", str(backend), "--port", str(self.port),
                     "--host", "127.0.0.1", "--workers", str(args.workers), "--threads", str(args.threads)]
        self.cwd = work  # not bench/: `-m` puts the working directory first on sys.path
        self.proc = None
        self._log = None

    def start(self, timeout: float = 90.0) -> "Server":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise SystemExit(f"{self.name} server not healthy after {timeout:g} s:\n{self.log()}")

    def log(self) -> str:
        if self._log and not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to the master (it stops its workers), SIGKILL to the whole group after 20 s,
        and to whatever of the group is left either way."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session this script created for it
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if self._log:
            self._log.close()

    def fits(self) -> tuple[float, float, float]:
        """(ok, error, queue depth) from /metrics: lsdeploy_fit_total summed over events, and
        lsdeploy_fit_queue_depth (0 when absent)."""
        text = requests.get(self.url + "/metrics", timeout=30).text
        ok = failed = depth = 0.0
        for line in text.splitlines():
            name = re.split(r"[ {]", line, maxsplit=1)[0]
            if name == "lsdeploy_fit_total":
                value = float(line.rsplit(" ", 1)[1])
                if 'status="ok"' in line:
                    ok += value
                else:
                    failed += value
            elif name == "lsdeploy_fit_queue_depth":
                depth += float(line.rsplit(" ", 1)[1])
        return ok, failed, depth

    def wait_fits(self, count: float, timeout: float, interval: float = 0.02) -> float:
        """Until lsdeploy_fit_total (ok) reaches `count`; the time it did (perf_counter). A failed
        fit or the deadline ends the run."""
        deadline = time.perf_counter() + timeout
        while True:
            ok, failed, _ = self.fits()
            now = time.perf_counter()
            if failed:
                raise SystemExit(f"{self.name}: {failed:g} fit(s) failed:\n{self.log()}")
            if ok >= count:
                return now
            if now > deadline:
                raise SystemExit(f"{self.name}: {ok:g} of {count:g} fits done after {timeout:g} s:\n{self.log()}")
            time.sleep(interval)

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until the training queue is empty (the durable queue's depth counts an event until its
        fit's finish is written, a moment after lsdeploy_fit_total counted it)."""
        deadline = time.monotonic() + timeout
        while self.fits()[2] > 0:
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: training queue not empty after {timeout:g} s")
            time.sleep(0.02)


# -- clients --------------------------------------------------------------------------------------
def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def post(conn_box: list, port: int, path: str, body: bytes):
    """(status or exception name, answer bytes) on a keep-alive connection, reopened after an error."""
    try:
        conn_box[0].request("POST", path, body=body, headers=JSON)
        response = conn_box[0].getresponse()
        return response.status, response.read()
    except OSError as exc:
        conn_box[0].close()
        conn_box[0] = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        return type(exc).__name__, b""


def ok(status) -> bool:
    return isinstance(status, int) and 200 <= status < 300


class PredictClients:
    """`clients` threads, each a /predict then a pause, until stopped: (start, latency, status)."""

    def __init__(self, port: int, clients: int, pause: float):
        self.port, self.clients, self.pause = port, clients, pause
        self.samples: list = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self):
        box = [http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)]
        while not self._stop.is_set():
            began = time.perf_counter()
            status, _ = post(box, self.port, "/predict", PREDICT_BODY)
            self.samples.append((began, time.perf_counter() - began, status))
            self._stop.wait(self.pause)
        box[0].close()

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join()


def send_webhooks(port: int, bodies: list, clients: int) -> list:
    """Every body POSTed to /webhook by `clients` keep-alive threads, each taking the next one
    as soon as its previous answer came: (latency, status, answer) per webhook."""
    results: list = []
    lock = threading.Lock()
    todo = iter(bodies)

    def client():
        box = [http.client.HTTPConnection("127.0.0.1", port, timeout=60)]
        while True:
            with lock:
                body = next(todo, None)
            if body is None:
                break
            began = time.perf_counter()
            status, answer = post(box, port, "/webhook", body)
            results.append((time.perf_counter() - began, status, answer))
        box[0].close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


class Sequence:
    """Unique task and annotation ids across rounds and servers."""

    def __init__(self):
        self.next = 1

    def bodies(self, count: int) -> list:
        first, self.next = self.next, self.next + count
        return [annotation_event(i, i) for i in range(first, first + count)]


# -- one measurement ------------------------------------------------------------------------------
def measure(server: Server, ids: Sequence, args, errors: list) -> dict:
    """One round on one server; the figures by metric key (ms, s or req/s)."""
    out = {}
    ms = lambda values, q: percentile(values, q) * 1000  # noqa: E731

    with PredictClients(server.port, args.predict_clients, args.predict_pause) as idle:
        time.sleep(args.idle)
    lat = [s[1] for s in idle.samples if ok(s[2])]
    errors.extend(f"{server.name}: /predict answered {s[2]}" for s in idle.samples if not ok(s[2]))
    out["predict_idle_p50"], out["predict_idle_p95"] = ms(lat, 0.5), ms(lat, 0.95)

    bodies = ids.bodies(args.webhooks)
    before = server.fits()[0]
    with PredictClients(server.port, args.predict_clients, args.predict_pause) as busy:
        began = time.perf_counter()
        results = send_webhooks(server.port, bodies, args.clients)
        answered = time.perf_counter()
        done = server.wait_fits(before + len(bodies), timeout=60 + 5 * len(bodies) * args.fit_ms / 1000)
    errors.extend(f"{server.name}: webhook answered {r[1]}: {r[2][:200]!r}" for r in results if not ok(r[1]))
    latencies = [r[0] for r in results]
    out["throughput"] = len(bodies) / (answered - began)
    out["answer_p50"], out["answer_p95"] = ms(latencies, 0.5), ms(latencies, 0.95)
    out["fits_done"] = done - began
    streaming = [s[1] for s in busy.samples if s[0] < answered and ok(s[2])]
    draining = [s[1] for s in busy.samples if s[0] >= answered and ok(s[2])]
    errors.extend(f"{server.name}: /predict answered {s[2]}" for s in busy.samples if not ok(s[2]))
    out["predict_busy_p50"], out["predict_busy_p95"] = ms(streaming, 0.5), ms(streaming, 0.95)
    out["predict_drain_p50"], out["predict_drain_p95"] = ms(draining, 0.5), ms(draining, 0.95)
    out["_samples"] = (len(lat), len(streaming), len(draining))
    server.wait_idle()

    bodies = ids.bodies(args.serial)
    before = server.fits()[0]
    results = send_webhooks(server.port, bodies, 1)
    errors.extend(f"{server.name}: webhook answered {r[1]}: {r[2][:200]!r}" for r in results if not ok(r[1]))
    out["serial_p50"] = ms([r[0] for r in results], 0.5)
    server.wait_fits(before + len(bodies), timeout=60 + 5 * len(bodies) * args.fit_ms / 1000)
    server.wait_idle()
    return out


def identify(server: Server) -> str:
    """Check the server imported lsdeploy from its own tree (every process that loaded the model)
    and tell its queue by behaviour; a line to print. Sends one webhook (a warm-up fit)."""
    answer = requests.post(server.url + "/webhook", data=annotation_event(999_999, 999_999), headers=JSON, timeout=30)
    if not ok(answer.status_code):
        raise SystemExit(f"{server.name}: webhook answered {answer.status_code}: {answer.text[:300]}")
    job = answer.json().get("job")
    jobs = requests.get(f"{server.url}/jobs/{job}", timeout=30).status_code
    queue = ("durable (GET /jobs/<id> answers 200)" if jobs == 200 else
             f"in memory (no GET /jobs/<id>: {jobs})" if jobs == 404 else f"unknown (GET /jobs/<id>: {jobs})")
    expected = str((server.source / "lsdeploy").resolve())
    lines = [line.split(" ", 1) for line in server.origin_file.read_text().splitlines() if line.strip()]
    wrong = [f"pid {pid}: {path}" for pid, path in lines if str(Path(path).resolve()) != expected]
    if not lines or wrong:
        raise SystemExit(f"{server.name} server does not run the lsdeploy of {server.source}: "
                         + ("; ".join(wrong) or "no process loaded the model"))
    pids = sorted({int(pid) for pid, _ in lines})
    workers = children(server.proc.pid)
    loaded = ("the gunicorn master, before forking its workers" if pids == [server.proc.pid]
              else "pid " + ", ".join(map(str, pids)))
    return f"lsdeploy from {expected} (loaded by {loaded}; {len(workers)} workers); queue {queue}"


def children(pid: int) -> list:
    """Child processes of `pid` (Linux /proc; empty elsewhere)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


# -- report ---------------------------------------------------------------------------------------
METRICS = [  # key, title, unit, better
    ("throughput", "webhook throughput, {clients} clients", "req/s", "higher"),
    ("answer_p50", "webhook answer latency p50, {clients} clients", "ms", "lower"),
    ("answer_p95", "webhook answer latency p95, {clients} clients", "ms", "lower"),
    ("serial_p50", "webhook answer latency p50, one client, one webhook at a time", "ms", "lower"),
    ("fits_done", "time until all {webhooks} fits are done (from the first webhook)", "s", "lower"),
    ("predict_idle_p50", "/predict latency p50, idle", "ms", "lower"),
    ("predict_idle_p95", "/predict latency p95, idle", "ms", "lower"),
    ("predict_busy_p50", "/predict latency p50 while the webhooks stream in", "ms", "lower"),
    ("predict_busy_p95", "/predict latency p95 while the webhooks stream in", "ms", "lower"),
    ("predict_drain_p50", "/predict latency p50 while the queue drains (webhooks answered, fits running)", "ms", "lower"),
    ("predict_drain_p95", "/predict latency p95 while the queue drains (webhooks answered, fits running)", "ms", "lower"),
]


def fmt(value: float) -> str:
    return f"{value:9.1f}" if abs(value) >= 10 else f"{value:9.2f}" if abs(value) >= 1 else f"{value:9.3f}"


def verdict(ratios: list, better: str) -> str:
    ratio = statistics.median(ratios)
    worse = sum(1 for r in ratios if (r < 1 if better == "higher" else r > 1))
    if 0.95 <= ratio <= 1.05:
        word = "on par (within 5 %)"
    else:
        good = ratio > 1 if better == "higher" else ratio < 1
        word = f"{'better' if good else 'worse'} by {abs(ratio - 1) * 100:.0f} %"
    return f"median ratio {ratio:.3f}: candidate {word}; worse than the baseline in {worse} of {len(ratios)} rounds"


def table(key, title, unit, better, rounds) -> list:
    base = [r["baseline"][key] for r in rounds]
    cand = [r["candidate"][key] for r in rounds]
    ratios = [c / b if b else float("nan") for b, c in zip(base, cand)]
    lines = [f"{title} ({unit}, {better} is better)",
             "  round     " + "".join(f"{i + 1:>9d}" for i in range(len(rounds))),
             "  baseline  " + "".join(fmt(v) for v in base),
             "  candidate " + "".join(fmt(v) for v in cand),
             "  ratio     " + "".join(f"{r:9.3f}" for r in ratios),
             "  " + verdict(ratios, better)]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision with the in-memory queue")
    parser.add_argument("--candidate", default=None, help="git revision (default: the working tree)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--webhooks", type=int, default=200, help="webhooks per round")
    parser.add_argument("--clients", type=int, default=4, help="webhook client threads")
    parser.add_argument("--serial", type=int, default=40, help="webhooks sent one at a time per round")
    parser.add_argument("--fit-ms", type=float, default=20.0, help="how long fit() takes")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--predict-clients", type=int, default=2)
    parser.add_argument("--predict-pause", type=float, default=0.01, help="seconds between a client's /predict")
    parser.add_argument("--idle", type=float, default=1.0, help="seconds of idle /predict per round")
    parser.add_argument("--warmup", type=int, default=120, help="webhooks per server before the rounds")
    parser.add_argument("--python", default=sys.executable, help="Python that runs both servers")
    parser.add_argument("--tmp", default=None, help="parent of the temporary directory (state, sources)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run: 1 round, 40 webhooks")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.webhooks, args.serial, args.idle, args.warmup = 1, 40, 10, 0.5, 20

    # SIGTERM (a CI timeout, kill PID) ends the run through the finally below, so no server is left.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    wall = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="lsdeploy-bench-queue-", dir=args.tmp))
    servers: list = []
    errors: list = []
    try:
        base_src, base_desc = source_tree(args.baseline, work, "baseline")
        cand_src, cand_desc = source_tree(args.candidate, work, "candidate")
        backend = work / "backend"
        backend.mkdir()
        (backend / "model.py").write_text(MODEL)
        baseline = Server("baseline", base_src, backend, work, args)
        candidate = Server("candidate", cand_src, backend, work, args)
        servers = [baseline, candidate]
        for server in servers:
            server.start()
        print(f"baseline  {base_desc}\ncandidate {cand_desc}")
        for server in servers:
            print(f"  {server.name:9s} {identify(server)}")
        ids = Sequence()
        # Warm-up: every worker builds its model, both queues run, and the durable queue's index
        # holds as many finished jobs as it keeps per project (100), as it does in service.
        for server in servers:
            before = server.fits()[0]
            results = send_webhooks(server.port, ids.bodies(args.warmup), args.clients)
            errors.extend(f"{server.name}: webhook answered {r[1]}" for r in results if not ok(r[1]))
            with PredictClients(server.port, args.predict_clients, args.predict_pause):
                time.sleep(0.3)
            server.wait_fits(before + args.warmup, timeout=60 + 5 * args.warmup * args.fit_ms / 1000)
            server.wait_idle()

        rounds = []
        for i in range(args.rounds):
            order = servers if i % 2 == 0 else servers[::-1]
            figures = {}
            for server in order:
                figures[server.name] = measure(server, ids, args, errors)
            rounds.append(figures)
            print(f"  round {i + 1}/{args.rounds} ({' then '.join(s.name for s in order)}): webhooks "
                  f"{figures['baseline']['throughput']:.0f} vs {figures['candidate']['throughput']:.0f} req/s, "
                  f"fits done in {figures['baseline']['fits_done']:.2f} vs {figures['candidate']['fits_done']:.2f} s",
                  flush=True)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    samples = [sum(r[name]["_samples"][k] for r in rounds) for name in ("baseline", "candidate") for k in range(3)]
    print()
    print(f"{args.webhooks} ANNOTATION_CREATED webhooks per round (one project) from {args.clients} clients, then "
          f"{args.serial} from one client; fit() {args.fit_ms:g} ms; FIT_WAIT_SECONDS=0; {args.workers} workers x "
          f"{args.threads} threads; SQLite state; {args.predict_clients} /predict clients (one task, "
          f"{args.predict_pause * 1000:g} ms pause); {args.rounds} paired rounds, order alternating; {os.cpu_count()} CPUs")
    print(f"/predict samples (baseline idle/streaming/draining, candidate the same): "
          f"{'/'.join(map(str, samples[:3]))}, {'/'.join(map(str, samples[3:]))}")
    print()
    for key, title, unit, better in METRICS:
        print("\n".join(table(key, title.format(clients=args.clients, webhooks=args.webhooks), unit, better, rounds)))
        print()

    med = lambda key, name: statistics.median(r[name][key] for r in rounds)  # noqa: E731
    ratio = lambda key: statistics.median(r["candidate"][key] / r["baseline"][key] for r in rounds)  # noqa: E731
    serial_cost = statistics.median(r["candidate"]["serial_p50"] - r["baseline"]["serial_p50"] for r in rounds)
    loaded_cost = statistics.median(r["candidate"]["answer_p50"] - r["baseline"]["answer_p50"] for r in rounds)
    capacity_cost = statistics.median(1000 / r["candidate"]["throughput"] - 1000 / r["baseline"]["throughput"]
                                      for r in rounds)
    print(f"persisting one event, next to a {args.fit_ms:g} ms fit (baseline -> candidate: medians over rounds; "
          f"+: the median of the per-round differences):")
    print(f"  answer latency, one webhook at a time: {med('serial_p50', 'baseline'):.2f} -> "
          f"{med('serial_p50', 'candidate'):.2f} ms, +{serial_cost:.2f} ms per webhook "
          f"({serial_cost / args.fit_ms * 100:.0f} % of the fit)")
    print(f"  answer latency p50 with {args.clients} clients: {med('answer_p50', 'baseline'):.2f} -> "
          f"{med('answer_p50', 'candidate'):.2f} ms, +{loaded_cost:.2f} ms ({loaded_cost / args.fit_ms * 100:.0f} % of the fit)")
    print(f"  server time per webhook (1 / throughput): {1000 / med('throughput', 'baseline'):.2f} -> "
          f"{1000 / med('throughput', 'candidate'):.2f} ms, +{capacity_cost:.2f} ms "
          f"({capacity_cost / args.fit_ms * 100:.0f} % of the fit)")
    print()
    print(f"closing note: the durable queue answers webhooks at {ratio('throughput'):.2f}x the in-memory queue's rate "
          f"(median of {len(rounds)} paired rounds; {med('throughput', 'baseline'):.0f} -> "
          f"{med('throughput', 'candidate'):.0f} req/s), and a webhook costs {serial_cost:+.2f} ms on its own "
          f"({serial_cost / args.fit_ms * 100:.0f} % of a {args.fit_ms:g} ms fit); all fits done in "
          f"{ratio('fits_done'):.2f}x the time; /predict p95 {ratio('predict_busy_p95'):.2f}x while webhooks stream "
          f"in, {ratio('predict_drain_p95'):.2f}x while the queue drains, {ratio('predict_idle_p95'):.2f}x idle.")
    print(f"wall time {time.perf_counter() - wall:.1f} s")
    if errors:
        print(f"{len(errors)} error(s):", *errors[:20], sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
