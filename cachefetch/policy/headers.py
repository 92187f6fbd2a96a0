"""Header vocabulary shared by the rules: reading fields, what is stored, Vary."""
from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

from ..hashing import hash_bytes

__all__ = ["header", "stored_headers", "without_fields", "vary_names", "variant_of", "environ_name",
           "environ_names", "short_values", "SHORT_VALUES_CHARS", "has_validator"]

# RFC 9110 §7.6.1 hop-by-hop fields, cookies, and what the cache sets itself
# on every answer (Age is recomputed; Content-Length comes from the blob).
_NOT_STORED = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "set-cookie", "set-cookie2",
    "content-length", "age", "server", "cache-status",
})


def header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The values of field ``name`` joined by ``", "`` (None if absent)."""
    name = name.lower()
    values = [v for k, v in headers if k.lower() == name]
    return ", ".join(values) if values else None


def stored_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The end-to-end fields to store and replay: no hop-by-hop fields (nor
    those the Connection field names), no Set-Cookie, and none the cache sets
    itself. ``Date`` is kept: a hit replays the origin's."""
    headers = list(headers)
    dropped = set(_NOT_STORED)
    for value in (v for k, v in headers if k.lower() == "connection"):
        dropped.update(t.strip().lower() for t in value.split(","))
    return [(k, v) for k, v in headers if k.lower() not in dropped]


def without_fields(headers: Iterable[tuple[str, str]], names: Iterable[str]) -> list[tuple[str, str]]:
    """``headers`` less the fields ``names`` (case-insensitive)."""
    drop = {n.lower() for n in names}
    return [(k, v) for k, v in headers if k.lower() not in drop]


def vary_names(headers: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """The request field names a response varies on, lower case, sorted, unique."""
    value = header(headers, "Vary")
    if not value:
        return ()
    return tuple(sorted({n.strip().lower() for n in value.split(",") if n.strip()}))


def environ_name(field: str) -> str:
    """The WSGI environ key of request field ``field``."""
    name = field.upper().replace("-", "_")
    return name if name in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + name


def variant_of(environ: Mapping[str, Any], names: Iterable[str]) -> str:
    """A short stable id of the request's values of the ``names`` fields,
    whitespace folded (RFC 9111 §4.1 lets a cache normalise them)."""
    names = tuple(names)
    if not names:
        return ""
    values = tuple([environ.get(k, "") for k in environ_names(names)])
    # A Vary'd hit asks this on every request, and hashing costs it more than
    # the rest of the hit: short values (most Accept-* fields) are hashed once.
    if short_values(values):
        return _remembered_variant(names, values)
    return _variant(names, values)


#: What a memo of request field values may hold per entry: at most this many characters.
SHORT_VALUES_CHARS = 256


def short_values(values: tuple[Any, ...]) -> bool:
    """Whether request field values are strings, :data:`SHORT_VALUES_CHARS`
    at most in all: fit to be remembered (a long ``Cookie`` or
    ``User-Agent`` is not)."""
    return all(type(v) is str for v in values) and sum(map(len, values)) <= SHORT_VALUES_CHARS


def _variant(names: tuple[str, ...], values: tuple[Any, ...]) -> str:
    parts = [name + ":" + " ".join(str(value).split()) for name, value in zip(names, values)]
    return hash_bytes("\n".join(parts).encode("utf-8", "surrogateescape")).hex[:32]


_remembered_variant = functools.lru_cache(maxsize=1024)(_variant)


@functools.lru_cache(maxsize=256)
def environ_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """:func:`environ_name` of each of ``names`` (a tuple), worked out once per tuple."""
    return tuple(environ_name(name) for name in names)


def has_validator(headers: Iterable[tuple[str, str]]) -> bool:
    """Whether a response carries ``ETag`` or ``Last-Modified``."""
    return any(k.lower() in ("etag", "last-modified") for k, _ in headers)
