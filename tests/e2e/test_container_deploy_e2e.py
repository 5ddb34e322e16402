"""`deploy gcp` with real images: the Cloud Build fake builds the uploaded bundle with the container
engine (tests/engine.py), the Artifact Registry fake records the image's real digest, and the
Cloud Run fake runs that image in a container (tests/fakes/containers.py), which a real Label
Studio registers and asks for predictions. Then the mistakes only a real image shows: a CMD in
shell form (SIGTERM never reaches the server: killed after Cloud Run's 10 s), a requirement
missing from the image, a Dockerfile that does not build.

Every test here needs an engine (`bash tests/containers.sh install`); without one they skip with
the reason, and the other deploy tests run the same flow with the process runner.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests
from google.cloud import run_v2
from google.cloud.devtools import cloudbuild_v1 as cb
from google.protobuf import field_mask_pb2

from engine import engine, why_no_engine
from fakes.fixtures import FAST_POLLING
from gcp_support import PROJECT, REGION, provider_for, settings_for
from labelstudio_server import import_tasks
from lsdeploy.blueprints import create
from lsdeploy.bundle import SourceBundle
from lsdeploy.errors import EXIT_BUILD, EXIT_DEPLOY, LsdeployError
from lsdeploy.providers.gcp import GcpClients
from support import TEXT_CONFIG, predict_body, run_cli, text_task
from test_labelstudio import NEGATIVE, POSITIVE, choices, retrieve_predictions

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(engine() is None, reason=f"no container engine: {why_no_engine()}")]

# A model that answers by keyword: version 1 says Positive to everything, version 2 reads the text.
MODEL = '''from lsdeploy.model import LabelStudioMLBase
from lsdeploy.response import ModelResponse, PredictionValue


class KeywordModel(LabelStudioMLBase):
    def predict(self, tasks, context=None, **kwargs):
        from_name, to_name, _ = self.get_first_tag_occurence("Choices", "Text")
        predictions = []
        for task in tasks:
            label = {label}
            predictions.append(PredictionValue(score=0.9, model_version="{version}", result=[{{
                "from_name": from_name, "to_name": to_name, "type": "choices", "value": {{"choices": [label]}}}}]))
        return ModelResponse(predictions=predictions)
'''
EVERYTHING_POSITIVE = MODEL.format(label='"Positive"', version="v1")
BY_KEYWORD = MODEL.format(label='"Negative" if any(w in task["data"]["text"] for w in ("bad", "awful", "terrible", '
                                '"horrible", "sad")) else "Positive"', version="v2")


@pytest.fixture
def gcs(own_emulator):
    return own_emulator


@pytest.fixture
def cloud(make_gcp_fakes, gcs):
    cloud = make_gcp_fakes(runner=True, storage_url=gcs.url, engine=engine())
    print(f"\nGoogle API fakes: builds and revisions run as {cloud.revision_runner}")
    return cloud


def backend(directory: Path, model: str = EVERYTHING_POSITIVE) -> Path:
    create(directory)
    (directory / "model.py").write_text(model)
    return directory


def last_build(cloud):
    return list(cloud.cloudbuild.builds.values())[-1]


def step_cached(log: list[str], instruction: str) -> bool:
    """Whether the engine reused its layer for the build step whose instruction contains
    `instruction` (podman / Docker's classic builder: `--> Using cache` after the step; BuildKit:
    `CACHED` on the step's line)."""
    for index, line in enumerate(log):
        if re.search(r"^(STEP \d+/\d+|Step \d+/\d+ :|#\d+ \[)", line) and instruction in line:
            if "CACHED" in line:
                return True
            following = [later for later in log[index + 1:index + 3] if later.strip()]
            return bool(following) and "Using cache" in following[0]
    raise AssertionError(f"no build step with {instruction!r} in the engine's log")


def assert_stopped_on_sigterm(process) -> dict:
    """The revision's container, replaced by a new revision, ended on SIGTERM within Cloud Run's 10 s
    (else the server never saw SIGTERM: a shell-form CMD or a wrapper that is not exec'd)."""
    termination = process.wait_stopped(60)
    assert termination is not None, f"revision {process.revision} was never stopped after its replacement"
    assert not termination["killed"], (
        f"revision {process.revision} ignored SIGTERM and was killed 10 s later, as Cloud Run would: the server "
        f"never received the signal (a shell-form CMD makes /bin/sh PID 1; write CMD in exec form, "
        f'CMD ["label-studio-ml", "start", "/app"]). End of its log:\n{process.log_tail()}')
    assert termination["exit_code"] == 0, f"revision {process.revision} exited with {termination['exit_code']}"
    return termination


def secret_in_any_argv(secret: str) -> list[str]:
    """Command lines of this machine's processes that contain `secret`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes()
        except OSError:
            continue
        if secret.encode() in argv:
            found.append(argv.replace(b"\0", b" ").decode(errors="replace")[:200])
    return found


def test_deploy_builds_the_real_image_and_label_studio_gets_its_predictions(label_studio, ls_api, project, cloud,
                                                                            tmp_path):
    directory = backend(tmp_path / "keywords")
    pid = project(POSITIVE[:2] + NEGATIVE[:2])
    env = {**cloud.env, "GCP_PROJECT": "e2e-project", "GCP_REGION": "us-central1",
           "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.legacy_token,
           "LSDEPLOY_MIN_INSTANCES": "0"}
    done = run_cli("deploy", "gcp", directory, "--project", pid, "--json", env=env, timeout=900)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["built"] is True

    # the registry holds the engine's image under its real digest; the revision runs that image
    digest = result["image"].rsplit("@", 1)[1]
    build = last_build(cloud)
    assert build.engine_images == [digest] and cloud.engine.image_id(digest) == digest
    (pushed,) = {image.digest: image for image in build.pushed}.values()
    assert pushed.local == digest and pushed.size == cloud.engine.size(digest)
    revision = cloud.run.process(result["revision"])
    assert type(revision).__name__ == "ContainerRevision" and revision.image == digest
    assert revision.container.exec(["id", "-u"]).stdout.strip() == "10001"  # the image's non-root user
    password = GcpClients.from_env(cloud.env, "e2e-project").secrets.access_secret_version(
        name=f"projects/e2e-project/secrets/{result['service']}-basic-auth-pass/versions/latest").payload.data.decode()
    assert secret_in_any_argv(password) == [] and secret_in_any_argv(label_studio.legacy_token) == []
    assert json.loads(revision.container.exec(["python", "-c", "import os, json; print(json.dumps(dict(os.environ)))"])
                      .stdout)["BASIC_AUTH_PASS"] == password  # the secret reference, resolved

    # registered in the real Label Studio, which gets the container's predictions through the proxy
    (registration,) = result["registrations"]
    assert registration["state"] == "CO" and ls_api.get_backend(registration["backend_id"])["url"].rstrip("/") \
        == result["url"]
    predictions = retrieve_predictions(ls_api, pid)
    assert len(predictions) == 4
    assert all(choices(preds[0]) == ["Positive"] and preds[0]["model_version"] == "v1"
               for preds in predictions.values())

    # a code change: a new image whose dependency layer is the old one's, a new container, the old
    # one stopped by SIGTERM within Cloud Run's 10 s
    (directory / "model.py").write_text(BY_KEYWORD)
    again = run_cli("deploy", "gcp", directory, "--project", pid, "--json", env=env, timeout=900)
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert second["built"] is True and second["image"] != result["image"] and second["revision"] != result["revision"]
    rebuilt = last_build(cloud)
    latest = f"us-central1-docker.pkg.dev/e2e-project/lsdeploy/{result['service']}:latest"
    assert f"manifest for {latest} not found" in cloud.cloudbuild.log_text(build.build.id)  # `|| exit 0`
    assert f"Status: Downloaded newer image for {latest}" in cloud.cloudbuild.log_text(rebuilt.build.id)
    assert rebuilt.cache_from == [(latest, True)]
    assert rebuilt is not build and step_cached(rebuilt.engine_log, "pip install")
    # the new image is the old one's layers up to the dependency layer, with a code layer of its own
    # holding the change. (Not "the COPY step was not cached": another session sharing the engine's
    # storage may have built this very context already, and its layer is then rightly reused.)
    old_layers, new_layers = cloud.engine.layer_ids(build.engine_images[-1]), cloud.engine.layer_ids(rebuilt.engine_images[-1])
    assert len(old_layers) == len(new_layers) and old_layers[:-1] == new_layers[:-1]
    assert old_layers[-1] != new_layers[-1]
    new_revision = cloud.run.process(second["revision"])
    assert new_revision.container.exec(["cat", "/app/model.py"]).stdout == BY_KEYWORD
    assert assert_stopped_on_sigterm(revision)["seconds"] < 10
    assert "Container called exit(0)." in revision.log_text()
    assert second["label_studio_backend_ids"] == result["label_studio_backend_ids"]
    new_id, = import_tasks(ls_api, pid, [NEGATIVE[0]])
    (fresh,) = retrieve_predictions(ls_api, pid)[new_id]
    assert choices(fresh) == ["Negative"] and fresh["model_version"] == "v2"


def test_a_shell_form_cmd_is_caught_its_server_never_gets_sigterm(cloud, tmp_path):
    directory = backend(tmp_path / "shell-form")
    dockerfile = directory / "Dockerfile"
    text = dockerfile.read_text()
    assert 'CMD ["label-studio-ml", "start", "/app"]' in text
    dockerfile.write_text(text.replace('CMD ["label-studio-ml", "start", "/app"]', "CMD label-studio-ml start /app"))
    provider = provider_for(cloud)
    first = provider.deploy(settings_for("shellform"), SourceBundle.from_directory(directory), lambda line: None)
    assert requests.get(first.url + "/health", timeout=30).json()["status"] == "UP"  # it serves...
    replaced = cloud.run.process(first.revision)
    (directory / "model.py").write_text(BY_KEYWORD)
    second = provider.deploy(settings_for("shellform"), SourceBundle.from_directory(directory), lambda line: None)
    # ...but the replacement's SIGTERM reaches /bin/sh (PID 1, which ignores it), not the server
    with pytest.raises(AssertionError, match="ignored SIGTERM and was killed 10 s later.*shell-form CMD"):
        assert_stopped_on_sigterm(replaced)
    assert replaced.termination["killed"] and replaced.termination["seconds"] >= 10
    assert "Container terminated on signal 9" in replaced.log_text()
    cloud.run.process(second.revision).stop(grace=1)  # the same image: no need to wait 10 s more at teardown


def test_a_requirement_missing_from_the_image_fails_the_deploy(cloud, make_gcp_fakes, gcs, tmp_path):
    # google-cloud-run is in the test venv (the gcp extra) but not in the image (lsdeploy[gcs])
    model = EVERYTHING_POSITIVE.replace("from lsdeploy.model", "import google.cloud.run_v2  # noqa: F401\n"
                                                               "from lsdeploy.model")
    directory = backend(tmp_path / "missing", model)
    env = {**cloud.env, "GCP_PROJECT": PROJECT, "GCP_REGION": REGION, "LSDEPLOY_SOURCE_BUCKET": "src-missing",
           "LSDEPLOY_STATE_BUCKET": "state-missing", "LSDEPLOY_MIN_INSTANCES": "0"}
    done = run_cli("deploy", "gcp", directory, "--service", "missing", env=env, timeout=900)
    assert done.returncode == EXIT_DEPLOY, done.stderr
    assert "The user-provided container failed to start" in done.stderr and "Traceback" not in done.stderr
    # Cloud Run's words hold nothing the container printed: the deploy read the revision's log
    assert "its log says: error: importing /app/model.py failed: no module named 'google.cloud.run_v2'" \
        in done.stderr

    # the process runner, whose interpreter is the test venv, would have let it through
    processes = make_gcp_fakes(runner=True, storage_url=gcs.url)
    assert processes.revision_runner == "local processes (builds on paper)"
    env.update(processes.env, LSDEPLOY_SOURCE_BUCKET="src-missing-p", LSDEPLOY_STATE_BUCKET="state-missing-p")
    assert run_cli("deploy", "gcp", directory, "--service", "missing", env=env, timeout=900).returncode == 0


def test_a_dockerfile_that_does_not_build_fails_the_build_with_the_engines_log(cloud, tmp_path):
    directory = backend(tmp_path / "unbuildable")
    (directory / "requirements.txt").write_text("not-a-package==1.0\n")
    (directory / "Dockerfile").write_text(
        "FROM python:3.11-slim\nWORKDIR /app\nCOPY requirements.txt ./\n"
        "RUN pip install --no-index -r requirements.txt\nCOPY . /app\nCMD [\"label-studio-ml\", \"start\", \"/app\"]\n")
    env = {**cloud.env, "GCP_PROJECT": PROJECT, "GCP_REGION": REGION, "LSDEPLOY_SOURCE_BUCKET": "src-unbuildable",
           "LSDEPLOY_STATE_BUCKET": "state-unbuildable"}
    done = run_cli("deploy", "gcp", directory, "--service", "unbuildable", env=env, timeout=900)
    assert done.returncode == EXIT_BUILD, done.stderr
    assert "the image build failed (FAILURE) at step 1 (build)" in done.stderr
    assert "No matching distribution found for not-a-package==1.0" in done.stderr  # pip's own words, from the engine
    build = last_build(cloud)
    assert build.engine_images == [] and build.pushed == []
    assert "build exited with a non-zero status" in cloud.cloudbuild.log_text(build.build.id)


def test_a_build_past_its_timeout_is_stopped_and_the_deploy_says_which_option_to_raise(cloud, tmp_path):
    # Cloud Build stops a build at its `timeout` (TIMEOUT); with real builds the fake does too
    directory = backend(tmp_path / "slowbuild")
    (directory / "Dockerfile").write_text(
        "FROM python:3.11-slim\nRUN echo compiling the world && sleep 40\nWORKDIR /app\nCOPY . /app\n"
        "CMD [\"label-studio-ml\", \"start\", \"/app\"]\n")
    with pytest.raises(LsdeployError) as info:
        provider_for(cloud).deploy(settings_for("slowbuild", build_timeout=6), SourceBundle.from_directory(directory),
                                   lambda line: None)
    text = str(info.value)
    assert info.value.exit_code == EXIT_BUILD and "timed out after 6 s (--build-timeout): raise it" in text
    build = last_build(cloud)
    timing = build.final.steps[1].timing  # the build step was stopped at the deadline, not when its RUN ended
    assert timing.end_time.ToNanoseconds() - timing.start_time.ToNanoseconds() < 35e9
    assert build.final.status == cb.Build.Status.TIMEOUT and build.final.steps[1].status == cb.Build.Status.TIMEOUT
    assert build.engine_images == [] and build.pushed == []
    assert "ERROR: context deadline exceeded" in cloud.cloudbuild.log_text(build.build.id)
    assert cloud.log.count(api="run", method="CreateService") == 0


def test_traffic_back_to_a_scaled_down_revision_starts_its_image_again(cloud, tmp_path):
    directory = backend(tmp_path / "rollback")
    provider = provider_for(cloud)
    lines = []
    first = provider.deploy(settings_for("rollback"), SourceBundle.from_directory(directory), lines.append)
    # the engine's own output, streamed from the logs bucket while the build ran
    assert any(line.startswith("  build | ") and re.search(r"STEP \d+/\d+: RUN .*pip install", line) for line in lines)
    (directory / "model.py").write_text(BY_KEYWORD)
    second = provider.deploy(settings_for("rollback"), SourceBundle.from_directory(directory), lambda line: None)
    old = cloud.run.process(first.revision)
    assert old.wait_stopped(60) is not None and old.state == "stopped" and old.container is None
    body = predict_body([text_task(1, "awful")], label_config=TEXT_CONFIG)
    password = GcpClients.from_env(cloud.env, PROJECT).secrets.access_secret_version(
        name=f"projects/{PROJECT}/secrets/rollback-basic-auth-pass/versions/latest").payload.data.decode()
    auth = ("labelstudio", password)

    def served_version():
        answer = requests.post(second.url + "/predict", json=body, auth=auth, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()["results"][0]["model_version"]

    assert served_version() == "v2"
    # traffic pinned to the first revision: its container was removed at scale-down; the next
    # request starts its image again, in a new container
    services = GcpClients.from_env(cloud.env, PROJECT).services
    name = f"projects/{PROJECT}/locations/{REGION}/services/rollback"
    pinned = run_v2.TrafficTarget(type_=run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION,
                                  revision=first.revision, percent=100)
    services.update_service(request=run_v2.UpdateServiceRequest(
        service=run_v2.Service(name=name, traffic=[pinned]), update_mask=field_mask_pb2.FieldMask(paths=["traffic"]))
    ).result(polling=FAST_POLLING)
    assert served_version() == "v1"
    assert old.state == "ready" and len(old.containers) == 2 and old.container.running()
    assert assert_stopped_on_sigterm(cloud.run.process(second.revision))["seconds"] < 10
