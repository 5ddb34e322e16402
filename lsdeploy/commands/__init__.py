"""One module per CLI command. Shared option groups and output helpers live here."""
from __future__ import annotations

import json
import sys

import click


def label_studio_options(required: bool = True):
    """--label-studio-host / --label-studio-api-key, also read from the environment."""

    def decorate(fn):
        fn = click.option(
            "--label-studio-api-key", "label_studio_api_key", envvar="LABEL_STUDIO_API_KEY",
            show_envvar=True, required=required,
            help="Label Studio API key: a legacy token or a personal access token.",
        )(fn)
        fn = click.option(
            "--label-studio-host", "--label-studio-url", "label_studio_host",
            envvar=["LABEL_STUDIO_URL", "LABEL_STUDIO_HOST"], show_envvar=True, required=required,
            help="Label Studio address, for example http://localhost:8080.",
        )(fn)
        return fn

    return decorate


def progress(message: str) -> None:
    """A progress line: always on stderr, so --json output on stdout stays one object."""
    click.echo(message, err=True)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()
