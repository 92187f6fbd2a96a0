"""A Flask app behind CacheFetch: one slow, large, cacheable endpoint and one private one.

Run it (from this directory) with the example gunicorn config:

    CACHEFETCH_STORE=/tmp/cachefetch-flask gunicorn -c gunicorn.conf.py flask_app:app

then ask for the same artifact from many clients at once:

    curl -s -o /dev/null -w '%{http_code} %header{cache-status}\n' localhost:8000/artifact/demo
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time

from flask import Flask, Response, request

from cachefetch import CacheFetch

app = Flask(__name__)


@app.route("/artifact/<name>")
def artifact(name: str) -> Response:
    """An expensive build product: 1 s before the first byte, then trickled out."""
    size = min(int(request.args.get("size", 32 << 20)), 1 << 30)
    seed = hashlib.sha256(name.encode()).digest()

    def generate():
        time.sleep(1.0)  # the expensive part the cache saves
        block = seed * (65536 // len(seed))
        left = size
        while left > 0:
            piece = block[:left]
            left -= len(piece)
            yield piece

    return Response(generate(), mimetype="application/octet-stream",
                    headers={"Content-Length": str(size), "Cache-Control": "public, max-age=86400"})


@app.route("/me")
def me() -> Response:
    """Per-user: sets a cookie, so it is never stored or shared."""
    response = Response(f"hello visitor {time.monotonic_ns()}\n", mimetype="text/plain")
    response.set_cookie("visitor", str(time.monotonic_ns()))
    return response


store = os.environ.get("CACHEFETCH_STORE", os.path.join(tempfile.gettempdir(), "cachefetch-flask-example"))
app.wsgi_app = CacheFetch(app.wsgi_app, store=store)
