"""Reference-SDK compatible entry point: `from lsdeploy.api import init_app`.

A `_wsgi.py` written for `label_studio_ml` keeps working once its imports say `lsdeploy`."""
from __future__ import annotations

from .server import create_app


def init_app(model_class, basic_auth_user=None, basic_auth_pass=None, **kwargs):
    basic_auth = (basic_auth_user, basic_auth_pass) if basic_auth_user and basic_auth_pass else None
    return create_app(model_class, basic_auth=basic_auth, **kwargs)
