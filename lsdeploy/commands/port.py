"""`label-studio-ml port DIR`: make a backend written for the reference SDK an lsdeploy backend."""
from __future__ import annotations

import click


@click.command()
@click.argument("directory", type=click.Path(), metavar="DIR")
@click.option("--dry-run", is_flag=True, envvar="LSDEPLOY_DRY_RUN", show_envvar=True,
              help="Print the changes as a unified diff; change nothing.")
@click.option("--json", "as_json", is_flag=True, envvar="LSDEPLOY_JSON", show_envvar=True,
              help="Print the result as one JSON object.")
def port(directory, dry_run, as_json):
    """Port a backend written for label_studio_ml (the reference SDK) in DIR to lsdeploy, in place:
    its imports, the reference's TRAIN_EVENTS on its model class, its requirements (lsdeploy[sdk]
    when it uses label-studio-sdk), and a Dockerfile that installs the reference SDK (replaced by
    lsdeploy's, its apt packages kept, with wheels/). What it cannot port is listed with file:line.
    Running it again on a ported DIR changes nothing."""
    import os
    import shlex

    from ..port import port as run_port

    result = run_port(directory, dry_run=dry_run)
    status = ("would change" if dry_run else "ported") if result.changes else "unchanged"
    start = f"label-studio-ml start {shlex.quote(directory)} --port 9090"
    unported = [str(u) for u in result.unported]
    if as_json:
        from . import emit_json

        out = {"directory": os.path.abspath(directory), "status": status, "dry_run": dry_run,
               "files": result.written, "model_class": result.model_class, "uses_sdk": result.uses_sdk,
               "not_ported": [{"path": u.path, "line": u.line, "what": u.what} for u in result.unported],
               "start": start}
        if dry_run:
            out["diff"] = result.diff()
        emit_json(out)
        return
    if dry_run:
        diff = result.diff()
        if diff:
            click.echo(diff, nl=False)
    if not result.changes:
        if result.was_ported:
            click.echo(f"{directory} is ported already: nothing to change")
        elif result.uses_reference:
            click.echo(f"{directory}: nothing port can change")
        else:
            click.echo(f"{directory} does not use label_studio_ml: nothing to port")
    elif dry_run:
        click.echo(f"would change {', '.join(result.written)} in {directory} (dry run: nothing written)")
    else:
        click.echo(f"ported {directory}: {', '.join(result.written)}")
    if unported:
        click.echo(f"not ported ({len(unported)}), change by hand:")
        for line in unported:
            click.echo(f"  {line}")
    if result.changes and not dry_run:
        if result.uses_sdk:
            click.echo("it uses label-studio-sdk: requirements.txt lists lsdeploy[sdk] (about 450 MB installed)")
        click.echo(f"next: {start}")
