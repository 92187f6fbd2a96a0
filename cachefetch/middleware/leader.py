"""The leader: fetch from the app once, for this client, the followers and the store."""
from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator

from .. import policy
from ..flights import HeadRecord, Lead
from ..index import Entry
from ..policy import CacheStatus, Outcome, RequestFacts, StorePlan
from ..store import Blob
from ..stream import CacheAbandoned, StreamThroughOptions, StreamThroughResult, stream_through
from ..wsgi import StartResponse, WSGIEnviron, plain_response
from .context import AppResponse, Context, close_quietly, respond
from .hit import serve_stale

__all__ = ["LeaderRun"]

log = logging.getLogger("cachefetch.middleware")


def _discard(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return lambda data: None


class LeaderRun:
    """One fetch this request leads, from the app's answer to the index entry.

    :meth:`run` runs on the request thread. :meth:`on_start`,
    :meth:`on_abort` and :meth:`on_complete` run on whichever thread reads
    the app's body (the request thread, or the detached thread that finishes
    the fetch after the client left). :meth:`committed` runs on the commit
    thread, and releases the flight: until then followers and new requests
    wait on it, so no one sees the body complete but the entry missing.
    """

    def __init__(self, ctx: Context, lead: Lead, key: str, request: RequestFacts, environ: WSGIEnviron,
                 stale: Entry | None, status: CacheStatus) -> None:
        self.ctx, self.lead, self.key, self.request = ctx, lead, key, request
        self.environ, self.stale, self.status = environ, stale, status
        self.plan: StorePlan | None = None
        self.head: HeadRecord | None = None
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
        opts = StreamThroughOptions(
            content_type=policy.header(plan.headers, "Content-Type") or "application/octet-stream",
            extra_headers=sent, content_length=plan.content_length, temp_dir=ctx.store.temp_dir,
            temp_prefix=self.lead.temp_prefix, status=response.status, max_size=ctx.max_object_size,
            finish_on_disconnect=True, on_start=self.on_start, on_abort=self.on_abort)
        client = respond(self.environ, start_response, self.status.with_(stored=True))
        answer = policy.evaluate(self.environ, status=code, etag=policy.header(plan.headers, "ETag"),
                                 last_modified=policy.header(plan.headers, "Last-Modified"),
                                 size=plan.content_length if plan.content_length >= 0 else None)
        if answer.outcome is Outcome.FULL:
            return stream_through(self.environ, client, response.body, opts, self.on_complete)
        # The client wants less than the whole: the fetch still stores all of it.
        tee = stream_through(self.environ, _discard, response.body, opts, self.on_complete)
        if not hasattr(tee, "temp_path"):  # the app failed before its first byte
            return plain_response(client, "502 Bad Gateway", "the upstream failed before sending a byte")
        validators = [(k, v) for k, v in plan.headers if k.lower() in ("etag", "last-modified", "date",
                                                                        "cache-control", "expires", "vary")]
        if answer.outcome is Outcome.PARTIAL:
            client("206 Partial Content", [
                ("Content-Type", opts.content_type),
                ("Content-Range", f"bytes {answer.start}-{answer.stop - 1}/{plan.content_length}"),
                ("Content-Length", str(answer.stop - answer.start))] + [h for h in sent if h[0].lower() != "content-type"])
            return _Slice(tee, answer.start, answer.stop)
        close_quietly(tee)  # finishes the fetch on a detached thread
        if answer.outcome is Outcome.NOT_MODIFIED:
            client("304 Not Modified", validators)
        elif answer.outcome is Outcome.PRECONDITION_FAILED:
            client("412 Precondition Failed", [("Content-Length", "0")] + validators)
        else:
            client("416 Range Not Satisfiable", [("Content-Range", f"bytes */{plan.content_length}"),
                                                 ("Content-Length", "0")] + validators)
        return []

    def _not_stored(self, response: AppResponse, why: str, start_response: StartResponse) -> Iterable[bytes]:
        self.lead.uncacheable(response.code)
        if response.code >= 500:
            served = serve_stale(self.ctx, self.environ, start_response, self.stale, self.request, response.code)
            if served is not None:
                response.close()
                return served
        log.debug("not storing %r: %s", self.key, why)
        client = respond(self.environ, start_response, self.status.with_(detail=why))
        client(response.status, response.headers)
        return response.body

    # -- the thread reading the body --------------------------------------

    def on_start(self, tmp_path: str) -> None:
        """The temp file exists: tell the followers where the body grows."""
        assert self.head is not None
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
        finally:
            self.lead.release()


class _Slice:
    """Bytes ``[start, stop)`` of the tee's stream; ``close()`` lets the tee
    finish the fetch without a client."""

    def __init__(self, tee: Iterable[bytes], start: int, stop: int) -> None:
        self._tee, self._start, self._stop = tee, start, stop

    def __iter__(self) -> Iterator[bytes]:
        pos = 0
        for chunk in self._tee:
            end = pos + len(chunk)
            if end > self._start:
                yield chunk[max(0, self._start - pos):self._stop - pos]
            pos = end
            if pos >= self._stop:
                return

    def close(self) -> None:
        close_quietly(self._tee)
