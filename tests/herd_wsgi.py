"""gunicorn entry point for the middleware tests: herd_app wrapped in CacheFetch.

Two test-only instruments sit outside the cache: every response names the
worker that sent it (``X-Worker``), and each ``socket.sendfile`` a worker makes
is appended to ``CF_TEST_SENDFILE`` (the real call still happens).
"""
import os
import socket

from cachefetch import CacheFetch
from herd_app import raw_app

_real_sendfile = socket.socket.sendfile


def _counting_sendfile(self, file, offset=0, count=None):
    path = os.environ.get("CF_TEST_SENDFILE")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {offset} {count}\n")
    return _real_sendfile(self, file, offset, count)


socket.socket.sendfile = _counting_sendfile


def _max_size():
    value = os.environ.get("CF_TEST_MAX")
    return int(value) if value else None


# The herd app's bodies never change at their URL: most of its paths state no
# freshness, so they are kept until evicted rather than revalidated.
cached = CacheFetch(raw_app, store=os.environ["CF_TEST_STORE"], max_object_size=_max_size(), default_ttl="forever",
                    wait_timeout=float(os.environ.get("CF_TEST_WAIT", "30")),
                    on_wait_timeout=os.environ.get("CF_TEST_WAIT_POLICY", "passthrough"), fsync=False)


def application(environ, start_response):
    def start(status, headers, exc_info=None):
        return start_response(status, headers + [("X-Worker", str(os.getpid()))], exc_info)

    return cached(environ, start)
