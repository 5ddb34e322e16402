"""`label-studio-ml train DIR --project P`: drain a project's training queue once, then exit.

The same model, state store and fit path as `start` (MODEL_DIR, or MODEL_STATE_URI for Cloud
Storage): it takes the project's training lock, runs the queued events in order with the queue's
retry rules (an event whose run was interrupted runs again as its next attempt), saves what fit
saves, and exits. It runs on a workstation, in a container, or as a Cloud Run job task (the
execution a server in job mode starts; see docs/training-jobs.md).
"""
from __future__ import annotations

import click

# Exit codes (docs/training-jobs.md). As a Cloud Run job task (CLOUD_RUN_JOB set) NOTHING and
# LOCKED exit 0: any other code makes the execution retry the task.
EXIT_TRAINED = 0
EXIT_NOTHING = 8        # the queue was empty (and --start-training was not given)
EXIT_FIT_FAILED = 9     # a fit failed every attempt: the event is kept as failed (GET /jobs/<id>)
EXIT_LOCKED = 10        # another process holds the project's training lock: it drains the queue
EXIT_STORAGE = 11       # the state store failed, or the lease could not be renewed: events stay queued
EXIT_STOPPED = 143      # SIGTERM or Ctrl-C: the running fit finished, the rest stays queued
JOB_ENV = ("CLOUD_RUN_JOB", "CLOUD_RUN_EXECUTION", "CLOUD_RUN_TASK_INDEX", "CLOUD_RUN_TASK_ATTEMPT",
           "CLOUD_RUN_TASK_COUNT")


@click.command()
@click.argument("directory", type=click.Path(file_okay=False), default=".", metavar="DIR")
@click.option("--project", required=True, envvar="LSDEPLOY_PROJECT", show_envvar=True,
              help="The Label Studio project whose queued training events to run.")
@click.option("--start-training", is_flag=True, default=False,
              help="Queue one START_TRAINING event (what Label Studio's Start Training button sends) and run it "
                   "after the events already queued.")
@click.option("--model", "model", default=None, envvar="LSDEPLOY_MODEL", show_envvar=True, metavar="FILE.py:CLASS",
              help="Model class when DIR has several (default: the one in model.py).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              default="INFO", envvar="LOG_LEVEL", show_envvar=True, help="Log level.")
@click.option("--check-requirements/--no-check-requirements", default=True, envvar="LSDEPLOY_CHECK_REQUIREMENTS",
              show_envvar=True, help="First check that DIR/requirements.txt is installed in this Python.")
def train(directory, project, start_training, model, log_level, check_requirements):
    """Run the queued training events of a project in DIR's backend, in order, then exit.

    Exit codes: 0 trained; 8 nothing to train; 9 a fit failed all its attempts (kept as failed);
    10 another process holds the project's training lock (it drains the queue); 11 the state store
    failed; 143 stopped by SIGTERM (the running fit finished, the rest stays queued). As a Cloud
    Run job task (CLOUD_RUN_JOB set) 8 and 10 are 0, since any other code retries the task.
    """
    import logging
    import os

    from ..errors import EXIT_USAGE, LsdeployError, StateError
    from ..inputs import BadRequest, project_id_of
    from ..serve import check_requirements as check, configure_logging

    configure_logging(log_level)
    log = logging.getLogger("lsdeploy.train")
    try:
        project = project_id_of(project)
    except BadRequest as exc:
        raise LsdeployError(f"--project {project!r}: {exc}", EXIT_USAGE) from None
    if not project:
        raise LsdeployError("--project is empty: give the Label Studio project id", EXIT_USAGE)
    if check_requirements:
        check(directory)
    task = {name: os.environ.get(name) for name in JOB_ENV if os.environ.get(name)}
    as_job = bool(task.get("CLOUD_RUN_JOB"))
    if as_job:
        log.info("Cloud Run job %s, execution %s, task %s of %s, attempt %s: training project %s",
                 task.get("CLOUD_RUN_JOB"), task.get("CLOUD_RUN_EXECUTION", "?"), task.get("CLOUD_RUN_TASK_INDEX", "0"),
                 task.get("CLOUD_RUN_TASK_COUNT", "1"), task.get("CLOUD_RUN_TASK_ATTEMPT", "0"), project)
    try:
        code = _train(directory, project, start_training, model, task, log)
    except StateError as exc:
        raise LsdeployError(f"training project {project} stopped: {exc}; its events stay queued", EXIT_STORAGE) \
            from None
    if as_job and code in (EXIT_NOTHING, EXIT_LOCKED):
        return 0
    return code


def _train(directory, project, start_training, model, task, log) -> int:
    import json
    import os
    import signal
    import socket

    from ..loader import load_model_class
    from ..server import create_app
    from ..state import default_store
    from ..state.reference import import_reference_state

    model_class = load_model_class(directory, model)
    os.environ.setdefault("MODEL_DIR", os.path.join(os.path.abspath(directory), ".lsdeploy"))
    store = default_store()  # one line, exit 11, when the store is unusable
    import_reference_state(store, os.environ.get("MODEL_DIR"), directory)
    app = create_app(model_class, store=store, training="service")
    trainer = app.extensions["lsdeploy"]["trainer"]
    queue = trainer.queue

    def stop(signum, frame):
        log.warning("%s: the running fit finishes, then the rest stays queued", signal.Signals(signum).name)
        trainer.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # not KeyboardInterrupt: that would count as the fit failing

    execution = task.get("CLOUD_RUN_EXECUTION")
    if execution:
        runner = f"{execution}/task-{task.get('CLOUD_RUN_TASK_INDEX', '0')}/attempt-{task.get('CLOUD_RUN_TASK_ATTEMPT', '0')}"
    else:
        runner = f"{socket.gethostname()}-{os.getpid()}"

    def responsible() -> bool:
        """Job mode: this execution must wait for the lock (see JobQueue.drains)."""
        return bool(execution) and queue.drains(project, execution)

    if start_training:
        label_config = store.get(project, "label_config")
        body = json.dumps({"project": project, "label_config": label_config, "annotations": [], "params": {}})
        entry = queue.enqueue(project, "train", "START_TRAINING", body.encode())
        log.info("START_TRAINING queued for project %s as job %s-%s", project, project, entry["id"])
    ended = trainer.drain_project(project, runner, responsible)
    done, failed, retried = (trainer.outcomes[k] for k in ("done", "failed", "retrying"))
    failed += queue.interrupted_failed  # interrupted TRAINING_MAX_ATTEMPTS times: kept as failed too
    summary = f"project {project}: {done} event(s) trained, {failed} kept as failed, {retried} failed attempt(s) retried"
    store.close()
    if ended == "locked":
        log.info("another process holds project %s's training lock: it drains the queue (%s)", project, summary)
        return EXIT_LOCKED
    if ended == "lease lost":
        log.error("the training lease of project %s could not be renewed (storage does not answer): the rest "
                  "stays queued (%s)", project, summary)
        return EXIT_STORAGE
    if ended == "stopped":
        log.warning("stopped: %s; the rest stays queued", summary)
        return EXIT_STOPPED
    if failed:
        log.error("%s (GET /jobs/<id> on the server, or POST /jobs/<id>/retry)", summary)
        return EXIT_FIT_FAILED
    if not done:
        log.info("nothing to train for project %s", project)
        return EXIT_NOTHING
    log.info("done: %s", summary)
    return EXIT_TRAINED
