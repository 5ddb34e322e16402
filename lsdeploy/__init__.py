"""lsdeploy: write, serve, preview and deploy Label Studio ML backends.

Public API (everything else is an implementation detail):
- `LabelStudioMLBase`: subclass it, implement `predict` and `fit`;
- `ModelResponse`, `PredictionValue`: what `predict` may return;
- `create_app(model_class, ...)`: the Flask app that speaks Label Studio's protocol.
"""

__version__ = "0.1.0"

from .model import LabelStudioMLBase  # noqa: E402
from .response import ModelResponse, PredictionValue  # noqa: E402


def create_app(model_class, **kwargs):
    """Build the WSGI app for `model_class` (see lsdeploy.server.create_app)."""
    from .server import create_app as _create_app

    return _create_app(model_class, **kwargs)


__all__ = ["LabelStudioMLBase", "ModelResponse", "PredictionValue", "create_app", "__version__"]
