"""`LabelStudioMLBase`: subclass it, implement `predict` and `fit`.

Source-compatible with the reference SDK (`label_studio_ml.model`): porting a backend means
changing `label_studio_ml` to `lsdeploy` in its imports. Differences a user can rely on:
- the server keeps one instance per (project, label config) and reuses it, so `setup()` runs
  once per instance, not per request;
- `get`/`set`/`has` go to a StateStore that is correct with several workers (SQLite) or
  several Cloud Run instances (Cloud Storage); `update()` is an atomic read-modify-write;
- `bump_model_version()` really bumps; `save_artifact`/`load_artifact` keep whole files;
- `parsed_label_config` needs no label-studio-sdk; `label_interface` does, and says so.
"""
from __future__ import annotations

import contextlib
import logging
import re
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from . import taskdata
from .labelconfig import first_tag_occurrence, parse_config, parse_tags
from .response import ModelResponse
from .state import StateStore, default_store

logger = logging.getLogger(__name__)

# Every event Label Studio sends that carries data: the default TRAIN_EVENTS ("by default, the fit
# method is called at any data action", as the reference SDK says). ANNOTATION_DELETED is in the
# reference's own list. Any other event, known or not (a newer Label Studio may send new ones),
# is answered 200 "skipped" without calling fit.
DATA_EVENTS = (
    "ANNOTATION_CREATED",
    "ANNOTATIONS_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATION_DELETED",
    "ANNOTATIONS_DELETED",
    "START_TRAINING",
    "TASKS_CREATED",
    "TASKS_DELETED",
    "PROJECT_UPDATED",
)

# Writes made while a model is built run on the request path (the first /predict, /setup or
# webhook of a project in a process): they wait this long at most for storage, then finish in
# the background (Label Studio gives /setup 3 s and /health 1 s).
REQUEST_WRITE_WAIT = 0.25


def request_write(write: Callable, *args) -> None:
    """`write(*args)` with wait=REQUEST_WRITE_WAIT when the store's method takes it (a store
    written against the older set(project, key, value) still works, writing at once)."""
    import inspect

    try:
        takes_wait = "wait" in inspect.signature(write).parameters
    except (TypeError, ValueError):
        takes_wait = False
    if takes_wait:
        write(*args, wait=REQUEST_WRITE_WAIT)
    else:
        write(*args)

_predict_fn: Optional[Callable] = None
_update_fn: Optional[Callable] = None


def predict_fn(f):
    """Register a plain function as the predictor (reference SDK decorator)."""
    global _predict_fn
    _predict_fn = f
    return f


def update_fn(f):
    """Register a plain function as the trainer (reference SDK decorator)."""
    global _update_fn
    _update_fn = f
    return f


_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")
_TRAILING_INT = re.compile(r"^(.*?)(\d+)$")


def next_version(version: Optional[str]) -> str:
    """'0.0.1' -> '0.1.0' (semver minor), 'model-v7' -> 'model-v8', 'abc' -> 'abc.1'."""
    version = str(version or "")
    match = _SEMVER.match(version)
    if match:
        major, minor, _ = (int(g) for g in match.groups())
        return f"{major}.{minor + 1}.0"
    match = _TRAILING_INT.match(version)
    if match:
        prefix, number = match.groups()
        return f"{prefix}{int(number) + 1:0{len(number)}d}"
    return f"{version}.1" if version else "1"


_WHOLE_DATA = object()  # preload_task_data without a value: the task's whole data


_delivery = threading.local()


@contextlib.contextmanager
def delivery_context(info: dict):
    """While fit() runs for a queued event: what `LabelStudioMLBase.delivery` answers."""
    previous = getattr(_delivery, "info", None)
    _delivery.info = info
    try:
        yield
    finally:
        _delivery.info = previous


class LabelStudioMLBase:
    """Base class of an ML backend. One instance serves one project and label config."""

    INITIAL_MODEL_VERSION = "0.0.1"
    # Events that reach fit(); override in a subclass to receive fewer (or more).
    TRAIN_EVENTS = DATA_EVENTS

    def __init__(self, project_id: Optional[str] = None, label_config: Optional[str] = None):
        self.project_id = "" if project_id is None else str(project_id)
        self._label_config: Optional[str] = None
        self._parsed: Optional[Tuple[str, dict]] = None
        # The config is this instance's at once (setup() reads it) but reaches the project's state
        # only once setup() accepted it: a config the model refuses must not replace a good one.
        self._label_config = label_config
        if not self.has("model_version"):  # create-only: another instance's newer version is kept
            request_write(self.store.create, self.project_id, "model_version", self.INITIAL_MODEL_VERSION)
        self.setup()
        if label_config is not None:
            self.use_label_config(label_config)

    # -- to override ------------------------------------------------------------------
    def setup(self):
        """Runs once per instance: load weights, set the model version."""

    def predict(self, tasks: List[Dict], context: Optional[Dict] = None, **kwargs) -> Union[List[Dict], ModelResponse]:
        """One prediction per task, in task order (a list of dicts or a ModelResponse)."""
        if _predict_fn:
            return _predict_fn(tasks, context, helper=self, **kwargs)
        return ModelResponse(predictions=[])

    def fit(self, event, data, **additional_params):
        """Called for every event in TRAIN_EVENTS (annotations, START_TRAINING, ...)."""
        if _update_fn:
            return _update_fn(event, data, helper=self, **additional_params)

    @property
    def delivery(self) -> Optional[Dict]:
        """Inside fit() for a training event: {"job_id", "attempt", "sequence", "event",
        "queued_at"}. Delivery is at least once (a fit cut short by a crash or a stop runs again,
        attempt + 1): a fit that must not count an event twice keys its work on job_id. None
        outside such a fit."""
        info = getattr(_delivery, "info", None)
        return dict(info) if info is not None else None

    def process_event(self, event, data, job_id=None, additional_params=None):
        if event in self.TRAIN_EVENTS:
            return self.fit(event, data, job_id=job_id, **(additional_params or {}))

    # -- state --------------------------------------------------------------------------
    @property
    def store(self) -> StateStore:
        return getattr(self, "_store", None) or default_store()

    def get(self, key: str):
        return self.store.get(self.project_id, key)

    def set(self, key: str, value) -> None:
        self.store.set(self.project_id, key, value)

    def has(self, key: str) -> bool:
        return self.store.has(self.project_id, key)

    def update(self, key: str, fn: Callable[[Any], Any], default=None):
        """Atomic read-modify-write of one key, safe across workers and instances.
        `fn` may be called more than once: keep it free of side effects."""
        return self.store.update(self.project_id, key, fn, default)

    def save_artifact(self, name: str, local_path: str) -> None:
        """Keep a whole file (trained weights) in the state store, replaced atomically."""
        self.store.save_artifact(self.project_id, name, local_path)

    def load_artifact(self, name: str) -> Optional[str]:
        """Local path of a file saved with save_artifact, or None."""
        return self.store.load_artifact(self.project_id, name)

    # -- label config ---------------------------------------------------------------------
    def use_label_config(self, label_config: str) -> None:
        self._label_config = label_config
        if self.get("label_config") != label_config:
            request_write(self.store.set, self.project_id, "label_config", label_config)

    @property
    def label_config(self) -> Optional[str]:
        if self._label_config is not None:
            return self._label_config
        return self.get("label_config")

    def get_label_config(self) -> Optional[str]:
        return self.label_config

    @property
    def parsed_label_config(self) -> dict:
        config = self.label_config or ""
        if self._parsed is None or self._parsed[0] != config:
            self._parsed = (config, parse_config(config))
        return self._parsed[1]

    @property
    def label_interface(self):
        try:
            from label_studio_sdk.label_interface import LabelInterface
        except ImportError:
            raise ImportError(
                "label_interface needs label-studio-sdk: pip install 'lsdeploy[sdk]' "
                "(or use parsed_label_config, which needs nothing extra)"
            ) from None
        cached = self.__dict__.get("_label_interface")
        if cached is None or cached[0] != self.label_config:
            cached = (self.label_config, LabelInterface(config=self.label_config))
            self.__dict__["_label_interface"] = cached
        return cached[1]

    def get_first_tag_occurence(self, control_type, object_type, name_filter=None, to_name_filter=None):
        """(from_name, to_name, value) of the first matching control/object tag pair."""
        return first_tag_occurrence(self.label_config, control_type, object_type, name_filter, to_name_filter)

    def build_label_map(self, tag_name: str, names: List[str]) -> Dict[str, str]:
        """Map model label names to the config's labels (`predicted_values`, then name)."""
        control = parse_tags(self.label_config).controls.get(tag_name)
        if control is None:
            raise ValueError(f"label config has no control tag named {tag_name!r}")
        names = list(names)
        lower = {n.lower(): n for n in names}
        label_map: Dict[str, str] = {}
        for ls_label, attrs in control.labels.items():
            matched = False
            for value in attrs.get("predicted_values", "").split(","):
                value = value.strip()
                if value and value in names:
                    label_map[value] = ls_label
                    matched = True
            if not matched:
                if ls_label in names:
                    label_map[ls_label] = ls_label
                elif ls_label.lower() in lower:
                    label_map[ls_label.lower()] = ls_label
        return label_map

    # -- versions and params ----------------------------------------------------------------
    @property
    def model_version(self) -> str:
        return str(self.get("model_version") or self.INITIAL_MODEL_VERSION)

    def bump_model_version(self) -> str:
        """Move to the next version atomically and return it."""
        initial = self.INITIAL_MODEL_VERSION
        new = self.update("model_version", lambda current: next_version(current or initial))
        logger.info("model version of project %r is now %s", self.project_id, new)
        return new

    def set_extra_params(self, extra_params) -> None:
        if isinstance(extra_params, str):
            import json

            extra_params = json.loads(extra_params) if extra_params.strip() else {}
        if self.get("extra_params") != (extra_params or {}):  # Label Studio sends them on every /setup
            self.set("extra_params", extra_params or {})

    @property
    def extra_params(self) -> dict:
        params = self.get("extra_params")
        if isinstance(params, str):  # written by the reference SDK's convention
            import json

            return json.loads(params) if params.strip() else {}
        return params or {}

    # -- task data from Label Studio ----------------------------------------------------------
    @property
    def label_studio_url(self) -> Optional[str]:
        return taskdata.connection(self.project_id).url

    def get_label_studio_access_token(self) -> Optional[str]:
        return taskdata.connection(self.project_id).token

    def get_local_path(self, url, project_dir=None, ls_host=None, ls_access_token=None, task_id=None, *args, **kwargs):
        """Download a task's file (uploaded to Label Studio, or any allowed URL) and return
        its local path. Label Studio's key is only ever sent to Label Studio's own host."""
        conn = taskdata.connection(self.project_id)
        return taskdata.get_local_path(
            url,
            label_studio_url=ls_host or conn.url,
            token=ls_access_token or conn.token,
            cache_dir=project_dir,
            task_id=task_id,
            fallback_token=taskdata.env_token(),
        )

    def preload_task_data(self, task: Dict, value=_WHOLE_DATA, read_file=True):
        """Replace URLs in `value` (without it: the task's data) with file contents (or local
        paths). As under the reference SDK, dicts are filled in place and returned, and an
        explicit None (`task["data"].get(missing_key)`) comes back as None."""
        return self._preload(task, task.get("data") if value is _WHOLE_DATA else value, read_file)

    def _preload(self, task: Dict, value, read_file: bool):
        if isinstance(value, dict):
            for key, item in value.items():
                value[key] = self._preload(task, item, read_file)
            return value
        if isinstance(value, list):
            return [self._preload(task, v, read_file) for v in value]
        if isinstance(value, str) and taskdata.is_preload_needed(value):
            path = self.get_local_path(value, task_id=task.get("id"))
            if not read_file:
                return path
            with open(path, encoding="utf-8") as handle:
                return handle.read()
        return value

