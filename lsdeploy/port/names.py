"""What port knows of the reference SDK, and what it reports (`Unported`)."""
from __future__ import annotations

import re
from dataclasses import dataclass


REFERENCE = "label_studio_ml"
# The reference modules lsdeploy provides under the same names.
PORTED_MODULES = ("model", "response", "api", "utils")
# The reference's own training events (label_studio_ml.model.LabelStudioMLBase.TRAIN_EVENTS).
REFERENCE_TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")
TRAIN_EVENTS_LINES = (
    "# The reference SDK's training events (set by label-studio-ml port): fit sees no other event.",
    "TRAIN_EVENTS = (" + ", ".join(f'"{e}"' for e in REFERENCE_TRAIN_EVENTS) + ")",
)
SDK_REQUIREMENT = "lsdeploy[sdk]"
RENDERED_MARK = "# Rendered by lsdeploy"
_SKIP_DIRS = {".git", ".venv", "venv", "env", "__pycache__", ".lsdeploy", "wheels", "node_modules", "site-packages",
              ".pytest_cache", ".mypy_cache", "data"}
# A Dockerfile line that installs the reference SDK: its git URL, a `label-studio-ml @ URL`
# requirement or `pip install label-studio-ml` (not lsdeploy's `label-studio-ml start`).
_REFERENCE_IN_TEXT = re.compile(r"label-studio-ml-backend|\blabel[-_]studio[-_]ml\s*(@|[<>=~!]=)|"
                                r"pip3? install[^\n]*\slabel[-_]studio[-_]ml\b(?![-_])")
_MODULE_PATH = re.compile(r"^label_studio_ml(\.[A-Za-z_]\w*)*$")


@dataclass
class Unported:
    """Something `port` left as it is, with where it is and what to do about it."""

    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"
