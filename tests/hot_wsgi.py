"""gunicorn entry point for the hot-path tests: a versioned resource behind CacheFetch.

``GET /v`` answers ``version=N`` padded to 4 KiB, N read from the file
``CF_TEST_VERSION`` (the test writes it), fresh for an hour. ``POST /v``
answers 204, so CacheFetch invalidates ``/v``. Two test-only instruments sit
outside the cache: ``X-Worker`` names the worker process that answered, and
``X-Hot: 1`` marks an answer the hot table gave.
"""
import os

from cachefetch import CacheFetch

SIZE = 4096


def version_app(environ, start_response):
    if environ["REQUEST_METHOD"] == "POST":
        start_response("204 No Content", [])
        return []
    with open(os.environ["CF_TEST_VERSION"]) as f:
        body = f"version={f.read().strip()}\n".encode().ljust(SIZE, b".")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
                              ("Cache-Control", "max-age=3600")])
    return [body]


cached = CacheFetch(version_app, store=os.environ["CF_TEST_STORE"], fsync=False)
_serve = cached.hot.serve


def _marked_serve(environ, start_response, key):
    def start(status, headers, exc_info=None):
        return start_response(status, [*headers, ("X-Hot", "1")], exc_info)

    return _serve(environ, start, key)


cached.hot.serve = _marked_serve


def application(environ, start_response):
    def start(status, headers, exc_info=None):
        return start_response(status, [*headers, ("X-Worker", str(os.getpid()))], exc_info)

    return cached(environ, start)
