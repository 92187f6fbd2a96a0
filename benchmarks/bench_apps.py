"""The WSGI apps that ``bench_middleware.py`` serves under gunicorn.

``application`` is chosen when gunicorn imports this module, from the
environment:

``BENCH_APP``
    ``flask``     a Flask app with a 4 KiB view at ``/small``
    ``bytes``     a bare WSGI app answering every GET with the same 4 KiB from
                  memory, with the ``flask`` view's fields: the floor of what
                  gunicorn itself costs per request
    ``fields``    the same, with the fields ``BENCH_FIELDS`` names (JSON
                  ``[[name, value], ...]``) instead of the view's
    ``file``      a bare WSGI app answering every GET with
                  ``environ['wsgi.file_wrapper'](open(BENCH_FILE, 'rb'))``
    ``herd``      a slow app: 1 s before the first byte, then 10 MiB trickled
                  over 1 s (every call appended to ``BENCH_CALLS``); every
                  response names its worker process in ``X-Worker``
    ``generate``  an app that generates ``?size=`` bytes (default 1 GiB) from
                  one preallocated block, so the app itself holds no body
``BENCH_CACHE``
    ``none``           the app as it is (the baseline)
    ``cachefetch``     wrapped in ``CacheFetch(..., store=BENCH_STORE)``
                       (default options: fsync on; ``BENCH_CACHE_STATUS=off``
                       for ``cache_status=False``)
    ``flask-caching``  (``flask`` only) the view decorated with
                       Flask-Caching's ``FileSystemCache`` in ``BENCH_STORE``

For ``flask``, the same module, the same view function and the same response
serve all three ``BENCH_CACHE`` modes; only the wrapping differs.

The bare apps take ``BENCH_CACHE`` ``none`` or ``cachefetch``.
"""
from __future__ import annotations

import json
import os
import time

import blake3

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

SMALL_SIZE = 4 * KiB
SMALL_BODY = (b"cachefetch-bench" * (SMALL_SIZE // 16))[:SMALL_SIZE]
CACHE_CONTROL = "public, max-age=3600"

HERD_SIZE = 10 * MiB
HERD_DELAY = 1.0      # seconds before the first byte
HERD_TRICKLE = 1.0    # seconds over which the body is sent
HERD_CHUNK = 64 * KiB

GENERATE_SIZE = GiB
GENERATE_CHUNK = 256 * KiB


def herd_body(path: str, size: int = HERD_SIZE) -> bytes:
    """The deterministic body the herd app sends for ``path``."""
    return blake3.blake3(path.encode()).digest(length=size)


def _record_call(path: str) -> None:
    calls = os.environ.get("BENCH_CALLS")
    if calls:
        with open(calls, "a") as f:
            f.write(f"{os.getpid()} {path}\n")


# -- flask -------------------------------------------------------------------

def _flask_app(cache: str):
    from flask import Flask, Response

    app = Flask(__name__)

    def small() -> Response:
        # X-Made tells a cached response from a fresh one (a cache replays it).
        return Response(SMALL_BODY, mimetype="application/octet-stream",
                        headers={"Cache-Control": CACHE_CONTROL,
                                 "X-Made": f"{os.getpid()}-{time.monotonic_ns()}"})

    if cache == "flask-caching":
        from flask_caching import Cache

        flask_cache = Cache(app, config={"CACHE_TYPE": "FileSystemCache",
                                         "CACHE_DIR": os.environ["BENCH_STORE"],
                                         "CACHE_DEFAULT_TIMEOUT": 3600,
                                         "CACHE_THRESHOLD": 10000})
        small = flask_cache.cached(timeout=3600)(small)
    app.add_url_rule("/small", "small", small)

    if cache == "cachefetch":
        from cachefetch import CacheFetch

        app.wsgi_app = CacheFetch(app.wsgi_app, store=os.environ["BENCH_STORE"], **cachefetch_options())
    elif cache not in ("none", "flask-caching"):
        raise ValueError(f"BENCH_CACHE={cache!r}: expected none, cachefetch or flask-caching")
    return app


# -- bare apps ---------------------------------------------------------------

def file_app(environ, start_response):
    """Every GET: the file ``BENCH_FILE`` through the server's file_wrapper (sendfile)."""
    path = os.environ["BENCH_FILE"]
    f = open(path, "rb")  # noqa: SIM115  (the server closes it through the file_wrapper)
    size = os.fstat(f.fileno()).st_size
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size)),
                              ("Cache-Control", CACHE_CONTROL)])
    return environ["wsgi.file_wrapper"](f, 64 * KiB)


# The Flask view's X-Made, as long as its own (the pid and a monotonic_ns):
# the bare app sends the very fields the view does, so what a cache adds to
# them is the only difference from the view's answer.
FLOOR_MADE = "0" * 5 + "-" + "0" * 14


def bytes_app(environ, start_response):
    """Every GET: the 4 KiB body from memory with the Flask view's four
    fields, no framework (gunicorn's own cost per request)."""
    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Cache-Control", CACHE_CONTROL),
                              ("X-Made", FLOOR_MADE), ("Content-Length", str(SMALL_SIZE))])
    return [SMALL_BODY]


def fields_app(fields: tuple[tuple[str, str], ...]):
    """A bare app like :func:`bytes_app` that sends ``fields`` instead of
    the view's four (``bench_middleware`` gives it the fields of a
    CacheFetch hit: what gunicorn charges for those is then apart from
    what CacheFetch's own code costs)."""
    def app(environ, start_response):
        start_response("200 OK", list(fields))
        return [SMALL_BODY]

    return app


def herd_app(environ, start_response):
    """1 s before the first byte, then a 10 MiB body trickled over 1 s."""
    path = environ.get("PATH_INFO", "/")
    _record_call(path)
    data = herd_body(path)

    def trickle():
        time.sleep(HERD_DELAY)  # the expensive work the cache saves
        pieces = [data[i:i + HERD_CHUNK] for i in range(0, len(data), HERD_CHUNK)]
        pause = HERD_TRICKLE / len(pieces)
        for piece in pieces:
            yield piece
            time.sleep(pause)

    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(data))),
                              ("Cache-Control", CACHE_CONTROL)])
    return trickle()


_BLOCK = blake3.blake3(b"generate").digest(length=GENERATE_CHUNK)


def generate_app(environ, start_response):
    """``?size=N`` bytes (default 1 GiB), yielded as one reused block: the app holds no body."""
    from urllib.parse import parse_qs

    _record_call(environ.get("PATH_INFO", "/"))
    query = parse_qs(environ.get("QUERY_STRING", ""))
    size = int(query.get("size", [GENERATE_SIZE])[0])

    def chunks():
        left = size
        while left >= len(_BLOCK):
            yield _BLOCK
            left -= len(_BLOCK)
        if left:
            yield _BLOCK[:left]

    start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(size)),
                              ("Cache-Control", CACHE_CONTROL)])
    return chunks()


def cachefetch_options() -> dict:
    """CacheFetch's options besides the store: its defaults, but ``cache_status=False``
    where ``BENCH_CACHE_STATUS=off``."""
    status = os.environ.get("BENCH_CACHE_STATUS", "on")
    if status not in ("on", "off"):
        raise ValueError(f"BENCH_CACHE_STATUS={status!r}: expected on or off")
    return {} if status == "on" else {"cache_status": False}


def _wrap(app, cache: str):
    if cache == "none":
        return app
    if cache == "cachefetch":
        from cachefetch import CacheFetch

        return CacheFetch(app, store=os.environ["BENCH_STORE"], **cachefetch_options())
    raise ValueError(f"BENCH_CACHE={cache!r}: expected none or cachefetch for this app")


def build(name: str, cache: str):
    """The WSGI callable for ``BENCH_APP=name``, ``BENCH_CACHE=cache``."""
    if name == "flask":
        return _flask_app(cache)
    if name == "fields":  # BENCH_FIELDS: JSON [[name, value], ...]
        return _wrap(fields_app(tuple(map(tuple, json.loads(os.environ["BENCH_FIELDS"])))), cache)
    apps = {"bytes": bytes_app, "file": file_app, "herd": herd_app, "generate": generate_app}
    if name not in apps:
        raise ValueError(f"BENCH_APP={name!r}: expected flask, bytes, fields, file, herd or generate")
    app = _wrap(apps[name], cache)
    if name == "herd":
        return _with_worker_header(app)
    return app


def _with_worker_header(app):
    """Outside the cache: name the worker process that answered (``X-Worker``)."""
    pid = str(os.getpid())

    def named(environ, start_response):
        def start(status, headers, exc_info=None):
            return start_response(status, list(headers) + [("X-Worker", pid)], exc_info)

        return app(environ, start)

    return named


# gunicorn loads ``bench_apps:application``; the benchmark script imports this
# module without BENCH_APP for its constants.
application = build(os.environ["BENCH_APP"], os.environ.get("BENCH_CACHE", "none")) if "BENCH_APP" in os.environ \
    else None
