"""``npm``: a pull-through mirror of an npm registry (registry.npmjs.org, verdaccio, ...).

- packuments (``/<name>``, ``/@scope%2f<name>``), full or abbreviated
  (``application/vnd.npm.install-v1+json``), are cached for
  ``packument_ttl`` seconds and revalidated with the registry's
  validators, so a newly published version shows within that time. Their
  tarball URLs are rewritten to come back through this proxy, whatever
  host the registry wrote into them, so one ``npm config set registry``
  line is enough and lockfiles record the proxy:

      /-/tarballs/<host[:port]>/<algo>=<hex>/<path>

- tarballs behind such links are verified against ``dist.integrity``
  (sha512) or ``dist.shasum`` (sha1) and cached forever;
- everything else (search, publish, login, audit) is passed to the registry
  as a reverse proxy would.

A rewritten packument holds absolute URLs naming the host the client
reached the proxy by, so it is stored per such host (and per form).
"""
from __future__ import annotations

import base64
import json
import re
from typing import Any, Iterable, Mapping
from urllib.parse import quote, unquote, urlsplit

from ..upstream import validate_base_url
from . import ALL_HEADERS, Route, RouteError, check_mount, check_ttl, path_under, plain_error, safe_query

ABBREVIATED = "application/vnd.npm.install-v1+json"
ACCEPT = {"abbreviated": f"{ABBREVIATED}; q=1.0, application/json; q=0.8", "full": "application/json"}
_NAME = r"[A-Za-z0-9][A-Za-z0-9._~-]*"
_PACKUMENT = re.compile(rf"/(?:(@{_NAME})/)?({_NAME})(?:/([A-Za-z0-9._+-]+))?")
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_DIGEST = re.compile(r"(sha512|sha1)=([0-9a-f]+)")
_HEX_LENGTH = {"sha512": 128, "sha1": 40}
_IMMUTABLE = "public, max-age=31536000, immutable"


def preferred(accept: str | None) -> str:
    """``abbreviated`` if the client's ``Accept`` asks for the install
    document (npm, yarn and pnpm do), else ``full``."""
    for item in (accept or "").split(","):
        media, *params = [p.strip().lower() for p in item.split(";")]
        if media == ABBREVIATED and not any(p.replace(" ", "") in ("q=0", "q=0.0") for p in params):
            return "abbreviated"
    return "full"


def dist_digest(dist: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(algorithm, hex)`` to verify a tarball by: sha512 ``integrity``, else ``shasum``."""
    for item in str(dist.get("integrity") or "").split():
        algo, _, value = item.partition("-")
        if algo == "sha512":
            try:
                raw = base64.b64decode(value, validate=True)
            except ValueError:
                continue
            if len(raw) == 64:
                return "sha512", raw.hex()
    shasum = str(dist.get("shasum") or "").lower()
    if re.fullmatch("[0-9a-f]{40}", shasum):
        return "sha1", shasum
    return None


class NpmProtocol:
    """An npm registry.

    :param packument_ttl: seconds a packument stays fresh.
    :param files_upstreams: base URLs of other hosts tarballs may come from.
    :param mount: the path prefix it is served under (``""``: the root).
    :raises ValueError: on a bad URL, TTL or mount.
    """

    name = "npm"

    def __init__(self, upstream: str, packument_ttl: float = 300, files_upstreams: Iterable[str] | None = None,
                 mount: str = "", **_ignored: Any) -> None:
        self.base = validate_base_url(upstream)
        self.packument_ttl = check_ttl("packument_ttl", packument_ttl)
        self.mount = check_mount(mount)
        hosts = [self.base, *(validate_base_url(u) for u in files_upstreams or ())]
        self.allowed = {urlsplit(u).netloc.lower(): u for u in reversed(hosts)}

    def route(self, path: str, environ: Mapping[str, Any]) -> Route:
        if path.startswith("/-/tarballs/"):
            return self._tarball(path[len("/-/tarballs/"):])
        method = environ.get("REQUEST_METHOD", "GET")
        m = _PACKUMENT.fullmatch(unquote(path))
        if m is None or method not in ("GET", "HEAD") or m.group(3) == "-":
            query = safe_query(environ)
            return Route(self.base + path + (f"?{query}" if query else ""), forward=ALL_HEADERS, shared=False)
        scope, name, version = m.groups()
        full_name = f"{scope}/{name}" if scope else name
        url = self.base + "/" + quote(full_name, safe="@") + (f"/{quote(version)}" if version else "")
        host = environ.get("HTTP_HOST") or f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}"
        if not _HOST.fullmatch(host):
            raise RouteError(400, "the Host header is not host[:port]")
        here = f"{environ.get('wsgi.url_scheme', 'http')}://{host.lower()}{self.mount}"
        kind = preferred(environ.get("HTTP_ACCEPT"))
        return self._packument(url, kind, here)

    def _packument(self, url: str, kind: str, here: str) -> Route:
        def rewrite(body: bytes, content_type: str, page_url: str) -> tuple[bytes, str]:
            return self.rewrite_packument(body, here), content_type

        # Not ``public``: a private registry's packument fetched with one
        # client's credentials is not stored for others.
        return Route(url, cache_control=f"max-age={self.packument_ttl}", rewrite=rewrite,
                     forward=("Authorization", "Npm-Command", "User-Agent"), vary=("Accept",),
                     accept=ACCEPT[kind], variant=f"{kind} {here}",
                     alternatives=(self._packument(url, "full", here),) if kind == "abbreviated" else ())

    def _tarball(self, rest: str) -> Route:
        parts = rest.split("/", 2)
        if len(parts) != 3 or not parts[2]:
            raise RouteError(404, "expected /-/tarballs/<host>/<algo>=<hex>/<path>")
        netloc, path = unquote(parts[0]).lower(), parts[2]
        if netloc not in self.allowed:
            raise RouteError(403, f"{netloc} is not an allowed tarball upstream")
        m = _DIGEST.fullmatch(parts[1])
        if m is None or len(m.group(2)) != _HEX_LENGTH[m.group(1)]:
            raise RouteError(404, "the tarball link carries no sha512 or sha1 digest")
        base = urlsplit(self.allowed[netloc])
        return Route(f"{base.scheme}://{base.netloc}/{path}", digest=(m.group(1), m.group(2)),
                     cache_control=_IMMUTABLE, forward=("Authorization",))

    def local_path(self, url: str) -> str | None:
        return path_under(self.base, url, self.mount)

    error = staticmethod(plain_error)

    def tarball_link(self, tarball: str, dist: Mapping[str, Any], here: str) -> str | None:
        """The proxy's URL for a tarball, or ``None`` when it has no digest to verify by."""
        digest = dist_digest(dist)
        if digest is None:
            return None
        parts = urlsplit(tarball)
        netloc = parts.netloc.lower()
        if netloc not in self.allowed:  # the registry wrote a public or its own name: it serves the path
            netloc = urlsplit(self.base).netloc.lower()
        return f"{here}/-/tarballs/{quote(netloc)}/{digest[0]}={digest[1]}{parts.path}"

    def rewrite_packument(self, body: bytes, here: str) -> bytes:
        """Point every ``dist.tarball`` of a packument (or a version document) at this proxy.

        :raises RouteError: (502) if the registry's answer is not a JSON object.
        """
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise RouteError(502, f"the registry sent invalid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise RouteError(502, "the registry's packument is not a JSON object")
        versions = doc.get("versions")
        documents = list(versions.values()) if isinstance(versions, dict) else [doc]
        for version in documents:
            dist = version.get("dist") if isinstance(version, dict) else None
            if isinstance(dist, dict) and isinstance(dist.get("tarball"), str):
                link = self.tarball_link(dist["tarball"], dist, here)
                if link is not None:
                    dist["tarball"] = link
        return json.dumps(doc, separators=(",", ":")).encode()
