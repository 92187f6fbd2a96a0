"""Revalidation (RFC 9111 §4.3, §3.2): the conditional request, and what a 304 updates."""
from __future__ import annotations

from typing import Sequence

from .conditionals import parse_etags
from .dates import parse_http_date
from .headers import header, stored_headers
from .lookup import StoredResponse

__all__ = ["conditional_fields", "select_for_update", "updated_headers"]

# RFC 9111 §3.2: a 304 must not change how the stored body is framed or encoded.
_KEPT_ON_UPDATE = frozenset({"content-length", "content-encoding", "content-range", "transfer-encoding",
                             "content-type"})


def conditional_fields(stale: StoredResponse, variants: Sequence[StoredResponse]) -> dict[str, str]:
    """The WSGI environ fields of a conditional request for ``stale``:
    ``If-None-Match`` with the ETags of every stored variant of the resource
    (so a 304 can pick any of them, §4.3.1), and ``If-Modified-Since`` with
    ``stale``'s ``Last-Modified`` when it is a valid date."""
    fields: dict[str, str] = {}
    tags: list[str] = []
    for entry in [stale, *variants]:
        etag = header(entry.headers, "ETag")
        if etag and parse_etags(etag) and etag.strip() not in tags:
            tags.append(etag.strip())
    if tags:
        fields["HTTP_IF_NONE_MATCH"] = ", ".join(tags)
    last_modified = header(stale.headers, "Last-Modified")
    if last_modified and parse_http_date(last_modified) is not None:
        fields["HTTP_IF_MODIFIED_SINCE"] = last_modified
    return fields


def select_for_update(headers_304: Sequence[tuple[str, str]], revalidated: StoredResponse,
                      variants: Sequence[StoredResponse]) -> list[StoredResponse]:
    """The stored responses a 304 refreshes (RFC 9111 §4.3.4): those with its
    strong ETag; else, for a weak one, the most recent match; else those with
    its Last-Modified; and when it carries no validator at all, the one we
    revalidated (origins often send a bare 304, and it answers our request).
    """
    candidates = list(dict.fromkeys([revalidated, *variants]))
    etag = header(headers_304, "ETag")
    if etag:
        parsed = parse_etags(etag)
        if not parsed:
            return []
        tag, weak = parsed[0]
        matches = [e for e in candidates if _tag_of(e) is not None and _tag_of(e)[0] == tag]
        if weak:
            return [max(matches, key=lambda e: e.stored_at)] if matches else []
        return [e for e in matches if not _tag_of(e)[1]]
    last_modified = header(headers_304, "Last-Modified")
    if last_modified:
        return [e for e in candidates if header(e.headers, "Last-Modified") == last_modified]
    return [revalidated]


def _tag_of(entry: StoredResponse) -> tuple[str, bool] | None:
    etag = header(entry.headers, "ETag")
    parsed = parse_etags(etag) if etag else None
    return parsed[0] if parsed else None


def updated_headers(stored: Sequence[tuple[str, str]], headers_304: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """RFC 9111 §3.2: the stored fields with each field of the 304 replacing
    the stored one of that name, except what cannot be stored and what frames
    or encodes the stored body."""
    fresh = [(k, v) for k, v in stored_headers(headers_304) if k.lower() not in _KEPT_ON_UPDATE]
    replaced = {k.lower() for k, _ in fresh}
    return [(k, v) for k, v in stored if k.lower() not in replaced] + fresh
