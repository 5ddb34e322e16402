"""The HTTP machinery shared by every fake Google API: routing, strict parsing, errors, operations,
the request log and programmable faults.

Ground truth for what the official clients send is the clients themselves: the route table is
read from each installed client's REST transport (`_Base<Method>._get_http_options()` gives the
HTTP verb, the URI template and the body field; `_<Method>.__call__`'s annotations give the real
request and response message classes). A route the fake does not implement answers 501
UNIMPLEMENTED instead of silently succeeding.

Every request body is parsed with `json_format.Parse(..., ignore_unknown_fields=False)` into the
real protobuf message, every query parameter is bound to a field of the request message (unknown
ones are rejected the way Google's front end rejects them) and every answer is serialised from a
real message, so a field the real API would not accept or send cannot slip through.
"""
from __future__ import annotations

import base64
import hashlib
import importlib
import json
import re
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from google.protobuf import any_pb2, json_format
from google.protobuf.descriptor import FieldDescriptor

from .errors import (BAD_REQUEST, ERROR_INFO, GRPC_CODE, HELP, HTTP_STATUS, LOCALIZED_MESSAGE,  # noqa: F401
                     SERVICE_TITLES, ApiError, already_exists, failed_precondition, invalid_argument, not_found,
                     permission_denied_error, quota_error, service_disabled_error)


def carry_over(current, updated, fields) -> None:
    """Copy the output-only `fields` of the stored message `current` into `updated` (an update
    request's resource, which may not set them): what the server keeps across an update."""
    for name in fields:
        descriptor = current.DESCRIPTOR.fields_by_name[name]
        if descriptor.is_repeated:
            getattr(updated, name).extend(getattr(current, name))
        elif descriptor.message_type is not None:
            if current.HasField(name):
                getattr(updated, name).CopyFrom(getattr(current, name))
        else:
            setattr(updated, name, getattr(current, name))

# --------------------------------------------------------------------------------------------
# Request log


@dataclass
class LoggedRequest:
    """One request as the fake saw it. `body` is the JSON body as parsed (camelCase keys, as sent);
    `request` is the whole request message (path + query + body) as the real message class."""

    api: str
    method: str  # the RPC name, e.g. "CreateService"
    http_method: str
    path: str
    query: dict
    body: Any
    request: Any = None
    status: int = 0
    time: float = field(default_factory=time.time)

    @property
    def mutating(self) -> bool:
        return not self.method.startswith(READ_ONLY_PREFIXES)


READ_ONLY_PREFIXES = ("Get", "List", "BatchGet", "Access", "TestIamPermissions", "WaitOperation")


class RequestLog:
    """Every request the fake answered (including rejected ones), in order. Thread-safe."""

    def __init__(self):
        self._entries: list[LoggedRequest] = []
        self._lock = threading.Lock()

    def append(self, entry: LoggedRequest) -> None:
        with self._lock:
            self._entries.append(entry)

    @property
    def entries(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._entries)

    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def filter(self, api: str | None = None, method: str | None = None, mutating: bool | None = None,
               status: int | None = None) -> list[LoggedRequest]:
        return [e for e in self.entries
                if (api is None or e.api == api) and (method is None or e.method == method)
                and (mutating is None or e.mutating == mutating) and (status is None or e.status == status)]

    def count(self, **kwargs) -> int:
        return len(self.filter(**kwargs))

    def mutating(self, api: str | None = None) -> list[LoggedRequest]:
        return self.filter(api=api, mutating=True)

    def summary(self) -> dict:
        """Counts for benchmarks and assertion messages: requests, writes, per "api.Method"."""
        entries = self.entries
        by_method: dict[str, int] = {}
        for e in entries:
            by_method[f"{e.api}.{e.method}"] = by_method.get(f"{e.api}.{e.method}", 0) + 1
        return {"requests": len(entries), "mutating": sum(e.mutating for e in entries),
                "errors": sum(e.status >= 400 for e in entries), "by_method": by_method}

    def methods(self, api: str | None = None) -> list[str]:
        """["run.GetService", "cloudbuild.CreateBuild", ...] in order: handy in assertion messages."""
        return [f"{e.api}.{e.method}" for e in self.entries if api is None or e.api == api]


# --------------------------------------------------------------------------------------------
# Faults


@dataclass
class Fault:
    """Answer `error()` instead of handling requests to `api`/`method` (None = any), at most
    `times` times (None = until removed), optionally only when `match(entry)` is true."""

    api: str | None
    method: str | None
    error: Callable[[LoggedRequest], ApiError]
    times: int | None = None
    match: Callable[[LoggedRequest], bool] | None = None
    hits: int = 0

    def applies(self, entry: LoggedRequest) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.api is not None and self.api != entry.api:
            return False
        if self.method is not None and self.method != entry.method:
            return False
        return self.match is None or bool(self.match(entry))


# --------------------------------------------------------------------------------------------
# Routes read from the installed clients' REST transports


@dataclass
class Route:
    api: str
    method: str
    http_method: str
    template: str
    regex: re.Pattern
    variables: list[tuple[str, str]]  # (regex group, request field path)
    body: str | None
    request_cls: type
    response_cls: type
    has_verb: bool

    def match(self, http_method: str, path: str):
        if http_method != self.http_method:
            return None
        return self.regex.fullmatch(path)


def _raw(cls):
    """The raw protobuf class for a proto-plus class (or a raw class itself)."""
    return cls.pb() if hasattr(cls, "pb") else cls


def compile_template(template: str) -> tuple[re.Pattern, list[tuple[str, str]], bool]:
    """`/v2/{name=projects/*/locations/*}/services` -> regex with one named group per variable."""
    pattern, variables, pos = "", [], 0
    for index, m in enumerate(re.finditer(r"\{([^}=]+)(?:=([^}]*))?\}", template)):
        pattern += re.escape(template[pos:m.start()])
        segments = (m.group(2) or "*").split("/")
        parts = []
        for segment in segments:
            if segment == "**":
                parts.append(r"[^?#]+")
            elif segment == "*":
                parts.append(r"[^/?#]+")
            else:
                parts.append(re.escape(segment))
        group = f"v{index}"
        pattern += f"(?P<{group}>{'/'.join(parts)})"
        variables.append((group, m.group(1)))
        pos = m.end()
    tail = template[pos:]
    pattern += re.escape(tail)
    return re.compile(pattern), variables, ":" in tail


def routes_from_transport(api: str, module_name: str, class_name: str) -> list[Route]:
    module = importlib.import_module(module_name)
    transport = getattr(module, class_name)
    routes = []
    for name in dir(transport):
        if not name.startswith("_") or name.startswith("__") or name.startswith("_Base"):
            continue
        stub = getattr(transport, name)
        if not isinstance(stub, type) or not hasattr(stub, "_get_http_options"):
            continue
        annotations = getattr(stub.__call__, "__annotations__", {})
        if "request" not in annotations:
            continue
        from google.protobuf import empty_pb2

        returns = annotations.get("return") or empty_pb2.Empty  # methods returning Empty are unannotated
        for option in stub._get_http_options():
            regex, variables, has_verb = compile_template(option["uri"])
            routes.append(Route(api, name[1:], option["method"].upper(), option["uri"], regex, variables,
                                option.get("body"), _raw(annotations["request"]), _raw(returns),
                                has_verb))
    return routes


# --------------------------------------------------------------------------------------------
# Parsing helpers


def _field_by_json_name(descriptor, name: str):
    for f in descriptor.fields:
        if f.json_name == name or f.name == name:
            return f
    return None


def set_field_path(message, path: str, value: str) -> None:
    """Set `service.name` (a path variable) on a request message."""
    *parents, last = path.split(".")
    target = message
    for part in parents:
        target = getattr(target, part)
    setattr(target, last, value)


WELL_KNOWN_STRINGS = {"google.protobuf.FieldMask", "google.protobuf.Duration", "google.protobuf.Timestamp"}


def bind_query(message, query: list[tuple[str, str]], request_name: str) -> None:
    """Bind `?a.b=1&c=x` to request fields the way Google's front end does; reject unknown names."""
    tree: dict = {}
    for key, value in query:
        descriptor = message.DESCRIPTOR
        node = tree
        parts = key.split(".")
        for i, part in enumerate(parts):
            f = _field_by_json_name(descriptor, part) if descriptor is not None else None
            if f is None:
                raise invalid_argument(
                    f'Invalid JSON payload received. Unknown name "{key}": Cannot bind query parameter. '
                    f"Field '{part}' could not be found in request message.")
            last = i == len(parts) - 1
            json_key = f.json_name
            if not last:
                if f.type != FieldDescriptor.TYPE_MESSAGE or f.is_repeated:
                    raise invalid_argument(
                        f'Invalid JSON payload received. Unknown name "{key}": Cannot bind query parameter. '
                        f"'{part}' is a primitive field and does not support subfields.")
                node = node.setdefault(json_key, {})
                descriptor = f.message_type
                continue
            if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type.full_name not in WELL_KNOWN_STRINGS:
                raise invalid_argument(
                    f'Invalid JSON payload received. Unknown name "{key}": Cannot bind query parameter. '
                    f"Field '{part}' is a message type; bind its fields instead.")
            converted = _convert_query_value(f, value, key)
            if f.is_repeated:
                node.setdefault(json_key, []).append(converted)
            else:
                node[json_key] = converted
    try:
        json_format.ParseDict(tree, message, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise invalid_argument(f"Invalid value in query parameters of {request_name}: {exc}") from None


def _convert_query_value(f, value: str, key: str):
    if f.type == FieldDescriptor.TYPE_BOOL:
        if value.lower() in ("true", "1"):
            return True
        if value.lower() in ("false", "0", ""):
            return False
        raise invalid_argument(f'Invalid value at \'{key}\' (TYPE_BOOL), "{value}"')
    if f.type == FieldDescriptor.TYPE_ENUM and value.lstrip("-").isdigit():
        return int(value)
    if f.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        try:
            return float(value)
        except ValueError:
            raise invalid_argument(f'Invalid value at \'{key}\' (TYPE_DOUBLE), "{value}"') from None
    return value


_UNKNOWN_NAME = re.compile(r'has no field named "([^"]+)"')


def parse_body(text: str, message, where: str) -> None:
    try:
        json_format.Parse(text or "{}", message, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        m = _UNKNOWN_NAME.search(str(exc))
        if m:
            description = (f'Invalid JSON payload received. Unknown name "{m.group(1)}" at \'{where}\': '
                           f"Cannot find field.")
        else:
            description = f"Invalid JSON payload received. {exc}"
        raise invalid_argument(description, where) from None


def pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


# --------------------------------------------------------------------------------------------
# Long-running operations


class Operation:
    """A long-running operation: never done on the creating answer; done once it has been polled
    at least `polls_needed` times AND `check()` says so.

    `metadata()` returns the metadata message (re-evaluated at every poll, like Cloud Build's
    BuildOperationMetadata that carries the live build). `check()` returns None while running, a
    message (the response) when it succeeded, or an ApiError when it failed.
    """

    def __init__(self, name: str, api: str, metadata: Callable[[], Any], check: Callable[[], Any],
                 polls_needed: int = 2, on_poll: Callable[[], None] | None = None):
        self.name = name
        self.on_poll = on_poll
        self.api = api
        self._metadata = metadata
        self._check = check
        self.polls_needed = polls_needed
        self.polls = 0
        self.outcome = None  # response message or ApiError, once done

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def poll(self) -> None:
        self.polls += 1
        if self.on_poll is not None and self.outcome is None:
            self.on_poll()
        self.advance()

    def advance(self) -> None:
        if self.outcome is None and self.polls >= self.polls_needed:
            self.outcome = self._check()

    def to_pb(self):
        from google.longrunning import operations_pb2

        op = operations_pb2.Operation(name=self.name, done=self.done)
        metadata = self._metadata()
        if metadata is not None:
            op.metadata.CopyFrom(pack(metadata))
        if isinstance(self.outcome, ApiError):
            op.error.CopyFrom(self.outcome.rpc_status())
        elif self.outcome is not None:
            op.response.CopyFrom(pack(self.outcome))
        return op


# --------------------------------------------------------------------------------------------
# The server


def project_number(project: str) -> str:
    """A stable, fake, 12-digit project number for a project id (numbers are kept as they are)."""
    if project.isdigit():
        return project
    return str(100000000000 + int(hashlib.sha256(project.encode()).hexdigest(), 16) % 900000000000)


class Context:
    """What a handler gets besides the request message."""

    def __init__(self, server: "FakeServer", route: Route, entry: LoggedRequest):
        self.server = server
        self.route = route
        self.entry = entry


class FakeServer:
    """One threaded HTTP server on 127.0.0.1 answering for every registered fake API."""

    def __init__(self, operation_polls: int = 2):
        self.routes: list[Route] = []
        self.handlers: dict[tuple[str, str], Callable] = {}
        self.log = RequestLog()
        self.faults: list[Fault] = []
        self.operations: dict[str, Operation] = {}
        self.operation_polls = operation_polls
        self.lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # -- registration ---------------------------------------------------------------------
    def add_routes(self, routes: list[Route]) -> None:
        known = {(r.http_method, r.template) for r in self.routes}
        for route in routes:
            if (route.http_method, route.template) not in known:
                self.routes.append(route)
                known.add((route.http_method, route.template))
        # A path ending in a custom verb (`...:getIamPolicy`) must win over the plain resource path.
        self.routes.sort(key=lambda r: not r.has_verb)

    def handle(self, api: str, method: str):
        def register(function):
            self.handlers[(api, method)] = function
            return function
        return register

    # -- operations -----------------------------------------------------------------------
    def new_operation(self, name: str, api: str, metadata, check, polls_needed: int | None = None,
                      on_poll=None) -> Operation:
        operation = Operation(name, api, metadata, check,
                              self.operation_polls if polls_needed is None else polls_needed, on_poll)
        self.operations[name] = operation
        return operation

    @staticmethod
    def operation_id() -> str:
        return str(uuid.uuid4())

    # -- faults ---------------------------------------------------------------------------
    def add_fault(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002 - the request log replaces it
                pass

            def _serve(self):
                server.dispatch(self)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _serve

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="gcp-fakes", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # -- dispatch -------------------------------------------------------------------------
    def dispatch(self, http) -> None:
        length = int(http.headers.get("Content-Length") or 0)
        raw_body = http.rfile.read(length).decode("utf-8") if length else ""
        parsed = urllib.parse.urlsplit(http.path)
        path = parsed.path
        query = urllib.parse.parse_qsl(parsed.query, keep_blank_values=True)
        int_enums = any(k in ("$alt", "alt") and "enum-encoding=int" in v for k, v in query)
        query = [(k, v) for k, v in query if k not in ("$alt", "alt", "$.xgafv", "prettyPrint")]
        route, match = None, None
        for candidate in self.routes:
            match = candidate.match(http.command, path)
            if match:
                route = candidate
                break
        try:
            body_json = json.loads(raw_body) if raw_body.strip() else None
        except ValueError:
            body_json = raw_body
        entry = LoggedRequest(route.api if route else "?", route.method if route else "?", http.command, path,
                              dict(query), body_json)
        try:
            if route is None:
                raise ApiError("NOT_FOUND", f"The requested URL {path} was not found on this server.")
            request = self.parse_request(route, match, raw_body, query)
            entry.request = request
            if route.method in ("GetOperation", "DeleteOperation", "CancelOperation", "WaitOperation"):
                with self.lock:
                    operation = self.operations.get(request.name)
                if operation is not None:
                    entry.api = operation.api
            with self.lock:
                for fault in self.faults:
                    if fault.applies(entry):
                        fault.hits += 1
                        raise fault.error(entry)
            handler = self.handlers.get((route.api, route.method))
            if handler is None and route.method in ("GetOperation",):
                handler = self._get_operation
            if handler is None:
                raise ApiError("UNIMPLEMENTED", f"Method {route.method} of the {route.api} API is not implemented "
                                                f"by the lsdeploy fake (tests/fakes).")
            with self.lock:
                response = handler(request, Context(self, route, entry))
            payload = json_format.MessageToJson(response, use_integers_for_enums=int_enums, indent=None)
            status = 200
        except ApiError as exc:
            payload, status = json.dumps(exc.body()), exc.http
        except Exception as exc:  # noqa: BLE001 - a bug in a fake must surface as a 500, not a hang
            import traceback

            traceback.print_exc()
            payload, status = json.dumps(ApiError("INTERNAL", f"fake crashed: {exc!r}").body()), 500
        entry.status = status
        self.log.append(entry)
        data = payload.encode()
        http.send_response(status)
        http.send_header("Content-Type", "application/json; charset=UTF-8")
        http.send_header("Content-Length", str(len(data)))
        http.end_headers()
        http.wfile.write(data)

    def parse_request(self, route: Route, match, raw_body: str, query):
        request = route.request_cls()
        if route.body == "*":
            parse_body(raw_body, request, route.request_cls.DESCRIPTOR.name)
        elif route.body:
            parse_body(raw_body, getattr(request, route.body), route.body)
        elif raw_body.strip():
            raise invalid_argument(f"{route.method} does not take a request body.")
        for group, field_path in route.variables:
            value = match.group(group)
            # Names may legitimately contain %2F (Artifact Registry packages): keep those encoded.
            value = urllib.parse.unquote(value.replace("%2F", "\0").replace("%2f", "\0")).replace("\0", "%2F")
            set_field_path(request, field_path, value)
        bind_query(request, query, route.request_cls.DESCRIPTOR.name)
        return request

    def _get_operation(self, request, ctx):
        operation = self.operations.get(request.name)
        if operation is None:
            raise not_found(f"Operation {request.name} not found.")
        operation.poll()
        return operation.to_pb()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def paginate(items: list, page_size: int, page_token: str, default_size: int = 50):
    """(page, next_page_token) with opaque offset tokens, like Google's list methods."""
    try:
        start = int(base64.urlsafe_b64decode(page_token.encode()).decode()) if page_token else 0
    except (ValueError, UnicodeDecodeError):
        raise invalid_argument(f"Invalid page token: {page_token!r}.") from None
    size = page_size if page_size > 0 else default_size
    page = items[start:start + size]
    end = start + size
    token = base64.urlsafe_b64encode(str(end).encode()).decode() if end < len(items) else ""
    return page, token


def now_pb(message=None):
    """A Timestamp of now (or set now into the given Timestamp field)."""
    from google.protobuf import timestamp_pb2

    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    if message is not None:
        message.CopyFrom(stamp)
    return stamp


def etag_of(message) -> str:
    return '"' + hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()[:16] + '"'
