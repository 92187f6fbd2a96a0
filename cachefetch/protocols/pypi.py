"""``pypi``: a PEP 503 / PEP 691 simple index and its files.

Index pages (``/simple/`` and ``/simple/<project>/``) are fetched, their file
links rewritten to come back through this proxy, and cached for a short
time (revalidated with the upstream's validators). A rewritten link names
the file's host and its digest (any PEP 503 hash that hashlib knows):

    /-/files/<host[:port]>/<digest>[,core-<algo>=<hex>]/<path>#<algo>=<hex>

where ``<digest>`` is a bare sha256 hex or ``<algo>=<hex>``, so the proxy
knows what to verify when the file is asked for, and only hosts on the
allow-list (the upstream itself and ``files_upstreams``) are ever fetched.
Files are cached forever. PEP 658/714 metadata (``<file>.metadata``) is
served the same way, verified against its own ``data-core-metadata``
digest, which the link carries; a page that gives metadata without a digest
loses the attribute (clients then read the file itself).

The upstream URL may carry the index path (devpi's ``/root/pypi/+simple/``,
pypiserver's ``/simple/``, a static tree): the proxy always serves it as
``/simple/``.
"""
from __future__ import annotations

import hashlib
import html
import json
import re
from typing import Any, Iterable, Mapping
from urllib.parse import quote, unquote, urljoin, urlsplit

from ..upstream import validate_base_url
from . import LocalAnswer, Route, RouteError, check_mount, check_ttl, path_under, plain_error

DEFAULT_FILES_UPSTREAMS = {"pypi.org": ("https://files.pythonhosted.org",)}
JSON_TYPE = "application/vnd.pypi.simple.v1+json"
HTML_TYPE = "application/vnd.pypi.simple.v1+html"
#: What the proxy asks the upstream for, per representation (PEP 691).
ACCEPT = {"json": f"{JSON_TYPE}, {HTML_TYPE};q=0.1, text/html;q=0.01",
          "html": f"{HTML_TYPE}, text/html;q=0.01"}
#: PEP 503's hash names, strongest first (all in hashlib).
ALGORITHMS = ("sha512", "sha384", "sha256", "sha224", "sha1", "md5")
_HEX_LENGTH = {a: hashlib.new(a).digest_size * 2 for a in ALGORITHMS}
_ANCHOR = re.compile(r"<a\s[^>]*>", re.IGNORECASE | re.DOTALL)
_HREF = re.compile(r"""href\s*=\s*(["'])(.*?)\1""", re.IGNORECASE | re.DOTALL)
_METADATA_ATTR = re.compile(r"""\s+data-(?:dist-info|core)-metadata\s*=\s*(["'])(.*?)\1""", re.IGNORECASE | re.DOTALL)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_IMMUTABLE = "public, max-age=31536000, immutable"


def normalize(name: str) -> str:
    """PEP 503's normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_digest(text: str) -> tuple[str, str] | None:
    """``(algorithm, hex)`` of ``algo=hex`` (a PEP 503 fragment), or ``None``."""
    algo, sep, value = text.partition("=")
    algo, value = algo.lower(), value.lower()
    if not sep or algo not in _HEX_LENGTH or len(value) != _HEX_LENGTH[algo] or not re.fullmatch("[0-9a-f]+", value):
        return None
    return algo, value


def _best(hashes: Any) -> tuple[str, str] | None:
    """The strongest usable digest of a PEP 691 ``hashes`` dict."""
    if not isinstance(hashes, dict):
        return None
    for algo in ("sha256", *ALGORITHMS):
        value = hashes.get(algo)
        if isinstance(value, str) and (found := parse_digest(f"{algo}={value}")):
            return found
    return None


def preferred(accept: str | None) -> tuple[str, tuple[str, ...]]:
    """The representation a client's ``Accept`` prefers (``json`` or ``html``),
    and the others it also takes, best first (PEP 691; no Accept = HTML)."""
    quality = {"json": 0.0, "html": 0.0}
    if not accept:
        return "html", ()
    for item in accept.split(","):
        media, *params = [p.strip() for p in item.split(";")]
        q = 1.0
        for param in params:
            if param.lower().startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        media = media.lower()
        kind = "json" if media == JSON_TYPE else "html" if media in (HTML_TYPE, "text/html", "*/*") else None
        if kind is not None:
            quality[kind] = max(quality[kind], q)
    ranked = sorted((k for k in quality if quality[k] > 0), key=lambda k: (-quality[k], k != "json"))
    if not ranked:
        return "html", ()
    return ranked[0], tuple(ranked[1:])


class PyPIProtocol:
    """A pull-through mirror of a simple index.

    :param upstream: the index host's base URL (``https://pypi.org``, whose
        index is at ``/simple/``) or the index URL itself
        (``http://devpi:3141/root/pypi/+simple/``).
    :param files_upstreams: base URLs of the other hosts files may be served
        from; default: ``https://files.pythonhosted.org`` for pypi.org.
    :param index_ttl: seconds an index page stays fresh.
    :param mount: the path prefix it is served under (``""``: the root).
    :raises ValueError: on a bad URL, TTL or mount.
    """

    name = "pypi"

    def __init__(self, upstream: str, files_upstreams: Iterable[str] | None = None, index_ttl: float = 600,
                 mount: str = "", **_ignored: Any) -> None:
        url = validate_base_url(upstream)
        parts = urlsplit(url)
        self.base = f"{parts.scheme}://{parts.netloc}"
        #: The index root, ending in ``/``.
        self.index_url = url + "/" if parts.path else self.base + "/simple/"
        self.index_ttl = check_ttl("index_ttl", index_ttl)
        self.mount = check_mount(mount)
        if files_upstreams is None:
            files_upstreams = DEFAULT_FILES_UPSTREAMS.get(parts.netloc.lower(), ())
        hosts = [self.base, *(validate_base_url(u) for u in files_upstreams)]
        #: netloc -> base URL of every host a file may come from.
        self.allowed = {urlsplit(u).netloc.lower(): u for u in reversed(hosts)}

    # -- routing ---------------------------------------------------------

    def route(self, path: str, environ: Mapping[str, Any]) -> Route | LocalAnswer:
        if path == "/simple" or path.startswith("/simple/"):
            return self._page(path[len("/simple"):].lstrip("/"), environ)
        if path.startswith("/-/files/"):
            return self._file(path[len("/-/files/"):])
        raise RouteError(404, "this proxy serves /simple/ and the files it links")

    def _page(self, rest: str, environ: Mapping[str, Any]) -> Route | LocalAnswer:
        if rest:
            project = unquote(rest.rstrip("/"))
            if "/" in project:
                raise RouteError(404, "expected /simple/<project>/")
            canonical = quote(normalize(project))
            if canonical + "/" != rest:
                # PEP 503: the index answers other spellings with a redirect to its own.
                location = f"{self.mount}/simple/{canonical}/"
                return LocalAnswer("301 Moved Permanently", (("Location", location),))
            rest = canonical + "/"
        best, others = preferred(environ.get("HTTP_ACCEPT"))
        return self._page_route(self.index_url + rest, best, others)

    def _page_route(self, url: str, variant: str, others: tuple[str, ...] = ()) -> Route:
        return Route(url, cache_control=f"public, max-age={self.index_ttl}", rewrite=self.rewrite_page,
                     forward=(), vary=("Accept",), accept=ACCEPT[variant], variant=variant,
                     alternatives=tuple(self._page_route(url, o) for o in others))

    def _file(self, rest: str) -> Route:
        parts = rest.split("/", 2)
        if len(parts) != 3 or not parts[2]:
            raise RouteError(404, "expected /-/files/<host>/<digest>/<path>")
        netloc, digests, path = unquote(parts[0]).lower(), parts[1].split(","), parts[2]
        if netloc not in self.allowed:
            raise RouteError(403, f"{netloc} is not an allowed files upstream")
        file_digest = ("sha256", digests[0]) if _SHA256.fullmatch(digests[0]) else parse_digest(digests[0])
        if file_digest is None:
            raise RouteError(404, "the file link carries no digest")
        digest = file_digest
        if path.endswith(".metadata"):
            core = [parse_digest(d[len("core-"):]) for d in digests[1:] if d.startswith("core-")]
            if not core or core[0] is None:
                raise RouteError(404, "the link carries no metadata digest")
            digest = core[0]
        base = urlsplit(self.allowed[netloc])
        return Route(f"{base.scheme}://{base.netloc}/{path}", digest=digest, cache_control=_IMMUTABLE, forward=())

    def local_path(self, url: str) -> str | None:
        path = path_under(self.index_url, url)
        return None if path is None else f"{self.mount}/simple{path}"

    error = staticmethod(plain_error)

    # -- rewriting -------------------------------------------------------

    def proxy_link(self, url: str, page_url: str, metadata: tuple[str, str] | None = None) -> str | None:
        """The proxy's link for a file URL on a page, or ``None`` to leave it.

        :param metadata: the digest of its PEP 658 metadata file, if any.
        """
        absolute = urljoin(page_url, html.unescape(url))
        parts = urlsplit(absolute)
        netloc = parts.netloc.lower()
        digest = parse_digest(parts.fragment)
        if netloc not in self.allowed or digest is None or parts.query:
            return None
        segment = digest[1] if digest[0] == "sha256" else f"{digest[0]}={digest[1]}"
        if metadata is not None:
            segment += f",core-{metadata[0]}={metadata[1]}"
        return f"{self.mount}/-/files/{quote(netloc)}/{segment}{parts.path}#{digest[0]}={digest[1]}"

    def rewrite_page(self, body: bytes, content_type: str, page_url: str) -> tuple[bytes, str]:
        """Point a page's file links at this proxy (HTML or PEP 691 JSON).

        :raises RouteError: (502) for a JSON page that is not JSON.
        """
        if content_type.split(";")[0].strip().lower() == JSON_TYPE:
            return self._rewrite_json(body, page_url), content_type
        text = body.decode("utf-8", "replace")
        return _ANCHOR.sub(lambda m: self._rewrite_anchor(m.group(0), page_url), text).encode("utf-8"), content_type

    def _rewrite_anchor(self, tag: str, page_url: str) -> str:
        href = _HREF.search(tag)
        if href is None:
            return tag
        attrs = _METADATA_ATTR.findall(tag)
        metadata = next((d for _, v in attrs if (d := parse_digest(html.unescape(v)))), None)
        link = self.proxy_link(href.group(2), page_url, metadata)
        if link is None:
            return tag
        tag = tag[:href.start()] + f'href="{html.escape(link, quote=True)}"' + tag[href.end():]
        return tag if metadata is not None else _METADATA_ATTR.sub("", tag)

    def _rewrite_json(self, body: bytes, page_url: str) -> bytes:
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise RouteError(502, f"the upstream sent invalid JSON: {exc}") from None
        for entry in doc.get("files", []) if isinstance(doc, dict) else []:
            if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
                continue
            digest = _best(entry.get("hashes"))
            if digest is None:
                continue
            metadata = _best(entry.get("core-metadata")) or _best(entry.get("dist-info-metadata"))
            url = entry["url"].split("#", 1)[0] + f"#{digest[0]}={digest[1]}"
            link = self.proxy_link(url, page_url, metadata)
            if link is None:
                continue
            entry["url"] = link.split("#", 1)[0]
            if metadata is None:
                for name in ("core-metadata", "dist-info-metadata", "data-dist-info-metadata"):
                    entry.pop(name, None)
        return json.dumps(doc).encode()
