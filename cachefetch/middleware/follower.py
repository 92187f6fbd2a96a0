"""Followers: answer from another request's fetch as it arrives (request thread)."""
from __future__ import annotations

from typing import Iterable

from .. import policy
from ..flights import DoneRecord, FailedRecord, Follow, HeadRecord, LeaderGone, RefreshedRecord, UncacheableRecord
from ..fill import FillFailed
from ..index import Entry
from ..policy import CacheStatus, Outcome, RequestFacts
from ..wsgi import StartResponse, WSGIEnviron, plain_response
from .context import Context, Prepended, Retry, passthrough
from .hit import serve_stale
from .leader import local_fill

__all__ = ["follow_flight"]


def follow_flight(ctx: Context, environ: WSGIEnviron, start_response: StartResponse, follow: Follow,
                  deadline: float, key: str, request: RequestFacts, stale: Entry | None,
                  status: CacheStatus) -> Iterable[bytes]:
    """Answer from the flight ``follow`` is attached to.

    A flight whose body is already complete is not answered from: this
    waits for its commit and raises :class:`Retry`, so the request is then
    planned as a hit, with every rule a hit obeys. ``follow`` is closed here,
    unless the answer streams the leader's body (its ``close()`` does it then).

    :raises Retry: to plan the request again.
    """
    streaming = False
    try:
        try:
            journal = follow.wait(deadline)
        except LeaderGone:
            raise Retry() from None
        except TimeoutError:
            return _wait_timed_out(ctx, environ, start_response)
        final = journal.final
        if isinstance(final, RefreshedRecord):
            raise Retry(refreshed=True)
        if isinstance(final, UncacheableRecord):
            if final.status >= 500:
                served = serve_stale(ctx, environ, start_response, stale, request, final.status)
                if served is not None:
                    return served
            return passthrough(ctx, environ, start_response, CacheStatus(fwd="miss", detail="uncacheable"))
        if isinstance(final, FailedRecord):
            return _failed(ctx, environ, start_response, final, stale, request)
        if isinstance(final, DoneRecord):  # complete: wait for the commit, then be a hit
            follow.wait_released(deadline)
            raise Retry(settled=True)
        head = journal.head
        assert head is not None
        variant = policy.variant_of(environ, head.vary)
        if variant != head.variant:  # fetch our own variant, coalesced with its peers
            raise Retry(key + "\n" + variant)
        body = _answer(ctx, environ, start_response, follow, head, deadline, status.with_(collapsed=True),
                       stale, request)
        streaming = isinstance(body, Prepended)
        return body
    finally:
        if not streaming:
            follow.close()


def _answer(ctx: Context, environ: WSGIEnviron, start_response: StartResponse, follow: Follow,
            head: HeadRecord, deadline: float, status: CacheStatus, stale: Entry | None,
            request: RequestFacts) -> Iterable[bytes]:
    code = int(head.status[:3])
    length = head.content_length
    etag = policy.header(head.headers, "ETag")
    answer = policy.evaluate(environ, status=code, etag=etag,
                             last_modified=policy.header(head.headers, "Last-Modified"),
                             size=length if length >= 0 else None)
    client = ctx.respond(environ, start_response, status)
    headers = list(head.headers)
    if answer.outcome is Outcome.NOT_MODIFIED:
        client("304 Not Modified", headers)
        return []
    if answer.outcome is Outcome.PRECONDITION_FAILED:
        client("412 Precondition Failed", headers + [("Content-Length", "0")])
        return []
    if answer.outcome is Outcome.UNSATISFIABLE:
        client("416 Range Not Satisfiable", headers + [("Content-Range", f"bytes */{length}"),
                                                       ("Content-Length", "0")])
        return []
    line = head.status
    start, stop = 0, None
    if answer.outcome is Outcome.PARTIAL:
        line, start, stop = "206 Partial Content", answer.start, answer.stop
        headers.append(("Content-Range", f"bytes {start}-{stop - 1}/{length}"))
        headers.append(("Content-Length", str(stop - start)))
    elif length >= 0:
        headers.append(("Content-Length", str(length)))
    if environ.get("REQUEST_METHOD") == "HEAD":
        client(line, headers)
        return []
    fill = local_fill(head.body)
    try:
        if fill is not None and fill.caching:  # our own process fetches it: be woken, not poll
            reader = fill.reader(start, stop, deadline)
            try:
                reader.wait_ready()
            except BaseException:
                reader.close()
                raise
            # No byte taken yet: the server may send the body from the file (sendfile_spans).
            body, ready = reader, []
        else:
            body = follow.body(head.body, deadline, start, stop)
            ready = [next(body, b"")]
    except FileNotFoundError:  # committed or discarded since: be a hit, or lead, unless the fetch failed
        follow.wait_released(deadline)
        final = follow.journal().final
        if isinstance(final, FailedRecord):
            return _failed(ctx, environ, start_response, final, stale, request)
        raise Retry(settled=True) from None
    except TimeoutError:
        return _wait_timed_out(ctx, environ, start_response)
    except (LeaderGone, FillFailed):
        final = follow.journal().final
        if isinstance(final, FailedRecord):
            return _failed(ctx, environ, start_response, final, stale, request)
        raise Retry() from None
    client(line, headers)
    return Prepended(ready, body, follow)


def _failed(ctx: Context, environ: WSGIEnviron, start_response: StartResponse, final: FailedRecord,
            stale: Entry | None, request: RequestFacts) -> Iterable[bytes]:
    if final.why == "abandoned":  # the leader got its body; it just was not stored
        return passthrough(ctx, environ, start_response, CacheStatus(fwd="miss", detail="not-stored"))
    served = serve_stale(ctx, environ, start_response, stale, request)
    if served is not None:
        return served
    status = CacheStatus(fwd="miss", collapsed=True, detail="fetch-failed")
    return plain_response(ctx.respond(environ, start_response, status), "502 Bad Gateway", "the coalesced fetch failed")


def _wait_timed_out(ctx: Context, environ: WSGIEnviron, start_response: StartResponse) -> Iterable[bytes]:
    if ctx.on_wait_timeout == "504":
        status = CacheStatus(fwd="miss", collapsed=True, detail="wait-timeout")
        return plain_response(ctx.respond(environ, start_response, status), "504 Gateway Timeout",
                              f"no response from the coalesced fetch within {ctx.wait_timeout:g}s")
    return passthrough(ctx, environ, start_response, CacheStatus(fwd="miss", detail="wait-timeout"))

