"""Requests between fleet hosts carry an HMAC-SHA256 of the shared secret
over the method, the path (with its query) and a timestamp; anything else is
refused. Pure functions, any thread."""
from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["sign", "check", "DATE_HEADER", "SIGNATURE_HEADER", "MAX_SKEW", "MIN_SECRET"]

DATE_HEADER = "X-Cachefetch-Fleet-Date"
SIGNATURE_HEADER = "X-Cachefetch-Fleet-Signature"
#: Seconds a signed request stays valid either side of now (clocks of a fleet agree to NTP's precision).
MAX_SKEW = 30.0
#: The shortest secret accepted, in bytes.
MIN_SECRET = 16


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET:
        raise ValueError(f"the fleet secret must be at least {MIN_SECRET} bytes")


def _mac(secret: bytes, method: str, target: str, date: str) -> str:
    message = f"{method}\n{target}\n{date}".encode("utf-8", "surrogateescape")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(secret: bytes, method: str, target: str, now: float | None = None) -> dict[str, str]:
    """The headers that authenticate ``method target`` (target: path and query).

    :raises ValueError: if ``secret`` is shorter than :data:`MIN_SECRET`.
    """
    _check_secret(secret)
    date = str(int(time.time() if now is None else now))
    return {DATE_HEADER: date, SIGNATURE_HEADER: _mac(secret, method, target, date)}


def check(secret: bytes, method: str, target: str, date: str | None, signature: str | None,
          now: float | None = None) -> str | None:
    """``None`` if the request is authentic and current, else why not."""
    _check_secret(secret)
    if not date or not signature:
        return "unsigned"
    if not date.isascii() or not date.isdigit() or len(date) > 12:
        return "bad date"
    if abs((time.time() if now is None else now) - int(date)) > MAX_SKEW:
        return "stale"
    if not hmac.compare_digest(_mac(secret, method, target, date), signature.strip()):
        return "bad signature"
    return None
