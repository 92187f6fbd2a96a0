"""`cachefetch serve --config cachefetch.toml`: several upstreams, one store."""
from __future__ import annotations

import pytest

from harness import cachefetch_serve, fetch, run_cli
from origin import Origin, Resource

from cachefetch.config import parse_config


def test_routes_parse_with_their_options():
    routes = parse_config('[[route]]\nprefix = "/pypi/"\nprotocol = "pypi"\nupstream = "https://pypi.org"\n'
                          'index_ttl = 60\n[[route]]\nprefix = "/"\nprotocol = "generic"\nupstream = "http://o.test"\n')
    assert [(r.prefix, r.protocol, r.options) for r in routes] == [("/pypi/", "pypi", {"index_ttl": 60}),
                                                                    ("/", "generic", {})]


@pytest.mark.parametrize("text, message", [
    ("not toml [", "not valid TOML"),
    ("", r"no \[\[route\]\] tables"),
    ('[[route]]\nprefix = "/a/"\nprotocol = "pypi"\n', "upstream missing"),
    ('[[route]]\nprefix = "a"\nprotocol = "pypi"\nupstream = "http://x"\n', "prefix must be"),
    ('[[route]]\nprefix = "/a/"\nprotocol = "ftp"\nupstream = "http://x"\n', "protocol must be one of"),
    ('[[route]]\nprefix = "/a/"\nprotocol = "pypi"\nupstream = "http://x"\nttl = 1\n', "unknown option 'ttl'"),
    ('[[route]]\nprefix = "/a/"\nprotocol = "pypi"\nupstream = "http://x"\nindex_ttl = "x"\n', "wrong type"),
    ('[[route]]\nprefix = "/a/"\nprotocol = "pypi"\nupstream = "http://x"\n' * 2, "used by an earlier route"),
])
def test_bad_config_is_a_value_error_naming_the_route(text, message):
    with pytest.raises(ValueError, match=message):
        parse_config(text, "cachefetch.toml")


def test_bad_config_file_is_a_one_line_error(tmp_path):
    config = tmp_path / "cachefetch.toml"
    config.write_text('[[route]]\nprefix = "/a/"\nprotocol = "npm"\nupstream = "ftp://x"\n')
    result = run_cli("serve", "--config", str(config), "--store", str(tmp_path / "store"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "upstream URL" in result.stderr
    both = run_cli("serve", "--config", str(config), "--upstream", "http://x", "--store", str(tmp_path / "store"))
    assert both.returncode == 2 and "one of them" in both.stderr


def test_two_upstreams_under_two_prefixes_share_one_store(tmp_path):
    with Origin() as index, Origin() as files:
        index.files["/simple/a/"] = Resource(f'<a href="{files.url}/a-1.whl#sha256={"0" * 64}">a</a>'.encode(),
                                             content_type="text/html")
        files.files["/same.bin"] = Resource(b"generic bytes")
        config = tmp_path / "cachefetch.toml"
        config.write_text(f'[[route]]\nprefix = "/pypi/"\nprotocol = "pypi"\nupstream = "{index.url}"\n'
                          f'files_upstreams = ["{files.url}"]\n'
                          f'[[route]]\nprefix = "/"\nprotocol = "generic"\nupstream = "{files.url}"\n')
        with cachefetch_serve(tmp_path, "--config", str(config), "--store", str(tmp_path / "store")) as server:
            page = fetch(server.port, "/pypi/simple/a/", headers={"Accept": "text/html"})
            assert page.status == 200
            netloc = files.url.split("//")[1].replace(":", "%3A")
            assert f'href="/pypi/-/files/{netloc}/{"0" * 64}/a-1.whl#sha256={"0" * 64}"'.encode() in page.body
            assert fetch(server.port, "/same.bin").body == b"generic bytes"
            moved = fetch(server.port, "/pypi/simple/A/")
            assert moved.status == 301 and moved.headers["Location"] == "/pypi/simple/a/"
