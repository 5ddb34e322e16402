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
@click.option("--json", "as_json", is_flag=True, envvar="LSDEPLOY_JSON", show_envvar=True,
              help="Print the result as one JSON object.")
def create(directory, blueprint, script, force, as_json):
    """Render a new backend into DIR: model.py, Dockerfile, docker-compose.yml, _wsgi.py,
    README.md, requirements.txt, .dockerignore, label_config.xml and wheels/ (this lsdeploy)."""
    from ..blueprints import create as render

    written = render(directory, blueprint=blueprint, script=script, force=force)
    if as_json:
        import os

        from . import emit_json

        emit_json({"directory": os.path.abspath(directory), "blueprint": blueprint, "from": script,
                   "files": written, "start": f"label-studio-ml start {directory} --port 9090"})
        return
    click.echo(f"created {directory} from the {blueprint} blueprint: {', '.join(written)}")
    click.echo(f"next: label-studio-ml start {directory} --port 9090")
