"""A Cloud Storage outage with two instances on one gs:// prefix: every acknowledged training
event ends up reflected in state, in acknowledgement order, and an event sent while storage is
down is refused (503), not acknowledged and then lost.

Two real `label-studio-ml start` processes share one bucket of a real fake-gcs-server, which is
stopped for the outage and started again. Webhooks go to both instances before, during and after
it (during it from one sender thread per instance, so a webhook held by storage does not hold the
outage). Waits are for the event meant (every acknowledged job's ``GET /jobs/<id>`` is done);
nothing asserts on time.

- a recorder backend (fit ~0.3 s) logs each delivery and keeps the latest label of each
  annotation; a gate file parks the fits in flight so that the outage starts under them: they
  must be retried once storage answers, not dropped;
- the text-classifier blueprint (issue requirement 7): its training set (the artifact
  dataset.json) must hold every acknowledged annotation with its last label, and the saved model
  must be the one trained on that whole set (no fit on a stale set overwriting a newer one);
  fits taking turns between the instances each start from the set the other one saved; and when
  storage goes down between saving model.pkl and publishing its version, every instance still
  serves the published version its trained model.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import pickle
import threading
import time

import pytest

from lsdeploy.errors import StateError
from support import TEXT_CONFIG, Server, annotation_event, text_task

pytestmark = pytest.mark.gcs

LABELS = ("Positive", "Negative", "Neutral")
ACKED = (201, 202)

RECORDER = '''
import os
import time

from lsdeploy.model import LabelStudioMLBase


class Recorder(LabelStudioMLBase):
    """Logs each delivery [annotation, label, sequence, attempt, job] and keeps the latest label
    of each annotation; FIT_SECONDS long. While GATE_FILE exists a fit that starts parks (and
    says so with a file named after its job in PARK_DIR) until the gate is removed."""

    def fit(self, event, data, **kwargs):
        delivery = self.delivery
        gate = os.environ.get("GATE_FILE")
        if gate and os.path.exists(gate):
            open(os.path.join(os.environ["PARK_DIR"], delivery["job_id"]), "w").close()
            while os.path.exists(gate):
                time.sleep(0.02)
        time.sleep(float(os.environ.get("FIT_SECONDS", "0")))
        annotation = data["annotation"]
        label = annotation["result"][0]["value"]["choices"][0]
        entry = [annotation["id"], label, delivery["sequence"], delivery["attempt"], delivery["job_id"]]
        self.update("log", lambda log: (log or []) + [entry])
        self.update("labels", lambda labels: {**(labels or {}), str(annotation["id"]): label})
        return {"ok": True}
'''


# -- instances and webhooks -----------------------------------------------------------------------

@pytest.fixture
def instances(tmp_path):
    """instances(directory, emulator, uri, **env) -> two started Servers on one gs:// URI."""
    started = []

    def start(directory, emulator, uri, count=2, **extra):
        servers = []
        for _ in range(count):
            env = {"MODEL_STATE_URI": uri, "MODEL_STATE_REFRESH_SECONDS": "1",
                   "MODEL_DIR": str(tmp_path / f"instance-{len(started)}"), "FIT_WAIT_SECONDS": "0",
                   "TRAINING_POLL_SECONDS": "0.5", **emulator.env, **{k: str(v) for k, v in extra.items()}}
            server = Server(directory, env=env)
            started.append(server)
            servers.append(server.start(wait=False))
        for server in servers:
            server.wait_healthy(90)
        return servers

    yield start
    for server in started:
        server.stop()


def logs(servers, tail=6000) -> str:
    return "\n".join(f"--- instance {i} log (tail):\n{s.log()[-tail:]}" for i, s in enumerate(servers))


class Stream:
    """Annotation webhooks to the instances (in turn, unless one is named) and what each answer
    was: acknowledged by 201/202 (it names a job) or refused by 503 (JSON saying why)."""

    def __init__(self, servers):
        self.servers = servers
        self.sent: list = []  # one dict per webhook, in the order the answers came
        self._lock = threading.Lock()
        self._turn = itertools.count()

    def send(self, annotation, label, project=1, action="ANNOTATION_CREATED", phase="", instance=None):
        instance = next(self._turn) % len(self.servers) if instance is None else instance
        text = f"text of annotation {annotation}"
        body = annotation_event(annotation, annotation, text, label, project=project, action=action)
        started = time.monotonic()
        answer = self.servers[instance].post("/webhook", body, timeout=180)
        record = {"annotation": annotation, "project": str(project), "label": label, "action": action,
                  "text": text, "instance": instance, "phase": phase, "status": answer.status_code,
                  "seconds": round(time.monotonic() - started, 2)}
        if answer.status_code in ACKED:
            record["job"] = answer.json()["job"]
        elif answer.status_code == 503:
            record["error"] = answer.json()["error"]
        else:
            raise AssertionError(f"webhook for annotation {annotation} answered {answer.status_code}: "
                                 f"{answer.text}\n{logs(self.servers)}")
        with self._lock:
            self.sent.append(record)
        return record

    def send_until_acknowledged(self, annotation, label, project=1, action="ANNOTATION_CREATED", phase="",
                                tries=40):
        """What a client does with a 503: send the event again a little later."""
        for _ in range(tries):
            record = self.send(annotation, label, project, action, phase)
            if "job" in record:
                return record
            time.sleep(0.25)
        raise AssertionError(f"annotation {annotation} refused {tries} times with storage up: {record}")

    @property
    def acknowledged(self) -> list:
        return [r for r in self.sent if "job" in r]

    @property
    def refused(self) -> list:
        return [r for r in self.sent if r["status"] == 503]

    def summary(self, views) -> str:
        """Counts by phase, for the test's output (pytest -s)."""
        phases: dict = {}
        for r in self.sent:
            counts = phases.setdefault(r["phase"], {"sent": 0, "acknowledged": 0, "refused": 0})
            counts["sent"] += 1
            counts["acknowledged" if "job" in r else "refused"] += 1
        retried = sorted(v["attempts"] for v in views.values() if v["attempts"] > 1)
        slowest = max((r["seconds"], r["phase"], r["status"]) for r in self.sent)
        return f"{phases}; attempts of the jobs run more than once: {retried}; slowest answer: {slowest}"


def outage(emulator, servers, seconds, send_one, stopped=lambda: None) -> float:
    """Storage down for `seconds`, while webhooks keep coming: for each instance one sent the moment
    storage goes down (storage holds it: it is refused once its write gives up, or acknowledged if
    storage comes back first) and, once the instance reports storage degraded, one every 0.4 s
    (refused at once), each from its own thread, so no webhook holds the outage. `send_one(instance)`
    sends one; `stopped()` is called once storage is down. The monotonic time storage came back."""
    stop = threading.Event()
    errors: list = []

    def degraded(instance):
        return servers[instance].get("/health", timeout=30).json()["store"]["status"] == "degraded"

    def steady(instance):
        while not stop.is_set() and not degraded(instance):
            time.sleep(0.1)
        while not stop.is_set():
            send_one(instance)
            stop.wait(0.4)

    def run(fn, instance):
        try:
            fn(instance)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn, i)) for i in range(len(servers)) for fn in (send_one, steady)]
    emulator.stop()
    stopped()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    emulator.start()
    restarted = time.monotonic()
    stop.set()
    for thread in threads:
        thread.join(240)
    assert not any(t.is_alive() for t in threads), "a webhook sent during the outage never answered"
    if errors:
        raise errors[0]
    return restarted


def wait_done(servers, records, timeout=240.0) -> dict:
    """GET /jobs/<id> of every acknowledged event until each is done; {job: view}. A job kept as
    failed fails the test at once."""
    views: dict = {}
    pending = [r["job"] for r in records]
    deadline = time.monotonic() + timeout
    last: dict = {}
    while pending:
        for i, job in enumerate(list(pending)):
            answer = servers[i % len(servers)].get(f"/jobs/{job}", timeout=60)
            if answer.status_code != 200:
                last[job] = (answer.status_code, answer.text)
                continue
            view = last[job] = answer.json()
            if view["state"] == "failed":
                raise AssertionError(f"acknowledged job {job} was kept as failed: {view}\n{logs(servers)}")
            if view["state"] == "done":
                views[job] = view
                pending.remove(job)
        if not pending:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(pending)} acknowledged job(s) not done after {timeout} s, e.g. "
                                 f"{[last.get(j) for j in pending[:3]]}\n{logs(servers)}")
        time.sleep(0.5)
    return views


def fits_by_instance(servers) -> list:
    """fit() runs (ok, error) of each instance, from its /metrics: who trained, for the output."""
    counts = []
    for server in servers:
        ok = error = 0.0
        for line in server.get("/metrics", timeout=30).text.splitlines():
            if line.startswith("lsdeploy_fit_total{"):
                value = float(line.rsplit(" ", 1)[1])
                ok, error = (ok + value, error) if 'status="ok"' in line else (ok, error + value)
        counts.append((int(ok), int(error)))
    return counts


def wait_storage_ok(servers, timeout=60.0):
    """Until every instance says its store answers again (GET /health)."""
    deadline = time.monotonic() + timeout
    for server in servers:
        while server.get("/health", timeout=30).json()["store"]["status"] != "ok":
            if time.monotonic() > deadline:
                raise AssertionError(f"an instance still degraded after {timeout} s\n{logs(servers)}")
            time.sleep(0.2)


def last_acknowledged(records, views) -> dict:
    """{annotation: (sequence, label, text)} of its event acknowledged last: the highest sequence
    in its project's queue (webhooks sent concurrently are ordered by the queue, not by sending)."""
    latest: dict = {}
    for record in records:
        sequence = views[record["job"]]["sequence"]
        if record["annotation"] not in latest or sequence > latest[record["annotation"]][0]:
            latest[record["annotation"]] = (sequence, record["label"], record["text"])
    return latest


def outage_refusal(record) -> bool:
    """A 503 saying that the event was not stored because storage does not answer: refused at once
    ("not acknowledged"), or after its write was retried for MODEL_STATE_WRITE_TIMEOUT_SECONDS."""
    error = record.get("error") or ""
    return record["status"] == 503 and ("not acknowledged" in error or ("cannot write" in error and "gs://" in error))


def check_refusals(stream):
    refused = stream.refused
    assert [r for r in refused if r["phase"] == "during"], "no webhook was refused during the outage"
    assert all(outage_refusal(r) for r in refused), [r["error"] for r in refused if not outage_refusal(r)][:3]


# -- the recorder: a 30 s outage ----------------------------------------------------------------

def test_30s_outage_with_two_instances_every_acknowledged_event_is_reflected_in_order(
        own_emulator, instances, make_store, tmp_path):
    backend = tmp_path / "recorder"
    backend.mkdir()
    (backend / "model.py").write_text(RECORDER)
    gate, park = tmp_path / "gate", tmp_path / "parked"
    park.mkdir()
    own_emulator.create_bucket("qoutage")
    uri = "gs://qoutage/rec"
    # Writes give up after 5 s, so the fits caught by the outage fail and must be retried;
    # TRAINING_MAX_ATTEMPTS with TRAINING_RETRY_SECONDS outlast the outage.
    servers = instances(backend, own_emulator, uri, FIT_SECONDS=0.3, TRAINING_RETRY_SECONDS=0.5,
                        TRAINING_MAX_ATTEMPTS=40, MODEL_STATE_WRITE_TIMEOUT_SECONDS=5,
                        GATE_FILE=gate, PARK_DIR=park)
    stream = Stream(servers)

    def send(annotation, label, phase, action="ANNOTATION_CREATED", again=False, instance=None):
        project = 1 + annotation % 2  # two projects; an annotation belongs to one
        if again:
            return stream.send_until_acknowledged(annotation, label, project, action, phase)
        return stream.send(annotation, label, project, action, phase, instance)

    # Before: 16 annotations, every third one relabelled; a backlog builds up (fits take 0.3 s).
    for a in range(1, 17):
        send(a, LABELS[a % 3], "before", again=True)
        if a % 3 == 0:
            send(a - 2, LABELS[(a + 1) % 3], "before", action="ANNOTATION_UPDATED", again=True)
    # The fits that start from now on park: the outage begins while they are in flight.
    gate.write_text("")
    send(100, "Positive", "before", again=True)
    parked = wait_parked(park, servers)
    numbers = itertools.count(201)

    def send_one(instance):
        a = next(numbers)
        send(a, LABELS[a % 3], "during", instance=instance)
        if a % 4 == 0:  # a relabelling of an annotation acknowledged before
            send(a % 16 + 1, "Neutral", "during", action="ANNOTATION_UPDATED", instance=instance)

    # Once storage is down the parked fits go on, and meet the outage.
    restarted = outage(own_emulator, servers, 30, send_one, stopped=gate.unlink)

    # After: storage answers; new annotations, relabellings, and some refused events sent again.
    wait_storage_ok(servers)
    during = [r for r in stream.sent if r["phase"] == "during" and "job" not in r]
    for a in range(300, 312):
        send(a, LABELS[a % 3], "after", again=True)
    for record in during[:6]:
        send(record["annotation"], record["label"], "after", action=record["action"], again=True)
    for a in range(1, 17, 5):
        send(a, LABELS[(a + 2) % 3], "after", action="ANNOTATION_UPDATED", again=True)

    acknowledged = stream.acknowledged
    views = wait_done(servers, acknowledged)
    print(stream.summary(views), f"| parked {parked} | every job done {time.monotonic() - restarted:.1f} s after "
          f"storage came back | fits (ok, error) by instance {fits_by_instance(servers)}")

    check_refusals(stream)
    # The fits in flight when the outage started were retried, not dropped.
    assert parked
    for job in parked:
        assert views[job]["attempts"] >= 2, (job, views[job])

    store = make_store(own_emulator, uri)
    for project in ("1", "2"):
        mine = [r for r in acknowledged if r["project"] == project]
        labels = store.read(project, "labels") or {}
        expected = {str(a): label for a, (_, label, _) in last_acknowledged(mine, views).items()}
        assert labels == expected, (project, {k: (labels.get(k), v) for k, v in expected.items()
                                              if labels.get(k) != v}, set(labels) - set(expected))
        log = store.read(project, "log") or []
        # Every acknowledged event was delivered, and nothing else was.
        assert {e[4] for e in log} == {r["job"] for r in mine}, project
        assert {e[2] for e in log} == {views[r["job"]]["sequence"] for r in mine}, project
        # In acknowledgement order: a delivery repeats only right after itself (a retry).
        sequences = [e[2] for e in log]
        collapsed = [s for i, s in enumerate(sequences) if i == 0 or s != sequences[i - 1]]
        assert collapsed == sorted(set(sequences)), f"project {project} out of order: {sequences}"


def wait_parked(park, servers, timeout=120.0) -> list:
    """Until a fit has parked at the gate (it is in flight); the parked jobs."""
    deadline = time.monotonic() + timeout
    while not list(park.iterdir()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no fit reached the gate after {timeout} s\n{logs(servers)}")
        time.sleep(0.02)
    time.sleep(0.2)  # the other project's fit, if one starts now, parks too
    return sorted(p.name for p in park.iterdir())


# -- the text-classifier: requirement 7 ---------------------------------------------------------

def test_text_classifier_loses_no_annotation_during_a_storage_outage(own_emulator, instances, make_store, created):
    directory = created("text-classifier")
    own_emulator.create_bucket("tcoutage")
    uri = "gs://tcoutage/tc"
    # Writes give up after 8 s of the 12 s outage: the fit in flight, or the queue's record of its
    # end, fails and the event runs again (at least once); storage answers again by the time the
    # lease is let go, so it is not left to expire.
    servers = instances(directory, own_emulator, uri, TRAINING_RETRY_SECONDS=0.5, TRAINING_MAX_ATTEMPTS=40,
                        MODEL_STATE_WRITE_TIMEOUT_SECONDS=8)
    stream = Stream(servers)

    def label(a, turn=0):
        return LABELS[(a + turn) % 3]

    # Before: 30 annotations, every fourth one relabelled; fits run behind the webhooks.
    for a in range(1, 31):
        stream.send_until_acknowledged(a, label(a), phase="before")
        if a % 4 == 0:
            stream.send_until_acknowledged(a - 3, label(a - 3, 1), action="ANNOTATION_UPDATED", phase="before")
    wait_done(servers, stream.acknowledged[:1])  # training is under way, with a backlog behind it
    numbers = itertools.count(101)

    def send_one(instance):
        a = next(numbers)
        stream.send(a, label(a), phase="during", instance=instance)

    outage(own_emulator, servers, 12, send_one)

    wait_storage_ok(servers)
    for a in range(31, 51):
        stream.send_until_acknowledged(a, label(a), phase="after")
        if a % 5 == 0:
            stream.send_until_acknowledged(a - 25, label(a - 25, 2), action="ANNOTATION_UPDATED", phase="after")

    acknowledged = stream.acknowledged
    views = wait_done(servers, acknowledged)
    print(stream.summary(views), f"| fits (ok, error) by instance {fits_by_instance(servers)}")
    check_refusals(stream)

    store = make_store(own_emulator, uri)  # its snapshot is listed now, after the last fit
    with open(store.load_artifact("1", "dataset.json"), encoding="utf-8") as handle:
        dataset = json.load(handle)
    expected = {str(a): [text, lab] for a, (_, lab, text) in last_acknowledged(acknowledged, views).items()}
    missing = sorted(set(expected) - set(dataset), key=int)
    wrong = {k: (dataset[k][1], v[1]) for k, v in expected.items() if k in dataset and dataset[k] != v}
    assert not missing and not wrong and set(dataset) == set(expected), (
        f"{len(missing)} acknowledged annotation(s) missing from the training set: {missing}; "
        f"wrong labels (trained, expected): {wrong}; not acknowledged: {set(dataset) - set(expected)}")
    # The model served is the one trained on that whole set, under the published version.
    with open(store.load_artifact("1", "model.pkl"), "rb") as handle:
        saved = pickle.load(handle)
    trained_on = hashlib.sha256(json.dumps(sorted(dataset.values())).encode("utf-8")).hexdigest()
    assert saved["trained_on"] == trained_on
    assert saved["version"] == store.read("1", "model_version")


def test_text_classifier_fit_on_the_other_instance_starts_from_the_set_the_last_fit_saved(
        own_emulator, instances, make_store, created):
    """Fits take turns between the instances: each event goes to the instance that did not train
    the last one and, with its webhook, wakes that instance's trainer (the other looks only every
    TRAINING_POLL_SECONDS=30). The snapshot refreshes only every 60 s, so what the previous fit
    saved on the other instance is seen only through the refresh that follows taking the lease:
    without it, a fit would start from a stale training set and save it over the newer one."""
    directory = created("text-classifier")
    own_emulator.create_bucket("handover")
    uri = "gs://handover/tc"
    servers = instances(directory, own_emulator, uri, MODEL_STATE_REFRESH_SECONDS=60, TRAINING_POLL_SECONDS=30)
    stream = Stream(servers)
    views = {}
    for a in range(1, 13):
        action = "ANNOTATION_UPDATED" if a % 4 == 0 else "ANNOTATION_CREATED"
        target = a - 2 if action == "ANNOTATION_UPDATED" else a
        record = stream.send_until_acknowledged(target, LABELS[a % 3], action=action, phase="turns")
        views.update(wait_done(servers, [record]))  # one at a time: the queue is empty between turns
    fits = fits_by_instance(servers)
    print(fits)
    assert all(ok for ok, _ in fits), f"one instance did every fit: {fits}"

    store = make_store(own_emulator, uri)
    with open(store.load_artifact("1", "dataset.json"), encoding="utf-8") as handle:
        dataset = json.load(handle)
    assert dataset == {str(a): [text, label] for a, (_, label, text)
                       in last_acknowledged(stream.acknowledged, views).items()}
    assert store.read("1", "model_version") == "0.12.0"  # every fit changed the set: one version each

def test_text_classifier_serves_its_model_when_storage_fails_between_save_and_publish(own_emulator, make_store,
                                                                                    created):
    """A fit saves model.pkl under the next version, then publishes that version: an outage in
    between fails the fit (it runs again later). Meanwhile another instance, or a new worker,
    loading the model must get the published version's trained model, not the untrained
    fallback (before: model.pkl named only the unpublished version, so it served labels[0] at
    score 1/3 under a version the first instance served trained)."""
    from lsdeploy.loader import load_model_class

    model_class = load_model_class(created("text-classifier"))
    own_emulator.create_bucket("publish")
    store = make_store(own_emulator, "gs://publish/tc", write_timeout=1.5, refresh_seconds=0.5)

    def classifier(on):
        model = model_class.__new__(model_class)
        model._store = on
        model.__init__(project_id="1", label_config=TEXT_CONFIG)
        return model

    trained = classifier(store)
    for i, (text, label) in enumerate([("great love it", "Positive"), ("awful hate it", "Negative")], 1):
        assert trained.fit("ANNOTATION_CREATED", annotation_event(i, i, text, label))["trained"]
    version = store.get("1", "model_version")
    update = store.update

    def outage_before_publish(project, key, fn, default=None):
        if key == "model_version":
            own_emulator.stop()  # model.pkl of the next version is saved; its publish meets the outage
        return update(project, key, fn, default)

    store.update = outage_before_publish
    with pytest.raises(StateError):
        trained.fit("ANNOTATION_CREATED", annotation_event(3, 3, "wonderful great", "Positive"))
    store.update = update
    own_emulator.start()

    other = classifier(make_store(own_emulator, "gs://publish/tc"))
    assert other.model_version == version
    task = [text_task(9, "great love wonderful")]
    served, expected = other.predict(task).predictions[0], trained.predict(task).predictions[0]
    assert (served.score, served.result) == (expected.score, expected.result)
    assert served.score > 1 / 3, "the untrained fallback"
