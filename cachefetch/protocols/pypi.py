"""``pypi``: a PEP 503 / PEP 691 simple index and its files.

Index pages (``/simple/`` and ``/simple/<project>/``) are fetched, their file
links rewritten to come back through this proxy, and cached for a short
time. A rewritten link names the file's host and its sha256:

    /-/files/<host[:port]>/<sha256>/<path>#sha256=<sha256>

so the proxy knows the digest to verify when the file is asked for, and
only hosts on the allow-list (the upstream itself and ``files_upstreams``)
are ever fetched. Files are cached forever.

PEP 658 metadata links (``data-core-metadata``) are dropped from the pages:
their digest differs from the file's and clients fall back to the file.
"""
from __future__ import annotations

import html
import json
import re
from typing import Any, Iterable, Mapping
from urllib.parse import quote, unquote, urljoin, urlsplit

from ..upstream import validate_base_url
from . import Route, RouteError

DEFAULT_FILES_UPSTREAMS = {"pypi.org": ("https://files.pythonhosted.org",)}
_JSON_TYPE = "application/vnd.pypi.simple.v1+json"
_HREF = re.compile(r"""href\s*=\s*(["'])(.*?)\1""", re.IGNORECASE | re.DOTALL)
_METADATA_ATTR = re.compile(r"""\s+data-(?:dist-info|core)-metadata\s*=\s*(["']).*?\1""", re.IGNORECASE | re.DOTALL)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_IMMUTABLE = "public, max-age=31536000, immutable"


class PyPIProtocol:
    """A pull-through mirror of a simple index.

    :param upstream: the index host's base URL (``https://pypi.org``); the
        index lives at ``<upstream>/simple/``.
    :param files_upstreams: base URLs of the other hosts files may be served
        from; default: ``https://files.pythonhosted.org`` for pypi.org.
    :param index_ttl: seconds an index page stays fresh.
    :raises ValueError: on a bad URL or TTL.
    """

    name = "pypi"

    def __init__(self, upstream: str, files_upstreams: Iterable[str] | None = None, index_ttl: float = 600,
                 **_ignored: Any) -> None:
        self.base = validate_base_url(upstream)
        if index_ttl < 0:
            raise ValueError("index_ttl must be >= 0")
        self.index_ttl = int(index_ttl)
        if files_upstreams is None:
            files_upstreams = DEFAULT_FILES_UPSTREAMS.get(urlsplit(self.base).netloc.lower(), ())
        hosts = [self.base, *(validate_base_url(u) for u in files_upstreams)]
        #: netloc -> base URL of every host a file may come from.
        self.allowed = {urlsplit(u).netloc.lower(): u for u in reversed(hosts)}

    # -- routing ---------------------------------------------------------

    def route(self, path: str, environ: Mapping[str, Any]) -> Route:
        if path == "/simple" or path.startswith("/simple/"):
            if path == "/simple":
                path = "/simple/"
            return Route(self.base + path, cache_control=f"public, max-age={self.index_ttl}",
                         rewrite=self.rewrite_page, forward=("Accept",), vary=("Accept",))
        if path.startswith("/-/files/"):
            parts = path[len("/-/files/"):].split("/", 2)
            if len(parts) != 3 or not parts[2]:
                raise RouteError(404, "expected /-/files/<host>/<sha256>/<path>")
            netloc, digest, rest = unquote(parts[0]).lower(), parts[1], parts[2]
            if netloc not in self.allowed:
                raise RouteError(403, f"{netloc} is not an allowed files upstream")
            if not _SHA256.fullmatch(digest):
                raise RouteError(404, "the file link carries no sha256")
            base = self.allowed[netloc]
            origin = f"{urlsplit(base).scheme}://{urlsplit(base).netloc}"
            return Route(origin + "/" + rest, digest=("sha256", digest), cache_control=_IMMUTABLE, forward=())
        raise RouteError(404, "this proxy serves /simple/ and the files it links")

    # -- rewriting -------------------------------------------------------

    def proxy_link(self, url: str, page_url: str) -> str | None:
        """The proxy's link for a file URL on a page, or ``None`` to leave it."""
        absolute = urljoin(page_url, html.unescape(url))
        parts = urlsplit(absolute)
        netloc = parts.netloc.lower()
        digest = None
        if parts.fragment.startswith("sha256="):
            digest = parts.fragment[len("sha256="):].lower()
        if netloc not in self.allowed or digest is None or not _SHA256.fullmatch(digest) or parts.query:
            return None
        return f"/-/files/{quote(netloc)}/{digest}{parts.path}#sha256={digest}"

    def rewrite_page(self, body: bytes, content_type: str, page_url: str) -> tuple[bytes, str]:
        """Point a page's file links at this proxy (HTML or PEP 691 JSON)."""
        if content_type.split(";")[0].strip().lower() == _JSON_TYPE:
            return self._rewrite_json(body, page_url), content_type
        text = body.decode("utf-8", "replace")

        def anchor(match: re.Match[str]) -> str:
            link = self.proxy_link(match.group(2), page_url)
            if link is None:
                return match.group(0)
            return f'href="{html.escape(link, quote=True)}"'

        text = _METADATA_ATTR.sub("", _HREF.sub(anchor, text))
        return text.encode("utf-8"), content_type

    def _rewrite_json(self, body: bytes, page_url: str) -> bytes:
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise RouteError(502, f"the upstream sent invalid JSON: {exc}") from None
        for entry in doc.get("files", []) if isinstance(doc, dict) else []:
            if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
                continue
            sha = (entry.get("hashes") or {}).get("sha256")
            url = entry["url"].split("#", 1)[0] + (f"#sha256={sha}" if sha else "")
            link = self.proxy_link(url, page_url)
            if link is not None:
                entry["url"] = link.split("#", 1)[0]
                entry.pop("core-metadata", None)
                entry.pop("dist-info-metadata", None)
                entry.pop("data-dist-info-metadata", None)
        return json.dumps(doc).encode()
