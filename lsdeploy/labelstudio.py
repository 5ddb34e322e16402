"""Label Studio's REST API, as far as lsdeploy needs it: register, verify and remove ML backends.

Functions other code calls (all raise `LabelStudioError`, an `LsdeployError`, with an exit code:
EXIT_AUTH for a refused key, EXIT_USAGE for an unknown project, EXIT_REGISTER when Label Studio
cannot register or reach the backend):

    register(host, api_key, url, projects, *, title=None, basic_auth=None, interactive=False,
             description=None, extra_params=None, verify=True, timeout=30.0) -> list[Registration]
        Create or update (never duplicate) the backend URL in each project, give the project
        webhook <url>/webhook the backend's basic-auth header, then check what Label Studio sees
        (state CO, a non-empty model version, a test prediction when the project has tasks).
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
"""
from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

from .errors import EXIT_AUTH, EXIT_ERROR, EXIT_REGISTER, EXIT_USAGE, LsdeployError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
STATE_NAMES = {"CO": "connected", "DI": "disconnected", "ER": "error", "TR": "training", "PR": "predicting"}
SSRF_FIX = ("Label Studio refuses local and private addresses by default: set ML_BLOCK_LOCAL_IP=false "
            "(ML backend calls) and SSRF_PROTECTION_ENABLED=false (the project webhook that delivers annotations) "
            "in Label Studio's environment and restart it, or give the backend a public URL")


class LabelStudioError(LsdeployError):
    """Label Studio refused or failed a request; the message names the cause and the fix."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR, status: Optional[int] = None):
        super().__init__(message, exit_code)
        self.status = status


@dataclass
class Registration:
    """One backend as Label Studio sees it in one project."""

    backend_id: int
    project: int
    url: str
    title: str = ""
    state: str = ""                   # CO connected, DI disconnected, ER error
    model_version: str = ""
    created: bool = False             # False: an existing backend was updated
    is_interactive: bool = False
    basic_auth: bool = False
    webhook_id: Optional[int] = None
    error_message: str = ""
    test_prediction: Optional[dict] = None   # {"ok": bool, "detail": str}

    @property
    def connected(self) -> bool:
        return self.state == "CO"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["state_name"] = STATE_NAMES.get(self.state, self.state)
        return data


@dataclass
class Removal:
    project: int
    backend_ids: list
    webhook_ids: list

    def to_dict(self) -> dict:
        return asdict(self)


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


def _project_id(project) -> int:
    """A project id from 5, "5", or the "5.1700000000" form Label Studio sends to backends."""
    try:
        return int(str(project).split(".")[0])
    except ValueError:
        raise LabelStudioError(f"{project!r} is not a Label Studio project id (a number)", EXIT_USAGE) from None


def _health_status(reason: str) -> Optional[int]:
    """The HTTP status the backend's /health answered, from Label Studio's "health check failed ...
    Additional info: 500 Server Error: ..." (None when it did not answer: unreachable, timeout)."""
    found = re.search(r"health check failed.*Additional info: (\d{3}) [\w ]*Error", reason, re.S)
    return int(found.group(1)) if found else None


def _answered(reason: str) -> str:
    return f"; the backend answered {reason}" if reason else ""


def _project_uid(project: dict) -> str:
    """The "<id>.<created_at epoch>" form Label Studio sends to backends as `project`."""
    from datetime import datetime

    try:
        return f"{project['id']}.{int(datetime.fromisoformat(project['created_at']).timestamp())}"
    except (KeyError, TypeError, ValueError):
        return str(project.get("id"))


def _normal_url(url: str) -> str:
    return (url or "").strip().rstrip("/")


def _basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _reason(resp) -> str:
    """Label Studio's own words for an error answer, flattened to one line."""
    try:
        body = resp.json()
    except ValueError:
        text = (resp.text or "").strip()
        if re.match(r"<(!doctype|html)", text, re.I):  # a web page: its title says most
            title = re.search(r"<title[^>]*>([^<]*)</title>", text, re.I)
            return " ".join(title.group(1).split())[:300] if title else f"HTTP {resp.status_code} (a web page)"
        return text.splitlines()[0][:300] if text else f"HTTP {resp.status_code}"
    parts = []
    if isinstance(body, dict):
        errors = body.get("validation_errors") or {}
        for source in (errors, body):
            if not isinstance(source, dict):
                continue
            for key, value in source.items():
                if key in ("id", "status_code", "version", "exc_info", "validation_errors"):
                    continue
                if key == "detail" and errors:
                    continue  # "Validation error": the details say more
                values = value if isinstance(value, list) else [value]
                text = "; ".join(str(v) for v in values)
                parts.append(text if key in ("detail", "non_field_errors", "error", "errors") else f"{key}: {text}")
    elif isinstance(body, list):
        parts = [str(v) for v in body]
    else:
        parts = [str(body)]
    line = " ".join(" ".join(parts).split())
    # Label Studio's messages carry an HTML link; keep the words.
    line = re.sub(r"<a [^>]*>([^<]*)</a>", r"\1", line)
    return line[:600] or f"HTTP {resp.status_code}"


def without_userinfo(url: str) -> str:
    """`url` with any user:password@ part removed, for messages."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    return f"{scheme}{sep}{netloc.rpartition('@')[2]}{slash}{path}"


class LabelStudio:
    """A Label Studio REST client bound to one host and key. Thread-safe for token refresh."""

    attempts = 3         # tries when Label Studio's 1 s health check of the backend misses
    retry_pause = 1.0

    def __init__(self, host: str, api_key: str, timeout: float = DEFAULT_TIMEOUT, session=None):
        import requests

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
        self._session = session or requests.Session()

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

    def backends(self, project) -> list:
        """Every ML backend of a project (Label Studio re-checks each one's health on this read)."""
        pid = _project_id(project)
        return self.call("GET", "/api/ml/", f"listing the ML backends of project {pid}", params={"project": pid}) or []

    def get_backend(self, backend_id: int) -> dict:
        resp = self.request("GET", f"/api/ml/{int(backend_id)}")
        if resp.status_code == 404:
            raise LabelStudioError(f"Label Studio at {self.shown} has no ML backend {backend_id}", EXIT_USAGE, 404)
        if resp.status_code >= 400:
            raise LabelStudioError(f"reading ML backend {backend_id} failed: {resp.status_code} {_reason(resp)}",
                                   EXIT_ERROR, resp.status_code)
        return self._json(resp)

    def webhooks(self, project) -> list:
        pid = _project_id(project)
        return self.call("GET", "/api/webhooks/", f"listing the webhooks of project {pid}", params={"project": pid}) or []

    def annotated_tasks(self, project) -> list:
        """Every task of the project with at least one annotation, each with its `data` and
        `annotations` (GET /api/projects/{id}/export?exportType=JSON). `project` may be an id or
        the "<id>.<epoch>" string Label Studio sends to backends."""
        pid = _project_id(project)
        tasks = self.call("GET", f"/api/projects/{pid}/export", f"exporting the annotations of project {pid}",
                           params={"exportType": "JSON", "download_all_tasks": "false"},
                           timeout=max(self.timeout, 300.0))
        return [t for t in tasks or [] if t.get("annotations")]

    # -- register -----------------------------------------------------------------------------
    def register(self, url: str, projects: Iterable, *, title: Optional[str] = None,
                 basic_auth: Optional[Sequence[str]] = None, interactive: bool = False,
                 description: Optional[str] = None, extra_params: Optional[dict] = None,
                 verify: bool = True) -> list:
        """Create or update the backend `url` in each project; see the module docstring."""
        url = _normal_url(url)
        if not url.startswith(("http://", "https://")):
            raise LabelStudioError(f"backend URL {url!r} must start with http:// or https://", EXIT_USAGE)
        pids = [_project_id(p) for p in projects]
        if not pids:
            raise LabelStudioError("no project: pass --project ID (LABEL_STUDIO_PROJECT)", EXIT_USAGE)
        if basic_auth and not all(basic_auth):
            raise LabelStudioError("basic auth needs both a user and a password (BASIC_AUTH_USER / BASIC_AUTH_PASS)",
                                   EXIT_USAGE)
        # Check every project first: nothing is registered when one of them is wrong.
        for pid in pids:
            self.get_project(pid)
        done = []
        for pid in pids:
            try:
                done.append(self._register_one(url, pid, title=title, basic_auth=basic_auth, interactive=interactive,
                                               description=description, extra_params=extra_params, verify=verify))
            except LabelStudioError as exc:
                if not done:
                    raise
                raise LabelStudioError(f"{exc}{self._roll_back(done)}", exc.exit_code, exc.status) from None
        return done

    def _roll_back(self, done: list) -> str:
        """Undo what a failed register() created in earlier projects; name what it updated (Label
        Studio does not give the old basic-auth password back, so an update cannot be undone)."""
        removed, kept, stuck = [], [], []
        for reg in done:
            name = f"backend {reg.backend_id} in project {reg.project}"
            if not reg.created:
                kept.append(name)
                continue
            try:
                resp = self.request("DELETE", f"/api/ml/{reg.backend_id}")
                if resp.status_code < 400 or resp.status_code == 404:
                    self._delete_webhooks(reg.project, reg.url)
                    removed.append(name)
                    continue
            except LabelStudioError:
                pass
            stuck.append(name)
        text = ""
        if removed:
            text += f"; removed again what this run had created before: {', '.join(removed)}"
        if stuck:
            text += (f"; could not remove {', '.join(stuck)}: remove each with label-studio-ml disconnect "
                     "--backend-id <its id>")
        if kept:
            text += f"; updated before this failure, keeping the new settings: {', '.join(kept)}"
        return text

    def _register_one(self, url, pid, *, title, basic_auth, interactive, description, extra_params, verify):
        existing = self.backends(pid)
        match = ([b for b in existing if _normal_url(b.get("url")) == url]
                 or ([b for b in existing if title and b.get("title") == title]))
        body = {"url": url, "project": pid, "is_interactive": bool(interactive),
                "title": title or (match[0].get("title") if match else None) or f"lsdeploy {url}"}
        if description is not None:
            body["description"] = description
        if extra_params is not None:
            body["extra_params"] = extra_params
        if basic_auth:
            body.update(auth_method="BASIC_AUTH", basic_auth_user=basic_auth[0], basic_auth_pass=basic_auth[1])
        else:
            body.update(auth_method="NONE", basic_auth_user=None)
        old_url = None
        if match:
            old_url = _normal_url(match[0].get("url"))
        created = not match
        for attempt in range(self.attempts):
            if match:
                # PATCH without url and project answers 500 in Label Studio 1.23: always send both.
                resp = self.request("PATCH", f"/api/ml/{match[0]['id']}", json=body)
            else:
                resp = self.request("POST", "/api/ml/", json=body)
            # Label Studio gives /health 1 s: a busy backend (or machine) can miss it; try again
            # (an HTTP status from /health is the backend's answer, not a miss).
            reason = _reason(resp) if resp.status_code == 400 else ""
            if "health check failed" not in reason or _health_status(reason):
                break
            time.sleep(self.retry_pause)
        if resp.status_code >= 400:
            error = self._register_error(resp, body, basic_auth)
            if created and self._remove_leftovers(pid, url, {b.get("id") for b in existing}):
                # Label Studio 1.23 saves the backend before its webhook; a refused webhook still
                # answers an error: the backend was fine, the webhook address was not.
                if error.status == 403:
                    error = LabelStudioError(
                        f"Label Studio accepted the backend {url} but refused its webhook {url}/webhook (the "
                        "annotation events) as a local or private address: set SSRF_PROTECTION_ENABLED=false "
                        "(webhooks; ML_BLOCK_LOCAL_IP=false covers backend calls) in Label Studio's environment "
                        "and restart it, or give the backend a public URL", EXIT_REGISTER, 403)
                error = LabelStudioError(f"{error}; nothing was registered", error.exit_code, error.status)
            raise error
        data = self._json(resp)
        backend_id = int(data["id"])
        # Duplicates left by earlier tools (same URL twice): keep one.
        for extra in match[1:]:
            if _normal_url(extra.get("url")) == url:
                self.request("DELETE", f"/api/ml/{extra['id']}")
        try:
            webhook_id = self._ensure_webhook(pid, url, basic_auth)
        except LabelStudioError as exc:
            if created:  # a failed connect leaves nothing behind
                self.request("DELETE", f"/api/ml/{backend_id}")
                raise LabelStudioError(f"{exc}; nothing was registered", exc.exit_code, exc.status) from None
            raise
        if old_url and old_url != url and not any(_normal_url(b.get("url")) == old_url
                                                  for b in existing if b.get("id") != backend_id):
            self._delete_webhooks(pid, old_url)
        logger.info("%s ML backend %s in project %s", "registered" if created else "updated", backend_id, pid)
        registration = Registration(
            backend_id=backend_id, project=pid, url=url, title=data.get("title") or "", state=data.get("state") or "",
            model_version=data.get("model_version") or "", created=created,
            is_interactive=bool(data.get("is_interactive")), basic_auth=bool(basic_auth), webhook_id=webhook_id,
            error_message=data.get("error_message") or "",
        )
        if verify:
            checked = self.verify(backend_id)
            for _ in range(self.attempts - 1):
                if checked.state != "DI":
                    break
                time.sleep(self.retry_pause)  # a missed 1 s health check: Label Studio re-checks on read
                checked = self.verify(backend_id)
            checked.created, checked.webhook_id, checked.basic_auth = created, webhook_id, bool(basic_auth)
            registration = checked
            problem = None
            if not registration.connected:
                problem = self._state_message(registration, basic_auth)
            elif not registration.model_version:
                problem = self._no_model_version(registration, basic_auth)
            elif registration.test_prediction and not registration.test_prediction["ok"]:
                said = _answered(self._backend_reason("predict", backend_id, basic_auth))
                problem = (f"Label Studio reached {url} in project {pid} but its test prediction failed: "
                           f"{registration.test_prediction['detail']}{said}; check the backend's log "
                           "(label-studio-ml start prints each error)")
            if problem:
                if created:  # a failed connect leaves nothing behind
                    self.request("DELETE", f"/api/ml/{backend_id}")
                    self._delete_webhooks(pid, url)
                    problem += "; nothing was registered"
                else:
                    problem += f"; backend {backend_id} stays registered with the new settings"
                raise LabelStudioError(problem, EXIT_REGISTER)
        return registration

    def _register_error(self, resp, body: dict, basic_auth) -> LabelStudioError:
        url, pid = body["url"], body["project"]
        reason = _reason(resp)
        low = reason.lower()
        setup = re.search(r"Reason: (.*?)\.?\s*Check the ML backend", reason, re.S)
        setup_reason = setup.group(1).strip() if setup else reason
        auth_fix = ("Label Studio's credentials were refused: check --basic-auth-user/--basic-auth-pass "
                    "(BASIC_AUTH_USER/BASIC_AUTH_PASS) against the backend's" if basic_auth else
                    "the backend requires basic auth: pass its --basic-auth-user/--basic-auth-pass "
                    "(BASIC_AUTH_USER/BASIC_AUTH_PASS)")
        if resp.status_code == 403 and ("reserved network" in low or "not allowed" in low or "ssrf" in low):
            return LabelStudioError(f"Label Studio refused {url}: {reason} {SSRF_FIX}", EXIT_REGISTER, 403)
        if "resolve hostname" in low:
            return LabelStudioError(f"Label Studio cannot resolve the backend's host ({reason}): use an address "
                                    "Label Studio's machine can resolve", EXIT_REGISTER, resp.status_code)
        if "authentication parameters" in low or (setup and re.search(r"\b401\b|unauthorized", setup_reason, re.I)):
            return LabelStudioError(f"Label Studio reached {url} but {auth_fix} (Label Studio said: {setup_reason})",
                                    EXIT_REGISTER, resp.status_code)
        status = _health_status(reason)
        if status:
            return LabelStudioError(
                f"Label Studio reached the backend at {url} but its /health answered "
                f"{self._backend_reason('health', body, basic_auth) or status}; check the backend's log "
                "(label-studio-ml start prints each error)", EXIT_REGISTER, resp.status_code)
        if "health check failed" in low or "can't connect" in low:
            return LabelStudioError(
                f"Label Studio cannot reach the backend at {url} ({reason}): the URL must be reachable from Label "
                f"Studio's machine (not only from yours); check it is running (GET {url}/health) and the firewall",
                EXIT_REGISTER, resp.status_code)
        if setup:
            return LabelStudioError(
                f"the backend at {url} failed Label Studio's /setup call for project {pid}: {setup_reason}"
                f"{_answered(self._backend_reason('setup', body, basic_auth))}; check the backend's log (is the model "
                "compatible with the project's label config?)", EXIT_REGISTER, resp.status_code)
        return LabelStudioError(f"Label Studio refused to register {url} in project {pid} "
                                f"({resp.status_code}): {reason}", EXIT_REGISTER, resp.status_code)

    def _backend_reason(self, call: str, backend, basic_auth) -> str:
        """The backend's own words for a call ("health", "setup" or "predict") that Label Studio
        reports only as an HTTP status: the same call repeated from this machine with the same
        basic auth, as "500: <its JSON error>". "" when the backend is not reachable from here
        or gives no JSON `error`."""
        resp = self._repeat(call, backend, basic_auth)
        if resp is None or resp.status_code < 400:
            return ""
        try:
            error = resp.json().get("error")
        except (ValueError, AttributeError):
            return ""
        if not error:
            return ""
        return f"{resp.status_code}: {' '.join(str(error).split())[:600]}"

    def _repeat(self, call: str, backend, basic_auth):
        """Send the backend (its id, or a dict with url, project, extra_params: what Label Studio
        stores or was sent) the call Label Studio makes; the response, or None when it cannot be
        made from here. Not sent: the Label Studio key (/setup's access_token is Label Studio's)."""
        import requests

        body = None
        try:
            if not isinstance(backend, dict):
                backend = self.get_backend(backend)
            url, pid = _normal_url(backend.get("url")), _project_id(backend.get("project"))
            if call != "health":
                project = self.get_project(pid)
                uid = _project_uid(project)
                if call == "setup":
                    body = {"project": uid, "schema": project.get("label_config"),
                            "extra_params": backend.get("extra_params")}
                else:
                    tasks = self.call("GET", "/api/tasks/", f"reading a task of project {pid}",
                                      params={"project": pid, "page_size": 1})
                    tasks = tasks.get("tasks") if isinstance(tasks, dict) else tasks
                    if not tasks:
                        return None
                    first = tasks[0]
                    task = {"id": first["id"], "data": first.get("data") or {}, "meta": first.get("meta") or {},
                            "annotations": [], "predictions": [], "project": pid}
                    body = {"tasks": [task], "project": uid, "label_config": project.get("label_config"),
                            "params": {"login": None, "password": None, "context": None}}
            return requests.request("GET" if call == "health" else "POST", f"{url}/{call}", json=body,
                                    auth=tuple(basic_auth) if basic_auth else None, timeout=min(self.timeout, 30.0))
        except (LabelStudioError, requests.RequestException, KeyError, TypeError):
            return None

    def _remove_leftovers(self, pid: int, url: str, known: set) -> bool:
        """Delete backends with `url` that a failed create left behind (ids not in `known`)."""
        removed = False
        for backend in self.backends(pid):
            if backend.get("id") not in known and _normal_url(backend.get("url")) == url:
                self.request("DELETE", f"/api/ml/{backend['id']}")
                removed = True
        if removed:
            self._delete_webhooks(pid, url)
        return removed

    def _state_message(self, reg: Registration, basic_auth=None) -> str:
        if reg.state == "ER":
            said = _answered(self._backend_reason("setup", reg.backend_id, basic_auth))
            return (f"Label Studio reports an error for the backend {reg.url} in project {reg.project}: "
                    f"{reg.error_message or 'no details'}{said}; check the backend's log")
        return (f"Label Studio sees the backend {reg.url} in project {reg.project} as "
                f"{STATE_NAMES.get(reg.state, reg.state or 'unknown')}: make sure it is reachable from Label Studio's "
                "machine")

    def _no_model_version(self, reg: Registration, basic_auth=None) -> str:
        resp = self._repeat("setup", reg.backend_id, basic_auth)
        answered = ""
        if resp is not None and resp.ok:
            try:
                answered = f" (its /setup answers {resp.json().get('model_version')!r} here)"
            except (AttributeError, ValueError):
                pass
        return (f"Label Studio shows no model version for the backend {reg.url} in project {reg.project}{answered}: "
                "/setup must answer {\"model_version\": \"<a non-empty string>\"}; check the model's model_version")

    # -- webhooks -----------------------------------------------------------------------------
    def _ensure_webhook(self, pid: int, url: str, basic_auth) -> Optional[int]:
        """The project webhook <url>/webhook, carrying the backend's basic-auth header."""
        hook_url = url + "/webhook"
        headers = {"Authorization": _basic_header(*basic_auth)} if basic_auth else {}
        hooks = [h for h in self.webhooks(pid) if _normal_url(h.get("url")) == hook_url]
        if not hooks:
            resp = self.request("POST", "/api/webhooks/", json={
                "project": pid, "url": hook_url, "send_payload": True, "send_for_all_actions": True,
                "headers": headers, "is_active": True})
            if resp.status_code >= 400:
                reason = _reason(resp)
                if resp.status_code == 403 or "reserved network" in reason.lower():
                    raise LabelStudioError(
                        f"Label Studio accepted the backend but refused its webhook {hook_url}, so annotations "
                        f"would never reach it ({reason}): {SSRF_FIX}", EXIT_REGISTER, resp.status_code)
                raise LabelStudioError(f"creating the webhook {hook_url} failed: {resp.status_code} {reason}",
                                       EXIT_REGISTER, resp.status_code)
            return int(self._json(resp)["id"])
        hook = hooks[0]
        if (hook.get("headers") or {}) != headers or not hook.get("is_active", True):
            self.call("PATCH", f"/api/webhooks/{hook['id']}/", f"setting the headers of webhook {hook_url}",
                       json={"url": hook_url, "project": pid, "headers": headers, "is_active": True})
        for extra in hooks[1:]:
            self.request("DELETE", f"/api/webhooks/{extra['id']}/")
        return int(hook["id"])

    def _delete_webhooks(self, pid: int, url: str) -> list:
        hook_url = _normal_url(url) + "/webhook"
        removed = []
        for hook in self.webhooks(pid):
            if _normal_url(hook.get("url")) == hook_url:
                resp = self.request("DELETE", f"/api/webhooks/{hook['id']}/")
                if resp.status_code < 400 or resp.status_code == 404:
                    removed.append(int(hook["id"]))
        return removed

    # -- verify -------------------------------------------------------------------------------
    def verify(self, backend_id: int, test_prediction: bool = True) -> Registration:
        """Read the backend back (Label Studio re-checks /health and /setup), then ask for a test
        prediction on a random task of the project (skipped when the project has no tasks)."""
        data = self.get_backend(backend_id)
        pid = _project_id(data.get("project"))
        reg = Registration(
            backend_id=int(data["id"]), project=pid, url=_normal_url(data.get("url")), title=data.get("title") or "",
            state=data.get("state") or "", model_version=data.get("model_version") or "",
            is_interactive=bool(data.get("is_interactive")), basic_auth=data.get("auth_method") == "BASIC_AUTH",
            error_message=data.get("error_message") or "",
        )
        if test_prediction and reg.connected:
            reg.test_prediction = self.test_prediction(backend_id)
        return reg

    def test_prediction(self, backend_id: int) -> dict:
        """Label Studio's own test prediction on a random task: {"ok": bool, "detail": str}."""
        for attempt in range(self.attempts):
            resp = self.request("POST", f"/api/ml/{int(backend_id)}/predict/test", params={"random": "true"},
                                timeout=max(self.timeout, 120.0))
            if resp.status_code < 400:
                return {"ok": True, "detail": "ok"}
            reason = _reason(resp)
            if "no tasks" in reason.lower():
                return {"ok": True, "detail": "skipped: the project has no tasks yet"}
            if attempt + 1 < self.attempts:
                time.sleep(self.retry_pause)  # Label Studio checks /health (1 s) before predicting
        return {"ok": False, "detail": f"{resp.status_code} {reason}"}

    def train(self, backend_id: int) -> None:
        """Ask Label Studio to send START_TRAINING to the backend."""
        self.call("POST", f"/api/ml/{int(backend_id)}/train", f"starting training of backend {backend_id}",
                   json={}, timeout=max(self.timeout, 120.0))

    # -- unregister ---------------------------------------------------------------------------
    def unregister(self, projects: Iterable, *, url: Optional[str] = None, backend_id: Optional[int] = None) -> list:
        """Delete the backend matching `url` or `backend_id` and its webhook from each project.
        With `backend_id`, `projects` may be empty (the backend's own project is used); a backend
        of another project than those given is an error, not "nothing to remove"."""
        if not url and backend_id is None:
            raise LabelStudioError("say which backend to remove: its URL or --backend-id", EXIT_USAGE)
        url = _normal_url(url) if url else None
        pids = [_project_id(p) for p in projects or ()]
        if backend_id is not None:
            try:
                backend = self.get_backend(backend_id)
            except LabelStudioError as exc:
                if exc.status != 404:
                    raise
                if not pids:  # already gone: nothing to remove
                    return []
            else:
                owner = _project_id(backend.get("project"))
                if pids and owner not in pids:
                    raise LabelStudioError(
                        f"backend {backend_id} belongs to project {owner}, not project {', '.join(map(str, pids))}: "
                        f"pass --project {owner}, or leave --project out with --backend-id", EXIT_USAGE)
                pids = pids or [owner]
        if not pids:
            raise LabelStudioError("no project: pass --project ID (LABEL_STUDIO_PROJECT)", EXIT_USAGE)
        removals = []
        for pid in pids:
            self.get_project(pid)
            gone, urls = [], set()
            for backend in self.backends(pid):
                if (url and _normal_url(backend.get("url")) == url) or (
                        backend_id is not None and int(backend["id"]) == int(backend_id)):
                    resp = self.request("DELETE", f"/api/ml/{backend['id']}")
                    if resp.status_code >= 400 and resp.status_code != 404:
                        raise LabelStudioError(f"removing ML backend {backend['id']} failed: {resp.status_code} "
                                               f"{_reason(resp)}", EXIT_REGISTER, resp.status_code)
                    gone.append(int(backend["id"]))
                    urls.add(_normal_url(backend.get("url")))
            if url:
                urls.add(url)
            hooks = []
            for hook_url in sorted(urls):
                hooks += self._delete_webhooks(pid, hook_url)
            removals.append(Removal(project=pid, backend_ids=gone, webhook_ids=hooks))
        return removals


# -- plain functions (for `deploy` and other callers) -------------------------------------------
def register(host: str, api_key: str, url: str, projects: Iterable, *, title: Optional[str] = None,
             basic_auth: Optional[Sequence[str]] = None, interactive: bool = False,
             description: Optional[str] = None, extra_params: Optional[dict] = None, verify: bool = True,
             timeout: float = DEFAULT_TIMEOUT) -> list:
    return LabelStudio(host, api_key, timeout=timeout).register(
        url, projects, title=title, basic_auth=basic_auth, interactive=interactive, description=description,
        extra_params=extra_params, verify=verify)


def unregister(host: str, api_key: str, projects: Iterable, *, url: Optional[str] = None,
               backend_id: Optional[int] = None, timeout: float = DEFAULT_TIMEOUT) -> list:
    return LabelStudio(host, api_key, timeout=timeout).unregister(projects, url=url, backend_id=backend_id)


def verify(host: str, api_key: str, backend_id: int, *, timeout: float = DEFAULT_TIMEOUT) -> Registration:
    return LabelStudio(host, api_key, timeout=timeout).verify(backend_id)
