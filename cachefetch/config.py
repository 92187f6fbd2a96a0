"""The ``--config cachefetch.toml`` file: several upstreams served by one proxy.

::

    [[route]]
    prefix = "/pypi/"
    protocol = "pypi"
    upstream = "https://pypi.org"
    index_ttl = 600                      # optional, per protocol

    [[route]]
    prefix = "/"                         # oci routes must be at / (clients ask for /v2/)
    protocol = "oci"
    upstream = "https://registry-1.docker.io"

Every route shares the one store. Read with the standard library's ``tomllib``.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RouteConfig", "load_config", "parse_config"]

_PROTOCOLS = ("generic", "pypi", "npm", "oci")
#: Options a route may set, with the type each must have.
_OPTIONS: dict[str, tuple[type, ...]] = {
    "index_ttl": (int, float), "tag_ttl": (int, float), "packument_ttl": (int, float),
    "files_upstreams": (list,),
}


@dataclass(frozen=True)
class RouteConfig:
    """One ``[[route]]``: requests under ``prefix`` go to ``upstream`` by ``protocol``.

    :param prefix: ``/`` or ``/name/`` (leading and trailing slash).
    :param options: protocol options (``index_ttl``, ``tag_ttl``,
        ``packument_ttl``, ``files_upstreams``).
    """

    prefix: str
    protocol: str
    upstream: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_config(text: str, source: str = "config") -> list[RouteConfig]:
    """The routes of a TOML document.

    :raises ValueError: naming the route and the field for anything wrong:
        not TOML, no routes, a missing or unknown field, a bad prefix or
        protocol, two routes with one prefix.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(doc) - {"route"}
    if unknown:
        raise ValueError(f"{source}: unknown top-level keys {sorted(unknown)} (expected [[route]] tables)")
    tables = doc.get("route")
    if not isinstance(tables, list) or not tables:
        raise ValueError(f"{source}: no [[route]] tables")
    routes: list[RouteConfig] = []
    for n, table in enumerate(tables, 1):
        where = f"{source}: route {n}"
        missing = [k for k in ("prefix", "protocol", "upstream") if not isinstance(table.get(k), str)]
        if missing:
            raise ValueError(f"{where}: {', '.join(missing)} missing or not a string")
        prefix, protocol = table["prefix"], table["protocol"]
        if not prefix.startswith("/") or not prefix.endswith("/") or "//" in prefix or " " in prefix:
            raise ValueError(f"{where}: prefix must be '/' or '/name/', got {prefix!r}")
        if protocol not in _PROTOCOLS:
            raise ValueError(f"{where}: protocol must be one of {', '.join(_PROTOCOLS)}, got {protocol!r}")
        options = {k: v for k, v in table.items() if k not in ("prefix", "protocol", "upstream")}
        for key, value in options.items():
            if key not in _OPTIONS:
                raise ValueError(f"{where}: unknown option {key!r} (known: {', '.join(sorted(_OPTIONS))})")
            if isinstance(value, bool) or not isinstance(value, _OPTIONS[key]):
                raise ValueError(f"{where}: {key} has the wrong type ({type(value).__name__})")
        if any(r.prefix == prefix for r in routes):
            raise ValueError(f"{where}: prefix {prefix!r} is used by an earlier route")
        routes.append(RouteConfig(prefix, protocol, table["upstream"], options))
    return routes


def load_config(path: str | os.PathLike[str]) -> list[RouteConfig]:
    """The routes of the TOML file at ``path``.

    :raises ValueError: as :func:`parse_config`; :raises OSError: if unreadable.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8") from None
    return parse_config(text, str(path))
