"""`label-studio-ml deploy gcp DIR`: build, deploy to Cloud Run and register with Label Studio."""
from __future__ import annotations

import atexit
import os

import click

from . import emit_json, label_studio_options, progress


def _pairs(values, what: str, from_environment: bool = False) -> dict:
    """KEY=VALUE options. On the command line each option is one pair (`--env LABELS=a,b` keeps its
    comma); the environment variable holds several separated by commas (or whitespace). As in
    gcloud, a value starting with ^DELIM^ is split on DELIM instead: `^;^A=1,2;B=3`."""
    import re

    out = {}
    for value in values or ():
        value = str(value)
        escape = re.match(r"^\^([^^]+)\^", value)
        if escape:
            parts = value[escape.end():].split(escape.group(1))
        else:
            parts = value.split(",") if from_environment else [value]
        for part in [p for p in parts if p.strip()]:
            key, sep, val = part.partition("=")
            if not sep or not key.strip():
                raise click.BadParameter(f"{part!r}: use KEY=VALUE", param_hint=what)
            out[key.strip()] = val.strip()
    return out


def _from_environment(name: str) -> bool:
    from click.core import ParameterSource

    return click.get_current_context().get_parameter_source(name) == ParameterSource.ENVIRONMENT


@click.group()
def deploy():
    """Deploy a backend to a cloud provider."""


def _option(*names, envvar, **kwargs):
    return click.option(*names, envvar=envvar, show_envvar=True, **kwargs)


@deploy.command("gcp")
@click.argument("directory", type=click.Path(file_okay=False), metavar="DIR", envvar="LSDEPLOY_DIR")
@_option("--from", "script", envvar="LSDEPLOY_FROM", default=None, metavar="SCRIPT.py[:CLASS]",
         help="Create DIR from this model script first (like `create --from`).")
@_option("--blueprint", envvar="LSDEPLOY_BLUEPRINT", default="default",
         help="Blueprint for --from and for the Dockerfile when DIR has none.")
@_option("--gcp-project-id", "project", envvar=["GCP_PROJECT", "GOOGLE_CLOUD_PROJECT"], required=True,
         help="Google Cloud project id.")
@_option("--gcp-region", "region", envvar="GCP_REGION", default="us-central1", help="Cloud Run region.")
@_option("--service", envvar="LSDEPLOY_SERVICE", default=None,
         help="Cloud Run service name (default: DIR's name, lowercased).")
@label_studio_options(required=False)
@_option("--project", "projects", envvar="LABEL_STUDIO_PROJECT", multiple=True, metavar="ID",
         help="Label Studio project to register the backend with; repeat for several. Without it, nothing is registered.")
@_option("--memory", envvar="LSDEPLOY_MEMORY", default="2Gi", help="Memory per instance.")
@_option("--cpu", envvar="LSDEPLOY_CPU", default="1", help="CPUs per instance.")
@_option("--gpu", envvar="LSDEPLOY_GPU", type=click.IntRange(min=0), default=0,
         help="GPUs per instance: 0 or 1 (Cloud Run gives one GPU, in its GPU regions).")
@_option("--gpu-type", envvar="LSDEPLOY_GPU_TYPE", default="nvidia-l4", help="GPU type.")
@_option("--training", envvar="LSDEPLOY_TRAINING_MODE", type=click.Choice(["service", "job"]), default="service",
         help="Where fit runs: on the serving instances (service), or in a Cloud Run job <service>-train that the "
              "service starts for each project's queued training (job: its own CPU, memory, GPU, hours-long timeout "
              "and retries, billed only while it runs). See docs/deploy-gcp.md.")
@_option("--training-cpu", envvar="LSDEPLOY_TRAINING_CPU", default="2", help="CPUs of a training job task.")
@_option("--training-memory", envvar="LSDEPLOY_TRAINING_MEMORY", default="4Gi", help="Memory of a training job task.")
@_option("--training-gpu", envvar="LSDEPLOY_TRAINING_GPU", type=click.IntRange(min=0), default=0,
         help="GPUs of a training job task: 0 or 1 (in Cloud Run's GPU regions for jobs).")
@_option("--training-gpu-type", envvar="LSDEPLOY_TRAINING_GPU_TYPE", default="nvidia-l4", help="GPU type of the job.")
@_option("--training-timeout", envvar="LSDEPLOY_TRAINING_TIMEOUT", type=click.IntRange(min=1), default=3600,
         metavar="SECONDS", help="How long one attempt of a training task may run (at most 168 hours; 1 hour with a "
                                 "GPU).")
@_option("--training-max-retries", envvar="LSDEPLOY_TRAINING_MAX_RETRIES", type=click.IntRange(min=0), default=3,
         help="How many times a failed training task is retried (0 to 10).")
@_option("--min-instances", envvar="LSDEPLOY_MIN_INSTANCES", type=click.IntRange(0, 1000), default=1,
         help="Instances kept running (1 keeps Label Studio's 1 s health check off cold starts; 0 saves cost).")
@_option("--max-instances", envvar="LSDEPLOY_MAX_INSTANCES", type=click.IntRange(1, 1000), default=3,
         help="Most instances.")
@_option("--concurrency", envvar="LSDEPLOY_CONCURRENCY", type=click.IntRange(1, 1000), default=8,
         help="Requests per instance (the server's threads).")
@_option("--timeout", envvar="LSDEPLOY_TIMEOUT", type=click.IntRange(1, 3600), default=300,
         help="Request timeout in seconds.")
@_option("--env", "env", envvar="LSDEPLOY_ENV", multiple=True, metavar="KEY=VALUE",
         help="Plain environment variable for the service; repeatable. The value may hold commas; the environment "
              "variable takes several pairs separated by commas (or ^DELIM^A=1,2DELIMB=3, as in gcloud).")
@_option("--secret", "secret_env", envvar="LSDEPLOY_SECRETS", multiple=True, metavar="KEY=SECRET[:VERSION]",
         help="Environment variable from an existing Secret Manager secret; repeatable (the environment variable "
              "takes several separated by commas).")
@_option("--service-account", envvar="LSDEPLOY_SERVICE_ACCOUNT", default=None,
         help="Identity the service runs as (default: the compute default service account).")
@_option("--ingress", envvar="LSDEPLOY_INGRESS", type=click.Choice(["all", "internal", "internal-and-cloud-load-balancing"]),
         default="all", help="Who can reach the service's URL (Label Studio must be able to).")
@_option("--basic-auth/--no-basic-auth", "basic_auth", envvar="LSDEPLOY_BASIC_AUTH", default=True,
         help="Protect the backend with basic auth (password generated into Secret Manager).")
@_option("--basic-auth-user", envvar="BASIC_AUTH_USER", default="labelstudio", help="Basic auth user.")
@_option("--label", "labels", envvar="LSDEPLOY_LABELS", multiple=True, metavar="KEY=VALUE",
         help="Label on the service; repeatable (the environment variable takes several separated by commas).")
@_option("--build-service-account", envvar="LSDEPLOY_BUILD_SERVICE_ACCOUNT", default=None,
         help="Identity Cloud Build runs as (default: lsdeploy-builder, created once with only the grants a build "
              "needs; `compute`: the Compute Engine default account; or an account's email).")
@_option("--build-region", envvar="LSDEPLOY_BUILD_REGION", default=None,
         help="Where Cloud Build runs (default: the service's region; when Cloud Build refuses it for this project, "
              "the nearest region it allows, once). The image stays in the service's region.")
@_option("--build-timeout", envvar="LSDEPLOY_BUILD_TIMEOUT", type=click.IntRange(60, 86400), default=1800,
         metavar="SECONDS", help="How long Cloud Build may take to build the image (at most 24 hours): raise it for "
                                 "images with heavy dependencies (CUDA, torch) when a build times out.")
@_option("--repository", envvar="LSDEPLOY_REPOSITORY", default="lsdeploy", help="Artifact Registry repository.")
@_option("--source-bucket", envvar="LSDEPLOY_SOURCE_BUCKET", default=None,
         help="Bucket for source bundles and build logs (default: PROJECT-lsdeploy-sources).")
@_option("--state-bucket", envvar="LSDEPLOY_STATE_BUCKET", default=None,
         help="Bucket for model state, MODEL_STATE_URI (default: PROJECT-lsdeploy-state).")
@_option("--title", envvar="LSDEPLOY_TITLE", default=None, help="Backend title in Label Studio.")
@_option("--preview/--no-preview", "preview", envvar="LSDEPLOY_PREVIEW", default=False,
         help="Run the backend locally once and validate its predictions before deploying.")
@_option("--keep-images", envvar="LSDEPLOY_KEEP_IMAGES", type=click.IntRange(1, 1000), default=5,
         help="Images (and their source bundles) kept per service; older ones are deleted after the deploy. "
              "Images of revisions that serve traffic are always kept.")
@_option("--prune/--no-prune", "prune", envvar="LSDEPLOY_PRUNE", default=True,
         help="Delete old images and source bundles after deploying.")
@_option("--wait-timeout", envvar="LSDEPLOY_WAIT_TIMEOUT", type=click.IntRange(1, 86400), default=900,
         metavar="SECONDS", help="How long to wait for the new revision to be ready; when it is still deploying "
                                 "after that, `label-studio-ml status` follows it.")
@_option("--dry-run", "dry_run", envvar="LSDEPLOY_DRY_RUN", is_flag=True,
         help="Show what the deploy would do (Dockerfile, bundle, build, field-by-field changes, pruning) "
              "and change nothing.")
@_option("--check", "check", envvar="LSDEPLOY_CHECK", is_flag=True,
         help="Only check that the project is ready (APIs enabled, permissions held), change nothing, and exit 0 "
              "when it is.")
@_option("--enable-apis", "enable_apis", envvar="LSDEPLOY_ENABLE_APIS", is_flag=True,
         help="Enable the APIs the deploy needs when some are not (Service Usage), and wait for them.")
@_option("--json", "as_json", envvar="LSDEPLOY_JSON", is_flag=True, help="Print the result as one JSON object.")
def gcp(directory, script, blueprint, project, region, service, label_studio_host, label_studio_api_key, projects,
        memory, cpu, gpu, gpu_type, training, training_cpu, training_memory, training_gpu, training_gpu_type,
        training_timeout, training_max_retries, min_instances, max_instances, concurrency, timeout, env, secret_env,
        service_account, ingress, basic_auth, basic_auth_user, labels, build_service_account, build_region,
        build_timeout, repository, source_bucket,
        state_bucket, title, preview, keep_images, prune, wait_timeout, dry_run, check, enable_apis, as_json):
    """Build DIR with Cloud Build, serve it on Cloud Run, and register it with Label Studio.

    An unchanged DIR redeploys with no upload, no build and no new revision. --dry-run shows what
    would change without changing anything. Endpoints come from
    gcloud's CLOUDSDK_API_ENDPOINT_OVERRIDES_* and STORAGE_EMULATOR_HOST when set, otherwise
    Application Default Credentials are used.
    """
    from ..bundle import SourceBundle
    from ..errors import EXIT_USAGE, LsdeployError
    from ..providers.gcp import GcpClients, GcpProvider, GcpSettings
    from .connect import _projects

    project_ids = _projects(projects) if projects else []
    settings = GcpSettings(
        project=project, region=region, service=service or _service_name(directory),
        memory=memory, cpu=cpu, gpu=gpu, gpu_type=gpu_type, min_instances=min_instances, max_instances=max_instances,
        concurrency=concurrency, timeout=timeout, env=_pairs(env, "--env", _from_environment("env")),
        secret_env=_pairs(secret_env, "--secret", _from_environment("secret_env")),
        service_account=service_account, ingress=ingress, basic_auth=basic_auth, basic_auth_user=basic_auth_user,
        labels=_pairs(labels, "--label", _from_environment("labels")), repository=repository,
        source_bucket=source_bucket, state_bucket=state_bucket, label_studio_url=label_studio_host,
        label_studio_api_key=label_studio_api_key, projects=project_ids, title=title, keep_images=keep_images,
        prune=prune, ready_timeout=wait_timeout, build_region=build_region, enable_apis=enable_apis,
        build_service_account=build_service_account, build_timeout=build_timeout, training=training,
        training_cpu=training_cpu,
        training_memory=training_memory, training_gpu=training_gpu, training_gpu_type=training_gpu_type,
        training_timeout=training_timeout, training_max_retries=training_max_retries,
    )
    # 1. everything checkable before any Google API call
    progress(f"validating {directory}")
    if script:
        from ..blueprints import create as render

        target = directory
        if dry_run:  # DIR stays as it is: render a copy
            import shutil
            import tempfile

            scratch = tempfile.mkdtemp(prefix="lsdeploy-plan-")
            atexit.register(shutil.rmtree, scratch, True)
            target = os.path.join(scratch, os.path.basename(os.path.abspath(directory)))
            if os.path.isdir(directory):
                shutil.copytree(directory, target, symlinks=True)
        kept: list = []
        written = render(target, blueprint=blueprint, script=script, force=True, keep_edited=True, kept=kept)
        progress(f"{'would create' if dry_run else 'created'} {directory} from {script}: {', '.join(written)}")
        if kept:
            progress(f"kept your own or edited {', '.join(kept)} in {directory} (delete a file to have it rendered again)")
        directory = target
    settings.validate()
    progress(f"model class {_model_class_name(directory, progress)}; service {settings.service} in "
             f"{settings.project}/{settings.region}")
    if check:
        _check(GcpProvider(GcpClients.from_env(dict(os.environ), settings.project)), settings, enable_apis, as_json)
        return
    if label_studio_host and label_studio_api_key:
        from ..labelstudio import LabelStudio

        client = LabelStudio(label_studio_host, label_studio_api_key)
        client.whoami()
        for pid in project_ids:
            client.get_project(pid)
        progress(f"Label Studio at {client.shown} accepts the key ({client.key_kind})")
    elif bool(label_studio_host) != bool(label_studio_api_key):
        raise LsdeployError("pass both --label-studio-host and --label-studio-api-key (LABEL_STUDIO_URL, "
                            "LABEL_STUDIO_API_KEY), or neither", EXIT_USAGE)
    # Google credentials (or the endpoint overrides) before any work that needs them
    clients = GcpClients.from_env(dict(os.environ), settings.project)
    if preview:
        _preview(directory, progress)
    # 2. bundle
    bundle = SourceBundle.from_directory(directory, blueprint=blueprint)
    progress(f"bundle {bundle.short_digest}: {len(bundle.files)} files, {bundle.size} bytes, "
             f"Dockerfile: {bundle.dockerfile}")
    provider = GcpProvider(clients)
    if dry_run:
        progress("dry run: reading the live service; nothing will be changed")
        result = provider.plan(settings, bundle)
    else:
        result = provider.deploy(settings, bundle, progress)
    if as_json:
        emit_json(result.to_dict())
        return
    for line in result.lines():
        click.echo(line)


def _check(provider, settings, enable_apis: bool, as_json: bool) -> None:
    """--check: the preflight report; exit 0 when the project is ready, else the deploy's exit code."""
    from ..errors import EXIT_AUTH, EXIT_DEPLOY

    readiness = provider.check(settings, enable=enable_apis, progress=progress)
    if as_json:
        emit_json(readiness.to_dict())
    else:
        for line in readiness.lines():
            click.echo(line)
    if not readiness.ready:
        raise SystemExit(EXIT_AUTH if readiness.missing or readiness.act_as else EXIT_DEPLOY)


def _model_class_name(directory: str, progress) -> str:
    """The backend's model class, imported like the container will. A backend whose packages are
    installed only in its image (torch, transformers...), or one written for the reference SDK
    (label_studio_ml) that brings its own Dockerfile, cannot be imported here: then the class is
    found by reading the source, and the image build installs what it needs."""
    import ast
    from pathlib import Path

    from ..errors import ModelLoadError
    from ..loader import _candidates, load_model_class

    try:
        return load_model_class(directory).__name__
    except ModelLoadError as exc:
        own_dockerfile = (Path(directory) / "Dockerfile").is_file()
        if not ("no module named" in str(exc) or ("label_studio_ml" in str(exc) and own_dockerfile)):
            raise
        found = []
        for path in _candidates(Path(directory)):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            found += [node.name for node in tree.body if isinstance(node, ast.ClassDef) and any(
                (isinstance(b, ast.Name) and b.id == "LabelStudioMLBase")
                or (isinstance(b, ast.Attribute) and b.attr == "LabelStudioMLBase") for b in node.bases)]
        if len(found) != 1:
            raise
        progress(f"note: {exc}; deploying anyway: the image installs the backend's requirements")
        return found[0]


def _service_name(directory: str) -> str:
    import re

    name = re.sub(r"[^a-z0-9-]+", "-", os.path.basename(os.path.abspath(directory)).lower()).strip("-")
    return name or "ml-backend"


def _preview(directory: str, progress) -> None:
    """Pre-flight: run the backend locally once and validate its predictions (lsdeploy.preview)."""
    from ..errors import LsdeployError
    from ..preview import PreviewSettings, label_config_from_directory, run_preview

    found = label_config_from_directory(directory)
    if not found:
        raise LsdeployError(f"--preview needs a label config: put label_config.xml in {directory}", 2)
    progress("preview: running the backend locally once")
    result = run_preview(PreviewSettings(directory=directory, label_config=found[0], label_config_source=found[1],
                                         runner="process", env=dict(os.environ)), progress)
    if not result.ok:
        # the whole problem: its path, message and rule ("results[0].result[0].value.choices[0]: ... [choices]")
        problems = [problem for report in result.reports for problem in report.errors]
        fit_errors = list(result.fit.errors) if result.fit else []
        first = str(problems[0]) if problems else (fit_errors[0] if fit_errors else "")
        raise LsdeployError(f"preview failed: {first or 'see the report'}; run "
                            f"`label-studio-ml preview {directory}` for the full report; nothing was deployed",
                            result.exit_code)
    progress("preview: predictions are valid")
