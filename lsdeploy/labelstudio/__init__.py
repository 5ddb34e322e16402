"""Label Studio's REST API, as far as lsdeploy needs it: register, verify and remove ML backends.

Functions other code calls (all raise `LabelStudioError`, an `LsdeployError`, with an exit code:
EXIT_AUTH for a refused key, EXIT_USAGE for an unknown project, EXIT_REGISTER when Label Studio
cannot register or reach the backend):

    register(host, api_key, url, projects, *, title=None, basic_auth=None, interactive=None,
             description=None, extra_params=None, verify=True, use_version=True, timeout=30.0)
             -> list[Registration]
        Create or update (never duplicate) the backend URL in each project, give the project
        webhook <url>/webhook the backend's basic-auth header, then check what Label Studio sees
        (state CO, a non-empty model version, a test prediction when the project has tasks).
        On an existing backend, an option left None keeps what Label Studio has (the user may
        have changed it in the UI). With use_version, the project is pointed at the backend's
        model version, which the Data Manager's score column needs (`versions`).
        When a project fails, what this call created in earlier projects is removed again.
        When Label Studio reports only an HTTP status for a failed /health, /setup or /predict,
        the call is repeated from this machine to quote the backend's own `error`.
    unregister(host, api_key, projects, *, url=None, backend_id=None, timeout=30.0) -> list[Removal]
        Delete the backend (matched by URL or id) and its webhook from each project (with an id,
        the backend's own project when `projects` is empty).
    verify(host, api_key, backend_id, *, timeout=30.0) -> Registration
        What Label Studio sees of one backend now.

`basic_auth` is a (user, password) tuple or None. `projects` is an iterable of project ids.
The same operations are methods of `LabelStudio(host, api_key)`, which also has
`annotated_tasks(project_id)` (every task with at least one annotation, via the export API)
for a backend's own training code, and `get_project(project_id)`.

Keys: a personal access token (a JWT whose payload says token_type "refresh") is exchanged at
POST /api/token/refresh/ for a short-lived access token, renewed before it expires and on 401;
a JWT access token is sent as Bearer as it is; anything else is a legacy key sent as
`Authorization: Token ...`. The key never appears in repr(), messages or logs.

Modules (imports point down): `client` (the client, keys, reads) -> `backends` (registering,
verifying and removing backends and their webhooks) -> `versions` (which predictions a project
uses) -> `errors` (LabelStudioError and wording).
"""
from __future__ import annotations

from .backends import STATE_NAMES, Registration, Removal
from .client import DEFAULT_TIMEOUT, LabelStudio, key_kind, register, unregister, verify
from .errors import LabelStudioError, without_userinfo

__all__ = ["DEFAULT_TIMEOUT", "STATE_NAMES", "LabelStudio", "LabelStudioError", "Registration", "Removal",
           "key_kind", "register", "unregister", "verify", "without_userinfo"]
