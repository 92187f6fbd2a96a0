"""The leader: fetch from the app once, for this client, the followers and the store."""
from __future__ import annotations

import logging
import weakref
from typing import Iterable

from .. import policy
from ..flights import HeadRecord, Lead
from ..index import Entry, IndexUnavailable
from ..logutil import warn_limited
from ..policy import CacheStatus, Outcome, RequestFacts, StorePlan
from ..store import Blob
from ..fill import Fill, FillOptions
from ..stream import CacheAbandoned, StreamThroughResult
from ..wsgi import StartResponse, WSGIEnviron, plain_response
from .context import AppResponse, Context
from .hit import serve_stale

__all__ = ["LeaderRun", "local_fill"]

# The fills this process runs, by temp path: a follower in the same process
# reads through the fill (woken as bytes land) instead of polling the file.
_local_fills: "weakref.WeakValueDictionary[str, Fill]" = weakref.WeakValueDictionary()


def local_fill(temp_path: str) -> Fill | None:
    """The running fill writing ``temp_path`` in this process, if any (any thread)."""
    return _local_fills.get(temp_path)

log = logging.getLogger("cachefetch.middleware")


# RFC 9110 §15.4.5: what a 304 carries of the full response.
_VALIDATOR_FIELDS = frozenset({"etag", "last-modified", "date", "cache-control", "expires", "vary",
                               "content-location"})


class LeaderRun:
    """One fetch this request leads, from the app's answer to the index entry.

    :meth:`run` runs on the request thread and hands the app's body to a
    :class:`~cachefetch.fill.Fill`, which reads it at the app's pace on its
    own thread; this client then reads the growing file like any follower.
    :meth:`on_start` runs on the request thread; :meth:`on_abort` and
    :meth:`on_complete` on the fill's thread. :meth:`committed` runs on the
    commit thread, and releases the flight: until then followers and new requests
    wait on it, so no one sees the body complete but the entry missing.
    """

    def __init__(self, ctx: Context, lead: Lead, key: str, request: RequestFacts, environ: WSGIEnviron,
                 stale: Entry | None, status: CacheStatus) -> None:
        self.ctx, self.lead, self.key, self.request = ctx, lead, key, request
        self.environ, self.stale, self.status = environ, stale, status
        self.plan: StorePlan | None = None
        self.head: HeadRecord | None = None
        self.fill: Fill | None = None
        self.code = 0

    # -- request thread --------------------------------------------------

    def run(self, response: AppResponse, start_response: StartResponse) -> Iterable[bytes]:
        """Answer this client from ``response`` and store it if the rules allow."""
        ctx = self.ctx
        self.code = code = response.code
        plan = self.plan = policy.plan_store(code, response.headers, self.request, ctx.rules,
                                             request_time=response.request_time,
                                             response_time=response.response_time,
                                             max_object_size=ctx.max_object_size)
        if not plan.store:
            return self._not_stored(response, plan.why or "not-storable", start_response)
        variant = policy.variant_of(self.environ, plan.vary)
        self.head = HeadRecord(response.status, plan.headers, plan.content_length, plan.vary, variant)
        sent = [(k, v) for k, v in plan.headers if k.lower() != "content-type"]
        if policy.header(response.headers, "Age") is not None:
            sent.append(("Age", str(int(plan.initial_age))))
        content_type = policy.header(plan.headers, "Content-Type") or "application/octet-stream"
        fill = Fill(response.body, FillOptions(
            temp_dir=ctx.store.temp_dir, temp_prefix=self.lead.temp_prefix, content_length=plan.content_length,
            max_size=ctx.max_object_size, total_timeout=ctx.bounds.total, idle_timeout=ctx.bounds.idle,
            max_detached=ctx.bounds.detached), self.on_start, self.on_complete, self.on_abort)
        client = self.ctx.respond(self.environ, start_response, self.status.with_(stored=True))
        length = plan.content_length
        answer = policy.evaluate(self.environ, status=code, etag=policy.header(plan.headers, "ETag"),
                                 last_modified=policy.header(plan.headers, "Last-Modified"),
                                 size=length if length >= 0 else None)
        span = (answer.start, answer.stop) if answer.outcome is Outcome.PARTIAL else (0, None)
        self.fill = fill
        body = fill.start(*span)  # the fetch now runs at the upstream's pace, whoever reads
        if answer.outcome in (Outcome.NOT_MODIFIED, Outcome.PRECONDITION_FAILED, Outcome.UNSATISFIABLE):
            body.close()  # the client wants no body; the fetch goes on for the cache
            return _bodiless(client, answer.outcome, plan.headers, length)
        if not fill.wait_first():
            body.close()
            return plain_response(client, "502 Bad Gateway", "the upstream failed before sending a byte")
        headers = [("Content-Type", content_type)] + sent
        if answer.outcome is Outcome.PARTIAL:
            client("206 Partial Content", headers + [
                ("Content-Range", f"bytes {answer.start}-{answer.stop - 1}/{length}"),
                ("Content-Length", str(answer.stop - answer.start))])
        else:
            client(response.status, headers + ([("Content-Length", str(length))] if length >= 0 else []))
        return body

    def _not_stored(self, response: AppResponse, why: str, start_response: StartResponse) -> Iterable[bytes]:
        self.lead.uncacheable(response.code)
        if response.code >= 500:
            served = serve_stale(self.ctx, self.environ, start_response, self.stale, self.request, response.code)
            if served is not None:
                response.close()
                return served
        log.debug("not storing %r: %s", self.key, why)
        client = self.ctx.respond(self.environ, start_response, self.status.with_(detail=why))
        client(response.status, response.headers)
        return response.body

    # -- the thread reading the body --------------------------------------

    def on_start(self, tmp_path: str) -> None:
        """The temp file exists: tell the followers where the body grows."""
        assert self.head is not None and self.fill is not None
        _local_fills[tmp_path] = self.fill
        head = HeadRecord(self.head.status, self.head.headers, self.head.content_length, self.head.vary,
                          self.head.variant, tmp_path)
        try:
            self.lead.publish(head)
        except OSError as exc:
            raise CacheAbandoned(f"cannot journal the fetch: {exc}") from exc

    def on_abort(self, exc: BaseException) -> None:
        """The body will not be stored: followers are told why."""
        self.lead.fail("abandoned" if isinstance(exc, CacheAbandoned) else "upstream", repr(exc))

    def on_complete(self, result: StreamThroughResult, tmp_path: str) -> None:
        """The body is complete and hashed: journal it, queue its commit."""
        assert self.plan is not None and self.head is not None
        self.lead.done(result.hash.hex, result.size)
        plan = self.plan
        self.entry = Entry(self.key, self.head.variant, result.hash, result.size, self.code, plan.headers,
                           stored_at=plan.response_time, expires_at=plan.expires_at, vary=plan.vary,
                           initial_age=plan.initial_age)
        self.ctx.committer.submit(result, tmp_path, callback=self.committed)

    # -- the commit thread -----------------------------------------------

    def committed(self, blob: Blob | None, error: BaseException | None) -> None:
        """The blob is in the store (or the commit failed): index it, release the flight."""
        try:
            if blob is not None:
                self.ctx.index.put(self.entry)
                log.info("stored %r as %s (%d bytes)", self.key, blob.hash.hex, blob.size)
        except IndexUnavailable as exc:  # the store is unusable now: the blob waits for gc
            warn_limited(log, "commit-index", "not recording %r: %s", self.key, exc)
        finally:
            self.lead.release()


def _bodiless(client: StartResponse, outcome: Outcome, stored: Iterable[tuple[str, str]],
              length: int) -> list[bytes]:
    """A 304, 412 or 416 from the response being fetched."""
    validators = [(k, v) for k, v in stored if k.lower() in _VALIDATOR_FIELDS]
    if outcome is Outcome.NOT_MODIFIED:
        client("304 Not Modified", validators)
    elif outcome is Outcome.PRECONDITION_FAILED:
        client("412 Precondition Failed", [("Content-Length", "0")] + validators)
    else:
        client("416 Range Not Satisfiable", [("Content-Range", f"bytes */{length}"), ("Content-Length", "0")]
               + validators)
    return []
