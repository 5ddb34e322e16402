"""`deploy gcp --training job` against the Google API fakes and a real fake-gcs-server: the Cloud
Run job `<service>-train` (plan, create, unchanged redeploy, update, rules, permissions, status,
rollback, destroy, back to --training service), and the jobs fake itself (RunJob with overrides and
who may send it, executions that really run their tasks, retries, the task timeout).
"""
from __future__ import annotations

import textwrap

import pytest
from google.api_core import exceptions as gexc
from google.cloud import run_v2

from fakes.fixtures import FAST_POLLING
from gcp_support import PROJECT, REGION, backend, change, deploy, provider_for, settings_for  # noqa: F401

from lsdeploy.bundle import SourceBundle
from lsdeploy.errors import EXIT_AUTH, EXIT_USAGE, LsdeployError
from lsdeploy.providers.gcp import GcpClients

ACCOUNT = f"trainer@{PROJECT}.iam.gserviceaccount.com"


@pytest.fixture
def api_cloud(make_gcp_fakes, gcs_emulator):
    return make_gcp_fakes(storage_url=gcs_emulator.url)


@pytest.fixture
def run_cloud(make_gcp_fakes, gcs_emulator):
    return make_gcp_fakes(runner=True, storage_url=gcs_emulator.url)


def job_settings(service, **kwargs):
    kwargs.setdefault("training", "job")
    kwargs.setdefault("basic_auth", False)
    return settings_for(service, **kwargs)


def clients(cloud):
    return GcpClients.from_env(cloud.env, PROJECT)


def env_of(container) -> dict:
    return {e.name: (e.value if not e.value_source.secret_key_ref.secret else
                     f"secret:{e.value_source.secret_key_ref.secret}:{e.value_source.secret_key_ref.version}")
            for e in container.env}


# ---- deploy: create, unchanged, update, plan --------------------------------------------------------

def test_deploy_creates_the_job_from_the_service_image_and_grants_the_service_the_right_to_run_it(api_cloud, backend):
    settings = job_settings("tj", training_cpu="4", training_memory="8Gi", training_timeout=7200,
                            training_max_retries=5, env={"LABELS": "a,b"}, secret_env={})
    result = deploy(api_cloud, backend, settings)
    assert result.training_job == f"projects/{PROJECT}/locations/{REGION}/jobs/tj-train"
    assert result.training_job_action == "created"
    job = clients(api_cloud).jobs.get_job(name=result.training_job)
    service = clients(api_cloud).services.get_service(name=settings.service_name)
    task = job.template.template
    container = task.containers[0]
    assert container.image == result.image == service.template.containers[0].image  # the same digest
    assert list(container.command) == ["label-studio-ml"] and list(container.args) == ["train", "/app"]
    assert dict(container.resources.limits) == {"cpu": "4", "memory": "8Gi"}
    assert task.timeout.total_seconds() == 7200 and task.max_retries == 5
    assert job.template.task_count == 1
    env = env_of(container)
    assert env["MODEL_STATE_URI"] == "gs://state-tj/tj" and env["LABELS"] == "a,b"
    assert env["LSDEPLOY_TRAINING"] == "job" and "LSDEPLOY_TRAINING_JOB" not in env
    served = env_of(service.template.containers[0])
    assert served["LSDEPLOY_TRAINING"] == "job" and served["LSDEPLOY_TRAINING_JOB"] == result.training_job
    # the service's identity (the compute default account here) may run it with overrides and read executions
    policy = clients(api_cloud).jobs.get_iam_policy(request={"resource": result.training_job})
    member = f"serviceAccount:{api_cloud.project_number(PROJECT)}-compute@developer.gserviceaccount.com"
    roles = {b.role for b in policy.bindings if member in b.members}
    assert roles == {"roles/run.jobsExecutorWithOverrides", "roles/run.viewer"}


def test_secrets_and_account_are_the_services_and_never_plain(api_cloud, backend):
    settings = job_settings("tjs", basic_auth=True, service_account=ACCOUNT)
    deploy(api_cloud, backend, settings)
    job = clients(api_cloud).jobs.get_job(name=settings.job_name)
    task = job.template.template
    assert task.service_account == ACCOUNT
    env = env_of(task.containers[0])
    assert env["BASIC_AUTH_PASS"].startswith("secret:") and env["BASIC_AUTH_PASS"].split(":")[-1].isdigit()
    password = clients(api_cloud).secrets.access_secret_version(
        name=f"projects/{PROJECT}/secrets/tjs-basic-auth-pass/versions/latest").payload.data.decode()
    assert password not in str(job)
    policy = clients(api_cloud).jobs.get_iam_policy(request={"resource": settings.job_name})
    assert any(b.role == "roles/run.jobsExecutorWithOverrides" and f"serviceAccount:{ACCOUNT}" in b.members
               for b in policy.bindings)


def test_unchanged_redeploy_makes_no_write_and_a_change_updates_the_job(api_cloud, backend):
    settings = job_settings("tju")
    deploy(api_cloud, backend, settings)
    api_cloud.log.clear()
    again = deploy(api_cloud, backend, settings)
    assert again.training_job_action == "unchanged"
    assert api_cloud.log.mutating() == [], api_cloud.log.methods()
    assert api_cloud.log.count(api="run", method="GetJob") == 1

    generation = clients(api_cloud).jobs.get_job(name=settings.job_name).generation
    api_cloud.log.clear()
    bigger = job_settings("tju", training_memory="8Gi", training_cpu="4")
    result = deploy(api_cloud, backend, bigger)
    assert result.training_job_action == "updated" and not result.new_revision  # the service is unchanged
    assert api_cloud.log.count(api="run", method="UpdateJob") == 1
    assert api_cloud.log.count(api="run", method="UpdateService") == 0
    job = clients(api_cloud).jobs.get_job(name=settings.job_name)
    assert job.generation == generation + 1 and job.template.template.containers[0].resources.limits["memory"] == "8Gi"

    # a code change: a new image for both, the job updated in the same deploy
    change(backend, "v2")
    api_cloud.log.clear()
    result = deploy(api_cloud, backend, bigger)
    assert result.built and result.new_revision and result.training_job_action == "updated"
    assert clients(api_cloud).jobs.get_job(name=settings.job_name).template.template.containers[0].image == result.image


def test_dry_run_shows_the_jobs_diff_and_writes_nothing(api_cloud, backend):
    provider = provider_for(api_cloud)
    settings = job_settings("tjp")
    plan = provider.plan(settings, SourceBundle.from_directory(backend))
    fields = {c["field"]: c for c in plan.changes}
    assert fields["job.command"]["desired"] == "label-studio-ml train /app" and fields["job.command"]["live"] is None
    assert fields["job.cpu"]["desired"] == "2" and fields["job.timeout"]["desired"] == "3600s"
    assert api_cloud.log.mutating() == []
    deploy(api_cloud, backend, settings)
    api_cloud.log.clear()
    plan = provider.plan(job_settings("tjp"), SourceBundle.from_directory(backend))
    assert plan.action == "none" and not [c for c in plan.changes if c["field"].startswith("job")]
    plan = provider.plan(job_settings("tjp", training_max_retries=0, training_timeout=60),
                         SourceBundle.from_directory(backend))
    assert plan.action == "update"
    changes = {c["field"]: (c["live"], c["desired"]) for c in plan.changes}
    assert changes == {"job.timeout": ("3600s", "60s"), "job.max_retries": (3, 0)}
    assert api_cloud.log.mutating() == []
    assert any("job.max_retries: 3 -> 0" in line for line in plan.lines())


def test_back_to_training_service_deletes_the_job_and_the_services_variables(api_cloud, backend):
    settings = job_settings("tjb")
    deploy(api_cloud, backend, settings)
    plan = provider_for(api_cloud).plan(job_settings("tjb", training="service"), SourceBundle.from_directory(backend))
    assert {"field": "job", "live": settings.job_name, "desired": "(deleted: --training service)"} in plan.changes
    result = deploy(api_cloud, backend, job_settings("tjb", training="service"))
    assert result.training_job_action == "deleted"
    with pytest.raises(gexc.NotFound):
        clients(api_cloud).jobs.get_job(name=settings.job_name)
    served = env_of(clients(api_cloud).services.get_service(name=settings.service_name).template.containers[0])
    assert "LSDEPLOY_TRAINING" not in served and "LSDEPLOY_TRAINING_JOB" not in served
    # a service that never had a job: no job request at all
    api_cloud.log.clear()
    deploy(api_cloud, backend, job_settings("tjb", training="service"))
    assert api_cloud.log.count(api="run", method="GetJob") == 0 and api_cloud.log.mutating() == []


# ---- rules and permissions ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"training_timeout": 168 * 3600 + 1}, "--training-timeout 604801: a Cloud Run job task runs for 1 s to 168 hours"),
    ({"training_gpu": 1, "training_cpu": "4", "training_memory": "16Gi", "training_timeout": 7200},
     "1 hours with a GPU"),
    ({"training_gpu": 1, "training_cpu": "2", "training_memory": "16Gi"}, "--training-cpu 4"),
    ({"training_gpu": 1, "training_cpu": "4", "training_memory": "16Gi", "region": "us-east4"},
     "Cloud Run jobs have GPUs only in"),
    ({"training_gpu": 2}, "exactly one GPU"),
    ({"training_max_retries": 11}, "0 to 10 times"),
    ({"training_cpu": "1", "training_memory": "8Gi"}, "memory above 4Gi needs at least 2 CPUs"),
    ({"training": "batch"}, "--training 'batch'"),
    ({"env": {"CLOUD_RUN_TASK_INDEX": "1"}}, "CLOUD_RUN_TASK_INDEX is set by lsdeploy or Cloud Run"),
])
def test_job_rules_are_refused_before_any_request_in_one_line(api_cloud, backend, kwargs, message):
    region = kwargs.pop("region", REGION)
    settings = job_settings("tjr", **kwargs)
    settings.region = region
    with pytest.raises(LsdeployError) as info:
        deploy(api_cloud, backend, settings)
    assert info.value.exit_code == EXIT_USAGE and message in str(info.value) and "\n" not in str(info.value)
    assert len(api_cloud.log) == 0


def test_the_fake_refuses_what_cloud_run_refuses_for_jobs(api_cloud):
    jobs = clients(api_cloud).jobs

    def job(**limits):
        gpu = limits.pop("gpu", None)
        task = run_v2.TaskTemplate(containers=[run_v2.Container(image="busybox", resources=run_v2.ResourceRequirements(
            limits={"cpu": "4", "memory": "16Gi", **limits}))], max_retries=3, timeout={"seconds": 600})
        if gpu:
            task.node_selector = run_v2.NodeSelector(accelerator="nvidia-l4")
            task.gpu_zonal_redundancy_disabled = gpu == "nonzonal"
            task.containers[0].resources.limits["nvidia.com/gpu"] = "1"
        return run_v2.Job(template=run_v2.ExecutionTemplate(template=task))

    parent = f"projects/{PROJECT}/locations/{REGION}"
    cases = [
        (job(gpu="zonal"), "gpu_zonal_redundancy_disabled"),
        (job(gpu="nonzonal", cpu="2", memory="8Gi"), "A GPU requires at least 4 CPU."),
        (run_v2.Job(template=run_v2.ExecutionTemplate(template=run_v2.TaskTemplate(
            containers=[run_v2.Container(image="busybox")], max_retries=11))), "max_retries must be between 0 and 10"),
        (run_v2.Job(template=run_v2.ExecutionTemplate(template=run_v2.TaskTemplate(
            containers=[run_v2.Container(image="busybox")], timeout={"seconds": 168 * 3600 + 1}))),
         "timeout must be at most 604800s"),
    ]
    for message, expected in cases:
        with pytest.raises(gexc.BadRequest) as info:
            jobs.create_job(parent=parent, job=message, job_id="bad")
        assert expected in info.value.message, info.value.message
    gpu_job = job(gpu="nonzonal")
    gpu_job.template.template.timeout = {"seconds": 7200}
    with pytest.raises(gexc.BadRequest, match="at most 3600s"):
        jobs.create_job(parent=parent, job=gpu_job, job_id="gpu")
    with pytest.raises(gexc.BadRequest, match="GPU is not supported for jobs in region us-east4"):
        jobs.create_job(parent=f"projects/{PROJECT}/locations/us-east4", job=job(gpu="nonzonal"), job_id="gpu")
    jobs.create_job(parent=parent, job=job(gpu="nonzonal"), job_id="gpu").result(polling=FAST_POLLING)


def test_permission_denied_names_the_role(api_cloud, backend):
    deploy(api_cloud, backend, settings_for("tjd", basic_auth=False))  # the service exists; the job does not
    api_cloud.deny("run", "CreateJob")
    with pytest.raises(LsdeployError) as info:
        deploy(api_cloud, backend, job_settings("tjd"))
    text = str(info.value)
    assert info.value.exit_code == EXIT_AUTH and "run.jobs.create" in text and "roles/run.admin" in text
    assert "\n" not in text
    assert api_cloud.log.count(api="run", method="UpdateService") == 0  # nothing of the service changed


def test_preflight_checks_the_job_permissions_before_any_write(api_cloud, backend):
    held = {p for p in __import__("lsdeploy.providers.gcp.preflight", fromlist=["x"]).PERMISSION_ROLES}
    api_cloud.restrict_deployer(held | {"iam.serviceAccounts.actAs", "iam.serviceAccounts.get",
                                        "iam.serviceAccounts.create", "run.jobs.get"})
    with pytest.raises(LsdeployError) as info:
        deploy(api_cloud, backend, job_settings("tjq"))
    text = str(info.value)
    assert info.value.exit_code == EXIT_AUTH and "roles/run.admin" in text
    for permission in ("run.jobs.create", "run.jobs.update", "run.jobs.setIamPolicy"):
        assert permission in text
    assert api_cloud.log.mutating() == []


# ---- status, rollback, destroy ----------------------------------------------------------------

TRAIN_SCRIPT = textwrap.dedent("""\
    import os, sys, time
    marker = os.path.join(os.environ["MARKER_DIR"], os.environ["CLOUD_RUN_EXECUTION"] + "-" +
                          os.environ["CLOUD_RUN_TASK_ATTEMPT"])
    with open(marker, "w") as f:
        f.write(" ".join([os.environ["CLOUD_RUN_JOB"], os.environ["CLOUD_RUN_TASK_INDEX"],
                          os.environ["CLOUD_RUN_TASK_COUNT"], os.environ.get("PORT", "-"), " ".join(sys.argv[1:]),
                          os.environ["LSDEPLOY_TRAINING"], os.environ["CLOUDSDK_API_ENDPOINT_OVERRIDES_RUN"]]))
    mode = os.environ.get("TASK_MODE", "ok")
    if mode == "fail-first" and os.environ["CLOUD_RUN_TASK_ATTEMPT"] == "0":
        sys.exit(3)
    if mode == "wait":
        while not os.path.exists(os.path.join(os.environ["MARKER_DIR"], "go")):
            time.sleep(0.05)
    if mode == "hang":
        time.sleep(600)
    if mode == "fail":
        print("loading project " + sys.argv[-1], flush=True)
        print("error: project " + sys.argv[-1] + " has no annotations to train on", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
    """)


def run_job(cloud, settings, project="7", account=None):
    """RunJob as the runtime does (overrides naming the project), through the caller front of `account`."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials

    endpoint = cloud.jobs.caller_url(account) if account else cloud.url
    jobs = run_v2.JobsClient(credentials=AnonymousCredentials(), transport="rest",
                             client_options=ClientOptions(api_endpoint=endpoint))
    return jobs.run_job(request=run_v2.RunJobRequest(name=settings.job_name, overrides=run_v2.RunJobRequest.Overrides(
        container_overrides=[run_v2.RunJobRequest.Overrides.ContainerOverride(
            args=["train", "/app", "--project", project])], task_count=1)))


@pytest.fixture
def scripted(run_cloud, backend, tmp_path):
    """A deployed backend whose training command is a script (the job runs `python train.py ...`)."""
    (backend / "train.py").write_text(TRAIN_SCRIPT)
    markers = tmp_path / "markers"
    markers.mkdir()
    run_cloud.jobs.task_env["MARKER_DIR"] = str(markers)
    return backend, markers


def scripted_job(cloud, settings, mode):
    """The deployed job, made to run train.py (its command, not label-studio-ml) in `mode`."""
    jobs = clients(cloud).jobs
    job = jobs.get_job(name=settings.job_name)
    container = job.template.template.containers[0]
    container.command = ["python", "/app/train.py"]
    kept = [e for e in container.env if e.name != "TASK_MODE"]
    del container.env[:]
    container.env.extend(kept + [run_v2.EnvVar(name="TASK_MODE", value=mode)])
    jobs.update_job(job=job).result(polling=FAST_POLLING)


def test_an_execution_runs_the_task_with_cloud_runs_job_env_and_status_shows_it(run_cloud, scripted):
    backend, markers = scripted
    settings = job_settings("tje")
    deploy(run_cloud, backend, settings)
    scripted_job(run_cloud, settings, "fail-first")
    member = f"{run_cloud.project_number(PROJECT)}-compute@developer.gserviceaccount.com"
    operation = run_job(run_cloud, settings, "7", account=member)
    execution = operation.metadata.name.rsplit("/", 1)[-1]  # known at once, before the execution is done
    done = operation.result(polling=FAST_POLLING)
    assert done.succeeded_count == 1 and done.retried_count == 1 and done.failed_count == 0
    assert [c.type_ for c in done.conditions][-1] == "Completed"
    first = (markers / f"{execution}-0").read_text().split(" ")
    assert first[:4] == ["tje-train", "0", "1", "-"]  # no PORT for a job task
    assert first[4] == "train" and first[5].endswith("/app") and first[6:8] == ["--project", "7"]  # the overrides
    assert first[8] == "job"
    assert first[9] == run_cloud.jobs.caller_url(member) + "/"  # its requests are its account's
    assert (markers / f"{execution}-1").exists()  # the retry: CLOUD_RUN_TASK_ATTEMPT=1
    status = provider_for(run_cloud).status(settings)
    assert status.training_job == settings.job_name
    assert status.executions[0]["execution"] == execution and status.executions[0]["state"] == "succeeded"
    assert status.executions[0]["retried"] == 1 and "logs/viewer" in status.executions[0]["log_uri"]
    assert any(line.startswith(f"  execution {execution}: succeeded") for line in status.lines())


def test_runwithoverrides_needs_the_role_on_the_job(run_cloud, scripted):
    backend, _ = scripted
    settings = job_settings("tjo", service_account=ACCOUNT)
    deploy(run_cloud, backend, settings)
    stranger = f"other@{PROJECT}.iam.gserviceaccount.com"
    with pytest.raises(gexc.Forbidden) as info:
        run_job(run_cloud, settings, account=stranger)
    assert info.value.reason == "IAM_PERMISSION_DENIED" and "run.jobs.run" in info.value.message
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials

    as_stranger = run_v2.JobsClient(credentials=AnonymousCredentials(), transport="rest", client_options=ClientOptions(
        api_endpoint=run_cloud.jobs.caller_url(stranger)))
    with pytest.raises(gexc.Forbidden, match="run.jobs.get"):
        as_stranger.get_job(name=settings.job_name)
    with pytest.raises(gexc.Forbidden, match="run.jobs.getIamPolicy"):
        as_stranger.get_iam_policy(request={"resource": settings.job_name})
    # the job executor role without overrides is not enough for the runtime's request
    jobs = clients(run_cloud).jobs
    policy = jobs.get_iam_policy(request={"resource": settings.job_name})
    policy.bindings.add(role="roles/run.jobsExecutor", members=[f"serviceAccount:{stranger}"])
    jobs.set_iam_policy(request={"resource": settings.job_name, "policy": policy})
    with pytest.raises(gexc.Forbidden) as info:
        run_job(run_cloud, settings, account=stranger)
    assert info.value.metadata["permission"] == "run.jobs.runWithOverrides"
    scripted_job(run_cloud, settings, "ok")
    assert run_job(run_cloud, settings, account=ACCOUNT).result(polling=FAST_POLLING).succeeded_count == 1


def test_a_killed_task_is_retried_and_a_hung_one_times_out(run_cloud, scripted):
    backend, markers = scripted
    settings = job_settings("tjk", training_max_retries=1)
    deploy(run_cloud, backend, settings)
    scripted_job(run_cloud, settings, "wait")
    operation = run_job(run_cloud, settings)
    execution = operation.metadata.name.rsplit("/", 1)[-1]
    run_cloud.jobs.wait_attempt(execution, 0)
    assert run_cloud.jobs.kill_task(execution) == 0
    run_cloud.jobs.wait_attempt(execution, 1)
    (markers / "go").write_text("")
    done = operation.result(polling=FAST_POLLING)
    assert done.succeeded_count == 1 and done.retried_count == 1
    assert [a[2] for a in run_cloud.jobs.execution(execution).attempts] == [-9, 0]

    scripted_job(run_cloud, settings, "hang")
    job = clients(run_cloud).jobs.get_job(name=settings.job_name)
    job.template.template.timeout = {"seconds": 1}
    job.template.template.max_retries = 0
    clients(run_cloud).jobs.update_job(job=job).result(polling=FAST_POLLING)
    with pytest.raises(gexc.GoogleAPICallError, match="exceeded the task timeout"):
        run_job(run_cloud, settings).result(polling=FAST_POLLING)
    status = provider_for(run_cloud).status(settings)
    assert status.executions[0]["state"] == "failed" and status.executions[0]["failed"] == 1


def test_rollback_moves_the_job_to_the_serving_image_and_destroy_removes_it(api_cloud, backend):
    settings = job_settings("tjx")
    first = deploy(api_cloud, backend, settings)
    change(backend, "v2")
    second = deploy(api_cloud, backend, settings)
    assert second.image != first.image
    provider = provider_for(api_cloud)
    provider.rollback(settings)
    job = clients(api_cloud).jobs.get_job(name=settings.job_name)
    assert job.template.template.containers[0].image == first.image
    again = deploy(api_cloud, backend, settings)  # the next deploy puts the job back on the deployed code
    assert again.training_job_action == "updated"
    assert clients(api_cloud).jobs.get_job(name=settings.job_name).template.template.containers[0].image == second.image

    plan = provider.destroy_plan(settings)
    assert settings.job_name in plan.deleted
    result = provider.destroy(settings)
    assert settings.job_name in result.deleted
    with pytest.raises(gexc.NotFound):
        clients(api_cloud).jobs.get_job(name=settings.job_name)
    assert provider.destroy(settings).deleted == []  # safe to run again


def test_cli_options_and_their_variables(api_cloud, backend):
    from gcp_support import cli_env
    from support import run_cli

    env = {**cli_env(api_cloud, "tjc"), "LSDEPLOY_TRAINING_MODE": "job", "LSDEPLOY_TRAINING_MEMORY": "8Gi"}
    result = run_cli(*["deploy", "gcp", str(backend), "--service", "tjc", "--no-basic-auth", "--min-instances", "0",
                      "--training-cpu", "4", "--training-max-retries", "2", "--dry-run", "--json"], env=env)
    assert result.returncode == 0, result.stderr
    import json

    changes = {c["field"]: c["desired"] for c in json.loads(result.stdout)["changes"]}
    assert changes["job.cpu"] == "4" and changes["job.memory"] == "8Gi" and changes["job.max_retries"] == 2
    bad = run_cli(*["deploy", "gcp", str(backend), "--service", "tjc", "--training-timeout", "700000"], env=env)
    assert bad.returncode == EXIT_USAGE and "168 hours" in bad.stderr and "Traceback" not in bad.stderr


def test_runjob_overrides_are_checked_by_googles_rules(run_cloud, scripted):
    backend, _ = scripted
    settings = job_settings("tjv")
    deploy(run_cloud, backend, settings)
    jobs = clients(run_cloud).jobs
    Overrides = run_v2.RunJobRequest.Overrides

    def refused(overrides, expected):
        with pytest.raises(gexc.BadRequest) as info:
            jobs.run_job(request=run_v2.RunJobRequest(name=settings.job_name, overrides=overrides))
        assert expected in info.value.message, info.value.message

    refused(Overrides(container_overrides=[Overrides.ContainerOverride(name="sidecar", args=["x"])]),
            "Container 'sidecar' is not defined in the job.")
    refused(Overrides(container_overrides=[Overrides.ContainerOverride(
        env=[run_v2.EnvVar(name="CLOUD_RUN_TASK_INDEX", value="3")])]), "reserved env names")
    refused(Overrides(task_count=10001), "task_count must be between 0 and 10000")
    refused(Overrides(timeout={"seconds": 168 * 3600 + 1}), "timeout must be at most 604800s")
    refused(Overrides(container_overrides=[Overrides.ContainerOverride(args=["a"], clear_args=True)]),
            "clear_args cannot be set together with args")
    assert run_cloud.jobs.executions == {}  # nothing ran

    # the deployer, too, needs run.jobs.runWithOverrides for overrides (run.jobs.run alone runs the job as it is)
    from lsdeploy.providers.gcp.preflight import PERMISSION_ROLES

    run_cloud.restrict_deployer(set(PERMISSION_ROLES) | {"run.jobs.run", "run.jobs.get"})
    with pytest.raises(gexc.Forbidden) as info:
        run_job(run_cloud, settings)
    assert info.value.metadata["permission"] == "run.jobs.runWithOverrides"


def test_destroy_leaves_everything_when_the_job_is_not_lsdeploys(api_cloud, backend):
    settings = job_settings("tjn")
    deploy(api_cloud, backend, settings)
    jobs = clients(api_cloud).jobs
    job = jobs.get_job(name=settings.job_name)
    job.labels.clear()  # someone else's job of the same name
    job.annotations.clear()
    jobs.update_job(job=job).result(polling=FAST_POLLING)
    with pytest.raises(LsdeployError) as info:  # a deploy does not take it over
        deploy(api_cloud, backend, job_settings("tjn", training_cpu="4"))
    assert "a Cloud Run job tjn-train exists" in str(info.value) and "not made by lsdeploy" in str(info.value)
    assert api_cloud.log.count(api="run", method="UpdateJob") == 1  # only the test's own
    with pytest.raises(LsdeployError) as info:
        provider_for(api_cloud).destroy(settings)
    assert info.value.exit_code == EXIT_USAGE and "Cloud Run job tjn-train was not deployed by lsdeploy" in str(info.value)
    assert "gcloud run jobs delete tjn-train" in str(info.value)
    assert clients(api_cloud).services.get_service(name=settings.service_name)  # nothing was deleted
    assert api_cloud.log.count(api="run", method="DeleteService") == 0


def test_an_execution_whose_account_may_not_read_a_secret_fails_like_cloud_run(run_cloud, scripted):
    backend, markers = scripted
    secrets = clients(run_cloud).secrets
    secret = secrets.create_secret(parent=f"projects/{PROJECT}", secret_id="hf-token",
                                   secret={"replication": {"automatic": {}}})
    secrets.add_secret_version(parent=secret.name, payload={"data": b"hf_abc"})
    settings = job_settings("tjw", secret_env={"HF_TOKEN": "hf-token"})
    deploy(run_cloud, backend, settings)  # grants the runtime account secretAccessor on hf-token
    scripted_job(run_cloud, settings, "ok")
    assert run_job(run_cloud, settings).result(polling=FAST_POLLING).succeeded_count == 1
    secrets.set_iam_policy(request={"resource": secret.name, "policy": {}})  # the grant is withdrawn
    operation = run_job(run_cloud, settings)
    with pytest.raises(gexc.FailedPrecondition, match=r"Permission denied on secret: .*hf-token.*for Execution service account .*roles/secretmanager.secretAccessor"):
        operation.result(polling=FAST_POLLING)
    execution = operation.metadata.name.rsplit("/", 1)[-1]
    assert not list(markers.glob(f"{execution}-*"))  # its task never started


def test_a_cancelled_execution_stops_its_task_and_status_says_so(run_cloud, scripted):
    backend, _ = scripted
    settings = job_settings("tjz")
    deploy(run_cloud, backend, settings)
    scripted_job(run_cloud, settings, "wait")  # the task waits for a file that never comes
    operation = run_job(run_cloud, settings)
    execution = operation.metadata.name
    run_cloud.jobs.wait_attempt(execution.rsplit("/", 1)[-1], 0)
    assert provider_for(run_cloud).status(settings).executions[0]["state"] == "running"
    done = clients(run_cloud).executions.cancel_execution(name=execution).result(polling=FAST_POLLING)
    with pytest.raises(gexc.FailedPrecondition, match="cancelled"):  # the run's own operation fails
        operation.result(polling=FAST_POLLING)
    assert done.cancelled_count == 1 and done.succeeded_count == 0 and done.completion_time
    assert provider_for(run_cloud).status(settings).executions[0]["state"] == "cancelled"


def test_a_jobs_iam_policy_needs_the_jobs_permissions_not_the_services(api_cloud, backend):
    # Cloud Run's getIamPolicy / setIamPolicy serve services and jobs alike; the permission is the
    # resource's: a deployer who may set services' policies but not jobs' cannot grant on the job
    settings = job_settings("tji")
    deploy(api_cloud, backend, settings)
    from lsdeploy.providers.gcp.preflight import JOB_PERMISSION_ROLES, PERMISSION_ROLES

    api_cloud.restrict_deployer((set(PERMISSION_ROLES) | set(JOB_PERMISSION_ROLES)) - {"run.jobs.setIamPolicy"}
                                | {"run.services.setIamPolicy", "run.services.getIamPolicy"})
    jobs = clients(api_cloud).jobs
    policy = jobs.get_iam_policy(request={"resource": settings.job_name})  # run.jobs.getIamPolicy: held
    with pytest.raises(gexc.Forbidden) as info:
        jobs.set_iam_policy(request={"resource": settings.job_name, "policy": policy})
    assert info.value.metadata["permission"] == "run.jobs.setIamPolicy"
    service = f"projects/{PROJECT}/locations/{REGION}/services/tji"
    services = clients(api_cloud).services
    services.set_iam_policy(request={"resource": service,
                                     "policy": services.get_iam_policy(request={"resource": service})})


def test_status_still_shows_the_service_when_listing_executions_is_refused(api_cloud, backend):
    settings = job_settings("tjl")
    deploy(api_cloud, backend, settings)
    api_cloud.deny("run", "ListExecutions")
    status = provider_for(api_cloud).status(settings)
    assert status.exists and status.ready and status.url and status.training_job == settings.job_name
    assert status.executions == [] and "run.executions.list" in status.executions_error
    line = next(line for line in status.lines() if line.startswith("training job:"))
    assert "executions not listed" in line and "run.executions.list" in line and "no execution yet" not in line
    assert status.to_dict()["executions_error"] == status.executions_error


def test_status_says_why_a_failed_execution_failed_from_its_log(run_cloud, scripted):
    # an execution's conditions only count failed tasks: what the task printed is in Cloud Logging
    backend, _ = scripted
    settings = job_settings("tjf", training_max_retries=1)
    deploy(run_cloud, backend, settings)
    scripted_job(run_cloud, settings, "fail")
    member = f"{run_cloud.project_number(PROJECT)}-compute@developer.gserviceaccount.com"
    operation = run_job(run_cloud, settings, "9", account=member)
    execution = operation.metadata.name.rsplit("/", 1)[-1]
    with pytest.raises(gexc.GoogleAPICallError):
        operation.result(polling=FAST_POLLING)
    status = provider_for(run_cloud).status(settings)
    run = status.executions[0]
    assert run["execution"] == execution and run["state"] == "failed"
    assert run["reason"] == "error: project 9 has no annotations to train on"
    lines = status.lines()
    assert lines[lines.index(next(line for line in lines if line.startswith(f"  execution {execution}"))) + 1] \
        == "    why: error: project 9 has no annotations to train on"
    listed = run_cloud.log.filter(api="logging", method="ListLogEntries")
    assert len(listed) == 1 and f'labels."run.googleapis.com/execution_name"="{execution}"' in listed[0].body["filter"]

    run_cloud.deny("logging", "ListLogEntries")  # no roles/logging.viewer: the status still shows, and says so
    again = provider_for(run_cloud).status(settings)
    assert again.exists and "its log could not be read" in again.executions[0]["reason"]
    assert "roles/logging.viewer" in again.executions[0]["reason"]
