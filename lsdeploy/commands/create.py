"""`label-studio-ml create DIR`: render a backend from a blueprint."""
from __future__ import annotations

import click


@click.command()
@click.argument("directory", type=click.Path(file_okay=False), metavar="DIR")
@click.option("--blueprint", "-b", default="default", envvar="LSDEPLOY_BLUEPRINT", show_envvar=True,
              help="Blueprint to render: default, text-classifier.")
@click.option("--from", "script", default=None, envvar="LSDEPLOY_FROM", show_envvar=True, metavar="SCRIPT.py[:CLASS]",
              help="Build the backend around an existing model script instead of the blueprint's model.py.")
@click.option("--force", is_flag=True, envvar="LSDEPLOY_FORCE", show_envvar=True,
              help="Overwrite files in a non-empty DIR.")
def create(directory, blueprint, script, force):
    """Render a new backend into DIR: model.py, Dockerfile, docker-compose.yml, _wsgi.py,
    README.md, requirements.txt, .dockerignore, label_config.xml and wheels/ (this lsdeploy)."""
    from ..blueprints import create as render

    written = render(directory, blueprint=blueprint, script=script, force=force)
    click.echo(f"created {directory} from the {blueprint} blueprint: {', '.join(written)}")
    click.echo(f"next: label-studio-ml start {directory} --port 9090")
