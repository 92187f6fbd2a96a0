"""Protocol routing and index rewriting, as pure functions (no server)."""
from __future__ import annotations

import json

import pytest

from cachefetch.protocols import LocalAnswer, Route, RouteError, make_protocol, safe_path
from cachefetch.protocols.pypi import PyPIProtocol

SHA = "ab" * 32
OTHER = "cd" * 32


def pypi(**kw) -> PyPIProtocol:
    return PyPIProtocol("http://index.test", files_upstreams=["https://files.test"], **kw)


def environ(path: str, query: str = "", **headers) -> dict:
    env = {"PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": "GET"}
    env.update({"HTTP_" + k.upper(): v for k, v in headers.items()})
    return env


# -- safe_path -------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/a/../b", "/..", "/a/./b", "/a/...", "/a/..;x/b", "/a/\x00b", "/a\\b", "/a/\x7f"])
def test_safe_path_refuses_what_could_climb_or_smuggle(path):
    with pytest.raises(RouteError) as caught:
        safe_path(environ(path))
    assert caught.value.status == 400


def test_safe_path_requotes_the_decoded_path():
    # PATH_INFO arrives decoded (latin-1 of the UTF-8 bytes): it goes upstream encoded again.
    raw = "/pkg/caf\u00e9 1.whl".encode("utf-8").decode("latin-1")
    assert safe_path(environ(raw)) == "/pkg/caf%C3%A9%201.whl"


# -- generic and oci ---------------------------------------------------------------

def test_generic_maps_path_and_query_under_the_base():
    route = make_protocol("generic", "http://origin.test/base/").route("/a/b.tar", environ("/a/b.tar", "v=1"))
    assert isinstance(route, Route) and route.url == "http://origin.test/base/a/b.tar?v=1"
    assert route.digest is None and route.cache_control is None


def test_unknown_protocol_and_bad_upstream_are_value_errors():
    with pytest.raises(ValueError):
        make_protocol("ftp", "http://x.test")
    with pytest.raises(ValueError):
        make_protocol("generic", "file:///etc")


def test_oci_routes():
    oci = make_protocol("oci", "https://registry.test", tag_ttl=30)
    blob = oci.route(f"/v2/library/alpine/blobs/sha256:{SHA}", environ("/"))
    assert blob.digest == ("sha256", SHA) and "immutable" in blob.cache_control
    assert ("Docker-Content-Digest", f"sha256:{SHA}") in blob.headers
    tag = oci.route("/v2/library/alpine/manifests/3.20", environ("/"))
    assert tag.digest is None and tag.cache_control == "max-age=30" and "public" not in tag.cache_control
    ping = oci.route("/v2/", environ("/v2/"))
    assert ping.cache_control == "no-store" and isinstance(ping.fallback, LocalAnswer)
    tags = oci.route("/v2/a/tags/list", environ("/v2/a/tags/list", "n=10"))
    assert tags.url == "https://registry.test/v2/a/tags/list?n=10" and tags.cache_control == "max-age=30"
    referrers = oci.route(f"/v2/a/referrers/sha256:{SHA}", environ("/"))
    assert referrers.cache_control == "max-age=30"
    for bad in ("/v2/UPPER/blobs/sha256:" + SHA, "/v2/a/blobs/sha256:xyz", "/v2/a/tags", "/v1/x"):
        with pytest.raises(RouteError):
            oci.route(bad, environ(bad))


# -- pypi --------------------------------------------------------------------------

def test_pypi_index_pages_get_a_short_ttl_and_vary_on_accept():
    route = pypi(index_ttl=42).route("/simple/requests/", environ("/simple/requests/"))
    assert route.url == "http://index.test/simple/requests/"
    assert route.cache_control == "public, max-age=42" and route.vary == ("Accept",)
    assert pypi().route("/simple", environ("/simple")).url == "http://index.test/simple/"


def test_pypi_file_routes_carry_the_digest_and_only_allowed_hosts():
    p = pypi()
    route = p.route(f"/-/files/files.test/{SHA}/packages/x-1.whl", environ("/"))
    assert route.url == "https://files.test/packages/x-1.whl" and route.digest == ("sha256", SHA)
    same_host = p.route(f"/-/files/index.test/{SHA}/pkgs/x-1.whl", environ("/"))
    assert same_host.url == "http://index.test/pkgs/x-1.whl"
    with pytest.raises(RouteError) as caught:
        p.route(f"/-/files/evil.test/{SHA}/x.whl", environ("/"))
    assert caught.value.status == 403
    sha512 = p.route(f"/-/files/files.test/sha512={'ab' * 64}/x-1.tar.gz", environ("/"))
    assert sha512.digest == ("sha512", "ab" * 64)
    metadata = p.route(f"/-/files/files.test/{SHA},core-sha256={OTHER}/x-1.whl.metadata", environ("/"))
    assert metadata.url == "https://files.test/x-1.whl.metadata" and metadata.digest == ("sha256", OTHER)
    for bad in ("/-/files/files.test/nothex/x.whl", "/-/files/files.test", "/elsewhere",
                f"/-/files/files.test/md5=00/x.whl", f"/-/files/files.test/{SHA}/x-1.whl.metadata"):
        with pytest.raises(RouteError):
            p.route(bad, environ(bad))


def test_pypi_default_files_host_for_pypi_org():
    assert "files.pythonhosted.org" in PyPIProtocol("https://pypi.org").allowed


def test_html_rewrite_routes_allowed_links_and_leaves_the_rest():
    md5 = "0123456789abcdef" * 2
    page = (f'<a href="https://files.test/packages/a-1.whl#sha256={SHA}" data-requires-python="&gt;=3.8" '
            f'data-core-metadata="sha256={OTHER}" data-dist-info-metadata="sha256={OTHER}">a-1.whl</a>\n'
            f'<a href="../../pkgs/b-1.tar.gz#sha256={OTHER}" data-yanked="broken">b</a>\n'
            f'<a href="https://elsewhere.test/c-1.whl#sha256={SHA}">c</a>\n'
            f'<a href="https://files.test/d-1.whl#md5={md5}" data-core-metadata="true">d</a>\n'
            f'<a href="https://files.test/e-1.whl#md5=0123">e</a>\n')
    body, ctype = pypi().rewrite_page(page.encode(), "text/html", "http://index.test/simple/a/")
    text = body.decode()
    assert ctype == "text/html"
    # PEP 658: the metadata digest rides in the link, so <link>.metadata is verified too
    assert (f'href="/-/files/files.test/{SHA},core-sha256={OTHER}/packages/a-1.whl#sha256={SHA}" '
            f'data-requires-python="&gt;=3.8" data-core-metadata="sha256={OTHER}"') in text
    assert f'href="/-/files/index.test/{OTHER}/pkgs/b-1.tar.gz#sha256={OTHER}" data-yanked="broken"' in text
    assert f"https://elsewhere.test/c-1.whl#sha256={SHA}" in text  # not allowed: untouched
    # any hashlib algorithm is verified; metadata without a digest cannot be, so its attribute goes
    assert f'<a href="/-/files/files.test/md5={md5}/d-1.whl#md5={md5}">d</a>' in text
    assert "https://files.test/e-1.whl#md5=0123" in text  # not a digest: untouched


def test_html_rewrite_under_a_mount_and_an_index_path():
    p = PyPIProtocol("http://devpi.test:3141/root/pypi/+simple/", mount="/pypi")
    assert p.route("/simple/a/", environ("/simple/a/")).url == "http://devpi.test:3141/root/pypi/+simple/a/"
    page = f'<a href="../../+f/ab/c/a-1.whl#sha256={SHA}">a</a>'
    body, _ = p.rewrite_page(page.encode(), "text/html", "http://devpi.test:3141/root/pypi/+simple/a/")
    assert f'href="/pypi/-/files/devpi.test%3A3141/{SHA}/root/pypi/+f/ab/c/a-1.whl#sha256={SHA}"' in body.decode()
    assert p.local_path("http://devpi.test:3141/root/pypi/+simple/b/") == "/pypi/simple/b/"


def test_pypi_answers_non_normalised_names_with_its_own_redirect():
    answer = pypi().route("/simple/Foo_Bar.baz/", environ("/simple/Foo_Bar.baz/"))
    assert isinstance(answer, LocalAnswer) and answer.status.startswith("301")
    assert ("Location", "/simple/foo-bar-baz/") in answer.headers
    assert isinstance(pypi().route("/simple/foo", environ("/simple/foo")), LocalAnswer)  # no slash


@pytest.mark.parametrize("accept, variant, others", [
    ("application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, text/html; q=0.01",
     "json", ("html",)),                                                             # pip
    ("application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01",
     "json", ("html",)),                                                             # uv
    ("text/html", "html", ()),
    (None, "html", ()),
    ("application/vnd.pypi.simple.v1+json", "json", ()),
])
def test_pypi_maps_accept_to_one_representation(accept, variant, others):
    env = environ("/simple/a/") if accept is None else environ("/simple/a/", accept=accept)
    route = pypi().route("/simple/a/", env)
    assert route.variant == variant and route.key == f"http://index.test/simple/a/ {variant}"
    assert tuple(r.variant for r in route.alternatives) == others


def test_json_rewrite_routes_files_by_their_digest_and_keeps_verifiable_metadata():
    doc = {"meta": {"api-version": "1.1"}, "name": "a", "files": [
        {"filename": "a-1.whl", "url": "https://files.test/packages/a-1.whl", "hashes": {"sha256": SHA},
         "core-metadata": {"sha256": OTHER}, "requires-python": ">=3.8", "yanked": "bad"},
        {"filename": "a-0.whl", "url": "https://elsewhere.test/a-0.whl", "hashes": {"sha256": OTHER}},
        {"filename": "a-2.whl", "url": "https://files.test/a-2.whl", "hashes": {}},
        {"filename": "a-3.whl", "url": "https://files.test/a-3.whl", "hashes": {"sha384": "ab" * 48},
         "core-metadata": True},
    ]}
    ctype = "application/vnd.pypi.simple.v1+json"
    body, out_type = pypi().rewrite_page(json.dumps(doc).encode(), ctype, "http://index.test/simple/a/")
    files = json.loads(body)["files"]
    assert out_type == ctype
    assert files[0]["url"] == f"/-/files/files.test/{SHA},core-sha256={OTHER}/packages/a-1.whl"
    assert files[0]["core-metadata"] == {"sha256": OTHER} and files[0]["yanked"] == "bad"
    assert files[1]["url"] == "https://elsewhere.test/a-0.whl"
    assert files[2]["url"] == "https://files.test/a-2.whl"
    assert files[3]["url"] == f"/-/files/files.test/sha384={'ab' * 48}/a-3.whl" and "core-metadata" not in files[3]


def test_json_rewrite_of_invalid_json_is_a_502_route_error():
    with pytest.raises(RouteError) as caught:
        pypi().rewrite_page(b"{not json", "application/vnd.pypi.simple.v1+json", "http://index.test/simple/a/")
    assert caught.value.status == 502
