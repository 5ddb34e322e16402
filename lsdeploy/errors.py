"""Errors that reach the user as one line: what went wrong and what to do."""


class LsdeployError(Exception):
    """An error the CLI shows as one line (no traceback unless --debug).

    `exit_code` follows the documented table in README.md.
    """

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ModelLoadError(LsdeployError):
    """The backend directory has no loadable model class."""

    exit_code = 2


class StateError(LsdeployError):
    """The model state store cannot be used (missing bucket, no permission, storage down)."""


# Exit codes of the CLI (README.md lists them).
EXIT_ERROR = 1          # any other error
EXIT_USAGE = 2          # bad option, bad input, backend directory unusable
EXIT_AUTH = 3           # Label Studio key refused, Google credentials missing or refused
EXIT_BUILD = 4          # Cloud Build failed
EXIT_DEPLOY = 5         # Cloud Run revision failed or Google API refused the deploy
EXIT_REGISTER = 6       # Label Studio could not register or reach the backend
EXIT_INVALID = 7        # preview: predictions are not valid for the label config
