"""What the Cloud Run jobs fake checks and fills in like the real API, beyond what the proto says.

Cloud Run's rules for jobs (cloud.google.com/run/docs/create-jobs, configuring/jobs/cpu,
.../memory-limits, .../gpu, configuring/task-timeout, execute/jobs#override-job-configuration),
which differ from services': at least 1 CPU; a task runs for at most 168 hours, 1 hour with a GPU;
0 to 10 retries (3 by default); up to 10,000 tasks; GPUs only without zonal redundancy and in fewer
regions; no `PORT` is given, and the task's own variables are reserved. `validate_job()` and
`validate_overrides()` refuse with INVALID_ARGUMENT and one `fieldViolations` entry per problem.
"""
from __future__ import annotations

import re

from google.protobuf import duration_pb2

from .cloudrun_rules import GPU_MINIMUMS, LIMIT_KEYS, cpu_memory_violations, parse_cpu, parse_memory
from .server import BAD_REQUEST, ApiError, project_number

JOB_ID = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
RESERVED_ENV = {"CLOUD_RUN_JOB", "CLOUD_RUN_EXECUTION", "CLOUD_RUN_TASK_INDEX", "CLOUD_RUN_TASK_ATTEMPT",
                "CLOUD_RUN_TASK_COUNT"}
JOB_GPU_REGIONS = ("us-central1", "europe-west1", "europe-west4", "asia-southeast1")
MAX_TIMEOUT = 168 * 3600
MAX_GPU_TIMEOUT = 3600
MAX_RETRIES = 10
MAX_TASKS = 10000
DEFAULT_TIMEOUT = 600
DEFAULT_RETRIES = 3


def _refuse(violations: list, request_name: str) -> None:
    if violations:
        first_field, first = violations[0]
        raise ApiError("INVALID_ARGUMENT", f"Violation in {request_name}.{first_field}: {first}", [
            {"@type": BAD_REQUEST, "fieldViolations": [{"field": f, "description": d} for f, d in violations]}])


def _env_violations(env, where: str) -> list:
    found, names = [], set()
    for index, var in enumerate(env):
        if var.name in RESERVED_ENV:
            found.append((f"{where}.env[{index}].name", f"The following reserved env names were provided: {var.name}. "
                                                        "These values are automatically set by the system."))
        if var.name in names:
            found.append((f"{where}.env[{index}].name", f"duplicate env name {var.name}."))
        names.add(var.name)
        if not re.fullmatch(r"[-._a-zA-Z][-._a-zA-Z0-9]*", var.name or "0"):
            found.append((f"{where}.env[{index}].name", f"invalid env name {var.name!r}."))
    return found


def _timeout_violations(timeout, gpu: bool, where: str) -> list:
    limit = MAX_GPU_TIMEOUT if gpu else MAX_TIMEOUT
    if timeout.seconds < 0 or timeout.seconds > limit or (timeout.seconds == limit and timeout.nanos):
        return [(where, f"timeout must be at most {limit}s ({limit // 3600}h)" + (" for a task with a GPU." if gpu
                                                                                else "."))]
    return []


def validate_job(job, request_name: str, job_id: str, new: bool = True, region: str = "") -> None:
    violations: list[tuple[str, str]] = []
    if new and (not JOB_ID.fullmatch(job_id) or len(job_id) > 63):
        violations.append(("job_id" if request_name == "CreateJobRequest" else "job.name",
                           f"job_id '{job_id}' is invalid: it must start with a lowercase letter, contain only "
                           f"lowercase letters, digits and hyphens, not end with a hyphen, and be at most 63 "
                           f"characters long."))
    execution = job.template
    task = execution.template
    if execution.task_count < 0 or execution.task_count > MAX_TASKS:
        violations.append(("job.template.task_count", f"task_count must be between 1 and {MAX_TASKS}."))
    if execution.parallelism < 0 or (execution.task_count and execution.parallelism > execution.task_count):
        violations.append(("job.template.parallelism", "parallelism must be between 0 and task_count."))
    if task.HasField("max_retries") and not 0 <= task.max_retries <= MAX_RETRIES:
        violations.append(("job.template.template.max_retries",
                           f"max_retries must be between 0 and {MAX_RETRIES}, got {task.max_retries}."))
    if not task.containers:
        violations.append(("job.template.template.containers", "at least one container must be specified."))
    gpu = False
    for index, container in enumerate(task.containers):
        where = f"job.template.template.containers[{index}]"
        if not container.image:
            violations.append((where + ".image", "container image must be specified."))
        if container.ports:
            violations.append((where + ".ports", "Cloud Run jobs do not listen on ports: remove ports."))
        violations += _env_violations(container.env, where)
        limits = container.resources.limits
        for key in limits:
            if key not in LIMIT_KEYS:
                violations.append((f"{where}.resources.limits", f"Invalid resource limit key '{key}': only 'cpu', "
                                                                "'memory' and 'nvidia.com/gpu' are supported."))
        cpu = parse_cpu(limits["cpu"]) if "cpu" in limits else 1.0
        memory = parse_memory(limits["memory"]) if "memory" in limits else 512 * 2**20
        if cpu is None or memory is None:
            violations.append((f"{where}.resources.limits", "Invalid value specified for cpu or memory."))
        elif cpu < 1:
            violations.append((f"{where}.resources.limits.cpu", "A Cloud Run job requires at least 1 CPU."))
        else:
            violations += [(f"{where}.resources.limits.{k}", text)
                           for k, text in cpu_memory_violations(cpu, memory, False, 1)]
        if "nvidia.com/gpu" in limits:
            gpu = True
            accelerator = task.node_selector.accelerator
            need_cpu, need_gib = GPU_MINIMUMS.get(accelerator, (4, 16))
            if limits["nvidia.com/gpu"].strip() != "1":
                violations.append((f"{where}.resources.limits.nvidia.com/gpu",
                                   f"Invalid value specified for nvidia.com/gpu: '{limits['nvidia.com/gpu']}'. Only 1 "
                                   "GPU per task is supported."))
            if not accelerator:
                violations.append(("job.template.template.node_selector.accelerator",
                                   "A GPU requires node_selector.accelerator (for example nvidia-l4)."))
            elif accelerator not in GPU_MINIMUMS:
                violations.append(("job.template.template.node_selector.accelerator",
                                   f"Unsupported accelerator type '{accelerator}'."))
            if region and region not in JOB_GPU_REGIONS:
                violations.append(("job.template.template.node_selector.accelerator",
                                   f"GPU is not supported for jobs in region {region}."))
            if not task.gpu_zonal_redundancy_disabled:
                violations.append(("job.template.template.gpu_zonal_redundancy_disabled",
                                   "Jobs with GPUs support only non-zonal redundancy: set gpu_zonal_redundancy_disabled "
                                   "to true."))
            if cpu is not None and cpu < need_cpu:
                violations.append((f"{where}.resources.limits.cpu", f"A GPU requires at least {need_cpu} CPU."))
            if memory is not None and memory < need_gib * 2**30:
                violations.append((f"{where}.resources.limits.memory",
                                   f"A GPU requires at least {need_gib}Gi of memory."))
    if task.HasField("timeout"):
        violations += _timeout_violations(task.timeout, gpu, "job.template.template.timeout")
    _refuse(violations, request_name)


def job_has_gpu(job) -> bool:
    return any("nvidia.com/gpu" in c.resources.limits for c in job.template.template.containers)


def validate_overrides(job, overrides) -> None:
    """RunJobRequest.overrides: containers named by the job (or the only one), args and env
    (reserved names refused), task_count 0..10000, a timeout within the job's limit."""
    violations: list[tuple[str, str]] = []
    names = [c.name for c in job.template.template.containers]
    for index, override in enumerate(overrides.container_overrides):
        where = f"overrides.container_overrides[{index}]"
        if override.name and override.name not in names:
            violations.append((where + ".name", f"Container '{override.name}' is not defined in the job."))
        elif not override.name and len(names) > 1:
            violations.append((where + ".name", "name must be set when the job has more than one container."))
        if override.clear_args and override.args:
            violations.append((where + ".clear_args", "clear_args cannot be set together with args."))
        violations += _env_violations(override.env, where)
    if overrides.task_count < 0 or overrides.task_count > MAX_TASKS:
        violations.append(("overrides.task_count", f"task_count must be between 0 and {MAX_TASKS}."))
    if overrides.HasField("timeout"):
        violations += _timeout_violations(overrides.timeout, job_has_gpu(job), "overrides.timeout")
    _refuse(violations, "RunJobRequest")


def fill_defaults(job, project: str) -> None:
    """What the real API fills in and then reports on GetJob."""
    if not job.launch_stage:
        job.launch_stage = 4  # GA
    execution = job.template
    if not execution.task_count:
        execution.task_count = 1
    task = execution.template
    if not task.HasField("max_retries"):
        task.max_retries = DEFAULT_RETRIES
    if not task.HasField("timeout"):
        task.timeout.CopyFrom(duration_pb2.Duration(seconds=DEFAULT_TIMEOUT))
    if not task.service_account:
        task.service_account = f"{project_number(project)}-compute@developer.gserviceaccount.com"
    if not task.execution_environment:
        task.execution_environment = 2  # EXECUTION_ENVIRONMENT_GEN2: jobs default to the second generation
    for container in task.containers:
        if not container.resources.limits:
            container.resources.limits.update({"cpu": "1000m", "memory": "512Mi"})
