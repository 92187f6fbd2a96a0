"""gunicorn entry point for the middleware tests: herd_app wrapped in CacheFetch."""
import os

from cachefetch import CacheFetch
from herd_app import raw_app


def _max_size():
    value = os.environ.get("CF_TEST_MAX")
    return int(value) if value else None


application = CacheFetch(raw_app, store=os.environ["CF_TEST_STORE"], max_object_size=_max_size(),
                         wait_timeout=float(os.environ.get("CF_TEST_WAIT", "30")), fsync=False)
