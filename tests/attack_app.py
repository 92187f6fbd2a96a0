"""What the attack tests run: a WSGI app under CacheFetch for gunicorn, and a
raw origin whose bodies are paced or endless (for ``cachefetch serve``).

The WSGI side is configured through the environment:
  CF_ATTACK_STORE   the store directory
  CF_TEST_CALLS     a file the app appends "pid event path [n]" lines to
                    (read with herd_app.calls(env, event))
  CF_ATTACK_IDLE    CacheFetch's idle_timeout (optional)
  CF_ATTACK_TOTAL   CacheFetch's fetch_timeout (optional)
Paths under ``/restricted`` go through a CacheFetch with ``hosts=["site.example"]``.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HOSTS = ("site.example",)


def attack_env(tmp_path, **options: float) -> dict[str, str]:
    """The environment for a gunicorn serving :data:`application`, all under ``tmp_path``;
    ``options``: ``idle`` and ``total`` bounds in seconds."""
    env = {"CF_ATTACK_STORE": os.path.join(tmp_path, "store"),
           "CF_TEST_CALLS": os.path.join(tmp_path, "events.log")}
    for name, value in options.items():
        env[f"CF_ATTACK_{name.upper()}"] = str(value)
    return env


def _record(event: str, path: str, *more: object) -> None:
    with open(os.environ["CF_TEST_CALLS"], "a") as f:
        f.write(" ".join([str(os.getpid()), event, path, *map(str, more)]) + "\n")


def _trickled(path: str, every: float, limit: float):
    """One byte every ``every`` seconds for at most ``limit`` seconds; records how it ended."""
    sent = 0
    try:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            yield b"x"
            sent += 1
            time.sleep(every)  # the slow origin is the behaviour under test
        _record("finished", path, sent)
    finally:
        _record("closed", path, sent)


def raw_app(environ, start_response):
    """Routes: ``/echo`` (shareable, echoes the request body),
    ``/trickle?every=S&limit=S``, and every other path a shareable page naming
    the request's path, host and cookie. Every body but the trickle's carries
    a per-call nonce."""
    path = environ.get("PATH_INFO", "/")
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    _record("call", path)
    nonce = f"{os.getpid()}-{time.monotonic_ns()}"
    shareable = [("Content-Type", "text/plain"), ("Cache-Control", "max-age=600")]
    if path.startswith("/trickle"):
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Cache-Control", "max-age=600")])
        return _trickled(path, float(query.get("every", 1)), float(query.get("limit", 30)))
    if path.startswith("/echo"):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        start_response("200 OK", shareable)
        return [b"echo body=" + body + b" nonce=" + nonce.encode()]
    text = (f"page path={path} host={environ.get('HTTP_HOST', '')} "
            f"cookie={environ.get('HTTP_COOKIE', '')} nonce={nonce}")
    start_response("200 OK", shareable)
    return [text.encode()]


def _bound(name: str) -> float | None:
    value = os.environ.get(f"CF_ATTACK_{name}")
    return float(value) if value else None


def _build():
    from cachefetch import CacheFetch

    store = os.environ["CF_ATTACK_STORE"]
    bounds = {k: v for k, v in (("idle_timeout", _bound("IDLE")), ("fetch_timeout", _bound("TOTAL"))) if v}
    open_cache = CacheFetch(raw_app, store=store, fsync=False, **bounds)
    restricted = CacheFetch(raw_app, store=store, fsync=False, hosts=HOSTS, **bounds)

    def application(environ, start_response):
        chosen = restricted if environ.get("PATH_INFO", "").startswith("/restricted") else open_cache
        return chosen(environ, start_response)

    return application


if "CF_ATTACK_STORE" in os.environ:  # imported by gunicorn, not by a test
    application = _build()


# -- a raw origin for `cachefetch serve` ---------------------------------------

@dataclass
class OriginLog:
    """What :class:`PacedOrigin` saw: bytes sent per path, and when each send ended."""
    sent: dict[str, int] = field(default_factory=dict)
    ended: dict[str, threading.Event] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ended_event(self, path: str) -> threading.Event:
        with self.lock:
            return self.ended.setdefault(path, threading.Event())


class PacedOrigin:
    """``with PacedOrigin() as origin:`` serves on ``origin.url``:

    - ``/paced/NAME?size=N&rate=B`` N deterministic bytes with Content-Length, at
      about B bytes/s (0: as fast as the socket takes them);
    - ``/endless/NAME`` an endless body without a length (until the peer leaves).
    """

    CHUNK = 1 << 16

    def __init__(self) -> None:
        self.log = OriginLog()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                path = parts.path
                if path.startswith("/paced/"):
                    size = int(query["size"])
                    self._head({"Content-Length": str(size)})
                    origin._send(self, path, paced_body(path, size), float(query.get("rate", 0)))
                elif path.startswith("/endless/"):
                    self._head({"Connection": "close"})
                    origin._send(self, path, iter(lambda: b"e" * PacedOrigin.CHUNK, None), 0)
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def _head(self, headers: dict[str, str]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Cache-Control", "max-age=600")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if "Connection" in headers:
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="paced-origin", daemon=True)

    def _send(self, handler, path: str, pieces, rate: float) -> None:
        """Write ``pieces``; at ``rate`` bytes/s (pieces spaced out) when non-zero."""
        sent = 0
        start = time.monotonic()
        try:
            for piece in pieces:
                handler.wfile.write(piece)
                sent += len(piece)
                with self.log.lock:
                    self.log.sent[path] = sent
                if rate:
                    ahead = sent / rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)  # the pace is the behaviour under test
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            handler.close_connection = True
        finally:
            self.log.ended_event(path).set()

    def __enter__(self) -> "PacedOrigin":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self._thread.join()
        self.server.server_close()


def paced_body(path: str, size: int):
    """The deterministic body of ``path``: ``size`` bytes in 64 KiB pieces."""
    import blake3

    seed = blake3.blake3(path.encode()).digest(length=PacedOrigin.CHUNK)
    whole, rest = divmod(size, PacedOrigin.CHUNK)
    for _ in range(whole):
        yield seed
    if rest:
        yield seed[:rest]


def paced_bytes(path: str, size: int) -> bytes:
    """All of :func:`paced_body` at once, to compare a client's body with."""
    return b"".join(paced_body(path, size))
