"""Moving bytes between fleet hosts: the ``/-/fleet/`` endpoint and its client.

The endpoint serves, to authenticated peers only (:mod:`.auth`), a committed
blob by hash (``/-/fleet/blob/<hex>``) and the growing body of a flight this
host leads (``/-/fleet/flight/<fid>?offset=N``). Any other path is refused
before the store is touched.

:class:`PeerFiller` fills a missing local blob from a peer that holds it:
by hash only, hashed with BLAKE3 as it arrives, committed only if it matches,
one fill per hash per host at a time.
"""
from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from typing import Callable, Iterable, Iterator
from urllib.parse import parse_qs

import requests

from ..flights import Flights
from ..hashing import Hash, Hasher
from ..store import CAFS, BlobNotFound
from ..wsgi import StartResponse, WSGIEnviron, plain_response
from . import auth, metrics
from .expiry import from_now_ms, write_and_extend
from .keys import FleetKeys
from .link import FleetUnavailable, RedisLink

__all__ = ["PREFIX", "FleetEndpoint", "PeerFiller", "signed_get", "peer_session", "FID_RE"]

log = logging.getLogger("cachefetch.fleet")

#: Every fleet-internal path starts with this.
PREFIX = "/-/fleet/"
#: A flight id as :class:`~cachefetch.flights.Lead` makes them.
FID_RE = re.compile(r"[0-9a-f]{16}")
_HEX_RE = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 18
# Seconds a hash no peer could fill is not tried again (by this process).
_FAILED_MEMO = 5.0

#: ``(fid, offset) -> body chunks``, or ``None`` if this host runs no such flight.
FlightBody = Callable[[str, int], "Iterator[bytes] | None"]


def _no_store(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return headers + [("Cache-Control", "no-store")]


class FleetEndpoint:
    """The WSGI app behind ``/-/fleet/`` (request threads).

    :param store: this host's store.
    :param secret: the fleet's shared secret.
    :param flight_body: the source of growing bodies (``None``: no flights served).
    """

    def __init__(self, store: CAFS, secret: bytes, flight_body: FlightBody | None = None) -> None:
        if not isinstance(store, CAFS):
            raise TypeError(f"store must be a CAFS, not {type(store).__name__}")
        auth.sign(secret, "GET", PREFIX)  # validates the secret now
        self.store = store
        self._secret = secret
        self._flight_body = flight_body

    def __call__(self, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        # The signature covers the request target as sent (gunicorn's RAW_URI), before any decoding.
        target = environ.get("RAW_URI") or path + ("?" + query if query else "")
        why = auth.check(self._secret, method, target, environ.get("HTTP_X_CACHEFETCH_FLEET_DATE"),
                         environ.get("HTTP_X_CACHEFETCH_FLEET_SIGNATURE"))
        if why is not None:
            log.warning("refused a fleet request for %.200r: %s", target, why)
            return plain_response(start_response, "403 Forbidden", f"fleet request refused: {why}",
                                  [("Cache-Control", "no-store")])
        if method != "GET":
            return plain_response(start_response, "405 Method Not Allowed", "GET only", [("Allow", "GET")])
        kind, _, name = path[len(PREFIX):].partition("/")
        if kind == "blob" and _HEX_RE.fullmatch(name) and not query:
            return self._blob(environ, start_response, Hash.from_hex(name))
        if kind == "flight" and FID_RE.fullmatch(name) and self._flight_body is not None:
            offset = _offset(query)
            if offset is not None:
                return self._flight(start_response, name, offset)
        return plain_response(start_response, "404 Not Found", "not a fleet resource", [("Cache-Control", "no-store")])

    def _blob(self, environ: WSGIEnviron, start_response: StartResponse, h: Hash) -> Iterable[bytes]:
        try:
            file = self.store.open(h, buffered=False)
        except BlobNotFound:
            return plain_response(start_response, "404 Not Found", "no such blob", [("Cache-Control", "no-store")])
        size = self.store.size(h)
        start_response("200 OK", _no_store([("Content-Type", "application/octet-stream"),
                                            ("Content-Length", str(size))]))
        wrapper = environ.get("wsgi.file_wrapper")
        if wrapper is not None:
            return wrapper(file, _CHUNK)
        return _chunks(file)

    def _flight(self, start_response: StartResponse, fid: str, offset: int) -> Iterable[bytes]:
        assert self._flight_body is not None
        body = self._flight_body(fid, offset)
        if body is None:
            return plain_response(start_response, "404 Not Found", "no such flight here",
                                  [("Cache-Control", "no-store")])
        # No Content-Length: the body is chunked, and a leader that dies cuts
        # it without the last chunk, which the peer's client sees as incomplete.
        start_response("200 OK", _no_store([("Content-Type", "application/octet-stream")]))
        return body


def _offset(query: str) -> int | None:
    try:
        values = parse_qs(query, strict_parsing=True, max_num_fields=2)
    except ValueError:
        return None
    if set(values) != {"offset"} or len(values["offset"]) != 1:
        return None
    text = values["offset"][0]
    return int(text) if text.isascii() and text.isdigit() and len(text) < 19 else None


def _chunks(file) -> Iterator[bytes]:
    with file:
        while data := file.read(_CHUNK):
            yield data


def peer_session() -> requests.Session:
    """An HTTP session for peers: reached directly, never through an environment's proxy."""
    session = requests.Session()
    session.trust_env = False
    return session


def signed_get(session: requests.Session, secret: bytes, base: str, target: str,
               timeout: tuple[float, float]) -> requests.Response:
    """``GET base+target`` signed for the fleet endpoint, streaming.

    :raises requests.RequestException: if the peer cannot be reached.
    """
    return session.get(base.rstrip("/") + target, headers=auth.sign(secret, "GET", target), stream=True,
                       timeout=timeout, allow_redirects=False)


class PeerFiller:
    """Fills local blobs from the peers Redis says hold them (request threads).

    :param store: this host's store.
    :param link: the Redis link.
    :param keys: the fleet's key names.
    :param advertise: this host's own URL (never asked, and announced as a holder).
    :param secret: the fleet's shared secret.
    :param timeout: seconds to connect to a peer, and to wait for each of its reads.
    """

    def __init__(self, store: CAFS, link: RedisLink, keys: FleetKeys, advertise: str, secret: bytes,
                 timeout: float = 5.0) -> None:
        self.store = store
        self.link = link
        self.keys = keys
        self.advertise = advertise
        self._secret = secret
        self._timeout = (timeout, timeout)
        self._session = peer_session()
        self._locks = Flights(store.layout)  # one fill per hash per host: the flights' flock
        # Hashes no peer could give us lately: a request looks twice (plan,
        # then lead), and a broken peer should cost one attempt, not one per look.
        self._failed: dict[Hash, float] = {}
        self._failed_lock = threading.Lock()

    def announce(self, h: Hash) -> None:
        """Tell the fleet this host holds ``h``. :raises FleetUnavailable: if Redis is down."""
        self.link.run(lambda r: write_and_extend(r, self.keys.holders(h), "sadd", self.advertise,
                                                 when=from_now_ms()))

    def withdraw(self, h: Hash) -> None:
        """Tell the fleet this host no longer holds ``h`` (its blob was evicted or
        removed), so no peer is sent here for it. Redis down: logged; the holder
        is then dropped by the first peer that asks and gets a 404."""
        try:
            self.link.run(lambda r: r.srem(self.keys.holders(h), self.advertise))
        except FleetUnavailable as exc:
            log.debug("could not withdraw %s from the fleet: %s", h.hex, exc)

    def holders(self, h: Hash) -> list[str]:
        """The other hosts said to hold ``h``, in random order. :raises FleetUnavailable."""
        members = self.link.run(lambda r: r.smembers(self.keys.holders(h)))
        peers = [m.decode() for m in members if m.decode() != self.advertise]
        random.shuffle(peers)
        return peers

    def fill(self, h: Hash, size: int, deadline: float | None = None) -> bool:
        """Make blob ``h`` (of ``size`` bytes) local, from a peer if need be.

        Returns whether it is in the store now. Peers that are unreachable,
        answer otherwise than 200 or send other bytes are skipped (a wrong
        byte is never committed). Another thread or worker filling the same
        hash is waited for instead of filling it twice.
        """
        if self.store.exists(h):
            return True
        now = time.monotonic()
        with self._failed_lock:
            if now - self._failed.get(h, -_FAILED_MEMO) < _FAILED_MEMO:
                return False
        deadline = now + 60.0 if deadline is None else deadline
        flight = "\0fill\0" + h.hex
        while True:
            lead = self._locks.lead(flight)
            if lead is not None:
                break
            follow = self._locks.follow(flight)
            if follow is None:
                continue  # it finished between our two calls
            try:
                follow.wait_released(deadline)
            finally:
                follow.close()
            return self.store.exists(h)
        try:
            if self.store.exists(h):  # filled while we took the lock
                return True
            try:
                peers = self.holders(h)
            except FleetUnavailable:
                return False
            for peer in peers:
                if self._fill_from(peer, h, size):
                    self._announce_quietly(h)
                    return True
                if time.monotonic() >= deadline:
                    break
            with self._failed_lock:
                self._failed = {k: t for k, t in self._failed.items() if now - t < _FAILED_MEMO}
                self._failed[h] = time.monotonic()
            return False
        finally:
            lead.release()

    def _announce_quietly(self, h: Hash) -> None:
        try:
            self.announce(h)
        except FleetUnavailable:
            pass  # the next put of an entry on it announces it

    def _forget_holder(self, h: Hash, peer: str) -> None:
        try:
            self.link.run(lambda r: r.srem(self.keys.holders(h), peer))
        except FleetUnavailable:
            pass

    def _fill_from(self, peer: str, h: Hash, size: int) -> bool:
        """One attempt from ``peer``; ``True`` once committed."""
        target = f"{PREFIX}blob/{h.hex}"
        file, tmp = self.store.new_temp()
        committed = False
        try:
            with file:
                try:
                    resp = signed_get(self._session, self._secret, peer, target, self._timeout)
                except requests.RequestException as exc:
                    log.warning("peer %s unreachable for blob %s: %s", peer, h.hex, exc)
                    metrics.PEER_FILLS.labels("unreachable").inc()
                    return False
                with resp:
                    if resp.status_code == 404:  # it no longer holds it (evicted): stop pointing at it
                        self._forget_holder(h, peer)
                    if resp.status_code != 200:
                        metrics.PEER_FILLS.labels("refused").inc()
                        log.warning("peer %s answered %d for blob %s", peer, resp.status_code, h.hex)
                        return False
                    hasher = Hasher()
                    try:
                        for chunk in resp.iter_content(_CHUNK):
                            hasher.update(chunk)
                            if hasher.size > size:
                                break
                            file.write(chunk)
                    except requests.RequestException as exc:
                        metrics.PEER_FILLS.labels("broken").inc()
                        log.warning("peer %s broke off blob %s: %s", peer, h.hex, exc)
                        return False
            if hasher.size != size or hasher.finalize() != h:
                metrics.PEER_VERIFY_FAILURES.inc()
                metrics.PEER_FILLS.labels("corrupt").inc()
                log.warning("peer %s sent blob %s with the wrong content (%d bytes): discarded", peer, h.hex,
                            hasher.size)
                return False
            self.store.commit(tmp, expected=h, trusted=True)  # trusted: hashed above, as written
            committed = True
            metrics.PEER_FILLS.labels("ok").inc()
            metrics.PEER_FILL_BYTES.inc(size)
            return True
        finally:
            if not committed:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()
