"""The WSGI app the RFC 9111 gunicorn tests (tests/test_rfc_gunicorn.py) run.

Configured through the environment (see :func:`make_env`):
  CF_TEST_STORE      the cache store directory
  CF_TEST_RFC_CALLS  a file the app appends one JSON line to per call (:class:`AppCall`)
  CF_TEST_GATES      a directory of gate files (a gated call waits for its gate to exist)

Paths:
  /rfc/stale/NAME?delay=S[&swr=N][&gate=G]
      a 256 KiB body with an ETag and a Last-Modified, ``Cache-Control: max-age=0``
      (plus ``stale-while-revalidate=N``): stored, and stale at once. A request whose
      If-None-Match names the ETag waits (S seconds, or until gate G exists),
      then gets a 304 with ``max-age=3600``.
  /rfc/page/NAME
      GET: 200, ``max-age=3600``, a body unique to this call; any other method: 200.
  /rfc/trickle/NAME?size=B&trickle=S
      B bytes trickled over S seconds; the file ``done-NAME`` appears in the
      gates directory once the app has handed over its last byte.
  /rfc/whoami
      200, ``no-store``: which worker answers (the ``X-Worker`` field).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from urllib.parse import parse_qs

from herd_app import _trickle, _wait_gate, body_for
from herd_app import make_env as herd_env

STALE_SIZE = 256 << 10
LAST_MODIFIED = "Sat, 01 Jun 2024 00:00:00 GMT"


def etag_for(path: str) -> str:
    """The strong ETag the app gives ``path``."""
    return '"v1-' + path.rsplit("/", 1)[-1] + '"'


@dataclass(frozen=True)
class AppCall:
    """One call the app received: who took it, and the validators it carried."""

    pid: int
    method: str
    path: str
    if_none_match: str | None
    if_modified_since: str | None

    @property
    def conditional(self) -> bool:
        return self.if_none_match is not None or self.if_modified_since is not None


def make_env(tmp_path) -> dict[str, str]:
    """The environment for a gunicorn running ``rfc_wsgi``, everything under ``tmp_path``."""
    return {**herd_env(tmp_path), "CF_TEST_RFC_CALLS": os.path.join(tmp_path, "rfc-calls.jsonl")}


def app_calls(env: dict[str, str], path: str | None = None) -> list[AppCall]:
    """The app's calls so far, optionally only those for ``path``."""
    try:
        with open(env["CF_TEST_RFC_CALLS"]) as f:
            records = [AppCall(**json.loads(line)) for line in f]
    except FileNotFoundError:
        return []
    return [r for r in records if path is None or r.path == path]


def gate_path(env: dict[str, str], name: str) -> str:
    """The gate file ``name``: a gated call waits until it exists."""
    return os.path.join(env["CF_TEST_GATES"], name)


def done_marker(env: dict[str, str], name: str) -> str:
    """The file a trickled body's app writes once it has sent its last byte."""
    return gate_path(env, f"done-{name}")


def _record(environ) -> None:
    call = AppCall(os.getpid(), environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/"),
                   environ.get("HTTP_IF_NONE_MATCH"), environ.get("HTTP_IF_MODIFIED_SINCE"))
    # One write() of one line in append mode: lines from both workers never interleave.
    with open(os.environ["CF_TEST_RFC_CALLS"], "a") as f:
        f.write(json.dumps(call.__dict__) + "\n")


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    _record(environ)
    name = path.rsplit("/", 1)[-1]
    if path.startswith("/rfc/stale/"):
        etag = etag_for(path)
        validators = [("ETag", etag), ("Last-Modified", LAST_MODIFIED)]
        if etag in environ.get("HTTP_IF_NONE_MATCH", ""):
            if "gate" in query:
                _wait_gate(query["gate"])
            else:
                time.sleep(float(query.get("delay", 0)))  # the slow origin under test, not synchronisation
            start_response("304 Not Modified", validators + [("Cache-Control", "max-age=3600")])
            return []
        cc = "max-age=0" + (f", stale-while-revalidate={query['swr']}" if "swr" in query else "")
        data = body_for(path, STALE_SIZE)
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(data))),
                                  ("Cache-Control", cc)] + validators)
        return [data]
    if path.startswith("/rfc/page/"):
        if environ["REQUEST_METHOD"] != "GET":
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "7")])
            return [b"changed"]
        data = f"{path} {os.getpid()} {time.monotonic_ns()}".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data))),
                                  ("Cache-Control", "max-age=3600")])
        return [data]
    if path.startswith("/rfc/trickle/"):
        size = int(query["size"])
        data = body_for(path, size)
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size)),
                                  ("Cache-Control", "max-age=3600")])
        marker = os.path.join(os.environ["CF_TEST_GATES"], f"done-{name}")

        def trickled():
            yield from _trickle(data, 0, float(query.get("trickle", 3)))
            open(marker, "w").close()

        return trickled()
    if path == "/rfc/whoami":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2"),
                                  ("Cache-Control", "no-store")])
        return [b"me"]
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "18")])
    return [b"no such test route"]
