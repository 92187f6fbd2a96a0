"""``oci``: a pull-through mirror of an OCI distribution (Docker registry v2).

- ``/v2/`` (the API version check) is passed to the upstream, for its auth
  challenge, and answered here when the upstream is unreachable;
- ``/v2/<name>/blobs/sha256:<hex>`` is verified against its digest and cached
  forever, with one ``Docker-Content-Digest``;
- ``/v2/<name>/manifests/sha256:<hex>`` likewise;
- ``/v2/<name>/manifests/<tag>`` is cached for ``tag_ttl`` seconds, per the
  set of manifest media types the client accepts, and also stored under its
  digest (a later pull by digest hits, offline too); offline, a client is
  served any stored variant whose types it accepts;
- ``/v2/<name>/tags/list`` and ``/v2/<name>/referrers/<digest>`` for
  ``tag_ttl`` seconds.

Digest-addressed answers are marked ``public``: their content is fixed by
their name, so sharing them between clients is safe even when the client
sent credentials (which are passed upstream). Manifests by tag are not:
one fetched with credentials is never stored. Local errors are OCI JSON
error bodies.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

from ..upstream import validate_base_url
from . import LocalAnswer, Route, RouteError, check_ttl, path_under, safe_query

_NAME = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_DIGEST = r"sha256:[0-9a-f]{64}"
_BLOB = re.compile(rf"/v2/({_NAME})/blobs/sha256:([0-9a-f]{{64}})")
_MANIFEST = re.compile(rf"/v2/({_NAME})/manifests/({_DIGEST}|[A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})")
_TAGS = re.compile(rf"/v2/({_NAME})/tags/list")
_REFERRERS = re.compile(rf"/v2/({_NAME})/referrers/({_DIGEST})")
_IMMUTABLE = "public, max-age=31536000, immutable"
_API_VERSION = LocalAnswer("200 OK", (("Content-Type", "application/json"),
                                      ("Docker-Distribution-API-Version", "registry/2.0")), b"{}")
#: The manifest media types a mirror knows, each with its short variant name.
MANIFEST_TYPES = {
    "application/vnd.oci.image.index.v1+json": "oci-index",
    "application/vnd.oci.image.manifest.v1+json": "oci-manifest",
    "application/vnd.docker.distribution.manifest.list.v2+json": "docker-list",
    "application/vnd.docker.distribution.manifest.v2+json": "docker-manifest",
}
_ERROR_CODES = {400: "UNSUPPORTED", 403: "DENIED", 404: "NAME_UNKNOWN", 405: "UNSUPPORTED",
                502: "UNAVAILABLE", 504: "UNAVAILABLE"}


def accepted_types(accept: str | None) -> tuple[str, ...]:
    """The known manifest media types an ``Accept`` takes (all of them for
    none or ``*/*``), in :data:`MANIFEST_TYPES` order."""
    if not accept:
        return tuple(MANIFEST_TYPES)
    taken = set()
    for item in accept.split(","):
        media, *params = [p.strip().lower() for p in item.split(";")]
        if any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params):
            continue
        if media in ("*/*", "application/*"):
            return tuple(MANIFEST_TYPES)
        taken.add(media)
    return tuple(t for t in MANIFEST_TYPES if t in taken)


class OCIProtocol:
    """Blobs, manifests, tags and referrers of an OCI registry.

    :param tag_ttl: seconds a manifest fetched by tag, a tag list or a
        referrers list stays fresh.
    :param files_upstreams: base URLs of the blob storage hosts the registry
        may redirect digest-verified downloads to (followed server-side).
    :param mount: must be ``""`` or ``/v2``: OCI clients always ask for ``/v2/``.
    :raises ValueError: on a bad URL, TTL or mount.
    """

    name = "oci"
    #: The router hands this protocol the whole path (``/v2/...``), not the part below its mount.
    whole_path = True

    def __init__(self, upstream: str, tag_ttl: float = 300, files_upstreams: Iterable[str] | None = None,
                 mount: str = "", **_ignored: Any) -> None:
        self.base = validate_base_url(upstream)
        self.tag_ttl = check_ttl("tag_ttl", tag_ttl)
        hosts = [self.base, *(validate_base_url(u) for u in files_upstreams or ())]
        #: netloc -> base URL of every host a redirect may be followed to.
        self.allowed = {urlsplit(u).netloc.lower(): u for u in reversed(hosts)}
        if mount not in ("", "/v2"):
            raise ValueError(f"an oci route is served at / or /v2/ (clients ask for /v2/), not {mount!r}")

    def route(self, path: str, environ: Mapping[str, Any]) -> Route | LocalAnswer:
        if path in ("/v2", "/v2/"):
            # The upstream's answer carries its auth challenge (a 401 with
            # WWW-Authenticate) that clients need; never stored. With the
            # upstream unreachable, answer here so cached content still serves.
            return Route(self.base + "/v2/", cache_control="no-store", forward=("Authorization",),
                         fallback=_API_VERSION)
        forward = ("Accept", "Authorization")
        if m := _BLOB.fullmatch(path):
            return self._by_digest(path, f"sha256:{m.group(2)}", forward, None)
        if m := _MANIFEST.fullmatch(path):
            reference = m.group(2)
            types = accepted_types(environ.get("HTTP_ACCEPT"))
            if not types:
                raise RouteError(404, "the request accepts no manifest media type this mirror knows")
            if reference.startswith("sha256:"):
                return self._by_digest(path, reference, forward, ", ".join(types))
            return self._tag(m.group(1), path, types)
        if (m := _TAGS.fullmatch(path)) or (m := _REFERRERS.fullmatch(path)):
            query = safe_query(environ)
            return Route(self.base + path + (f"?{query}" if query else ""),
                         cache_control=f"max-age={self.tag_ttl}", forward=forward)
        raise RouteError(404, "not an OCI blob, manifest, tags or referrers path")

    def _by_digest(self, path: str, digest: str, forward: tuple[str, ...], accept: str | None) -> Route:
        return Route(self.base + path, digest=("sha256", digest[len("sha256:"):]), cache_control=_IMMUTABLE,
                     forward=forward, headers=(("Docker-Content-Digest", digest),), accept=accept)

    def _tag(self, name: str, path: str, types: tuple[str, ...], alternatives: bool = True) -> Route:
        others: tuple[Route, ...] = ()
        if alternatives:  # offline: any stored variant whose types this client takes
            subsets = itertools.chain.from_iterable(itertools.combinations(types, n)
                                                    for n in range(len(types) - 1, 0, -1))
            others = tuple(self._tag(name, path, s, alternatives=False) for s in subsets)

        def also_under(body: bytes) -> Route:
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            return self._by_digest(f"/v2/{name}/manifests/{digest}", digest, ("Accept", "Authorization"),
                                   ", ".join(types))

        # Not ``public``: a tag names no content, so what the upstream showed one
        # client's credentials (a private manifest) is not stored for others.
        return Route(self.base + path, cache_control=f"max-age={self.tag_ttl}", forward=("Authorization",),
                     vary=("Accept",), accept=", ".join(types), variant=",".join(MANIFEST_TYPES[t] for t in types),
                     alternatives=others, also_under=also_under)

    def local_path(self, url: str) -> str | None:
        return path_under(self.base, url)

    @staticmethod
    def error(status: int, message: str) -> tuple[str, bytes]:
        """An OCI distribution-spec error body."""
        code = _ERROR_CODES.get(status, "UNKNOWN")
        return "application/json", json.dumps({"errors": [{"code": code, "message": message}]}).encode()
