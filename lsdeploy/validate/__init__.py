"""Checking a backend's /predict answer against the label config, as Label Studio would need it.

Label Studio stores whatever a backend returns and shows nothing when it does not fit the
label config: a misspelled `from_name`, a label that is not in the config, a result `type`
that does not match the control tag, a span outside the text. `validate_predictions` finds
those before the backend ships; `preview` runs it on a live backend and `deploy` can run it
as a pre-flight check.

Every problem has a rule id (see RULES), a message and the JSON path of the offending value
in the /predict body, for example ``results[0].result[1].value.choices[0]``.

`sample_tasks` builds tasks from a label config's object tags when the user has none.

The package, one concern a module; each imports only modules listed above it:

- `rules`: the rule table (RULES), severities and which result types carry labels;
- `common`: JSON paths, number tests and message formatting shared by the modules below;
- `report`: Problem, Row, TaskReport and ValidationReport, what a check returns;
- `values`: the checks of one result's `value` for its control tag (choices, labels, rating,
  number, geometry, spans, ...);
- `validator`: `validate_predictions`, the walk over the body, its predictions and their results;
- `samples`: `sample_tasks` and `sample_files`.
"""
from .report import Problem, Row, TaskReport, ValidationReport
from .rules import ERROR, IMAGE_OBJECTS, KNOWN_CONTROLS, LABEL_KEYS, RULES, WARNING
from .samples import SAMPLE_PARAGRAPHS, SAMPLE_TEXTS, sample_files, sample_tasks
from .validator import validate_predictions

__all__ = [
    "ERROR", "IMAGE_OBJECTS", "KNOWN_CONTROLS", "LABEL_KEYS", "Problem", "RULES", "Row", "SAMPLE_PARAGRAPHS",
    "SAMPLE_TEXTS", "TaskReport", "ValidationReport", "WARNING", "sample_files", "sample_tasks",
    "validate_predictions",
]
