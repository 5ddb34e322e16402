"""Bucket IAM as Google enforces it (issue 13.8): the fakes' front of the Cloud Storage emulator
answers the JSON API's bucket IAM methods (tests/fakes/storage_iam.py), the Cloud Build fake
refuses a build whose account may not read its source, the Cloud Run fake a revision whose account
may not use its state bucket, and the organization policy requiring uniform bucket-level access
refuses other buckets."""
from __future__ import annotations

import io
import os
import tarfile
import time

import pytest
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession
from google.cloud import run_v2, storage
from google.cloud.devtools import cloudbuild_v1 as cb

from fakes.cloud import PERMISSIONS
from fakes.fixtures import FAST_POLLING, make_clients
from gcp_support import PROJECT, REGION, backend, deploy, provider_for, settings_for  # noqa: F401,F811

from lsdeploy.errors import EXIT_AUTH, EXIT_DEPLOY, LsdeployError
from lsdeploy.providers.gcp.run_logs import LoggingRest

DENIED_GET = ("does not have storage.objects.get access to the Google Cloud Storage object. Permission "
              "'storage.objects.get' denied on resource (or it may not exist).")
BUILDER = f"lsdeploy-builder@{PROJECT}.iam.gserviceaccount.com"


@pytest.fixture
def cloud(make_gcp_fakes, gcs_emulator):
    return make_gcp_fakes(storage_url=gcs_emulator.url)


def storage_client(cloud) -> storage.Client:
    """The official client, configured like the deploy's (STORAGE_EMULATOR_HOST: the front)."""
    return storage.Client(project=PROJECT, credentials=AnonymousCredentials(),
                          client_options={"api_endpoint": cloud.env["STORAGE_EMULATOR_HOST"]})


def new_bucket(client, name: str):
    bucket = client.bucket(name)
    bucket.iam_configuration.uniform_bucket_level_access_enabled = True
    bucket.iam_configuration.public_access_prevention = "enforced"
    return client.create_bucket(bucket, location=REGION)


def new_project(cloud):
    """No automatic grants: the compute default account holds no role (organizations since May 2024)."""
    cloud.cloudbuild.default_identity = "compute"
    cloud.automatic_default_grants = False
    return cloud


def compute_account(cloud) -> str:
    return f"{cloud.project_number(PROJECT)}-compute@developer.gserviceaccount.com"


def source_archive() -> bytes:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        body = b"FROM python:3.11-slim\n"
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    return data.getvalue()


def build_as(cloud, bucket: str, account: str = ""):
    """A one-step build of gs://BUCKET/src.tgz, as `account` (default: the project's build identity)."""
    build = cb.Build(source=cb.Source(storage_source=cb.StorageSource(bucket=bucket, object_="src.tgz")),
                     steps=[cb.BuildStep(name="gcr.io/cloud-builders/docker", args=["build", "-t", "img", "."])])
    if account:
        build.service_account = f"projects/{PROJECT}/serviceAccounts/{account}"
        build.logs_bucket = f"gs://{bucket}/logs"
    operation = make_clients(cloud.url).builds.create_build(parent=f"projects/{PROJECT}/locations/{REGION}",
                                                            build=build)
    try:
        operation.result(polling=FAST_POLLING)
    except gexc.GoogleAPICallError:
        pass
    return cloud.cloudbuild.builds[operation.metadata.build.id].build


def grant(bucket, member: str, role: str) -> None:
    policy = bucket.get_iam_policy(requested_policy_version=3)
    policy.bindings.append({"role": role, "members": {member}})
    bucket.set_iam_policy(policy)


# -- the build reads its source as its own account ------------------------------------------------------
def test_a_build_whose_account_may_not_read_the_source_fails_with_googles_message(cloud):
    new_project(cloud)
    bucket = new_bucket(storage_client(cloud), "src-unreadable")
    bucket.blob("src.tgz").upload_from_string(source_archive())
    account = cloud.iamadmin.add_account(PROJECT, "ci-builder")

    refused = build_as(cloud, "src-unreadable", account)
    assert cb.Build.Status(refused.status).name == "FAILURE"
    assert cb.Build.FailureInfo.FailureType(refused.failure_info.type_).name == "FETCH_SOURCE_FAILED"
    assert f"{account} {DENIED_GET}" in refused.failure_info.detail
    assert "gs://src-unreadable/src.tgz" in refused.status_detail
    assert f"AccessDeniedException: 403 {account} {DENIED_GET}" in cloud.cloudbuild.log_text(refused.id)
    # the compute default account without the automatic Editor grant is refused the same way
    assert DENIED_GET in build_as(cloud, "src-unreadable").failure_info.detail

    grant(bucket, f"serviceAccount:{account}", "roles/storage.objectViewer")
    assert cb.Build.Status(build_as(cloud, "src-unreadable", account).status).name == "SUCCESS"

    # accounts with project-wide access need no bucket grant: the legacy Cloud Build account, and the
    # compute account while it is the project's Editor (automatic grants)
    cloud.cloudbuild.default_identity = "legacy"
    assert cb.Build.Status(build_as(cloud, "src-unreadable").status).name == "SUCCESS"
    cloud.cloudbuild.default_identity, cloud.automatic_default_grants = "compute", True
    assert cb.Build.Status(build_as(cloud, "src-unreadable").status).name == "SUCCESS"
    assert not any(member.endswith(("@cloudbuild.gserviceaccount.com", "-compute@developer.gserviceaccount.com"))
                   for b in cloud.bucket_iam.policy("src-unreadable").bindings for member in b.members)


def test_lsdeploy_grants_its_build_account_the_sources_bucket(cloud, backend):
    new_project(cloud)
    result = deploy(cloud, backend, settings_for("srcgrant"))
    assert result.built
    policy = cloud.bucket_iam.policy("src-srcgrant")
    assert any(b.role == "roles/storage.objectUser" and f"serviceAccount:{BUILDER}" in b.members
               for b in policy.bindings)
    assert ("SetIamPolicy", "src-srcgrant", 200) in cloud.bucket_iam.calls


def test_a_source_read_refused_right_after_the_grant_is_built_again(make_gcp_fakes, gcs_emulator, backend):
    """The build's account is granted the sources bucket just before the build: while IAM has not
    applied it, the build fails at fetching its source (Google's message names no bucket), and the
    deploy builds again, backing off, instead of failing; the upload and the grant are not repeated."""
    cloud = make_gcp_fakes(storage_url=gcs_emulator.url, iam_delay=0.5)
    cloud.iam.only = ("/buckets/",)  # only bucket grants take time here
    lines = []
    assert deploy(cloud, backend, settings_for("srcdelay"), lines).built
    assert cloud.log.count(api="cloudbuild", method="CreateBuild") >= 2
    assert any("refused its source (storage.objects.get) it was granted" in line for line in lines), lines
    assert [c for c in cloud.bucket_iam.calls if c[:2] == ("SetIamPolicy", "src-srcdelay")] == [
        ("SetIamPolicy", "src-srcdelay", 200)]


# -- the service's account uses the state bucket -------------------------------------------------------
def create_service(cloud, service_id: str, bucket: str, account: str = "", revision: str = "", wait: str = "0"):
    """A service whose container keeps its state in gs://BUCKET and waits `wait` seconds at start-up
    for the permissions it lacks (MODEL_STATE_PERMISSION_WAIT_SECONDS, as lsdeploy's store does)."""
    env = [run_v2.EnvVar(name="MODEL_STATE_URI", value=f"gs://{bucket}/{service_id}"),
           run_v2.EnvVar(name="MODEL_STATE_PERMISSION_WAIT_SECONDS", value=wait)]
    container = run_v2.Container(image="us-docker.pkg.dev/cloudrun/container/hello", env=env)
    template = run_v2.RevisionTemplate(containers=[container], service_account=account, revision=revision)
    services = make_clients(cloud.url).services
    name = f"projects/{PROJECT}/locations/{REGION}/services/{service_id}"
    if revision:
        operation = services.update_service(service=run_v2.Service(name=name, template=template))
    else:
        operation = services.create_service(parent=f"projects/{PROJECT}/locations/{REGION}", service_id=service_id,
                                            service=run_v2.Service(template=template))
    return operation.result(polling=FAST_POLLING)


def test_a_runtime_account_without_the_state_bucket_grant_fails_the_revision_in_cloud_runs_words(cloud):
    new_project(cloud)
    bucket = new_bucket(storage_client(cloud), "state-ungranted")
    account = compute_account(cloud)
    with pytest.raises(gexc.FailedPrecondition) as info:
        create_service(cloud, "stateless", "state-ungranted")
    message = info.value.message
    assert "The user-provided container failed to start and listen on the port defined provided by the PORT=8080" \
        in message and "Logs URL: https://console.cloud.google.com/logs/viewer?" in message
    # what the container logged is in its logs, never in Cloud Run's condition
    assert "storage.objects" not in message and "state-ungranted" not in message
    service = cloud.run.service("stateless")
    assert not service.latest_ready_revision and "stateless-00001-" in service.terminal_condition.message

    grant(bucket, f"serviceAccount:{account}", "roles/storage.objectViewer")  # reads, but may not write
    with pytest.raises(gexc.FailedPrecondition, match="The user-provided container failed to start"):
        create_service(cloud, "stateless", "state-ungranted", revision="stateless-viewer")
    grant(bucket, f"serviceAccount:{account}", "roles/storage.objectUser")
    ready = create_service(cloud, "stateless", "state-ungranted", revision="stateless-user")
    assert ready.latest_ready_revision.endswith("/stateless-user")


def test_a_revision_started_before_its_state_bucket_grant_applied_becomes_ready_once_it_does(make_gcp_fakes,
                                                                                             gcs_emulator):
    # IAM takes minutes to apply a grant; the container's start-up keeps checking the bucket
    cloud = make_gcp_fakes(storage_url=gcs_emulator.url, iam_delay=2.0)
    new_project(cloud)
    bucket = new_bucket(storage_client(cloud), "state-iamwait")
    grant(bucket, f"serviceAccount:{compute_account(cloud)}", "roles/storage.objectUser")
    started = time.monotonic()
    service = create_service(cloud, "iamwait", "state-iamwait", wait="30")
    assert service.latest_ready_revision.rsplit("/", 1)[-1].startswith("iamwait-00001-")
    assert time.monotonic() - started >= 1.5  # ready only once the grant applied
    # a wait shorter than IAM's (a propagation that outlasts the test, so no slow poll can see it land)
    cloud = new_project(make_gcp_fakes(storage_url=gcs_emulator.url, iam_delay=3600))
    short = new_bucket(storage_client(cloud), "state-iamshort")
    grant(short, f"serviceAccount:{compute_account(cloud)}", "roles/storage.objectUser")
    with pytest.raises(gexc.FailedPrecondition, match="failed to start"):
        create_service(cloud, "iamshort", "state-iamshort", wait="0.5")
    # why is in the revision's log (Cloud Logging), as lsdeploy's store writes it
    failed = cloud.run.service("iamshort").latest_created_revision.rsplit("/", 1)[-1]
    logs = LoggingRest(AuthorizedSession(AnonymousCredentials()), cloud.url)
    said = [e["textPayload"] for e in logs.list_entries(
        [f"projects/{PROJECT}"], f'resource.labels.revision_name="{failed}"')]
    assert said and said[0].startswith("error: no permission to read gs://state-iamshort/iamshort/ as ")
    assert "still refused after waiting" in said[0]


def test_lsdeploy_grants_the_runtime_account_the_state_bucket(cloud, backend):
    new_project(cloud)
    result = deploy(cloud, backend, settings_for("stategrant"))
    member = f"serviceAccount:{compute_account(cloud)}"
    assert cloud.bucket_iam.allows("state-stategrant", member, "storage.objects.create")
    assert result.revision.startswith("stategrant-00001-")  # the first revision started


def test_a_deployer_that_may_not_read_bucket_policies_is_told_and_the_revision_fails_without_the_grant(cloud,
                                                                                                       backend):
    """docs/ci.md's least-privilege set-up: the grants are made by hand. Here only the build's was."""
    new_project(cloud)
    client = storage_client(cloud)
    new_bucket(client, "state-byhand")
    new_bucket(client, "src-byhand")
    cloud.bucket_iam.grant("src-byhand", f"serviceAccount:{BUILDER}", "roles/storage.objectUser")
    cloud.restrict_deployer(set(PERMISSIONS.values()) | {"storage.objects.create", "storage.objects.get",
                                                         "storage.objects.list", "storage.buckets.get",
                                                         "storage.buckets.create", "iam.serviceAccounts.actAs"})
    lines = []
    with pytest.raises(LsdeployError) as info:  # the container waits 1 s for a grant that never comes
        deploy(cloud, backend, settings_for("byhand", env={"MODEL_STATE_PERMISSION_WAIT_SECONDS": "1"}), lines)
    notes = [line for line in lines if "may not read the IAM policy of gs://state-byhand" in line]
    command = "gcloud storage buckets add-iam-policy-binding gs://state-byhand"
    assert notes and command in notes[0]
    assert info.value.exit_code == EXIT_DEPLOY
    text = str(info.value)
    # Cloud Run's message says only that the container did not start; the deploy names what it
    # could not check, and the command
    assert "failed to start" in text and "Logs URL" in text
    assert "could not check that the service holds roles/storage.objectUser on gs://state-byhand" in text
    assert command in text


# -- the bucket IAM methods -----------------------------------------------------------------------------
def test_set_iam_policy_with_a_stale_etag_answers_412(cloud):
    bucket = new_bucket(storage_client(cloud), "iam-etag")
    first = bucket.get_iam_policy(requested_policy_version=3)
    assert first.etag == "CAE=" and first.version == 1
    assert {"role": "roles/storage.legacyBucketOwner", "members": {f"projectOwner:{PROJECT}",
                                                                   f"projectEditor:{PROJECT}"}} in first.bindings
    grant(bucket, "serviceAccount:a@example.iam.gserviceaccount.com", "roles/storage.objectViewer")
    second = bucket.get_iam_policy()
    assert second.etag not in ("", first.etag)

    first.bindings.append({"role": "roles/storage.objectUser", "members": {"user:late@example.com"}})
    with pytest.raises(gexc.PreconditionFailed, match="Precondition Failed"):
        bucket.set_iam_policy(first)
    assert bucket.get_iam_policy().etag == second.etag  # nothing written
    assert ("SetIamPolicy", "iam-etag", 412) in cloud.bucket_iam.calls


def test_set_iam_policy_validates_roles_members_and_public_access_prevention(cloud):
    bucket = new_bucket(storage_client(cloud), "iam-rules")
    for role, member in (("roles/storage.objectUser", "alice@example.com"), ("storage.objectUser", "user:a@b.c"),
                         ("roles/storage.noSuchRole", "user:a@b.c")):
        policy = bucket.get_iam_policy()
        policy.bindings.append({"role": role, "members": {member}})
        with pytest.raises(gexc.BadRequest):
            bucket.set_iam_policy(policy)
    policy = bucket.get_iam_policy()
    policy.bindings.append({"role": "roles/storage.objectViewer", "members": {"allUsers"}})
    with pytest.raises(gexc.PreconditionFailed, match="public access prevention is enforced"):
        bucket.set_iam_policy(policy)
    with pytest.raises(gexc.NotFound):
        storage_client(cloud).bucket("no-such-bucket-iam").get_iam_policy()


def test_test_permissions_answers_what_the_deployer_holds(cloud):
    bucket = new_bucket(storage_client(cloud), "iam-test")
    wanted = ["storage.buckets.getIamPolicy", "storage.buckets.setIamPolicy", "storage.objects.get"]
    assert bucket.test_iam_permissions(wanted) == wanted
    cloud.restrict_deployer({"storage.objects.get"})
    assert bucket.test_iam_permissions(wanted) == ["storage.objects.get"]
    with pytest.raises(gexc.Forbidden, match="deployer@example.com does not have storage.buckets.getIamPolicy access"):
        bucket.get_iam_policy()


def test_a_deployer_without_set_iam_policy_gets_the_role_and_the_command(cloud, backend):
    held = set(PERMISSIONS.values()) | {"storage.objects.create", "storage.objects.get", "storage.objects.list",
                                        "storage.buckets.get", "storage.buckets.create", "storage.buckets.getIamPolicy",
                                        "iam.serviceAccounts.actAs"}
    cloud.restrict_deployer(held - {"storage.buckets.setIamPolicy"})
    with pytest.raises(LsdeployError) as info:
        deploy(cloud, backend, settings_for("nosetiam"))
    message = str(info.value)
    assert info.value.exit_code == EXIT_AUTH and "\n" not in message
    assert "gs://src-nosetiam" in message and "storage.buckets.setIamPolicy" in message
    assert "roles/storage.admin" in message
    assert (f"gcloud storage buckets add-iam-policy-binding gs://src-nosetiam --member serviceAccount:{BUILDER} "
            "--role roles/storage.objectUser") in message
    assert cloud.log.count(api="cloudbuild", method="CreateBuild") == 0


# -- the organization policy and the front itself ---------------------------------------------------------
def test_a_bucket_without_uniform_access_is_refused_under_the_organization_policy(cloud):
    cloud.fresh_project()
    client = storage_client(cloud)
    with pytest.raises(gexc.PreconditionFailed,
                       match="Request violates constraint 'constraints/storage.uniformBucketLevelAccess'"):
        client.create_bucket("fine-grained", location=REGION)
    assert client.lookup_bucket("fine-grained") is None
    # lsdeploy's buckets have uniform access: accepted, and it may not be turned off afterwards
    bucket = provider_for(cloud).ensure_bucket(settings_for("ubla"), "ubla-bucket", lambda m: None)
    bucket.iam_configuration.uniform_bucket_level_access_enabled = False
    with pytest.raises(gexc.PreconditionFailed, match="storage.uniformBucketLevelAccess"):
        bucket.patch()


def test_the_front_forwards_resumable_uploads_and_ranged_downloads_to_the_emulator(cloud, gcs_emulator):
    bucket = new_bucket(storage_client(cloud), "front-data")
    data = os.urandom(9 * 1024 * 1024)  # above 8 MiB the client switches to a resumable upload
    bucket.blob("big.bin").upload_from_string(data)
    blob = bucket.get_blob("big.bin")
    assert blob.media_link.startswith(cloud.storage_front.url)  # the emulator's URLs are rewritten
    assert blob.download_as_bytes(start=100, end=199) == data[100:200]
    assert gcs_emulator.read_object("front-data", "big.bin") == data
    paths = [(method, path.split("?")[0]) for method, path, _ in cloud.storage_front.requests]
    assert ("PUT", "/upload/storage/v1/b/front-data/o") in paths  # the session's chunks came through the front
