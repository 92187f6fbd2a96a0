"""Flights across a fleet: one fetch per key among every host sharing a Redis.

A flight is led on one host at a time. Its leader holds two locks: the local
:class:`~cachefetch.flights.Flights` one (the threads and workers of its
host follow it through the temp file, as on one host) and a Redis lease,
``SET lease "<fence> <fid> <host>" NX PX lease_ms``, renewed while it runs.
The fence is one more per lead of the key: the records of the flight, the
same typed journal records as on one host, go to a Redis stream of that
flight id, and a follower only believes the lease and records of its fence.

A follower on another host reads the stream for the head and the final
record, and streams the body from the leader host's ``/-/fleet/flight/<fid>``
endpoint (the body path in the head is the leader's; it is never used). A
leader that dies stops renewing: its lease expires, its followers that had
sent nothing re-plan (and one of them leads), those that had sent bytes are
cut, because the endpoint's connection ends without its last chunk.

With Redis unreachable, flights are the host's own.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from typing import Iterator

import requests

from ..flights import (DoneRecord, FailedRecord, Flights, Following, HeadRecord, Journal, Lead, Leading,
                       LeaderGone, LeaderRecord, Record, RefreshedRecord, UncacheableRecord, decode_record,
                       encode_record)
from ..hashing import Hasher
from ..store import CAFS
from . import metrics
from .keys import FleetKeys
from .link import FleetUnavailable, RedisLink
from .peers import FID_RE, PREFIX, PeerFiller, peer_session, signed_get

__all__ = ["RedisFlights", "FleetLead", "RemoteFollow", "Relay", "Lease"]

log = logging.getLogger("cachefetch.fleet")

# How long a finished flight's stream and id stay readable for late followers.
_KEEP_MS = 120_000
# Longest single blocking read of a stream (below the client's socket timeout).
_BLOCK_MS = 200
# How long a flight's fence counter outlives its last lead.
_FENCE_MS = 24 * 3600 * 1000
_POLL = 0.01
_CHUNK = 1 << 18

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    """A flight's Redis lease: ``"<fence> <fid> <host>"``."""

    __slots__ = ("fence", "fid", "host")

    def __init__(self, fence: int, fid: str, host: str) -> None:
        self.fence, self.fid, self.host = fence, fid, host

    def token(self) -> str:
        """The lease's value in Redis."""
        return f"{self.fence} {self.fid} {self.host}"

    @classmethod
    def parse(cls, raw: bytes | None) -> "Lease | None":
        """The lease of a stored token; ``None`` for none or a malformed one."""
        if raw is None:
            return None
        parts = raw.decode("utf-8", "replace").split(" ")
        if len(parts) != 3 or not parts[0].isdigit() or not FID_RE.fullmatch(parts[1]):
            return None
        return cls(int(parts[0]), parts[1], parts[2])


class _Renewer:
    """One thread per process renewing the leases of the flights it leads."""

    def __init__(self, link: RedisLink, lease_ms: int) -> None:
        self._link = link
        self._lease_ms = lease_ms
        self._leads: "weakref.WeakSet[FleetLead]" = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None  # guarded by _lock
        self._renew = link.client.register_script(_RENEW)

    def add(self, lead: "FleetLead") -> None:
        with self._lock:
            self._leads.add(lead)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="cachefetch-fleet-leases", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self._lease_ms / 3000)
            with self._lock:
                leads = [lead for lead in self._leads if lead.leasing]
                if not leads:
                    self._thread = None
                    return
            for lead in leads:
                try:
                    kept = self._link.run(lambda r, ld=lead: self._renew(keys=[ld.lease_key],
                                                                         args=[ld.lease.token(), self._lease_ms],
                                                                         client=r))
                except FleetUnavailable:
                    continue  # the lease may lapse; followers elsewhere then re-plan
                if not kept:
                    lead.lost()


class FleetLead:
    """The leader's side of a fleet flight: the local :class:`Lead` plus the
    Redis lease and stream. Redis failures never fail the fetch (it goes on
    for this host). Request thread, and (``done``, ``release``) the commit thread."""

    def __init__(self, local: Lead, link: RedisLink, keys: FleetKeys, flight: str, lease: Lease) -> None:
        self._local = local
        self._link = link
        self._keys = keys
        self.fid = local.fid
        self.lease = lease
        self.lease_key = keys.lease(flight)
        self._stream = keys.journal(self.fid)
        self._running_key = keys.running(flight)
        self.leasing = True
        self._release_script = link.client.register_script(_RELEASE)

    @property
    def temp_prefix(self) -> str:
        """The name prefix of this fetch's temp files (the local lead's)."""
        return self._local.temp_prefix

    @property
    def active(self) -> bool:
        """Whether the local lock is still held."""
        return self._local.active

    def lost(self) -> None:
        """The lease was taken over (we were too slow renewing): stop claiming it."""
        if self.leasing:
            log.warning("lost the fleet lease of flight %s", self.fid)
        self.leasing = False

    def _record(self, record: Record) -> None:
        data = encode_record(record)[:-1]
        fence = str(self.lease.fence)
        try:
            self._link.run(lambda r: r.pipeline(transaction=False)
                           .xadd(self._stream, {"r": data, "f": fence})
                           .pexpire(self._stream, _KEEP_MS).execute())
        except FleetUnavailable:
            pass  # followers elsewhere see the lease lapse and re-plan

    def publish(self, head: HeadRecord) -> None:
        """Journal ``Head`` locally, then to the fleet. :raises JournalOrderError, OSError: as :class:`Lead`."""
        self._local.publish(head)
        self._record(head)

    def done(self, hash_hex: str, size: int) -> None:
        """Journal ``Done`` locally, then to the fleet (the lease is kept until :meth:`release`)."""
        self._local.done(hash_hex, size)
        self._record(DoneRecord(hash_hex, size))

    def refreshed(self, hash_hex: str, variant: str = "") -> None:
        """Journal ``Refreshed`` to the fleet and locally, and release."""
        self._record(RefreshedRecord(hash_hex, variant))
        self._local.refreshed(hash_hex, variant)
        self.release()

    def fail(self, why: str, message: str = "") -> None:
        """Journal ``Failed`` (unless finished) and release; never raises for a journal write."""
        if self._local.active:
            self._record(FailedRecord(why, message[:500]))
        self._local.fail(why, message)
        self.release()

    def uncacheable(self, status: int) -> None:
        """Journal ``Uncacheable`` and release. :raises JournalOrderError: after ``Head``."""
        self._local.uncacheable(status)
        self._record(UncacheableRecord(status))
        self.release()

    def release(self) -> None:
        """Release the local lock, then the lease (if still ours). Idempotent."""
        self._local.release()
        if not self.leasing:
            return
        self.leasing = False
        try:
            self._link.run(lambda r: (self._release_script(keys=[self.lease_key], args=[self.lease.token()],
                                                           client=r), r.delete(self._running_key)))
        except FleetUnavailable:
            pass  # it expires


class RemoteFollow:
    """Following a flight led on another host (one request thread).

    :param lease: the lease seen when the follow began (its fence is the one believed).
    """

    def __init__(self, link: RedisLink, keys: FleetKeys, flight: str, lease: Lease, secret: bytes,
                 session: requests.Session, timeout: float) -> None:
        self._link = link
        self._keys = keys
        self._lease_key = keys.lease(flight)
        self._lease = lease
        self._stream = keys.journal(lease.fid)
        self._secret = secret
        self._session = session
        self._timeout = timeout
        self._last_id = "0-0"
        self._journal = Journal()
        self._response: requests.Response | None = None

    # -- the journal ------------------------------------------------------

    def _apply(self, fields: dict) -> None:
        if fields.get(b"f", b"").decode() != str(self._lease.fence):
            return  # a record of another lead (fencing)
        self._journal = self._journal.add(decode_record(fields.get(b"r", b"")))

    def _read(self, block_ms: int | None = None) -> Journal:
        def read(r):
            if block_ms is None:
                return [(self._stream, r.xrange(self._stream, "(" + self._last_id if self._last_id != "0-0"
                                                else "-", "+"))]
            return r.xread({self._stream: self._last_id}, block=block_ms) or []

        try:
            answer = self._link.run(read)
        except FleetUnavailable as exc:
            raise LeaderGone(f"redis is unreachable: {exc}") from exc
        for _, records in answer:
            for record_id, fields in records:
                self._last_id = record_id.decode() if isinstance(record_id, bytes) else record_id
                self._apply(fields)
        return self._journal

    def _leased(self) -> bool:
        try:
            raw = self._link.run(lambda r: r.get(self._lease_key))
        except FleetUnavailable:
            return False
        lease = Lease.parse(raw)
        return lease is not None and lease.token() == self._lease.token()

    @property
    def fid(self) -> str:
        """The followed flight's id."""
        return self._lease.fid

    @property
    def host(self) -> str:
        """The leader host's URL."""
        return self._lease.host

    def journal(self) -> Journal:
        """The records of this flight read so far (reading what is new)."""
        return self._read()

    def settle(self, deadline: float):
        """Wait for the final record (``None`` at ``deadline``). :raises LeaderGone: if the lease ends first."""
        while time.monotonic() < deadline:
            journal = self._settled(_BLOCK_MS)
            if journal.final is not None:
                return journal.final
        return None

    def _settled(self, block_ms: int | None = None) -> Journal:
        journal = self._read(block_ms)
        if journal.final is None and not self._leased():
            journal = self._read()  # it may have finished between the two reads
            if journal.final is None:
                raise LeaderGone("the leader's lease ended without a final record")
        return journal

    def wait(self, deadline: float) -> Journal:
        """Wait for the head or a final record. :raises LeaderGone, TimeoutError: as :class:`Follow`."""
        while True:
            left = deadline - time.monotonic()
            journal = self._settled(max(1, min(_BLOCK_MS, int(left * 1000))) if left > 0 else None)
            if journal.head is not None or journal.final is not None:
                return journal
            if time.monotonic() >= deadline:
                raise TimeoutError("no response from the leader host in time")

    def wait_released(self, deadline: float) -> bool:
        """Wait until the leader gives up its lease (its commit and index put are done)."""
        while self._leased():
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL)  # the lease is a Redis key: nothing to block on
        return True

    # -- the body ---------------------------------------------------------

    def body(self, path: str, deadline: float | None = None, start: int = 0,
             stop: int | None = None) -> Iterator[bytes]:
        """Bytes ``[start, stop)`` of the body, from the leader host as it grows.

        ``path`` (the leader host's) is ignored. :raises FileNotFoundError:
        if the leader host no longer runs the flight (committed since);
        :raises LeaderGone: if the body ends short or the leader host is
        unreachable; :raises TimeoutError: if no byte came by ``deadline``.
        """
        target = f"{PREFIX}flight/{self._lease.fid}?offset={start}"
        wait = self._timeout if deadline is None else max(0.1, deadline - time.monotonic())
        try:
            resp = signed_get(self._session, self._secret, self._lease.host, target, (self._timeout, wait))
        except requests.Timeout as exc:
            raise TimeoutError(f"the leader host sent nothing in time: {exc}") from exc
        except requests.RequestException as exc:
            raise LeaderGone(f"the leader host is unreachable: {exc}") from exc
        self._response = resp
        if resp.status_code == 404:
            resp.close()
            raise FileNotFoundError(f"flight {self._lease.fid} is no longer running on {self._lease.host}")
        if resp.status_code != 200:
            resp.close()
            raise LeaderGone(f"the leader host answered {resp.status_code}")
        return self._stream_body(resp, start, stop)

    def _stream_body(self, resp: requests.Response, start: int, stop: int | None) -> Iterator[bytes]:
        pos = start
        try:
            for chunk in resp.iter_content(_CHUNK):
                if stop is not None and pos + len(chunk) >= stop:
                    yield chunk[:stop - pos]
                    return
                pos += len(chunk)
                yield chunk
        except requests.RequestException as exc:  # cut mid-body: the leader (host) died
            raise LeaderGone(f"the leader host's body ended at {pos}: {exc}") from exc
        finally:
            resp.close()
        # A clean end: the endpoint ends its chunked body only after Done.
        length = self._journal.head.content_length if self._journal.head is not None else -1
        if (stop is not None and pos < stop) or (stop is None and 0 <= length != pos):
            raise LeaderGone(f"the leader host's body ended at {pos}")

    def close(self) -> None:
        """Close the body's connection to the leader host, if one is open."""
        if self._response is not None:
            self._response.close()


class RedisFlights:
    """The fleet's flights seam (see the module docstring). Thread-safe; one per process.

    :param local: this host's :class:`Flights`.
    :param advertise: this host's URL, where followers fetch growing bodies.
    :param store: this host's store (relayed bodies are committed to it).
    :param relay_timeout: seconds a relay waits for the leader host's first byte, and for each read after.
    """

    def __init__(self, local: Flights, link: RedisLink, keys: FleetKeys, advertise: str, secret: bytes,
                 store: CAFS, filler: PeerFiller, lease_ms: int = 5000, peer_timeout: float = 5.0,
                 relay_timeout: float = 60.0) -> None:
        self.local = local
        self.store = store
        self.filler = filler
        self.relay_timeout = relay_timeout
        self.link = link
        self.keys = keys
        self.advertise = advertise
        self.lease_ms = lease_ms
        self._secret = secret
        self._timeout = peer_timeout
        self._session = peer_session()
        self._renewer = _Renewer(link, lease_ms)

    def __repr__(self) -> str:
        return f"RedisFlights({self.local.dir!r}, {self.advertise!r})"

    def lead(self, key: str) -> Leading | None:
        """Lead ``key``'s flight fleet-wide, or ``None`` if a thread, worker or
        host leads it now. With Redis away: the local lead alone.

        :raises OSError: as :meth:`Flights.lead`.
        """
        local = self.local.lead(key)
        if local is None:
            return None
        try:
            lease = self._acquire(key, local.fid)
        except FleetUnavailable:
            return local
        except BaseException:
            local.release()
            raise
        if lease is None:
            self._relay(key, local)  # another host leads: one relay per host, our requests follow it locally
            return None
        lead = FleetLead(local, self.link, self.keys, key, lease)
        lead._record(LeaderRecord(local.fid, 0))
        self._renewer.add(lead)
        return lead

    def _relay(self, key: str, local: Lead) -> None:
        """Relay the flight another host leads into a local one that ``local`` leads."""
        try:
            lease = Lease.parse(self.link.run(lambda r: r.get(self.keys.lease(key))))
        except FleetUnavailable:
            lease = None
        if lease is None or lease.host == self.advertise:
            local.release()  # it ended meanwhile: our followers re-plan
            return
        remote = RemoteFollow(self.link, self.keys, key, lease, self._secret, self._session, self._timeout)
        relay = Relay(local, remote, self.store, self.filler, self.relay_timeout)
        threading.Thread(target=relay.run, name=f"cachefetch-fleet-relay-{lease.fid}", daemon=True).start()

    def _acquire(self, key: str, fid: str) -> Lease | None:
        def acquire(r) -> Lease | None:
            if r.exists(self.keys.lease(key)):
                return None
            fence = r.incr(self.keys.fence(key))
            r.pexpire(self.keys.fence(key), _FENCE_MS)  # fences only need to grow within a lease's life
            lease = Lease(fence, fid, self.advertise)
            if not r.set(self.keys.lease(key), lease.token(), nx=True, px=self.lease_ms):
                return None
            pipe = r.pipeline(transaction=False)
            pipe.set(self.keys.running(key), fid, get=True, px=24 * 3600 * 1000)
            pipe.set(self.keys.flight_of(fid), key, px=24 * 3600 * 1000)
            previous = pipe.execute()[0]
            if previous is not None:  # a leader before us never released: it died, its lease expired
                metrics.LEASE_TAKEOVERS.inc()
                log.warning("took over flight %.200r from a leader whose lease expired", key)
            return lease

        return self.link.run(acquire)

    def follow(self, key: str) -> Following | None:
        """Follow ``key``'s flight: the local one if this host leads it, else
        the one leased in Redis; ``None`` if none runs."""
        local = self.local.follow(key)
        try:
            lease = Lease.parse(self.link.run(lambda r: r.get(self.keys.lease(key))))
        except FleetUnavailable:
            return local
        remote = lease is not None and lease.host != self.advertise
        if remote:
            metrics.REMOTE_FOLLOWERS.inc()
        if local is not None or not remote:
            return local  # this host leads or relays it; or nothing runs
        return RemoteFollow(self.link, self.keys, key, lease, self._secret, self._session, self._timeout)

    # -- the endpoint's side ----------------------------------------------

    def flight_body(self, fid: str, offset: int) -> Iterator[bytes] | None:
        """The growing body of flight ``fid`` led here, from ``offset``; ``None``
        if this host does not run it (any more). For the ``/-/fleet/`` endpoint."""
        try:
            key = self.link.run(lambda r: r.get(self.keys.flight_of(fid)))
        except FleetUnavailable:
            return None
        if key is None:
            return None
        follow = self.local.follow(key.decode("utf-8", "surrogatepass"))
        if follow is None:
            return None
        try:
            journal = follow.wait(time.monotonic() + self._timeout)
            if journal.fid != fid or journal.head is None or journal.final is not None \
                    and not isinstance(journal.final, DoneRecord):
                follow.close()
                return None
            body = follow.body(journal.head.body, None, offset)
            first = next(body, b"")
        except (LeaderGone, TimeoutError, FileNotFoundError):
            follow.close()
            return None
        return _closing([first], body, follow)


class Relay:
    """Copies a flight led on another host into a local flight (its own thread).

    Whatever the leader host records is recorded locally, with the body
    streamed from its endpoint into a local temp file: this host's requests
    (every worker) follow the local flight as if this host led it, and the
    leader host serves one stream per host, not one per request. The body is
    hashed on the way and committed to the local store if it matches the
    leader's Done record. If the leader (host) dies, the local lead is
    released without a final record, so followers that sent nothing re-plan
    and those mid-body are cut.
    """

    def __init__(self, local: Lead, remote: RemoteFollow, store: CAFS, filler: PeerFiller,
                 timeout: float) -> None:
        self.local = local
        self.remote = remote
        self.store = store
        self.filler = filler
        self.timeout = timeout

    def run(self) -> None:
        """Relay the flight to its end, then release the local lead (never raises)."""
        try:
            self._relay()
        except Exception as exc:  # the leader host died or broke off: followers re-plan or are cut
            log.warning("relaying flight %s from %s failed: %r", self.remote.fid, self.remote.host, exc)
            # Until its lease lapses the dead leader still leads: releasing now
            # would have our followers re-plan into the same dead flight, again and again.
            with contextlib.suppress(Exception):
                self.remote.wait_released(time.monotonic() + self.timeout)
        finally:
            self.remote.close()
            self.local.release()

    def _relay(self) -> None:
        journal = self.remote.wait(time.monotonic() + self.timeout)
        final = journal.final
        if isinstance(final, FailedRecord):
            self.local.fail(final.why, final.message)
        elif isinstance(final, UncacheableRecord):
            self.local.uncacheable(final.status)
        elif isinstance(final, RefreshedRecord):
            self.remote.wait_released(time.monotonic() + self.timeout)  # until its index put is done
            self.local.refreshed(final.hash, final.variant)
        elif isinstance(final, DoneRecord):
            self.remote.wait_released(time.monotonic() + self.timeout)  # then followers re-plan as hits
        else:
            assert journal.head is not None
            self._body(journal.head)

    def _body(self, head: HeadRecord) -> None:
        path = os.path.join(self.store.temp_dir, self.local.temp_prefix + "relay.part")
        hasher = Hasher()
        committed = False
        try:
            with open(path, "wb", buffering=0) as out:
                self.local.publish(HeadRecord(head.status, head.headers, head.content_length, head.vary,
                                              head.variant, path))
                for chunk in self.remote.body(head.body, time.monotonic() + self.timeout):
                    hasher.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[out.write(view):]
            done = self.remote.settle(time.monotonic() + self.timeout)
            h = hasher.finalize()
            if not isinstance(done, DoneRecord) or done.size != hasher.size or done.hash != h.hex:
                metrics.PEER_VERIFY_FAILURES.inc()
                raise LeaderGone(f"the relayed body does not match the leader's record {done}")
            self.local.done(h.hex, hasher.size)
            self.store.commit(path, expected=h, trusted=True)  # trusted: hashed above, as written
            committed = True
            metrics.PEER_FILL_BYTES.inc(hasher.size)
            try:
                self.filler.announce(h)
            except FleetUnavailable:
                pass
            self.remote.wait_released(time.monotonic() + self.timeout)  # the leader's index put is done
        finally:
            if not committed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


def _closing(first: list[bytes], rest: Iterator[bytes], follow) -> Iterator[bytes]:
    """``first`` then ``rest``, closing ``follow`` at the end. An error (the
    leader died) propagates, so the server cuts the chunked body short."""
    try:
        yield from first
        yield from rest
    finally:
        follow.close()
