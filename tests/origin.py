"""A small local origin server for proxy tests: real sockets on 127.0.0.1.

Routes are set per test: ``origin.files[path] = Resource(body, ...)``. Every
request is counted; behaviours cover the faults a proxy must survive.
"""
from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Resource:
    body: bytes
    content_type: str = "application/octet-stream"
    headers: dict = field(default_factory=dict)
    delay: float = 0.0              # before the status line
    die_after: int | None = None    # close the connection after this many body bytes
    announce: int | None = None     # Content-Length to claim (a lie, if it differs)
    status: int = 200
    gate: threading.Event | None = None  # wait for this before answering
    pause_after: int | None = None  # send this many body bytes, then wait for ``resume``
    resume: threading.Event | None = None


class Origin:
    """``with Origin() as origin:`` serves ``origin.files`` on ``origin.url``."""

    def __init__(self) -> None:
        self.files: dict[str, Resource] = {}
        self.hits: Counter[str] = Counter()
        #: Every request as received: (method, path, headers, body).
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self._lock = threading.Lock()
        self._connections: set = set()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def setup(self):
                super().setup()
                with origin._lock:
                    origin._connections.add(self.connection)

            def finish(self):
                with origin._lock:
                    origin._connections.discard(self.connection)
                super().finish()

            def do_HEAD(self):
                self.do_GET(head=True)

            def _read_chunked(self) -> bytes:
                body = b""
                while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                    body += self.rfile.read(size)
                    self.rfile.readline()  # the CRLF after each chunk
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailer fields
                return body

            def _record(self) -> None:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    body = self._read_chunked()
                else:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length) if length else b""
                with origin._lock:
                    origin.hits[self.path] += 1
                    origin.requests.append((self.command, self.path, dict(self.headers.items()), body))

            def do_POST(self):
                self.do_GET()

            do_PUT = do_DELETE = do_PATCH = do_POST

            def do_GET(self, head=False):
                path = self.path
                self._record()
                res = origin.files.get(path)
                if res is None:
                    body = b"no such file"
                    self.send_response(404)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if not head:
                        self.wfile.write(body)
                    return
                if res.gate is not None:
                    res.gate.wait(30)
                if res.delay:
                    time.sleep(res.delay)  # a slow origin is the behaviour under test
                etag = res.headers.get("ETag")
                if etag and etag in [t.strip() for t in self.headers.get("If-None-Match", "").split(",")]:
                    self.send_response(304)  # as a real origin answers a revalidation
                    for k, v in res.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    return
                self.send_response(res.status)
                self.send_header("Content-Type", res.content_type)
                length = res.announce if res.announce is not None else len(res.body)
                self.send_header("Content-Length", str(length))
                for k, v in res.headers.items():
                    self.send_header(k, v)
                if res.die_after is not None or res.announce is not None:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if head:
                    return
                body = res.body if res.die_after is None else res.body[:res.die_after]
                try:
                    if res.pause_after is not None and res.resume is not None:
                        self.wfile.write(body[:res.pause_after])
                        self.wfile.flush()
                        res.resume.wait(30)  # a fetch held in flight is the behaviour under test
                        body = body[res.pause_after:]
                    self.wfile.write(body)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="origin", daemon=True)

    def __enter__(self) -> "Origin":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering: the port is closed and kept-alive connections are cut."""
        if self._thread.is_alive():
            self.server.shutdown()
            self._thread.join()
        self.server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __exit__(self, *exc) -> None:
        self.stop()
