"""A fill's readers as file spans: what our worker sends with sendfile from
the growing temp file (real files, threads, and a real ``cachefetch serve``)."""
from __future__ import annotations

import os
import threading

from harness import cachefetch_serve, fetch
from origin import Origin, Resource

from werkzeug.test import EnvironBuilder

from cachefetch.fill import Fill, FillOptions
from test_fill import Recorded, gated
from test_middleware import WAIT, Recorder, assert_clean, start


def _read_spans(reader) -> tuple[bytes, list[tuple[int, int]]]:
    """The body read through ``sendfile_spans()`` (pread standing in for sendfile), and the spans."""
    out, spans = bytearray(), []
    for span in reader.sendfile_spans():
        assert isinstance(span, tuple), f"a memory chunk from a fill whose temp file is fine: {span!r}"
        fd, offset, count = span
        assert count > 0 and fd == reader.fileno()
        spans.append((offset, count))
        out += os.pread(fd, count, offset)
    return bytes(out), spans


def test_spans_cover_the_body_in_order_as_it_grows(tmp_path):
    data = os.urandom(1_000_000)
    gate = threading.Event()
    rec = Recorded()
    pieces = [data[i:i + 100_000] for i in range(0, len(data), 100_000)]
    fill = Fill(gated(pieces, gate, after=3), FillOptions(str(tmp_path), content_length=len(data)),
                rec.on_start, rec.on_complete, rec.on_abort)
    reader = fill.start()
    spans = reader.sendfile_spans()
    fd, offset, count = next(spans)  # only what is written so far: the fill waits at the gate
    first = os.pread(fd, count, 0)
    assert offset == 0 and 0 < count <= 300_000 and first == data[:count]
    gate.set()
    rest = bytearray()
    position = count
    for fd, offset, count in spans:
        assert offset == position  # contiguous: nothing skipped, nothing sent twice
        rest += os.pread(fd, count, offset)
        position += count
    assert first + rest == data and position == len(data)
    assert reader.fileno() == -1  # closed at the end, as iterating closes
    assert rec.done.wait(WAIT)
    os.unlink(rec.completed[0][1])


def test_a_reader_of_a_range_gets_spans_of_that_range_only(tmp_path):
    data = os.urandom(500_000)
    rec = Recorded()
    fill = Fill(iter([data[:200_000], data[200_000:]]), FillOptions(str(tmp_path), content_length=len(data)),
                rec.on_start, rec.on_complete, rec.on_abort)
    whole = fill.start()
    assert rec.done.wait(WAIT)
    body, spans = _read_spans(fill.reader(123_456, 400_000))
    assert body == data[123_456:400_000] and spans[0][0] == 123_456
    assert _read_spans(whole)[0] == data
    os.unlink(rec.completed[0][1])


def test_a_cold_fetch_through_serve_is_whole_and_a_range_of_it_right(tmp_path):
    """Through our worker (which sends a fill's reader with sendfile): a body
    larger than the socket buffers, read slowly by the client, then a range
    of another cold one."""
    data = os.urandom(8 << 20)
    with Origin() as origin:
        origin.files["/big.bin"] = Resource(data)
        origin.files["/other.bin"] = Resource(data[::-1])
        with cachefetch_serve(tmp_path, "--upstream", origin.url, "--store", str(tmp_path / "store"),
                              "--default-ttl", "forever") as server:
            got = fetch(server.port, "/big.bin")
            assert got.status == 200 and got.body == data
            assert got.headers["Cache-Status"].endswith("stored")
            ranged = fetch(server.port, "/other.bin", headers={"Range": "bytes=1000000-5000000"})
            assert ranged.status == 206 and ranged.body == data[::-1][1_000_000:5_000_001]
            assert ranged.headers["Content-Length"] == str(4_000_001)


def test_a_follower_in_the_leaders_process_is_offered_the_body_as_file_spans(make):
    """What our worker sends with sendfile: a follower of a fetch running in
    its own process is answered from the fill's temp file, as the leader's
    client is, not copied through Python."""
    data = os.urandom(600_000)
    entered, gate = threading.Event(), threading.Event()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Cache-Control", "max-age=60"),
                                  ("Content-Length", str(len(data)))])

        def body():
            yield data[:100_000]
            entered.set()
            assert gate.wait(WAIT)
            yield data[100_000:]
        return body()

    mw = make(app)
    leader = Recorder(mw, "/spans")
    thread = start(leader.run)
    try:
        assert entered.wait(WAIT)
        got = {}
        environ = EnvironBuilder(path="/spans", base_url="http://example.org").get_environ()
        answer = mw(environ, lambda status, headers, exc_info=None: got.update(status=status, headers=dict(headers)))
        gate.set()
        try:
            assert callable(getattr(answer, "sendfile_spans", None))
            body = bytearray()
            for span in answer.sendfile_spans():
                fd, offset, count = span
                assert offset == len(body)
                body += os.pread(fd, count, offset)
        finally:
            answer.close()
    finally:
        gate.set()
        thread.join(WAIT)
    assert got["status"] == "200 OK" and got["headers"]["Cache-Status"] == "cachefetch; fwd=miss; collapsed"
    assert bytes(body) == data and leader.body == data
    assert_clean(mw)
