"""`label-studio-ml preview DIR`: run a backend once and prove its predictions are valid."""
from __future__ import annotations

import os
import signal

import click

from . import emit_json, label_studio_options, progress


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False), default=".", metavar="DIR")
@click.option("--label-config", "label_config_file", type=click.Path(dir_okay=False), default=None,
              envvar="LSDEPLOY_LABEL_CONFIG", show_envvar=True, metavar="FILE",
              help="Label config XML (default: DIR/label_config.xml, or the first <View> in DIR/README.md).")
@click.option("--tasks", "tasks_file", type=click.Path(dir_okay=False), default=None, envvar="LSDEPLOY_TASKS",
              show_envvar=True, metavar="FILE",
              help="Tasks to predict, in Label Studio's import format (default: sample tasks made from the "
                   "label config's object tags).")
@click.option("--fit", "fit_file", type=click.Path(dir_okay=False), default=None, envvar="LSDEPLOY_FIT",
              show_envvar=True, metavar="ANNOTATIONS_FILE",
              help="Also send these annotations (a Label Studio JSON export) as ANNOTATION_CREATED webhooks "
                   "and show the model version before and after.")
@click.option("--json", "as_json", is_flag=True, envvar="LSDEPLOY_JSON", show_envvar=True,
              help="Print one JSON object on stdout (progress goes to stderr).")
@label_studio_options(required=False)
@click.option("--project", "project", type=int, default=None, envvar="LABEL_STUDIO_PROJECT", show_envvar=True,
              help="Read the label config from this Label Studio project (needs --label-studio-host and "
                   "--label-studio-api-key).")
@click.option("--runner", type=click.Choice(["auto", "docker", "process"]), default="auto",
              envvar="LSDEPLOY_PREVIEW_RUNNER", show_envvar=True,
              help="auto: build and run DIR's Dockerfile when a Docker engine answers, else a local process.")
@click.option("--docker", "docker", default="docker", envvar="LSDEPLOY_DOCKER", show_envvar=True,
              help="Docker-compatible client to use (docker, podman).")
@click.option("--model", "model", default=None, envvar="LSDEPLOY_MODEL", show_envvar=True, metavar="FILE.py:CLASS",
              help="Model class to serve when DIR has several.")
@click.option("--samples", type=click.IntRange(1, 100), default=2, envvar="LSDEPLOY_PREVIEW_SAMPLES",
              show_envvar=True, help="Number of sample tasks generated when --tasks is not given.")
@click.option("--startup-timeout", type=click.FloatRange(1, 3600), default=120.0,
              envvar="LSDEPLOY_STARTUP_TIMEOUT", show_envvar=True, help="Seconds to wait for /health.")
@click.option("--predict-timeout", type=click.FloatRange(1, 3600), default=100.0,
              envvar="LSDEPLOY_PREDICT_TIMEOUT", show_envvar=True,
              help="Seconds /predict may take (Label Studio's ML_TIMEOUT_PREDICT is 100).")
@click.option("--fit-timeout", type=click.FloatRange(0, 3600), default=120.0, envvar="LSDEPLOY_FIT_TIMEOUT",
              show_envvar=True, help="Seconds to wait for background training after --fit.")
def preview(directory, label_config_file, tasks_file, fit_file, as_json, label_studio_host, label_studio_api_key,
            project, runner, docker, model, samples, startup_timeout, predict_timeout, fit_timeout):
    """Start the backend in DIR the way its container runs, send /setup and /predict as Label
    Studio does, and check every prediction against the label config.

    Exit codes: 0 all valid, 7 predictions invalid, 1 training (--fit) failed, 2 bad input or a
    backend that does not start, 6 a backend Label Studio could not connect (/health, /setup).
    """
    from ..errors import LsdeployError
    from ..preview import (PreviewSettings, fetch_label_config, label_config_from_directory, load_annotations,
                           load_tasks, run_preview)

    say = progress if not as_json else (lambda message: click.echo(message, err=True))
    try:
        config, source = _label_config(directory, label_config_file, project, label_studio_host,
                                       label_studio_api_key, fetch_label_config, label_config_from_directory)
        settings = PreviewSettings(
            directory=directory, label_config=config, label_config_source=source,
            tasks=load_tasks(tasks_file) if tasks_file else None,
            tasks_source=tasks_file or "generated",
            annotations=load_annotations(fit_file) if fit_file else None,
            runner=runner, docker=docker, project_id=project or 1, sample_count=samples, model=model,
            startup_timeout=startup_timeout, predict_timeout=predict_timeout, fit_timeout=fit_timeout,
            env=dict(os.environ),
        )
        with _sigterm_as_interrupt():
            result = run_preview(settings, progress=say)
    except LsdeployError as exc:
        if as_json:
            emit_json({"ok": False, "error": str(exc), "exit_code": exc.exit_code})
        raise
    if as_json:
        emit_json(result.to_dict())
    else:
        click.echo(render(result))
    return result.exit_code


def _label_config(directory, path, project, host, api_key, fetch, from_directory):
    from ..errors import EXIT_USAGE, LsdeployError

    if path and project is not None:
        raise LsdeployError("give either --label-config or --project, not both", EXIT_USAGE)
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read(), path
        except OSError as exc:
            raise LsdeployError(f"cannot read label config {path}: {exc.strerror}", EXIT_USAGE) from None
    if project is not None:
        if not host or not api_key:
            raise LsdeployError("--project needs --label-studio-host and --label-studio-api-key "
                                "(LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY)", EXIT_USAGE)
        return fetch(host, api_key, project), f"Label Studio project {project} at {host.rstrip('/')}"
    found = from_directory(directory)
    if found is None:
        raise LsdeployError(f"no label config: {directory} has no label_config.xml and its README.md no <View>; "
                            "pass --label-config FILE or --project ID", EXIT_USAGE)
    return found


class _sigterm_as_interrupt:
    """SIGTERM stops the preview like Ctrl-C does, so the backend is stopped on the way out."""

    def __enter__(self):
        def handler(signum, frame):
            raise KeyboardInterrupt

        try:
            self._old = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


# -- the readable report --------------------------------------------------------------------------------------
def render(result) -> str:
    out = [f"preview of {result.directory}",
           f"  runner:       {result.runner} ({result.runner_reason})"]
    for argv in result.commands:
        out.append(f"  command:      {' '.join(map(str, argv))}")
    out += [f"  label config: {result.label_config_source}",
            f"  tasks:        {len(result.tasks)} ({result.tasks_source})",
            f"  model:        version {result.model_version}"]
    out += _render_report("predictions", result.report, result.response)
    if result.fit is not None:
        fit = result.fit
        out.append("")
        out.append(f"fit: {len(fit.events)} annotation(s) sent as ANNOTATION_CREATED")
        counts = {}
        for event in fit.events:
            counts[event.outcome] = counts.get(event.outcome, 0) + 1
        out.append("  webhooks:      " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
        changed = "changed" if fit.version_before != fit.version_after else "unchanged"
        out.append(f"  model version: {fit.version_before} -> {fit.version_after} ({changed})")
        for error in fit.errors:
            out.append(f"  problem: {error}")
        if result.report_after_fit is not None:
            out += _render_report("predictions after fit", result.report_after_fit, result.response_after_fit)
    verdict = "OK: Label Studio can show every prediction" if result.ok else "INVALID" if result.exit_code == 7 else "FAILED"
    errors = sum(len(r.errors) for r in result.reports)
    warnings = sum(len(r.warnings) for r in result.reports)
    empty = sum(1 for r in result.reports for t in r.tasks if t.status == "empty")
    out.append("")
    out.append(f"{verdict} ({errors} error(s), {warnings} warning(s)"
               f"{f', {empty} empty prediction(s)' if empty else ''})")
    return "\n".join(out)


STATUS_TEXT = {
    "no prediction": "no prediction (Label Studio stores nothing for this task)",
    "empty": "OK, empty (no regions: Label Studio stores the prediction, nothing is pre-annotated)",
}


def _prediction_info(response, index) -> str:
    results = response.get("results") if isinstance(response, dict) else None
    if not isinstance(results, list) or index >= len(results):
        return ""
    items = results[index] if isinstance(results[index], list) else [results[index]]
    parts = []
    for item in items:
        if isinstance(item, dict):
            score, version = item.get("score"), item.get("model_version")
            score = f"{score:.4g}" if isinstance(score, (int, float)) and not isinstance(score, bool) else repr(score)
            # a blank or odd version shows as what it is: ' ', None, {...}
            version = version if isinstance(version, str) and version.strip() == version and version else repr(version)
            parts.append(f"score {score}, model_version {version}")
    return "; ".join(parts)


def _render_report(title, report, response) -> list:
    out = ["", f"{title}:"]
    for problem in report.general:
        out.append(f"  {'WARNING' if problem.severity == 'warning' else 'PROBLEM'} {problem}")
    for task_report in report.tasks:
        task_id = task_report.task_id
        status = STATUS_TEXT.get(task_report.status, task_report.status)
        out.append("")
        info = _prediction_info(response, task_report.index)
        out.append(f"task {task_report.index + 1} (id {task_id}) {task_report.path}: "
                   f"{task_report.predictions} prediction(s), {len(task_report.rows)} region(s)"
                   f"{' (' + info + ')' if info else ''}: {status}")
        for problem in task_report.problems:
            out.append(f"    {problem}")
        if not task_report.rows:
            continue
        rows = [("PATH", "TYPE", "VALUE", "")]
        for row in task_report.rows:
            rows.append((row.path, row.type, row.summary, "OK" if row.ok else "problem"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for n, row in enumerate(rows):
            out.append(("  " + "  ".join(row[i].ljust(widths[i]) for i in range(3)) + "  " + row[3]).rstrip())
            if n:
                for problem in task_report.rows[n - 1].problems:
                    out.append(f"      {problem}")
    return out
