"""The ML-backend operations of a Label Studio client: register (create or update, never
duplicate) a backend in projects with its webhook, check what Label Studio sees of it, remove it.

`BackendRegistry` is mixed into `client.LabelStudio`, which gives it `request`, `call`, `_json`,
`get_project`, `first_task`, `shown` and `timeout`; this module imports nothing of the client
(imports point down: client -> backends -> versions -> errors).
"""
from __future__ import annotations

import base64
import logging
import re
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

from ..errors import EXIT_ERROR, EXIT_REGISTER, EXIT_USAGE
from . import versions
from .errors import LabelStudioError, _project_id, _reason

logger = logging.getLogger(__name__)

STATE_NAMES = {"CO": "connected", "DI": "disconnected", "ER": "error", "TR": "training", "PR": "predicting"}
SSRF_FIX = ("Label Studio refuses local and private addresses by default: set ML_BLOCK_LOCAL_IP=false "
            "(ML backend calls) and SSRF_PROTECTION_ENABLED=false (the project webhook that delivers annotations) "
            "in Label Studio's environment and restart it, or give the backend a public URL")



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
    project_model_version: str = ""   # the predictions the project uses (Settings > Annotation)
    note: str = ""                    # what the user may have to do for the Data Manager's scores

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



class BackendRegistry:
    """Register, verify and remove ML backends and their project webhooks (see the module docstring)."""

    attempts = 3         # tries when Label Studio's 1 s health check of the backend misses
    retry_pause = 1.0

    # -- reads --------------------------------------------------------------------------------
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
        return self.call("GET", "/api/webhooks/", f"listing the webhooks of project {pid}",
                         params={"project": pid}) or []

    # -- register -----------------------------------------------------------------------------
    def register(self, url: str, projects: Iterable, *, title: Optional[str] = None,
                 basic_auth: Optional[Sequence[str]] = None, interactive: Optional[bool] = None,
                 description: Optional[str] = None, extra_params: Optional[dict] = None,
                 verify: bool = True, use_version: Optional[bool] = None) -> list:
        """Create or update the backend `url` in each project; see the package docstring. On an
        existing backend, an option left None (title, basic_auth, interactive, description,
        extra_params) keeps what Label Studio has; a new backend gets the defaults. Each project
        on no model version or on the backend's title is pointed at the backend's model version
        (`use_version` None), any project but one using another backend (True), none (False);
        see `versions`."""
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
                reg = done[-1]
                if use_version is not False and reg.model_version:
                    reg.project_model_version, reg.note = versions.use_version(
                        self, pid, reg.backend_id, reg.model_version, self.attempts, force=bool(use_version))
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
        # An existing backend keeps every setting that was not passed (the user may have changed it
        # in Label Studio's UI); a PATCH without them leaves them as they are. A new one gets defaults.
        body = {"url": url, "project": pid}
        given = {"title": title, "is_interactive": interactive, "description": description,
                 "extra_params": extra_params}
        if not match:
            given = {**given, "title": title or f"lsdeploy {url}", "is_interactive": bool(interactive)}
        body.update({key: value for key, value in given.items() if value is not None})
        if basic_auth:
            body.update(auth_method="BASIC_AUTH", basic_auth_user=basic_auth[0], basic_auth_pass=basic_auth[1])
        elif not match:
            body.update(auth_method="NONE", basic_auth_user=None)
        elif match[0].get("auth_method") == "BASIC_AUTH":
            # Label Studio checks a PATCH with the credentials in it; an empty password means its
            # stored one (which it never gives back).
            body.update(auth_method="BASIC_AUTH", basic_auth_user=match[0].get("basic_auth_user"), basic_auth_pass="")
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
            # basic auth not passed on an existing backend: its webhook keeps the headers it has
            webhook_id = self._ensure_webhook(pid, url, basic_auth, keep_headers=bool(match) and not basic_auth)
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
            is_interactive=bool(data.get("is_interactive")), basic_auth=data.get("auth_method") == "BASIC_AUTH",
            webhook_id=webhook_id, error_message=data.get("error_message") or "",
        )
        if verify:
            checked = self.verify(backend_id)
            for _ in range(self.attempts - 1):
                if checked.state != "DI":
                    break
                time.sleep(self.retry_pause)  # a missed 1 s health check: Label Studio re-checks on read
                checked = self.verify(backend_id)
            checked.created, checked.webhook_id = created, webhook_id
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
                    first = self.first_task(pid)
                    if not first:
                        return None
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
    def _ensure_webhook(self, pid: int, url: str, basic_auth, keep_headers: bool = False) -> Optional[int]:
        """The project webhook <url>/webhook, carrying the backend's basic-auth header (with
        `keep_headers`, an existing webhook keeps the headers it has)."""
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
        if keep_headers:
            headers = hook.get("headers") or {}
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
