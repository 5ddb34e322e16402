"""`label-studio-ml connect` / `disconnect`: register a running backend with Label Studio projects."""
from __future__ import annotations

import click

from . import emit_json, label_studio_options, progress, secret_file_option


def _projects(values, required: bool = True) -> list:
    """--project 1 --project 2, or LABEL_STUDIO_PROJECT="1,2" / "1 2"."""
    projects = []
    for value in values or ():
        for part in str(value).replace(",", " ").split():
            if not part.isdigit():
                raise click.BadParameter(f"{part!r} is not a project id (a number)", param_hint="--project")
            projects.append(int(part))
    if not projects and required:
        raise click.UsageError("no project: pass --project ID (or set LABEL_STUDIO_PROJECT)")
    return list(dict.fromkeys(projects))


def _project_option(fn):
    return click.option(
        "--project", "projects", multiple=True, envvar="LABEL_STUDIO_PROJECT", show_envvar=True, metavar="ID",
        help="Label Studio project id; repeat for several (the variable takes \"1,2\").",
    )(fn)


@click.command()
@click.argument("url", envvar="LSDEPLOY_BACKEND_URL", metavar="URL")
@label_studio_options()
@_project_option
@click.option("--title", envvar="LSDEPLOY_TITLE", show_envvar=True, default=None,
              help="Backend title in Label Studio (a backend with this title is updated, not duplicated); "
                   "an existing backend keeps its title when not given.")
@click.option("--basic-auth-user", envvar="BASIC_AUTH_USER", show_envvar=True, default=None,
              help="User of the backend's basic auth (also sent by the project webhook).")
@click.option("--basic-auth-pass", envvar="BASIC_AUTH_PASS", show_envvar=True, default=None,
              help="Password of the backend's basic auth (prefer the environment variable or "
                   "--basic-auth-pass-file: argv is visible to other users).")
@secret_file_option("--basic-auth-pass", "BASIC_AUTH_PASS_FILE", "the backend's basic auth password")
@click.option("--interactive/--no-interactive", envvar="LSDEPLOY_INTERACTIVE", show_envvar=True, default=None,
              help="Use the backend for interactive pre-annotation (a new backend: off; an existing one keeps "
                   "what Label Studio has when neither is given).")
@click.option("--scores/--no-scores", "use_version", envvar="LSDEPLOY_SCORES", show_envvar=True, default=None,
              help="Point the project's predictions (Settings > Annotation > Prelabeling) at the backend's model "
                   "version, so the Data Manager shows its prediction scores. Without either, only a project on "
                   "no version or on this backend's title is moved; --scores moves one on another version too "
                   "(after the model retrained); --no-scores leaves the choice as Label Studio has it.")
@click.option("--verify/--no-verify", envvar="LSDEPLOY_VERIFY", show_envvar=True, default=True,
              help="Check state, model version and a test prediction before reporting success.")
@click.option("--timeout", type=float, default=30.0, envvar="LABEL_STUDIO_TIMEOUT", show_envvar=True,
              help="Seconds to wait for each Label Studio request.")
@click.option("--json", "as_json", is_flag=True, envvar="LSDEPLOY_JSON", show_envvar=True,
              help="Print the result as JSON.")
def connect(url, label_studio_host, label_studio_api_key, projects, title, basic_auth_user, basic_auth_pass,
            interactive, use_version, verify, timeout, as_json):
    """Register the backend at URL with Label Studio projects (create or update, never duplicate).

    The backend must be reachable from Label Studio's machine. With basic auth, the project
    webhook gets the same credentials, so annotation events reach the backend. URL may also
    come from LSDEPLOY_BACKEND_URL.
    """
    from ..errors import EXIT_USAGE, LsdeployError
    from ..labelstudio import LabelStudio

    project_ids = _projects(projects)
    if bool(basic_auth_user) != bool(basic_auth_pass):
        raise LsdeployError("basic auth needs both --basic-auth-user and --basic-auth-pass or "
                            "--basic-auth-pass-file (BASIC_AUTH_USER / BASIC_AUTH_PASS)", EXIT_USAGE)
    client = LabelStudio(label_studio_host, label_studio_api_key, timeout=timeout)
    progress(f"registering {url.rstrip('/')} with project(s) {', '.join(map(str, project_ids))} on "
             f"{client.shown} ({client.key_kind})")
    registrations = client.register(
        url, project_ids, title=title, basic_auth=(basic_auth_user, basic_auth_pass) if basic_auth_user else None,
        interactive=interactive, verify=verify, use_version=use_version,
    )
    for reg in registrations:
        if reg.note:
            progress(f"project {reg.project}: {reg.note}")
    if as_json:
        emit_json({"label_studio": client.shown, "registrations": [r.to_dict() for r in registrations]})
        return
    for reg in registrations:
        test = reg.test_prediction["detail"] if reg.test_prediction else "not run"
        click.echo(f"project {reg.project}: backend {reg.backend_id} {'created' if reg.created else 'updated'}, "
                   f"state {reg.state or '?'}, model version {reg.model_version or '?'}, test prediction: {test}"
                   + (", webhook with basic auth" if reg.basic_auth else ""))


@click.command()
@click.argument("url", required=False, envvar="LSDEPLOY_BACKEND_URL", metavar="[URL]")
@label_studio_options()
@_project_option
@click.option("--backend-id", type=int, default=None, envvar="LSDEPLOY_BACKEND_ID", show_envvar=True,
              help="Remove the backend with this id instead of matching URL (its project unless --project).")
@click.option("--timeout", type=float, default=30.0, envvar="LABEL_STUDIO_TIMEOUT", show_envvar=True,
              help="Seconds to wait for each Label Studio request.")
@click.option("--json", "as_json", is_flag=True, envvar="LSDEPLOY_JSON", show_envvar=True,
              help="Print the result as JSON.")
def disconnect(url, label_studio_host, label_studio_api_key, projects, backend_id, timeout, as_json):
    """Remove the backend at URL (or --backend-id) and its webhook from Label Studio projects.

    URL may also come from LSDEPLOY_BACKEND_URL. With --backend-id, --project may be left out:
    the backend's own project is used.
    """
    from ..labelstudio import LabelStudio

    if not url and backend_id is None:
        raise click.UsageError("say which backend to remove: URL or --backend-id")
    project_ids = _projects(projects, required=backend_id is None)
    client = LabelStudio(label_studio_host, label_studio_api_key, timeout=timeout)
    removals = client.unregister(project_ids, url=url, backend_id=backend_id)
    if as_json:
        emit_json({"label_studio": client.shown, "removed": [r.to_dict() for r in removals]})
        return
    if not removals:
        click.echo(f"Label Studio has no ML backend {backend_id} (nothing to remove)")
    for removal in removals:
        if removal.backend_ids or removal.webhook_ids:
            click.echo(f"project {removal.project}: removed backend(s) {removal.backend_ids or 'none'}, "
                       f"webhook(s) {removal.webhook_ids or 'none'}")
        else:
            click.echo(f"project {removal.project}: no such backend (nothing to remove)")
