"""`label-studio-ml start DIR`: serve a backend the way its container does."""
from __future__ import annotations

import click

from . import secret_file_option


@click.command()
@click.argument("directory", type=click.Path(file_okay=False), default=".", metavar="DIR")
@click.option("-p", "--port", type=click.IntRange(1, 65535), default=9090, envvar="PORT", show_envvar=True,
              help="Port to listen on.")
@click.option("--host", default=None, envvar="HOST", show_envvar=True,
              help="Address to listen on. Default: 127.0.0.1 (this machine only); inside a container "
                   "(/.dockerenv, /run/.containerenv, Cloud Run, Kubernetes) 0.0.0.0, every interface. "
                   "A non-loopback address without basic auth is warned about at start.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, envvar="WORKERS", show_envvar=True,
              help="gunicorn worker processes.")
@click.option("--threads", type=click.IntRange(1, 256), default=8, envvar="THREADS", show_envvar=True,
              help="Threads per worker.")
@click.option("--model", "model", default=None, envvar="LSDEPLOY_MODEL", show_envvar=True, metavar="FILE.py:CLASS",
              help="Model class to serve when DIR has several (default: the one in model.py).")
@click.option("--basic-auth-user", envvar="BASIC_AUTH_USER", show_envvar=True, default=None,
              help="Require basic auth with this user (everything but GET /health).")
@click.option("--basic-auth-pass", envvar="BASIC_AUTH_PASS", show_envvar=True, default=None,
              help="Basic auth password (prefer the environment variable or --basic-auth-pass-file: argv is "
                   "visible to other users).")
@secret_file_option("--basic-auth-pass", "BASIC_AUTH_PASS_FILE", "the basic auth password")
@click.option("--client-timeout", type=click.FloatRange(0.1, 3600), default=30.0, envvar="CLIENT_TIMEOUT",
              show_envvar=True, help="Seconds a client has to send each whole request (headers and body); also the longest it may stall reading an answer.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              default="INFO", envvar="LOG_LEVEL", show_envvar=True, help="Log level.")
@click.option("--check-requirements/--no-check-requirements", default=True, envvar="LSDEPLOY_CHECK_REQUIREMENTS",
              show_envvar=True, help="Before serving, check that DIR/requirements.txt is installed in this Python.")
@click.option("--debug", is_flag=True, default=False, help="Flask's reloading development server, full tracebacks.")
def start(directory, port, host, workers, threads, model, basic_auth_user, basic_auth_pass, client_timeout, log_level,
          check_requirements, debug):
    """Serve the backend in DIR under gunicorn (the same command its container runs).

    Listens on 127.0.0.1, this machine only, unless --host (HOST) says otherwise or it runs in
    a container (then on 0.0.0.0). Refuses to start while DIR/requirements.txt is not installed.
    State is kept in SQLite under MODEL_DIR (default DIR/.lsdeploy), or in Cloud Storage when
    MODEL_STATE_URI=gs://BUCKET/PREFIX. Stops cleanly on SIGTERM: in-flight requests and queued
    training finish first (up to 8 s).
    """
    import os

    from ..errors import EXIT_USAGE, LsdeployError
    from ..serve import ServeSettings, default_host, run

    if bool(basic_auth_user) != bool(basic_auth_pass):
        raise LsdeployError("basic auth needs both --basic-auth-user and --basic-auth-pass or "
                            "--basic-auth-pass-file (BASIC_AUTH_USER / BASIC_AUTH_PASS)", EXIT_USAGE)
    run(ServeSettings(
        directory=directory, port=port, host=host or default_host(os.environ), workers=workers, threads=threads,
        model=model, basic_auth=(basic_auth_user, basic_auth_pass) if basic_auth_user else None,
        log_level=log_level.upper(), debug=debug, client_timeout=client_timeout, check_requirements=check_requirements,
    ))
