"""Deploying to Google Cloud Run: `GcpProvider(GcpClients.from_env(environ, project))` with a
`GcpSettings` per service.

Modules, each importing only the ones listed before it:
errors (one-line Google API errors), settings, clients (building and calling the clients), logs
(build log streaming), storage (buckets), secrets (Secret Manager), build (the image), service
(the Cloud Run service: desired spec, apply, Ready state, diff), prune (old images, bundles, logs),
ops (status, rollback, destroy), provider (GcpProvider: deploy and plan, delegating to the others).
"""
from .clients import GcpClients
from .provider import GcpProvider
from .settings import GcpSettings

__all__ = ["GcpClients", "GcpProvider", "GcpSettings"]
