"""Reading task files: Label Studio uploads, cloud-storage links, plain URLs.

The server records the `hostname` and `access_token` that Label Studio sends to /setup, so a
backend reads task files without duplicating Label Studio's address and key in its own
environment (LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY remain a fallback, also tried when Label
Studio refuses the /setup key). Either kind of key works: a legacy key goes as `Token`, a
personal access token is exchanged for a short-lived access token (`lsdeploy.labelstudio`).

Safety rules:
- the key is sent only to the Label Studio host it belongs to, never to another host;
- `file://` URLs and internal addresses (loopback, private, link-local) are refused unless
  TASK_DATA_ALLOW_PRIVATE=true, except Label Studio's own host;
- downloads have a timeout and a size limit (TASK_DATA_TIMEOUT, TASK_DATA_MAX_BYTES).
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import tempfile
import threading
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urljoin, urlsplit

from .errors import LsdeployError

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_BYTES = 512 * 1024 * 1024


class TaskDataError(LsdeployError):
    """A task file could not (or may not) be read."""


@dataclass(frozen=True)
class Connection:
    url: Optional[str]
    token: Optional[str]

    def __repr__(self):  # never show the token
        return f"Connection(url={self.url!r}, token={'***' if self.token else None})"


_connections: dict[str, Connection] = {}
_lock = threading.Lock()


def remember(project_id: str, url: Optional[str], token: Optional[str]) -> None:
    """Keep what /setup sent for a project (in memory only: never written anywhere)."""
    if not url and not token:
        return
    with _lock:
        _connections[str(project_id)] = Connection(url.rstrip("/") if url else None, token or None)


def env_token() -> Optional[str]:
    """The key from the backend's own environment (the fallback when /setup sent none, or one that is refused)."""
    return os.environ.get("LABEL_STUDIO_API_KEY") or os.environ.get("LABEL_STUDIO_ACCESS_TOKEN") or None


def connection(project_id: str) -> Connection:
    with _lock:
        conn = _connections.get(str(project_id))
    env_url = os.environ.get("LABEL_STUDIO_URL") or os.environ.get("LABEL_STUDIO_HOST")
    env_key = env_token()
    if conn is None:
        return Connection(env_url.rstrip("/") if env_url else None, env_key)
    return Connection(conn.url or env_url, conn.token or env_key)


def is_preload_needed(value: str) -> bool:
    value = value.strip()
    return value.startswith(("http://", "https://", "/data/", "s3://", "gs://", "azure-blob://", "file://"))


def _origin(url: str) -> tuple:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _is_internal(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False  # cannot resolve: the download itself will fail with a clear error
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved or addr.is_unspecified:
            return True
    return False


_clients: dict = {}  # (Label Studio URL, key) -> lsdeploy.labelstudio.LabelStudio: access tokens are cached


def _auth_header(label_studio_url: str, token: str) -> str:
    """`Token <key>` for a legacy key, `Bearer <access>` for a JWT access token, and for a
    personal access token `Bearer` with the short-lived access token it is exchanged for."""
    from .labelstudio import LabelStudio, LabelStudioError

    with _lock:
        client = _clients.get((label_studio_url, token))
        if client is None:
            if len(_clients) > 64:
                _clients.clear()
            client = _clients[(label_studio_url, token)] = LabelStudio(
                label_studio_url, token, timeout=float(os.environ.get("TASK_DATA_TIMEOUT", DEFAULT_TIMEOUT)))
    try:
        return client.authorization()
    except LabelStudioError as exc:
        raise TaskDataRefused(f"reading task files from {label_studio_url}: {exc}") from None


class TaskDataRefused(TaskDataError):
    """Label Studio refused the key (401/403)."""


def resolve(url: str, label_studio_url: Optional[str], task_id=None) -> str:
    """Absolute URL to download; cloud-storage links go through Label Studio's resolver."""
    if url.startswith(("s3://", "gs://", "azure-blob://")):
        if not label_studio_url:
            raise TaskDataError(
                f"task file {url.split('?')[0]} is in cloud storage and needs Label Studio to resolve it: "
                "connect the backend to Label Studio or set LABEL_STUDIO_URL"
            )
        if task_id is None:
            raise TaskDataError("resolving a cloud-storage URL needs the task id (get_local_path(url, task_id=...))")
        from urllib.parse import quote

        return f"{label_studio_url}/tasks/{task_id}/resolve/?fileuri={quote(url, safe='')}"
    if url.startswith("/"):
        if not label_studio_url:
            raise TaskDataError(
                f"task file {url} is a Label Studio path: connect the backend to Label Studio "
                "(it sends its address in /setup) or set LABEL_STUDIO_URL"
            )
        return urljoin(label_studio_url + "/", url.lstrip("/"))
    return url


def get_local_path(url: str, label_studio_url: Optional[str] = None, token: Optional[str] = None,
                   cache_dir: Optional[str] = None, task_id=None, fallback_token: Optional[str] = None) -> str:
    """Download `url` once into the cache and return the local path. When Label Studio refuses
    `token` (say an expired one from /setup), `fallback_token` (the backend's own key) is tried."""
    if url.startswith("file://") or (not url.startswith(("http://", "https://", "/", "s3://", "gs://", "azure-blob://"))):
        if os.environ.get("TASK_DATA_ALLOW_LOCAL", "").lower() in ("1", "true", "yes"):
            path = url[len("file://"):] if url.startswith("file://") else url
            if os.path.exists(path):
                return path
        raise TaskDataError(
            f"task file {url!r} is a local path; set TASK_DATA_ALLOW_LOCAL=true to read local files"
        )
    absolute = resolve(url, label_studio_url, task_id)
    same_host = bool(label_studio_url) and _origin(absolute) == _origin(label_studio_url)
    if not same_host and os.environ.get("TASK_DATA_ALLOW_PRIVATE", "").lower() not in ("1", "true", "yes"):
        host = urlsplit(absolute).hostname or ""
        if _is_internal(host):
            raise TaskDataError(
                f"task file host {host} is an internal address; set TASK_DATA_ALLOW_PRIVATE=true to allow it"
            )
    cache_dir = cache_dir or os.environ.get("TASK_DATA_CACHE") or os.path.join(tempfile.gettempdir(), "lsdeploy-task-data")
    os.makedirs(cache_dir, exist_ok=True)
    name = os.path.basename(urlsplit(absolute).path) or "file"
    target = os.path.join(cache_dir, hashlib.sha256(absolute.encode()).hexdigest()[:16] + "__" + name[-100:])
    if os.path.exists(target):
        return target
    keys = [k for k in dict.fromkeys([token, fallback_token]) if k] if same_host else []
    for index, key in enumerate(keys or [None]):
        try:
            headers = {"Authorization": _auth_header(label_studio_url, key)} if key else {}
            _download(absolute, headers, target)
            return target
        except TaskDataRefused:
            if index + 1 >= len(keys):
                raise
    return target


def _download(url: str, headers: dict, target: str) -> None:
    import requests

    timeout = float(os.environ.get("TASK_DATA_TIMEOUT", DEFAULT_TIMEOUT))
    limit = int(os.environ.get("TASK_DATA_MAX_BYTES", DEFAULT_MAX_BYTES))
    shown = url.split("?")[0]
    try:
        # Redirects are followed by hand so that the key never travels to another host.
        with requests.get(url, headers=headers, timeout=timeout, stream=True, allow_redirects=False) as resp:
            if resp.is_redirect:
                location = urljoin(url, resp.headers.get("Location", ""))
                if _origin(location) != _origin(url):
                    headers = {}
                return _download(location, headers, target)
            if resp.status_code in (401, 403):
                raise TaskDataRefused(
                    f"reading task file {shown} was refused ({resp.status_code}): "
                    "check that the backend is connected to Label Studio with a valid key"
                )
            if resp.status_code >= 400:
                raise TaskDataError(f"reading task file {shown} failed: HTTP {resp.status_code}")
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".part-")
            size = 0
            try:
                with os.fdopen(fd, "wb") as out:
                    for chunk in resp.iter_content(1 << 16):
                        size += len(chunk)
                        if size > limit:
                            raise TaskDataError(
                                f"task file {shown} is larger than TASK_DATA_MAX_BYTES={limit}"
                            )
                        out.write(chunk)
                os.replace(tmp, target)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
    except requests.RequestException as exc:
        raise TaskDataError(f"reading task file {shown} failed: {type(exc).__name__}") from None
