"""cachefetch.serve.serve_from_store, driven through werkzeug's test Client."""
from __future__ import annotations

import logging
import os
from wsgiref.util import FileWrapper

import pytest
from werkzeug.test import Client

from cachefetch.hashing import hash_bytes
from cachefetch.serve import ServeOptions, etag_for, serve_from_store
from cachefetch.store import Blob

BODY = bytes(range(256)) * 40 + b"tail"  # 10244 bytes
N = len(BODY)


def client_for(store, blob, opts=None) -> Client:
    def app(environ, start_response):
        return serve_from_store(environ, start_response, store, blob, opts)
    return Client(app)


@pytest.fixture
def blob(store):
    return store.put(BODY)


@pytest.fixture
def client(store, blob):
    return client_for(store, blob, ServeOptions(content_type="application/x-test",
                                                extra_headers={"Cache-Control": "max-age=60",
                                                               "Content-Type": "text/evil"}))


def test_get_200_with_headers_and_body(client, blob):
    r = client.get("/")
    assert r.status_code == 200
    assert r.data == BODY
    assert r.headers["Content-Type"] == "application/x-test"  # the extra header did not override it
    assert r.headers.getlist("Content-Type") == ["application/x-test"]
    assert r.headers["Content-Length"] == str(N)
    assert r.headers["ETag"] == f'"{blob.hash.hex}"' == etag_for(blob)
    assert r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["Cache-Control"] == "max-age=60"


def test_default_content_type(store, blob):
    r = client_for(store, blob).get("/")
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert r.data == BODY


def test_head_gets_headers_only(client, blob):
    r = client.head("/")
    assert r.status_code == 200
    assert r.data == b""
    assert r.headers["Content-Length"] == str(N)
    assert r.headers["Content-Type"] == "application/x-test"
    assert r.headers["ETag"] == etag_for(blob)


@pytest.mark.parametrize("header", [
    "{etag}",                       # exact
    'W/{etag}',                     # weak comparison: a weak tag matches a strong one
    "*",
    '"0000", {etag}, "ffff"',       # in a list
    '"0000",W/{etag}',
])
def test_if_none_match_gives_304(client, blob, header):
    r = client.get("/", headers={"If-None-Match": header.format(etag=etag_for(blob))})
    assert r.status_code == 304
    assert r.data == b""
    assert r.headers["ETag"] == etag_for(blob)
    assert r.headers["Cache-Control"] == "max-age=60"
    assert "Content-Length" not in r.headers


def test_if_none_match_on_head_gives_304(client, blob):
    r = client.head("/", headers={"If-None-Match": etag_for(blob)})
    assert r.status_code == 304


@pytest.mark.parametrize("header", ['"0000"', 'W/"0000"', '"{hex_upper}"', '"{hex}0"'])
def test_if_none_match_other_tag_gives_200(client, blob, header):
    h = blob.hash.hex
    r = client.get("/", headers={"If-None-Match": header.format(hex=h, hex_upper=h.upper())})
    assert r.status_code == 200
    assert r.data == BODY


@pytest.mark.parametrize("rng, start, stop", [
    ("bytes=0-9", 0, 10),
    ("bytes=100-100", 100, 101),
    ("bytes=10-", 10, N),                  # open-ended
    (f"bytes={N - 1}-", N - 1, N),
    ("bytes=-5", N - 5, N),                # suffix
    (f"bytes=-{N + 1000}", 0, N),          # suffix longer than the blob: all of it
    (f"bytes=5-{N + 1000}", 5, N),         # end past the blob is clipped
])
def test_single_range_gives_206(client, blob, rng, start, stop):
    r = client.get("/", headers={"Range": rng})
    assert r.status_code == 206
    assert r.data == BODY[start:stop]
    assert r.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{N}"
    assert r.headers["Content-Length"] == str(stop - start)
    assert r.headers["ETag"] == etag_for(blob)
    assert r.headers["Content-Type"] == "application/x-test"


@pytest.mark.parametrize("rng", [f"bytes={N}-", f"bytes={N + 5}-{N + 10}"])
def test_unsatisfiable_range_gives_416(client, rng):
    r = client.get("/", headers={"Range": rng})
    assert r.status_code == 416
    assert r.headers["Content-Range"] == f"bytes */{N}"
    assert r.data == b""


def test_any_range_of_an_empty_blob_gives_416(store):
    empty = store.put(b"")
    c = client_for(store, empty)
    for rng in ("bytes=0-", "bytes=-1"):
        r = c.get("/", headers={"Range": rng})
        assert r.status_code == 416
        assert r.headers["Content-Range"] == "bytes */0"
    r = c.get("/")
    assert (r.status_code, r.data, r.headers["Content-Length"]) == (200, b"", "0")


@pytest.mark.parametrize("rng", ["bytes=0-1,5-6", "bytes=0-1, -3"])
def test_multi_range_gives_200_with_everything(client, rng):
    r = client.get("/", headers={"Range": rng})
    assert r.status_code == 200
    assert r.data == BODY
    assert "Content-Range" not in r.headers


@pytest.mark.parametrize("rng", ["bytes=9-2", "items=0-1", "bytes=abc", "0-1"])
def test_malformed_or_foreign_range_is_ignored(client, rng):
    r = client.get("/", headers={"Range": rng})
    assert r.status_code == 200
    assert r.data == BODY


def test_if_range_matching_etag_gives_206(client, blob):
    r = client.get("/", headers={"Range": "bytes=0-3", "If-Range": etag_for(blob)})
    assert r.status_code == 206
    assert r.data == BODY[:4]


@pytest.mark.parametrize("if_range", [
    '"0000"',
    "W/{etag}",                         # If-Range uses the strong comparison: weak never matches
    "Wed, 21 Oct 2015 07:28:00 GMT",    # a date: we send no Last-Modified, so it cannot match
])
def test_if_range_mismatch_gives_200_with_everything(client, blob, if_range):
    r = client.get("/", headers={"Range": "bytes=0-3", "If-Range": if_range.format(etag=etag_for(blob))})
    assert r.status_code == 200
    assert r.data == BODY
    assert "Content-Range" not in r.headers


def test_missing_blob_gives_500_and_is_logged(store, caplog):
    data = b"in the index, not in the store"
    ghost = Blob(hash_bytes(data), len(data))
    with caplog.at_level(logging.ERROR, logger="cachefetch.serve"):
        r = client_for(store, ghost).get("/")
    assert r.status_code == 500
    assert ghost.hash.hex in caplog.text
    assert [rec.levelno for rec in caplog.records if rec.name == "cachefetch.serve"] == [logging.ERROR]


class SpyFileWrapper(FileWrapper):
    """A ``wsgi.file_wrapper`` that records what it was given."""

    instances: list["SpyFileWrapper"] = []

    def __init__(self, filelike, blksize=8192):
        super().__init__(filelike, blksize)
        self.fileno = filelike.fileno()
        self.position = os.lseek(self.fileno, 0, os.SEEK_CUR)  # where sendfile would start
        SpyFileWrapper.instances.append(self)


@pytest.fixture
def spy_wrapper():
    SpyFileWrapper.instances = []
    yield SpyFileWrapper
    SpyFileWrapper.instances = []


def test_body_goes_through_wsgi_file_wrapper(client, spy_wrapper):
    r = client.get("/", environ_overrides={"wsgi.file_wrapper": spy_wrapper})
    assert r.status_code == 200
    assert r.data == BODY
    assert len(spy_wrapper.instances) == 1
    assert spy_wrapper.instances[0].position == 0


def test_range_through_wsgi_file_wrapper_starts_at_the_offset(client, spy_wrapper):
    r = client.get("/", headers={"Range": "bytes=1000-1999"},
                   environ_overrides={"wsgi.file_wrapper": spy_wrapper})
    assert r.status_code == 206
    assert r.data == BODY[1000:2000]  # the wrapper reads no further than the range
    (w,) = spy_wrapper.instances
    assert w.position == 1000  # a sendfile of Content-Length bytes from here is right


def test_head_and_304_do_not_use_the_file_wrapper(client, blob, spy_wrapper):
    client.head("/", environ_overrides={"wsgi.file_wrapper": spy_wrapper})
    client.get("/", headers={"If-None-Match": etag_for(blob)},
               environ_overrides={"wsgi.file_wrapper": spy_wrapper})
    assert spy_wrapper.instances == []


def test_serve_options_reject_header_injection():
    with pytest.raises(ValueError):
        ServeOptions(extra_headers={"X-A": "1\r\nSet-Cookie: a=b"})
    with pytest.raises(ValueError):
        ServeOptions(content_type="text/plain\n")
    with pytest.raises(TypeError):
        ServeOptions(extra_headers={"X-A": 1})


def test_serve_rejects_wrong_argument_types(store, blob):
    with pytest.raises(TypeError):
        serve_from_store({}, lambda *a: None, "not a store", blob)
    with pytest.raises(TypeError):
        serve_from_store({}, lambda *a: None, store, (blob.hash, blob.size))
