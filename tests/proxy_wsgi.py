"""`cachefetch.proxy.create_app` as a gunicorn app module, configured from the
environment, for the options the command line does not expose.

    CF_PROXY_UPSTREAM      origin base URL (required)
    CF_PROXY_STORE         store directory (required)
    CF_PROXY_PROTOCOL      generic | pypi | oci (default generic)
    CF_PROXY_READ_TIMEOUT  seconds (default 60)
    CF_PROXY_TAG_TTL       (oci) seconds a manifest by tag stays fresh (default 300)
    CF_PROXY_DEFAULT_TTL   seconds, "forever" (default: the tests' origins serve
                           immutable files and state no freshness) or "rfc"
"""
from __future__ import annotations

import os

from cachefetch.proxy import create_app


def _default_ttl(text: str) -> float | str | None:
    return None if text == "rfc" else text if text == "forever" else float(text)


application = create_app(
    os.environ["CF_PROXY_UPSTREAM"],
    os.environ["CF_PROXY_STORE"],
    os.environ.get("CF_PROXY_PROTOCOL", "generic"),
    read_timeout=float(os.environ.get("CF_PROXY_READ_TIMEOUT", "60")),
    tag_ttl=float(os.environ.get("CF_PROXY_TAG_TTL", "300")),
    threads=8,
    fsync=False,
    default_ttl=_default_ttl(os.environ.get("CF_PROXY_DEFAULT_TTL", "forever")),
)
