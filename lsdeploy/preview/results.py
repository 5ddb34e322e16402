"""Settings and results of a preview run."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

from ..errors import EXIT_ERROR, EXIT_INVALID
from ..validate import ValidationReport

# Label Studio's own timeouts are 1 s (health), 3 s (setup), 100 s (predict): preview is more
# patient with the first two (a cold process imports the model), and keeps predict's.
DEFAULT_STARTUP_TIMEOUT = 120.0
DEFAULT_PREDICT_TIMEOUT = 100.0
DEFAULT_FIT_TIMEOUT = 120.0
CONTAINER_PORT = 9090  # EXPOSE and PORT of the blueprints' Dockerfile
UPLOAD_PREFIX = "/data/upload/preview"
# Keys of the Dockerfile's ENV that make no sense outside the container.
CONTAINER_ONLY_ENV = {"PORT", "HOST", "PATH", "HOME", "PYTHONPATH", "MODEL_DIR", "LANG", "GPG_KEY"}
# Environment a preview never passes on: its state is throwaway, and the backend talks to the
# stand-in Label Studio (the file server), not to a real one with the user's key.
DROPPED_ENV = ("MODEL_STATE_URI", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN", "LABEL_STUDIO_URL",
                "LABEL_STUDIO_HOST", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "PORT", "HOST")


# -- settings and results --------------------------------------------------------------------------
@dataclass
class PreviewSettings:
    directory: str
    label_config: str
    label_config_source: str = "given"
    tasks: Optional[list] = None  # None: generate sample tasks from the label config
    tasks_source: str = "generated"
    annotations: Optional[list] = None  # --fit: tasks with annotations, annotations, or webhook bodies
    runner: str = "auto"  # auto | docker | process
    docker: str = "docker"
    project_id: int = 1
    sample_count: int = 2
    model: Optional[str] = None
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    predict_timeout: float = DEFAULT_PREDICT_TIMEOUT
    fit_timeout: float = DEFAULT_FIT_TIMEOUT
    env: dict = field(default_factory=dict, repr=False)  # the caller's environment (process runner)
    platform: str = sys.platform


@dataclass
class FitEvent:
    task_id: object
    annotation_id: object
    status: int
    outcome: str  # ok | training | skipped | error
    detail: str = ""

    def to_dict(self) -> dict:
        return {"task_id": self.task_id, "annotation_id": self.annotation_id, "status": self.status,
                "outcome": self.outcome, "detail": self.detail}


@dataclass
class FitResult:
    version_before: Optional[str]
    version_after: Optional[str] = None
    events: list = field(default_factory=list)
    finished: bool = True  # False when background training outlived fit_timeout
    waited: float = 0.0
    errors: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.finished and not self.errors

    def to_dict(self) -> dict:
        return {"ok": self.ok, "model_version_before": self.version_before, "model_version_after": self.version_after,
                "changed": self.version_before != self.version_after, "finished": self.finished,
                "waited_seconds": round(self.waited, 2), "errors": list(self.errors),
                "events": [e.to_dict() for e in self.events]}


@dataclass
class PreviewResult:
    directory: str
    runner: str  # docker | process
    runner_reason: str
    commands: list  # argv lists actually run to start the backend
    label_config_source: str
    tasks_source: str
    tasks: list
    model_version: Optional[str]
    response: object
    report: ValidationReport
    fit: Optional[FitResult] = None
    response_after_fit: object = None
    report_after_fit: Optional[ValidationReport] = None
    seconds: dict = field(default_factory=dict)
    files_served: int = 0

    @property
    def reports(self) -> list:
        """The validation reports: of the predictions, and of those after --fit when it ran."""
        return [r for r in (self.report, self.report_after_fit) if r is not None]

    @property
    def ok(self) -> bool:
        return all(r.valid for r in self.reports) and (self.fit is None or self.fit.ok)

    @property
    def exit_code(self) -> int:
        if not all(r.valid for r in self.reports):
            return EXIT_INVALID
        return 0 if self.ok else EXIT_ERROR

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "exit_code": self.exit_code,
            "directory": self.directory,
            "runner": self.runner,
            "runner_reason": self.runner_reason,
            "commands": self.commands,
            "label_config_source": self.label_config_source,
            "tasks_source": self.tasks_source,
            "tasks": len(self.tasks),
            "model_version": self.model_version,
            "validation": self.report.to_dict(),
            "response": self.response,
            "fit": self.fit.to_dict() if self.fit else None,
            "validation_after_fit": self.report_after_fit.to_dict() if self.report_after_fit else None,
            "response_after_fit": self.response_after_fit,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "files_served": self.files_served,
        }
