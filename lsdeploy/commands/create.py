"""`label-studio-ml create DIR`: render a backend from a blueprint."""
from __future__ import annotations

import click


@click.command()
@click.argument("directory", type=click.Path(file_okay=False), metavar="DIR")
@click.option("--blueprint", "-b", default="default", envvar="LSDEPLOY_BLUEPRINT", show_envvar=True,
              help="Blueprint to render: default, text-classifier, interactive-ner.")
@click.option("--from", "script", default=None, envvar="LSDEPLOY_FROM", show_envvar=True, metavar="SCRIPT.py[:CLASS]",
              help="Build the backend around an existing model script instead of the blueprint's model.py.")
@click.option("--force", is_flag=True, envvar="LSDEPLOY_FORCE", show_envvar=True,
              help="Overwrite files in a non-empty DIR.")
@click.option("--json", "as_json", is_flag=True, envvar="LSDEPLOY_JSON", show_envvar=True,
              help="Print the result as one JSON object.")
def create(directory, blueprint, script, force, as_json):
    """Render a new backend into DIR: model.py, Dockerfile, docker-compose.yml, _wsgi.py,
    README.md, requirements.txt, .dockerignore, label_config.xml and wheels/ (this lsdeploy).

    Running it again on a DIR it created, with the same options, changes nothing (or brings
    the files up to date with this lsdeploy) as long as you have not changed them; a DIR with
    your changes needs --force."""
    import os
    import shlex

    from ..blueprints import render
    from ..requirements import install_command, unmet_requirements

    result = render(directory, blueprint=blueprint, script=script, force=force)
    requirements = os.path.join(directory, "requirements.txt")
    missing = unmet_requirements(requirements) if result.requirements else []
    install = install_command(requirements) if result.requirements else None
    start = f"label-studio-ml start {shlex.quote(directory)} --port 9090"
    if as_json:
        from . import emit_json

        emit_json({"directory": os.path.abspath(directory), "blueprint": blueprint, "from": script,
                   "status": result.status, "files": result.written, "requirements": result.requirements,
                   "missing": missing, "install": install, "start": start})
        return
    if result.status == "unchanged":
        click.echo(f"{directory} was created from the {blueprint} blueprint and is unchanged: nothing to do")
    elif result.status == "updated":
        click.echo(f"updated {directory} to this lsdeploy (you had not changed it): {', '.join(result.written)}")
    else:
        click.echo(f"created {directory} from the {blueprint} blueprint: {', '.join(result.written)}")
    if missing:
        click.echo(f"next: install its requirements ({'; '.join(missing)}): {install}")
        click.echo(f"then: {start}")
        return
    if result.requirements:
        click.echo(f"its requirements ({', '.join(result.requirements)}) are installed in this Python")
    click.echo(f"next: {start}")
