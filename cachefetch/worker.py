"""cachefetch's gunicorn worker: the threaded (gthread) worker, with slow clients
kept out of its threads.

gunicorn's gthread worker gives a connection to a thread as soon as it is
readable; the thread then blocks while it reads the request head and while it
writes the response. About threads x workers clients that send their head a
line at a time (slowloris) or never read their answer therefore take every
thread, and the server stops answering anyone. This worker keeps such clients
in its event loop, where each costs a socket and a few bytes, never a thread:

- A request head is read in the event loop, without blocking; a thread gets a
  connection only once its head is complete. The head must be complete within
  ``header_timeout`` seconds of the connection being accepted (or, on a
  kept-alive connection, of its first byte); otherwise the connection is
  answered 408 and closed. A head longer than :data:`MAX_HEAD` is answered 431.
- A thread reads a request body and writes a response with an idle timeout,
  ``send_timeout``: a client that takes (or sends) no byte for that long is
  dropped and the thread is free again.
- A ``wsgi.file_wrapper`` body (cachefetch's hits) is sent with ``sendfile``
  from the thread while the client keeps making room; once its socket has had no
  room for :data:`HANDOFF` seconds, the event loop sends the rest as the client
  reads, with the same idle timeout, so a slow or stalled reader of a hit holds
  no thread.
- Waiting connections (a head not yet complete, or idle between requests) never
  lock newcomers out: at the connection limit the oldest of them is closed.
- Graceful closes (draining what the client still sends, RFC 9112 section 9.6)
  linger in the event loop instead of blocking it.
- The access log line of a response is written when its last byte went out,
  with the body bytes the kernel really took (``%(b)s``, sendfile included).
- A stopping worker gives in-flight requests half of ``graceful_timeout``;
  :func:`leave_promptly` (for the ``worker_exit`` hook) then ends the process
  by three quarters of it even if a thread is stuck on a slow upstream, before
  the arbiter would kill it.

TLS and HTTP/2 connections are handed to threads exactly as gthread does.
Everything here runs on the worker's main thread (the event loop) unless a
docstring says "in a thread".
"""
from __future__ import annotations

import errno
import io
import logging
import os
import re
import resource
import select
import selectors
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, Callable

from gunicorn import util
from gunicorn.http import wsgi
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import TConn, ThreadWorker

__all__ = ["CachefetchWorker", "HANDOFF", "MAX_HEAD", "leave_promptly"]

#: Longest request head read in the event loop (request line and headers).
MAX_HEAD = 64 * 1024
#: How long a graceful close waits for the client to close its side.
LINGER = 2.0
_LINGER_DRAIN = 64 * 1024
_READ_SIZE = 64 * 1024
#: A thread sending a file hands the rest to the event loop once the client's
#: socket has had no room for this long.
HANDOFF = 0.05
#: Bytes one sendfile tail may send per event, so one fast reader cannot starve the loop.
_TAIL_SLICE = 4 << 20
_ACCEPTS_PER_EVENT = 32
#: After running out of descriptors, pause accepting this long.
_ACCEPT_PAUSE = 0.1
#: Idle kept-alive connections of a stopping worker stay open this long at most
#: (a request already on its way is then answered with "Connection: close").
_STOP_KEEPALIVE = 2.0
_BARE_LF = re.compile(rb"(?<!\r)\n")

_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


@dataclass(eq=False)
class _Tail:
    """The part of a sendfile body the client had no room for yet."""

    fd: int                 # our own duplicate: the app closes its file when the thread is done
    offset: int
    left: int
    resp: "_Response"
    keepalive: bool = False
    log: Callable[[Any], None] | None = None   # writes the access log line, given the request time
    started: datetime | None = None


class _Conn(TConn):
    """gthread's connection, plus where it waits in this worker's event loop."""

    def __init__(self, cfg: Any, sock: socket.socket, client: Any, server: Any) -> None:
        super().__init__(cfg, sock, client, server)
        self.head = bytearray()     # request bytes read by the loop, not yet parsed
        self.state = "new"          # head | idle | thread | tail | linger | closed
        self.deadline = 0.0
        self.tail: _Tail | None = None
        self.abort = False          # close with a reset: the client stopped taking bytes
        self.drained = 0

    def init(self) -> None:
        """In a thread: set up the parser, then give it the head the loop read."""
        super().init()
        if self.head:
            self.parser.unreader.unread(bytes(self.head))
            self.head.clear()


class _Response(wsgi.Response):
    """gunicorn's response writer, counting the body bytes the kernel really
    took (in ``sent``, which the access log shows) and leaving what a full
    socket cannot take of a sendfile body to the event loop (``tail``)."""

    def __init__(self, req: Any, sock: socket.socket, cfg: Any) -> None:
        super().__init__(req, sock, cfg)
        self.tail: _Tail | None = None
        self.date: str | None = None

    def process_headers(self, headers: list[tuple[str, str]]) -> None:
        # gunicorn drops an app's Date as if it were hop-by-hop and sends its
        # own: a cache must replay the origin's (RFC 9111 §4, RFC 9110 §6.6.1).
        for name, value in headers:
            if isinstance(name, str) and name.lower() == "date" and isinstance(value, str):
                self.date = value.strip(" \t")
        super().process_headers(headers)

    def default_headers(self) -> list[str]:
        lines = super().default_headers()
        if self.date is not None and wsgi.HEADER_VALUE_RE.fullmatch(self.date):
            lines = [f"Date: {self.date}\r\n" if line.startswith("Date: ") else line for line in lines]
        return lines

    def _emit_body(self, data: bytes) -> None:
        # write() has counted all of ``data`` already: take back what did not go out.
        taken = 0
        try:
            if self.chunked:
                self.sock.sendall(b"%X\r\n" % len(data))
            view = memoryview(data)
            while taken < len(view):
                # One send() at a time: the socket's timeout then bounds each wait
                # for room, not the whole chunk (sendall's would be a total).
                taken += self.sock.send(view[taken:])
            if self.chunked:
                self.sock.sendall(b"\r\n")
        except BaseException:
            self.sent -= len(data) - taken
            raise

    def sendfile(self, respiter: Any) -> bool:
        if self.chunked or self.cfg.is_ssl or not self.can_sendfile() or not util.has_fileno(respiter.filelike):
            return False  # written by write(), chunk by chunk
        fileno = respiter.filelike.fileno()
        try:
            offset = os.lseek(fileno, 0, os.SEEK_CUR)
            count = self.response_length
            if count is None:
                count = os.fstat(fileno).st_size - offset
        except (OSError, io.UnsupportedOperation):
            return False
        self.send_headers()
        if self._no_body() or count <= 0:
            return True
        sent = 0
        while True:
            n, error = _sendfile_now(self.sock.fileno(), fileno, offset + sent, count - sent)
            sent += n
            self.sent += n
            if error is not None:
                raise error
            # A client that makes room soon is served from this thread, as fast as it
            # reads; one whose socket stays full goes to the event loop.
            if sent == count or not _writable(self.sock, HANDOFF):
                break
        if sent < count:
            self.tail = _Tail(os.dup(fileno), offset + sent, count - sent, self)
        return True

    def can_send_spans(self) -> bool:
        """Whether :meth:`write_spans` may ``sendfile`` (not for chunked or TLS responses)."""
        return not self.chunked and not self.cfg.is_ssl and self.can_sendfile()

    def write_spans(self, spans: Any, idle_timeout: float) -> None:
        """In a thread: send a body given as ``(fd, offset, count)`` spans of a
        file (with ``sendfile``: the bytes never pass through Python) and
        ``bytes`` items, never more than the Content-Length. Waits at most
        ``idle_timeout`` seconds for room in the socket each time.

        :raises TimeoutError: if the client takes no byte for that long.
        :raises OSError: if the client is gone, or a file ends before its span.
        """
        self.send_headers()
        if self._no_body():
            return
        sock_fd = self.sock.fileno()
        for span in spans:
            if not isinstance(span, tuple):
                self.write(span)
                continue
            fd, offset, count = span
            if self.response_length is not None:
                count = min(count, self.response_length - self.sent)
            while count > 0:
                n, error = _sendfile_now(sock_fd, fd, offset, count)
                self.sent += n
                offset += n
                count -= n
                if error is not None:
                    raise error
                if count and not _writable(self.sock, idle_timeout):
                    raise TimeoutError(f"the client took no byte for {idle_timeout:g}s")

    def close(self) -> None:
        if self.tail is None:
            super().close()

    def _no_body(self) -> bool:
        status = self.status_code or 200
        return self.req.method == "HEAD" or status in (204, 304) or 100 <= status < 200


def _sendfile_now(sock_fd: int, file_fd: int, offset: int, count: int) -> tuple[int, OSError | None]:
    """Send up to ``count`` bytes of ``file_fd`` from ``offset`` on the
    non-blocking ``sock_fd``, as many as it takes without waiting.

    :returns: the bytes sent, and the error that stopped it if one did (the
        client is gone; EIO: the file ended before ``count``); never raises.
    """
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(sock_fd, file_fd, offset + sent, count - sent)
        except InterruptedError:
            continue
        except BlockingIOError:
            break
        except OSError as exc:
            return sent, exc
        if n == 0:
            return sent, OSError(errno.EIO, "file ended before its announced length")
        sent += n
    return sent, None


def _writable(sock: socket.socket, timeout: float) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(timeout * 1000))


def _head_complete(buf: bytearray, start: int) -> bool:
    """Whether ``buf`` holds a whole request head (or a bare LF, which gunicorn's
    parser rejects at once), searching from ``start``."""
    return buf.find(b"\r\n\r\n", start) >= 0 or _BARE_LF.search(buf, start) is not None


class CachefetchWorker(ThreadWorker):
    """gunicorn's gthread worker with slow clients kept in the event loop (see
    the module's docstring). Use :meth:`configured` for other timeouts."""

    #: Seconds a client has to send a whole request head.
    header_timeout: float = 20.0
    #: Seconds a client may take (or send) no byte while a response is written or a body read.
    send_timeout: float = 30.0

    @classmethod
    def configured(cls, *, header_timeout: float, send_timeout: float) -> type["CachefetchWorker"]:
        """A subclass with these timeouts, for gunicorn's ``worker_class``.

        :raises ValueError: unless both are numbers of seconds above 0.
        """
        for name, value in (("header_timeout", header_timeout), ("send_timeout", send_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be seconds above 0, got {value!r}")
        return type(cls.__name__, (cls,), {"header_timeout": float(header_timeout),
                                           "send_timeout": float(send_timeout), "__module__": cls.__module__})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Each ordered by deadline: every entry's deadline is "now + one constant"
        # when it goes in (or moves to the end).
        self._heads: OrderedDict[_Conn, None] = OrderedDict()
        self._idle: OrderedDict[_Conn, None] = OrderedDict()
        self._tails: OrderedDict[_Conn, None] = OrderedDict()
        self._lingering: OrderedDict[_Conn, None] = OrderedDict()
        self._waiting = {"head": self._heads, "idle": self._idle, "tail": self._tails, "linger": self._lingering}
        self._accept_paused_until = 0.0
        self._stop_began: float | None = None

    # -- process ----------------------------------------------------------

    def init_process(self) -> None:
        # Every waiting client is a descriptor (a sendfile tail two): use what the system allows.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            want = 65536 if hard == resource.RLIM_INFINITY else hard
            if want > soft:
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                except (ValueError, OSError):
                    pass
        super().init_process()

    def handle_exit(self, sig: int, frame: Any) -> None:
        self._note_stop()
        super().handle_exit(sig, frame)

    def handle_quit(self, sig: int, frame: Any) -> None:
        self._note_stop()
        super().handle_quit(sig, frame)

    def _note_stop(self) -> None:
        if self._stop_began is None:
            self._stop_began = time.monotonic()

    @property
    def exit_deadline(self) -> float:
        """When this worker's process must be gone (monotonic): three quarters of
        ``graceful_timeout`` after it was told to stop (the arbiter kills at all of it)."""
        began = self._stop_began if self._stop_began is not None else time.monotonic()
        return began + 0.75 * self.cfg.graceful_timeout

    def run(self) -> None:
        self.poller.register(self.method_queue.fileno(), selectors.EVENT_READ, self.method_queue.run_callbacks)
        while self.alive:
            self.notify()
            self._make_room()
            now = time.monotonic()
            self.set_accept_enabled(self.nr_conns < self.worker_connections and now >= self._accept_paused_until)
            self.wait_for_and_dispatch_events(timeout=self._next_wakeup())
            if not self.is_parent_alive():
                break
            self._expire()
        self._note_stop()
        self._drain()

    def _drain(self) -> None:
        """Stop accepting; let in-flight requests finish for half of
        ``graceful_timeout``; then close what waits in the loop."""
        self.set_accept_enabled(False)
        now = time.monotonic()
        cut = self._stop_began + self.cfg.graceful_timeout / 2
        for conns, limit in ((self._heads, cut), (self._tails, cut), (self._lingering, cut),
                             (self._idle, min(cut, now + _STOP_KEEPALIVE))):
            for conn in conns:  # min() with one limit keeps each dict in deadline order
                conn.deadline = min(conn.deadline, limit)
        while self.nr_conns > 0 and time.monotonic() < cut:
            self.notify()
            self.wait_for_and_dispatch_events(timeout=min(self._next_wakeup(), max(cut - time.monotonic(), 0.0)))
            self._expire()
        for conns in (self._heads, self._idle, self._tails, self._lingering):
            for conn in list(conns):
                self._close(conn, abort=conns is self._tails)
        # Connections still in threads belong to them; leave_promptly ends those.
        self.tpool.shutdown(wait=False)
        self.poller.close()
        self.method_queue.close()
        for listener in self.sockets:
            listener.close()

    def _next_wakeup(self) -> float:
        soonest = 1.0
        now = time.monotonic()
        for conns in (self._heads, self._idle, self._tails, self._lingering):
            if conns:
                soonest = min(soonest, next(iter(conns)).deadline - now)
        return max(soonest, 0.0)

    def _expire(self) -> None:
        now = time.monotonic()
        for conns, on_expiry in ((self._heads, self._head_expired), (self._idle, self._close),
                                 (self._tails, self._tail_expired), (self._lingering, self._close)):
            while conns:
                conn = next(iter(conns))
                if conn.deadline > now:
                    break
                on_expiry(conn)

    def _make_room(self) -> None:
        """At the connection limit, close the oldest waiting connections
        (idle ones first) so that a new client can still get in."""
        while self.nr_conns >= self.worker_connections and (self._idle or self._heads):
            conns = self._idle or self._heads
            conn = next(iter(conns))
            self.log.debug("connection limit: closing waiting connection from %s", conn.client)
            self._close(conn)

    # -- accepting and reading heads ---------------------------------------

    def accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPTS_PER_EVENT):
            if self.nr_conns >= self.worker_connections:
                return
            try:
                sock, client = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.log.warning("cannot accept a connection (%s); closing a waiting one", exc.strerror)
                    if self._idle or self._heads:
                        conns = self._idle or self._heads
                        self._close(next(iter(conns)))
                    else:
                        self._accept_paused_until = time.monotonic() + _ACCEPT_PAUSE
                        self.set_accept_enabled(False)
                    return
                raise
            self.nr_conns += 1
            conn = _Conn(self.cfg, sock, client, listener.getsockname())
            if self.cfg.is_ssl or negotiation.prior_knowledge_allowed(self.cfg, client):
                conn.state = "thread"  # TLS handshakes and HTTP/2 prefaces: as gthread does
                self.enqueue_req(conn)
            else:
                self._await_head(conn)

    def _await_head(self, conn: _Conn, registered: bool = False) -> None:
        conn.state = "head"
        conn.deadline = time.monotonic() + self.header_timeout
        self._heads[conn] = None
        callback = partial(self._on_head_readable, conn)
        if registered:
            self.poller.modify(conn.sock, selectors.EVENT_READ, callback)
        else:
            self.poller.register(conn.sock, selectors.EVENT_READ, callback)

    def _on_head_readable(self, conn: _Conn, _fileobj: Any = None) -> None:
        if conn.state != "head":  # closed by an earlier event of the same poll
            return
        data = _recv_now(conn.sock)
        if data is None:
            return
        if not data:  # the client left before sending a whole request
            self._close(conn)
            return
        start = max(len(conn.head) - 3, 0)
        conn.head += data
        if _head_complete(conn.head, start):
            self._dispatch(conn)
        elif len(conn.head) > MAX_HEAD:
            self.log.debug("request head from %s over %d bytes: 431", conn.client, MAX_HEAD)
            self._answer_and_linger(conn, _431)

    def _head_expired(self, conn: _Conn) -> None:
        self.log.debug("no whole request head from %s within %ss: closing", conn.client, self.header_timeout)
        if conn.head:
            _send_quietly(conn.sock, _408)
        self._close(conn)

    def _on_idle_readable(self, conn: _Conn, _fileobj: Any = None) -> None:
        if conn.state != "idle":
            return
        data = _recv_now(conn.sock)
        if data is None:
            return
        if not data:  # the client closed its idle connection
            self._close(conn)
            return
        conn.head += data
        if _head_complete(conn.head, 0):  # the usual case: a whole request at once
            self._dispatch(conn)
            return
        del self._idle[conn]
        self._await_head(conn, registered=True)

    def _dispatch(self, conn: _Conn) -> None:
        self._forget(conn)
        conn.state = "thread"
        conn.data_ready = True  # gthread's handle() must not wait for data: it is here
        self.enqueue_req(conn)

    def _answer_and_linger(self, conn: _Conn, answer: bytes) -> None:
        self._forget(conn)
        _send_quietly(conn.sock, answer)
        self._linger(conn)

    # -- in a thread -------------------------------------------------------

    def handle_request(self, req: Any, conn: _Conn) -> bool:
        """In a thread: answer one request whose head is parsed; whether the
        connection may be kept alive. The app's response is written with
        ``send_timeout`` as the idle bound; a sendfile body the socket has
        no room for is left on ``conn.tail`` for the event loop."""
        conn.sock.settimeout(self.send_timeout)
        environ: dict[str, Any] = {}
        resp: _Response | None = None
        started = datetime.now()
        try:
            self.cfg.pre_request(self, req)
            resp, environ = wsgi.create(req, conn.sock, conn.client, conn.server, self.cfg,
                                        response_class=_Response)
            environ["wsgi.multithread"] = True
            self.nr += 1
            if self.nr >= self.max_requests and self.alive:
                self.log.info("Autorestarting worker after current request.")
                self.alive = False
            if not self.alive or not self.cfg.keepalive or len(self._idle) >= self.max_keepalived:
                resp.force_close()
            respiter = self.wsgi(environ, resp.start_response)
            try:
                if isinstance(respiter, environ["wsgi.file_wrapper"]):
                    resp.write_file(respiter)
                elif callable(getattr(respiter, "sendfile_spans", None)) and resp.can_send_spans():
                    resp.write_spans(respiter.sendfile_spans(), self.send_timeout)
                else:
                    for item in respiter:
                        resp.write(item)
                resp.close()
            finally:
                if resp.tail is None:
                    self.log.access(resp, req, environ, datetime.now() - started)
                else:  # logged when the loop has sent the rest
                    resp.tail.log = partial(self.log.access, resp, req, environ)
                    resp.tail.started = started
                    conn.tail = resp.tail
                if hasattr(respiter, "close"):
                    respiter.close()
            return not resp.should_close()
        except TimeoutError:
            self.log.debug("client %s took no byte for %ss: dropped", conn.client, self.send_timeout)
            conn.abort = True
            return False
        except OSError:
            raise  # gthread's handle() tells a client that left from a real error
        except (Exception, SystemExit):
            if resp is not None and resp.headers_sent:
                # Too late for an error page: cut the body short, so the client sees it is incomplete.
                self.log.exception("Error handling request")
                conn.abort = True
                return False
            raise
        finally:
            try:
                self.cfg.post_request(self, req, environ, resp)
            except Exception:
                self.log.exception("Exception in post_request hook")

    # -- after a thread ----------------------------------------------------

    def finish_request(self, conn: _Conn, fs: Any) -> None:
        try:
            keepalive = bool(fs.result()) if not fs.cancelled() else False
        except Exception:
            keepalive = False
        if conn.sock.fileno() == -1:  # closed in the thread
            self._close(conn)
        elif conn.tail is not None and not conn.abort:
            conn.tail.keepalive = keepalive
            self._send_tail(conn)
        else:
            self._after_response(conn, keepalive)

    def _after_response(self, conn: _Conn, keepalive: bool) -> None:
        if conn.abort:
            self._close(conn, abort=True)
            return
        if not keepalive:
            self._linger(conn)
            return
        conn.sock.setblocking(False)
        pipelined = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        if pipelined:  # the client sent its next request already
            conn.head += pipelined
            self._await_head(conn)
            if _head_complete(conn.head, 0):
                self._dispatch(conn)
            return
        conn.state = "idle"
        conn.deadline = time.monotonic() + self.cfg.keepalive
        if not self.alive:
            conn.deadline = min(conn.deadline, time.monotonic() + _STOP_KEEPALIVE)
        self._idle[conn] = None
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_idle_readable, conn))

    def _send_tail(self, conn: _Conn) -> None:
        conn.state = "tail"
        conn.deadline = time.monotonic() + self.send_timeout
        self._tails[conn] = None
        conn.sock.setblocking(False)
        self.poller.register(conn.sock, selectors.EVENT_WRITE, partial(self._on_tail_writable, conn))

    def _on_tail_writable(self, conn: _Conn, _fileobj: Any = None) -> None:
        if conn.state != "tail":
            return
        tail = conn.tail
        n, error = _sendfile_now(conn.sock.fileno(), tail.fd, tail.offset, min(tail.left, _TAIL_SLICE))
        tail.offset += n
        tail.left -= n
        tail.resp.sent += n
        if error is not None:
            self._close(conn, abort=True)
            return
        if tail.left == 0:
            self._forget(conn)
            conn.state = "thread"  # between states, as if a thread had just returned it
            self._end_tail(conn)
            self._after_response(conn, tail.keepalive)
        elif n:
            conn.deadline = time.monotonic() + self.send_timeout
            self._tails.move_to_end(conn)

    def _tail_expired(self, conn: _Conn) -> None:
        self.log.debug("client %s took no byte for %ss: dropped", conn.client, self.send_timeout)
        self._close(conn, abort=True)

    def _end_tail(self, conn: _Conn) -> None:
        tail, conn.tail = conn.tail, None
        if tail is None:
            return
        os.close(tail.fd)
        if tail.log is not None:
            tail.log(datetime.now() - tail.started)

    # -- closing -----------------------------------------------------------

    def _linger(self, conn: _Conn) -> None:
        """Close gracefully: send our FIN, then read (and drop) what the client
        still sends until it closes too, for at most LINGER seconds."""
        try:
            conn.sock.setblocking(False)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.state = "linger"
        conn.deadline = time.monotonic() + LINGER
        self._lingering[conn] = None
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_linger_readable, conn))

    def _on_linger_readable(self, conn: _Conn, _fileobj: Any = None) -> None:
        if conn.state != "linger":
            return
        data = _recv_now(conn.sock)
        if data is None:
            return
        conn.drained += len(data)
        if not data or conn.drained > _LINGER_DRAIN:
            self._close(conn)

    def _forget(self, conn: _Conn) -> None:
        """Take ``conn`` out of the event loop (it stays open)."""
        conns = self._waiting.get(conn.state)
        if conns is None:
            return
        conns.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _close(self, conn: _Conn, abort: bool = False) -> None:
        """Close ``conn`` for good; ``abort`` resets it, dropping unsent bytes
        at once instead of leaving the kernel to push them to a client that
        does not read."""
        if conn.state == "closed":
            return
        self._forget(conn)
        self._end_tail(conn)
        if abort:
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        conn.close()
        conn.state = "closed"
        self.nr_conns -= 1


def _recv_now(sock: socket.socket) -> bytes | None:
    """What the non-blocking ``sock`` has to read: ``None`` if nothing yet,
    ``b""`` if the client closed it (or it failed); never raises."""
    try:
        return sock.recv(_READ_SIZE)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    """A short answer on a non-blocking socket, if it has room; never raises."""
    try:
        sock.send(data)
    except OSError:
        pass


def leave_promptly(worker: Any) -> None:
    """For gunicorn's ``worker_exit`` hook, after the app's own cleanup: wait
    for this process's other non-daemon threads until the worker's
    ``exit_deadline``; if any still runs then (a request or a detached fetch
    held by a slow upstream), end the process at once rather than let Python
    wait for them on exit and the arbiter kill the worker.

    Does nothing for a worker that is not a :class:`CachefetchWorker`.
    Runs on the worker's main thread.
    """
    if not isinstance(worker, CachefetchWorker):
        return
    deadline = worker.exit_deadline
    me = threading.current_thread()
    others = [t for t in threading.enumerate() if t is not me and not t.daemon]
    for thread in others:
        thread.join(max(deadline - time.monotonic(), 0.0))
    stuck = [t.name for t in others if t.is_alive()]
    if not stuck:
        return
    worker.log.warning("worker %s leaves %d busy threads behind (%s) to exit in time",
                       os.getpid(), len(stuck), ", ".join(sorted(stuck)))
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)
