"""A backend with a Dockerfile of its own (not the blueprint's: another user, ENTRYPOINT + CMD,
its own MODEL_DIR and PORT defaults, no .dockerignore), whose fit() takes a second: the image
passes the same checks, and SIGTERM with a queue of training events stops it within Cloud Run's
10 s, finishing the running fit and keeping the rest queued in MODEL_DIR (a volume); a new
container on the same volume trains every one of them."""
from __future__ import annotations

import requests

from checks import image_problems, log_tail, stop_problems, wait_healthy
from images import SECRET, created_backend
from lsdeploy.state import SQLiteStore
from support import annotation_event, free_port, wait_jobs_done

MODEL = '''
import os
import time

from lsdeploy.model import LabelStudioMLBase
from lsdeploy.response import ModelResponse


class Recorder(LabelStudioMLBase):
    """Predicts the last label it was trained on; fit() takes FIT_SECONDS and records each
    annotation it trained on, in order, in the state store."""

    def predict(self, tasks, context=None, **kwargs):
        label = self.get("last") or "Neutral"
        return ModelResponse(predictions=[{"result": [{"from_name": "sentiment", "to_name": "text",
                                                       "type": "choices", "value": {"choices": [label]}}],
                                           "score": 0.5} for _ in tasks])

    def fit(self, event, data, **kwargs):
        time.sleep(float(os.environ.get("FIT_SECONDS", "0")))
        annotation = data["annotation"]
        self.update("trained", lambda ids: (ids or []) + [annotation["id"]])
        self.set("last", annotation["result"][0]["value"]["choices"][0])
        return {"ok": True}
'''

DOCKERFILE = '''\
FROM python:3.11-slim
RUN useradd --uid 20000 --no-create-home --shell /usr/sbin/nologin ml \\
    && mkdir -p /var/lib/backend && chown ml /var/lib/backend
COPY wheels/ /tmp/wheels/
RUN pip install --no-cache-dir /tmp/wheels/lsdeploy-*.whl && rm -rf /tmp/wheels
WORKDIR /srv/backend
COPY model.py label_config.xml ./
ENV MODEL_DIR=/var/lib/backend HOST=0.0.0.0 PORT=8080 TRAINING_POLL_SECONDS=0.5
USER ml
ENTRYPOINT ["label-studio-ml", "start"]
CMD ["/srv/backend"]
'''

EVENTS = 12


def own_backend(parent):
    directory = created_backend("default")(parent)
    (directory / "model.py").write_text(MODEL)
    (directory / "Dockerfile").write_text(DOCKERFILE)
    (directory / ".dockerignore").unlink()
    return directory


def trained(state_dir) -> list:
    store = SQLiteStore(str(state_dir))
    try:
        return store.get("1", "trained") or []
    finally:
        store.close()


def test_own_dockerfile_image_passes_the_checks(eng, built):
    image = built("own-dockerfile", own_backend)
    assert image_problems(eng, image.tag, secret=SECRET) == []
    assert eng.config(image.tag)["User"] == "ml"


def test_sigterm_finishes_the_running_fit_keeps_the_queue_and_a_restart_trains_it(eng, built, tmp_path):
    image = built("own-dockerfile", own_backend)
    state = tmp_path / "model-dir"
    state.mkdir()
    state.chmod(0o777)  # the image's user (uid 20000) writes here
    volumes = {str(state): "/var/lib/backend"}

    box = eng.run(image.tag, env={"FIT_SECONDS": "1", "FIT_WAIT_SECONDS": "0"}, port=free_port(), volumes=volumes)
    assert wait_healthy(box) is None
    answers = [requests.post(box.url + "/webhook", json=annotation_event(i, i, f"text {i}", "Positive"), timeout=10)
               for i in range(1, EVENTS + 1)]
    assert all(a.status_code == 202 for a in answers), [a.text for a in answers]
    wait_jobs_done(lambda path: requests.get(box.url + path, timeout=10), answers[:1])
    assert stop_problems(box) == []  # exit 0 within 10 s
    log = box.logs()
    assert "left queued in the state store, not lost" in log, log_tail(box, 20)
    before = trained(state)
    assert 1 <= len(before) < EVENTS, before  # some trained, the rest still queued
    assert before == list(range(1, len(before) + 1))
    box.remove()

    box = eng.run(image.tag, env={"FIT_SECONDS": "0.05", "FIT_WAIT_SECONDS": "0"}, port=free_port(),
                  volumes=volumes)
    assert wait_healthy(box) is None
    wait_jobs_done(lambda path: requests.get(box.url + path, timeout=10), answers)
    assert stop_problems(box) == []
    after = trained(state)
    assert sorted(set(after)) == list(range(1, EVENTS + 1)), after  # every acknowledged event trained
    firsts = [i for n, i in enumerate(after) if i not in after[:n]]
    assert firsts == list(range(1, EVENTS + 1))  # in the order they were acknowledged
