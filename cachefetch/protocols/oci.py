"""``oci``: a pull-through mirror of an OCI distribution (Docker registry v2).

- ``/v2/`` (the API version check) is passed to the upstream, for its auth
  challenge, and answered here when the upstream is unreachable;
- ``/v2/<name>/blobs/sha256:<hex>`` is verified against its digest and cached
  forever, with ``Docker-Content-Digest``;
- ``/v2/<name>/manifests/sha256:<hex>`` likewise;
- ``/v2/<name>/manifests/<tag>`` is cached for ``tag_ttl`` seconds.

Digest-addressed answers are marked ``public``: their content is fixed by
their name, so sharing them between clients is safe even when the client
sent credentials (which are passed upstream). Manifests by tag are not:
one fetched with credentials is never stored.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from ..upstream import validate_base_url
from . import LocalAnswer, Route, RouteError

_NAME = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_BLOB = re.compile(rf"/v2/({_NAME})/blobs/sha256:([0-9a-f]{{64}})")
_MANIFEST = re.compile(rf"/v2/({_NAME})/manifests/(sha256:[0-9a-f]{{64}}|[A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})")
_IMMUTABLE = "public, max-age=31536000, immutable"
_API_VERSION = LocalAnswer("200 OK", (("Content-Type", "application/json"),
                                      ("Docker-Distribution-API-Version", "registry/2.0")), b"{}")
_MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


class OCIProtocol:
    """Blobs and manifests of an OCI registry.

    :param tag_ttl: seconds a manifest fetched by tag stays fresh.
    """

    name = "oci"

    def __init__(self, upstream: str, tag_ttl: float = 300, **_ignored: Any) -> None:
        self.base = validate_base_url(upstream)
        if tag_ttl < 0:
            raise ValueError("tag_ttl must be >= 0")
        self.tag_ttl = int(tag_ttl)

    def route(self, path: str, environ: Mapping[str, Any]) -> Route | LocalAnswer:
        if path in ("/v2", "/v2/"):
            # The upstream's answer carries its auth challenge (a 401 with
            # WWW-Authenticate) that clients need; never stored. With the
            # upstream unreachable, answer here so cached content still serves.
            return Route(self.base + "/v2/", cache_control="no-store", forward=("Authorization",),
                         fallback=_API_VERSION)
        forward = ("Accept", "Authorization")
        if m := _BLOB.fullmatch(path):
            digest = m.group(2)
            return Route(self.base + path, digest=("sha256", digest), cache_control=_IMMUTABLE, forward=forward,
                         headers=(("Docker-Content-Digest", f"sha256:{digest}"),))
        if m := _MANIFEST.fullmatch(path):
            reference = m.group(2)
            accept = environ.get("HTTP_ACCEPT") or _MANIFEST_TYPES
            if reference.startswith("sha256:"):
                digest = reference[len("sha256:"):]
                return Route(self.base + path, digest=("sha256", digest), cache_control=_IMMUTABLE,
                             forward=forward, headers=(("Docker-Content-Digest", reference),),
                             accept=accept)
            # Not ``public``: a tag names no content, so what the upstream showed one
            # client's credentials (a private manifest) is not stored for others.
            return Route(self.base + path, cache_control=f"max-age={self.tag_ttl}", forward=forward,
                         vary=("Accept",), accept=accept)
        raise RouteError(404, "not an OCI blob or manifest path")
