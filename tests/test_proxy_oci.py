"""`cachefetch serve --protocol oci` against a local registry origin: /v2/, blobs
by digest (hit, miss, HEAD, Range, digest mismatch), manifests by digest and by
tag, and paths that name nothing."""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import cachefetch_serve, curl, fetch, gunicorn, run_cli, wait_until
from origin import Origin, Resource

from cachefetch.index import SQLiteIndex
from cachefetch.store import CAFS
from cachefetch.hashing import hash_bytes

REPO = "library/alpine"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_path(digest_hex: str, repo: str = REPO) -> str:
    return f"/v2/{repo}/blobs/sha256:{digest_hex}"


def serve_oci(tmp_path, origin: Origin, store, *args: str):
    return cachefetch_serve(tmp_path, "--upstream", origin.url, "--protocol", "oci", "--store", str(store),
                            "--workers", "2", "--threads", "8", *args)


def wait_settled(store) -> None:
    """Wait until no fetch is in flight (a leader unlinks its lock file once its
    commit and index entry are done)."""
    inflight = os.path.join(store, "inflight")
    wait_until(lambda: os.path.isdir(inflight) and os.listdir(inflight) == [], what="in-flight fetches to settle")


def blobs(store) -> set[str]:
    return {h.hex for h in CAFS(store)}


def assert_store_clean(store) -> None:
    """Call once the server has stopped: every blob matches its name, no temp file
    is left, and `cachefetch verify` agrees."""
    cafs = CAFS(store)
    assert cafs.verify() == []
    assert cafs.temp_files() == []
    verify = run_cli("verify", "--store", str(store))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_v2_passes_the_upstream_challenge_through_and_never_stores_it(tmp_path):
    """Clients learn how to authenticate from /v2/'s 401: it must reach them."""
    store = tmp_path / "store"
    challenge = 'Bearer realm="http://127.0.0.1:9/token",service="registry.test"'
    with Origin() as origin:
        origin.files["/v2/"] = Resource(b'{"errors":[{"code":"UNAUTHORIZED"}]}', content_type="application/json",
                                        status=401, headers={"WWW-Authenticate": challenge,
                                                             "Docker-Distribution-API-Version": "registry/2.0"})
        with serve_oci(tmp_path, origin, store) as server:
            for _ in range(2):
                r = fetch(server.port, "/v2/")
                assert r.status == 401, r.body
                assert r.headers["WWW-Authenticate"] == challenge
            assert fetch(server.port, "/v2").status == 401
            assert origin.hits["/v2/"] == 3  # never answered from the cache
    assert blobs(store) == set()


def test_v2_is_answered_locally_when_the_upstream_is_down(tmp_path):
    store = tmp_path / "store"
    origin = Origin()
    with origin:
        pass  # started and stopped: its port now refuses connections
    with serve_oci(tmp_path, origin, store) as server:
        for method in ("GET", "HEAD"):
            r = fetch(server.port, "/v2/", method=method)
            assert r.status == 200, r.body
            assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert blobs(store) == set()


def test_blob_miss_then_hit_head_and_range(tmp_path):
    store = tmp_path / "store"
    data = os.urandom(3 << 20) + b"tail"  # several upstream chunks
    digest = sha256(data)
    path = blob_path(digest)
    with Origin() as origin:
        origin.files[path] = Resource(data)
        with serve_oci(tmp_path, origin, store) as server:
            # HEAD before anything is cached: answered from an upstream HEAD, stores nothing.
            head = fetch(server.port, path, method="HEAD")
            assert head.status == 200
            assert head.headers["Content-Length"] == str(len(data))
            assert head.headers["Docker-Content-Digest"] == f"sha256:{digest}"
            assert head.body == b""
            assert blobs(store) == set()

            miss = fetch(server.port, path)
            assert miss.status == 200 and miss.complete
            assert miss.body == data
            assert miss.headers["Docker-Content-Digest"] == f"sha256:{digest}"
            assert "fwd=miss" in miss.headers["Cache-Status"], miss.headers["Cache-Status"]
            assert "immutable" in miss.headers["Cache-Control"]
            wait_settled(store)
            assert blobs(store) == {hash_bytes(data).hex}

            hit = fetch(server.port, path)
            assert hit.status == 200 and hit.complete
            assert hit.body == data
            assert hit.headers["Cache-Status"].startswith("cachefetch; hit"), hit.headers["Cache-Status"]
            assert hit.headers["Docker-Content-Digest"] == f"sha256:{digest}"
            assert hit.headers["Content-Type"] == "application/octet-stream"

            head = fetch(server.port, path, method="HEAD")
            assert head.status == 200
            assert head.headers["Cache-Status"].startswith("cachefetch; hit")
            assert head.headers["Content-Length"] == str(len(data))
            assert head.headers["Docker-Content-Digest"] == f"sha256:{digest}"

            # Range with the real curl on the cached blob.
            out = tmp_path / "range.bin"
            r = curl("-r", "1000-1999", "-o", str(out), "-D", str(tmp_path / "range.hdr"),
                     "-w", "%{http_code}", server.url + path)
            assert r.returncode == 0, r.stderr
            assert r.stdout == b"206"
            assert out.read_bytes() == data[1000:2000]
            headers = (tmp_path / "range.hdr").read_text().lower()
            assert f"content-range: bytes 1000-1999/{len(data)}" in headers
            r = curl("-r", "-4", "-o", str(out), "-w", "%{http_code}", server.url + path)
            assert r.returncode == 0 and r.stdout == b"206"
            assert out.read_bytes() == b"tail"
            r = curl("-r", f"{len(data)}-", "-o", str(out), "-w", "%{http_code}", server.url + path)
            assert r.stdout == b"416"

            # one GET upstream, plus the first HEAD
            assert origin.hits[path] == 2
    assert server.proc.returncode == 0
    assert_store_clean(store)


@pytest.mark.parametrize("size", [10_000, 3 << 20], ids=["one-chunk", "several-chunks"])
def test_blob_that_does_not_match_its_digest_is_never_delivered_whole_nor_stored(tmp_path, size):
    store = tmp_path / "store"
    good = os.urandom(size)
    bad = bytearray(good)
    bad[size // 2] ^= 0xFF  # same length, one byte off
    bad = bytes(bad)
    digest = sha256(good)
    path = blob_path(digest)
    with Origin() as origin:
        origin.files[path] = Resource(bad)
        with serve_oci(tmp_path, origin, store) as server:
            r = fetch(server.port, path)
            # Either refused before the body started, or cut short: never all of it.
            assert r.status == 502 or not r.complete, (r.status, r.complete, len(r.body))
            assert r.body != bad
            assert len(r.body) < size
            # the real curl sees a failure too
            c = curl("-o", str(tmp_path / "c.bin"), "-w", "%{http_code}", server.url + path)
            assert c.returncode != 0 or c.stdout == b"502", (c.returncode, c.stdout)
            assert origin.hits[path] == 2  # each attempt went upstream again
            wait_settled(store)
            assert blobs(store) == set()
            assert hash_bytes(bad).hex not in blobs(store)

            # The upstream is fixed: the next request fetches again and gets the right bytes.
            origin.files[path] = Resource(good)
            r = fetch(server.port, path)
            assert r.status == 200 and r.complete and r.body == good
            assert origin.hits[path] == 3
            wait_settled(store)
            assert blobs(store) == {hash_bytes(good).hex}
            metrics = fetch(server.port, "/-/metrics").body.decode()
            assert "cachefetch_verification_failures_total 2.0" in metrics, metrics
    assert_store_clean(store)


def test_manifest_by_digest_is_cached_forever(tmp_path):
    store = tmp_path / "store"
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                           "layers": [{"digest": "sha256:" + "a" * 64, "size": 1}]}).encode()
    digest = sha256(manifest)
    path = f"/v2/{REPO}/manifests/sha256:{digest}"
    accept = {"Accept": MANIFEST_TYPE}
    with Origin() as origin:
        origin.files[path] = Resource(manifest, content_type=MANIFEST_TYPE)
        with serve_oci(tmp_path, origin, store) as server:
            miss = fetch(server.port, path, headers=accept)
            assert miss.status == 200 and miss.body == manifest
            assert miss.headers["Docker-Content-Digest"] == f"sha256:{digest}"
            wait_settled(store)
            hit = fetch(server.port, path, headers=accept)
            assert hit.status == 200 and hit.body == manifest
            assert hit.headers["Cache-Status"].startswith("cachefetch; hit"), hit.headers["Cache-Status"]
            assert hit.headers["Content-Type"] == MANIFEST_TYPE
            assert hit.headers["Docker-Content-Digest"] == f"sha256:{digest}"
            assert "immutable" in hit.headers["Cache-Control"]
            assert "max-age=31536000" in hit.headers["Cache-Control"]
            assert origin.hits[path] == 1

            # a manifest whose bytes do not match the digest it was asked by
            wrong = f"/v2/{REPO}/manifests/sha256:{sha256(b'other')}"
            origin.files[wrong] = Resource(manifest, content_type=MANIFEST_TYPE)
            r = fetch(server.port, wrong, headers=accept)
            assert r.status == 502 or not r.complete
            assert r.body != manifest
            wait_settled(store)
            assert blobs(store) == {hash_bytes(manifest).hex}
    assert_store_clean(store)


def test_manifest_by_tag_is_cached_with_a_short_ttl(tmp_path):
    store = tmp_path / "store"
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": {}}).encode()
    path = f"/v2/{REPO}/manifests/3.19"
    accept = {"Accept": MANIFEST_TYPE}
    with Origin() as origin:
        # The origin claims a year: the proxy must not believe it for a tag.
        origin.files[path] = Resource(manifest, content_type=MANIFEST_TYPE,
                                      headers={"Cache-Control": "public, max-age=31536000"})
        with serve_oci(tmp_path, origin, store) as server:
            miss = fetch(server.port, path, headers=accept)
            assert miss.status == 200 and miss.body == manifest
            assert miss.headers["Cache-Control"] == "max-age=300"
            assert "accept" in miss.headers["Vary"].lower()
            wait_settled(store)
            hit = fetch(server.port, path, headers=accept)
            assert hit.status == 200 and hit.body == manifest
            status = hit.headers["Cache-Status"]
            assert status.startswith("cachefetch; hit; ttl="), status
            assert 0 <= int(status.rsplit("ttl=", 1)[1]) <= 300
            assert hit.headers["Cache-Control"] == "max-age=300"
            assert origin.hits[path] == 1


def test_manifest_by_tag_is_fetched_again_once_its_ttl_lapses(tmp_path):
    """tag_ttl is not on the command line: create_app(tag_ttl=1) under a real gunicorn."""
    store = tmp_path / "store"
    old = json.dumps({"schemaVersion": 2, "v": 1}).encode()
    new = json.dumps({"schemaVersion": 2, "v": 2}).encode()
    path = f"/v2/{REPO}/manifests/latest"
    accept = {"Accept": MANIFEST_TYPE}
    with Origin() as origin:
        origin.files[path] = Resource(old, content_type=MANIFEST_TYPE)
        env = {"CF_PROXY_UPSTREAM": origin.url, "CF_PROXY_STORE": str(store), "CF_PROXY_PROTOCOL": "oci",
               "CF_PROXY_TAG_TTL": "3"}
        with gunicorn("proxy_wsgi:application", tmp_path, env=env, workers=1, threads=8) as server:
            fetched = time.monotonic()
            first = fetch(server.port, path, headers=accept)
            assert first.body == old and first.headers["Cache-Control"] == "max-age=3"
            wait_settled(store)
            origin.files[path] = Resource(new, content_type=MANIFEST_TYPE)  # the tag moves
            assert fetch(server.port, path, headers=accept).body == old  # still fresh
            assert origin.hits[path] == 1
            # let the 3 s TTL lapse (expiry is the behaviour under test); 3 s, not 1, so that a
            # loaded machine cannot let it lapse before the "still fresh" request above
            time.sleep(max(0.0, fetched + 3.2 - time.monotonic()))
            again = fetch(server.port, path, headers=accept)
            assert again.status == 200 and again.body == new
            assert origin.hits[path] == 2


BAD_PATHS = [
    f"/v2/Library/alpine/blobs/sha256:{'a' * 64}",       # upper case in the name
    f"/v2/library/alpine/blobs/sha256:{'a' * 63}",       # short digest
    f"/v2/library/alpine/blobs/sha256:{'a' * 65}",       # long digest
    f"/v2/library/alpine/blobs/sha256:{'A' * 64}",       # upper-case hex
    f"/v2/library/alpine/blobs/sha256:{'g' * 64}",       # not hex
    f"/v2/library/alpine/blobs/sha512:{'a' * 128}",      # another algorithm
    f"/v2/library/alpine/blobs/{'a' * 64}",              # no algorithm
    f"/v2/library/alpine/blobs/sha256:{'a' * 64}/x",     # trailing segment
    f"/v2//blobs/sha256:{'a' * 64}",                     # empty name
    f"/v2/-lib/blobs/sha256:{'a' * 64}",                 # name starting with a separator
    f"/v2/lib--/blobs/sha256:{'a' * 64}",                # name ending with a separator
    "/v2/library/alpine/manifests/-tag",                 # tag starting with '-'
    "/v2/library/alpine/manifests/" + "t" * 129,         # tag too long
    "/v2/library/alpine/manifests/",                     # no reference
    "/v2/library/alpine/manifests/sha256:xyz",           # bad digest
    "/v2/_catalog",
    "/v3/",
    "/",
]


def test_invalid_names_and_digests_are_404_and_never_reach_the_origin(tmp_path):
    with Origin() as origin, serve_oci(tmp_path, origin, tmp_path / "store") as server:
        for path in BAD_PATHS:
            r = fetch(server.port, path)
            assert r.status == 404, (path, r.status, r.body)
            # OCI clients read the distribution spec's JSON error body
            assert r.headers["Content-Type"] == "application/json"
            assert json.loads(r.body)["errors"][0]["code"] == "NAME_UNKNOWN"
        # encoded dot segments and NUL: refused as bad requests, still not a 500
        for path in (f"/v2/library/%2e%2e/blobs/sha256:{'a' * 64}", f"/v2/library/../blobs/sha256:{'a' * 64}",
                     f"/v2/library/alpine/blobs/sha256:{'a' * 64}%00", "/v2/lib%5Calpine/manifests/x"):
            r = fetch(server.port, path)
            assert 400 <= r.status < 500, (path, r.status, r.body)
        assert sum(origin.hits.values()) == 0, origin.hits


def test_tag_manifest_fetched_with_credentials_is_not_served_to_a_client_without_them(tmp_path):
    """A tag names no content: what the upstream showed one client's credentials
    (a private repository's manifest) must not be replayed to a client without any."""
    store = tmp_path / "store"
    manifest = json.dumps({"schemaVersion": 2, "private": True}).encode()
    path = "/v2/acme/secret/manifests/v1"
    with Origin() as origin:
        origin.files[path] = Resource(manifest, content_type=MANIFEST_TYPE)
        with serve_oci(tmp_path, origin, store) as server:
            authed = fetch(server.port, path, headers={"Accept": MANIFEST_TYPE, "Authorization": "Bearer s3cret"})
            assert authed.status == 200 and authed.body == manifest
            wait_settled(store)
            anonymous = fetch(server.port, path, headers={"Accept": MANIFEST_TYPE})
            assert "hit" not in anonymous.headers.get("Cache-Status", ""), anonymous.headers["Cache-Status"]
            assert origin.hits[path] == 2  # asked the upstream, which decides what an anonymous client sees


def record_authorization(origin: Origin) -> list:
    """Wrap ``origin``'s handler to record each request's Authorization header."""
    seen: list = []
    base = origin.server.RequestHandlerClass

    class Recording(base):
        def do_GET(self, head=False):
            seen.append(self.headers.get("Authorization"))
            super().do_GET(head)

    origin.server.RequestHandlerClass = Recording
    return seen


def test_blob_redirected_by_the_upstream_is_followed_verified_and_cached(tmp_path):
    """Registries answer blob GETs with a redirect to blob storage (Docker Hub,
    GHCR, ECR...): passing the 307 on would send every client around the cache."""
    store = tmp_path / "store"
    data = os.urandom(200_000)
    digest = sha256(data)
    path = blob_path(digest)
    with Origin() as origin, Origin() as storage:
        storage.files[f"/objects/{digest}?sig=1"] = Resource(data)
        seen_auth = record_authorization(storage)
        origin.files[path] = Resource(b"", status=307, headers={"Location": f"{storage.url}/objects/{digest}?sig=1"})
        with serve_oci(tmp_path, origin, store, "--files-upstream", storage.url) as server:
            miss = fetch(server.port, path, headers={"Authorization": "Bearer registry-token"})
            assert miss.status == 200 and miss.complete and miss.body == data
            assert miss.headers["Docker-Content-Digest"] == f"sha256:{digest}"
            wait_settled(store)
            hit = fetch(server.port, path)
            assert hit.status == 200 and hit.body == data
            assert hit.headers["Cache-Status"].startswith("cachefetch; hit")
            assert origin.hits[path] == 1 and storage.hits[f"/objects/{digest}?sig=1"] == 1
            assert seen_auth == [None]  # the registry's token is not handed to another host

            # a redirect to a body that does not match the digest is refused like any other
            bad_digest = sha256(b"something else")
            origin.files[blob_path(bad_digest)] = Resource(
                b"", status=307, headers={"Location": f"{storage.url}/objects/{digest}?sig=1"})
            r = fetch(server.port, blob_path(bad_digest))
            assert r.status == 502 or not r.complete
            wait_settled(store)
            assert blobs(store) == {hash_bytes(data).hex}
    assert_store_clean(store)


def test_concurrent_clients_of_a_mismatching_blob_none_gets_it_whole(tmp_path):
    """Followers read the leader's temp file as it grows; the held-back last chunk
    never reaches it, so no follower completes a body that fails verification."""
    store = tmp_path / "store"
    good = os.urandom(3 << 20)
    bad = good[:-1] + bytes([good[-1] ^ 1])
    path = blob_path(sha256(good))
    gate = threading.Event()
    with Origin() as origin:
        origin.files[path] = Resource(bad, gate=gate)
        with serve_oci(tmp_path, origin, store) as server:
            with ThreadPoolExecutor(6) as pool:
                futures = [pool.submit(fetch, server.port, path) for _ in range(6)]
                wait_until(lambda: origin.hits[path] >= 1, what="the first fetch to reach the origin")
                gate.set()
                results = [f.result() for f in futures]
            for r in results:
                assert r.status == 502 or not r.complete, (r.status, r.complete, len(r.body))
                assert r.body != bad
            wait_settled(store)
            assert blobs(store) == set()
    assert_store_clean(store)


def test_refused_paths_are_not_stored(tmp_path):
    store = tmp_path / "store"
    with Origin() as origin, serve_oci(tmp_path, origin, store) as server:
        for i in range(5):
            r = fetch(server.port, f"/v2/not-a-route/{i}")
            assert r.status == 404 and r.headers["Cache-Control"] == "no-store"
    assert blobs(store) == set()
    index = SQLiteIndex(os.path.join(store, "index.sqlite3"))
    try:
        assert len(index) == 0
    finally:
        index.close()
