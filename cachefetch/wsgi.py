"""Small WSGI vocabulary shared by the modules that answer requests."""
from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any, Callable, Iterable, Mapping

__all__ = ["WSGIEnviron", "StartResponse", "normalize_headers", "plain_response", "status_line", "close_quietly"]

_NAME = re.compile(r"[^\s:\x00]+")
_BAD_VALUE = re.compile(r"[\r\n\x00]")

WSGIEnviron = dict[str, Any]
StartResponse = Callable[..., Any]


def normalize_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Check and copy response headers given as a mapping or as pairs.

    :raises TypeError: if a name or value is not a ``str``.
    :raises ValueError: if a name is empty or not a token, or a value holds
        CR, LF or NUL (header injection).
    """
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    out = []
    for pair in pairs:
        name, value = pair
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"header names and values must be str: {name!r}: {value!r}")
        if not _NAME.fullmatch(name):
            raise ValueError(f"invalid header name {name!r}")
        if _BAD_VALUE.search(value):
            raise ValueError(f"invalid character in header {name!r}")
        out.append((name, value))
    return tuple(out)


def plain_response(start_response: StartResponse, status: str, message: str,
                   headers: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    """Answer with a short ``text/plain`` body saying what happened."""
    body = (message.rstrip("\n") + "\n").encode("utf-8", "replace")
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), *headers])
    return [body]


def status_line(code: int) -> str:
    """``"404 Not Found"`` for 404; ``"NNN Unknown"`` for a code with no standard phrase."""
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"{code} Unknown"


def close_quietly(obj: object) -> None:
    """``obj.close()`` if it has one (PEP 3333 iterables, upstream bodies);
    an error is logged, not raised: the answer is over either way."""
    close = getattr(obj, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            logging.getLogger("cachefetch").exception("closing %r failed", obj)
