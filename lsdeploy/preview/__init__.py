"""`preview`: run a backend once, the way its container runs, and prove its predictions are valid.

Flow (`run_preview(settings)` -> `PreviewResult`):
1. pick a runner: the Docker engine when one answers `docker info` (build DIR's Dockerfile and run
   the image), otherwise a local process running the container's own server command
   (`lsdeploy.serve.server_command`) with the Dockerfile's environment;
2. start a small file server that plays Label Studio's part: it is the `hostname` sent in /setup
   and serves the sample tasks' files under /data/upload/ to requests carrying the access token;
3. wait for /health, send /setup and /predict exactly as Label Studio 1.23 does, validate the
   answer with `lsdeploy.validate`;
4. with annotations, send them as ANNOTATION_CREATED webhooks, wait (bounded) for background
   training, read the model version again and predict once more;
5. stop the backend, always (errors and Ctrl-C included).

Nothing here reads os.environ: the CLI passes the environment in `PreviewSettings.env`.

Modules: `results` (settings and results), `inputs` (label config, tasks, annotations),
`runners` (process and container runners, the stand-in Label Studio), `calls` (what Label Studio
sends, and /setup), `fit` (--fit), `run` (`run_preview`).
"""
from __future__ import annotations

from .calls import webhook_bodies
from .inputs import (annotation_pairs, fetch_label_config, find_view, label_config_from_directory, load_annotations,
                     load_tasks)
from .results import FitEvent, FitResult, PreviewResult, PreviewSettings
from .run import run_preview
from .runners import DockerRunner, ProcessRunner, choose_runner, dockerfile_env, engine_answers, process_env, stop_group

__all__ = ["DockerRunner", "FitEvent", "FitResult", "PreviewResult", "PreviewSettings", "ProcessRunner",
           "annotation_pairs", "choose_runner", "dockerfile_env", "engine_answers", "fetch_label_config", "find_view",
           "label_config_from_directory", "load_annotations", "load_tasks", "process_env", "run_preview",
           "stop_group", "webhook_bodies"]
