"""The Label Studio REST client: one host and key, the key sent the way Label Studio takes it
(a personal access token exchanged for short-lived access tokens, renewed before they expire and
on 401; a legacy token as `Token ...`), answers that are not Label Studio's API named as such, and
the reads lsdeploy needs (the current user, a project, a project's annotated tasks). The ML-backend
operations (register, verify, unregister) come from `backends.BackendRegistry`.
"""
from __future__ import annotations

import base64
import json
import threading
import time
from typing import Iterable, Optional, Sequence

from ..errors import EXIT_AUTH, EXIT_ERROR, EXIT_USAGE
from .backends import BackendRegistry, Registration
from .errors import LabelStudioError, _project_id, _reason, without_userinfo

DEFAULT_TIMEOUT = 30.0


def _jwt_payload(token: str) -> Optional[dict]:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        raw = parts[1] + "=" * (-len(parts[1]) % 4)
        payload = json.loads(base64.urlsafe_b64decode(raw.encode()))
    except (ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def key_kind(api_key: str) -> str:
    """'personal access token', 'access token' (a short-lived JWT) or 'legacy token'."""
    payload = _jwt_payload(api_key or "")
    if payload is None:
        return "legacy token"
    return "access token" if payload.get("token_type") == "access" else "personal access token"



def _session_class():
    """requests.Session that follows a 307/308 (which re-sends the body: a personal access token
    to refresh, a backend's basic-auth password) only on the same host, or from http to https on
    it; requests itself drops only the Authorization header on another host."""
    import requests
    from urllib.parse import urljoin, urlsplit

    class SameHostSession(requests.Session):
        def get_redirect_target(self, resp):
            target = super().get_redirect_target(resp)
            if target and resp.status_code in (307, 308) and resp.request.body is not None:
                old, new = urlsplit(resp.url), urlsplit(urljoin(resp.url, target))
                if new.hostname != old.hostname or (new.scheme != old.scheme and new.scheme != "https"):
                    return None  # answered as it is: the caller reports the redirect
            return target

    return SameHostSession


class LabelStudio(BackendRegistry):
    """A Label Studio REST client bound to one host and key. Thread-safe for token refresh."""

    def __init__(self, host: str, api_key: str, timeout: float = DEFAULT_TIMEOUT, session=None):
        if not host:
            raise LabelStudioError("no Label Studio address: pass --label-studio-host or set LABEL_STUDIO_URL",
                                   EXIT_USAGE)
        api_key = (api_key or "").strip()  # a key read from a file often ends with a line break
        if not api_key:
            raise LabelStudioError("no Label Studio API key: pass --label-studio-api-key or set "
                                   "LABEL_STUDIO_API_KEY (Account & Settings > Personal Access Token)", EXIT_USAGE)
        host = host.strip().rstrip("/")
        if not host.startswith(("http://", "https://")):
            host = "http://" + host
        self.host = host
        # what messages show: the address without user info (a proxy password in the URL)
        self.shown = without_userinfo(host)
        self.timeout = timeout
        self.key_kind = key_kind(api_key)
        self.__key = api_key
        self.__access: Optional[str] = None
        self.__access_expires = 0.0
        self._lock = threading.Lock()
        self._session = session or _session_class()()

    def __repr__(self):
        return f"LabelStudio(host={self.shown!r}, key=<{self.key_kind}>)"

    # -- auth ---------------------------------------------------------------------------------
    def authorization(self, renew: bool = False) -> str:
        """The Authorization header value for this key (a personal access token is exchanged)."""
        return self._authorization(renew)

    def _authorization(self, renew: bool = False) -> str:
        if self.key_kind == "legacy token":
            return f"Token {self.__key}"
        if self.key_kind == "access token":
            return f"Bearer {self.__key}"
        with self._lock:
            if renew or self.__access is None or time.time() > self.__access_expires - 30:
                self.__access, self.__access_expires = self._exchange()
            return f"Bearer {self.__access}"

    def _exchange(self):
        import requests

        try:
            resp = self._session.post(f"{self.host}/api/token/refresh/", json={"refresh": self.__key},
                                      timeout=self.timeout)
        except requests.RequestException as exc:
            raise self._unreachable(exc) from None
        self._check_api(resp)
        if resp.status_code in (400, 401, 403):
            raise LabelStudioError(
                f"Label Studio at {self.shown} refused the personal access token ({resp.status_code}: "
                f"{_reason(resp)}): create a new one in Account & Settings > Personal Access Token and pass it "
                "with --label-studio-api-key (LABEL_STUDIO_API_KEY)", EXIT_AUTH, resp.status_code)
        if resp.status_code == 404:
            raise LabelStudioError(
                f"{self.shown} has no /api/token/refresh/: it is not a Label Studio that accepts personal access "
                "tokens (1.14 or newer); use its legacy API token instead", EXIT_AUTH, 404)
        if resp.status_code >= 400:
            raise LabelStudioError(f"exchanging the personal access token at {self.shown} failed: "
                                   f"{resp.status_code} {_reason(resp)}", EXIT_AUTH, resp.status_code)
        access = (self._json(resp) or {}).get("access")
        if not access:
            raise LabelStudioError(f"{self.shown}/api/token/refresh/ answered without an access token", EXIT_AUTH)
        payload = _jwt_payload(access) or {}
        expires = float(payload.get("exp") or (time.time() + 240))
        return access, expires

    def _unreachable(self, exc) -> LabelStudioError:
        from requests.exceptions import InvalidHeader

        if isinstance(exc, InvalidHeader):  # raised before anything is sent
            return LabelStudioError(
                "the Label Studio API key cannot be sent in an HTTP header (it has a space, line break or other "
                "control character inside): copy it again into --label-studio-api-key (LABEL_STUDIO_API_KEY)",
                EXIT_USAGE)
        return LabelStudioError(
            f"cannot reach Label Studio at {self.shown} ({type(exc).__name__}): check --label-studio-host "
            "(LABEL_STUDIO_URL) and that Label Studio is running", EXIT_USAGE)

    # -- requests -----------------------------------------------------------------------------
    def request(self, method: str, path: str, *, json=None, params=None, timeout: Optional[float] = None):
        """One API call; returns the response. 401 renews a PAT's access token once, then fails
        with EXIT_AUTH. Any other status is returned for the caller to judge."""
        import requests

        url = f"{self.host}{path}"
        for attempt in (0, 1):
            headers = {"Authorization": self._authorization(renew=attempt == 1)}
            try:
                resp = self._session.request(method, url, json=json, params=params, headers=headers,
                                             timeout=timeout or self.timeout)
            except requests.RequestException as exc:
                raise self._unreachable(exc) from None
            self._check_api(resp)
            if resp.status_code == 401 and attempt == 0 and self.key_kind == "personal access token":
                continue
            break
        if resp.status_code == 401:
            hint = ("a legacy token works only when the organization allows legacy tokens (Organization > "
                    "API Tokens Settings); a personal access token is the default in current Label Studio"
                    if self.key_kind == "legacy token" else "create a new personal access token in Account & Settings")
            raise LabelStudioError(
                f"Label Studio at {self.shown} refused the API key ({self.key_kind}, 401: {_reason(resp)}): "
                f"check --label-studio-api-key (LABEL_STUDIO_API_KEY); {hint}", EXIT_AUTH, 401)
        return resp

    def call(self, method: str, path: str, what: str, **kwargs):
        """request() that returns the JSON body, raising LabelStudioError (saying `what` failed) on 4xx/5xx."""
        resp = self.request(method, path, **kwargs)
        if resp.status_code >= 400:
            raise LabelStudioError(f"{what} failed: Label Studio answered {resp.status_code}: {_reason(resp)}",
                                   EXIT_ERROR, resp.status_code)
        if resp.status_code == 204 or not resp.content:
            return None
        return self._json(resp)

    def _check_api(self, resp, missing_is_json: bool = False) -> None:
        """Label Studio's API answers JSON; a web page is something else answering at its address
        (a proxy's or single sign-on login page, a wrong URL). Label Studio's own 500s, and its
        404s of some objects (an ML backend), are web pages too."""
        kind = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if "html" in kind and resp.status_code < 500 and (resp.status_code != 404 or missing_is_json):
            raise self._not_api(resp, "an HTML page")

    def _json(self, resp):
        try:
            return resp.json()
        except ValueError:
            kind = resp.headers.get("Content-Type", "").split(";")[0].strip() or "no content type"
            raise self._not_api(resp, f"something that is not JSON ({kind})") from None

    def _not_api(self, resp, what: str) -> LabelStudioError:
        import urllib.parse

        path = urllib.parse.urlsplit(resp.url or "").path if resp.url else ""
        return LabelStudioError(
            f"{self.shown} answered {path or 'the API call'} with {what} ({resp.status_code}), not Label Studio's API: "
            "check --label-studio-host (LABEL_STUDIO_URL); a proxy or single sign-on page in front of Label Studio "
            "must let API calls with the key through", EXIT_USAGE, resp.status_code)

    # -- reads --------------------------------------------------------------------------------
    def whoami(self) -> dict:
        return self.call("GET", "/api/current-user/whoami", "checking the API key")

    def get_project(self, project) -> dict:
        pid = _project_id(project)
        resp = self.request("GET", f"/api/projects/{pid}")
        self._check_api(resp, missing_is_json=True)  # Label Studio answers a missing project in JSON
        if resp.status_code == 404:
            raise LabelStudioError(
                f"Label Studio at {self.shown} has no project {pid} (or this key cannot see it): check --project "
                "(LABEL_STUDIO_PROJECT); the id is the number in the project's URL", EXIT_USAGE, 404)
        if resp.status_code == 403:
            raise LabelStudioError(f"the API key may not read project {pid} on {self.shown} (403): use the key of "
                                   "a member of the project's organization", EXIT_AUTH, 403)
        if resp.status_code >= 400:
            raise LabelStudioError(f"reading project {pid} failed: {resp.status_code} {_reason(resp)}",
                                   EXIT_ERROR, resp.status_code)
        return self._json(resp)

    def first_task(self, project) -> Optional[dict]:
        """The project's first task (None when it has none)."""
        pid = _project_id(project)
        tasks = self.call("GET", "/api/tasks/", f"reading a task of project {pid}",
                          params={"project": pid, "page_size": 1})
        tasks = tasks.get("tasks") if isinstance(tasks, dict) else tasks
        return tasks[0] if tasks else None

    def annotated_tasks(self, project) -> list:
        """Every task of the project with at least one annotation, each with its `data` and
        `annotations` (GET /api/projects/{id}/export?exportType=JSON). `project` may be an id or
        the "<id>.<epoch>" string Label Studio sends to backends."""
        pid = _project_id(project)
        tasks = self.call("GET", f"/api/projects/{pid}/export", f"exporting the annotations of project {pid}",
                           params={"exportType": "JSON", "download_all_tasks": "false"},
                           timeout=max(self.timeout, 300.0))
        return [t for t in tasks or [] if t.get("annotations")]

# -- plain functions (for `deploy` and other callers) -------------------------------------------
def register(host: str, api_key: str, url: str, projects: Iterable, *, title: Optional[str] = None,
             basic_auth: Optional[Sequence[str]] = None, interactive: Optional[bool] = None,
             description: Optional[str] = None, extra_params: Optional[dict] = None, verify: bool = True,
             use_version: bool = True, timeout: float = DEFAULT_TIMEOUT) -> list:
    return LabelStudio(host, api_key, timeout=timeout).register(
        url, projects, title=title, basic_auth=basic_auth, interactive=interactive, description=description,
        extra_params=extra_params, verify=verify, use_version=use_version)


def unregister(host: str, api_key: str, projects: Iterable, *, url: Optional[str] = None,
               backend_id: Optional[int] = None, timeout: float = DEFAULT_TIMEOUT) -> list:
    return LabelStudio(host, api_key, timeout=timeout).unregister(projects, url=url, backend_id=backend_id)


def verify(host: str, api_key: str, backend_id: int, *, timeout: float = DEFAULT_TIMEOUT) -> Registration:
    return LabelStudio(host, api_key, timeout=timeout).verify(backend_id)
