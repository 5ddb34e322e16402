"""`label-studio-ml status|rollback|destroy SERVICE`: operate a deployed backend (Cloud Run).

Non-interactive by design: every option reads an environment variable, `--json` prints one
object on stdout (progress on stderr), and destroy asks for confirmation only on a terminal
(elsewhere it needs --yes).
"""
from __future__ import annotations

import os
import sys

import click

from . import emit_json, label_studio_options, progress


def _option(*names, envvar, **kwargs):
    return click.option(*names, envvar=envvar, show_envvar=True, **kwargs)


def gcp_options(fn):
    """The options every operation on a deployed gcp service shares."""
    for decorate in reversed([
        click.argument("service", envvar="LSDEPLOY_SERVICE"),
        _option("--gcp-project-id", "project", envvar=["GCP_PROJECT", "GOOGLE_CLOUD_PROJECT"], required=True,
                help="Google Cloud project id."),
        _option("--gcp-region", "region", envvar="GCP_REGION", default="us-central1", help="Cloud Run region."),
        label_studio_options(required=False),
        _option("--project", "projects", envvar="LABEL_STUDIO_PROJECT", multiple=True, metavar="ID",
                help="Label Studio project the backend is registered with; repeat for several."),
        _option("--repository", envvar="LSDEPLOY_REPOSITORY", default="lsdeploy", help="Artifact Registry repository."),
        _option("--source-bucket", envvar="LSDEPLOY_SOURCE_BUCKET", default=None,
                help="Bucket of source bundles (default: PROJECT-lsdeploy-sources)."),
        _option("--state-bucket", envvar="LSDEPLOY_STATE_BUCKET", default=None,
                help="Bucket of model state (default: PROJECT-lsdeploy-state)."),
        _option("--wait-timeout", envvar="LSDEPLOY_WAIT_TIMEOUT", type=click.IntRange(1, 86400), default=900,
                metavar="SECONDS", help="How long to wait for Cloud Run to move traffic or delete the service."),
        _option("--json", "as_json", envvar="LSDEPLOY_JSON", is_flag=True, help="Print the result as one JSON object."),
    ]):
        fn = decorate(fn)
    return fn


def _provider(opts: dict):
    """(provider, settings) from the shared options; nothing is sent before this returns."""
    from ..errors import EXIT_USAGE, LsdeployError
    from ..providers.gcp import GcpClients, GcpProvider, GcpSettings
    from .connect import _projects

    host, key = opts["label_studio_host"], opts["label_studio_api_key"]
    if bool(host) != bool(key):
        raise LsdeployError("pass both --label-studio-host and --label-studio-api-key (LABEL_STUDIO_URL, "
                            "LABEL_STUDIO_API_KEY), or neither", EXIT_USAGE)
    projects = _projects(opts["projects"]) if opts["projects"] else []
    if projects and not host:
        raise LsdeployError("--project needs --label-studio-host and --label-studio-api-key (LABEL_STUDIO_URL, "
                            "LABEL_STUDIO_API_KEY)", EXIT_USAGE)
    settings = GcpSettings(project=opts["project"], region=opts["region"], service=opts["service"],
                           repository=opts["repository"], source_bucket=opts["source_bucket"],
                           state_bucket=opts["state_bucket"], label_studio_url=host, label_studio_api_key=key,
                           projects=projects, ready_timeout=opts["wait_timeout"])
    settings.validate()
    return settings, lambda: GcpProvider(GcpClients.from_env(dict(os.environ), settings.project))


def _render(result, as_json: bool) -> None:
    if as_json:
        emit_json(result.to_dict())
        return
    for line in result.lines():
        click.echo(line)


@click.command()
@gcp_options
def status(**opts):
    """What runs now: URL, ready state, serving image, traffic, every revision, last deploy, Label Studio state.

    Exit code 0 when the service is ready, 5 when it is not ready or not deployed.
    """
    from ..errors import EXIT_DEPLOY

    settings, make = _provider(opts)
    result = make().status(settings)
    _render(result, opts["as_json"])
    if not (result.exists and result.ready):
        sys.exit(EXIT_DEPLOY)


@click.command()
@gcp_options
@_option("--to-revision", envvar="LSDEPLOY_TO_REVISION", default=None, metavar="REVISION",
         help="Revision to send all traffic to (default: the previous ready one).")
def rollback(to_revision, **opts):
    """Send all traffic back to the previous ready revision (or --to-revision) and confirm it."""
    settings, make = _provider(opts)
    result = make().rollback(settings, to_revision=to_revision, progress=progress)
    _render(result, opts["as_json"])


@click.command()
@gcp_options
@_option("--purge", envvar="LSDEPLOY_PURGE", is_flag=True,
         help="Also delete the service's images, uploaded source bundles and model state.")
@_option("--yes", "-y", "yes", envvar="LSDEPLOY_YES", is_flag=True,
         help="Do not ask for confirmation (required when stdin is not a terminal).")
def destroy(purge, yes, **opts):
    """Unregister from Label Studio, delete the service and its secrets (--purge: images, sources, state)."""
    from ..errors import EXIT_USAGE, LsdeployError

    interactive = sys.stdin is not None and sys.stdin.isatty()
    if not yes and not interactive:
        raise LsdeployError("destroy deletes the service and its secrets and stdin is not a terminal to confirm "
                            "it: pass --yes (or set LSDEPLOY_YES=1)", EXIT_USAGE)
    settings, make = _provider(opts)
    provider = make()
    if not yes:
        summary = provider.destroy_plan(settings, purge=purge)
        if not any(True for _ in summary.deleted):
            progress(f"nothing of service {settings.service} to delete in {settings.project}/{settings.region}")
        for name in summary.deleted:
            progress(f"will delete {name}")
        for name in summary.kept:
            progress(f"will keep {name}")
        if settings.projects:
            progress(f"will remove the backend from Label Studio project(s) {', '.join(map(str, settings.projects))}")
        if not click.confirm(f"destroy {settings.service}?", default=False, err=True):
            raise LsdeployError("nothing was deleted", EXIT_USAGE)
    result = provider.destroy(settings, purge=purge, progress=progress)
    _render(result, opts["as_json"])
