"""A client's conditionals and ranges against a response (RFC 9110 §13, §14).

One pure function, :func:`evaluate`, used for every answer the cache gives
from a stored or a growing response: hits, followers and the leader's own
client alike.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .dates import parse_http_date

__all__ = ["Outcome", "Answer", "evaluate", "parse_etags", "weak_match", "strong_match", "byte_range"]

_ETAG = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')
_RANGE = re.compile(r"bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")


class Outcome(enum.Enum):
    FULL = "full"                          #: the whole response
    NOT_MODIFIED = "304"                   #: 304 Not Modified
    PRECONDITION_FAILED = "412"            #: 412 Precondition Failed
    PARTIAL = "206"                        #: 206 with bytes ``start``..``stop``
    UNSATISFIABLE = "416"                  #: 416 Range Not Satisfiable


@dataclass(frozen=True)
class Answer:
    """How to answer: an :class:`Outcome`, and for PARTIAL the byte span
    ``[start, stop)``."""

    outcome: Outcome
    start: int = 0
    stop: int = 0


FULL = Answer(Outcome.FULL)


def parse_etags(value: str) -> list[tuple[str, bool]] | None:
    """The entity-tags of an If-Match/If-None-Match value as ``(opaque-tag,
    weak)`` pairs (the opaque tag with its quotes); ``[("*", False)]`` for
    ``*``; ``None`` if the value is malformed (an unquoted tag is not an
    entity-tag, whatever werkzeug says)."""
    value = value.strip()
    if value == "*":
        return [("*", False)]
    tags, pos = [], 0
    while pos < len(value):
        if value[pos] in " \t,":
            pos += 1
            continue
        m = _ETAG.match(value, pos)
        if m is None:
            return None
        tags.append((m.group(2), m.group(1) is not None))
        pos = m.end()
    return tags


def _split_etag(etag: str | None) -> tuple[str, bool] | None:
    if not etag:
        return None
    parsed = parse_etags(etag)
    return parsed[0] if parsed and len(parsed) == 1 and parsed[0][0] != "*" else None


def weak_match(condition: str, etag: str | None) -> bool:
    """RFC 9110 §8.8.3.2 weak comparison of the response's ``etag`` against a list."""
    tags, ours = parse_etags(condition), _split_etag(etag)
    if tags and tags[0][0] == "*":
        return True  # any current representation
    return bool(tags) and ours is not None and any(t == ours[0] for t, _ in tags)


def strong_match(condition: str, etag: str | None) -> bool:
    """RFC 9110 §8.8.3.2 strong comparison (both tags strong and equal)."""
    tags, ours = parse_etags(condition), _split_etag(etag)
    if tags and tags[0][0] == "*":
        return True
    return bool(tags) and ours is not None and not ours[1] and any(t == ours[0] and not w for t, w in tags)


def byte_range(value: str, size: int) -> Answer:
    """One ``Range`` value against a body of ``size`` bytes: PARTIAL,
    UNSATISFIABLE, or FULL for what a server may ignore (other units,
    several ranges, bad syntax)."""
    if "," in value:
        return FULL  # several ranges: a 200 is allowed (RFC 9110 §14.2)
    m = _RANGE.fullmatch(value.strip())
    if m is None:
        return FULL
    first, last = m.groups()
    if not first:
        if not last:
            return FULL
        suffix = int(last)
        if suffix == 0 or size == 0:
            return Answer(Outcome.UNSATISFIABLE)
        return Answer(Outcome.PARTIAL, max(0, size - suffix), size)
    start = int(first)
    stop = size if not last else int(last) + 1
    if last and stop <= start:
        return FULL  # last < first: invalid, ignored
    if start >= size:
        return Answer(Outcome.UNSATISFIABLE)
    return Answer(Outcome.PARTIAL, start, min(stop, size))


def evaluate(environ: Mapping[str, Any], *, status: int, etag: str | None, last_modified: str | None,
             size: int | None) -> Answer:
    """How to answer the request in ``environ`` with a response of
    ``status``, validators ``etag``/``last_modified`` and a body of ``size``
    bytes (``None``: not known yet, so no Range).

    RFC 9110 §13.2.2's order: If-Match (strong; 412), else
    If-Unmodified-Since (412); If-None-Match (weak; 304 for GET/HEAD), else
    If-Modified-Since (304); then for a GET, Range with If-Range. Only a 200
    is subject to them: any other status is replayed whole.
    """
    if status != 200:
        return FULL
    method = environ.get("REQUEST_METHOD", "GET")
    modified = parse_http_date(last_modified)
    if_match = environ.get("HTTP_IF_MATCH")
    if if_match is not None:
        if not strong_match(if_match, etag):
            return Answer(Outcome.PRECONDITION_FAILED)
    else:
        ius = parse_http_date(environ.get("HTTP_IF_UNMODIFIED_SINCE"))
        if ius is not None and modified is not None and modified > ius:
            return Answer(Outcome.PRECONDITION_FAILED)
    if_none_match = environ.get("HTTP_IF_NONE_MATCH")
    if if_none_match is not None:
        if weak_match(if_none_match, etag):
            return Answer(Outcome.NOT_MODIFIED) if method in ("GET", "HEAD") else Answer(Outcome.PRECONDITION_FAILED)
    elif method in ("GET", "HEAD"):
        ims = parse_http_date(environ.get("HTTP_IF_MODIFIED_SINCE"))
        if ims is not None and modified is not None and modified <= ims:
            return Answer(Outcome.NOT_MODIFIED)
    rng = environ.get("HTTP_RANGE")
    if rng is None or method != "GET" or size is None:
        return FULL
    if_range = environ.get("HTTP_IF_RANGE")
    if if_range is not None:
        if_range = if_range.strip()
        if if_range.startswith(('"', "W/")):
            if not strong_match(if_range, etag) or if_range.startswith("W/"):
                return FULL
        else:  # a date: it must be exactly the Last-Modified (RFC 9110 §13.1.5)
            when = parse_http_date(if_range)
            if when is None or modified is None or when != modified:
                return FULL
    return byte_range(rng, size)
