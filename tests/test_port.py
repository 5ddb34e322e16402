"""`label-studio-ml port DIR`: a backend written for the reference SDK (`label_studio_ml`), in the
styles of the reference's examples (model.py, an argparse _wsgi.py around init_app, a Dockerfile
that installs the reference from git, requirements-base.txt, a test_api.py on Flask's test client
with compare_nested_structures), ported in place: its own tests then pass under lsdeploy and
`start` serves it. The backends are our own; the reference repository is never needed."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support import Server, run_cli

REFERENCE_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")

MODEL = '''\
import os
import logging

from typing import List, Dict, Optional
from label_studio_ml.model import LabelStudioMLBase
from label_studio_ml.response import ModelResponse
from label_studio_ml.utils import DATA_UNDEFINED_NAME
import label_studio_ml.utils as ml_utils

logger = logging.getLogger(__name__)


class KeywordSentiment(LabelStudioMLBase):
    """Positive when the text says "good", Negative otherwise.
    """

    POSITIVE_WORD = os.getenv('POSITIVE_WORD', 'good')

    def setup(self):
        self.set("model_version", f'{self.__class__.__name__}-v0.0.1')

    def predict(self, tasks: List[Dict], context: Optional[Dict] = None, **kwargs) -> ModelResponse:
        from_name, to_name, value = self.get_first_tag_occurence('Choices', 'Text')
        predictions = []
        for task in tasks:
            text = task['data'].get(value) or task['data'].get(DATA_UNDEFINED_NAME) or ''
            label = 'Positive' if self.POSITIVE_WORD in text.lower() else 'Negative'
            predictions.append({
                'result': [{'from_name': from_name, 'to_name': to_name, 'type': 'choices',
                            'value': {'choices': [label]}}],
                'score': 0.9,
            })
        return ModelResponse(predictions=predictions)

    def fit(self, event, data, **kwargs):
        # written for the reference SDK, which calls fit for these events only
        if event not in ('ANNOTATION_CREATED', 'ANNOTATION_UPDATED', 'ANNOTATION_DELETED', 'START_TRAINING'):
            raise ValueError(f'unexpected event {event}')
        fits = int(self.get('fits') or 0) + 1
        self.set('fits', str(fits))
        return {'fits': fits, 'undefined': ml_utils.DATA_UNDEFINED_NAME}
'''

WSGI = '''\
import os
import argparse
import json
import logging
import logging.config

logging.config.dictConfig({
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler", "level": os.getenv('LOG_LEVEL') or 'INFO',
                             "stream": "ext://sys.stdout"}},
    "root": {"level": os.getenv('LOG_LEVEL') or 'INFO', "handlers": ["console"], "propagate": True},
})

from label_studio_ml.api import init_app
from model import KeywordSentiment


_DEFAULT_CONFIG_PATH = os.path.join(os.path.dirname(__file__), 'config.json')


def get_kwargs_from_config(config_path=_DEFAULT_CONFIG_PATH):
    if not os.path.exists(config_path):
        return dict()
    with open(config_path) as f:
        return json.load(f)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description='Label studio')
    parser.add_argument('-p', '--port', dest='port', type=int, default=9090, help='Server port')
    parser.add_argument('--host', dest='host', type=str, default='0.0.0.0', help='Server host')
    parser.add_argument('-d', '--debug', dest='debug', action='store_true', help='Switch debug mode')
    parser.add_argument('--basic-auth-user', default=os.environ.get('ML_SERVER_BASIC_AUTH_USER', None))
    parser.add_argument('--basic-auth-pass', default=os.environ.get('ML_SERVER_BASIC_AUTH_PASS', None))
    args = parser.parse_args()
    app = init_app(model_class=KeywordSentiment, basic_auth_user=args.basic_auth_user,
                   basic_auth_pass=args.basic_auth_pass)
    app.run(host=args.host, port=args.port, debug=args.debug)
else:
    # for uWSGI use
    app = init_app(model_class=KeywordSentiment)
'''

TEST_API = '''\
"""
This file contains tests for the API of your model. Run them with `pytest` in this directory.
"""

import json
import pytest

from label_studio_ml.utils import compare_nested_structures
from model import KeywordSentiment

LABEL_CONFIG = """
<View>
  <Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text" choice="single">
    <Choice value="Positive"/>
    <Choice value="Negative"/>
  </Choices>
</View>
"""


@pytest.fixture
def client():
    from _wsgi import init_app
    app = init_app(model_class=KeywordSentiment)
    app.config['TESTING'] = True
    with app.test_client() as client:
        yield client


def test_predict(client):
    request = {
        'tasks': [{'id': 1, 'data': {'text': 'A good day'}}, {'id': 2, 'data': {'text': 'Rain again'}}],
        'project': '3.1712586036',
        'label_config': LABEL_CONFIG,
    }
    expected = [
        {'from_name': 'sentiment', 'to_name': 'text', 'type': 'choices', 'value': {'choices': ['Positive']}},
        {'from_name': 'sentiment', 'to_name': 'text', 'type': 'choices', 'value': {'choices': ['Negative']}},
    ]

    response = client.post('/predict', data=json.dumps(request), content_type='application/json')
    assert response.status_code == 200
    response = json.loads(response.data)
    assert response['results'][0]['model_version'] == 'KeywordSentiment-v0.0.1'
    compare_nested_structures([r['result'][0] for r in response['results']], expected)
    assert response['results'][0]['score'] == pytest.approx(0.9)


def test_webhook_trains_on_an_annotation(client):
    request = {'action': 'ANNOTATION_CREATED', 'project': {'id': 3, 'label_config': LABEL_CONFIG},
               'annotation': {'id': 1, 'result': []}, 'task': {'id': 1, 'data': {'text': 'good'}}}
    response = client.post('/webhook', data=json.dumps(request), content_type='application/json')
    assert response.status_code == 201
    assert json.loads(response.data)['result']['fits'] >= 1


def test_webhook_ignores_other_events(client):
    request = {'action': 'PROJECT_UPDATED', 'project': {'id': 3, 'label_config': LABEL_CONFIG}}
    response = client.post('/webhook', data=json.dumps(request), content_type='application/json')
    assert response.status_code == 200
'''

DOCKERFILE = '''\
# syntax=docker/dockerfile:1
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS python-base
ARG TEST_ENV

WORKDIR /app

ENV PYTHONUNBUFFERED=1 \\
    PYTHONDONTWRITEBYTECODE=1 \\
    PORT=${PORT:-9090} \\
    PIP_CACHE_DIR=/.cache \\
    WORKERS=1 \\
    THREADS=8

# Update the base OS
RUN --mount=type=cache,target="/var/cache/apt",sharing=locked \\
    --mount=type=cache,target="/var/lib/apt/lists",sharing=locked \\
    set -eux; \\
    apt-get update; \\
    apt-get upgrade -y; \\
    apt install --no-install-recommends -y  \\
        git libgl1 tesseract-ocr; \\
    apt-get autoremove -y

# install base requirements
COPY requirements-base.txt .
RUN --mount=type=cache,target=${PIP_CACHE_DIR},sharing=locked \\
    pip install -r requirements-base.txt

# install custom requirements
COPY requirements.txt .
RUN --mount=type=cache,target=${PIP_CACHE_DIR},sharing=locked \\
    pip install -r requirements.txt

# install test requirements if needed
COPY requirements-test.txt .
# build only when TEST_ENV="true"
RUN --mount=type=cache,target=${PIP_CACHE_DIR},sharing=locked \\
    if [ "$TEST_ENV" = "true" ]; then \\
      pip install -r requirements-test.txt; \\
    fi

COPY . .

EXPOSE 9090

CMD gunicorn --preload --bind :$PORT --workers $WORKERS --threads $THREADS --timeout 0 _wsgi:app
'''

FILES = {
    "model.py": MODEL,
    "_wsgi.py": WSGI,
    "test_api.py": TEST_API,
    "Dockerfile": DOCKERFILE,
    "requirements-base.txt": "gunicorn==23.0.0\nlabel-studio-ml @ git+https://github.com/HumanSignal/label-studio-ml-backend.git",
    "requirements.txt": "# no requirements of its own\n",
    "requirements-test.txt": "pytest\n",
    "docker-compose.yml": textwrap.dedent("""\
        version: "3.8"

        services:
          keyword_sentiment:
            container_name: keyword_sentiment
            image: example/keyword-sentiment:master
            build:
              context: .
            environment:
              - MODEL_DIR=/data/models
            ports:
              - "9090:9090"
    """),
    "README.md": "# keyword sentiment\n",
    # the reference examples' own: everything out, then exceptions
    ".dockerignore": "# Exclude everything\n**\n\n!Dockerfile\n!docker-compose.yml\n!*.py\n!requirements*.txt\n!*.sh\n",
}


def reference_backend(directory: Path, **overrides) -> Path:
    directory.mkdir(parents=True)
    for name, text in {**FILES, **overrides}.items():
        if text is not None:
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_text(text)
    return directory


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def run_backend_tests(directory: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """The backend's own tests, as its author runs them: pytest in its directory."""
    env = {"MODEL_DIR": str(tmp_path / "backend-tests-state"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"],
                          cwd=directory, capture_output=True, text=True, env=env, timeout=240)


def test_a_ported_reference_backend_passes_its_own_tests_under_lsdeploy(tmp_path):
    backend = reference_backend(tmp_path / "keyword_sentiment")
    before = run_backend_tests(backend, tmp_path)
    assert before.returncode != 0 and "label_studio_ml" in before.stdout  # not runnable before the port

    done = run_cli("port", backend)

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"ported {backend}: ")
    for name in ("model.py", "_wsgi.py", "test_api.py", "Dockerfile", "requirements-base.txt"):
        assert name in done.stdout.splitlines()[0]
    after = run_backend_tests(backend, tmp_path)
    assert after.returncode == 0, after.stdout + after.stderr
    assert "3 passed" in after.stdout

    model = (backend / "model.py").read_text()
    assert "label_studio_ml" not in model
    assert "from lsdeploy.model import LabelStudioMLBase\nfrom lsdeploy.response import ModelResponse\n" \
           "from lsdeploy.utils import DATA_UNDEFINED_NAME\nimport lsdeploy.utils as ml_utils\n" in model
    # TRAIN_EVENTS after the class docstring, indented like the class body
    assert '    """Positive when the text says "good", Negative otherwise.\n    """\n' \
           "    # The reference SDK's training events (set by label-studio-ml port): fit sees no other event.\n" \
           '    TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")\n' \
           in model
    assert "from lsdeploy.api import init_app\n" in (backend / "_wsgi.py").read_text()
    assert "from lsdeploy.utils import compare_nested_structures\n" in (backend / "test_api.py").read_text()
    # requirements: the reference SDK's line is lsdeploy; no label-studio-sdk is used, so no [sdk]
    assert (backend / "requirements-base.txt").read_text() == "gunicorn==23.0.0\nlsdeploy"
    assert (backend / "requirements.txt").read_text() == "# no requirements of its own\n"
    # the blueprint's Dockerfile with the original's system packages
    from lsdeploy.blueprints import render_dockerfile

    dockerfile = (backend / "Dockerfile").read_text()
    plain = render_dockerfile(backend)
    assert "apt-get install -y --no-install-recommends git libgl1 tesseract-ocr \\\n" in dockerfile
    assert [l for l in plain.splitlines() if l not in dockerfile.splitlines()] == []  # nothing of the blueprint's dropped
    assert 'CMD ["label-studio-ml", "start", "/app"]' in dockerfile and "label-studio-ml-backend" not in dockerfile
    wheels = [p.name for p in (backend / "wheels").iterdir()]
    assert len(wheels) == 1 and wheels[0].startswith("lsdeploy-") and wheels[0].endswith(".whl")
    # the image build gets wheels/ (the reference's `**` would leave it out) and never local state
    from lsdeploy.bundle import IgnoreRules

    assert (backend / ".dockerignore").read_text() == FILES[".dockerignore"] + (
        "# The Dockerfile installs wheels/ and requirements.txt; .lsdeploy is local state (label-studio-ml port)\n"
        "!wheels\n"  # .lsdeploy stays out through `**`
        "# Secrets of a local run, the repository and compose files never go into the image\n"
        "docker-compose*.yml\n")  # the original's `!docker-compose.yml` let it in
    docker = IgnoreRules((backend / ".dockerignore").read_text().splitlines(), dialect="docker")
    docker.fixed = []  # as Docker reads it
    assert not docker.excluded(f"wheels/{wheels[0]}", False) and not docker.excluded("requirements.txt", False)
    assert docker.excluded(".lsdeploy/state.sqlite3", False) and not docker.excluded("model.py", False)
    # rendered.json: the wheel it wrote; a Dockerfile with extra packages is the user's (a later render keeps it)
    manifest = json.loads((backend / ".lsdeploy" / "rendered.json").read_text())
    assert list(manifest["files"]) == [f"wheels/{wheels[0]}"]
    assert manifest["port"] == {"from": "label_studio_ml", "model_class": "KeywordSentiment"}
    assert manifest["options"] is None


def test_start_serves_a_ported_backend_with_the_reference_training_events(tmp_path):
    backend = reference_backend(tmp_path / "keyword_sentiment")
    assert run_cli("port", backend).returncode == 0
    config = '<View><Text name="text" value="$text"/><Choices name="sentiment" toName="text">' \
             '<Choice value="Positive"/><Choice value="Negative"/></Choices></View>'
    with Server(backend, env={"MODEL_DIR": str(tmp_path / "state")}) as server:
        predict = server.post("/predict", json={"tasks": [{"id": 1, "data": {"text": "so good"}}],
                                                "project": "3.1712586036", "label_config": config})
        assert predict.status_code == 200, predict.text
        result = predict.json()["results"][0]
        assert result["model_version"] == "KeywordSentiment-v0.0.1"
        assert result["result"][0]["value"] == {"choices": ["Positive"]}
        # lsdeploy's default would call fit for PROJECT_UPDATED and TASKS_CREATED; the ported class
        # keeps the reference's events, so its fit (which refuses others) never sees them
        for event in ("PROJECT_UPDATED", "TASKS_CREATED", "ANNOTATIONS_CREATED"):
            skipped = server.post("/webhook", json={"action": event, "project": {"id": 3, "label_config": config}})
            assert skipped.status_code == 200 and skipped.json()["status"] == "skipped", (event, skipped.text)
        trained = server.post("/webhook", json={"action": "ANNOTATION_CREATED",
                                                "project": {"id": 3, "label_config": config},
                                                "annotation": {"id": 1, "result": []}, "task": {"id": 1}})
        assert trained.status_code == 201, trained.text
        assert trained.json()["result"]["fits"] == 1


def test_dry_run_prints_a_unified_diff_and_changes_nothing(tmp_path):
    backend = reference_backend(tmp_path / "keyword_sentiment")
    before = snapshot(backend)

    done = run_cli("port", backend, "--dry-run")

    assert done.returncode == 0, done.stderr
    assert snapshot(backend) == before
    out = done.stdout
    assert "--- a/model.py\n+++ b/model.py\n" in out
    assert "-from label_studio_ml.model import LabelStudioMLBase\n-from label_studio_ml.response import ModelResponse\n" \
           "-from label_studio_ml.utils import DATA_UNDEFINED_NAME\n-import label_studio_ml.utils as ml_utils\n" \
           "+from lsdeploy.model import LabelStudioMLBase\n+from lsdeploy.response import ModelResponse\n" \
           "+from lsdeploy.utils import DATA_UNDEFINED_NAME\n+import lsdeploy.utils as ml_utils\n" in out
    assert "+    TRAIN_EVENTS = (" in out
    assert "-label-studio-ml @ git+https://github.com/HumanSignal/label-studio-ml-backend.git\n" \
           "\\ No newline at end of file\n+lsdeploy\n\\ No newline at end of file\n" in out
    assert "--- a/Dockerfile\n+++ b/Dockerfile\n" in out and '+CMD ["label-studio-ml", "start", "/app"]\n' in out
    assert "Binary file wheels/lsdeploy-" in out
    assert out.splitlines()[-1].startswith(f"would change ") and "(dry run: nothing written)" in out

    as_json = run_cli("port", backend, "--dry-run", "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["status"] == "would change" and data["dry_run"] is True
    assert "model.py" in data["files"] and data["diff"].startswith("--- a/.dockerignore")
    assert snapshot(backend) == before


def test_port_on_a_ported_directory_changes_nothing_and_says_so(tmp_path):
    backend = reference_backend(tmp_path / "keyword_sentiment")
    first = run_cli("port", backend, "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["status"] == "ported"
    after_first = snapshot(backend)

    again = run_cli("port", backend)
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"{backend} is ported already: nothing to change\n"
    assert snapshot(backend) == after_first
    as_json = json.loads(run_cli("port", backend, "--json").stdout)
    assert as_json["status"] == "unchanged" and as_json["files"] == [] and as_json["not_ported"] == []
    assert snapshot(backend) == after_first
    # create does not render over the ported backend's own README, _wsgi.py and requirements
    create = run_cli("create", backend)
    assert create.returncode == 2 and "pass --force" in create.stderr
    assert snapshot(backend) == after_first


NOT_PORTABLE_MODEL = '''\
from unittest import mock

from label_studio_ml.model import LabelStudioMLBase, get_env
from label_studio_ml.cache import create_cache
from label_studio_ml.examples.sklearn_text_classifier.model import SklearnTextClassifier

CACHE = create_cache('redis', path='.')


class Cached(LabelStudioMLBase):
    def predict(self, tasks, context=None, **kwargs):
        with mock.patch('label_studio_ml.model.get_local_path'):
            return []
'''


def test_what_port_cannot_port_is_listed_with_file_and_line(tmp_path):
    compose = FILES["docker-compose.yml"].replace("      - MODEL_DIR=/data/models\n",
                                                  "      - MODEL_DIR=/data/models\n      - CACHE_TYPE=redis\n")
    compose += '  redis:\n    image: redis:alpine\n    ports:\n      - "6379:6379"\n'
    dockerfile = DOCKERFILE.replace("COPY . .\n", "COPY . .\nRUN python download_weights.py --model base\n"
                                                  "ENV WEIGHTS_PATH=/app/weights\n")
    run_line = dockerfile.splitlines().index("RUN python download_weights.py --model base") + 1
    compose_lines = compose.splitlines()
    cache_line = compose_lines.index("      - CACHE_TYPE=redis") + 1
    redis_line = compose_lines.index("  redis:") + 1
    backend = reference_backend(tmp_path / "cached", **{"model.py": NOT_PORTABLE_MODEL, "docker-compose.yml": compose,
                                                         "Dockerfile": dockerfile, "test_api.py": None})

    done = run_cli("port", backend)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    listed = lines[lines.index("not ported (8), change by hand:") + 1:lines.index("not ported (8), change by hand:") + 9]
    assert [line.split(": ", 1)[0].strip() for line in listed] == [
        f"Dockerfile:{run_line}", f"Dockerfile:{run_line + 1}", f"docker-compose.yml:{cache_line}",
        f"docker-compose.yml:{redis_line}", "model.py:3", "model.py:4", "model.py:5", "model.py:12"], listed
    text = "\n".join(listed)
    assert "RUN python download_weights.py --model base: not in the new Dockerfile" in text
    assert "ENV WEIGHTS_PATH: not in the new Dockerfile" in text
    assert "CACHE_TYPE=redis: lsdeploy keeps state in SQLite" in text
    assert "service 'redis' is not this backend" in text
    assert "lsdeploy.model has no get_env" in text
    assert "label_studio_ml.cache (lsdeploy has no such module): not ported" in text
    assert "label_studio_ml.examples.sklearn_text_classifier.model (lsdeploy has no such module)" in text
    assert "the string 'label_studio_ml.model.get_local_path' names a label_studio_ml module" in text
    model = (backend / "model.py").read_text()
    # what is provided is ported; what is not stays as it was, for the user to see
    assert "from lsdeploy.model import LabelStudioMLBase, get_env\n" in model
    assert "from label_studio_ml.cache import create_cache\n" in model
    as_json = json.loads(run_cli("port", backend, "--json").stdout)
    entry = next(e for e in as_json["not_ported"] if e["path"] == "model.py" and e["line"] == 4)
    assert entry["what"].startswith("label_studio_ml.cache (lsdeploy has no such module)")


def test_label_studio_sdk_use_adds_lsdeploy_sdk_to_the_requirements(tmp_path):
    uses_interface = MODEL.replace("        from_name, to_name, value = self.get_first_tag_occurence('Choices', 'Text')",
                                   "        from_name, to_name, value = self.label_interface.get_first_tag_occurence("
                                   "'Choices', 'Text')")
    first = reference_backend(tmp_path / "interface", **{"model.py": uses_interface})
    second = reference_backend(tmp_path / "sdk-import", **{
        "helpers.py": "from label_studio_sdk.label_interface.objects import PredictionValue\n",
        "requirements.txt": "scikit-learn\nlabel-studio-ml @ git+https://github.com/HumanSignal/label-studio-ml-backend.git@master",
        "requirements-base.txt": None})

    for backend in (first, second):
        done = run_cli("port", backend)
        assert done.returncode == 0, done.stderr
        assert "it uses label-studio-sdk: requirements.txt lists lsdeploy[sdk]" in done.stdout
    assert (first / "requirements.txt").read_text() == \
        "# no requirements of its own\n# label-studio-sdk, which this backend uses (label-studio-ml port)\nlsdeploy[sdk]\n"
    assert (first / "requirements-base.txt").read_text() == "gunicorn==23.0.0\nlsdeploy[sdk]"
    assert (second / "requirements.txt").read_text() == "scikit-learn\nlsdeploy[sdk]"  # the reference's line, replaced
    assert run_cli("port", second).stdout == f"{second} is ported already: nothing to change\n"


def test_every_import_form_of_the_reference_is_rewritten(tmp_path):
    from lsdeploy.port import plan

    source = textwrap.dedent('''\
        import label_studio_ml
        import label_studio_ml.model as ml_model
        from label_studio_ml import utils, api as ml_api
        from label_studio_ml.model import (
            LabelStudioMLBase,
        )

        label_studio_ml_backend = "a name that only starts like the package"


        class First(ml_model.LabelStudioMLBase):
            def predict(self, tasks, **kwargs):
                return "naïve", label_studio_ml.utils.DATA_UNDEFINED_NAME, utils.is_skipped, ml_api.init_app


        class Second(LabelStudioMLBase):
            TRAIN_EVENTS = ("START_TRAINING",)  # its own choice: kept


        class Third(label_studio_ml.model.LabelStudioMLBase):
            pass
    ''')
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model.py").write_text(source)
    (tmp_path / "b" / "native.py").write_text("from lsdeploy.model import LabelStudioMLBase\n\n\n"
                                               "class Native(LabelStudioMLBase):\n    pass\n")

    result = plan(tmp_path / "b")

    assert result.unported == []
    assert sorted(result.changes) == [".lsdeploy/rendered.json", "model.py"]  # native.py is lsdeploy's already
    events = '("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")'
    assert result.changes["model.py"].decode() == textwrap.dedent(f'''\
        import lsdeploy
        import lsdeploy.model as ml_model
        from lsdeploy import utils, api as ml_api
        from lsdeploy.model import (
            LabelStudioMLBase,
        )

        label_studio_ml_backend = "a name that only starts like the package"


        class First(ml_model.LabelStudioMLBase):
            # The reference SDK's training events (set by label-studio-ml port): fit sees no other event.
            TRAIN_EVENTS = {events}
            def predict(self, tasks, **kwargs):
                return "naïve", lsdeploy.utils.DATA_UNDEFINED_NAME, utils.is_skipped, ml_api.init_app


        class Second(LabelStudioMLBase):
            TRAIN_EVENTS = ("START_TRAINING",)  # its own choice: kept


        class Third(lsdeploy.model.LabelStudioMLBase):
            # The reference SDK's training events (set by label-studio-ml port): fit sees no other event.
            TRAIN_EVENTS = {events}
            pass
    ''')
    namespace: dict = {}
    exec(compile(result.changes["model.py"], "model.py", "exec"), namespace)  # it imports and runs under lsdeploy
    assert namespace["First"].TRAIN_EVENTS == namespace["Third"].TRAIN_EVENTS == tuple(
        ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING"])
    assert namespace["Second"].TRAIN_EVENTS == ("START_TRAINING",)


def test_a_dockerfile_without_system_packages_and_a_missing_dockerignore_are_the_blueprints(tmp_path):
    from lsdeploy.blueprints import render_dockerfile

    plain = DOCKERFILE.replace("        git libgl1 tesseract-ocr; \\\n", "        ; \\\n")
    backend = reference_backend(tmp_path / "plain", **{"Dockerfile": plain, ".dockerignore": None})
    assert run_cli("port", backend).returncode == 0
    assert (backend / "Dockerfile").read_text() == render_dockerfile(backend)
    assert (backend / ".dockerignore").read_text() == \
        (Path(render_dockerfile.__code__.co_filename).parent.parent / "blueprints/_common/dockerignore.j2").read_text()
    manifest = json.loads((backend / ".lsdeploy" / "rendered.json").read_text())
    assert sorted(manifest["files"]) == [".dockerignore", "Dockerfile",
                                         f"wheels/{next((backend / 'wheels').iterdir()).name}"]


@pytest.mark.parametrize("target, message", [
    ("missing", "does not exist; pass the directory of a backend written for label_studio_ml"),
    ("model.py", "is not a directory; pass the backend's directory"),
])
def test_errors_are_one_line_naming_the_problem_and_the_fix(tmp_path, target, message):
    (tmp_path / "model.py").write_text("")
    done = run_cli("port", tmp_path / target)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr and done.stderr.startswith("error: ")


@pytest.mark.parametrize("before, added", [
    ("**\n!*.py\n!requirements*.txt\n", ["!wheels"]),  # the reference examples' style
    ("data\n*.txt\n", ["!requirements.txt", ".lsdeploy", "**/.env", "**/.env.*", ".git", "docker-compose*.yml",
                       "docker-compose*.yaml"]),
    ("**\n!*.py\n!wheels\n", ["!requirements.txt"]),
    (".git\n.lsdeploy\n**/.env*\ndocker-compose*\n", []),
    ("**\n!*.py\n!requirements*.txt\n!wheels\n!docker-compose.yml\n", ["docker-compose*.yml"]),
])
def test_the_dockerignore_lets_the_new_dockerfiles_inputs_in_and_local_state_out(before, added):
    from lsdeploy.port import _port_dockerignore

    after = _port_dockerignore(before, "wheels/lsdeploy-0.1.0-py3-none-any.whl")
    assert after.startswith(before)
    assert [line for line in after[len(before):].splitlines() if not line.startswith("#")] == added


def test_requirements_in_utf16_are_read_and_other_encodings_named(tmp_path):
    """PowerShell's `pip freeze > requirements.txt` writes UTF-16 with a BOM, which pip reads: port
    reads it too (and writes UTF-8). A file in another encoding is one line naming it."""
    (tmp_path / "model.py").write_text("from label_studio_ml.model import LabelStudioMLBase\n\n\n"
                                       "class M(LabelStudioMLBase):\n    pass\n")
    (tmp_path / "requirements.txt").write_bytes("label-studio-ml @ git+https://example.invalid/x.git\nnumpy\n"
                                                .encode("utf-16"))
    done = run_cli("port", tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "requirements.txt").read_text(encoding="utf-8").splitlines() == ["lsdeploy", "numpy"]

    (tmp_path / "requirements-test.txt").write_bytes("pytest\n# caf\xe9\n".encode("latin-1"))
    done = run_cli("port", tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "requirements-test.txt is not UTF-8 text: save it as UTF-8 and run port again" in done.stderr
