"""What the Cloud Run fake checks and fills in like the real API, beyond what the proto says.

`validate_service()` refuses (INVALID_ARGUMENT, one `fieldViolations` entry per problem) what Cloud
Run refuses: the service id, one container port, traffic summing to 100, concurrency, timeout,
startup probe, limits keys, reserved env names and duplicates, the CPU and memory table (any whole
CPU from 1 to 8; below 1 only with cpu_idle and concurrency 1; memory minimums and maximums), and
GPUs (exactly one, Cloud Run's GPU regions, each type's CPU and memory minimum, cpu_idle false, an
accelerator). `fill_defaults()` sets what a GetService then shows.
"""
from __future__ import annotations

import re

from google.cloud import run_v2
from google.protobuf import duration_pb2

from .server import BAD_REQUEST, ApiError, project_number

SERVICE_ID = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
LATEST = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST.value
REVISION = run_v2.TrafficTargetAllocationType.TRAFFIC_TARGET_ALLOCATION_TYPE_REVISION.value

RESERVED_ENV = {"PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"}
LIMIT_KEYS = {"cpu", "memory", "nvidia.com/gpu"}
# Cloud Run's GPUs: one per instance, in these regions, each type with a CPU and memory minimum.
GPU_REGIONS = ("us-central1", "us-east4", "europe-west1", "europe-west4", "asia-southeast1")
GPU_MINIMUMS = {"nvidia-l4": (4, 16), "nvidia-rtx-pro-6000": (20, 80)}   # type -> (CPUs, GiB)
MEMORY_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def parse_cpu(value: str) -> float | None:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m?)", value.strip())
    if not m:
        return None
    number = float(m.group(1))
    return number / 1000 if m.group(2) else number


def parse_memory(value: str) -> int | None:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(|k|M|G|T|Ki|Mi|Gi|Ti)", value.strip())
    if not m:
        return None
    return int(float(m.group(1)) * MEMORY_UNITS[m.group(2)])


def cpu_memory_violations(cpu: float, memory: int, cpu_idle: bool, concurrency: int) -> list[tuple[str, str]]:
    """(limit, description) for what Cloud Run's CPU and memory table refuses."""
    found = []
    gib = 2**30
    if cpu < 1:
        if not cpu_idle:
            found.append(("cpu", "CPU less than 1 requires CPU to be allocated only during request processing "
                                 "(cpu_idle must be true)."))
        if (concurrency or 80) > 1:
            found.append(("cpu", "CPU less than 1 requires max_instance_request_concurrency 1."))
        if memory > gib or (memory > 512 * 2**20 and cpu < 0.5):
            found.append(("memory", f"Memory {memory // 2**20}Mi requires at least {1 if memory > gib else 0.5} CPU."))
    elif cpu != int(cpu) or not 1 <= int(cpu) <= 8:
        found.append(("cpu", f"Invalid value specified for cpu: {cpu:g}. Values of 1 or more must be whole numbers "
                             f"up to 8."))
    if memory > 32 * gib:
        found.append(("memory", "Memory must be at most 32Gi."))
    for above, need in ((24, 8), (16, 6), (8, 4), (4, 2)):
        if memory > above * gib and cpu < need:
            found.append(("cpu", f"Memory over {above}Gi requires at least {need} CPU."))
            break
    least = {4: 2, 5: 4, 6: 4, 7: 4, 8: 4}.get(int(cpu) if cpu == int(cpu) else 0, 0)
    if memory < least * gib:
        found.append(("memory", f"{int(cpu)} CPU requires at least {least}Gi of memory."))
    return found




def validate_service(service, request_name: str, service_id: str, new: bool = True, region: str = "") -> None:
    violations: list[tuple[str, str]] = []
    if new:
        if not SERVICE_ID.fullmatch(service_id) or len(service_id) > 49:
            id_field = "service_id" if request_name == "CreateServiceRequest" else "service.name"
            violations.append((id_field,
                               f"service_id '{service_id}' is invalid: it must start with a lowercase letter, "
                               f"contain only lowercase letters, digits and hyphens, not end with a hyphen, and "
                               f"be at most 49 characters long."))
    prefix = "service."
    template = service.template
    if not template.containers:
        violations.append((prefix + "template.containers", "at least one container must be specified."))
    ports = 0
    for index, container in enumerate(template.containers):
        where = f"{prefix}template.containers[{index}]"
        if not container.image:
            violations.append((where + ".image", "container image must be specified."))
        if len(container.ports) > 1:
            violations.append((where + ".ports", "Cloud Run only supports one container port per container."))
        ports += len(container.ports)
        for port in container.ports:
            if not 1 <= port.container_port <= 65535 and port.container_port != 0:
                violations.append((where + ".ports", f"container_port {port.container_port} is out of range."))
        names = set()
        for env_index, env in enumerate(container.env):
            if env.name in RESERVED_ENV:
                violations.append((f"{where}.env[{env_index}].name",
                                   f"The following reserved env names were provided: {env.name}. These values "
                                   f"are automatically set by the system."))
            if env.name in names:
                violations.append((f"{where}.env[{env_index}].name", f"duplicate env name {env.name}."))
            names.add(env.name)
            if not re.fullmatch(r"[-._a-zA-Z][-._a-zA-Z0-9]*", env.name or "0"):
                violations.append((f"{where}.env[{env_index}].name", f"invalid env name {env.name!r}."))
        limits = container.resources.limits
        for key, value in limits.items():
            if key not in LIMIT_KEYS:
                violations.append((f"{where}.resources.limits",
                                   f"Invalid resource limit key '{key}': only 'cpu', 'memory' and "
                                   f"'nvidia.com/gpu' are supported."))
        cpu = parse_cpu(limits["cpu"]) if "cpu" in limits else 1.0
        memory = parse_memory(limits["memory"]) if "memory" in limits else 512 * 2**20
        if cpu is None:
            violations.append((f"{where}.resources.limits.cpu",
                               f"Invalid value specified for cpu: '{limits['cpu']}'."))
        if memory is None:
            violations.append((f"{where}.resources.limits.memory",
                               f"Invalid value specified for memory: '{limits['memory']}'."))
        if cpu is not None and memory is not None:
            violations += [(f"{where}.resources.limits.{key}", text) for key, text in cpu_memory_violations(
                cpu, memory, container.resources.cpu_idle or not container.HasField("resources"),
                template.max_instance_request_concurrency)]
        if "nvidia.com/gpu" in limits:
            accelerator = template.node_selector.accelerator
            need_cpu, need_gib = GPU_MINIMUMS.get(accelerator, (4, 16))
            if limits["nvidia.com/gpu"].strip() != "1":
                violations.append((f"{where}.resources.limits.nvidia.com/gpu",
                                   f"Invalid value specified for nvidia.com/gpu: '{limits['nvidia.com/gpu']}'. "
                                   "Only 1 GPU per instance is supported."))
            if accelerator and accelerator not in GPU_MINIMUMS:
                violations.append((prefix + "template.node_selector.accelerator",
                                   f"Unsupported accelerator type '{accelerator}'."))
            if region and region not in GPU_REGIONS:
                violations.append((prefix + "template.node_selector.accelerator",
                                   f"GPU is not supported in region {region}."))
            if cpu is not None and cpu < need_cpu:
                violations.append((f"{where}.resources.limits.cpu", f"A GPU requires at least {need_cpu} CPU."))
            if memory is not None and memory < need_gib * 2**30:
                violations.append((f"{where}.resources.limits.memory",
                                   f"A GPU requires at least {need_gib}Gi of memory."))
            if container.resources.cpu_idle:
                violations.append((f"{where}.resources.cpu_idle",
                                   "A GPU requires CPU to be always allocated (cpu_idle must be false)."))
            if not template.node_selector.accelerator:
                violations.append((prefix + "template.node_selector.accelerator",
                                   "A GPU requires node_selector.accelerator (for example nvidia-l4)."))
        probe = container.startup_probe
        default_probe = (probe.timeout_seconds == probe.period_seconds == 240 and probe.failure_threshold == 1
                         and probe.HasField("tcp_socket"))  # what the server itself fills in
        if container.HasField("startup_probe") and not default_probe:
            period = probe.period_seconds or 10
            timeout = probe.timeout_seconds or 1
            if period > 240:
                violations.append((f"{where}.startup_probe.period_seconds",
                                   "period_seconds must be at most 240 for a startup probe."))
            if timeout >= period:
                violations.append((f"{where}.startup_probe.timeout_seconds",
                                   "timeout_seconds must be less than period_seconds."))
    if ports > 1:
        violations.append((prefix + "template.containers",
                           "Only one container may expose a port (the ingress container)."))
    if template.revision and not template.revision.startswith(service_id + "-"):
        violations.append((prefix + "template.revision",
                           f"Revision name must be prefixed by the name of the enclosing Service with a trailing "
                           f"-: '{service_id}-'."))
    if template.max_instance_request_concurrency > 1000:
        violations.append((prefix + "template.max_instance_request_concurrency",
                           "max_instance_request_concurrency must be at most 1000."))
    if template.timeout.seconds > 3600 or (template.timeout.seconds == 3600 and template.timeout.nanos):
        violations.append((prefix + "template.timeout", "timeout must be at most 3600s."))
    if service.traffic:
        total = sum(t.percent for t in service.traffic)
        if total != 100:
            violations.append((prefix + "traffic", f"The traffic percents must add up to 100, got {total}."))
    if violations:
        first_field, first = violations[0]
        message = f"Violation in {request_name}.{first_field}: {first}"
        raise ApiError("INVALID_ARGUMENT", message, [
            {"@type": BAD_REQUEST, "fieldViolations": [{"field": f, "description": d} for f, d in violations]}])



def fill_defaults(service, project: str) -> None:
    """What the real API fills in and then reports on GetService."""
    if not service.ingress:
        service.ingress = run_v2.IngressTraffic.INGRESS_TRAFFIC_ALL
    if not service.launch_stage:
        service.launch_stage = 4  # google.api.LaunchStage.GA
    if not service.traffic:
        service.traffic.add(type_=LATEST, percent=100)
    template = service.template
    if not template.max_instance_request_concurrency:
        template.max_instance_request_concurrency = 80
    if not template.HasField("timeout"):
        template.timeout.CopyFrom(duration_pb2.Duration(seconds=300))
    if not template.service_account:
        template.service_account = f"{project_number(project)}-compute@developer.gserviceaccount.com"
    if not template.scaling.max_instance_count:
        template.scaling.max_instance_count = 100
    for index, container in enumerate(template.containers):
        if index == 0 and not container.ports and len(template.containers) == 1:
            container.ports.add(name="http1", container_port=8080)
        for port in container.ports:
            if not port.container_port:
                port.container_port = 8080
        # "if ResourceRequirements is set, the caller must explicitly set [cpu_idle] to true to
        # preserve the default behavior" (the field's documentation): only a missing block defaults.
        if not container.HasField("resources"):
            container.resources.cpu_idle = True
        if not container.resources.limits:
            container.resources.limits.update({"cpu": "1000m", "memory": "512Mi"})
        if container.ports and not container.HasField("startup_probe"):
            probe = container.startup_probe
            probe.timeout_seconds, probe.period_seconds, probe.failure_threshold = 240, 240, 1
            probe.tcp_socket.port = container.ports[0].container_port

# ---- revisions -------------------------------------------------------------------------------
