"""The build's identity (issue 13.2): an explicit service account with exactly the grants a build
needs, checked before the build is submitted."""
from __future__ import annotations

import pytest
from google.cloud.devtools import cloudbuild_v1 as cb

from gcp_support import PROJECT, REGION, backend, change, deploy, settings_for  # noqa: F401

from lsdeploy.errors import EXIT_AUTH, LsdeployError

BUILDER = f"lsdeploy-builder@{PROJECT}.iam.gserviceaccount.com"
REPOSITORY = f"projects/{PROJECT}/locations/{REGION}/repositories/lsdeploy"


@pytest.fixture
def api_cloud(make_gcp_fakes, gcs_emulator):
    return make_gcp_fakes(storage_url=gcs_emulator.url)


def new_project(cloud):
    """Cloud Build runs as the Compute Engine default account, which holds no role (May 2024 and later)."""
    cloud.cloudbuild.default_identity = "compute"
    cloud.automatic_default_grants = False
    return cloud


def test_builds_run_as_lsdeploy_builder_created_once_with_only_its_grants(api_cloud, backend):
    new_project(api_cloud)
    lines = []
    deploy(api_cloud, backend, settings_for("built"), lines)
    create = api_cloud.log.filter(api="cloudbuild", method="CreateBuild")[0].request.build
    assert create.service_account == f"projects/{PROJECT}/serviceAccounts/{BUILDER}"
    assert create.options.logging == cb.BuildOptions.LoggingMode.GCS_ONLY.value and create.logs_bucket
    assert BUILDER in api_cloud.iamadmin.accounts
    assert api_cloud.artifactregistry.can_push(REPOSITORY, f"serviceAccount:{BUILDER}")
    assert f"creating service account {BUILDER} for Cloud Build (once)" in lines
    assert any(line.startswith("  build | ") for line in lines)  # the log is still streamed

    change(backend, "second build")
    api_cloud.log.clear()
    deploy(api_cloud, backend, settings_for("built"))
    assert api_cloud.log.count(api="iam", method="CreateServiceAccount") == 0
    assert api_cloud.log.count(api="artifactregistry", method="SetIamPolicy") == 0  # read first, already granted
    assert api_cloud.log.count(api="cloudbuild", method="CreateBuild") == 1


def test_without_an_explicit_account_a_new_projects_build_cannot_push(make_gcp_fakes):
    """What lsdeploy did before: no build.service_account, so the Compute Engine default account
    builds, and in a new organization it holds no role."""
    from fakes.fixtures import make_clients

    api_cloud = new_project(make_gcp_fakes())   # sources in the in-memory store
    clients = make_clients(api_cloud.url)
    api_cloud.artifactregistry.add_repository(PROJECT, REGION, "lsdeploy")
    import io
    import tarfile

    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        info = tarfile.TarInfo("Dockerfile")
        body = b"FROM python:3.11-slim\n"
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    api_cloud.storage.put("src-bare", "b.tgz", data.getvalue())
    image = f"{REGION}-docker.pkg.dev/{PROJECT}/lsdeploy/bare:x"
    operation = clients.builds.create_build(parent=f"projects/{PROJECT}/locations/{REGION}", build=cb.Build(
        source=cb.Source(storage_source=cb.StorageSource(bucket="src-bare", object_="b.tgz")),
        steps=[cb.BuildStep(name="gcr.io/cloud-builders/docker", args=["build", "-t", image, "."])], images=[image]))
    with pytest.raises(Exception, match="Build failed"):
        operation.result(timeout=30)
    build = api_cloud.cloudbuild.builds[operation.metadata.build.id].build
    assert 'Permission "artifactregistry.repositories.uploadArtifacts" denied' in build.failure_info.detail


def test_the_compute_default_account_on_request_gets_the_grants(api_cloud, backend):
    new_project(api_cloud)
    deploy(api_cloud, backend, settings_for("compute-built", build_service_account="compute"))
    compute = f"{api_cloud.project_number(PROJECT)}-compute@developer.gserviceaccount.com"
    assert api_cloud.log.filter(api="cloudbuild", method="CreateBuild")[0].request.build.service_account.endswith(compute)
    assert api_cloud.artifactregistry.can_push(REPOSITORY, f"serviceAccount:{compute}")
    assert BUILDER not in api_cloud.iamadmin.accounts


BUILDER_RIGHTS = {"serviceusage.services.get", "iam.serviceAccounts.get", "artifactregistry.repositories.getIamPolicy",
                  "artifactregistry.repositories.setIamPolicy", "storage.buckets.getIamPolicy",
                  "storage.buckets.setIamPolicy"}


def allow_runtime(api_cloud):
    from google.iam.v1 import policy_pb2

    compute = f"{api_cloud.project_number(PROJECT)}-compute@developer.gserviceaccount.com"  # the runtime: allowed
    api_cloud.iamadmin.policies.by_name[f"serviceAccounts/{compute}"] = policy_pb2.Policy(bindings=[
        policy_pb2.Binding(role="roles/iam.serviceAccountUser", members=[api_cloud.caller])])


def test_a_deployer_that_may_not_act_as_the_existing_build_account_is_told_before_any_write(api_cloud, backend):
    from lsdeploy.providers.gcp.preflight import PERMISSION_ROLES

    api_cloud.restrict_deployer(set(PERMISSION_ROLES) | BUILDER_RIGHTS)
    allow_runtime(api_cloud)
    api_cloud.iamadmin.add_account(PROJECT, "lsdeploy-builder")
    with pytest.raises(LsdeployError) as info:
        deploy(api_cloud, backend, settings_for("no-act-as"))
    message = str(info.value)
    assert info.value.exit_code == EXIT_AUTH and "\n" not in message
    assert f"may not run builds as {BUILDER} (iam.serviceAccounts.actAs)" in message
    assert f"gcloud iam service-accounts add-iam-policy-binding {BUILDER}" in message
    assert "roles/iam.serviceAccountUser" in message
    assert api_cloud.log.mutating() == []


@pytest.mark.parametrize("lacking, role", [("iam.serviceAccounts.create", "roles/iam.serviceAccountAdmin"),
                                           ("iam.serviceAccounts.actAs", "roles/iam.serviceAccountUser")])
def test_a_deployer_that_may_not_create_or_use_the_build_account_is_told_before_any_write(api_cloud, backend,
                                                                                          lacking, role):
    """The account does not exist yet: deploy would create it and then run builds as it, which needs
    both rights on the project (a new account has no policy of its own to grant them on)."""
    from lsdeploy.providers.gcp.preflight import PERMISSION_ROLES

    held = {"iam.serviceAccounts.create", "iam.serviceAccounts.actAs"} - {lacking}
    api_cloud.restrict_deployer(set(PERMISSION_ROLES) | BUILDER_RIGHTS | held)
    allow_runtime(api_cloud)
    with pytest.raises(LsdeployError) as info:
        deploy(api_cloud, backend, settings_for("no-builder"))
    assert info.value.exit_code == EXIT_AUTH
    assert f"grant {role} ({lacking})" in str(info.value)
    assert api_cloud.log.mutating() == [] and BUILDER not in api_cloud.iamadmin.accounts


def test_a_build_account_named_but_missing_is_refused_before_any_write(api_cloud, backend):
    from lsdeploy.errors import EXIT_USAGE

    missing = f"ghost-builder@{PROJECT}.iam.gserviceaccount.com"
    with pytest.raises(LsdeployError) as info:
        deploy(api_cloud, backend, settings_for("ghost", build_service_account=missing))
    assert info.value.exit_code == EXIT_USAGE
    assert f"--build-service-account {missing}: the service account does not exist" in str(info.value)
    assert api_cloud.log.mutating() == []


def test_a_push_refused_right_after_the_grant_is_built_again(make_gcp_fakes, gcs_emulator, backend):
    cloud = new_project(make_gcp_fakes(storage_url=gcs_emulator.url, iam_delay=1.0))
    cloud.iam.only = ("/repositories/",)  # the push, not the source read (test_storage_iam_gcp has that one)
    lines = []
    result = deploy(cloud, backend, settings_for("propagating"), lines)
    assert result.built and any("refused the push it was granted" in line for line in lines), lines
    assert cloud.log.count(api="cloudbuild", method="CreateBuild") >= 2
