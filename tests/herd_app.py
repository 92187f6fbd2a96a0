"""The WSGI app the middleware tests run under gunicorn.

Configured through the environment:
  CF_TEST_STORE   the cache store directory
  CF_TEST_CALLS   a file the app appends "pid path" to on every call
  CF_TEST_GATES   a directory: /gated/NAME waits for file NAME to exist there
  CF_TEST_MAX     max_object_size for the middleware (optional)
"""
from __future__ import annotations

import os
import time
from urllib.parse import parse_qs

import blake3

CHUNK = 1 << 16


def body_for(path: str, size: int) -> bytes:
    """The deterministic body of ``path``: BLAKE3's extendable output."""
    return blake3.blake3(path.encode()).digest(length=size)


def make_env(tmp_path) -> dict[str, str]:
    """The environment for a gunicorn running this app, everything under ``tmp_path``."""
    gates = os.path.join(tmp_path, "gates")
    os.makedirs(gates, exist_ok=True)
    return {"CF_TEST_STORE": os.path.join(tmp_path, "store"), "CF_TEST_CALLS": os.path.join(tmp_path, "calls.log"),
            "CF_TEST_GATES": gates, "CF_TEST_SENDFILE": os.path.join(tmp_path, "sendfile.log")}


def calls(env: dict[str, str], path: str | None = None) -> list[list[str]]:
    """The app's calls so far, as ``[pid, path]``, optionally for one path."""
    try:
        with open(env["CF_TEST_CALLS"]) as f:
            lines = [line.split() for line in f]
    except FileNotFoundError:
        return []
    return [line for line in lines if path is None or line[1] == path]


def record_call(path: str) -> None:
    with open(os.environ["CF_TEST_CALLS"], "a") as f:
        f.write(f"{os.getpid()} {path}\n")


def _trickle(data: bytes, delay: float, trickle: float, fail_after: int | None = None):
    time.sleep(delay)  # the slow app under test: a deliberate cost, not synchronisation
    pieces = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
    pause = trickle / len(pieces)
    sent = 0
    for piece in pieces:
        if fail_after is not None and sent >= fail_after:
            raise RuntimeError("the app failed mid-body")
        yield piece
        sent += len(piece)
        if pause:
            time.sleep(pause)


def _wait_gate(name: str) -> None:
    gate = os.path.join(os.environ["CF_TEST_GATES"], name)
    while not os.path.exists(gate):
        time.sleep(0.01)  # the gate is another process's file: nothing to block on


def raw_app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    record_call(path)
    size = int(query.get("size", 10 << 20))
    delay = float(query.get("delay", 1.0))
    # A header, unlike the query, is not part of the cache key.
    trickle = float(environ.get("HTTP_X_TRICKLE") or query.get("trickle", 1.0))
    if path.startswith("/big"):
        data = body_for(path, size)
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(size)), ("Cache-Control", "max-age=3600")])
        return _trickle(data, delay, trickle)
    if path.startswith("/nolength"):
        data = body_for(path, size)
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return _trickle(data, delay, trickle)
    if path.startswith("/fail-mid"):
        data = body_for(path, size)
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))])
        return _trickle(data, delay, trickle, fail_after=int(query.get("after", 1 << 20)))
    if path.startswith("/gated"):
        name = path.rsplit("/", 1)[-1]
        data = body_for(path, size)
        headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(size))]
        if "cookie" in query:
            headers.append(("Set-Cookie", f"id={os.getpid()}-{time.monotonic_ns()}"))
        start_response("200 OK", headers)

        def gated():
            _wait_gate(name)
            yield from _trickle(data, 0, trickle)

        return gated()
    unique = f"{os.getpid()}-{time.monotonic_ns()}".encode()
    if path == "/cookie":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Set-Cookie", "session=" + unique.decode())])
        return [b"private " + unique]
    if path == "/private":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "private, max-age=60")])
        return [b"private " + unique]
    if path == "/no-store":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "no-store")])
        return [b"private " + unique]
    if path == "/auth":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "max-age=60")])
        return [b"for " + environ.get("HTTP_AUTHORIZATION", "nobody").encode() + b" " + unique]
    if path == "/auth-public":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "public, max-age=60")])
        return [b"public " + unique]
    if path == "/vary":
        lang = environ.get("HTTP_ACCEPT_LANGUAGE", "none")
        start_response("200 OK", [("Content-Type", "text/plain"), ("Vary", "Accept-Language"),
                                  ("Cache-Control", "max-age=60")])
        return [f"lang={lang} ".encode() + unique]
    if path == "/error":
        start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
        return [b"error " + unique]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"no such test route"]
