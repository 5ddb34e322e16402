"""Reading task files: Label Studio uploads, cloud-storage links, plain URLs.

The server records the `hostname` and `access_token` that Label Studio sends to /setup, so a
backend reads task files without duplicating Label Studio's address and key in its own
environment (LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY remain a fallback, also tried when Label
Studio refuses the /setup key). Either kind of key works: a legacy key goes as `Token`, a
personal access token is exchanged for a short-lived access token (`lsdeploy.labelstudio`).

Safety rules (docs/taskdata.md):
- a key goes only to the origin (scheme, host, port) it belongs to: the environment key to
  LABEL_STUDIO_URL's, a /setup key to the host that /setup named; nowhere else, whoever asks;
- with LABEL_STUDIO_URL set, a /setup naming another origin is ignored (its address is not
  trusted, its key not used): whoever may call /setup cannot point the backend elsewhere;
- `file://` URLs and internal addresses (loopback, private, link-local, shared, reserved,
  multicast...) are refused unless TASK_DATA_ALLOW_PRIVATE allows them, except Label Studio's
  own origin; every redirect hop is checked again, and the connection goes to the address
  that was checked (no second DNS lookup);
- downloads have a per-read timeout, a total deadline, a size limit and at most 5 redirects
  (TASK_DATA_TIMEOUT, TASK_DATA_DEADLINE, TASK_DATA_MAX_BYTES).
"""
from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import os
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urljoin, urlsplit

from .errors import LsdeployError

logger = logging.getLogger("lsdeploy.taskdata")
DEFAULT_TIMEOUT = 30.0                 # seconds per connect or read (TASK_DATA_TIMEOUT)
DEFAULT_DEADLINE = 300.0               # seconds for a whole download, redirects included (TASK_DATA_DEADLINE)
DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # TASK_DATA_MAX_BYTES
MAX_REDIRECTS = 5
MAX_PROJECTS = 128                     # projects whose /setup address and key are kept (least recently used go)
MAX_URL_CHARS = 2048
MAX_TOKEN_CHARS = 4096
REDIRECTS = (301, 302, 303, 307, 308)
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
# IPv6 ranges that carry, translate or tunnel to an IPv4 address (which could be an internal one,
# reached through a relay or gateway), or that are not global unicast although Python's tables
# say so: never read from, whatever the address inside.
IPV6_REFUSED = tuple(ipaddress.ip_network(net) for net in (
    "::/96",            # IPv4-compatible (deprecated, RFC 4291)
    "64:ff9b::/96",     # NAT64 well-known prefix (RFC 6052)
    "64:ff9b:1::/48",   # NAT64 local-use prefix (RFC 8215)
    "2001::/32",        # Teredo (RFC 4380)
    "2002::/16",        # 6to4 (RFC 3056)
    "fec0::/10",        # site-local (deprecated, RFC 3879)
))


class TaskDataError(LsdeployError):
    """A task file could not (or may not) be read."""


class TaskDataRefused(TaskDataError):
    """Label Studio refused the key (401/403)."""


@dataclass(frozen=True)
class Connection:
    url: Optional[str]
    token: Optional[str]

    def __repr__(self):  # never show the token
        return f"Connection(url={self.url!r}, token={'***' if self.token else None})"


_connections: "OrderedDict[str, Connection]" = OrderedDict()
_lock = threading.Lock()


def remember(project_id: str, url: Optional[str], token: Optional[str]) -> None:
    """Keep what /setup sent for a project (in memory only: never written anywhere)."""
    if url and len(url) > MAX_URL_CHARS:
        raise TaskDataError(f"'hostname' is longer than {MAX_URL_CHARS} characters: "
                            "send Label Studio's address, like https://label-studio.example.com")
    if token and len(token) > MAX_TOKEN_CHARS:
        raise TaskDataError(f"'access_token' is longer than {MAX_TOKEN_CHARS} characters: "
                            "send a Label Studio API key")
    if not url and not token:
        return
    trusted = env_url()
    if url and trusted and _origin(url) != _origin(trusted):
        # LABEL_STUDIO_URL says which Label Studio this backend serves: a /setup naming another
        # host (anyone who can call /setup can) gets neither its key used nor its address trusted.
        logger.warning("/setup for project %s named Label Studio at %s, not LABEL_STUDIO_URL's %s: ignored "
                       "(task files are read from LABEL_STUDIO_URL)", project_id, _shown(url), _shown(trusted))
        return
    with _lock:
        _connections[str(project_id)] = Connection(url.rstrip("/") if url else None, token or None)
        _connections.move_to_end(str(project_id))
        while len(_connections) > MAX_PROJECTS:
            _connections.popitem(last=False)


def env_url() -> Optional[str]:
    """The Label Studio address from the backend's own environment."""
    url = os.environ.get("LABEL_STUDIO_URL") or os.environ.get("LABEL_STUDIO_HOST")
    return url.rstrip("/") if url else None


def env_token() -> Optional[str]:
    """The key from the backend's own environment (the fallback when /setup sent none, or one
    that is refused). It belongs to LABEL_STUDIO_URL and is never sent anywhere else."""
    return os.environ.get("LABEL_STUDIO_API_KEY") or os.environ.get("LABEL_STUDIO_ACCESS_TOKEN") or None


def connection(project_id: str) -> Connection:
    """Label Studio's address for a project and the key that belongs to it (None when no key
    belongs to that address)."""
    with _lock:
        conn = _connections.get(str(project_id))
        if conn is not None:
            _connections.move_to_end(str(project_id))
    url = (conn.url if conn else None) or env_url()
    token = conn.token if conn else None
    if token is None and _belongs(env_token(), url):
        token = env_token()
    return Connection(url, token)


def _belongs(key: Optional[str], url: Optional[str]) -> bool:
    """May `key` go to `url`? The environment key belongs to LABEL_STUDIO_URL's origin, a key
    /setup sent to the host it named (to LABEL_STUDIO_URL's when it named none). Any other key
    is the caller's own and goes where the caller sends it."""
    if not key or not url:
        return False
    owners = [env_url()] if key == env_token() else []
    with _lock:
        owners += [conn.url or env_url() for conn in _connections.values() if conn.token == key]
    if not owners:
        return True
    return any(owner and _origin(owner) == _origin(url) for owner in owners)


def is_preload_needed(value: str) -> bool:
    """Does this task value name a file to read rather than being the data itself? The kinds the
    reference SDK preloads: Label Studio paths (`/data/...`, `upload/...`), cloud storage links,
    http(s) URLs, and local paths that exist where TASK_DATA_ALLOW_LOCAL allows reading them."""
    value = value.strip()
    if value.startswith(("http://", "https://", "/data/", "upload/", "/upload/", "s3://", "gs://",
                         "azure-blob://", "file://")):
        return True
    return _local_allowed() and len(value) < 4096 and "\n" not in value and os.path.isfile(value)


def _local_allowed() -> bool:
    return os.environ.get("TASK_DATA_ALLOW_LOCAL", "").lower() in ("1", "true", "yes")


def _label_studio_path(url: str) -> str:
    """`upload/1/a.png` and `/upload/1/a.png`, as older tasks store them, are Label Studio's `/data/upload/...`."""
    if url.startswith(("upload/", "/upload/")):
        return "/data/" + url.lstrip("/")
    return url


def _origin(url: str) -> tuple:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # a port that is not a number: an origin nothing else has
        return parts.scheme, parts.netloc, None
    return parts.scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(parts.scheme)


def _shown(url: str) -> str:
    """A URL as errors show it: no query (signed URLs carry credentials), no user info."""
    from .labelstudio import without_userinfo

    return without_userinfo(url.split("?")[0])


def _is_internal(address: str) -> bool:
    """Is this IP address one a task file must not be read from (not on the public internet)?"""
    addr = ipaddress.ip_address(address.split("%")[0])
    if addr.version == 6 and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    elif addr.version == 6 and any(addr in net for net in IPV6_REFUSED):
        return True
    return (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved or addr.is_multicast
            or addr.is_unspecified or addr in SHARED_ADDRESS_SPACE or not addr.is_global)


def _allowed_internal():
    """TASK_DATA_ALLOW_PRIVATE: `true` allows every internal address, a comma-separated list of
    addresses or networks (`10.0.0.0/8,127.0.0.1`) allows those; unset allows none."""
    value = os.environ.get("TASK_DATA_ALLOW_PRIVATE", "").strip()
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("", "0", "false", "no"):
        return []
    try:
        return [ipaddress.ip_network(item.strip(), strict=False) for item in value.split(",") if item.strip()]
    except ValueError:
        raise TaskDataError(f"TASK_DATA_ALLOW_PRIVATE={value!r} is not `true` or a comma-separated list of "
                            "addresses or networks like 10.0.0.0/8") from None


def _addresses(url: str, trusted: Optional[str]) -> list:
    """Resolve the URL's host once; refuse it when any address is internal (unless allowed, or
    the URL is on the trusted Label Studio origin). The download connects to these addresses."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        infos = socket.getaddrinfo(host, parts.port or {"http": 80, "https": 443}[parts.scheme],
                                   type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        raise TaskDataError(f"reading task file {_shown(url)} failed: cannot resolve {host!r}") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if trusted and _origin(url) == _origin(trusted):
        return addresses
    allowed = _allowed_internal()
    for address in addresses:
        if allowed is not True and _is_internal(address) and not any(
                ipaddress.ip_address(address.split("%")[0]) in net for net in allowed):
            raise TaskDataError(
                f"task file host {host} is an internal address ({address}); "
                f"set TASK_DATA_ALLOW_PRIVATE=true (or ={address}) to allow it"
            )
    return addresses


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
                label_studio_url, token, timeout=_seconds("TASK_DATA_TIMEOUT", DEFAULT_TIMEOUT))
    try:
        return client.authorization()
    except LabelStudioError as exc:
        raise TaskDataRefused(f"reading task files from {_shown(label_studio_url)}: {exc}") from None


def _seconds(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        raise TaskDataError(f"{name} must be a number of seconds") from None


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
    `token` (say an expired one from /setup), `fallback_token` (the backend's own key) is tried.
    A key is only sent to Label Studio's origin, and only when it belongs there (see _belongs)."""
    url = _label_studio_path(url)
    remote = url.startswith(("http://", "https://", "/data/", "s3://", "gs://", "azure-blob://"))
    if not remote and _local_allowed():  # a file on this machine, where the operator allows it
        path = url[len("file://"):] if url.startswith("file://") else url
        if os.path.exists(path):
            return path
    if url.startswith("file://") or (not url.startswith(("http://", "https://", "/", "s3://", "gs://", "azure-blob://"))):
        raise TaskDataError(
            f"task file {url!r} is a local path; set TASK_DATA_ALLOW_LOCAL=true to read local files"
        )
    absolute = resolve(url, label_studio_url, task_id)
    cache_dir = cache_dir or os.environ.get("TASK_DATA_CACHE") or os.path.join(tempfile.gettempdir(), "lsdeploy-task-data")
    os.makedirs(cache_dir, exist_ok=True)
    name = os.path.basename(urlsplit(absolute).path) or "file"
    target = os.path.join(cache_dir, hashlib.sha256(absolute.encode()).hexdigest()[:16] + "__" + name[-100:])
    if os.path.exists(target):
        return target
    same_host = bool(label_studio_url) and _origin(absolute) == _origin(label_studio_url)
    keys = [k for k in dict.fromkeys([token, fallback_token]) if _belongs(k, label_studio_url)] if same_host else []
    for index, key in enumerate(keys or [None]):
        try:
            authorization = _auth_header(label_studio_url, key) if key else None
            _download(absolute, authorization, label_studio_url, target)
            return target
        except TaskDataRefused:
            if index + 1 >= len(keys):
                raise
    return target


def _download(url: str, authorization: Optional[str], label_studio_url: Optional[str], target: str) -> None:
    """Download with redirects followed by hand: every hop is checked (scheme, internal address)
    and connected to the address that was checked; `authorization` goes only to Label Studio's
    origin; at most MAX_REDIRECTS hops, all within TASK_DATA_DEADLINE. Through `requests`, so
    the tests of a backend that mock it (`responses`, `requests-mock`) apply here too."""
    import requests

    timeout = _seconds("TASK_DATA_TIMEOUT", DEFAULT_TIMEOUT)
    deadline = time.monotonic() + _seconds("TASK_DATA_DEADLINE", DEFAULT_DEADLINE)
    limit = int(os.environ.get("TASK_DATA_MAX_BYTES") or DEFAULT_MAX_BYTES)
    shown = _shown(url)
    with requests.Session() as session:
        session.trust_env = False  # no proxy (it would look the host up again), no .netrc
        adapter = _pinned_adapter_class()(label_studio_url, deadline, timeout, shown)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        for _ in range(MAX_REDIRECTS + 1):
            if urlsplit(url).scheme not in ("http", "https"):
                raise TaskDataError(f"task file {shown} redirects to {_shown(url)}: only http and https URLs are read")
            on_label_studio = bool(label_studio_url) and _origin(url) == _origin(label_studio_url)
            headers = {"User-Agent": "lsdeploy", "Accept-Encoding": "gzip, deflate"}
            if authorization and on_label_studio:
                headers["Authorization"] = authorization
            wait = _remaining(deadline, timeout, shown)
            try:
                resp = session.get(url, headers=headers, allow_redirects=False, stream=True,
                                   timeout=(wait, wait), verify=os.environ.get("REQUESTS_CA_BUNDLE") or True)
            except requests.RequestException as exc:
                raise TaskDataError(f"reading task file {shown} failed: {type(exc).__name__}") from None
            try:
                if resp.status_code in REDIRECTS and resp.headers.get("Location"):
                    url = urljoin(url, resp.headers["Location"])
                    continue
                if resp.status_code in (401, 403):
                    raise TaskDataRefused(
                        f"reading task file {shown} was refused ({resp.status_code}): "
                        "check that the backend is connected to Label Studio with a valid key"
                    )
                if resp.status_code >= 300:
                    raise TaskDataError(f"reading task file {shown} failed: HTTP {resp.status_code}")
                _save(resp.raw, target, limit, timeout, deadline, shown)
                return
            finally:
                resp.close()  # closes the connection too: nothing is kept alive
    raise TaskDataError(f"task file {shown} redirects more than {MAX_REDIRECTS} times")


@functools.lru_cache(maxsize=None)
def _pinned_adapter_class():
    """Made on first use: importing requests costs every server's start-up, most never download."""
    import requests.adapters
    import urllib3

    class PinnedAdapter(requests.adapters.HTTPAdapter):
        """Connects to the addresses _addresses checked (one DNS lookup, at connect time, so a
        mocked `send` needs none), in order until one answers, keeping the URL's host name for
        the Host header, TLS SNI and the certificate check. One connection, never pooled."""

        def __init__(self, trusted: Optional[str], deadline: float, timeout: float, shown: str):
            super().__init__(pool_connections=1, pool_maxsize=1, max_retries=0)
            self.trusted = trusted
            self.deadline, self.timeout, self.shown = deadline, timeout, shown
            self.candidates: Optional[list] = None
            self.index = 0

        def send(self, request, **kwargs):
            self.candidates, self.index = None, 0
            while True:
                try:
                    return super().send(request, **kwargs)
                except requests.ConnectionError:
                    if self.candidates is None or self.index + 1 >= len(self.candidates):
                        raise
                    self.index += 1  # the next checked address, within what is left of the deadline
                    wait = _remaining(self.deadline, self.timeout, self.shown)
                    kwargs["timeout"] = (wait, wait)

        def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
            parts = urlsplit(request.url)
            if self.candidates is None:
                self.candidates = _addresses(request.url, self.trusted)
                if not self.candidates:
                    raise TaskDataError(f"reading task file {_shown(request.url)} failed: "
                                        f"cannot resolve {parts.hostname!r}")
            request.headers["Host"] = parts.netloc.rsplit("@", 1)[-1]
            address = self.candidates[self.index]
            port = parts.port or {"http": 80, "https": 443}[parts.scheme]
            if parts.scheme == "https":
                return urllib3.HTTPSConnectionPool(address, port, server_hostname=parts.hostname,
                                                   assert_hostname=parts.hostname, maxsize=1, retries=False)
            return urllib3.HTTPConnectionPool(address, port, maxsize=1, retries=False)

    return PinnedAdapter


def _remaining(deadline: float, timeout: float, shown: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TaskDataError(f"reading task file {shown} took longer than TASK_DATA_DEADLINE")
    return min(timeout, left)


def _save(resp, target: str, limit: int, timeout: float, deadline: float, shown: str) -> None:
    from urllib3.exceptions import HTTPError

    too_big = f"task file {shown} is larger than TASK_DATA_MAX_BYTES={limit}"
    if (resp.headers.get("Content-Length") or "0").isdigit() and int(resp.headers.get("Content-Length") or 0) > limit:
        raise TaskDataError(too_big)
    read1 = getattr(resp, "read1", None)  # one network read, so the deadline is kept

    def read(amount):
        return read1(amount, decode_content=True) if read1 else resp.read(amount, decode_content=True)

    sock = getattr(resp.connection, "sock", None)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".part-")
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            while True:
                wait = _remaining(deadline, timeout, shown)
                if sock is not None:
                    sock.settimeout(wait)
                try:
                    chunk = read(1 << 16)
                except (HTTPError, OSError) as exc:
                    if time.monotonic() >= deadline:
                        raise TaskDataError(f"reading task file {shown} took longer than TASK_DATA_DEADLINE") from None
                    raise TaskDataError(f"reading task file {shown} failed: {type(exc).__name__}") from None
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise TaskDataError(too_big)
                out.write(chunk)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
