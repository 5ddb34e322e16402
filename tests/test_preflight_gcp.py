"""Preflight (issue 13.1): before anything is written, the APIs a deploy needs are enabled and the
deploying identity holds the permissions it needs; `deploy gcp --check` reports it alone."""
from __future__ import annotations

import json

import pytest

from gcp_support import PROJECT, backend, cli_env, deploy, settings_for  # noqa: F401
from support import run_cli

from lsdeploy.errors import EXIT_AUTH, EXIT_DEPLOY, LsdeployError
from lsdeploy.providers.gcp.preflight import PERMISSION_ROLES

FRESH_DISABLED = ("run.googleapis.com", "cloudbuild.googleapis.com", "artifactregistry.googleapis.com",
                  "secretmanager.googleapis.com", "iam.googleapis.com")


@pytest.fixture
def api_cloud(make_gcp_fakes, gcs_emulator):
    return make_gcp_fakes(storage_url=gcs_emulator.url)


def test_disabled_apis_stop_the_deploy_before_any_write_naming_them_and_the_command(api_cloud, backend):
    api_cloud.serviceusage.disable(*FRESH_DISABLED)
    with pytest.raises(LsdeployError) as info:
        deploy(api_cloud, backend, settings_for("unready"))
    message = str(info.value)
    assert info.value.exit_code == EXIT_DEPLOY and "\n" not in message
    assert "Cloud Run Admin API, Cloud Build API, Artifact Registry API, Secret Manager API" in message
    assert f"gcloud services enable {' '.join(FRESH_DISABLED)} --project {PROJECT}" in message
    assert "--enable-apis" in message
    assert api_cloud.log.mutating() == []
    assert api_cloud.log.methods() == ["serviceusage.BatchGetServices"]  # found first, not after a build


def test_a_disabled_api_answers_googles_service_disabled_error(api_cloud):
    from google.api_core import exceptions

    from fakes.fixtures import make_clients

    api_cloud.serviceusage.disable("run.googleapis.com")
    with pytest.raises(exceptions.Forbidden) as info:
        make_clients(api_cloud.url).services.get_service(
            name=f"projects/{PROJECT}/locations/us-central1/services/x")
    assert info.value.reason == "SERVICE_DISABLED" and info.value.domain == "googleapis.com"
    assert info.value.metadata["service"] == "run.googleapis.com"
    assert "Cloud Run Admin API has not been used in project" in info.value.message


def test_enable_apis_enables_the_missing_ones_and_deploys(api_cloud, backend):
    api_cloud.serviceusage.disable(*FRESH_DISABLED)
    lines = []
    result = deploy(api_cloud, backend, settings_for("enabling", enable_apis=True), lines)
    assert result.revision and api_cloud.serviceusage.disabled == set()
    assert api_cloud.log.count(api="serviceusage", method="BatchEnableServices") == 1
    assert any(line.startswith("enabling run.googleapis.com") for line in lines)
    enable = api_cloud.log.filter(api="serviceusage", method="BatchEnableServices")[0]
    first_other_write = next(e for e in api_cloud.log.mutating() if e.api != "serviceusage")
    assert api_cloud.log.entries.index(enable) < api_cloud.log.entries.index(first_other_write)


def test_missing_permissions_are_named_as_roles_before_anything_is_created(api_cloud, backend):
    held = set(PERMISSION_ROLES) - {"run.services.create", "run.services.setIamPolicy", "secretmanager.secrets.create"}
    api_cloud.restrict_deployer(held | {"serviceusage.services.get"})
    with pytest.raises(LsdeployError) as info:
        deploy(api_cloud, backend, settings_for("denied"))
    message = str(info.value)
    assert info.value.exit_code == EXIT_AUTH and "\n" not in message
    assert "roles/run.admin (run.services.create, run.services.setIamPolicy)" in message
    assert "roles/secretmanager.admin (secretmanager.secrets.create)" in message
    assert f"gcloud projects add-iam-policy-binding {PROJECT}" in message
    assert api_cloud.log.mutating() == []


def test_cli_check_lists_what_is_missing_and_exits_0_once_ready(api_cloud, backend):
    api_cloud.serviceusage.disable("cloudbuild.googleapis.com")
    env = cli_env(api_cloud, "checked")
    done = run_cli("deploy", "gcp", backend, "--service", "checked", "--check", env=env)
    assert done.returncode == EXIT_DEPLOY, done.stderr
    assert "not enabled: cloudbuild.googleapis.com" in done.stdout
    assert f"gcloud services enable cloudbuild.googleapis.com --project {PROJECT}" in done.stdout
    assert api_cloud.log.mutating() == []

    done = run_cli("deploy", "gcp", backend, "--service", "checked", "--check", "--enable-apis", "--json", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ready"] is True and report["enabled_now"] == ["cloudbuild.googleapis.com"]
    assert report["project_number"] == api_cloud.project_number(PROJECT)

    api_cloud.restrict_deployer(set(PERMISSION_ROLES) - {"cloudbuild.builds.create"} | {"serviceusage.services.get"})
    done = run_cli("deploy", "gcp", backend, "--service", "checked", "--check", env=env)
    assert done.returncode == EXIT_AUTH
    assert "roles/cloudbuild.builds.editor (cloudbuild.builds.create)" in done.stdout
    assert api_cloud.log.count(api="cloudbuild") == 0


def test_a_deployer_that_may_not_act_as_the_runtime_account_is_told_before_any_write(api_cloud, backend):
    api_cloud.restrict_deployer(set(PERMISSION_ROLES) | {"serviceusage.services.get"})
    runtime = api_cloud.iamadmin.add_account(PROJECT, "runner")
    with pytest.raises(LsdeployError) as info:
        deploy(api_cloud, backend, settings_for("runner", service_account=runtime))
    assert info.value.exit_code == EXIT_AUTH
    assert f"may not deploy a service that runs as {runtime} (iam.serviceAccounts.actAs)" in str(info.value)
    assert f"gcloud iam service-accounts add-iam-policy-binding {runtime}" in str(info.value)
    assert api_cloud.log.mutating() == []


def test_cloud_run_refuses_a_revision_whose_account_the_caller_may_not_act_as(api_cloud):
    from google.api_core import exceptions
    from google.cloud import run_v2

    from fakes.fixtures import make_clients

    api_cloud.restrict_deployer({"run.services.create"})
    with pytest.raises(exceptions.Forbidden, match="iam.serviceaccounts.actAs"):
        make_clients(api_cloud.url).services.create_service(
            parent=f"projects/{PROJECT}/locations/us-central1", service_id="svc", service=run_v2.Service(
                template=run_v2.RevisionTemplate(containers=[run_v2.Container(image="us-docker.pkg.dev/x/y/z")])))


def test_a_dry_run_refuses_an_unready_project_like_the_deploy_and_enables_nothing(api_cloud, backend):
    from gcp_support import provider_for

    from lsdeploy.bundle import SourceBundle

    api_cloud.serviceusage.disable("secretmanager.googleapis.com")
    with pytest.raises(LsdeployError, match="gcloud services enable secretmanager.googleapis.com"):
        provider_for(api_cloud).plan(settings_for("planned", enable_apis=True), SourceBundle.from_directory(backend))
    assert api_cloud.log.mutating() == [] and api_cloud.serviceusage.disabled == {"secretmanager.googleapis.com"}


def test_with_application_default_credentials_the_project_is_the_quota_project(monkeypatch):
    # a user's ADC: Service Usage, Resource Manager and IAM refuse calls without a quota project
    import google.auth
    from google.oauth2.credentials import Credentials

    from lsdeploy.providers.gcp import GcpClients

    monkeypatch.setattr(google.auth, "default", lambda scopes=None: (Credentials(token="t"), None))
    clients = GcpClients.from_env({}, PROJECT)
    assert clients.service_usage._transport._credentials.quota_project_id == PROJECT
    assert clients.projects._transport._credentials.quota_project_id == PROJECT
    assert clients.iam.session.credentials.quota_project_id == PROJECT
    assert clients.iam.endpoint == "https://iam.googleapis.com"
