"""`deploy gcp --dry-run` (the plan) and the pruning of old images and source bundles, against
the Google API fakes (tests/fakes) and a real fake-gcs-server. Deploys use the fakes without the
runner: revisions become ready like Cloud Run reports them."""
from __future__ import annotations

import json

import pytest
from google.cloud import artifactregistry_v1 as ar

from gcp_support import (PROJECT, REGION, api_cloud_fast, backend, change, cli_env, deploy,  # noqa: F401
                         provider_for, settings_for)
from support import run_cli

from lsdeploy.bundle import SourceBundle
from lsdeploy.errors import EXIT_USAGE, LsdeployError
from lsdeploy.providers.gcp import GcpClients

SECRET_KEY = "plan-test-ls-key-0123456789"  # a fake Label Studio key: must never be printed


@pytest.fixture
def cloud(api_cloud_fast):
    return api_cloud_fast


def images(cloud, service):
    """Digests of the service's images in the registry, newest first."""
    clients = GcpClients.from_env(cloud.env, PROJECT)
    parent = f"projects/{PROJECT}/locations/{REGION}/repositories/lsdeploy/packages/{service}"
    versions = clients.registry.list_versions(request=ar.ListVersionsRequest(parent=parent, order_by="create_time desc"))
    return [v.name.rsplit("/", 1)[-1] for v in versions]


def bundles(cloud, service, bucket):
    clients = GcpClients.from_env(cloud.env, PROJECT)
    return sorted(b.name.rsplit("/", 1)[-1].removesuffix(".tar.gz")
                  for b in clients.storage.list_blobs(bucket, prefix=f"sources/{service}/"))


def logs(cloud, service, bucket):
    clients = GcpClients.from_env(cloud.env, PROJECT)
    return sorted(b.name.rsplit("/", 1)[-1] for b in clients.storage.list_blobs(bucket, prefix=f"build-logs/{service}/"))


def user_secret(cloud, secret_id, value):
    """A secret the user made themselves (what --secret refers to)."""
    from google.cloud import secretmanager_v1 as sm

    client = GcpClients.from_env(cloud.env, PROJECT).secrets
    secret = client.create_secret(parent=f"projects/{PROJECT}", secret_id=secret_id, secret=sm.Secret(
        replication=sm.Replication(automatic=sm.Replication.Automatic())))
    client.add_secret_version(parent=secret.name, payload=sm.SecretPayload(data=value.encode()))
    return secret.name


def fields(plan: dict) -> dict:
    return {c["field"]: (c["live"], c["desired"]) for c in plan["changes"]}


# -- plan ------------------------------------------------------------------------------------

def test_dry_run_of_a_new_service_changes_nothing(cloud, backend):
    done = run_cli("deploy", "gcp", backend, "--service", "fresh", "--dry-run", "--json", "--memory", "4Gi",
                   "--env", "MODE=fast", env=cli_env(cloud, "fresh"))
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert set(plan) == {"service", "project", "region", "action", "service_exists", "bundle_digest", "bundle_size",
                         "bundle_files", "dockerfile", "dockerfile_text", "ignore_file", "image", "build_needed",
                         "changes", "prune", "label_studio_projects"}
    assert plan["action"] == "create" and plan["service_exists"] is False and plan["build_needed"] is True
    bundle = SourceBundle.from_directory(backend)
    assert plan["bundle_digest"] == bundle.digest and plan["bundle_size"] == bundle.size
    assert [f["path"] for f in plan["bundle_files"]] == [f.path for f in bundle.files]
    assert {"path": "wheels/lsdeploy-0.1.0-py3-none-any.whl", "size": next(
        f.size for f in bundle.files if f.source == "wheel"), "source": "wheel"} in plan["bundle_files"]
    assert plan["dockerfile_text"] == (backend / "Dockerfile").read_text() and plan["dockerfile"] == "own"
    assert plan["image"] == f"{REGION}-docker.pkg.dev/{PROJECT}/lsdeploy/fresh:src-{bundle.digest}"
    got = fields(plan)
    assert got["memory"] == (None, "4Gi") and got["cpu"] == (None, "1") and got["min_instances"] == (None, 1)
    assert got["env.MODE"] == (None, "set") and got["env.MODEL_STATE_URI"] == (None, "set")
    assert got["secret.BASIC_AUTH_PASS"] == (None, "fresh-basic-auth-pass:new")
    assert "fast" not in done.stdout, "plain env values are compared, not shown"
    # only reads reached Google, and nothing was created in Cloud Storage either
    assert cloud.log.mutating() == [], cloud.log.methods()
    assert all(e.method.startswith(("Get", "List", "BatchGet", "Access", "TestIamPermissions")) for e in cloud.log), \
        cloud.log.methods()
    storage = GcpClients.from_env(cloud.env, PROJECT).storage
    assert storage.lookup_bucket("src-fresh") is None and storage.lookup_bucket("state-fresh") is None
    assert "dry run: reading the live service" in done.stderr

    text = run_cli("deploy", "gcp", backend, "--service", "fresh", "--dry-run", env=cli_env(cloud, "fresh"))
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "service fresh in demo-project/europe-west4: would be created" in out
    assert "  | FROM python:${PYTHON_VERSION}-slim" in out and f"sha256 {bundle.digest}" in out
    assert "build: needed" in out and "dry run: nothing was changed" in out
    assert cloud.log.mutating() == []


def test_dry_run_against_a_live_service_shows_each_change(cloud, backend):
    settings = settings_for("live", label_studio_api_key=SECRET_KEY)
    first = deploy(cloud, backend, settings)
    user_secret(cloud, "hf-token", "hf-value")
    cloud.log.clear()
    provider = provider_for(cloud)

    # unchanged: nothing to do, no build
    same = provider.plan(settings, SourceBundle.from_directory(backend))
    assert same.action == "none" and same.changes == [] and not same.build_needed and same.image == first.image
    assert "changes: none" in same.lines() and "unchanged" in same.lines()[0]

    # settings a user tunes, a new key, a new code: each named field by field
    change(backend, "new code")
    wanted = settings_for("live", label_studio_api_key=SECRET_KEY + "-rotated", memory="4Gi", cpu="2",
                          max_instances=7, concurrency=4, timeout=60, env={"MODE": "fast"},
                          secret_env={"HF_TOKEN": "hf-token:1"}, labels={"team": "vision"}, ingress="internal")
    plan = provider.plan(wanted, SourceBundle.from_directory(backend))
    assert plan.action == "update" and plan.build_needed
    got = {c["field"]: (c["live"], c["desired"]) for c in plan.changes}
    assert got.pop("image") == (first.image, plan.image) and plan.image.endswith(
        f":src-{SourceBundle.from_directory(backend).digest}")
    key_secret = next(s for s in first.secrets if s.endswith("label-studio-api-key")).rsplit("/", 1)[-1]
    assert got == {
        "cpu": ("1", "2"), "memory": ("2Gi", "4Gi"), "max_instances": (3, 7), "concurrency": (8, 4),
        "timeout": ("300s", "60s"), "ingress": ("all", "internal"), "labels": ({}, {"team": "vision"}),
        "env.MODE": (None, "set"),
        "secret.HF_TOKEN": (None, "hf-token:1"),
        "secret.LABEL_STUDIO_API_KEY": (f"{key_secret}:1", f"{key_secret}:new"),
    }
    # env removed, value changed; the key is compared, never shown
    text = "\n".join(plan.lines()) + json.dumps(plan.to_dict())
    assert SECRET_KEY not in text and "changes (live -> desired):" in text
    assert "memory: 2Gi -> 4Gi" in text and "secret.HF_TOKEN: (none) -> hf-token:1" in text
    assert cloud.log.mutating() == [], cloud.log.methods()

    deploy(cloud, backend, settings_for("live", label_studio_api_key=SECRET_KEY, env={"MODE": "fast", "OLD": "1"}))
    cloud.log.clear()
    plan = provider.plan(settings_for("live", label_studio_api_key=SECRET_KEY, env={"MODE": "slow"}),
                         SourceBundle.from_directory(backend))
    assert plan.action == "update" and not plan.build_needed
    assert [(c["field"], c["live"], c["desired"]) for c in plan.changes] == [
        ("env.MODE", "set", "set (new value)"), ("env.OLD", "set", None)]
    assert cloud.log.mutating() == []


def test_dry_run_with_from_leaves_the_directory_alone(cloud, tmp_path):
    script = tmp_path / "my_model.py"
    script.write_text("from lsdeploy import LabelStudioMLBase\n\n\nclass Mine(LabelStudioMLBase):\n"
                      "    def predict(self, tasks, context=None, **kwargs):\n        return []\n")
    target = tmp_path / "mine"
    done = run_cli("deploy", "gcp", target, "--from", str(script), "--dry-run", "--json", env=cli_env(cloud, "mine"))
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["service"] == "mine" and "my_model.py" in [f["path"] for f in plan["bundle_files"]]
    assert "would create" in done.stderr and not target.exists()
    assert cloud.log.mutating() == []


def test_dry_run_errors_are_one_line(cloud, backend):
    done = run_cli("deploy", "gcp", backend, "--service", "Bad_Name", "--dry-run", env=cli_env(cloud, "bad"))
    assert done.returncode == EXIT_USAGE and "not a valid Cloud Run service name" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in done.stderr
    cloud.deny("run", "GetService")
    done = run_cli("deploy", "gcp", backend, "--service", "denied", "--dry-run", env=cli_env(cloud, "denied"))
    assert done.returncode != 0 and "roles/run.developer" in done.stderr and "Traceback" not in done.stderr
    assert cloud.log.mutating() == []


# -- pruning ---------------------------------------------------------------------------------

def test_deploy_prunes_all_but_the_newest_images_and_their_bundles(cloud, backend):
    digests = []
    for n in range(4):
        change(backend, f"version {n}")
        result = deploy(cloud, backend, settings_for("pruned", keep_images=2))
        digests.append((result.image.rsplit("@", 1)[-1], result.bundle_digest, result))
    newest = [d for d, _, _ in reversed(digests[-2:])]
    assert images(cloud, "pruned") == newest
    assert bundles(cloud, "pruned", "src-pruned") == sorted(b for _, b, _ in digests[-2:])
    last = digests[-1][2]
    assert last.pruned == [f"image {REGION}-docker.pkg.dev/{PROJECT}/lsdeploy/pruned@{digests[1][0]}",
                           f"gs://src-pruned/sources/pruned/{digests[1][1]}.tar.gz",
                           f"gs://src-pruned/build-logs/pruned/log-{digests[1][2].build_id}.txt"]
    assert logs(cloud, "pruned", "src-pruned") == sorted(f"log-{r.build_id}.txt" for _, _, r in digests[-2:])
    deletes = cloud.log.filter(api="artifactregistry", method="DeleteVersion")
    assert len(deletes) == 2 and all(e.request.force for e in deletes)
    assert "pruned 3 old image(s), source bundle(s) and build log(s)" in last.lines()

    # the plan says what the next deploy would prune (counting the image it would build)
    change(backend, "version 4")
    cloud.log.clear()
    plan = provider_for(cloud).plan(settings_for("pruned", keep_images=2), SourceBundle.from_directory(backend))
    assert plan.prune == [f"image {REGION}-docker.pkg.dev/{PROJECT}/lsdeploy/pruned@{digests[2][0]}",
                          f"gs://src-pruned/sources/pruned/{digests[2][1]}.tar.gz",
                          f"gs://src-pruned/build-logs/pruned/log-{digests[2][2].build_id}.txt"]
    assert cloud.log.mutating() == []


def test_pruning_keeps_the_image_that_serves_traffic(cloud, backend):
    original = (backend / "model.py").read_text()
    first = deploy(cloud, backend, settings_for("keeper", keep_images=3))
    later = []
    for n in range(2):
        change(backend, f"v{n}")
        later.append(deploy(cloud, backend, settings_for("keeper", keep_images=3)))
    # back to the first code: its image (the oldest) is reused and serves. Keeping 1 image keeps the
    # newest and the serving one; the one between goes, with its source bundle
    (backend / "model.py").write_text(original)
    result = deploy(cloud, backend, settings_for("keeper", keep_images=1))
    assert not result.built and result.image == first.image
    assert images(cloud, "keeper") == [later[1].image.rsplit("@", 1)[-1], first.image.rsplit("@", 1)[-1]]
    assert bundles(cloud, "keeper", "src-keeper") == sorted([first.bundle_digest, later[1].bundle_digest])
    assert result.pruned == [f"image {later[0].image}", f"gs://src-keeper/sources/keeper/{later[0].bundle_digest}.tar.gz",
                             f"gs://src-keeper/build-logs/keeper/log-{later[0].build_id}.txt",
                             f"gs://src-keeper/build-logs/keeper/log-{first.build_id}.txt"]
    assert logs(cloud, "keeper", "src-keeper") == [f"log-{later[1].build_id}.txt"]


def test_no_prune_and_a_refused_prune(cloud, backend):
    for n in range(3):
        change(backend, f"v{n}")
        kept = deploy(cloud, backend, settings_for("hoard", keep_images=1, prune=False))
    assert len(images(cloud, "hoard")) == 3 and kept.pruned == []
    assert cloud.log.count(api="artifactregistry", method="DeleteVersion") == 0

    cloud.deny("artifactregistry", "DeleteVersion")
    change(backend, "v3")
    lines = []
    result = deploy(cloud, backend, settings_for("hoard", keep_images=1), lines)
    assert result.revision and result.prune_error, "the deploy succeeds; pruning is housekeeping"
    assert "roles/artifactregistry.repoAdmin" in result.prune_error and "--no-prune" in result.prune_error
    assert any(line.startswith("warning: old images were not pruned") for line in lines)
    assert len(images(cloud, "hoard")) == 4


def test_keep_images_option(cloud, backend):
    done = run_cli("deploy", "gcp", backend, "--service", "opts", "--keep-images", "0", env=cli_env(cloud, "opts"))
    assert done.returncode == EXIT_USAGE and "--keep-images" in done.stderr
    assert len(cloud.log) == 0
    change(backend, "a")
    deploy(cloud, backend, settings_for("opts"))
    change(backend, "b")
    env = {**cli_env(cloud, "opts"), "LSDEPLOY_KEEP_IMAGES": "1"}
    done = run_cli("deploy", "gcp", backend, "--service", "opts", "--json", env=env)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert len(data["pruned"]) == 3 and data["prune_error"] == "" and images(cloud, "opts") == [
        data["image"].rsplit("@", 1)[-1]]


def test_rollback_skips_revisions_whose_image_was_pruned(cloud, backend):
    results = []
    for n in range(3):
        change(backend, f"r{n}")
        results.append(deploy(cloud, backend, settings_for("rollprune", keep_images=2)))
    assert len(images(cloud, "rollprune")) == 2  # the first revision's image is gone
    provider = provider_for(cloud)
    lines = []
    back = provider.rollback(settings_for("rollprune"), progress=lines.append)
    assert back.to_revision == results[1].revision
    # nothing older with an image: refused, naming the pruning; and by name too
    with pytest.raises(LsdeployError, match="was pruned") as info:
        provider.rollback(settings_for("rollprune"), to_revision=results[0].revision)
    assert info.value.exit_code == EXIT_USAGE and "deploy that code again" in str(info.value)
    cloud.log.clear()
    with pytest.raises(LsdeployError, match=f"the image of {results[0].revision} was pruned"):
        provider.rollback(settings_for("rollprune"))
    assert cloud.log.mutating() == []


def test_dry_run_refuses_a_bundle_holding_a_secret_as_deploy_does(cloud, backend):
    settings = settings_for("held", label_studio_api_key=SECRET_KEY)
    deploy(cloud, backend, settings)
    provider = provider_for(cloud)
    password = provider.latest_secret_value(settings, "basic-auth-pass")  # made by the first deploy
    assert password
    cloud.log.clear()
    for name, text, shown in (("config.py", f"API_KEY = '{SECRET_KEY}'\n", "Label Studio API key"),
                              ("settings.py", f"PASSWORD = '{password}'\n", "password")):
        (backend / name).write_text(text)
        with pytest.raises(LsdeployError) as info:
            provider.plan(settings, SourceBundle.from_directory(backend))
        assert info.value.exit_code == EXIT_USAGE and name in str(info.value) and shown in str(info.value)
        assert SECRET_KEY not in str(info.value) and password not in str(info.value)
        (backend / name).unlink()
    assert cloud.log.mutating() == []


def test_deploy_output_carries_connects_note_for_label_studio():
    """What connect tells the user to do in Label Studio (the Data Manager's score column) is said
    by deploy too, under its registration."""
    from lsdeploy.providers.base import DeployResult

    note = "the Data Manager shows the scores of model version 0.0.1 (Settings > Annotation > Prelabeling)"
    result = DeployResult(provider="gcp", project="p", region="us-central1", service="s", url="https://s.run.app",
                          revision="s-00001-abc", image="img@sha256:0", bundle_digest="0", built=True,
                          registrations=[{"backend_id": 4, "project": 2, "state": "CO", "note": note},
                                         {"backend_id": 5, "project": 3, "state": "CO", "note": ""}])
    lines = result.lines()
    first = lines.index("Label Studio backend 4 in project 2: CO")
    assert lines[first + 1] == f"  note: {note}"
    assert lines[lines.index("Label Studio backend 5 in project 3: CO") + 1:][:1] != ["  note: "]
