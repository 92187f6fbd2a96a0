"""gunicorn entry point for the RFC 9111 tests: rfc_app wrapped in CacheFetch
with the RFC's defaults (no ``default_ttl``: freshness is what the app states).

Every response names the worker that sent it (``X-Worker``), outside the cache.
"""
import os

from cachefetch import CacheFetch
from rfc_app import application as rfc_application

cached = CacheFetch(rfc_application, store=os.environ["CF_TEST_STORE"], fsync=False)


def application(environ, start_response):
    def start(status, headers, exc_info=None):
        return start_response(status, headers + [("X-Worker", str(os.getpid()))], exc_info)

    return cached(environ, start)
