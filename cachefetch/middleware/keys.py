"""Cache keys: which stored resource a request names."""
from __future__ import annotations

from urllib.parse import quote, unquote, urlsplit

from ..wsgi import WSGIEnviron

__all__ = ["default_key", "request_url", "environ_for_url"]

_PATH_SAFE = "/:@!$&'()*+,;=-._~"


def request_url(environ: WSGIEnviron) -> str:
    """``scheme://host/path?query`` of the request: the same for every method.

    The path is percent-encoded again from the decoded ``PATH_INFO``, so
    ``/a%20b`` and ``/a b`` are one URL; the query is kept as sent.
    """
    host = environ.get("HTTP_HOST")
    if not host:
        host = f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}"
    path = (environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")).encode("latin-1", "replace")
    query = environ.get("QUERY_STRING", "")
    return (f"{environ.get('wsgi.url_scheme', 'http')}://{host.lower()}{quote(path, safe=_PATH_SAFE)}"
            + (f"?{query}" if query else ""))


def default_key(environ: WSGIEnviron) -> str | None:
    """The default cache key: :func:`request_url`."""
    return request_url(environ)


def environ_for_url(environ: WSGIEnviron, url: str) -> WSGIEnviron | None:
    """A GET environ like ``environ`` but for ``url`` (same origin), so a key
    function can say which key that URL has; ``None`` if the URL's path is
    not under the app's ``SCRIPT_NAME``."""
    parts = urlsplit(url)
    path = unquote(parts.path, encoding="latin-1")
    script = environ.get("SCRIPT_NAME", "")
    if script and not path.startswith(script):
        return None
    other = {k: v for k, v in environ.items() if not k.startswith("HTTP_IF_") and k != "HTTP_RANGE"}
    other.update(REQUEST_METHOD="GET", PATH_INFO=path[len(script):], QUERY_STRING=parts.query,
                 HTTP_HOST=parts.netloc, CONTENT_LENGTH="")
    return other
