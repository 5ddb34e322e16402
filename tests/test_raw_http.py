"""Malformed HTTP on a raw socket against a real `label-studio-ml start`: every answer is JSON
(`{"status": N, "error": "..."}`, 4xx, or 501 for a transfer coding the server does not know),
or the connection closes cleanly where there is no request to answer; the worker lives on and
answers /health after each. The cases gunicorn's own parser refuses (it answered them with an
HTML page), then mutations of a valid request generated from a fixed seed."""
import json
import random
import re
import socket

import pytest

from support import Server, predict_body, text_task, worker_pid

BODY = json.dumps(predict_body([text_task(1, "some text")])).encode()
VALID = (b"POST /predict HTTP/1.1\r\nHost: backend\r\nContent-Type: application/json\r\n"
         b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
HEAD = b"POST /predict HTTP/1.1\r\nHost: backend\r\nContent-Type: application/json\r\n"


def chunked(size_line: bytes = b"%x" % len(BODY), terminator: bytes = b"\r\n") -> bytes:
    return HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + size_line + b"\r\n" + BODY + terminator + b"0\r\n\r\n"


CHUNKED_ERROR = "the request body's chunked encoding is invalid"
# name: (bytes sent, expected status, words the error starts with). "zq" marks what the client
# sent in the malformed part: no answer may echo it.
CASES = {
    "too many headers": (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-zq-%d: 1\r\n" % i for i in range(200))
                         + b"\r\n", 431, "the request headers are too large"),
    "a header too large": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"zq" * 5000 + b"\r\n\r\n", 431,
                           "the request headers are too large"),
    "request line too long": (b"GET /" + b"zq" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414,
                              "the request line is longer than 4094 bytes"),
    "bad method": (b"G@Tzq /health HTTP/1.1\r\nHost: x\r\n\r\n", 400, "the request method is not"),
    "lower-case method": (b"get /health HTTP/1.1\r\nHost: x\r\n\r\n", 400, "the request method is not"),
    "Content-Length and Transfer-Encoding": (HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                                             400, "the request's Content-Length is not valid"),
    "Content-Length -1": (HEAD + b"Content-Length: -1\r\n\r\n", 400, "the request's Content-Length is not valid"),
    "two Content-Lengths": (HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400,
                            "the request's Content-Length is not valid"),
    "HTTP/2.0": (b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n", 400, "the request's HTTP version is not supported"),
    "Transfer-Encoding gzip": (HEAD + b"Transfer-Encoding: gzip\r\n\r\n" + BODY, 400,
                               "the request's Transfer-Encoding is not valid"),
    "unknown transfer coding": (HEAD + b"Transfer-Encoding: zq\r\n\r\n" + BODY, 501,
                                "the request's Transfer-Encoding is not supported"),
    "chunked in HTTP/1.0": (chunked().replace(b"HTTP/1.1", b"HTTP/1.0", 1), 400,
                            "the request's Transfer-Encoding is not valid"),
    "invalid chunk size": (chunked(b"zq"), 400, CHUNKED_ERROR),
    "chunk size too large": (chunked(b"f" * 20), 400, CHUNKED_ERROR),
    "missing chunk terminator": (chunked(terminator=b"zq"), 400, CHUNKED_ERROR),
    "invalid chunk size, /health": (b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzq\r\n",
                                    400, CHUNKED_ERROR),
    "NUL in the path": (b"GET /health\x00zq HTTP/1.1\r\nHost: x\r\n\r\n", 400,
                        "the request line holds a control character"),
    "space in the path": (b"GET /health zq HTTP/1.1\r\nHost: x\r\n\r\n", 400, "the request"),
    "NUL in a header": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: zq\x00\r\n\r\n", 400,
                        "the request's X-A header is not valid"),
    "bare LF": (b"GET /health HTTP/1.1\nHost: zq\n\n", 400, "a line of the request head ends in a bare LF"),
    "TLS to the plain-HTTP port": (bytes.fromhex("16030100a5010000a10303") + b"zq" * 40, 400,
                                   "the request line holds a control character"),
    "space before a colon": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-zq : 1\r\n\r\n", 400, "a request header"),
    "obsolete line folding": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n zq\r\n\r\n", 400,
                              "a request header is folded"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from lsdeploy.blueprints import create

    directory = tmp_path_factory.mktemp("raw-http") / "backend"
    create(directory, blueprint="default")
    with Server(directory, "--threads", "4") as running:
        running.pid = worker_pid(running)
        yield running
    assert "Traceback" not in running.log(), running.log()[-3000:]


def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send `data`, half-close, and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        received = []
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while piece := sock.recv(65536):
                received.append(piece)
        except (ConnectionResetError, BrokenPipeError):  # answered (and closed) before all was sent
            while True:
                try:
                    piece = sock.recv(65536)
                except OSError:
                    break
                if not piece:
                    break
                received.append(piece)
        return b"".join(received)


def answers(data: bytes) -> list:
    """(status, headers, parsed JSON body) of each final response in `data`."""
    found = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"an unfinished response: {head[:300]!r}"
        lines = head.decode("latin-1").split("\r\n")
        assert re.match(r"HTTP/1\.\d \d{3} ", lines[0]), lines[0]  # gunicorn answers in the version asked
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if status < 200:
            continue
        length = int(headers["content-length"])
        body, data = data[:length], data[length:]
        assert len(body) == length, (length, body)
        assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:300])
        assert b"<html" not in body.lower()
        found.append((status, headers, json.loads(body)))
    return found


def check_error(status, headers, body):
    assert body == {"status": status, "error": body.get("error")}, body
    assert isinstance(body["error"], str) and 20 < len(body["error"]) < 300, body
    assert "Traceback" not in body["error"] and "zq" not in body["error"], body


def assert_alive(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = b""
        while piece := sock.recv(65536):
            got += piece
    assert got.startswith(b"HTTP/1.1 200 "), got[:200]
    assert worker_pid(server) == server.pid, "the worker was replaced"


@pytest.mark.parametrize("name", list(CASES))
def test_parser_errors_are_json(server, name):
    data, status, start = CASES[name]
    got = answers(exchange(server.port, data))
    assert [s for s, _, _ in got] == [status], (name, got)
    _, headers, body = got[0]
    check_error(status, headers, body)
    assert body["error"].startswith(start), body
    assert headers.get("connection", "").lower() == "close", headers
    assert_alive(server)


def test_requests_that_are_fine(server):
    """What the worker reads on its own before a thread does: Expect: 100-continue, pipelining,
    a chunked body, a request cut off (no answer, or the app's 400 for the body)."""
    raw = exchange(server.port, VALID.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n", 1))
    assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 ") and raw.count(b"100 Continue") == 1, raw[:300]
    assert [s for s, _, _ in answers(exchange(server.port, VALID * 3))] == [200, 200, 200]
    assert [s for s, _, _ in answers(exchange(server.port, chunked()))] == [200]
    assert exchange(server.port, VALID[:30]) == b""  # a head cut off: no request, nothing to answer
    (status, headers, body), = answers(exchange(server.port, VALID[:-10]))
    assert status == 400 and body["error"].startswith("the client stopped sending the request body"), body
    assert headers["connection"].lower() == "close"
    assert_alive(server)


def mutations(seed: int = 17, count: int = 80):
    """(description, bytes) of malformed variants of VALID."""
    rng = random.Random(seed)
    head_end = VALID.index(b"\r\n\r\n") + 4
    versions = [b"HTTP/0.9", b"HTTP/1.2", b"HTTP/3.0", b"HTTP/1.1x", b"http/1.1", b"HTTP/11", b"HTTP/1", b"HTTP /1.1",
                b"HTTP/1.1 extra", b""]
    sizes = [b"zz", b"-1", b"0x10", b" 10", b"1 0", b"f" * 17, b"", b"10;\x00", b'10;a="', b"1g", b"10\n"]
    junk = [b"\x00", b"\n", b"\r", b" ", b":", b"\x7f", b"\xff", b"\t", b"zq", b"\r\n", b"\r\n\r\n"]
    for i in range(count):
        kind = i % 7
        if kind == 0:
            at = rng.randrange(1, len(VALID))
            yield f"truncated at {at}", VALID[:at]
        elif kind == 1:
            at = rng.randrange(0, head_end - 4)
            byte = rng.choice(junk)
            yield f"{byte!r} at {at} of the head", VALID[:at] + byte + VALID[at + 1:]
        elif kind == 2:
            n = rng.randrange(90, 400)
            extra = b"".join(b"X-H%d: %s\r\n" % (j, b"v" * rng.randrange(0, 50)) for j in range(n))
            yield f"{n} more headers", VALID.replace(b"\r\n\r\n", b"\r\n" + extra + b"\r\n", 1)
        elif kind == 3:
            size = rng.choice(sizes)
            yield f"chunk size {size!r}", chunked(size)
        elif kind == 4:
            version = rng.choice(versions)
            yield f"version {version!r}", VALID.replace(b"HTTP/1.1", version, 1)
        elif kind == 5:
            name = rng.choice([b"Host", b"Content-Length", b"Transfer-Encoding", b"Content-Type", b"Expect"])
            value = rng.choice([b"1", b"chunked", b"x" * 9000, b"", b"100-continue", b"\x01"])
            yield f"{name.decode()}: {value[:20]!r} added", VALID.replace(b"\r\n\r\n", b"\r\n%s: %s\r\n\r\n" % (name, value), 1)
        else:
            at = rng.randrange(0, len(VALID))
            yield f"NUL bytes at {at}", VALID[:at] + b"\x00" * rng.randrange(1, 5) + VALID[at:]


def test_mutations_of_a_valid_request(server):
    """Each mutation is answered with JSON only (4xx, 501, or 200 when it still reads as a
    valid request), or the connection closes without an answer; the worker never fails."""
    statuses = []
    for description, data in mutations():
        raw = exchange(server.port, data)
        try:
            got = answers(raw)
        except AssertionError as exc:
            raise AssertionError(f"{description}: {exc}\n{raw[:500]!r}") from None
        for status, headers, body in got:
            assert status in (200, 501) or 400 <= status < 500, (description, status, body)
            if status != 200:
                check_error(status, headers, body)
        statuses.append((description, [s for s, _, _ in got]))
        assert_alive(server)
    print("\n".join(f"  {d}: {s or 'closed'}" for d, s in statuses))
    assert sum(1 for _, s in statuses if any(400 <= x < 500 for x in s)) >= 40, statuses
