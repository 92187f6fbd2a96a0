"""gunicorn entry point for the hot-path tests: a versioned resource behind CacheFetch.

``GET /v`` answers ``version=N`` padded to 4 KiB, N read from the file
``CF_TEST_VERSION`` (the test writes it), fresh for an hour. ``POST /v``
answers 204, so CacheFetch invalidates ``/v``. ``X-Worker`` and ``X-Hot``
are :mod:`hot_marks`'s instruments.
"""
import os

from hot_marks import instrumented

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


application = instrumented(CacheFetch(version_app, store=os.environ["CF_TEST_STORE"], fsync=False))
