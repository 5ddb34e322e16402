"""One module per CLI command. Shared option groups and output helpers live here."""
from __future__ import annotations

import functools
import json
import sys

import click


def read_secret(value, path, option: str):
    """A secret given as `option` (or its environment variable) or, preferably, in a file
    (`option`-file: nothing in argv, which every user of the machine can read in `ps`). The file's
    content is the secret, one trailing newline dropped."""
    if path is None:
        return value
    if value:
        raise click.UsageError(f"give {option} or {option}-file, not both")
    try:
        with open(path, encoding="utf-8") as handle:
            secret = handle.read()
    except OSError as exc:
        raise click.UsageError(f"{option}-file {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise click.UsageError(f"{option}-file {path}: not UTF-8 text") from None
    secret = secret[:-1] if secret.endswith("\n") else secret
    secret = secret[:-1] if secret.endswith("\r") else secret
    if not secret:
        raise click.UsageError(f"{option}-file {path} is empty: write the secret in it")
    return secret


def secret_file_option(option: str, envvar: str, what: str):
    """`--X-file` beside a secret option `--X`: the parameter `x_file` is folded into `x` (see
    read_secret) before the command runs."""
    name = option.lstrip("-").replace("-", "_")

    def decorate(fn):
        @functools.wraps(fn)
        def command(*args, **kwargs):
            kwargs[name] = read_secret(kwargs.get(name), kwargs.pop(name + "_file", None), option)
            return fn(*args, **kwargs)

        return click.option(f"{option}-file", name + "_file", envvar=envvar, show_envvar=True, default=None,
                            type=click.Path(dir_okay=False), metavar="FILE",
                            help=f"A file holding {what} (preferred: nothing in argv).")(command)

    return decorate


def label_studio_options(required: bool = True):
    """--label-studio-host / --label-studio-api-key (or --label-studio-api-key-file), also read
    from the environment."""

    def decorate(fn):
        @functools.wraps(fn)
        def command(*args, **kwargs):
            if required and not kwargs.get("label_studio_api_key"):
                raise click.UsageError("Missing option '--label-studio-api-key': give it, or "
                                       "--label-studio-api-key-file, or LABEL_STUDIO_API_KEY")
            return fn(*args, **kwargs)

        command = secret_file_option("--label-studio-api-key", "LABEL_STUDIO_API_KEY_FILE",
                                     "the Label Studio API key")(command)
        command = click.option(
            "--label-studio-api-key", "label_studio_api_key", envvar="LABEL_STUDIO_API_KEY",
            show_envvar=True, default=None,
            help="Label Studio API key: a legacy token or a personal access token (prefer the "
                 "environment variable or --label-studio-api-key-file: argv is visible to other users).",
        )(command)
        command = click.option(
            "--label-studio-host", "--label-studio-url", "label_studio_host",
            envvar=["LABEL_STUDIO_URL", "LABEL_STUDIO_HOST"], show_envvar=True, required=required,
            help="Label Studio address, for example http://localhost:8080.",
        )(command)
        return command

    return decorate


def progress(message: str) -> None:
    """A progress line: always on stderr, so --json output on stdout stays one object."""
    click.echo(message, err=True)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()
