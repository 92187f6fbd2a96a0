"""gunicorn entry point for the large hot-path tests: one 1 MiB resource behind CacheFetch.

``GET /big`` answers ``body()`` (1 MiB, fresh for an hour) and appends a line
to the file ``CF_TEST_CALLS`` for each call of the app. ``X-Worker`` and
``X-Hot`` are :mod:`hot_marks`'s instruments (a hot answer here is sent from
the blob, since 1 MiB is past ``memory_object_size``).
"""
import os

from hot_marks import instrumented

from cachefetch import CacheFetch

SIZE = 1 << 20


def body() -> bytes:
    """The resource's bytes: every 4 KiB block numbered, so a wrong offset shows."""
    return b"".join(f"block {i:06d} ".encode().ljust(4096, b".") for i in range(SIZE // 4096))


def big_app(environ, start_response):
    with open(os.environ["CF_TEST_CALLS"], "a") as f:
        f.write(f"{os.getpid()}\n")
    data = body()
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(data))),
                              ("Cache-Control", "max-age=3600")])
    return [data]


# gunicorn loads ``hot_large_wsgi:application``; the test imports this module
# for ``body`` alone, without a store.
application = (instrumented(CacheFetch(big_app, store=os.environ["CF_TEST_STORE"], fsync=False))
               if "CF_TEST_STORE" in os.environ else None)
