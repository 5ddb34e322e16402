"""What lsdeploy's worker (lsdeploy.worker) knows of HTTP/1.1 requests itself: how much of a
request its event loop reads before a thread parses it (the head, and a body of at most
LOOP_BYTES, framed by Content-Length or chunked), the reader and wsgi.input a thread uses (within
the request's CLIENT_TIMEOUT deadline), and the JSON answer to each request gunicorn's parser
refuses. Parsing itself is gunicorn's (gunicorn.http.message.Request), on every version allowed.
"""
from __future__ import annotations

import re
import socket
import struct
import time

from gunicorn.http import errors as gerrors
from gunicorn.http.unreader import Unreader

LOOP_BYTES = 1 << 20  # per connection: a request of at most this much is read whole before a thread sees it
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

CHUNKED_ERROR = ("the request body's chunked encoding is invalid (a bad chunk size or a missing chunk terminator): "
                 "send a valid body, or a Content-Length")
# IOError subclasses before gunicorn 24, ParseException ones since
CHUNK_ERRORS = tuple(getattr(gerrors, name) for name in ("InvalidChunkSize", "ChunkMissingTerminator",
                                                         "InvalidChunkExtension") if hasattr(gerrors, name))
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")
_LINE_CTL = re.compile(rb"[\x00-\x08\x0a-\x0c\x0e-\x1f\x7f]")  # not in a request line (LF: a bare one)
_TOKEN = re.compile(r"[A-Z0-9][A-Z0-9-]{0,63}")


def timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, max(int((seconds - whole) * 1_000_000), 1 if not whole else 0))


class RequestTimeout(gerrors.NoMoreData, TimeoutError):
    """The client did not send its request in time: the app answers 408 (TimeoutError) while it
    reads the body; in the head, the connection is closed (NoMoreData)."""

    def __init__(self, client_timeout: float):
        super().__init__()
        self.args = (f"the client did not send its request within {client_timeout:g} s (CLIENT_TIMEOUT)",)

    def __str__(self):
        return self.args[0]


class Offline(Exception):
    """Draining a body from what is buffered would need the socket."""


def describe(exc: Exception, cfg) -> tuple[int, str]:
    """(status, message) of the answer to a request gunicorn's parser refused."""
    def limit(value, default, most):
        return value if 0 < value < most else default

    if isinstance(exc, gerrors.LimitRequestLine):
        return 414, (f"the request line is longer than {limit(cfg.limit_request_line, 8190, 8190)} bytes: send a "
                     "shorter URL (data belongs in the request body)")
    if isinstance(exc, gerrors.LimitRequestHeaders):
        return 431, (f"the request headers are too large (at most {limit(cfg.limit_request_fields, 32768, 32769)} "
                     f"fields of {limit(cfg.limit_request_field_size, 8190, 1 << 30)} bytes each): send fewer or "
                     "shorter headers")
    if isinstance(exc, gerrors.UnsupportedTransferCoding):
        return 501, ("the request's Transfer-Encoding is not supported: send the body with a Content-Length, or with "
                     "Transfer-Encoding: chunked")
    if isinstance(exc, getattr(gerrors, "ExpectationFailed", ())):
        return 417, "the request's Expect header is not 100-continue: leave it out, or send Expect: 100-continue"
    if isinstance(exc, gerrors.InvalidRequestMethod):
        return 400, "the request method is not a valid HTTP method: send an upper-case method such as GET or POST"
    if isinstance(exc, gerrors.InvalidHTTPVersion):
        return 400, "the request's HTTP version is not supported: send HTTP/1.1 (or HTTP/1.0)"
    if isinstance(exc, gerrors.InvalidRequestLine):
        return 400, ("the request line is not valid HTTP: send METHOD /path HTTP/1.1, with no spaces or control "
                     "characters in the path")
    if isinstance(exc, gerrors.ObsoleteFolding):
        return 400, "a request header is folded over several lines: send each header on one line"
    if isinstance(exc, gerrors.InvalidHeaderName):
        return 400, ("a request header name is not valid (letters, digits and !#$%&'*+-.^`|~ only, no underscores): "
                     "rename the header or leave it out")
    if isinstance(exc, gerrors.InvalidHeader):
        name = getattr(exc, "hdr", None)
        if name == "CONTENT-LENGTH":
            return 400, ("the request's Content-Length is not valid (one whole number of bytes, sent once, never with "
                         "Transfer-Encoding): send one Content-Length, or Transfer-Encoding: chunked alone")
        if name == "TRANSFER-ENCODING":
            return 400, ("the request's Transfer-Encoding is not valid (chunked, once and last, in HTTP/1.1, never "
                         "with Content-Length): send Transfer-Encoding: chunked alone, or a Content-Length")
        if isinstance(name, str) and _TOKEN.fullmatch(name):
            return 400, (f"the request's {name.title()} header is not valid (sent twice, or a control character in "
                         "its value): send it once, with a valid value")
        return 400, ("a request header is not valid HTTP (a line without a colon, a bare LF or a control character): "
                     "send well-formed headers")
    if isinstance(exc, gerrors.InvalidSchemeHeaders):
        return 400, "the request's forwarded-protocol headers contradict each other: send one"
    if isinstance(exc, CHUNK_ERRORS):
        return 400, CHUNKED_ERROR
    return 400, "the request is not valid HTTP/1.1: send a well-formed request"


BARE_LF = (400, "a line of the request head ends in a bare LF: end every line with CRLF")
NOT_HTTP = (400, "the request line holds a control character (a NUL byte, or TLS sent to a plain-HTTP port): "
                 "send METHOD /path HTTP/1.1 in plain text")


def _values(head: bytes, needle: bytes) -> list:
    """The values of the header `needle` (b"\\r\\nname:") in a lower-cased head."""
    found, at = [], head.find(needle)
    while at >= 0:
        end = head.find(b"\r\n", at + 2)
        found.append(head[at + len(needle):end if end >= 0 else len(head)].strip(b" \t"))
        at = head.find(needle, at + 2)
    return found


class Framer:
    """Reads a connection's buffer as it grows: whether it holds a request to hand to a thread."""

    def __init__(self, cfg, max_body):
        self.cfg = cfg
        self.max_body = max_body  # the app's MAX_CONTENT_LENGTH, when it says
        line = cfg.limit_request_line
        self.line_limit = line if 0 < line < 8190 else 8190
        fields, size = cfg.limit_request_fields, cfg.limit_request_field_size
        heads = (fields if 0 < fields <= 32768 else 32768) * ((size if size > 0 else 8190) + 2) + 4
        self.head_limit = min(self.line_limit + 2 + heads, LOOP_BYTES)

    def ready(self, conn) -> bool:
        """Whether `conn` holds a request to hand to a thread: complete, refused already, or as
        much as the loop reads of it."""
        buf = conn.buf
        if conn.head_end < 0:
            start = conn.scanned
            end = buf.find(b"\r\n\r\n", max(start - 3, 0))
            if end < 0:
                conn.scanned = len(buf)
                if buf.count(b"\n", start) != buf.count(b"\r\n", max(start - 1, 0)):
                    conn.flag = BARE_LF  # the head would never end: answer now
                    return True
                if buf.find(b"\r\n") < 0:
                    if _LINE_CTL.search(buf, start):  # not HTTP: no point waiting for the line's end
                        conn.flag = NOT_HTTP
                        return True
                    return len(buf) > self.line_limit + 2  # the parser refuses it (414)
                if len(buf) > self.head_limit:  # (the parser would wait for more before it says so)
                    conn.flag = describe(gerrors.LimitRequestHeaders("max buffer headers"), self.cfg)
                    return True
                return False
            conn.head_end = end + 4
            found = _LINE_CTL.search(buf, 0, buf.find(b"\r\n"))  # (gunicorn 23 let a NUL into the path)
            if found:
                conn.flag = BARE_LF if found.group() == b"\n" else NOT_HTTP
                return True
            self.frame(conn, bytes(buf[:end]).lower())
        if conn.framing is None:
            conn.complete = True
            return True
        if conn.framing == "length":
            if len(buf) >= conn.end:
                conn.complete = True
                return True
            return len(buf) - conn.head_end >= LOOP_BYTES
        if conn.framing == "chunked":
            return self.chunks(conn) or len(buf) - conn.head_end >= LOOP_BYTES
        return True  # framing the parser refuses, or a body the thread reads

    def frame(self, conn, head: bytes):
        """How the body is framed, from the (lower-cased) head; "other" leaves it to the thread."""
        lengths = _values(head, b"\r\ncontent-length:")
        codings = _values(head, b"\r\ntransfer-encoding:")
        if codings:
            parts = [c.strip(b" \t") for v in codings for c in v.split(b",")]
            chunked = not lengths and parts[-1] == b"chunked" and parts.count(b"chunked") == 1
            conn.framing = "chunked" if chunked else "other"
            conn.chunk_at = conn.head_end
        elif lengths:
            if len(lengths) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
                conn.framing = "other"
                return
            size = int(lengths[0])
            if size == 0:
                return
            conn.length = size
            conn.end = conn.head_end + size
            # a body larger than the app takes is handed over with its head: the app refuses it at once
            big = size > LOOP_BYTES and (self.max_body is None or size > self.max_body)
            conn.framing = "other" if big else "length"
        else:
            return
        expect = _values(head, b"\r\nexpect:")
        if conn.framing == "other" or not expect:
            return
        if expect == [b"100-continue"] and head[:head.find(b"\r\n")].endswith(b" http/1.1"):
            # The client waits for this before it sends the body: say it here, and take the header
            # out of the request so the thread does not say it again.
            try:
                sent = conn.sock.send(CONTINUE, socket.MSG_DONTWAIT)
            except OSError:
                sent = 0
            if sent != len(CONTINUE):
                conn.framing = "other"
                return
            at = head.find(b"\r\nexpect:")
            eol = head.find(b"\r\n", at + 2)
            cut = (eol if eol >= 0 else len(head)) - at
            del conn.buf[at:at + cut]
            conn.head_end -= cut
            conn.chunk_at = conn.head_end
            if conn.framing == "length":
                conn.end -= cut

    def chunks(self, conn) -> bool:
        """Scan a chunked body as it arrives: True once it is complete or malformed."""
        buf, at = conn.buf, conn.chunk_at
        while True:
            eol = buf.find(b"\r\n", at, at + 8194)
            if eol < 0:
                conn.bad = len(buf) - at > 8192
                return conn.bad
            if conn.trailers:
                if eol == at:
                    conn.complete = True
                    return True
                at = conn.chunk_at = eol + 2
                continue
            match = _CHUNK_LINE.fullmatch(buf, at, eol)
            if match is None:
                conn.bad = True
                return True
            size = int(match.group(1), 16)
            if size == 0:
                conn.trailers = True
                at = conn.chunk_at = eol + 2
                continue
            after = eol + 2 + size
            if len(buf) < after + 2:
                return False
            if buf[after:after + 2] != b"\r\n":
                conn.bad = True
                return True
            at = conn.chunk_at = after + 2


class Conn:
    """A connection, and what the loop has read of its current request."""
    __slots__ = ("sock", "client", "server", "buf", "deadline", "gen", "fresh", "idle", "lingering", "dropped",
                 "count", "rcvtimeo", "scanned", "head_end", "framing", "end", "length", "chunk_at", "trailers",
                 "complete", "bad", "flag")

    def __init__(self, sock, client, server, deadline, rcvtimeo):
        self.sock, self.client, self.server = sock, client, server
        self.buf = bytearray()
        self.deadline = deadline
        self.gen = 0
        self.fresh, self.idle, self.lingering = True, True, False
        self.dropped = self.count = 0
        self.rcvtimeo = rcvtimeo
        self.new_request()

    def new_request(self):
        self.count += 1
        self.scanned, self.head_end, self.framing, self.end, self.length = 0, -1, None, -1, None
        self.chunk_at, self.trailers, self.complete, self.bad, self.flag = 0, False, False, False, None


class Reader(Unreader):
    """A request's bytes as the loop read them, then the socket, within the request's deadline.
    The kernel receive timeout (SO_RCVTIMEO: reads stay blocking) is lowered to the time left
    only when a read starts late, so it costs a system call only then."""

    def __init__(self, conn, data: bytes, client_timeout: float):
        super().__init__()
        self.buf.write(data)
        self.conn = conn
        self.client_timeout = client_timeout
        self.offline = False

    def chunk(self, size_hint=None):
        conn = self.conn
        if self.offline:
            raise Offline()
        left = conn.deadline - time.monotonic()
        if left <= 0:
            raise RequestTimeout(self.client_timeout)
        slack = self.client_timeout / 10
        want = min(left, self.client_timeout)
        if want < conn.rcvtimeo - slack or (conn.rcvtimeo < self.client_timeout and want > conn.rcvtimeo + slack):
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(want))
            conn.rcvtimeo = want
        size = 8192 if not size_hint or size_hint <= 8192 else min(size_hint, 1 << 20)
        try:
            return conn.sock.recv(size)
        except BlockingIOError:  # SO_RCVTIMEO expired: nothing arrived in time
            raise RequestTimeout(self.client_timeout) from None


class Input:
    """wsgi.input, noting whether the app read the body to its end or reading it failed."""
    __slots__ = ("body", "read_bytes", "eof", "failed")

    def __init__(self, body):
        self.body, self.read_bytes, self.eof, self.failed = body, 0, False, False

    def _call(self, method, size, whole):
        try:
            data = method() if size is None else method(size)
        except BaseException:
            self.failed = True
            raise
        self.read_bytes += len(data)
        if not data or (whole and (size is None or size < 0 or len(data) < size)):
            self.eof = True
        return data

    def read(self, size=None):
        return self._call(self.body.read, size, True)

    def readline(self, size=None):
        return self._call(self.body.readline, size, False)

    def readlines(self, hint=None):
        return list(iter(self.readline, b""))

    def __iter__(self):
        return iter(self.readline, b"")
