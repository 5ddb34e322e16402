"""`status`, `rollback` and `destroy` of a gcp deployment against the Google API fakes
(tests/fakes) and a real fake-gcs-server. Deploys use the fakes without the runner: revisions
become ready (or, with `run.never_ready`, fail) like Cloud Run reports them."""
from __future__ import annotations

import json

import pytest

from fakes.fixtures import FAST_POLLING
from gcp_support import (PROJECT, REGION, api_cloud_fast, backend, change, cli_env, deploy,  # noqa: F401
                         provider_for, settings_for)
from support import run_cli

from lsdeploy.blueprints import create
from lsdeploy.errors import EXIT_DEPLOY, EXIT_USAGE, LsdeployError
from lsdeploy.labelstudio import Removal
from lsdeploy.providers.gcp import GcpClients


@pytest.fixture
def cloud(api_cloud_fast):
    return api_cloud_fast


def live_traffic(cloud, service):
    """{revision id: percent} as the fake Cloud Run routes it."""
    message = cloud.run.service(service)
    latest = message.latest_ready_revision.rsplit("/", 1)[-1]
    out = {}
    for status in message.traffic_statuses:
        revision = status.revision or latest
        out[revision] = out.get(revision, 0) + status.percent
    return {k: v for k, v in out.items() if v}


class FakeLabelStudio:
    """Stands in for lsdeploy.labelstudio.LabelStudio (the real one is tested against a real
    Label Studio in tests/test_labelstudio_client.py): records what the provider asks."""

    backends_by_project: dict = {}
    unregistered: list = []

    def __init__(self, host, key):
        self.host, self.key = host, key

    def backends(self, project):
        return self.backends_by_project.get(int(project), [])

    def unregister(self, projects, *, url=None, backend_id=None):
        FakeLabelStudio.unregistered.append((list(projects), url))
        return [Removal(project=int(p), backend_ids=[b["id"] for b in self.backends(p) if b["url"] == url],
                        webhook_ids=[]) for p in projects]


# -- status ----------------------------------------------------------------------------------

def test_status_of_a_healthy_service(cloud, backend):
    result = deploy(cloud, backend, settings_for("healthy"))
    cloud.log.clear()
    FakeLabelStudio.backends_by_project = {3: [{"id": 17, "url": result.url, "state": "CO"}], 4: []}
    status = provider_for(cloud, labelstudio_factory=FakeLabelStudio).status(
        settings_for("healthy", label_studio_url="http://ls.example", label_studio_api_key="k" * 20, projects=[3, 4]))
    assert status.exists and status.ready and status.message == ""
    assert status.url == result.url and status.image == result.image
    assert status.image_digest == result.image.split("@")[1] and status.image_digest.startswith("sha256:")
    assert status.traffic == [{"revision": result.revision, "percent": 100, "tag": "", "image": result.image}]
    assert [r["revision"] for r in status.revisions] == [result.revision] and status.revisions[0]["ready"]
    assert status.updated.startswith("20")
    assert status.label_studio == [
        {"project": 3, "backend_id": 17, "state": "CO", "state_name": "connected", "error_message": ""},
        {"project": 4, "backend_id": None, "state": "", "state_name": "not registered", "error_message": ""}]
    assert cloud.log.mutating() == []

    done = run_cli("status", "healthy", "--json", env=cli_env(cloud, "healthy"))
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(data) == {"service", "exists", "url", "ready", "message", "latest_ready_revision",
                         "latest_created_revision", "traffic", "image", "image_digest", "updated", "labels",
                         "revisions", "label_studio", "training_job", "executions", "executions_error"}
    assert data["training_job"] == "" and data["executions"] == []  # --training service: no job
    assert data["ready"] is True and data["latest_ready_revision"] == result.revision
    text = run_cli("status", "healthy", env=cli_env(cloud, "healthy"))
    assert text.returncode == 0 and "service healthy: ready" in text.stdout
    assert f"traffic 100% -> {result.revision}" in text.stdout
    assert str(status.lines()[-2:]) == str(["Label Studio project 3: backend 17 connected",
                                            "Label Studio project 4: not registered"])


def test_status_and_destroy_when_label_studio_fails(cloud, backend):
    class DownLabelStudio(FakeLabelStudio):
        def backends(self, project):
            raise LsdeployError("cannot reach Label Studio at http://ls.example", 6)

        def unregister(self, projects, **kwargs):
            self.backends(projects[0])

    deploy(cloud, backend, settings_for("lsdown"))
    settings = settings_for("lsdown", label_studio_url="http://ls.example", label_studio_api_key="k" * 20, projects=[5])
    provider = provider_for(cloud, labelstudio_factory=DownLabelStudio)
    status = provider.status(settings)
    assert status.ready and status.label_studio == [{"project": 5, "backend_id": None, "state": "", "state_name":
                                                     "unknown", "error_message": "cannot reach Label Studio at "
                                                     "http://ls.example"}]
    cloud.log.clear()
    with pytest.raises(LsdeployError) as info:
        provider.destroy(settings, purge=True)
    assert info.value.exit_code == 6 and "nothing was deleted" in str(info.value)
    assert "leave out --project" in str(info.value) and cloud.log.mutating() == []


def test_destroy_purge_refused_names_the_role(cloud, backend):
    deploy(cloud, backend, settings_for("norepo"))
    cloud.deny("artifactregistry", "DeletePackage")
    with pytest.raises(LsdeployError) as info:
        provider_for(cloud).destroy(settings_for("norepo"), purge=True)
    assert "artifactregistry.packages.delete" in str(info.value)
    assert "roles/artifactregistry.repoAdmin" in str(info.value) and info.value.exit_code == 3


def test_status_of_a_failing_revision(cloud, backend):
    first = deploy(cloud, backend, settings_for("failing"))
    cloud.run.never_ready("failing", message="The user-provided container failed to start and listen on the port.")
    change(backend, "broken")
    with pytest.raises(LsdeployError):
        deploy(cloud, backend, settings_for("failing"))
    status = provider_for(cloud).status(settings_for("failing"))
    assert status.exists and not status.ready
    assert "failed to start and listen on the port" in status.message
    assert status.latest_ready_revision == first.revision != status.latest_created_revision
    assert status.traffic == [{"revision": first.revision, "percent": 100, "tag": "", "image": first.image}]
    assert status.image == first.image  # the failed revision's image serves nothing
    newest, oldest = status.revisions
    assert newest["revision"] == status.latest_created_revision and not newest["ready"]
    assert "failed to start" in newest["message"] and oldest == {**oldest, "revision": first.revision, "ready": True}

    done = run_cli("status", "failing", env=cli_env(cloud, "failing"))
    assert done.returncode == EXIT_DEPLOY
    assert "service failing: NOT ready" in done.stdout
    assert f"  revision {newest['revision']}: not ready ({newest['message']})" in done.stdout.splitlines()
    assert f"  revision {first.revision}: ready, serving 100%" in done.stdout.splitlines()
    assert f"image: {first.image} (revision {first.revision})" in done.stdout.splitlines()
    data = json.loads(run_cli("status", "failing", "--json", env=cli_env(cloud, "failing")).stdout)
    assert data["ready"] is False and data["latest_created_revision"] == newest["revision"]


def test_status_after_a_rollback_shows_the_serving_image_and_every_revision(cloud, backend):
    """Issue 12.6: after a rollback the spec still names the newer image, but the older revision
    serves: status shows the image that serves, and every revision with its Ready state."""
    first = deploy(cloud, backend, settings_for("rolled"))
    change(backend, "second")
    second = deploy(cloud, backend, settings_for("rolled"))
    provider_for(cloud).rollback(settings_for("rolled"))
    assert live_traffic(cloud, "rolled") == {first.revision: 100} and first.image != second.image

    status = provider_for(cloud).status(settings_for("rolled"))
    assert status.image == first.image and status.image_digest == first.image.split("@")[1]
    assert status.traffic == [{"revision": first.revision, "percent": 100, "tag": "", "image": first.image}]
    assert [(r["revision"], r["ready"], r["image"]) for r in status.revisions] == [
        (second.revision, True, second.image), (first.revision, True, first.image)]

    text = run_cli("status", "rolled", env=cli_env(cloud, "rolled"))
    assert text.returncode == 0, text.stderr
    assert f"image: {first.image} (revision {first.revision})" in text.stdout.splitlines()
    assert second.image not in text.stdout
    assert f"  revision {second.revision}: ready" in text.stdout.splitlines()
    assert f"  revision {first.revision}: ready, serving 100%" in text.stdout.splitlines()
    data = json.loads(run_cli("status", "rolled", "--json", env=cli_env(cloud, "rolled")).stdout)
    assert data["image"] == first.image and data["traffic"] == status.traffic
    assert [(r["revision"], r["ready"]) for r in data["revisions"]] == [(second.revision, True), (first.revision, True)]


def test_status_of_split_traffic_shows_each_serving_image(cloud, backend):
    from google.cloud import run_v2
    from google.protobuf import field_mask_pb2

    first = deploy(cloud, backend, settings_for("split"))
    change(backend, "second")
    second = deploy(cloud, backend, settings_for("split"))
    services = GcpClients.from_env(cloud.env, PROJECT).services
    live = services.get_service(name=settings_for("split").service_name)
    kind = run_v2.TrafficTargetAllocationType
    live.traffic = [run_v2.TrafficTarget(type_=kind.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION, revision=first.revision,
                                         percent=30),
                    run_v2.TrafficTarget(type_=kind.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST, percent=70)]
    services.update_service(request=run_v2.UpdateServiceRequest(
        service=live, update_mask=field_mask_pb2.FieldMask(paths=["traffic"]))).result(polling=FAST_POLLING)
    assert live_traffic(cloud, "split") == {first.revision: 30, second.revision: 70}

    status = provider_for(cloud).status(settings_for("split"))
    assert status.traffic == [{"revision": first.revision, "percent": 30, "tag": "", "image": first.image},
                              {"revision": second.revision, "percent": 70, "tag": "", "image": second.image}]
    assert status.image == "" and status.image_digest == ""  # no one image serves all the traffic
    lines = status.lines()
    assert f"image: {first.image} (revision {first.revision}, 30%)" in lines
    assert f"image: {second.image} (revision {second.revision}, 70%)" in lines
    assert f"  revision {first.revision}: ready, serving 30%" in lines
    assert f"  revision {second.revision}: ready, serving 70%" in lines


def test_status_of_a_missing_service(cloud):
    done = run_cli("status", "nowhere", "--json", env=cli_env(cloud, "nowhere"))
    assert done.returncode == EXIT_DEPLOY
    assert json.loads(done.stdout) == {**json.loads(done.stdout), "service": "nowhere", "exists": False}
    assert cloud.log.mutating() == []


# -- rollback --------------------------------------------------------------------------------

def test_rollback_skips_a_failed_revision_then_to_a_named_one(cloud, backend):
    first = deploy(cloud, backend, settings_for("rolling"))
    cloud.run.never_ready("rolling", times=1)
    change(backend, "broken")
    with pytest.raises(LsdeployError):
        deploy(cloud, backend, settings_for("rolling"))
    change(backend, "fixed")
    third = deploy(cloud, backend, settings_for("rolling"))
    assert live_traffic(cloud, "rolling") == {third.revision: 100}

    cloud.log.clear()
    lines = []
    result = provider_for(cloud).rollback(settings_for("rolling"), progress=lines.append)
    assert result.to_revision == first.revision and result.from_revisions == [third.revision]
    assert live_traffic(cloud, "rolling") == {first.revision: 100}
    assert result.traffic == [{"revision": first.revision, "percent": 100, "tag": ""}]
    (update,) = cloud.log.mutating()
    assert update.method == "UpdateService" and list(update.request.update_mask.paths) == ["traffic"]
    assert update.request.service.template.containers[0].image == third.image  # the spec travels unchanged
    assert any("serves 100% of the traffic" in line for line in lines)

    # back to the newest by name, through the CLI
    done = run_cli("rollback", "rolling", "--to-revision", third.revision, "--json", env=cli_env(cloud, "rolling"))
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(data) == {"service", "from_revisions", "to_revision", "traffic", "url"}
    assert data["to_revision"] == third.revision and data["from_revisions"] == [first.revision]
    assert live_traffic(cloud, "rolling") == {third.revision: 100}
    assert "moving all traffic" in done.stderr

    # a failed revision, or one that does not exist, is refused before any change
    failed = next(r["revision"] for r in provider_for(cloud).status(settings_for("rolling")).revisions
                  if not r["ready"])
    cloud.log.clear()
    for name, words in [(failed, "is not ready"), ("rolling-09999-zzz", "has no revision")]:
        done = run_cli("rollback", "rolling", "--to-revision", name, env=cli_env(cloud, "rolling"))
        assert done.returncode == EXIT_USAGE and words in done.stderr and first.revision in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert cloud.log.mutating() == []


def test_redeploy_after_rollback_moves_traffic_back_to_the_latest(cloud, backend):
    first = deploy(cloud, backend, settings_for("forward"))
    change(backend, "second")
    second = deploy(cloud, backend, settings_for("forward"))
    provider_for(cloud).rollback(settings_for("forward"))
    assert live_traffic(cloud, "forward") == {first.revision: 100}
    cloud.log.clear()
    again = deploy(cloud, backend, settings_for("forward"))
    assert live_traffic(cloud, "forward") == {second.revision: 100}
    assert again.revision == second.revision and not again.built and not again.new_revision
    assert cloud.log.count(api="cloudbuild", method="CreateBuild") == 0
    assert [e.method for e in cloud.log.mutating()] == ["UpdateService"]
    assert len(list(GcpClients.from_env(cloud.env, PROJECT).revisions.list_revisions(
        parent=f"projects/{PROJECT}/locations/{REGION}/services/forward"))) == 2


def test_rollback_with_nothing_older(cloud, backend):
    deploy(cloud, backend, settings_for("single"))
    cloud.log.clear()
    done = run_cli("rollback", "single", env=cli_env(cloud, "single"))
    assert done.returncode == EXIT_USAGE and "no ready revision older than" in done.stderr
    assert cloud.log.mutating() == []


# -- destroy ---------------------------------------------------------------------------------

def _deploy_pair(cloud, tmp_path, buckets):
    """Two services sharing the buckets; each with model state and a source bundle."""
    results = {}
    for service in ("doomed", "neighbour"):
        directory = tmp_path / service
        create(directory)
        results[service] = deploy(cloud, directory, settings_for(
            f"{service}-{buckets}", buckets, label_studio_url="http://ls.example", label_studio_api_key="k" * 20))
    storage = GcpClients.from_env(cloud.env, PROJECT).storage
    for service in ("doomed", "neighbour"):
        storage.bucket(f"state-{buckets}").blob(f"{service}-{buckets}/model.json").upload_from_string(b"{}")
    return results


def _inventory(cloud, buckets):
    storage = GcpClients.from_env(cloud.env, PROJECT).storage
    objects = {f"gs://{b}/{o.name}" for b in (f"src-{buckets}", f"state-{buckets}") for o in storage.list_blobs(b)}
    return {
        "services": {name.rsplit("/", 1)[-1] for name in cloud.run.services},
        "secrets": {name.rsplit("/", 1)[-1] for name in cloud.secretmanager.secrets},
        "images": {(i.package, i.digest) for i in cloud.artifactregistry.images},
        "objects": objects,
    }


def test_destroy_without_purge(cloud, tmp_path):
    _deploy_pair(cloud, tmp_path, "keep")
    before = _inventory(cloud, "keep")
    cloud.log.clear()
    done = run_cli("destroy", "doomed-keep", "--yes", "--json", env=cli_env(cloud, "keep"))
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(data) == {"service", "deleted", "kept", "unregistered", "purge"}
    secrets = [f"projects/{PROJECT}/secrets/doomed-keep-basic-auth-pass",
               f"projects/{PROJECT}/secrets/doomed-keep-label-studio-api-key"]
    assert data["deleted"] == [f"projects/{PROJECT}/locations/{REGION}/services/doomed-keep", *secrets]
    assert any("pass --purge" in kept for kept in data["kept"])
    assert sorted((e.api, e.method) for e in cloud.log.mutating()) == [
        ("run", "DeleteService"), ("secretmanager", "DeleteSecret"), ("secretmanager", "DeleteSecret")]
    after = _inventory(cloud, "keep")
    assert after["services"] == before["services"] - {"doomed-keep"}
    assert after["secrets"] == before["secrets"] - {"doomed-keep-basic-auth-pass", "doomed-keep-label-studio-api-key"}
    assert "neighbour-keep-basic-auth-pass" in after["secrets"]
    assert after["images"] == before["images"] and after["objects"] == before["objects"]

    # again: nothing left to delete, nothing sent
    cloud.log.clear()
    again = run_cli("destroy", "doomed-keep", "--yes", env=cli_env(cloud, "keep"))
    assert again.returncode == 0 and "deleted" not in again.stdout
    assert cloud.log.mutating() == []


def test_destroy_with_purge(cloud, tmp_path):
    deployed = _deploy_pair(cloud, tmp_path, "purge")
    before = _inventory(cloud, "purge")
    assert any(o.startswith("gs://src-purge/sources/doomed-purge/") for o in before["objects"])
    cloud.log.clear()
    FakeLabelStudio.unregistered = []
    lines = []
    result = provider_for(cloud, labelstudio_factory=FakeLabelStudio).destroy(
        settings_for("doomed-purge", "purge", label_studio_url="http://ls.example", label_studio_api_key="k" * 20,
                     projects=[3]), purge=True, progress=lines.append)
    assert FakeLabelStudio.unregistered == [([3], deployed["doomed"].url)]
    assert result.unregistered == [{"project": 3, "backend_ids": [], "webhook_ids": []}]
    package = f"projects/{PROJECT}/locations/{REGION}/repositories/lsdeploy/packages/doomed-purge"
    assert result.deleted[-4:] == [f"{package} (every image of {REGION}-docker.pkg.dev/{PROJECT}/lsdeploy/doomed-purge)",
                                   "gs://src-purge/sources/doomed-purge/", "gs://src-purge/build-logs/doomed-purge/",
                                   "gs://state-purge/doomed-purge/"]
    assert sorted((e.api, e.method) for e in cloud.log.mutating()) == [
        ("artifactregistry", "DeletePackage"), ("run", "DeleteService"), ("secretmanager", "DeleteSecret"),
        ("secretmanager", "DeleteSecret")]
    after = _inventory(cloud, "purge")
    assert after["services"] == before["services"] - {"doomed-purge"}
    assert after["images"] == {i for i in before["images"] if i[0] != "doomed-purge"}
    assert any(i[0] == "neighbour-purge" for i in after["images"])
    gone = before["objects"] - after["objects"]
    assert gone and all(o.startswith(("gs://src-purge/sources/doomed-purge/", "gs://state-purge/doomed-purge/",
                                      "gs://src-purge/build-logs/doomed-purge/")) for o in gone)
    assert any(o.startswith("gs://src-purge/build-logs/doomed-purge/") for o in gone)
    assert "gs://state-purge/neighbour-purge/model.json" in after["objects"]
    assert any(o.startswith("gs://src-purge/sources/neighbour-purge/") for o in after["objects"])
    assert any(o.startswith("gs://src-purge/build-logs/neighbour-purge/") for o in after["objects"])


def test_destroy_refuses_without_yes_when_not_a_terminal(cloud):
    done = run_cli("destroy", "anything", "--purge", env=cli_env(cloud, "refuse"))
    assert done.returncode == EXIT_USAGE
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "pass --yes" in done.stderr
    assert done.stdout == "" and len(cloud.log) == 0


def test_destroy_leaves_a_service_lsdeploy_did_not_deploy(cloud):
    from google.cloud import run_v2

    services = GcpClients.from_env(cloud.env, PROJECT).services
    services.create_service(parent=f"projects/{PROJECT}/locations/{REGION}", service_id="foreign", service=run_v2.Service(
        template=run_v2.RevisionTemplate(containers=[run_v2.Container(image="us-docker.pkg.dev/cloudrun/container/hello")])
    )).result(polling=FAST_POLLING)
    cloud.log.clear()
    done = run_cli("destroy", "foreign", "--yes", "--purge", env=cli_env(cloud, "foreign"))
    assert done.returncode == EXIT_USAGE and "not deployed by lsdeploy" in done.stderr and "nothing was deleted" in done.stderr
    assert cloud.log.mutating() == [] and "foreign" in {n.rsplit("/", 1)[-1] for n in cloud.run.services}


def _on_a_terminal(args, env, answer):
    """Run the CLI with a pseudo-terminal as stdin, answering the question with `answer`."""
    import os
    import pty
    import subprocess

    from support import CLI

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([*CLI, *args], stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, **env}, text=True)
        os.write(master, answer.encode() + b"\n")
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(slave)
        os.close(master)
    return proc.returncode, out, err


def test_destroy_summary_and_confirmation_on_a_terminal(cloud, tmp_path):
    """On a terminal the summary comes first, then the question; "n" deletes nothing, "y" deletes."""
    _deploy_pair(cloud, tmp_path, "ask")
    cloud.log.clear()
    code, out, err = _on_a_terminal(["destroy", "doomed-ask", "--purge", "--json"], cli_env(cloud, "ask"), "n")
    assert code == EXIT_USAGE and "nothing was deleted" in err and out == ""
    assert f"will delete projects/{PROJECT}/locations/{REGION}/services/doomed-ask" in err
    assert "will delete gs://state-ask/doomed-ask/" in err
    assert err.index("will delete") < err.index("destroy doomed-ask?")
    assert cloud.log.mutating() == []
    code, out, err = _on_a_terminal(["destroy", "doomed-ask", "--purge", "--json"], cli_env(cloud, "ask"), "y")
    assert code == 0, err
    assert json.loads(out)["deleted"][0].endswith("/services/doomed-ask")
    assert "doomed-ask" not in {name.rsplit("/", 1)[-1] for name in cloud.run.services}


# -- waiting ---------------------------------------------------------------------------------
def test_rollback_that_does_not_finish_in_wait_timeout_is_one_line(cloud, backend):
    import concurrent.futures

    settings = settings_for("stuck")
    deploy(cloud, backend, settings)
    change(backend, "second")
    deploy(cloud, backend, settings)

    class StuckOperation:
        def result(self, timeout=None, polling=None):
            raise concurrent.futures.TimeoutError()

    provider = provider_for(cloud)
    provider.clients.services.update_service = lambda request: StuckOperation()
    settings.ready_timeout = 7
    with pytest.raises(LsdeployError) as info:
        provider.rollback(settings)
    assert info.value.exit_code == EXIT_DEPLOY and "\n" not in str(info.value)
    assert "moving the traffic of stuck to stuck-00001-" in str(info.value) and "within 7 s" in str(info.value)


def test_wait_timeout_reads_its_environment_variable(cloud):
    done = run_cli("rollback", "anything", env={**cli_env(cloud, "waiting"), "LSDEPLOY_WAIT_TIMEOUT": "0"})
    assert done.returncode == EXIT_USAGE and "--wait-timeout" in done.stderr, done.stderr
    assert len(cloud.log) == 0
