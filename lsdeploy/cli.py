"""The `label-studio-ml` command. Subcommands live in lsdeploy/commands/, imported only
when run, so `--help` answers fast and a command's heavy imports cost only that command."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback

import click

from .errors import EXIT_ERROR, EXIT_USAGE, LsdeployError

# name -> (module, attribute, one-line help shown by --help without importing the module)
COMMANDS = {
    "create": ("lsdeploy.commands.create", "create", "Render a backend directory from a blueprint."),
    "start": ("lsdeploy.commands.start", "start", "Serve a backend directory under gunicorn."),
    "train": ("lsdeploy.commands.train", "train", "Run a project's queued training events once, then exit."),
    "connect": ("lsdeploy.commands.connect", "connect", "Register a running backend with Label Studio projects."),
    "disconnect": ("lsdeploy.commands.connect", "disconnect", "Remove a backend (and its webhook) from Label Studio."),
    "port": ("lsdeploy.commands.port", "port", "Port a label_studio_ml backend to lsdeploy, in place."),
    "preview": ("lsdeploy.commands.preview", "preview", "Run a backend once and validate its predictions."),
    "deploy": ("lsdeploy.commands.deploy", "deploy", "Deploy a backend to a cloud provider."),
    "status": ("lsdeploy.commands.ops", "status", "Show what a deployed backend (Cloud Run) runs now."),
    "rollback": ("lsdeploy.commands.ops", "rollback", "Send a deployed backend's traffic back to a previous revision."),
    "destroy": ("lsdeploy.commands.ops", "destroy", "Delete a deployed backend (and with --purge its images and data)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name, (module, _, _) in COMMANDS.items() if _module_exists(module)]

    def get_command(self, ctx, name):
        if name not in COMMANDS or not _module_exists(COMMANDS[name][0]):
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _module_exists(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="lsdeploy", prog_name="label-studio-ml")
@click.option("--debug", is_flag=True, envvar="LSDEPLOY_DEBUG", show_envvar=True,
              help="Show tracebacks for errors.")
def cli(debug):
    """Write, serve, preview and deploy Label Studio ML backends."""


def _wants_debug(argv) -> bool:
    return "--debug" in argv or os.environ.get("LSDEPLOY_DEBUG", "").lower() in ("1", "true", "yes")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _wants_debug(argv)
    try:
        result = cli.main(args=argv, prog_name="label-studio-ml", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            click.echo("interrupted", err=True)
            sys.exit(130)
        click.echo("aborted", err=True)
        sys.exit(EXIT_ERROR)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code if exc.exit_code else EXIT_USAGE)
    except LsdeployError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the user sees one line, --debug shows all
        if debug:
            traceback.print_exc()
        click.echo(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
        sys.exit(EXIT_ERROR)
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
