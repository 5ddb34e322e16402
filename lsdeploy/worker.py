"""lsdeploy's gunicorn worker: an event loop reads requests, a pool of threads answers them.

gunicorn's gthread worker hands a connection to a thread before its request has arrived, and the
thread reads it there: a client that connects and sends nothing (gunicorn >= 24 keeps it for 5 s)
or trickles its headers (every version) holds a thread meanwhile, and a few dozen such clients
hold them all. Here the worker's main thread reads every request on a selector, without
blocking, until it is complete (the head, and a body of at most 1 MiB: lsdeploy.http1), and only then
hands it to a thread, which parses it with gunicorn's own parser, runs the app and writes the
answer. Idle and slow clients cost a file descriptor and a buffer, never a thread.

CLIENT_TIMEOUT is a deadline for each whole request: from the connection's opening for its first
request, from the first byte of each later one on a kept-alive connection. The loop closes a
connection whose head is not complete by then, and hands one whose head is complete (its body
not) to a thread, where reading the body raises TimeoutError (the app answers 408). A body the
loop does not wait for (announced larger than 1 MiB, or once the worker's buffers reach
LOOP_BUDGET) is read by the thread within the same deadline. A client that stalls while reading
an answer is cut off after CLIENT_TIMEOUT (SO_SNDTIMEO).

Every answer is JSON: what gunicorn's parser refuses (gunicorn would write an HTML page) is
answered {"status": N, "error": "..."} here, with `Connection: close`. Plain HTTP/1.x only (no
TLS, no HTTP/2): `label-studio-ml start` configures neither; Cloud Run terminates TLS in front.
"""
from __future__ import annotations

import errno
import http
import io
import json
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections import deque
from datetime import datetime

from gunicorn.http import errors as gerrors
from gunicorn.http import wsgi
from gunicorn.http.message import Request
from gunicorn.workers.base import Worker

from .http1 import (CHUNK_ERRORS, CHUNKED_ERROR, LOOP_BYTES, Conn, Framer, Input, Reader, RequestTimeout,
                    describe, timeval)

logger = logging.getLogger("lsdeploy.serve")

LOOP_BUDGET = 64 << 20  # per worker: what all connections may hold on the loop together
STOP_LINGER = 2.0       # how long a stopping worker keeps waiting connections open, for a request already on its way
CLOSE_LINGER = 2.0      # how long a closing connection's late input is read and dropped (so the answer is not reset)
KEEP, CLOSE, LINGER = "keep", "close", "linger"


class LsdeployWorker(Worker):
    """See the module's docstring. `client_timeout` is set by worker_class()."""

    client_timeout = 30.0

    def init_process(self):
        if self.cfg.is_ssl:
            raise RuntimeError("lsdeploy's worker serves plain HTTP: terminate TLS in front of it")
        self.sel = selectors.DefaultSelector()
        self.jobs, self.done = queue.SimpleQueue(), queue.SimpleQueue()
        # Threads start as requests need them, like a ThreadPoolExecutor's: a light load keeps to
        # few threads (their memory stays warm, and the allocator does not spread what they free
        # over as many arenas as there are threads).
        self.threads, self.idle = 0, threading.Semaphore(0)
        self.waiting, self.busy, self.nconns, self.buffered = set(), 0, 0, 0
        self.queues = {"timeout": deque(), "keepalive": deque(), "linger": deque()}
        self.full = timeval(self.client_timeout)
        self.accepting = False
        super().init_process()

    def _wake(self):
        try:
            os.write(self.PIPE[1], b".")
        except OSError:  # full: the loop is awake anyway
            pass

    # -- the loop ------------------------------------------------------------------------------
    def run(self):
        config = getattr(self.wsgi, "config", None)  # a Flask app's: a body it refuses is handed over at once
        limit = config.get("MAX_CONTENT_LENGTH") if isinstance(config, dict) else None
        self.framer = Framer(self.cfg, limit if isinstance(limit, int) else None)
        self.sel.register(self.PIPE[0], selectors.EVENT_READ, None)  # signals (gunicorn's wakeup fd) and threads
        self.listeners = [(s, s.getsockname()) for s in self.sockets]
        for listener, _ in self.listeners:
            listener.setblocking(False)
        beat = 0.0
        while self.alive:
            now = time.monotonic()
            if now - beat >= 1.0:
                self.notify()
                beat = now
                if self.ppid != os.getppid():
                    self.log.info("Parent changed, shutting down: %s", self)
                    break
            # at worker_connections, a new connection takes the place of a waiting one (see _accept)
            self._accept_if(self.nconns < self.cfg.worker_connections or bool(self.waiting))
            self._poll(self._timeout(now))
            self._expire(time.monotonic())
        self._stop()

    def _stop(self):
        """Stop accepting; serve what is in flight and what arrives within STOP_LINGER on open
        connections (with `Connection: close`), for at most the graceful timeout."""
        self._accept_if(False)
        now = time.monotonic()
        for conn in list(self.waiting):
            if conn.deadline > now + STOP_LINGER:
                self._wait(conn, now + STOP_LINGER, "linger")
        end = now + self.cfg.graceful_timeout
        while (self.waiting or self.busy) and time.monotonic() < end:
            self.notify()
            self._poll(min(self._timeout(time.monotonic()), max(end - time.monotonic(), 0)))
            self._expire(time.monotonic())
        for conn in list(self.waiting):
            self._close(conn)
        for _ in range(self.threads):  # (a thread still busy is a daemon: it ends with the process)
            self.jobs.put(None)
        for listener, _ in self.listeners:
            listener.close()

    def _accept_if(self, enabled: bool):
        if enabled != self.accepting:
            for listener, name in self.listeners:
                if enabled:
                    self.sel.register(listener, selectors.EVENT_READ, name)
                else:
                    self.sel.unregister(listener)
            self.accepting = enabled

    def _timeout(self, now: float) -> float:
        heads = [q[0][0] for q in self.queues.values() if q]
        return min(1.0, max(min(heads) - now, 0.0)) if heads else 1.0

    def _poll(self, timeout: float):
        for key, _ in self.sel.select(timeout):
            data = key.data
            if data is None:
                try:
                    while os.read(self.PIPE[0], 4096):
                        pass
                except OSError:
                    pass
            elif type(data) is Conn:
                self._readable(data)
            else:
                self._accept(key.fileobj, data)
        while not self.done.empty():
            self._finished(*self.done.get())

    def _accept(self, listener, name):
        for _ in range(64):
            try:
                sock, client = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.log.warning("cannot accept a connection: %s", exc.strerror)
                    return
                raise
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self.full)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self.full)
            conn = Conn(sock, client, name, 0.0, self.client_timeout)
            self.nconns += 1
            self.sel.register(sock, selectors.EVENT_READ, conn)
            self.waiting.add(conn)
            self._wait(conn, time.monotonic() + self.client_timeout, "timeout")
            if self.nconns > self.cfg.worker_connections:
                self._evict()

    def _wait(self, conn, deadline: float, kind: str):
        conn.deadline = deadline
        conn.gen += 1
        self.queues[kind].append((deadline, conn, conn.gen))

    def _evict(self) -> bool:
        """Over worker_connections: close the waiting connection that expires first (lingering,
        then idle kept-alive, then unfinished requests: a new one is last) to make room."""
        for kind in ("linger", "keepalive", "timeout"):
            q = self.queues[kind]
            while q:
                _, conn, gen = q.popleft()
                if gen == conn.gen and conn in self.waiting:
                    self._close(conn)
                    return True
        return False

    def _expire(self, now: float):
        for kind, q in self.queues.items():
            if len(q) > 4096 and len(q) > 4 * len(self.waiting):  # mostly entries of connections served since
                q = self.queues[kind] = deque(e for e in q if e[2] == e[1].gen and e[1] in self.waiting)
            while q and q[0][0] <= now:
                _, conn, gen = q.popleft()
                if gen != conn.gen or conn not in self.waiting:
                    continue
                if conn.head_end >= 0 and not conn.lingering:
                    self._dispatch(conn)  # its body is late: reading it raises TimeoutError (408)
                else:
                    self._close(conn)  # idle, or still sending its head

    def _readable(self, conn):
        if conn not in self.waiting:  # closed earlier in this round of events (evicted)
            return
        try:
            data = conn.sock.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            if conn.head_end >= 0 and not conn.lingering:
                self._dispatch(conn)  # the client stopped in the body: the app reads the end and answers
            else:
                self._close(conn)
            return
        if conn.lingering:
            conn.dropped += len(data)
            if conn.dropped > LOOP_BYTES:
                self._close(conn)
            return
        restarted = conn.idle
        if restarted:
            conn.idle = False
            if not conn.fresh:  # a kept-alive connection's next request: its deadline starts now
                conn.deadline = time.monotonic() + self.client_timeout
                conn.gen += 1
        conn.buf += data
        self.buffered += len(data)
        if self.framer.ready(conn) or self.buffered > LOOP_BUDGET:
            self._dispatch(conn)
        elif restarted and not conn.fresh:
            self.queues["timeout"].append((conn.deadline, conn, conn.gen))

    def _dispatch(self, conn):
        self.sel.unregister(conn.sock)
        self.waiting.discard(conn)
        conn.gen += 1
        self.buffered -= len(conn.buf)
        self.busy += 1
        if not self.idle.acquire(blocking=False) and self.threads < self.cfg.threads:
            self.threads += 1
            threading.Thread(target=self._work, name=f"lsdeploy-request-{self.threads}", daemon=True).start()
        self.jobs.put(conn)

    def _finished(self, conn, outcome):
        self.busy -= 1
        if outcome == CLOSE:
            self._close(conn, registered=False)
        elif outcome == LINGER:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._close(conn, registered=False)
                return
            conn.lingering = True
            self.sel.register(conn.sock, selectors.EVENT_READ, conn)
            self.waiting.add(conn)
            self._wait(conn, time.monotonic() + CLOSE_LINGER, "linger")
        else:
            conn.fresh = False
            conn.new_request()
            self.sel.register(conn.sock, selectors.EVENT_READ, conn)
            self.waiting.add(conn)
            if conn.buf:  # the next request came with the last one
                conn.idle = False
                self.buffered += len(conn.buf)
                self._wait(conn, time.monotonic() + self.client_timeout, "timeout")
                if self.framer.ready(conn):
                    self._dispatch(conn)
            else:
                conn.idle = True
                linger = self.cfg.keepalive if self.alive else min(self.cfg.keepalive, STOP_LINGER)
                self._wait(conn, time.monotonic() + linger, "keepalive")

    def _close(self, conn, registered=True):
        if registered:
            self.sel.unregister(conn.sock)
            self.waiting.discard(conn)
            self.buffered -= len(conn.buf)
        conn.gen += 1
        self.nconns -= 1
        try:
            conn.sock.close()
        except OSError:
            pass

    # -- the threads ---------------------------------------------------------------------------
    def _work(self):
        get, put, wake = self.jobs.get, self.done.put, self._wake
        while True:
            conn = get()
            if conn is None:  # the worker stops
                return
            try:
                outcome = self._serve(conn)
            except BaseException:  # noqa: BLE001 - the loop must learn of every connection
                self.log.exception("Error handling request")
                outcome = CLOSE
            put((conn, outcome))
            wake()
            self.idle.release()

    def _serve(self, conn) -> str:
        """One request of `conn` (in a thread): what becomes of the connection."""
        reader = Reader(conn, bytes(conn.buf), self.client_timeout)
        conn.buf = bytearray()
        try:
            if conn.flag:
                return self._refuse(conn, *conn.flag)
            req = Request(self.cfg, reader, conn.client, conn.count)
            if conn.framing == "other":
                # RFC 9112 6.3, as gunicorn >= 24 does it: a request body whose last transfer coding
                # is not chunked has no length (gunicorn 23 read it as empty)
                codings = [c.strip(" \t").lower() for name, value in req.headers if name == "TRANSFER-ENCODING"
                           for c in value.split(",")]
                if codings and codings[-1] != "chunked":
                    raise gerrors.InvalidHeader("TRANSFER-ENCODING")
            body = None
            if conn.framing == "chunked" and (conn.complete or conn.bad):
                try:  # all here (or malformed): refused before the app runs when it does not parse
                    body = req.body.read()
                except RequestTimeout:
                    return self._refuse(conn, 408, "the client did not send the whole request in time (CLIENT_TIMEOUT)")
                except gerrors.NoMoreData:  # a chunk longer than what came
                    return self._refuse(conn, 400, CHUNKED_ERROR)
            if not self._handle(conn, req, reader, body):
                return LINGER
        except (gerrors.NoMoreData, StopIteration):
            return CLOSE  # the client left, or did not send its head in time: nothing to answer
        except (gerrors.ParseException, *CHUNK_ERRORS) as exc:
            return self._refuse(conn, *describe(exc, self.cfg))
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EAGAIN, errno.ETIMEDOUT):
                self.log.exception("Socket error processing request.")
            return CLOSE
        except Exception as exc:  # noqa: BLE001 - the app failed before it answered
            self.log.exception("Error handling request")
            return self._refuse(conn, 500, f"the server failed while answering ({type(exc).__name__}): see its log",
                                quiet=True)
        conn.buf = bytearray(reader.buf.getvalue())  # a pipelined next request, if any
        return KEEP

    def _refuse(self, conn, status: int, message: str, quiet: bool = False) -> str:
        if not quiet:
            logger.info("invalid request from %s: %d %s", conn.client[0] if conn.client else "-", status, message)
        body = (json.dumps({"status": status, "error": message}, separators=(",", ":")) + "\n").encode()
        reason = "URI Too Long" if status == 414 else http.HTTPStatus(status).phrase  # RFC 9110's name
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            conn.sock.sendall(head + body)
        except OSError:
            return CLOSE
        return LINGER

    def _handle(self, conn, req, reader, body) -> bool:
        """Run the app on a parsed request and write its answer: whether the connection goes on."""
        environ, resp = {}, None
        try:
            self.cfg.pre_request(self, req)
            started = datetime.now()
            resp, environ = wsgi.create(req, conn.sock, conn.client, conn.server, self.cfg)
            environ["wsgi.multithread"] = True
            stream = environ["wsgi.input"] = io.BytesIO(body) if body is not None else Input(environ["wsgi.input"])
            self.nr += 1
            if self.nr >= self.max_requests:
                if self.alive:
                    self.log.info("Autorestarting worker after current request.")
                    self.alive = False
                    self._wake()
                resp.force_close()
            if not self.alive or not self.cfg.keepalive:
                resp.force_close()

            def start_response(status, headers, exc_info=None):
                # A body neither read to its end nor held whole here leaves the connection unusable.
                if body is None and (stream.failed or not (conn.complete or (
                        stream.eof if conn.length is None else stream.read_bytes >= conn.length))):
                    resp.force_close()
                return resp.start_response(status, headers, exc_info)

            respiter = self.wsgi(environ, start_response)
            try:
                if isinstance(respiter, environ["wsgi.file_wrapper"]):
                    resp.write_file(respiter)
                else:
                    for item in respiter:
                        resp.write(item)
                resp.close()
            finally:
                self.log.access(resp, req, environ, datetime.now() - started)
                if hasattr(respiter, "close"):
                    respiter.close()
            if resp.should_close():
                return False
            reader.offline = True  # what is left of the body is buffered: drop it
            try:
                while req.body.read(65536):
                    pass
            except Exception:  # noqa: BLE001 - _Offline, or a body that does not parse
                return False
            return True
        except Exception:
            if resp is not None and resp.headers_sent:
                self.log.exception("Error handling request")
                return False
            raise
        finally:
            try:
                self.cfg.post_request(self, req, environ, resp)
            except Exception:  # noqa: BLE001
                self.log.exception("Exception in post_request hook")


def worker_class(client_timeout: float) -> type:
    """LsdeployWorker with this CLIENT_TIMEOUT."""
    return type("LsdeployWorker", (LsdeployWorker,), {"client_timeout": float(client_timeout)})
