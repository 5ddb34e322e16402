"""The Google API fakes, driven through Google's official Python clients over REST, configured the
way the deploy code configures them (anonymous credentials, plain-http api_endpoint)."""
from __future__ import annotations

import io
import json
import tarfile

import google_crc32c
import pytest
import requests
from google.api_core import exceptions
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession
from google.cloud import artifactregistry_v1, run_v2, secretmanager_v1
from google.cloud.devtools import cloudbuild_v1
from google.iam.v1 import policy_pb2
from google.protobuf import duration_pb2, field_mask_pb2

from fakes import ENDPOINT_VARIABLES
from fakes.fixtures import FAST_POLLING, gcp_clients, gcp_fakes, make_clients, make_gcp_fakes  # noqa: F401

from lsdeploy.providers.gcp.run_logs import LoggingRest

P, R = "lsdeploy-test", "us-central1"
PARENT = f"projects/{P}/locations/{R}"
REPO = f"{PARENT}/repositories/cloud-run-source-deploy"
IMAGE = f"{R}-docker.pkg.dev/{P}/cloud-run-source-deploy/svc"


def tarball(files: dict[str, str | bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in sorted(files.items()):
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


DOCKERFILE = 'FROM python:3.12-slim\nWORKDIR /app\nCOPY . /app\nCMD ["label-studio-ml", "start", "/app"]\n'


def service(image="us-docker.pkg.dev/cloudrun/container/hello", env=None, **template):
    container = run_v2.Container(image=image, env=[run_v2.EnvVar(name=k, value=v) for k, v in (env or {}).items()])
    return run_v2.Service(template=run_v2.RevisionTemplate(containers=[container], **template))


def create(clients, service_id="svc", svc=None):
    operation = clients.services.create_service(parent=PARENT, service=svc or service(), service_id=service_id)
    return operation.result(polling=FAST_POLLING)


def docker_build(bucket, obj, tags, extra_steps=(), images=None, logs_bucket=""):
    return cloudbuild_v1.Build(
        source=cloudbuild_v1.Source(storage_source=cloudbuild_v1.StorageSource(bucket=bucket, object_=obj)),
        steps=[*extra_steps, cloudbuild_v1.BuildStep(
            name="gcr.io/cloud-builders/docker",
            args=["build", *sum((["-t", t] for t in tags), []), "--cache-from", f"{IMAGE}:latest", "."])],
        images=list(images if images is not None else tags), logs_bucket=logs_bucket)


def make_repo(clients):
    op = clients.registry.create_repository(
        parent=PARENT, repository_id="cloud-run-source-deploy",
        repository=artifactregistry_v1.Repository(format_=artifactregistry_v1.Repository.Format.DOCKER))
    return op.result(polling=FAST_POLLING)


# ------------------------------------------------------------------------------------------------
# Plumbing: routes, strict parsing, errors


def test_routes_are_the_clients_own(gcp_fakes):
    """The route table is read from the installed clients' REST transports."""
    routes = {(r.api, r.method, r.http_method, r.template) for r in gcp_fakes.server.routes}
    assert ("run", "CreateService", "POST", "/v2/{parent=projects/*/locations/*}/services") in routes
    assert ("run", "UpdateService", "PATCH", "/v2/{service.name=projects/*/locations/*/services/*}") in routes
    assert ("cloudbuild", "CreateBuild", "POST", "/v1/projects/{project_id}/builds") in routes
    assert ("secretmanager", "AccessSecretVersion", "GET",
            "/v1/{name=projects/*/secrets/*/versions/*}:access") in routes
    implemented = set(gcp_fakes.server.handlers)
    assert {(r.api, r.method) for r in gcp_fakes.server.routes} >= implemented


def test_endpoint_variables_point_at_the_server(gcp_fakes):
    env = gcp_fakes.env
    assert set(ENDPOINT_VARIABLES.values()) <= set(env)
    assert all(value == gcp_fakes.url + "/" for value in gcp_fakes.endpoint_env.values())
    clients = make_clients(env["CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN"])  # the override form, trailing slash
    assert list(clients.services.list_services(parent=PARENT)) == []


def test_unknown_body_field_is_rejected(gcp_fakes):
    url = f"{gcp_fakes.url}/v2/{PARENT}/services?serviceId=svc"
    body = {"template": {"containers": [{"image": "x", "imagePullPolicy": "Always"}]}}
    answer = requests.post(url, json=body, timeout=10)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT" and error["code"] == 400
    assert 'Unknown name "imagePullPolicy"' in error["message"]
    assert gcp_fakes.run.services == {}
    # a wrong type and a bad enum name are rejected the same way
    for bad in ({"template": {"timeout": 30}}, {"ingress": "INGRESS_EVERYWHERE"}):
        answer = requests.post(url, json=bad, timeout=10)
        assert answer.status_code == 400, bad
        assert answer.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert gcp_fakes.log.count(api="run", method="CreateService", status=400) == 3


def test_unknown_query_parameter_is_rejected(gcp_fakes):
    answer = requests.get(f"{gcp_fakes.url}/v2/{PARENT}/services?pageSize=5&colour=blue", timeout=10)
    assert answer.status_code == 400
    assert "Cannot bind query parameter. Field 'colour' could not be found" in answer.json()["error"]["message"]
    answer = requests.get(f"{gcp_fakes.url}/v2/{PARENT}/services?pageSize=5&showDeleted=true", timeout=10)
    assert answer.status_code == 200
    request = gcp_fakes.log.entries[-1].request
    assert request.page_size == 5 and request.show_deleted is True


def test_unimplemented_route_and_unknown_path(gcp_fakes):
    answer = requests.get(f"{gcp_fakes.url}/v1/{PARENT}/workerPools/x", timeout=10)  # a real route, not faked
    assert answer.status_code == 501 and answer.json()["error"]["status"] == "UNIMPLEMENTED"
    answer = requests.get(f"{gcp_fakes.url}/v9/nothing", timeout=10)
    assert answer.status_code == 404 and answer.json()["error"]["status"] == "NOT_FOUND"


# ------------------------------------------------------------------------------------------------
# Cloud Run


def test_create_get_update_service(gcp_fakes, gcp_clients):
    clients = gcp_clients
    operation = clients.services.create_service(parent=PARENT, service=service(env={"A": "1"}), service_id="svc")
    assert operation.operation.done is False  # never done in the first answer
    assert operation.metadata.name == f"{PARENT}/services/svc"
    created = operation.result(polling=FAST_POLLING)
    assert created.generation == 1 and created.observed_generation == 1
    assert created.terminal_condition.state == run_v2.Condition.State.CONDITION_SUCCEEDED
    assert created.latest_ready_revision == created.latest_created_revision
    assert created.latest_ready_revision.rsplit("/", 1)[-1].startswith("svc-00001-")
    assert created.uri == created.urls[0] and created.uri.startswith("https://svc-")
    # server-side defaults show up on read
    live = clients.services.get_service(name=f"{PARENT}/services/svc")
    assert live.template.max_instance_request_concurrency == 80
    assert live.template.timeout.total_seconds() == 300
    assert dict(live.template.containers[0].resources.limits) == {"cpu": "1000m", "memory": "512Mi"}
    assert live.traffic[0].type_ == run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST
    assert live.traffic_statuses[0].percent == 100

    # a template change: new generation, new revision
    updated = clients.services.update_service(service=run_v2.Service(
        name=f"{PARENT}/services/svc", template=service(env={"A": "2"}).template)).result(polling=FAST_POLLING)
    assert updated.generation == 2
    assert updated.latest_ready_revision.rsplit("/", 1)[-1].startswith("svc-00002-")

    # the same spec again: nothing changes
    before = len(gcp_fakes.run.revisions)
    same = clients.services.update_service(service=run_v2.Service(
        name=f"{PARENT}/services/svc", template=service(env={"A": "2"}).template)).result(polling=FAST_POLLING)
    assert same.generation == 2 and len(gcp_fakes.run.revisions) == before

    # update_mask: only labels change (new generation, no new revision)
    masked = clients.services.update_service(request=run_v2.UpdateServiceRequest(
        service=run_v2.Service(name=f"{PARENT}/services/svc", labels={"team": "ml"}),
        update_mask=field_mask_pb2.FieldMask(paths=["labels"]))).result(polling=FAST_POLLING)
    assert masked.labels == {"team": "ml"} and masked.generation == 3
    assert masked.template.containers[0].env[0].value == "2"
    assert len(gcp_fakes.run.revisions) == before
    assert gcp_fakes.log.filter(method="UpdateService")[-1].query == {"updateMask": "labels"}

    # allow_missing: create-or-update in one call
    other = clients.services.update_service(request=run_v2.UpdateServiceRequest(
        service=run_v2.Service(name=f"{PARENT}/services/other", template=service().template),
        allow_missing=True)).result(polling=FAST_POLLING)
    assert other.generation == 1
    names = [s.name for s in clients.services.list_services(parent=PARENT)]
    assert names == [f"{PARENT}/services/other", f"{PARENT}/services/svc"]

    # delete: an operation too, then NotFound
    clients.services.delete_service(name=f"{PARENT}/services/other").result(polling=FAST_POLLING)
    with pytest.raises(exceptions.NotFound, match="Resource 'other' of kind 'SERVICE'"):
        clients.services.get_service(name=f"{PARENT}/services/other")


def test_update_missing_service_without_allow_missing(gcp_clients):
    with pytest.raises(exceptions.NotFound):
        gcp_clients.services.update_service(service=run_v2.Service(name=f"{PARENT}/services/nope",
                                                                   template=service().template))


def test_create_twice_is_a_conflict(gcp_clients):
    create(gcp_clients)
    with pytest.raises(exceptions.Conflict, match="already exists"):
        gcp_clients.services.create_service(parent=PARENT, service=service(), service_id="svc")


@pytest.mark.parametrize("service_id", ["Svc", "1svc", "svc-", "s_v_c", "a" * 50])
def test_bad_service_id_is_rejected(gcp_fakes, gcp_clients, service_id):
    with pytest.raises(exceptions.BadRequest, match="service_id") as caught:
        gcp_clients.services.create_service(parent=PARENT, service=service(), service_id=service_id)
    assert caught.value.details[0]["fieldViolations"][0]["field"] == "service_id"
    assert gcp_fakes.run.services == {}


def test_longest_valid_service_id(gcp_clients):
    assert create(gcp_clients, "a" * 49).name.endswith("/" + "a" * 49)


def _container(**kwargs):
    return run_v2.Container(image="us-docker.pkg.dev/cloudrun/container/hello", **kwargs)


GPU = {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
INVALID = {
    "two ports": (dict(containers=[_container(ports=[run_v2.ContainerPort(container_port=8080),
                                                     run_v2.ContainerPort(container_port=9090)])]), {}, "port"),
    "concurrency": (dict(containers=[_container()], max_instance_request_concurrency=1001), {}, "at most 1000"),
    "timeout": (dict(containers=[_container()], timeout=duration_pb2.Duration(seconds=3601)), {}, "3600s"),
    "probe timeout": (dict(containers=[_container(startup_probe=run_v2.Probe(
        timeout_seconds=10, period_seconds=10, tcp_socket=run_v2.TCPSocketAction(port=8080)))]), {}, "less than"),
    "probe period": (dict(containers=[_container(startup_probe=run_v2.Probe(
        timeout_seconds=1, period_seconds=241, tcp_socket=run_v2.TCPSocketAction(port=8080)))]), {}, "240"),
    "limits key": (dict(containers=[_container(resources=run_v2.ResourceRequirements(
        limits={"cpu": "1", "ephemeral-storage": "1Gi"}))]), {}, "ephemeral-storage"),
    "gpu cpu": (dict(containers=[_container(resources=run_v2.ResourceRequirements(
        limits={**GPU, "cpu": "2"}, cpu_idle=False))], node_selector=run_v2.NodeSelector(accelerator="nvidia-l4")),
        {}, "4 CPU"),
    "gpu memory": (dict(containers=[_container(resources=run_v2.ResourceRequirements(
        limits={**GPU, "memory": "8Gi"}, cpu_idle=False))], node_selector=run_v2.NodeSelector(accelerator="nvidia-l4")),
        {}, "16Gi"),
    "gpu cpu_idle": (dict(containers=[_container(resources=run_v2.ResourceRequirements(
        limits=GPU, cpu_idle=True))], node_selector=run_v2.NodeSelector(accelerator="nvidia-l4")), {}, "cpu_idle"),
    "reserved env": (dict(containers=[_container(env=[run_v2.EnvVar(name="PORT", value="1")])]), {}, "reserved"),
    # Cloud Run's CPU and memory table
    "fractional cpu always allocated": (dict(containers=[_container(resources=run_v2.ResourceRequirements(
        limits={"cpu": "0.5", "memory": "512Mi"}, cpu_idle=False))], max_instance_request_concurrency=1), {},
        "only during request processing"),
    "fractional cpu concurrency": (dict(containers=[_container(resources=run_v2.ResourceRequirements(
        limits={"cpu": "500m", "memory": "512Mi"}, cpu_idle=True))], max_instance_request_concurrency=4), {},
        "concurrency 1"),
    "cpu not whole": (dict(containers=[_container(resources=run_v2.ResourceRequirements(
        limits={"cpu": "1.5", "memory": "2Gi"}, cpu_idle=False))]), {}, "whole numbers up to 8"),
    "cpu above 8": (dict(containers=[_container(resources=run_v2.ResourceRequirements(
        limits={"cpu": "16", "memory": "32Gi"}, cpu_idle=False))]), {}, "whole numbers up to 8"),
    "two gpus": (dict(containers=[_container(resources=run_v2.ResourceRequirements(
        limits={**GPU, "nvidia.com/gpu": "2"}, cpu_idle=False))], node_selector=run_v2.NodeSelector(
        accelerator="nvidia-l4")), {}, "Only 1 GPU per instance"),
    "rtx pro 6000 minimum": (dict(containers=[_container(resources=run_v2.ResourceRequirements(
        limits={"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}, cpu_idle=False))],
        node_selector=run_v2.NodeSelector(accelerator="nvidia-rtx-pro-6000")), {}, "at least 20 CPU"),
    "memory over 32Gi": (dict(containers=[_container(resources=run_v2.ResourceRequirements(
        limits={"cpu": "8", "memory": "64Gi"}, cpu_idle=False))]), {}, "at most 32Gi"),
    "memory needs cpus": (dict(containers=[_container(resources=run_v2.ResourceRequirements(
        limits={"cpu": "1", "memory": "8Gi"}, cpu_idle=False))]), {}, "Memory over 4Gi requires at least 2 CPU"),
    "cpus need memory": (dict(containers=[_container(resources=run_v2.ResourceRequirements(
        limits={"cpu": "4", "memory": "1Gi"}, cpu_idle=False))]), {}, "at least 2Gi"),
    "traffic sum": (dict(containers=[_container()]), dict(traffic=[run_v2.TrafficTarget(
        type_=run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST, percent=90)]), "add up to 100"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_cloud_run_validation(gcp_fakes, gcp_clients, case):
    template, extra, words = INVALID[case]
    svc = run_v2.Service(template=run_v2.RevisionTemplate(**template), **extra)
    with pytest.raises(exceptions.BadRequest, match=words) as caught:
        gcp_clients.services.create_service(parent=PARENT, service=svc, service_id="svc")
    assert "Violation in CreateServiceRequest.service.template" in caught.value.message or case == "traffic sum"
    assert gcp_fakes.run.services == {}


def test_fractional_cpu_with_request_billing_and_concurrency_one(gcp_clients):
    svc = run_v2.Service(template=run_v2.RevisionTemplate(
        containers=[_container(resources=run_v2.ResourceRequirements(limits={"cpu": "0.5", "memory": "1Gi"},
                                                                     cpu_idle=True))],
        max_instance_request_concurrency=1))
    assert create(gcp_clients, "small", svc).template.containers[0].resources.limits["cpu"] == "0.5"


def test_cloud_run_has_gpus_only_in_its_gpu_regions(gcp_clients):
    svc = run_v2.Service(template=run_v2.RevisionTemplate(
        containers=[_container(resources=run_v2.ResourceRequirements(limits=GPU, cpu_idle=False))],
        node_selector=run_v2.NodeSelector(accelerator="nvidia-l4")))
    with pytest.raises(exceptions.BadRequest, match="GPU is not supported in region europe-west2"):
        gcp_clients.services.create_service(parent="projects/demo-project/locations/europe-west2", service=svc,
                                            service_id="gpu")


def test_any_whole_cpu_up_to_8_is_accepted(gcp_clients):
    svc = run_v2.Service(template=run_v2.RevisionTemplate(containers=[_container(
        resources=run_v2.ResourceRequirements(limits={"cpu": "3", "memory": "4Gi"}, cpu_idle=False))]))
    assert create(gcp_clients, "three", svc).template.containers[0].resources.limits["cpu"] == "3"


def test_valid_gpu_service(gcp_clients):
    svc = run_v2.Service(template=run_v2.RevisionTemplate(
        containers=[_container(resources=run_v2.ResourceRequirements(limits=GPU, cpu_idle=False))],
        node_selector=run_v2.NodeSelector(accelerator="nvidia-l4")))
    live = create(gcp_clients, "gpu", svc)
    assert live.template.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    assert live.template.containers[0].resources.cpu_idle is False


def test_revision_that_never_gets_ready_keeps_traffic(gcp_fakes, gcp_clients):
    first = create(gcp_clients, "svc", service(env={"V": "1"}))
    gcp_fakes.run.never_ready("svc", "The user-provided container failed to start and listen on the port.")
    operation = gcp_clients.services.update_service(service=run_v2.Service(
        name=f"{PARENT}/services/svc", template=service(env={"V": "2"}).template))
    with pytest.raises(exceptions.GoogleAPICallError, match="is not ready and cannot serve traffic") as caught:
        operation.result(polling=FAST_POLLING)
    assert "failed to start" in caught.value.message
    live = gcp_clients.services.get_service(name=f"{PARENT}/services/svc")
    assert live.terminal_condition.state == run_v2.Condition.State.CONDITION_FAILED
    assert "svc-00002-" in live.terminal_condition.message
    assert live.latest_ready_revision == first.latest_ready_revision
    assert live.latest_created_revision.rsplit("/", 1)[-1].startswith("svc-00002-")
    assert live.traffic_statuses[0].percent == 100
    bad = gcp_clients.revisions.get_revision(name=live.latest_created_revision)
    ready = [c for c in bad.conditions if c.type_ == "Ready"][0]
    assert ready.state == run_v2.Condition.State.CONDITION_FAILED and "failed to start" in ready.message


def test_missing_secret_reference_fails_the_revision(gcp_clients):
    env = run_v2.EnvVar(name="KEY", value_source=run_v2.EnvVarSource(
        secret_key_ref=run_v2.SecretKeySelector(secret="absent", version="latest")))
    svc = run_v2.Service(template=run_v2.RevisionTemplate(containers=[_container(env=[env])]))
    with pytest.raises(exceptions.GoogleAPICallError, match="Secret projects/.*/secrets/absent/versions/latest"):
        create(gcp_clients, "svc", svc)


def test_secret_reference_needs_the_accessor_role(gcp_fakes, gcp_clients):
    gcp_clients.secrets.create_secret(parent=f"projects/{P}", secret_id="ls-key", secret=secretmanager_v1.Secret(
        replication=secretmanager_v1.Replication(automatic=secretmanager_v1.Replication.Automatic())))
    gcp_clients.secrets.add_secret_version(parent=f"projects/{P}/secrets/ls-key",
                                           payload=secretmanager_v1.SecretPayload(data=b"k"))

    def with_secret(value):
        env = [run_v2.EnvVar(name="KEY", value_source=run_v2.EnvVarSource(
            secret_key_ref=run_v2.SecretKeySelector(secret="ls-key", version="latest"))),
            run_v2.EnvVar(name="V", value=value)]
        return run_v2.Service(template=run_v2.RevisionTemplate(containers=[_container(env=env)]))

    with pytest.raises(exceptions.FailedPrecondition, match="Permission denied on secret: .*roles/secretmanager"):
        create(gcp_clients, "svc", with_secret("1"))
    grant_accessor(gcp_clients, gcp_fakes)
    fixed = gcp_clients.services.update_service(service=run_v2.Service(
        name=f"{PARENT}/services/svc", template=with_secret("2").template)).result(polling=FAST_POLLING)
    assert fixed.terminal_condition.state == run_v2.Condition.State.CONDITION_SUCCEEDED


def test_revisions_and_iam(gcp_fakes, gcp_clients):
    create(gcp_clients, "svc", service(env={"V": "1"}))
    gcp_clients.services.update_service(service=run_v2.Service(
        name=f"{PARENT}/services/svc", template=service(env={"V": "2"}).template)).result(polling=FAST_POLLING)
    revisions = list(gcp_clients.revisions.list_revisions(parent=f"{PARENT}/services/svc"))
    assert [r.name.rsplit("/", 1)[-1][:9] for r in revisions] == ["svc-00002", "svc-00001"]  # newest first
    assert revisions[1].containers[0].env[0].value == "1"
    with pytest.raises(exceptions.BadRequest, match="serving traffic"):
        gcp_clients.revisions.delete_revision(name=revisions[0].name)
    gcp_clients.revisions.delete_revision(name=revisions[1].name).result(polling=FAST_POLLING)
    with pytest.raises(exceptions.NotFound):
        gcp_clients.revisions.get_revision(name=revisions[1].name)

    resource = f"{PARENT}/services/svc"
    policy = gcp_clients.services.get_iam_policy(request={"resource": resource})
    policy.bindings.add(role="roles/run.invoker", members=["allUsers"])
    gcp_clients.services.set_iam_policy(request={"resource": resource, "policy": policy})
    again = gcp_clients.services.get_iam_policy(request={"resource": resource})
    assert [(b.role, list(b.members)) for b in again.bindings] == [("roles/run.invoker", ["allUsers"])]
    with pytest.raises(exceptions.Conflict, match="concurrent policy changes"):  # stale etag
        gcp_clients.services.set_iam_policy(request={"resource": resource, "policy": policy})
    bad = policy_pb2.Policy(bindings=[policy_pb2.Binding(role="roles/run.invoker", members=["everyone"])])
    with pytest.raises(exceptions.BadRequest, match="Invalid member"):
        gcp_clients.services.set_iam_policy(request={"resource": resource, "policy": bad})


# ------------------------------------------------------------------------------------------------
# Faults


def test_permission_denied_names_the_permission(gcp_fakes, gcp_clients):
    gcp_fakes.deny("run", "CreateService")
    with pytest.raises(exceptions.Forbidden) as caught:
        gcp_clients.services.create_service(parent=PARENT, service=service(), service_id="svc")
    assert caught.value.reason == "IAM_PERMISSION_DENIED"
    assert caught.value.metadata["permission"] == "run.services.create"
    assert "run.services.create" in caught.value.message and PARENT in caught.value.message
    assert gcp_fakes.run.services == {}
    assert list(gcp_clients.services.list_services(parent=PARENT)) == []  # other methods still work


def test_api_not_enabled(gcp_fakes, gcp_clients):
    gcp_fakes.disable_api("cloudbuild")
    with pytest.raises(exceptions.Forbidden) as caught:
        gcp_clients.builds.list_builds(project_id=P)
    error = caught.value
    assert error.reason == "SERVICE_DISABLED" and error.domain == "googleapis.com"
    assert error.metadata["service"] == "cloudbuild.googleapis.com"
    assert error.metadata["consumer"] == f"projects/{gcp_fakes.project_number(P)}"
    assert "Cloud Build API has not been used in project" in error.message
    gcp_clients.secrets.list_secrets(parent=f"projects/{P}")  # other APIs unaffected


def test_quota_exhausted_once(gcp_fakes, gcp_clients):
    gcp_fakes.quota("secretmanager", "ListSecrets", times=1)
    with pytest.raises(exceptions.TooManyRequests) as caught:
        gcp_clients.secrets.list_secrets(parent=f"projects/{P}", retry=None)
    assert caught.value.code == 429 and caught.value.reason == "RATE_LIMIT_EXCEEDED"
    assert list(gcp_clients.secrets.list_secrets(parent=f"projects/{P}")) == []


# ------------------------------------------------------------------------------------------------
# Cloud Build and Artifact Registry


def test_build_pushes_an_image_found_by_tag_and_digest(gcp_fakes, gcp_clients):
    clients = gcp_clients
    with pytest.raises(exceptions.NotFound):
        clients.registry.get_repository(name=REPO)
    repo = make_repo(clients)
    assert repo.name == REPO and repo.format_ == artifactregistry_v1.Repository.Format.DOCKER
    bundle = tarball({"Dockerfile": DOCKERFILE, "model.py": "print(1)\n"})
    gcp_fakes.storage.put("run-sources", "svc/1.tgz", bundle)

    operation = clients.builds.create_build(project_id=P, build=docker_build(
        "run-sources", "svc/1.tgz", [f"{IMAGE}:bundle-1", f"{IMAGE}:latest"]))
    assert operation.operation.done is False
    build_id = operation.metadata.build.id
    assert operation.metadata.build.status == cloudbuild_v1.Build.Status.QUEUED
    assert operation.metadata.build.log_url
    build = operation.result(polling=FAST_POLLING)
    assert build.status == cloudbuild_v1.Build.Status.SUCCESS and build.id == build_id
    digest = build.results.images[0].digest
    assert digest.startswith("sha256:") and len(digest) == 71
    assert [i.name for i in build.results.images] == [f"{IMAGE}:bundle-1", f"{IMAGE}:latest"]

    # "is there already an image for this bundle?" in one call: the tag
    tag = clients.registry.get_tag(name=f"{REPO}/packages/svc/tags/bundle-1")
    assert tag.version == f"{REPO}/packages/svc/versions/{digest}"
    with pytest.raises(exceptions.NotFound):
        clients.registry.get_tag(name=f"{REPO}/packages/svc/tags/bundle-2")
    image = clients.registry.get_docker_image(name=f"{REPO}/dockerImages/svc@{digest}")
    assert image.uri == f"{IMAGE}@{digest}" and sorted(image.tags) == ["bundle-1", "latest"]

    # same files in another object: same digest; changed files: another digest, tags move
    gcp_fakes.storage.put("run-sources", "svc/2.tgz", tarball({"model.py": "print(1)\n", "Dockerfile": DOCKERFILE}))
    again = clients.builds.create_build(project_id=P, build=docker_build(
        "run-sources", "svc/2.tgz", [f"{IMAGE}:bundle-1"])).result(polling=FAST_POLLING)
    assert again.results.images[0].digest == digest
    gcp_fakes.storage.put("run-sources", "svc/3.tgz", tarball({"model.py": "print(2)\n", "Dockerfile": DOCKERFILE}))
    changed = clients.builds.create_build(project_id=P, build=docker_build(
        "run-sources", "svc/3.tgz", [f"{IMAGE}:bundle-3", f"{IMAGE}:latest"])).result(polling=FAST_POLLING)
    new_digest = changed.results.images[0].digest
    assert new_digest != digest
    assert gcp_fakes.cloudbuild.record(changed.id).cache_from == [(f"{IMAGE}:latest", True)]

    images = list(clients.registry.list_docker_images(request={"parent": REPO, "order_by": "update_time desc"}))
    assert [i.uri for i in images] == [f"{IMAGE}@{new_digest}", f"{IMAGE}@{digest}"]
    assert sorted(images[0].tags) == ["bundle-3", "latest"] and images[1].tags == ["bundle-1"]
    versions = list(clients.registry.list_versions(parent=f"{REPO}/packages/svc"))
    assert len(versions) == 2
    # pruning: a tagged version needs force
    with pytest.raises(exceptions.BadRequest, match="has tags"):
        clients.registry.delete_version(name=f"{REPO}/packages/svc/versions/{digest}")
    clients.registry.delete_version(request={"name": f"{REPO}/packages/svc/versions/{digest}", "force": True}) \
        .result(polling=FAST_POLLING)
    assert [i.uri for i in clients.registry.list_docker_images(parent=REPO)] == [f"{IMAGE}@{new_digest}"]

    polled = [e.path for e in gcp_fakes.log.filter(api="cloudbuild", method="GetOperation")]
    assert polled and all(path == f"/v1/operations/build/{P}/{build_id}" for path in polled[:1])
    listed = list(clients.builds.list_builds(project_id=P))
    assert len(listed) == 3 and listed[0].id == changed.id  # newest first


def test_regional_build_and_its_operation_name(gcp_fakes, gcp_clients):
    make_repo(gcp_clients)
    gcp_fakes.storage.put("src", "b.tgz", tarball({"Dockerfile": DOCKERFILE}))
    operation = gcp_clients.builds.create_build(parent=PARENT, build=docker_build("src", "b.tgz", [f"{IMAGE}:x"]))
    build_id = operation.metadata.build.id
    assert operation.operation.name == f"{PARENT}/operations/{build_id}"
    assert gcp_fakes.log.filter(api="cloudbuild", method="CreateBuild")[-1].path == f"/v1/{PARENT}/builds"
    assert operation.result(polling=FAST_POLLING).status == cloudbuild_v1.Build.Status.SUCCESS
    fetched = gcp_clients.builds.get_build(
        request={"name": f"projects/{P}/locations/{R}/builds/{build_id}", "project_id": P, "id": build_id})
    assert fetched.id == build_id
    with pytest.raises(exceptions.NotFound):  # a regional build is not a global one
        gcp_clients.builds.get_build(project_id=P, id=build_id)


def test_the_legacy_build_path_builds_in_the_global_region_whatever_the_parent(gcp_fakes, gcp_clients):
    # with project_id set, the REST client sends POST /v1/projects/P/builds?parent=...: Google
    # documents that path as the global region's
    make_repo(gcp_clients)
    gcp_fakes.storage.put("src", "b.tgz", tarball({"Dockerfile": DOCKERFILE}))
    operation = gcp_clients.builds.create_build(parent=PARENT, project_id=P,
                                                build=docker_build("src", "b.tgz", [f"{IMAGE}:x"]))
    assert gcp_fakes.log.filter(api="cloudbuild", method="CreateBuild")[-1].path == f"/v1/projects/{P}/builds"
    assert operation.operation.name == f"operations/build/{P}/{operation.metadata.build.id}"
    assert "/locations/global/" in operation.metadata.build.name


def test_missing_source_is_rejected_at_create(gcp_fakes, gcp_clients):
    with pytest.raises(exceptions.BadRequest, match="could not resolve source"):
        gcp_clients.builds.create_build(project_id=P, build=docker_build("src", "nope.tgz", [f"{IMAGE}:x"]))
    assert gcp_fakes.cloudbuild.builds == {}


def test_build_failing_at_a_step(gcp_fakes, gcp_clients):
    make_repo(gcp_clients)
    gcp_fakes.storage.put("src", "b.tgz", tarball({"Dockerfile": DOCKERFILE}))
    gcp_fakes.cloudbuild.fail_next(step=0, log_lines=["ERROR: No matching distribution found for nope==9"])
    operation = gcp_clients.builds.create_build(project_id=P, build=docker_build("src", "b.tgz", [f"{IMAGE}:x"]))
    with pytest.raises(exceptions.GoogleAPICallError, match="Build failed; check build logs for details"):
        operation.result(polling=FAST_POLLING)
    build = gcp_clients.builds.get_build(project_id=P, id=operation.metadata.build.id)
    assert build.status == cloudbuild_v1.Build.Status.FAILURE
    assert build.failure_info.type_ == cloudbuild_v1.Build.FailureInfo.FailureType.USER_BUILD_STEP
    assert 'build step 0 "gcr.io/cloud-builders/docker" failed' in build.status_detail
    assert build.steps[0].status == cloudbuild_v1.Build.Status.FAILURE
    log = gcp_fakes.cloudbuild.log_text(build.id)
    assert "Step #0: ERROR: No matching distribution found for nope==9" in log and log.rstrip().endswith(
        "step exited with non-zero status: 1")
    with pytest.raises(exceptions.NotFound):  # nothing was pushed
        gcp_clients.registry.get_tag(name=f"{REPO}/packages/svc/tags/x")


@pytest.mark.parametrize("case", ["no dockerfile", "not an archive", "no repository"])
def test_builds_fail_like_the_real_service(gcp_fakes, gcp_clients, case):
    if case != "no repository":
        make_repo(gcp_clients)
    data = {"no dockerfile": tarball({"model.py": "x"}), "not an archive": b"plain text, not gzip",
            "no repository": tarball({"Dockerfile": DOCKERFILE})}[case]
    gcp_fakes.storage.put("src", "b.tgz", data)
    operation = gcp_clients.builds.create_build(project_id=P, build=docker_build("src", "b.tgz", [f"{IMAGE}:x"]))
    with pytest.raises(exceptions.GoogleAPICallError):
        operation.result(polling=FAST_POLLING)
    build = gcp_clients.builds.get_build(project_id=P, id=operation.metadata.build.id)
    expected = {"no dockerfile": ("USER_BUILD_STEP", "Dockerfile: no such file or directory"),
                "not an archive": ("FETCH_SOURCE_FAILED", "failed to fetch source"),
                "no repository": ("PUSH_FAILED", 'Repository "cloud-run-source-deploy" not found')}[case]
    assert cloudbuild_v1.Build.FailureInfo.FailureType(build.failure_info.type_).name == expected[0]
    assert expected[1] in gcp_fakes.cloudbuild.log_text(build.id)


def test_build_log_is_written_to_the_logs_bucket_as_it_runs(gcp_fakes, gcp_clients):
    make_repo(gcp_clients)
    gcp_fakes.storage.put("src", "b.tgz", tarball({"Dockerfile": DOCKERFILE}))
    operation = gcp_clients.builds.create_build(project_id=P, build=docker_build(
        "src", "b.tgz", [f"{IMAGE}:x"], logs_bucket="gs://my-logs/builds"))
    build_id = operation.metadata.build.id
    log_key = ("my-logs", f"builds/log-{build_id}.txt")
    assert log_key not in gcp_fakes.storage.objects  # queued: nothing yet
    working = gcp_clients.builds.get_build(project_id=P, id=build_id)
    assert working.status == cloudbuild_v1.Build.Status.WORKING
    partial = gcp_fakes.storage.objects[log_key].decode()
    assert partial.startswith(f'starting build "{build_id}"')
    operation.result(polling=FAST_POLLING)
    final = gcp_fakes.storage.objects[log_key].decode()
    assert final.startswith(partial) and len(final) > len(partial) and final.rstrip().endswith("DONE")


def test_build_log_streams_in_chunks(gcp_fakes, gcp_clients):
    """What the deploy code does: poll the build and read the log object from the last offset."""
    make_repo(gcp_clients)
    gcp_fakes.cloudbuild.polls_to_finish = 5
    gcp_fakes.storage.put("src", "b.tgz", tarball({"Dockerfile": DOCKERFILE}))
    operation = gcp_clients.builds.create_build(project_id=P, build=docker_build(
        "src", "b.tgz", [f"{IMAGE}:x"], logs_bucket="gs://my-logs"))
    build_id, offset, chunks = operation.metadata.build.id, 0, []
    while True:
        build = gcp_clients.builds.get_build(project_id=P, id=build_id)
        text = gcp_fakes.storage.get("my-logs", f"log-{build_id}.txt") or b""
        if len(text) > offset:
            chunks.append(text[offset:].decode())
            offset = len(text)
        if build.status not in (cloudbuild_v1.Build.Status.QUEUED, cloudbuild_v1.Build.Status.WORKING):
            break
    assert build.status == cloudbuild_v1.Build.Status.SUCCESS
    assert len(chunks) >= 3 and "".join(chunks) == gcp_fakes.cloudbuild.log_text(build_id)
    assert gcp_fakes.log.summary()["by_method"]["cloudbuild.GetBuild"] == 5


def test_cancel_and_build_validation(gcp_fakes, gcp_clients):
    gcp_fakes.storage.put("src", "b.tgz", tarball({"Dockerfile": DOCKERFILE}))
    operation = gcp_clients.builds.create_build(project_id=P, build=docker_build("src", "b.tgz", [f"{IMAGE}:x"]))
    cancelled = gcp_clients.builds.cancel_build(project_id=P, id=operation.metadata.build.id)
    assert cancelled.status == cloudbuild_v1.Build.Status.CANCELLED
    with pytest.raises(exceptions.GoogleAPICallError, match="cancelled"):
        operation.result(polling=FAST_POLLING)
    with pytest.raises(exceptions.BadRequest, match="at least one step"):
        gcp_clients.builds.create_build(project_id=P, build=cloudbuild_v1.Build())
    with pytest.raises(exceptions.BadRequest, match="_MISSING"):
        gcp_clients.builds.create_build(project_id=P, build=cloudbuild_v1.Build(
            steps=[cloudbuild_v1.BuildStep(name="ubuntu", args=["echo", "$_MISSING"])]))
    with pytest.raises(exceptions.BadRequest, match="service_account"):
        gcp_clients.builds.create_build(project_id=P, build=cloudbuild_v1.Build(
            steps=[cloudbuild_v1.BuildStep(name="ubuntu")], service_account="projects/p/serviceAccounts/x@y"))


# ------------------------------------------------------------------------------------------------
# Secret Manager


def test_secrets_round_trip(gcp_fakes, gcp_clients):
    secrets = gcp_clients.secrets
    number = gcp_fakes.project_number(P)
    created = secrets.create_secret(parent=f"projects/{P}", secret_id="ls-key", secret=secretmanager_v1.Secret(
        replication=secretmanager_v1.Replication(automatic=secretmanager_v1.Replication.Automatic()),
        labels={"app": "lsdeploy"}))
    assert created.name == f"projects/{number}/secrets/ls-key"  # numbers, like the real API
    with pytest.raises(exceptions.Conflict):
        secrets.create_secret(parent=f"projects/{P}", secret_id="ls-key", secret=created)
    with pytest.raises(exceptions.BadRequest, match="replication"):
        secrets.create_secret(parent=f"projects/{P}", secret_id="other", secret=secretmanager_v1.Secret())
    data = b"s3cret-token"
    v1 = secrets.add_secret_version(parent=f"projects/{P}/secrets/ls-key", payload=secretmanager_v1.SecretPayload(
        data=data, data_crc32c=google_crc32c.value(data)))
    assert v1.name == f"projects/{number}/secrets/ls-key/versions/1"
    with pytest.raises(exceptions.BadRequest, match="Checksum"):
        secrets.add_secret_version(parent=created.name, payload=secretmanager_v1.SecretPayload(
            data=b"x", data_crc32c=1))
    secrets.add_secret_version(parent=created.name, payload=secretmanager_v1.SecretPayload(data=b"newer"))
    latest = secrets.access_secret_version(name=f"projects/{P}/secrets/ls-key/versions/latest")
    assert latest.payload.data == b"newer" and latest.name.endswith("/versions/2")
    assert latest.payload.data_crc32c == google_crc32c.value(b"newer")
    assert secrets.access_secret_version(name=v1.name).payload.data == data
    assert [v.name[-1] for v in secrets.list_secret_versions(parent=created.name)] == ["2", "1"]
    assert [s.name for s in secrets.list_secrets(parent=f"projects/{P}")] == [created.name]
    # the payload never appears in the request log's parsed bodies as plain text
    bodies = json.dumps([e.body for e in gcp_fakes.log.filter(api="secretmanager")])
    assert "s3cret-token" not in bodies
    secrets.delete_secret(name=created.name)
    with pytest.raises(exceptions.NotFound):
        secrets.get_secret(name=created.name)


# ------------------------------------------------------------------------------------------------
# Request log


def test_request_log_records_what_was_sent(gcp_fakes, gcp_clients):
    create(gcp_clients, "svc", service(env={"MODEL_STATE_URI": "gs://state/svc"}))
    gcp_clients.services.get_service(name=f"{PARENT}/services/svc")
    mutating = gcp_fakes.log.mutating()
    assert [(e.api, e.method, e.http_method) for e in mutating] == [("run", "CreateService", "POST")]
    entry = mutating[0]
    assert entry.query == {"serviceId": "svc"} and entry.status == 200
    assert entry.body["template"]["containers"][0]["env"] == [{"name": "MODEL_STATE_URI", "value": "gs://state/svc"}]
    assert entry.request.service.template.containers[0].env[0].value == "gs://state/svc"
    assert gcp_fakes.log.count(api="run", method="GetOperation") >= 2  # polled, not done at once
    assert gcp_fakes.log.methods()[0] == "run.CreateService"


# ------------------------------------------------------------------------------------------------
# The runner: a deployed service runs as a local process


ECHO_DOCKERFILE = """FROM python:3.12-slim
ENV GREETING=hello \\
    DATA_DIR=/data/out
WORKDIR /srv
COPY . /srv
CMD ["python", "/srv/app.py"]
"""
ECHO_APP = """import json, os
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        names = ["HOST", "PORT", "K_SERVICE", "K_REVISION", "GREETING", "DATA_DIR", "LS_KEY", "VERSION"]
        body = json.dumps({"cwd": os.getcwd(), "env": {n: os.environ.get(n) for n in names},
                           "data_dir_exists": os.path.isdir(os.environ["DATA_DIR"])}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

HTTPServer((os.environ["HOST"], int(os.environ["PORT"])), Handler).serve_forever()
"""


def grant_accessor(clients, cloud, secret="ls-key"):
    """roles/secretmanager.secretAccessor on the secret for the default runtime service account."""
    name = f"projects/{P}/secrets/{secret}"
    policy = clients.secrets.get_iam_policy(request={"resource": name})
    policy.bindings.add(role="roles/secretmanager.secretAccessor",
                        members=[f"serviceAccount:{cloud.project_number(P)}-compute@developer.gserviceaccount.com"])
    clients.secrets.set_iam_policy(request={"resource": name, "policy": policy})


def build_image(cloud, clients, files, tag):
    """Upload a bundle and build it: the pinned image reference."""
    cloud.storage.put("src", f"{tag}.tgz", tarball(files))
    build = clients.builds.create_build(project_id=P, build=docker_build("src", f"{tag}.tgz", [f"{IMAGE}:{tag}"])) \
        .result(polling=FAST_POLLING)
    return f"{IMAGE}@{build.results.images[0].digest}"


def runner_service(image, version, probe_path=None):
    secret = run_v2.EnvVar(name="LS_KEY", value_source=run_v2.EnvVarSource(
        secret_key_ref=run_v2.SecretKeySelector(secret="ls-key", version="latest")))
    container = run_v2.Container(image=image, env=[run_v2.EnvVar(name="VERSION", value=version), secret])
    if probe_path:
        container.startup_probe = run_v2.Probe(http_get=run_v2.HTTPGetAction(path=probe_path), period_seconds=1,
                                               timeout_seconds=0, failure_threshold=60)
    return run_v2.Service(template=run_v2.RevisionTemplate(containers=[container]))


def test_runner_runs_the_image_source_and_follows_traffic(make_gcp_fakes):
    cloud = make_gcp_fakes(runner=True)
    clients = make_clients(cloud.url)
    make_repo(clients)
    clients.secrets.create_secret(parent=f"projects/{P}", secret_id="ls-key", secret=secretmanager_v1.Secret(
        replication=secretmanager_v1.Replication(automatic=secretmanager_v1.Replication.Automatic())))
    clients.secrets.add_secret_version(parent=f"projects/{P}/secrets/ls-key",
                                       payload=secretmanager_v1.SecretPayload(data=b"token-123"))
    grant_accessor(clients, cloud)
    image = build_image(cloud, clients, {"Dockerfile": ECHO_DOCKERFILE, "app.py": ECHO_APP}, "v1")

    first = clients.services.create_service(parent=PARENT, service=runner_service(image, "1"), service_id="echo") \
        .result(polling=FAST_POLLING)
    assert first.uri.startswith("http://127.0.0.1:")
    refused = requests.get(first.uri, timeout=10)  # private until an allUsers invoker binding exists
    assert refused.status_code == 403 and "Error: Forbidden" in refused.text
    policy = clients.services.get_iam_policy(request={"resource": first.name})
    policy.bindings.add(role="roles/run.invoker", members=["allUsers"])
    clients.services.set_iam_policy(request={"resource": first.name, "policy": policy})
    seen = requests.get(first.uri, timeout=10).json()
    revision1 = first.latest_ready_revision.rsplit("/", 1)[-1]
    assert seen["env"]["HOST"] == "127.0.0.1" and seen["env"]["PORT"] != "8080"
    assert seen["env"]["K_SERVICE"] == "echo" and seen["env"]["K_REVISION"] == revision1
    assert seen["env"]["GREETING"] == "hello" and seen["env"]["VERSION"] == "1"
    assert seen["env"]["LS_KEY"] == "token-123"  # a secret reference, resolved like Cloud Run does
    assert seen["cwd"].endswith("/srv") and seen["cwd"] != "/srv"  # container paths live in a private root
    assert seen["env"]["DATA_DIR"].endswith("/data/out") and seen["data_dir_exists"]
    # the secret is in no request body as a plain value
    assert "token-123" not in json.dumps([e.body for e in cloud.log.filter(api="run")])

    # a new revision takes the traffic at the same URL; the old process is stopped
    second = clients.services.update_service(service=run_v2.Service(
        name=f"{PARENT}/services/echo", template=runner_service(image, "2").template)).result(polling=FAST_POLLING)
    assert second.uri == first.uri
    assert requests.get(second.uri, timeout=10).json()["env"]["VERSION"] == "2"
    old = cloud.run.process(revision1)
    assert old.proc.wait(30) is not None

    # a revision whose container exits never gets traffic: the URL keeps answering from revision 2
    broken = build_image(cloud, clients, {"Dockerfile": ECHO_DOCKERFILE, "app.py": (
        "import sys\nprint('error: no GREETING_FILE', file=sys.stderr)\nraise SystemExit(3)\n")}, "v3")
    with pytest.raises(exceptions.GoogleAPICallError, match="The user-provided container failed to start") as info:
        clients.services.update_service(service=run_v2.Service(
            name=f"{PARENT}/services/echo", template=runner_service(broken, "3").template)).result(
            polling=FAST_POLLING)
    assert "GREETING_FILE" not in str(info.value)  # what it printed is in its log only, as on Cloud Run
    failed = clients.services.get_service(name=f"{PARENT}/services/echo").latest_created_revision.rsplit("/", 1)[-1]
    logs = LoggingRest(AuthorizedSession(AnonymousCredentials()), cloud.url)
    entries = logs.list_entries([f"projects/{P}"], f'resource.type="cloud_run_revision" AND '
                                f'resource.labels.revision_name="{failed}"')
    assert [e["textPayload"] for e in entries][:1] == ["error: no GREETING_FILE"]
    assert entries[0]["resource"]["labels"]["service_name"] == "echo"
    assert requests.get(second.uri, timeout=10).json()["env"]["VERSION"] == "2"
    live = clients.services.get_service(name=f"{PARENT}/services/echo")
    assert live.latest_ready_revision == second.latest_ready_revision

    # traffic back to revision 1, whose process was scaled to zero: the next request cold-starts it
    pinned = run_v2.TrafficTarget(type_=run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION,
                                  revision=revision1, percent=100)
    clients.services.update_service(request=run_v2.UpdateServiceRequest(
        service=run_v2.Service(name=f"{PARENT}/services/echo", traffic=[pinned]),
        update_mask=field_mask_pb2.FieldMask(paths=["traffic"]))).result(polling=FAST_POLLING)
    assert requests.get(first.uri, timeout=60).json()["env"]["VERSION"] == "1"
    serving = cloud.run.process(revision1)
    assert serving.proc.poll() is None
    cloud.stop()  # what the fixture does: every process is stopped
    assert serving.proc.poll() is not None


def test_runner_serves_a_blueprint_backend(make_gcp_fakes, tmp_path):
    from lsdeploy.blueprints import create as create_backend

    directory = tmp_path / "backend"
    create_backend(directory)
    files = {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    cloud = make_gcp_fakes(runner=True)
    clients = make_clients(cloud.url)
    make_repo(clients)
    image = build_image(cloud, clients, files, "bp")
    container = run_v2.Container(image=image, startup_probe=run_v2.Probe(
        http_get=run_v2.HTTPGetAction(path="/health"), period_seconds=2, timeout_seconds=1, failure_threshold=60))
    svc = run_v2.Service(template=run_v2.RevisionTemplate(containers=[container]), invoker_iam_disabled=True)
    live = clients.services.create_service(parent=PARENT, service=svc, service_id="backend") \
        .result(polling=FAST_POLLING)
    process = cloud.run.process(live.latest_ready_revision.rsplit("/", 1)[-1])
    assert process.argv[0].endswith("label-studio-ml") and process.argv[1:] == ["start", f"{process.root}/app"]
    health = requests.get(live.uri + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "UP"


@pytest.mark.gcs
def test_build_reads_the_source_from_the_storage_emulator(make_gcp_fakes, tmp_path):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from gcs_emulator import GCSEmulator

    with GCSEmulator(tmp_path / "gcs") as emulator:
        cloud = make_gcp_fakes(storage_url=emulator.url)
        # the deploy's clients get the bucket-IAM front, which forwards to the emulator
        assert cloud.env["STORAGE_EMULATOR_HOST"] == cloud.storage_front.url != emulator.url
        clients = make_clients(cloud.url)
        make_repo(clients)
        for bucket in ("run-sources", "build-logs"):
            emulator.create_bucket(bucket)
        gcs = storage.Client(project=P, credentials=AnonymousCredentials(),
                             client_options={"api_endpoint": emulator.url})
        blob = gcs.bucket("run-sources").blob("svc/bundle.tgz")
        blob.upload_from_string(tarball({"Dockerfile": DOCKERFILE, "model.py": "x = 1\n"}), if_generation_match=0)
        blob.reload()
        build_message = docker_build("run-sources", "svc/bundle.tgz", [f"{IMAGE}:e1"], logs_bucket="gs://build-logs")
        build_message.source.storage_source.generation = blob.generation
        operation = clients.builds.create_build(project_id=P, build=build_message)
        build = operation.result(polling=FAST_POLLING)
        assert build.status == cloudbuild_v1.Build.Status.SUCCESS
        log = emulator.read_object("build-logs", f"log-{build.id}.txt").decode()
        assert f"Fetching storage object: gs://run-sources/svc/bundle.tgz#{blob.generation}" in log
        assert log.rstrip().endswith("DONE")
        # the same files give the same digest as with the in-memory store
        memory = make_gcp_fakes()
        memory_clients = make_clients(memory.url)
        make_repo(memory_clients)
        assert build_image(memory, memory_clients, {"Dockerfile": DOCKERFILE, "model.py": "x = 1\n"}, "m") \
            == f"{IMAGE}@{build.results.images[0].digest}"
        with pytest.raises(exceptions.BadRequest, match="No such object: run-sources/missing.tgz"):
            clients.builds.create_build(project_id=P, build=docker_build("run-sources", "missing.tgz", [f"{IMAGE}:x"]))


def test_traffic_back_to_a_revision_and_to_a_missing_one(gcp_fakes, gcp_clients):
    first = create(gcp_clients, "svc", service(env={"V": "1"}))
    gcp_clients.services.update_service(service=run_v2.Service(
        name=f"{PARENT}/services/svc", template=service(env={"V": "2"}).template)).result(polling=FAST_POLLING)
    revision1 = first.latest_ready_revision.rsplit("/", 1)[-1]
    count = len(gcp_fakes.run.revisions)
    pinned = run_v2.TrafficTarget(type_=run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION,
                                  revision=revision1, percent=100)
    rolled = gcp_clients.services.update_service(request=run_v2.UpdateServiceRequest(
        service=run_v2.Service(name=f"{PARENT}/services/svc", traffic=[pinned]),
        update_mask=field_mask_pb2.FieldMask(paths=["traffic"]))).result(polling=FAST_POLLING)
    assert [(s.revision, s.percent) for s in rolled.traffic_statuses] == [(revision1, 100)]
    assert len(gcp_fakes.run.revisions) == count  # traffic only: no new revision
    pinned.revision = "svc-00042-zzz"
    operation = gcp_clients.services.update_service(request=run_v2.UpdateServiceRequest(
        service=run_v2.Service(name=f"{PARENT}/services/svc", traffic=[pinned]),
        update_mask=field_mask_pb2.FieldMask(paths=["traffic"])))
    with pytest.raises(exceptions.InternalServerError, match="'svc-00042-zzz' does not exist or is deleted"):
        operation.result(polling=FAST_POLLING)


def test_create_through_update_validates_the_name(gcp_fakes, gcp_clients):
    with pytest.raises(exceptions.BadRequest, match="service_id 'Bad_Name' is invalid") as caught:
        gcp_clients.services.update_service(request=run_v2.UpdateServiceRequest(
            service=run_v2.Service(name=f"{PARENT}/services/Bad_Name", template=service().template),
            allow_missing=True))
    assert caught.value.details[0]["fieldViolations"][0]["field"] == "service.name"
    with pytest.raises(exceptions.BadRequest, match="prefixed by the name of the enclosing Service"):
        gcp_clients.services.create_service(parent=PARENT, service_id="svc", service=service(revision="other-1"))
    assert gcp_fakes.run.services == {}


def test_runner_runs_a_shell_form_cmd_of_a_users_own_dockerfile(make_gcp_fakes):
    """A backend that brings its own Dockerfile (the reference SDK's style: gunicorn --bind :$PORT)."""
    dockerfile = ("FROM python:3.12-slim\nENV WORKERS=1 THREADS=2\nWORKDIR /app\nCOPY . ./\n"
                  "CMD exec gunicorn --preload --bind :$PORT --workers $WORKERS --threads $THREADS app:app\n")
    app = ("import os\n\ndef app(environ, start_response):\n"
           "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
           "    return [os.environ['K_REVISION'].encode()]\n")
    cloud = make_gcp_fakes(runner=True, enforce_invoker=False)
    clients = make_clients(cloud.url)
    make_repo(clients)
    image = build_image(cloud, clients, {"Dockerfile": dockerfile, "app.py": app}, "own")
    live = create(clients, "own", service(image=image))
    revision = live.latest_ready_revision.rsplit("/", 1)[-1]
    process = cloud.run.process(revision)
    assert process.argv[:2] == ["/bin/sh", "-c"] and "--bind 127.0.0.1:$PORT" in process.argv[2]
    assert requests.get(live.uri + "/", timeout=30).text == revision


# ---- Cloud Logging: entries.list by Google's rules ----------------------------------------------------

def test_logging_entries_list_refuses_what_google_refuses(gcp_fakes):
    session = AuthorizedSession(AnonymousCredentials())

    def post(body):
        return session.post(f"{gcp_fakes.url}/v2/entries:list", json=body, timeout=10)

    good = {"resourceNames": [f"projects/{P}"], "filter": 'resource.type="cloud_run_revision"'}
    assert post(good).status_code == 200 and post(good).json() == {}  # no revision, no entry
    refused = {
        "no resourceNames": {"filter": ""},
        "pageSize over 1000": {**good, "pageSize": 1001},
        "negative pageSize": {**good, "pageSize": -1},
        "orderBy": {**good, "orderBy": "severity desc"},
        "filter syntax": {**good, "filter": "resource.type = cloud_run_revision OR"},
        "a long filter": {**good, "filter": 'textPayload:"' + "x" * 20001 + '"'},
        "an unknown field": {**good, "limit": 5},
        "101 resources": {**good, "resourceNames": [f"projects/p{i}" for i in range(101)]},
    }
    for what, body in refused.items():
        answer = post(body)
        assert answer.status_code == 400, what
        assert answer.json()["error"]["status"] == "INVALID_ARGUMENT", what
    gcp_fakes.deny("logging", "ListLogEntries")
    denied = post(good)
    assert denied.status_code == 403 and "logging.logEntries.list" in denied.text
    logs = LoggingRest(session, gcp_fakes.url)
    with pytest.raises(exceptions.Forbidden):
        logs.list_entries([f"projects/{P}"], "")
