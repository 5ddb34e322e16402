"""Deploy targets. One module or package per provider (`gcp` first, a package of one module per
concern); each implements `base.Provider`.

`get_provider(name)` returns the provider class without importing the others' heavy clients.
"""
from __future__ import annotations

import importlib

from .base import DeployResult, DestroyResult, PlanResult, Provider, RollbackResult, StatusResult  # noqa: F401

PROVIDERS = {"gcp": ("lsdeploy.providers.gcp", "GcpProvider")}


def get_provider(name: str):
    module, attr = PROVIDERS[name]
    return getattr(importlib.import_module(module), attr)
