"""`deploy gcp` against the Google API fakes (tests/fakes) and a real fake-gcs-server.

The Cloud Run fake runs each revision as a local process from the bundle its image was built
from, so a deployed backend is a real `label-studio-ml start` answering on 127.0.0.1.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from types import SimpleNamespace

import pytest
import requests
from google.api_core import exceptions as gexc
from google.cloud import run_v2
from google.cloud.devtools import cloudbuild_v1 as cb
from google.protobuf import duration_pb2

from fakes.fixtures import FAST_POLLING, make_clients
from gcp_support import PROJECT, REGION, backend, deploy, provider_for, settings_for  # noqa: F401
from support import TEXT_CONFIG, predict_body, run_cli, text_task

from lsdeploy.bundle import SourceBundle
from lsdeploy.errors import EXIT_AUTH, EXIT_BUILD, EXIT_DEPLOY, EXIT_USAGE, LsdeployError
from lsdeploy.providers.gcp import GcpClients, GcpProvider, GcpSettings
from lsdeploy.providers.gcp.errors import role_for

@pytest.fixture
def gcs(gcs_emulator):
    return gcs_emulator


@pytest.fixture
def cloud(make_gcp_fakes, gcs):
    return make_gcp_fakes(runner=True, storage_url=gcs.url)


@pytest.fixture
def api_cloud(make_gcp_fakes, gcs):
    """Fakes without the runner (revisions count as ready after a short delay)."""
    return make_gcp_fakes(storage_url=gcs.url)


def basic_auth_password(cloud, service):
    clients = GcpClients.from_env(cloud.env, PROJECT)
    version = clients.secrets.access_secret_version(name=f"projects/{PROJECT}/secrets/{service}-basic-auth-pass/versions/latest")
    return version.payload.data.decode()


def test_first_deploy_unchanged_redeploy_and_code_change(cloud, backend):
    lines = []
    first = deploy(cloud, backend, settings_for("first"), lines)
    assert first.built and first.new_revision and first.revision.startswith("first-00001-")
    assert first.image.startswith(f"{REGION}-docker.pkg.dev/{PROJECT}/lsdeploy/first@sha256:")
    assert first.state_uri == "gs://state-first/first"
    assert any(line.startswith("  build | ") for line in lines), "the build log is streamed"
    assert cloud.log.count(api="cloudbuild", method="CreateBuild") == 1

    # the service runs the backend, public at the front end, protected by basic auth
    assert requests.get(first.url + "/health", timeout=30).json()["status"] == "UP"
    body = predict_body([text_task(1, "great")], label_config=TEXT_CONFIG)
    assert requests.post(first.url + "/predict", json=body, timeout=30).status_code == 401
    answer = requests.post(first.url + "/predict", json=body, auth=("labelstudio", basic_auth_password(cloud, "first")),
                           timeout=30)
    assert answer.status_code == 200 and len(answer.json()["results"]) == 1
    service = GcpClients.from_env(cloud.env, PROJECT).services.get_service(
        name=f"projects/{PROJECT}/locations/{REGION}/services/first")
    container = service.template.containers[0]
    assert container.image == first.image
    assert container.resources.cpu_idle is False and container.resources.startup_cpu_boost is True
    assert container.startup_probe.http_get.path == "/health"
    assert service.invoker_iam_disabled is True
    env = {e.name: e for e in container.env}
    assert env["MODEL_STATE_URI"].value == "gs://state-first/first"
    assert env["BASIC_AUTH_PASS"].value_source.secret_key_ref.secret.endswith("/secrets/first-basic-auth-pass")
    assert env["BASIC_AUTH_PASS"].value == ""

    # unchanged: no upload, no build, no new revision, same result
    storage = GcpClients.from_env(cloud.env, PROJECT).storage
    objects = lambda: sorted((b.name, b.generation) for b in storage.list_blobs("src-first", prefix="sources/"))  # noqa: E731
    uploaded = objects()
    assert len(uploaded) == 1
    cloud.log.clear()
    again = deploy(cloud, backend, settings_for("first"))
    assert cloud.log.count(api="cloudbuild", method="CreateBuild") == 0
    assert cloud.log.count(api="run", method="CreateService") == cloud.log.count(api="run", method="UpdateService") == 0
    assert cloud.log.mutating() == []
    assert objects() == uploaded
    assert not again.built and not again.new_revision
    assert (again.url, again.revision, again.image) == (first.url, first.revision, first.image)
    assert len(list(GcpClients.from_env(cloud.env, PROJECT).revisions.list_revisions(parent=service.name))) == 1

    # code change: one build reusing the previous image as cache, one new revision
    (backend / "model.py").write_text((backend / "model.py").read_text() + "\n# a change\n")
    cloud.log.clear()
    changed = deploy(cloud, backend, settings_for("first"))
    builds = cloud.log.filter(api="cloudbuild", method="CreateBuild")
    assert len(builds) == 1
    record = cloud.cloudbuild.record(changed.build_id)
    assert any(found for _, found in record.cache_from), record.cache_from
    assert changed.built and changed.new_revision and changed.revision != first.revision
    assert changed.image != first.image and changed.url == first.url
    assert len(list(GcpClients.from_env(cloud.env, PROJECT).revisions.list_revisions(parent=service.name))) == 2
    assert requests.get(changed.url + "/health", timeout=30).status_code == 200


def test_secrets_never_plain_env_values(api_cloud, backend):
    # a proxy password in Label Studio's address, a key read from a file with its line break
    settings = settings_for("secretive", label_studio_url="http://proxy:proxy-pass-42@label-studio.example",
                            label_studio_api_key="legacy-key-0123456789\n", env={"MODE": "fast"})
    result = deploy(api_cloud, backend, settings)
    stored = {value.decode() for value in api_cloud.secretmanager.all_values()}
    assert "legacy-key-0123456789" in stored and len(stored) == 2
    writes = api_cloud.log.filter(api="run", mutating=True)
    assert writes
    for entry in writes:
        if not entry.request.service.template.containers:
            continue
        for env in entry.request.service.template.containers[0].env:
            assert env.value not in stored
        names = {env.name for env in entry.request.service.template.containers[0].env
                 if env.value_source.secret_key_ref.secret}
        assert names == {"BASIC_AUTH_PASS", "LABEL_STUDIO_API_KEY"}
        plain = {env.name: env.value for env in entry.request.service.template.containers[0].env}
        assert plain["LABEL_STUDIO_URL"] == "http://label-studio.example"
    assert all("proxy-pass-42" not in json.dumps(entry.body or {}) for entry in api_cloud.log.entries)
    # the key travels only in the Secret Manager payload, never in any other request
    for entry in api_cloud.log.entries:
        if entry.method != "AddSecretVersion":
            assert "legacy-key-0123456789" not in json.dumps(entry.body or {}) + entry.path + json.dumps(entry.query)
    assert len(result.secrets) == 2 and "legacy-key-0123456789" not in json.dumps(result.to_dict())


def test_user_secrets_are_checked_and_granted(cloud, backend):
    from test_plan_gcp import user_secret

    # a missing secret stops the deploy before anything is written
    done = run_cli("deploy", "gcp", backend, "--service", "usersecret", "--secret", "HF_TOKEN=hf-token",
                   env={**cloud.env, "GCP_PROJECT": PROJECT, "GCP_REGION": REGION,
                        "LSDEPLOY_SOURCE_BUCKET": "src-usersecret", "LSDEPLOY_STATE_BUCKET": "state-usersecret"})
    assert done.returncode == EXIT_USAGE and "secret projects/demo-project/secrets/hf-token does not exist" in done.stderr
    assert "gcloud secrets create hf-token" in done.stderr and cloud.log.mutating() == []

    # an existing one: the runtime identity is granted read access, and the backend sees the value
    name = user_secret(cloud, "hf-token", "hf-value-123")
    result = deploy(cloud, backend, settings_for("usersecret", secret_env={"HF_TOKEN": "hf-token"}))
    runtime = f"serviceAccount:{name.split('/')[1]}-compute@developer.gserviceaccount.com"
    assert cloud.secretmanager.can_access(name, runtime)
    assert any(s.endswith("/secrets/hf-token") for s in result.secrets)
    assert "hf-value-123" not in json.dumps(result.to_dict())

    # a deployer that may not administer the secret: a note with the command, and the deploy goes on
    other = user_secret(cloud, "db-pass", "db-value")
    cloud.secretmanager.grant_project_access(runtime)
    cloud.deny("secretmanager", "SetIamPolicy")
    lines = []
    again = deploy(cloud, backend, settings_for("usersecret", secret_env={"HF_TOKEN": "hf-token", "DB": "db-pass"}), lines)
    assert again.new_revision
    note = next(line for line in lines if line.startswith("note: could not grant"))
    assert other.split("/")[-1] in note and "gcloud secrets add-iam-policy-binding" in note and "roles/secretmanager.secretAccessor" in note


def test_failed_build_deploys_nothing(api_cloud, backend):
    api_cloud.cloudbuild.fail_next(step=1, log_lines=["ERROR: No matching distribution found for not-a-package"])
    with pytest.raises(LsdeployError) as info:
        deploy(api_cloud, backend, settings_for("broken"))
    message = str(info.value)
    assert info.value.exit_code == EXIT_BUILD
    assert "step 1 (build)" in message and "No matching distribution found for not-a-package" in message
    assert api_cloud.log.count(api="run", method="CreateService") == 0
    assert api_cloud.log.count(api="secretmanager", method="CreateSecret") == 0


def test_a_build_that_times_out_names_the_option_to_raise(api_cloud, backend):
    api_cloud.cloudbuild.time_out_next()
    with pytest.raises(LsdeployError) as info:
        deploy(api_cloud, backend, settings_for("slow"))
    text = str(info.value)
    assert info.value.exit_code == EXIT_BUILD and "\n" not in text
    assert "the image build timed out after 1800 s (--build-timeout): raise it (at most 86400)" in text
    assert "ERROR: context deadline exceeded" in text and "nothing was deployed" in text
    assert api_cloud.log.count(api="run", method="CreateService") == 0


def test_cli_build_timeout_reaches_the_build_and_is_checked(api_cloud, backend):
    env = {**api_cloud.env, "GCP_PROJECT": PROJECT, "GCP_REGION": REGION, "LSDEPLOY_SOURCE_BUCKET": "src-bt",
           "LSDEPLOY_STATE_BUCKET": "state-bt", "LSDEPLOY_BUILD_TIMEOUT": "7200"}
    done = run_cli("deploy", "gcp", backend, "--service", "bt", "--no-basic-auth", env=env)
    assert done.returncode == 0, done.stderr
    (build,) = [e.body for e in api_cloud.log.filter(api="cloudbuild", method="CreateBuild")]
    assert build["timeout"] == "7200s"
    done = run_cli("deploy", "gcp", backend, "--service", "bt", "--build-timeout", "90000", env=env)
    assert done.returncode == EXIT_USAGE and "--build-timeout" in done.stderr and "Traceback" not in done.stderr
    # Google's limit, in the fake too: a build of more than 24 hours is refused
    with pytest.raises(gexc.BadRequest, match="at most 24h"):
        make_clients(api_cloud.url).builds.create_build(project_id=PROJECT, build=cb.Build(
            steps=[cb.BuildStep(name="gcr.io/cloud-builders/docker", args=["version"])],
            timeout=duration_pb2.Duration(seconds=90000)))


def test_revision_never_ready_keeps_traffic(cloud, backend):
    first = deploy(cloud, backend, settings_for("flaky"))
    cloud.run.never_ready("flaky", message="The user-provided container failed to start and listen on the port.")
    (backend / "model.py").write_text((backend / "model.py").read_text() + "\n# another change\n")
    with pytest.raises(LsdeployError) as info:
        deploy(cloud, backend, settings_for("flaky"))
    assert info.value.exit_code == EXIT_DEPLOY
    assert "failed to start and listen on the port" in str(info.value)
    assert f"traffic stays on the previous revision: {first.revision}" in str(info.value)
    service = GcpClients.from_env(cloud.env, PROJECT).services.get_service(
        name=f"projects/{PROJECT}/locations/{REGION}/services/flaky")
    assert service.latest_ready_revision.endswith(first.revision)
    assert requests.get(first.url + "/health", timeout=30).status_code == 200


def test_a_revision_that_does_not_start_is_explained_from_its_log(cloud, backend):
    # Cloud Run's condition says only "failed to start ... Logs for this revision might contain more
    # information": the deploy reads the end of the revision's log (Cloud Logging) and says why
    first = deploy(cloud, backend, settings_for("crashes"))
    (backend / "model.py").write_text("import no_such_module_here  # noqa\n" + (backend / "model.py").read_text())
    lines = []
    with pytest.raises(LsdeployError) as info:
        deploy(cloud, backend, settings_for("crashes"), lines)
    text = str(info.value)
    assert info.value.exit_code == EXIT_DEPLOY and "The user-provided container failed to start" in text
    assert "\n" not in text and "Logs URL: https://console.cloud.google.com/logs/viewer?" in text  # one line
    assert "its log says: error: importing" in text and "no_such_module_here" in text
    assert f"traffic stays on the previous revision: {first.revision}" in text
    assert any(line.startswith("the last lines of revision crashes-00002-") for line in lines), lines
    assert any(line.startswith("  log | ") and "no_such_module_here" in line for line in lines)
    listed = cloud.log.filter(api="logging", method="ListLogEntries")
    assert listed and listed[0].body["resourceNames"] == [f"projects/{PROJECT}"]
    assert 'resource.labels.revision_name="crashes-00002-' in listed[0].body["filter"]


def test_the_telling_line_of_a_log_is_lsdeploys_error_then_an_exceptions_last_line():
    from lsdeploy.providers.gcp.run_logs import reason_of

    traceback = ["[INFO] Starting gunicorn 23.0.0", "Traceback (most recent call last):",
                 '  File "/app/model.py", line 1, in <module>', "ModuleNotFoundError: No module named 'torch'",
                 "[INFO] Shutting down: Master"]
    assert reason_of(traceback) == "ModuleNotFoundError: No module named 'torch'"
    assert reason_of(traceback + ["error: importing /app/model.py failed: no module named 'torch'"]) \
        == "error: importing /app/model.py failed: no module named 'torch'"
    assert reason_of(["[ERROR] Worker (pid:7) was sent SIGKILL!", "[INFO] Booting worker"]).startswith("[ERROR]")
    assert reason_of(["all is well"]) == ""


def test_a_log_that_may_not_be_read_is_a_note_in_the_error_not_a_second_failure(cloud, backend):
    deploy(cloud, backend, settings_for("unread"))
    cloud.deny("logging", "ListLogEntries")
    (backend / "model.py").write_text("raise SystemExit(3)\n")
    with pytest.raises(LsdeployError) as info:
        deploy(cloud, backend, settings_for("unread"))
    text = str(info.value)
    assert info.value.exit_code == EXIT_DEPLOY and "failed to start" in text
    assert "its log could not be read: Cloud Logging API" in text and "logging.logEntries.list" in text
    assert "roles/logging.viewer" in text


def test_permission_denied_names_permission_and_role(api_cloud, backend):
    # the service sets invoker_iam_disabled (Label Studio sends no Google identity token): run.developer
    # cannot, so a refused create names roles/run.admin
    api_cloud.deny("run", "CreateService")
    with pytest.raises(LsdeployError) as info:
        deploy(api_cloud, backend, settings_for("denied"))
    message = str(info.value)
    assert info.value.exit_code == EXIT_AUTH
    assert "run.services.create" in message and "roles/run.admin" in message and "\n" not in message
    # Cloud Run names permissions in lower case
    api_cloud.server.clear_faults()
    api_cloud.deny("run", "CreateService", permission="iam.serviceaccounts.actAs")
    with pytest.raises(LsdeployError) as info:
        deploy(api_cloud, backend, settings_for("denied"))
    assert "roles/iam.serviceAccountUser" in str(info.value) and info.value.exit_code == EXIT_AUTH
    assert role_for("iam.serviceaccounts.actas") == role_for("iam.serviceAccounts.actAs") == \
        "roles/iam.serviceAccountUser"
    assert role_for("SECRETMANAGER.versions.access") == "roles/secretmanager.secretAccessor"


def test_api_not_enabled_says_how_to_enable(api_cloud, backend):
    api_cloud.disable_api("cloudbuild")
    with pytest.raises(LsdeployError) as info:
        deploy(api_cloud, backend, settings_for("disabled"))
    assert "Cloud Build API is not enabled" in str(info.value)
    assert f"gcloud services enable cloudbuild.googleapis.com --project {PROJECT}" in str(info.value)
    assert api_cloud.log.count(api="run") == 0


def test_the_build_runs_in_the_services_region_over_rest(api_cloud, backend):
    deploy(api_cloud, backend, settings_for("regional"))
    create = api_cloud.log.filter(api="cloudbuild", method="CreateBuild")[-1]
    assert create.path == f"/v1/projects/{PROJECT}/locations/{REGION}/builds" and "parent" not in create.query
    assert [r.location for r in api_cloud.cloudbuild.builds.values()] == [REGION]


def test_quota_error(api_cloud, backend):
    api_cloud.quota("artifactregistry", "GetTag", times=1)
    with pytest.raises(LsdeployError, match="quota"):
        deploy(api_cloud, backend, settings_for("quota"))


def test_a_gpu_service_refused_for_quota_says_how_to_get_gpu_quota(api_cloud, backend):
    api_cloud.quota("run", "CreateService", times=1)
    with pytest.raises(LsdeployError, match="no Cloud Run GPU quota") as info:
        deploy(api_cloud, backend, settings_for("gpu-quota", gpu=1, cpu="4", memory="16Gi"))
    assert f"Nvidia L4 GPU allocation, per project per region' for {REGION}" in str(info.value)


def test_own_dockerfile_is_built_and_run(cloud, backend):
    (backend / "Dockerfile").write_text(
        "FROM python:3.12-slim\nWORKDIR /srv\nCOPY wheels/ /tmp/wheels/\nRUN pip install /tmp/wheels/*.whl\n"
        "COPY . /srv\nENV MODEL_DIR=/srv/state\nCMD label-studio-ml start /srv --host 0.0.0.0 --port $PORT\n")
    bundle = SourceBundle.from_directory(backend)
    assert bundle.dockerfile == "own"
    result = provider_for(cloud).deploy(settings_for("own-dockerfile"), bundle)
    assert requests.get(result.url + "/health", timeout=30).status_code == 200
    process = cloud.run.process(result.revision)
    assert process.argv[:2] == ["/bin/sh", "-c"] and "label-studio-ml start " in process.argv[2]
    assert "/srv --host 0.0.0.0 --port $PORT" in process.argv[2]  # the user's own shell-form CMD


def test_cli_invalid_service_name_sends_nothing(api_cloud, backend):
    done = run_cli("deploy", "gcp", backend, "--service", "My_Service", env={**api_cloud.env, "GCP_PROJECT": PROJECT})
    assert done.returncode == EXIT_USAGE
    assert "not a valid Cloud Run service name" in done.stderr and "Traceback" not in done.stderr
    assert len(api_cloud.log) == 0


def test_cli_json_from_script(api_cloud, tmp_path):
    script = tmp_path / "my_model.py"
    script.write_text("from lsdeploy.model import LabelStudioMLBase\n\n\nclass Echo(LabelStudioMLBase):\n"
                      "    def predict(self, tasks, context=None, **kwargs):\n        return []\n")
    directory = tmp_path / "echo-backend"
    done = run_cli("deploy", "gcp", directory, "--from", str(script), "--json",
                   env={**api_cloud.env, "GCP_PROJECT": PROJECT, "GCP_REGION": REGION,
                        "LSDEPLOY_SOURCE_BUCKET": "src-cli", "LSDEPLOY_STATE_BUCKET": "state-cli"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["service"] == "echo-backend" and result["built"] is True
    assert result["image"].split("@")[1].startswith("sha256:")
    assert "bundle " in done.stderr and "building image" in done.stderr
    assert (directory / "my_model.py").is_file()

    # the next deploy renders DIR again, keeping what the user edited there
    (directory / "requirements.txt").write_text("numpy\n")
    done = run_cli("deploy", "gcp", directory, "--from", str(script), "--json",
                   env={**api_cloud.env, "GCP_PROJECT": PROJECT, "GCP_REGION": REGION,
                        "LSDEPLOY_SOURCE_BUCKET": "src-cli", "LSDEPLOY_STATE_BUCKET": "state-cli"})
    assert done.returncode == 0, done.stderr
    assert "kept your own or edited requirements.txt" in done.stderr
    assert (directory / "requirements.txt").read_text() == "numpy\n" and json.loads(done.stdout)["built"] is True


def test_settings_validation():
    good = dict(project=PROJECT, region=REGION, service="ok")
    for bad, match in [(dict(service="-x"), "service name"), (dict(service="a" * 50), "service name"),
                       (dict(service="trailing-"), "service name"), (dict(region="europe_west4"), "region"),
                       (dict(project="My Project"), "project id"), (dict(gpu=1), "at least 4 CPUs"),
                       (dict(env={"PORT": "1"}), "set by lsdeploy or Cloud Run"),
                       (dict(labels={"Team": "x"}), "label"), (dict(projects=[1]), "--label-studio-host")]:
        with pytest.raises(LsdeployError, match=match):
            GcpSettings(**{**good, **bad}).validate()
    GcpSettings(**good, gpu=1, cpu="4", memory="16Gi").validate()


def test_cli_without_google_credentials_says_how_to_log_in(backend, tmp_path):
    env = {"GCP_PROJECT": PROJECT, "HOME": str(tmp_path), "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
           "GOOGLE_APPLICATION_CREDENTIALS": "", "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9",
           "GCE_METADATA_IP": "127.0.0.1:9"}
    done = run_cli("deploy", "gcp", backend, env=env)
    assert done.returncode == EXIT_AUTH, done.stderr
    assert "gcloud auth application-default login" in done.stderr and "Traceback" not in done.stderr


def test_cli_text_output(api_cloud, backend):
    done = run_cli("deploy", "gcp", backend, "--service", "texty", "--env", "MODE=fast", "--label", "team=ml",
                   env={**api_cloud.env, "GCP_PROJECT": PROJECT, "LSDEPLOY_SOURCE_BUCKET": "src-texty",
                        "LSDEPLOY_STATE_BUCKET": "state-texty"})
    assert done.returncode == 0, done.stderr
    assert "URL:" in done.stdout and "revision:  texty-00001-" in done.stdout and "@sha256:" in done.stdout
    assert "not registered" in done.stdout
    (create_call,) = api_cloud.log.filter(api="run", method="CreateService")
    service = create_call.request.service
    assert service.labels["team"] == "ml" and service.labels["managed-by"] == "lsdeploy"
    assert {e.name: e.value for e in service.template.containers[0].env}["MODE"] == "fast"


def test_cli_directory_without_model_fails_before_any_request(api_cloud, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_cli("deploy", "gcp", empty, env={**api_cloud.env, "GCP_PROJECT": PROJECT})
    assert done.returncode == EXIT_USAGE and "label-studio-ml create" in done.stderr
    assert len(api_cloud.log) == 0


def test_model_needing_packages_only_the_image_has(api_cloud, backend):
    """torch & co. are often installed only in the image: the class is found in the source."""
    (backend / "model.py").write_text("import not_installed_here_pkg\nfrom lsdeploy.model import LabelStudioMLBase\n\n\n"
                                      "class Heavy(LabelStudioMLBase):\n    pass\n")
    (backend / "requirements.txt").write_text("not-installed-here-pkg\n")
    done = run_cli("deploy", "gcp", backend, "--service", "heavy", "--json",
                   env={**api_cloud.env, "GCP_PROJECT": PROJECT, "LSDEPLOY_SOURCE_BUCKET": "src-heavy",
                        "LSDEPLOY_STATE_BUCKET": "state-heavy"})
    assert done.returncode == 0, done.stderr
    assert "model class Heavy" in done.stderr and "not_installed_here_pkg" in done.stderr


def test_plan_and_status_are_read_only(api_cloud, backend):
    provider = provider_for(api_cloud)
    settings = settings_for("planned")
    bundle = SourceBundle.from_directory(backend)
    before = provider.plan(settings, bundle)
    assert before.build_needed and not before.service_exists and before.bundle_digest == bundle.digest
    assert provider.status(settings).exists is False
    assert api_cloud.log.mutating() == []
    result = provider.deploy(settings, bundle)
    api_cloud.log.clear()
    after = provider.plan(settings, bundle)
    status = provider.status(settings)
    assert not after.build_needed and after.service_exists
    assert status.ready and status.url == result.url and status.image == result.image
    assert status.latest_ready_revision == result.revision
    assert api_cloud.log.mutating() == []
    assert json.loads(json.dumps(status.to_dict()))["service"] == "planned"


def test_cli_preview_runs_before_deploying(api_cloud, backend):
    done = run_cli("deploy", "gcp", backend, "--service", "previewed", "--preview",
                   env={**api_cloud.env, "GCP_PROJECT": PROJECT, "LSDEPLOY_SOURCE_BUCKET": "src-previewed",
                        "LSDEPLOY_STATE_BUCKET": "state-previewed"})
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert err.index("preview: predictions are valid") < err.index("checking for an image")
    assert api_cloud.log.count(api="run", method="CreateService") == 1


def test_registration_failure_says_the_service_is_deployed(api_cloud, backend):
    """The real Label Studio path is in tests/e2e/test_deploy_gcp.py; here only the wording."""

    class RefusingLabelStudio:
        def __init__(self, host, key):
            pass

        def register(self, url, projects, **kwargs):
            raise LsdeployError("Label Studio cannot reach the backend", 6)

    provider = GcpProvider(GcpClients.from_env(api_cloud.env, PROJECT), polling=FAST_POLLING, poll_interval=0.1,
                           http_get=lambda url: SimpleNamespace(status_code=200),  # the fake's URL is not local
                           labelstudio_factory=RefusingLabelStudio)
    settings = settings_for("unregistered", label_studio_url="http://ls.example", label_studio_api_key="k" * 20,
                            projects=[1])
    with pytest.raises(LsdeployError) as info:
        provider.deploy(settings, SourceBundle.from_directory(backend))
    assert info.value.exit_code == 6
    assert str(info.value).startswith("deployed https://unregistered-") and "Label Studio cannot reach" in str(info.value)


def test_storage_permission_denied_names_the_bucket_and_role(make_gcp_fakes, gcs, backend):
    from gcs_emulator import FaultProxy

    proxy = FaultProxy(gcs.port).start()
    try:
        cloud = make_gcp_fakes(storage_url=proxy.url)
        proxy.deny_write_prefix = "sources/"
        with pytest.raises(LsdeployError) as info:
            deploy(cloud, backend, settings_for("nowrite"))
    finally:
        proxy.stop()
    message = str(info.value)
    assert info.value.exit_code == EXIT_AUTH
    assert "Cloud Storage" in message and "gs://src-nowrite/sources/nowrite/" in message and "roles/storage" in message
    assert cloud.log.count(api="cloudbuild", method="CreateBuild") == 0


def test_reference_sdk_backend_with_its_own_dockerfile_deploys_unchanged(api_cloud, tmp_path):
    directory = tmp_path / "reference-backend"
    directory.mkdir()
    (directory / "model.py").write_text(
        "from label_studio_ml.model import LabelStudioMLBase\n\n\nclass NewModel(LabelStudioMLBase):\n"
        "    def predict(self, tasks, context=None, **kwargs):\n        return []\n")
    (directory / "_wsgi.py").write_text("from label_studio_ml.api import init_app\nfrom model import NewModel\n"
                                        "app = init_app(model_class=NewModel)\n")
    (directory / "requirements.txt").write_text("label-studio-ml\ngunicorn\n")
    dockerfile = ("FROM python:3.11-slim\nWORKDIR /app\nCOPY requirements.txt .\nRUN pip install -r requirements.txt\n"
                  "COPY . ./\nCMD exec gunicorn --bind :${PORT:-9090} --workers 1 --threads 8 _wsgi:app\n")
    (directory / "Dockerfile").write_text(dockerfile)
    done = run_cli("deploy", "gcp", directory, "--json",
                   env={**api_cloud.env, "GCP_PROJECT": PROJECT, "LSDEPLOY_SOURCE_BUCKET": "src-reference",
                        "LSDEPLOY_STATE_BUCKET": "state-reference"})
    assert done.returncode == 0, done.stderr
    assert "model class NewModel" in done.stderr
    (build,) = api_cloud.log.filter(api="cloudbuild", method="CreateBuild")
    digest = json.loads(done.stdout)["bundle_digest"]
    assert build.request.build.source.storage_source.object_.endswith(f"{digest}.tar.gz")
    # the user's Dockerfile went into the build unchanged
    blob = GcpClients.from_env(api_cloud.env, PROJECT).storage.bucket("src-reference").blob(
        build.request.build.source.storage_source.object_)
    with tarfile.open(fileobj=io.BytesIO(blob.download_as_bytes()), mode="r:gz") as tar:
        assert tar.extractfile("Dockerfile").read().decode() == dockerfile


class PolicyBucket:
    """A bucket whose IAM policy lives in memory (fake-gcs-server has no IAM endpoint)."""

    def __init__(self, name, fail=None, fail_set=None):
        from google.api_core.iam import Policy

        self.name, self.fail, self.fail_set, self.sets = name, fail, fail_set, 0
        self.policy = Policy(version=3)
        self.policy.bindings = [{"role": "roles/storage.admin", "members": {"user:owner@example.com"}}]

    def get_iam_policy(self, requested_policy_version=None):
        if self.fail:
            raise self.fail
        return self.policy

    def set_iam_policy(self, policy):
        if self.fail_set:
            raise self.fail_set
        self.sets += 1
        self.policy = policy
        return policy


def test_state_bucket_access_is_granted_once(api_cloud):
    provider = provider_for(api_cloud)
    bucket, lines = PolicyBucket("state-x"), []
    member = "serviceAccount:123-compute@developer.gserviceaccount.com"
    provider.grant_bucket_access(settings_for("x"), bucket, member, lines.append)
    provider.grant_bucket_access(settings_for("x"), bucket, member, lines.append)
    assert bucket.sets == 1
    assert {"role": "roles/storage.objectUser", "members": {member}} in bucket.policy.bindings
    assert {"role": "roles/storage.admin", "members": {"user:owner@example.com"}} in bucket.policy.bindings
    assert lines == ["granted roles/storage.objectUser on gs://state-x to 123-compute@developer.gserviceaccount.com"]


def test_state_bucket_grant_refused_names_the_role_and_the_command(api_cloud):
    provider = provider_for(api_cloud)
    bucket = PolicyBucket("state-y", fail_set=gexc.Forbidden("caller does not have storage.buckets.setIamPolicy access"))
    with pytest.raises(LsdeployError) as info:
        provider.grant_bucket_access(settings_for("y"), bucket, "serviceAccount:a@b", lambda m: None)
    assert "gs://state-y" in str(info.value) and "\n" not in str(info.value)
    assert "roles/storage.admin" in str(info.value)
    assert "gcloud storage buckets add-iam-policy-binding gs://state-y --member serviceAccount:a@b --role " \
           "roles/storage.objectUser" in str(info.value)


def test_an_identity_that_may_not_read_the_bucket_policy_gets_a_note_not_a_failure(api_cloud):
    # docs/ci.md's least-privilege recipe grants the runtime identity on the state bucket by hand
    provider, lines = provider_for(api_cloud), []
    bucket = PolicyBucket("state-z", fail=gexc.Forbidden("caller does not have storage.buckets.getIamPolicy access"))
    provider.grant_bucket_access(settings_for("z"), bucket, "serviceAccount:a@b", lines.append)
    assert bucket.sets == 0 and len(lines) == 1 and lines[0].startswith("note:")
    assert "gcloud storage buckets add-iam-policy-binding gs://state-z --member serviceAccount:a@b" in lines[0]


def test_buckets_are_created_with_uniform_access_and_public_access_prevention(gcs_emulator):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs_storage

    from lsdeploy.providers.gcp.storage import new_bucket

    client = gcs_storage.Client(project=PROJECT, credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": gcs_emulator.url})
    bucket = new_bucket(client, "ubla-bucket")
    assert bucket.iam_configuration.uniform_bucket_level_access_enabled is True
    assert bucket.iam_configuration.public_access_prevention == "enforced"
    # what create_bucket sends (fake-gcs-server does not keep iamConfiguration, so read the request body)
    assert bucket._properties["iamConfiguration"] == {
        "uniformBucketLevelAccess": {"enabled": True}, "publicAccessPrevention": "enforced"}


def test_deploy_grants_state_bucket_access_where_storage_has_iam(cloud, backend):
    """The fakes' storage front answers bucket IAM (fake-gcs-server alone has none): the deploy grants
    the service's account roles/storage.objectUser on the state bucket through it."""
    lines = []
    deploy(cloud, backend, settings_for("grant"), lines)
    account = f"{cloud.project_number(PROJECT)}-compute@developer.gserviceaccount.com"
    assert f"granted roles/storage.objectUser on gs://state-grant to {account}" in lines, lines
    policy = cloud.bucket_iam.policy("state-grant")
    assert any(b.role == "roles/storage.objectUser" and f"serviceAccount:{account}" in b.members for b in policy.bindings)


# -- secrets never leave in the bundle ----------------------------------------------------------------
SECRET_KEY = "ls-key-5b1f0c7e9d2a4f6b8c3e"


def uploaded_bundles(cloud, bucket):
    """{object name: {path: bytes}} of every source bundle in the fake-gcs-server bucket."""
    storage = GcpClients.from_env(cloud.env, PROJECT).storage
    found = {}
    for blob in storage.list_blobs(bucket, prefix="sources/"):
        with tarfile.open(fileobj=io.BytesIO(blob.download_as_bytes()), mode="r:gz") as tar:
            found[blob.name] = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    return found


def test_uploaded_bundle_holds_no_secret(api_cloud, backend):
    # a user filled in the blueprint's docker-compose.yml and a .env for a local run
    compose = (backend / "docker-compose.yml").read_text()
    (backend / "docker-compose.yml").write_text(compose.replace("LABEL_STUDIO_API_KEY=${LABEL_STUDIO_API_KEY}",
                                                                f"LABEL_STUDIO_API_KEY={SECRET_KEY}"))
    (backend / ".env").write_text(f"LABEL_STUDIO_API_KEY={SECRET_KEY}\nBASIC_AUTH_PASS=local\n")
    (backend / ".env.local").write_text(f"LABEL_STUDIO_API_KEY={SECRET_KEY}\n")
    settings = settings_for("leakless", label_studio_api_key=SECRET_KEY)
    deploy(api_cloud, backend, settings)
    (bundle,) = uploaded_bundles(api_cloud, "src-leakless").values()
    assert "model.py" in bundle and ".dockerignore" in bundle
    assert not [p for p in bundle if p.split("/")[-1].startswith((".env", "docker-compose"))]
    assert not [p for p, data in bundle.items() if SECRET_KEY.encode() in data]

    # the generated basic-auth password pasted into a bundled file: refused before the upload
    password = basic_auth_password(api_cloud, "leakless")
    (backend / "settings.py").write_text(f"PASSWORD = {password!r}\n")
    api_cloud.log.clear()
    with pytest.raises(LsdeployError) as info:
        deploy(api_cloud, backend, settings)
    message = str(info.value)
    assert info.value.exit_code == EXIT_USAGE and "settings.py" in message and "basic-auth password" in message
    assert password not in message and "\n" not in message
    assert api_cloud.log.count(api="cloudbuild") == 0 and len(uploaded_bundles(api_cloud, "src-leakless")) == 1


def test_bundle_holding_the_label_studio_key_is_refused_before_any_request(api_cloud, backend):
    (backend / "config.py").write_text(f"API_KEY = '{SECRET_KEY}'\n")
    with pytest.raises(LsdeployError) as info:
        deploy(api_cloud, backend, settings_for("keyed", label_studio_api_key=SECRET_KEY))
    assert info.value.exit_code == EXIT_USAGE
    assert "config.py" in str(info.value) and "Label Studio API key" in str(info.value)
    assert SECRET_KEY not in str(info.value)
    assert len(api_cloud.log) == 0


# -- what Docker would refuse to build --------------------------------------------------------------
def test_directory_without_requirements_builds(api_cloud, tmp_path):
    directory = tmp_path / "bare"
    directory.mkdir()
    (directory / "model.py").write_text("from lsdeploy.model import LabelStudioMLBase\n\n\nclass Bare(LabelStudioMLBase):\n"
                                        "    pass\n")
    result = deploy(api_cloud, directory, settings_for("bare"))
    assert result.built
    (bundle,) = uploaded_bundles(api_cloud, "src-bare").values()
    assert bundle["requirements.txt"] == b"" and b"COPY requirements.txt" in bundle["Dockerfile"]


def test_copy_of_a_file_missing_from_the_context_fails_the_build(api_cloud, backend):
    (backend / "Dockerfile").write_text("FROM python:3.12-slim\nCOPY requirements.txt extra.txt ./\nCOPY . /app\n")
    with pytest.raises(LsdeployError) as info:
        deploy(api_cloud, backend, settings_for("missing-copy"))
    assert info.value.exit_code == EXIT_BUILD
    assert "COPY failed" in str(info.value) and "extra.txt" in str(info.value)
    assert api_cloud.log.count(api="run", method="CreateService") == 0


# -- Cloud Run's CPU and memory table ------------------------------------------------------------------
@pytest.mark.parametrize("cpu, memory, gpu, rule", [
    ("0.5", "512Mi", 0, "less than 1 CPU"),
    ("1.5", "2Gi", 0, "whole number"),
    ("16", "2Gi", 0, "whole number"),
    ("1", "32Gi", 0, "above 24Gi needs at least 8 CPUs"),
    ("1", "100Gi", 0, "at most 32Gi"),
    ("2", "9Gi", 0, "above 8Gi needs at least 4 CPUs"),
    ("4", "1Gi", 0, "4 CPUs need at least 2Gi"),
    ("8", "2Gi", 0, "8 CPUs need at least 4Gi"),
    ("1", "256Mi", 0, "at least 512Mi"),
    ("4", "8Gi", 1, r"GPU \(nvidia-l4\) on Cloud Run needs at least 4 CPUs and 16Gi"),
])
def test_cpu_and_memory_outside_cloud_runs_table_are_refused(cpu, memory, gpu, rule):
    settings = GcpSettings(project=PROJECT, region=REGION, service="sized", cpu=cpu, memory=memory, gpu=gpu)
    with pytest.raises(LsdeployError, match=rule) as info:
        settings.validate()
    assert info.value.exit_code == EXIT_USAGE and "pass --" in str(info.value) and f"--cpu {cpu}" in str(info.value)


def test_cpu_and_memory_inside_the_table_are_accepted():
    for cpu, memory in [("1", "512Mi"), ("1", "4Gi"), ("2", "8Gi"), ("4", "16Gi"), ("6", "24Gi"), ("8", "32Gi"),
                        ("1000m", "2Gi"), ("3", "4Gi"), ("5", "8Gi"), ("7", "16Gi")]:
        GcpSettings(project=PROJECT, region=REGION, service="sized", cpu=cpu, memory=memory).validate()


@pytest.mark.parametrize("options, rule", [
    (dict(gpu=2, cpu="8", memory="32Gi"), "exactly one GPU: pass --gpu 1"),
    (dict(gpu=1, cpu="8", memory="32Gi", region="europe-west2"), "GPUs only in us-central1"),
    (dict(gpu=1, cpu="8", memory="32Gi", gpu_type="nvidia-rtx-pro-6000"), "--gpu-type nvidia-l4"),
    (dict(env={"LABEL_STUDIO_URL": "http://x"}, label_studio_url="https://ls.example.com"), "duplicate name"),
    (dict(env={"TOKEN": "a"}, secret_env={"TOKEN": "s"}), "both --env and --secret"),
])
def test_gpu_rules_and_duplicate_env_names_are_refused_before_any_request(options, rule):
    options = {"region": REGION, **options}
    with pytest.raises(LsdeployError, match=rule) as info:
        GcpSettings(project=PROJECT, service="gpu", **options).validate()
    assert info.value.exit_code == EXIT_USAGE


@pytest.mark.parametrize("url, unreachable", [
    ("http://localhost:8080", True), ("http://127.0.0.1:8080", True), ("http://10.1.2.3", True),
    ("http://192.168.1.5:8080", True), ("http://label-studio:8080", True), ("https://ls.example.com", False),
    ("http://34.1.2.3:8080", False),
])
def test_a_label_studio_url_cloud_run_cannot_reach_is_warned_about(url, unreachable):
    from lsdeploy.providers.gcp import GcpProvider

    lines = []
    GcpProvider.warn_unreachable(GcpSettings(project=PROJECT, region=REGION, service="s", label_studio_url=url),
                                 lines.append)
    assert bool(lines) == unreachable
    if unreachable:
        assert "cannot reach Label Studio" in lines[0] and "tunnel" in lines[0] and "public URL" in lines[0]


def test_cli_refuses_fractional_cpu_before_any_request(api_cloud, backend):
    done = run_cli("deploy", "gcp", backend, "--service", "fraction", "--cpu", "0.5",
                   env={**api_cloud.env, "GCP_PROJECT": PROJECT})
    assert done.returncode == EXIT_USAGE and "--cpu 1 or more" in done.stderr, done.stderr
    assert len(api_cloud.log) == 0


# -- a slow rollout -------------------------------------------------------------------------------------
def test_slow_rollout_names_the_revision_still_deploying(api_cloud, backend):
    api_cloud.run.ready_delay = 600
    with pytest.raises(LsdeployError) as info:
        deploy(api_cloud, backend, settings_for("slow", ready_timeout=1))
    message = str(info.value)
    assert info.value.exit_code == EXIT_DEPLOY and "\n" not in message
    assert "revision slow-00001-" in message and "still deploying" in message
    assert "label-studio-ml status slow" in message and "--wait-timeout" in message


def test_cli_wait_timeout_reads_its_environment_variable(api_cloud, backend):
    api_cloud.run.ready_delay = 600
    done = run_cli("deploy", "gcp", backend, "--service", "slow-cli",
                   env={**api_cloud.env, "GCP_PROJECT": PROJECT, "GCP_REGION": REGION, "LSDEPLOY_WAIT_TIMEOUT": "2",
                        "LSDEPLOY_SOURCE_BUCKET": "src-slow-cli", "LSDEPLOY_STATE_BUCKET": "state-slow-cli"})
    assert done.returncode == EXIT_DEPLOY, done.stderr
    assert "still deploying after 2 s" in done.stderr and "label-studio-ml status slow-cli" in done.stderr
    assert "Traceback" not in done.stderr and "unexpected" not in done.stderr


# -- expired or revoked Google logins -----------------------------------------------------------------
@pytest.fixture
def token_endpoint():
    """An OAuth token endpoint that answers like Google's for a revoked refresh token."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"error": "invalid_grant", "error_description": "Token has been expired or revoked."})
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/token"
    server.shutdown()
    server.server_close()


def user_login(token_uri):
    from google.oauth2.credentials import Credentials

    return Credentials(token=None, refresh_token="1//stale", client_id="id.apps.googleusercontent.com",
                       client_secret="not-a-secret", token_uri=token_uri)


@pytest.mark.parametrize("kind", ["revoked", "unreachable"])
def test_expired_google_login_says_how_to_log_in(api_cloud, backend, token_endpoint, kind):
    from google.api_core.client_options import ClientOptions
    from google.cloud import artifactregistry_v1, run_v2

    # RefreshError from the token endpoint, or TransportError when it cannot be reached
    creds = user_login(token_endpoint if kind == "revoked" else "http://127.0.0.1:9/token")
    clients = GcpClients.from_env(api_cloud.env, PROJECT)
    options = lambda variable: dict(  # noqa: E731
        credentials=creds, transport="rest", client_options=ClientOptions(api_endpoint=api_cloud.env[variable]))
    clients.registry = artifactregistry_v1.ArtifactRegistryClient(**options("CLOUDSDK_API_ENDPOINT_OVERRIDES_ARTIFACTREGISTRY"))
    clients.services = run_v2.ServicesClient(**options("CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN"))
    provider = GcpProvider(clients, polling=FAST_POLLING, poll_interval=0.1)
    for call in (lambda: provider.deploy(settings_for("stale"), SourceBundle.from_directory(backend)),
                 lambda: provider.status(settings_for("stale"))):
        with pytest.raises(LsdeployError) as info:
            call()
        assert info.value.exit_code == EXIT_AUTH
        assert "gcloud auth application-default login" in str(info.value) and "\n" not in str(info.value)
        assert "1//stale" not in str(info.value) and "not-a-secret" not in str(info.value)


# -- options as the user passes them ---------------------------------------------------------------------
def test_cli_env_values_keep_their_commas(api_cloud, backend):
    done = run_cli("deploy", "gcp", backend, "--service", "commas", "--env", "LABELS=Positive,Negative",
                   "--env", "^;^MODE=a,b;LEVEL=3", "--label", "team=ml",
                   env={**api_cloud.env, "GCP_PROJECT": PROJECT, "LSDEPLOY_SOURCE_BUCKET": "src-commas",
                        "LSDEPLOY_STATE_BUCKET": "state-commas"})
    assert done.returncode == 0, done.stderr
    (create_call,) = api_cloud.log.filter(api="run", method="CreateService")
    env = {e.name: e.value for e in create_call.request.service.template.containers[0].env}
    assert env["LABELS"] == "Positive,Negative" and env["MODE"] == "a,b" and env["LEVEL"] == "3"


# Each deploy option's environment variable, and where the CreateService request (the raw message
# the fake recorded) carries it.
def _container(service):
    return service.template.containers[0]


def _env(service):
    return {e.name: e.value or e.value_source.secret_key_ref.secret for e in _container(service).env}


OPTION_VARIABLES = [
    ("LSDEPLOY_SERVICE", "everyvar", lambda s: None, None),  # checked through the request's service id
    ("LSDEPLOY_MEMORY", "16Gi", lambda s: _container(s).resources.limits["memory"], "16Gi"),
    ("LSDEPLOY_CPU", "4", lambda s: _container(s).resources.limits["cpu"], "4"),
    ("LSDEPLOY_GPU", "1", lambda s: _container(s).resources.limits["nvidia.com/gpu"], "1"),
    ("LSDEPLOY_GPU_TYPE", "nvidia-l4", lambda s: s.template.node_selector.accelerator, "nvidia-l4"),
    ("LSDEPLOY_MIN_INSTANCES", "0", lambda s: s.template.scaling.min_instance_count, 0),
    ("LSDEPLOY_MAX_INSTANCES", "2", lambda s: s.template.scaling.max_instance_count, 2),
    ("LSDEPLOY_CONCURRENCY", "5", lambda s: s.template.max_instance_request_concurrency, 5),
    ("LSDEPLOY_TIMEOUT", "120", lambda s: s.template.timeout.seconds, 120),
    ("LSDEPLOY_ENV", "A=1,B=x", lambda s: (_env(s)["A"], _env(s)["B"]), ("1", "x")),
    ("LSDEPLOY_SECRETS", "HF_TOKEN=hf-token:1", lambda s: _env(s)["HF_TOKEN"], f"projects/{PROJECT}/secrets/hf-token"),
    ("LSDEPLOY_SERVICE_ACCOUNT", f"runner@{PROJECT}.iam.gserviceaccount.com", lambda s: s.template.service_account,
     f"runner@{PROJECT}.iam.gserviceaccount.com"),
    ("LSDEPLOY_INGRESS", "internal-and-cloud-load-balancing", lambda s: run_v2.IngressTraffic(s.ingress).name,
     "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER"),
    ("LSDEPLOY_BASIC_AUTH", "true", lambda s: "BASIC_AUTH_PASS" in _env(s), True),
    ("BASIC_AUTH_USER", "annotator", lambda s: _env(s)["BASIC_AUTH_USER"], "annotator"),
    ("LSDEPLOY_LABELS", "team=ml,cost=low", lambda s: (s.labels["team"], s.labels["cost"]), ("ml", "low")),
    ("LSDEPLOY_REPOSITORY", "models", lambda s: _container(s).image.split("/")[2], "models"),
    ("LSDEPLOY_STATE_BUCKET", "state-everyvar", lambda s: _env(s)["MODEL_STATE_URI"], "gs://state-everyvar/everyvar"),
]


def test_cli_every_deploy_option_reads_its_environment_variable(api_cloud, backend):
    from test_plan_gcp import user_secret

    user_secret(api_cloud, "hf-token", "hf-value")
    env = {**api_cloud.env, "GCP_PROJECT": PROJECT, "GCP_REGION": REGION, "LSDEPLOY_SOURCE_BUCKET": "src-everyvar"}
    env.update({variable: value for variable, value, _, _ in OPTION_VARIABLES})
    done = run_cli("deploy", "gcp", backend, "--json", env=env)
    assert done.returncode == 0, done.stderr
    (create_call,) = api_cloud.log.filter(api="run", method="CreateService")
    assert create_call.request.service_id == "everyvar"
    service = create_call.request.service
    for variable, _, read, expected in OPTION_VARIABLES[1:]:
        assert read(service) == expected, variable
    # and the ones that steer the flow rather than the service
    assert json.loads(done.stdout)["region"] == REGION


def test_no_basic_auth_service_account_gpu_and_ingress(api_cloud, backend):
    from google.cloud import run_v2

    provider = provider_for(api_cloud)
    account = f"runner@{PROJECT}.iam.gserviceaccount.com"
    settings = settings_for("tuned", basic_auth=False, service_account=account, ingress="internal", gpu=1, cpu="4",
                            memory="16Gi", max_instances=1)
    result = provider.deploy(settings, SourceBundle.from_directory(backend))
    live = provider.get_service(settings)
    container = live.template.containers[0]
    assert dict(container.resources.limits) == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert container.resources.cpu_idle is False and live.template.node_selector.accelerator == "nvidia-l4"
    assert live.template.service_account == account
    assert live.ingress == run_v2.IngressTraffic.INGRESS_TRAFFIC_INTERNAL_ONLY
    assert not {"BASIC_AUTH_USER", "BASIC_AUTH_PASS"} & {e.name for e in container.env}
    assert result.basic_auth_user is None and result.secrets == []
    assert api_cloud.log.count(api="secretmanager", mutating=True) == 0


def test_no_basic_auth_grants_the_state_bucket_to_the_compute_default_identity(api_cloud, backend):
    """Without a secret or --service-account the service runs as PROJECT_NUMBER-compute@...: the
    preflight's Service Usage answer tells the project number (the bucket's own is not asked)."""
    provider = provider_for(api_cloud)
    state = PolicyBucket(f"{PROJECT}-lsdeploy-state")
    state.project_number = 424242
    ensure_bucket = provider.ensure_bucket
    provider.ensure_bucket = lambda settings, name, progress: state if name == state.name else \
        ensure_bucket(settings, name, progress)
    lines = []
    provider.deploy(settings_for("open", basic_auth=False, state_bucket=None), SourceBundle.from_directory(backend),
                    lines.append)
    member = f"serviceAccount:{api_cloud.project_number(PROJECT)}-compute@developer.gserviceaccount.com"
    assert {"role": "roles/storage.objectUser", "members": {member}} in state.policy.bindings
    assert not [line for line in lines if line.startswith("note:")]


def test_a_secret_of_another_project_is_granted_to_the_service_projects_runtime_account(api_cloud, backend):
    from google.cloud import secretmanager_v1 as sm

    clients = GcpClients.from_env(api_cloud.env, PROJECT)
    secret = clients.secrets.create_secret(parent="projects/shared-secrets", secret_id="token", secret=sm.Secret(
        replication=sm.Replication(automatic=sm.Replication.Automatic())))
    clients.secrets.add_secret_version(parent=secret.name, payload=sm.SecretPayload(data=b"s3cret"))
    result = deploy(api_cloud, backend, settings_for("crossed", basic_auth=False,
                                                     secret_env={"TOKEN": "projects/shared-secrets/secrets/token"}))
    runtime = f"serviceAccount:{api_cloud.project_number(PROJECT)}-compute@developer.gserviceaccount.com"
    assert api_cloud.secretmanager.can_access("projects/shared-secrets/secrets/token", runtime)
    assert not api_cloud.secretmanager.can_access(
        "projects/shared-secrets/secrets/token",
        f"serviceAccount:{api_cloud.project_number('shared-secrets')}-compute@developer.gserviceaccount.com")
    assert result.revision


def test_cli_failing_preview_names_rule_and_path_and_calls_no_google_api(api_cloud, backend):
    (backend / "model.py").write_text(
        "from lsdeploy.model import LabelStudioMLBase\n\n\nclass Wrong(LabelStudioMLBase):\n"
        "    def predict(self, tasks, context=None, **kwargs):\n"
        "        return [{'result': [{'from_name': 'sentiment', 'to_name': 'text', 'type': 'choices',\n"
        "                             'value': {'choices': ['Maybe']}}], 'score': 0.5} for _ in tasks]\n")
    done = run_cli("deploy", "gcp", backend, "--service", "unpreviewed", "--preview",
                   env={**api_cloud.env, "GCP_PROJECT": PROJECT, "LSDEPLOY_SOURCE_BUCKET": "src-unpreviewed",
                        "LSDEPLOY_STATE_BUCKET": "state-unpreviewed"})
    assert done.returncode == 7, done.stderr  # EXIT_INVALID
    (line,) = [line for line in done.stderr.splitlines() if "preview failed" in line]
    # the whole problem: the JSON path of the bad value, what is wrong and the rule id
    assert "results[0]" in line and "'Maybe'" in line and re.search(r"\[[a-z_.]+\]", line), line
    assert "nothing was deployed" in line
    assert api_cloud.log.mutating() == [] and api_cloud.log.count(api="cloudbuild") == 0


def test_build_applies_the_dockerignore_inside_the_bundle(api_cloud, backend):
    # .gcloudignore decides what is uploaded; Docker then applies .dockerignore to the build context
    (backend / ".gcloudignore").write_text("# upload everything\n")
    (backend / ".dockerignore").write_text("requirements.txt\n")
    with pytest.raises(LsdeployError) as info:
        deploy(api_cloud, backend, settings_for("dockerignored"))
    assert info.value.exit_code == EXIT_BUILD
    assert "COPY failed" in str(info.value) and "requirements.txt" in str(info.value)
