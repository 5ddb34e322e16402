"""What a deploy of one service is: `GcpSettings`, checked before any Google call.

`GcpSettings.validate()` refuses, with the fix, anything Cloud Run would refuse later (names,
regions, the CPU and memory table in `resource_problem`, environment names lsdeploy sets itself).
The resource names a service uses (buckets, repository, image, secrets) derive from it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from ...errors import EXIT_USAGE, LsdeployError

SERVICE_RE = re.compile(r"^[a-z](?:[a-z0-9-]{0,47}[a-z0-9])?$")
REGION_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+$")
PROJECT_RE = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_ENV = {"PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION", "MODEL_STATE_URI", "BASIC_AUTH_USER",
                "BASIC_AUTH_PASS", "LABEL_STUDIO_API_KEY", "LSDEPLOY_TRAINING", "LSDEPLOY_TRAINING_JOB", "CLOUD_RUN_JOB",
                "CLOUD_RUN_EXECUTION", "CLOUD_RUN_TASK_INDEX", "CLOUD_RUN_TASK_ATTEMPT", "CLOUD_RUN_TASK_COUNT"}
SPEC_ANNOTATION = "lsdeploy.dev/spec-sha256"
MANAGED_LABEL = ("managed-by", "lsdeploy")
# Cloud Run's GPU rules (cloud.google.com/run/docs/configuring/services/gpu): one GPU per instance,
# in a few regions, each type with a CPU and memory minimum. A type whose minimum lies beyond what
# lsdeploy can ask for (8 CPUs, 32Gi: the nvidia-rtx-pro-6000 needs 20 CPUs and 80Gi) is not offered.
GPU_TYPES = {"nvidia-l4": (4, 16 * 1024)}           # type -> (CPUs, MiB) at least
GPU_REGIONS = ("us-central1", "us-east4", "europe-west1", "europe-west4", "asia-southeast1")
# Cloud Run jobs (cloud.google.com/run/docs/configuring/jobs/gpu, .../task-timeout): GPUs in fewer
# regions, a task runs for at most 168 hours (1 hour with a GPU), and retries 0 to 10 times.
JOB_GPU_REGIONS = ("us-central1", "europe-west1", "europe-west4", "asia-southeast1")
JOB_TIMEOUT_MAX = 168 * 3600
JOB_GPU_TIMEOUT_MAX = 3600
JOB_MAX_RETRIES = 10
TRAINING_MODES = ("service", "job")

INGRESS = {"all": "INGRESS_TRAFFIC_ALL", "internal": "INGRESS_TRAFFIC_INTERNAL_ONLY",
           "internal-and-cloud-load-balancing": "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER"}


@dataclass
class GcpSettings:
    project: str
    region: str
    service: str
    memory: str = "2Gi"
    cpu: str = "1"
    gpu: int = 0
    gpu_type: str = "nvidia-l4"
    min_instances: int = 1
    max_instances: int = 3
    concurrency: int = 8
    timeout: int = 300
    env: dict = field(default_factory=dict)
    secret_env: dict = field(default_factory=dict)   # NAME -> "secret[:version]" (existing secrets)
    service_account: Optional[str] = None
    ingress: str = "all"                             # all | internal | internal-and-cloud-load-balancing
    basic_auth: bool = True
    basic_auth_user: str = "labelstudio"
    labels: dict = field(default_factory=dict)
    repository: str = "lsdeploy"
    source_bucket: Optional[str] = None
    state_bucket: Optional[str] = None
    label_studio_url: Optional[str] = None
    label_studio_api_key: Optional[str] = field(default=None, repr=False)
    projects: list = field(default_factory=list)
    title: Optional[str] = None
    keep_images: int = 5                             # images (and their source bundles) kept per service
    prune: bool = True                               # delete older ones after a deploy
    build_timeout: int = 1800
    ready_timeout: float = 900.0                     # --wait-timeout: for the new revision to be ready
    warmup_timeout: float = 120.0
    build_service_account: Optional[str] = None      # None: lsdeploy-builder (created once); "compute"; an email
    build_region: Optional[str] = None               # --build-region: where Cloud Build runs (default: region)
    enable_apis: bool = False                        # --enable-apis: enable the missing APIs (preflight)
    iam_wait: float = 600.0                          # retry a revision refused a just-granted permission this long
    training: str = "service"                        # --training: fit on the serving instances, or in a Cloud Run job
    training_cpu: str = "2"                          # the job's task resources (--training-*)
    training_memory: str = "4Gi"
    training_gpu: int = 0
    training_gpu_type: str = "nvidia-l4"
    training_timeout: int = 3600                     # seconds per task attempt
    training_max_retries: int = 3

    def __post_init__(self):
        if self.label_studio_api_key:  # as the Label Studio client does: a key read from a file ends with a line break
            self.label_studio_api_key = self.label_studio_api_key.strip()

    @property
    def sources_bucket_name(self) -> str:
        return self.source_bucket or f"{self.project}-lsdeploy-sources"

    @property
    def state_bucket_name(self) -> str:
        return self.state_bucket or f"{self.project}-lsdeploy-state"

    @property
    def state_uri(self) -> str:
        return f"gs://{self.state_bucket_name}/{self.service}"

    @property
    def location(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    def build_location(self, region: Optional[str] = None) -> str:
        return f"projects/{self.project}/locations/{region or self.build_region or self.region}"

    @property
    def service_name(self) -> str:
        return f"{self.location}/services/{self.service}"

    @property
    def repository_name(self) -> str:
        return f"{self.location}/repositories/{self.repository}"

    @property
    def image(self) -> str:
        return f"{self.region}-docker.pkg.dev/{self.project}/{self.repository}/{self.service}"

    @property
    def logs_prefix(self) -> str:
        """Where the service's build logs go in the sources bucket."""
        return f"build-logs/{self.service}/"

    @property
    def job_id(self) -> str:
        """The training job's id (`--training job`): `<service>-train`."""
        return f"{self.service}-train"

    @property
    def job_name(self) -> str:
        return f"{self.location}/jobs/{self.job_id}"

    def secret_id(self, what: str) -> str:
        return f"{self.service}-{what}"

    def validate(self) -> None:
        """Everything checkable before any API call; LsdeployError(EXIT_USAGE) names the fix."""
        def bad(message):
            raise LsdeployError(message, EXIT_USAGE)

        if not self.project:
            bad("no Google Cloud project: pass --gcp-project-id or set GCP_PROJECT")
        if not PROJECT_RE.match(self.project):
            bad(f"{self.project!r} is not a Google Cloud project id (6-30 characters: lowercase letters, digits, "
                "hyphens; starts with a letter): pass the id, not the name or number, with --gcp-project-id")
        if not REGION_RE.match(self.region or ""):
            bad(f"{self.region!r} is not a Cloud Run region (like us-central1 or europe-west4): pass --gcp-region")
        if self.build_region is not None and not REGION_RE.match(self.build_region):
            bad(f"{self.build_region!r} is not a Cloud Build region (like us-central1): pass --build-region")
        if not SERVICE_RE.match(self.service or ""):
            bad(f"{self.service!r} is not a valid Cloud Run service name: it must start with a lowercase letter, use "
                "only lowercase letters, digits and hyphens, not end with a hyphen, and have at most 49 characters; "
                "pass --service")
        if not re.match(r"^[0-9]+(\.[0-9]+)?(Mi|Gi)$", self.memory or ""):
            bad(f"--memory {self.memory!r}: use a size like 512Mi or 4Gi")
        if not re.match(r"^[0-9]+(\.[0-9]+)?$|^[0-9]+m$", self.cpu or ""):
            bad(f"--cpu {self.cpu!r}: use a number of CPUs like 1, 2, 4 or 8")
        if not 0 <= self.min_instances <= self.max_instances:
            bad(f"--min-instances {self.min_instances} must be between 0 and --max-instances {self.max_instances}")
        if not 1 <= self.concurrency <= 1000:
            bad("--concurrency must be between 1 and 1000")
        if not 1 <= self.timeout <= 3600:
            bad("--timeout must be between 1 and 3600 seconds")
        if self.gpu not in (0, 1):
            bad(f"--gpu {self.gpu}: Cloud Run gives an instance exactly one GPU: pass --gpu 1 (or --gpu 0)")
        if self.gpu and self.gpu_type not in GPU_TYPES:
            bad(f"--gpu-type {self.gpu_type!r}: lsdeploy deploys {', '.join(GPU_TYPES)} on Cloud Run (other types need "
                "more CPUs and memory than Cloud Run gives a service here): pass --gpu-type nvidia-l4")
        if self.gpu and self.region not in GPU_REGIONS:
            bad(f"--gpu 1 in {self.region}: Cloud Run has GPUs only in {', '.join(GPU_REGIONS)}: pass --gcp-region "
                "with one of them (europe-west4 or us-central1, say)")
        problem = resource_problem(_cpus(self.cpu), _mebibytes(self.memory), self.gpu, self.gpu_type)
        if problem:
            bad(f"--cpu {self.cpu} --memory {self.memory}{f' --gpu {self.gpu}' if self.gpu else ''}: {problem}")
        self._validate_training(bad)
        if self.ready_timeout <= 0:
            bad(f"--wait-timeout {self.ready_timeout}: wait at least 1 second")
        if self.keep_images < 1:
            bad(f"--keep-images {self.keep_images}: keep at least 1 image (the serving one); pass --no-prune "
                "to keep every image")
        if self.ingress not in INGRESS:
            bad(f"--ingress {self.ingress!r}: choose one of {', '.join(INGRESS)}")
        for name in set(self.env) & set(self.secret_env):
            bad(f"{name} is passed with both --env and --secret: keep one")
        for name in list(self.env) + list(self.secret_env):
            if name == "LABEL_STUDIO_URL" and self.label_studio_url:
                bad("--env/--secret LABEL_STUDIO_URL and --label-studio-host both set LABEL_STUDIO_URL on the "
                    "service (Cloud Run refuses a duplicate name): pass the address once, with --label-studio-host")
            if not ENV_NAME_RE.match(name):
                bad(f"{name!r} is not an environment variable name")
            if name in RESERVED_ENV:
                bad(f"{name} is set by lsdeploy or Cloud Run; do not pass it with --env/--secret")
        for key, value in self.labels.items():
            if not LABEL_KEY_RE.match(key) or not LABEL_VALUE_RE.match(value):
                bad(f"label {key}={value}: keys and values use lowercase letters, digits, _ and - "
                    "(keys start with a letter, at most 63 characters)")
        if self.projects and not (self.label_studio_url and self.label_studio_api_key):
            bad("registering with Label Studio needs --label-studio-host and --label-studio-api-key "
                "(LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY)")

    def _validate_training(self, bad) -> None:
        """--training and the job's resources, by Cloud Run's rules for jobs."""
        if self.training not in TRAINING_MODES:
            bad(f"--training {self.training!r}: choose service (fit on the serving instances) or job (a Cloud Run job)")
        if self.training != "job":
            return
        if len(self.job_id) > 63:
            bad(f"--training job names the job {self.job_id}, longer than Cloud Run's 63 characters: pass a shorter "
                "--service")
        if not re.match(r"^[0-9]+(\.[0-9]+)?(Mi|Gi)$", self.training_memory or ""):
            bad(f"--training-memory {self.training_memory!r}: use a size like 4Gi or 16Gi")
        if not re.match(r"^[0-9]+(\.[0-9]+)?$|^[0-9]+m$", self.training_cpu or ""):
            bad(f"--training-cpu {self.training_cpu!r}: use a number of CPUs like 1, 2, 4 or 8")
        if self.training_gpu not in (0, 1):
            bad(f"--training-gpu {self.training_gpu}: a Cloud Run job task gets exactly one GPU: pass --training-gpu 1 "
                "(or 0)")
        if self.training_gpu and self.training_gpu_type not in GPU_TYPES:
            bad(f"--training-gpu-type {self.training_gpu_type!r}: lsdeploy runs {', '.join(GPU_TYPES)} jobs on Cloud "
                "Run: pass --training-gpu-type nvidia-l4")
        if self.training_gpu and self.region not in JOB_GPU_REGIONS:
            bad(f"--training-gpu 1 in {self.region}: Cloud Run jobs have GPUs only in {', '.join(JOB_GPU_REGIONS)}: "
                "pass --gcp-region with one of them")
        limit = JOB_GPU_TIMEOUT_MAX if self.training_gpu else JOB_TIMEOUT_MAX
        if not 1 <= self.training_timeout <= limit:
            bad(f"--training-timeout {self.training_timeout}: a Cloud Run job task runs for 1 s to "
                f"{limit // 3600} hours{' with a GPU' if self.training_gpu else ''}: pass at most {limit}")
        if not 0 <= self.training_max_retries <= JOB_MAX_RETRIES:
            bad(f"--training-max-retries {self.training_max_retries}: Cloud Run retries a task 0 to {JOB_MAX_RETRIES} "
                "times")
        problem = resource_problem(_cpus(self.training_cpu), _mebibytes(self.training_memory), self.training_gpu,
                                   self.training_gpu_type)
        if problem:
            problem = problem.replace("--cpu", "--training-cpu").replace("--memory", "--training-memory")
            bad(f"--training-cpu {self.training_cpu} --training-memory {self.training_memory}"
                f"{f' --training-gpu {self.training_gpu}' if self.training_gpu else ''}: {problem}")


# Cloud Run's CPU and memory table (cloud.google.com/run/docs/configuring/services/cpu and
# .../memory-limits): any whole number of CPUs from 1 to 8, memory from 512Mi (second generation)
# to 32Gi, and memory above a size needs a number of CPUs; a CPU count needs at least some memory.
CPU_CHOICES = (1, 2, 3, 4, 5, 6, 7, 8)
MIN_CPUS_FOR_MEMORY = ((24 * 1024, 8), (16 * 1024, 6), (8 * 1024, 4), (4 * 1024, 2))  # more than MiB -> CPUs
MIN_MEMORY_FOR_CPUS = {4: 2 * 1024, 5: 4 * 1024, 6: 4 * 1024, 7: 4 * 1024, 8: 4 * 1024}  # CPUs -> at least MiB


def resource_problem(cpus: float, mebibytes: float, gpus: int = 0, gpu_type: str = "nvidia-l4") -> str:
    """What Cloud Run would refuse in these limits, with the fix ("" when they are allowed)."""
    if cpus < 1:
        # below 1 CPU Cloud Run requires request-based billing (cpu_idle) and concurrency 1, while
        # lsdeploy keeps CPU allocated so that training can run after a webhook is answered
        return ("Cloud Run allows less than 1 CPU only with request-based billing and concurrency 1, and lsdeploy "
                "keeps CPU always allocated for background training: pass --cpu 1 or more")
    if cpus not in CPU_CHOICES:
        return "Cloud Run takes a whole number of CPUs from 1 to 8: " \
               f"pass --cpu {next(c for c in CPU_CHOICES if c >= cpus) if cpus <= 8 else 8}"
    if mebibytes < 512:
        return "Cloud Run needs at least 512Mi of memory (second generation): pass --memory 512Mi or more"
    if mebibytes > 32 * 1024:
        return "Cloud Run allows at most 32Gi of memory: pass --memory 32Gi or less"
    for above, need in MIN_CPUS_FOR_MEMORY:
        if mebibytes > above and cpus < need:
            return f"memory above {above // 1024}Gi needs at least {need} CPUs on Cloud Run: pass --cpu {need}"
    least = MIN_MEMORY_FOR_CPUS.get(int(cpus), 0)
    if mebibytes < least:
        return f"{int(cpus)} CPUs need at least {least // 1024}Gi of memory on Cloud Run: pass --memory {least // 1024}Gi"
    need_cpus, need_memory = GPU_TYPES.get(gpu_type, (4, 16 * 1024))
    if gpus and (cpus < need_cpus or mebibytes < need_memory):
        return (f"a GPU ({gpu_type}) on Cloud Run needs at least {need_cpus} CPUs and {need_memory // 1024}Gi of "
                f"memory: pass --cpu {max(need_cpus, int(cpus))} --memory {max(need_memory, int(mebibytes)) // 1024}Gi")
    return ""


# Where Cloud Build runs for projects it restricts ("due to quota restrictions, cannot run builds in
# this region"), and the nearest of them for a region's prefix.
OPEN_BUILD_REGIONS = ("us-central1", "us-west2", "europe-west1", "asia-east1", "australia-southeast1",
                      "southamerica-east1")
NEAREST_BUILD_REGION = (("us-west", "us-west2"), ("northamerica", "us-central1"), ("us-", "us-central1"),
                        ("southamerica", "southamerica-east1"), ("europe", "europe-west1"), ("me-", "europe-west1"),
                        ("africa", "europe-west1"), ("australia", "australia-southeast1"), ("asia", "asia-east1"))


def nearest_build_region(region: str) -> str:
    """The open Cloud Build region nearest to `region` (its continent's)."""
    if region in OPEN_BUILD_REGIONS:
        return region
    return next((open_region for prefix, open_region in NEAREST_BUILD_REGION if region.startswith(prefix)),
                "us-central1")


def unreachable_label_studio(url: str) -> str:
    """Why Cloud Run can never reach this Label Studio address ("" when it may): a loopback or
    private address, or a name that only means this machine."""
    import ipaddress
    from urllib.parse import urlsplit

    host = (urlsplit(url if "://" in url else f"http://{url}").hostname or "").lower()
    if not host:
        return ""
    if host == "localhost" or host.endswith(".localhost") or host.endswith(".local") or "." not in host:
        return f"{host} names this machine or its local network"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return ""
    if address.is_loopback:
        return f"{host} is this machine (loopback)"
    if address.is_private or address.is_link_local or address.is_unspecified:
        return f"{host} is a private address"
    return ""


def _cpus(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def _mebibytes(value: str) -> float:
    number = float(value[:-2])
    return number * 1024 if value.endswith("Gi") else number
