"""Cache directives, parsed strictly (RFC 9111 §5.2, RFC 9213).

werkzeug's parser is too lenient for a shared cache: it matches directive
names case-sensitively (``No-Cache`` is not ``no-cache``), keeps whatever
follows ``max-age=`` and has no notion of conflicting duplicates. Here names
are case-insensitive, ``delta-seconds`` is digits only (overflow saturates at
2**31, RFC 9111 §1.2.2), and a directive repeated with different arguments is
recorded as a conflict, which freshness reads as "stale" (§4.2.1).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

__all__ = ["Directives", "parse_cache_control", "parse_targeted", "DELTA_MAX", "ANY_STALENESS"]

#: RFC 9111 §1.2.2: a delta-seconds too large to represent is read as this.
DELTA_MAX = 2147483648
#: ``max-stale`` with no argument: any staleness is acceptable.
ANY_STALENESS = DELTA_MAX

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DIRECTIVE = re.compile(
    r"\s*(?P<name>[!#$%&'*+\-.^_`|~0-9A-Za-z]+)\s*(?:=\s*(?:(?P<token>[!#$%&'*+\-.^_`|~0-9A-Za-z]+)"
    r"|\"(?P<quoted>(?:[^\"\\]|\\.)*)\"))?\s*(?:,|$)")
_DIGITS = re.compile(r"[0-9]+")
_FIELD_LIST = re.compile(r"\s*,\s*")


@dataclass(frozen=True)
class Directives:
    """One message's cache directives: each name (lower case) with its
    argument (``None`` when it has none), first occurrence kept.

    :param conflicts: names that appeared again with a different argument.
    :param malformed: whether some part of the field could not be parsed
        (the parsable directives are still kept).
    """

    values: Mapping[str, str | None] = field(default_factory=dict)
    conflicts: frozenset[str] = frozenset()
    malformed: bool = False

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def argument(self, name: str) -> str | None:
        """The directive's argument, ``None`` when absent or given without one."""
        return self.values.get(name)

    def seconds(self, name: str) -> int | None:
        """A ``delta-seconds`` argument: ``None`` if the directive is absent;
        0 if its argument is missing, invalid or conflicting (a cache must then
        treat the response as stale, RFC 9111 §4.2.1); saturated at
        :data:`DELTA_MAX`."""
        if name not in self.values:
            return None
        value = self.values[name]
        if name in self.conflicts or value is None or not _DIGITS.fullmatch(value):
            return 0
        return min(int(value), DELTA_MAX)

    def fields(self, name: str) -> tuple[str, ...]:
        """The field names a qualified ``no-cache``/``private`` lists (lower case), or ()."""
        value = self.values.get(name)
        if not value:
            return ()
        return tuple(n.lower() for n in _FIELD_LIST.split(value.strip()) if _TOKEN.fullmatch(n))

    # Response directives -------------------------------------------------
    @property
    def no_store(self) -> bool:
        return "no-store" in self.values

    @property
    def no_cache(self) -> bool:
        """Unqualified ``no-cache``: reuse only after validation."""
        return "no-cache" in self.values and not self.fields("no-cache")

    @property
    def private(self) -> bool:
        """Unqualified ``private``: a shared cache must not store it."""
        return "private" in self.values and not self.fields("private")

    @property
    def public(self) -> bool:
        return "public" in self.values

    @property
    def must_revalidate(self) -> bool:
        return "must-revalidate" in self.values

    @property
    def proxy_revalidate(self) -> bool:
        return "proxy-revalidate" in self.values

    @property
    def must_understand(self) -> bool:
        return "must-understand" in self.values

    @property
    def max_age(self) -> int | None:
        return self.seconds("max-age")

    @property
    def s_maxage(self) -> int | None:
        return self.seconds("s-maxage")

    @property
    def stale_while_revalidate(self) -> int | None:
        return self.seconds("stale-while-revalidate")

    @property
    def stale_if_error(self) -> int | None:
        return self.seconds("stale-if-error")

    # Request directives --------------------------------------------------
    @property
    def max_stale(self) -> int | None:
        """``max-stale``: seconds of staleness accepted; :data:`ANY_STALENESS` without an argument."""
        if "max-stale" not in self.values:
            return None
        if self.values["max-stale"] is None:
            return ANY_STALENESS
        return self.seconds("max-stale")

    @property
    def min_fresh(self) -> int | None:
        return self.seconds("min-fresh")

    @property
    def only_if_cached(self) -> bool:
        return "only-if-cached" in self.values


def parse_cache_control(values: str | Iterable[str] | None) -> Directives:
    """Parse one or more ``Cache-Control`` field values (several field lines
    are one list, RFC 9110 §5.3). Never raises: what cannot be parsed is
    skipped and flagged ``malformed``."""
    if values is None:
        return Directives()
    text = values if isinstance(values, str) else ",".join(values)
    found: dict[str, str | None] = {}
    conflicts: set[str] = set()
    malformed = False
    pos = 0
    while pos < len(text):
        if text[pos] in " \t,":
            pos += 1
            continue
        m = _DIRECTIVE.match(text, pos)
        if m is None:  # skip to the next comma outside quotes
            malformed = True
            pos = _next_comma(text, pos)
            continue
        name = m.group("name").lower()
        arg = m.group("token")
        if arg is None and m.group("quoted") is not None:
            arg = re.sub(r"\\(.)", r"\1", m.group("quoted"))
        if name in found:
            if found[name] != arg:
                conflicts.add(name)
        else:
            found[name] = arg
        pos = m.end()
    return Directives(found, frozenset(conflicts), malformed)


def _next_comma(text: str, pos: int) -> int:
    quoted = False
    while pos < len(text):
        c = text[pos]
        if c == '"':
            quoted = not quoted
        elif c == "\\" and quoted:
            pos += 1
        elif c == "," and not quoted:
            return pos + 1
        pos += 1
    return pos


# RFC 8941 Dictionary members: key[=bare-item](;params)*. Only the item types
# cache directives use are read; anything else makes the field invalid.
_SF_KEY = r"[a-z*][a-z0-9_\-.*]*"
_SF_ITEM = r"(?:\?[01]|-?[0-9]{1,15}(?:\.[0-9]{1,3})?|\"(?:[^\"\\]|\\[\"\\])*\"|[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*)"
_SF_MEMBER = re.compile(rf"(?P<key>{_SF_KEY})(?:=(?P<item>{_SF_ITEM}))?(?:;\s*{_SF_KEY}(?:={_SF_ITEM})?)*")


def parse_targeted(value: str | None) -> Directives | None:
    """Parse a targeted cache-control field such as ``CDN-Cache-Control``
    (a Structured Fields Dictionary, RFC 9213 §2.1): ``None`` when it is
    absent, empty or invalid — the cache then falls back to Cache-Control."""
    if value is None or not value.strip():
        return None
    found: dict[str, str | None] = {}
    conflicts: set[str] = set()
    for member in _split_sf(value):
        m = _SF_MEMBER.fullmatch(member)
        if m is None:
            return None
        key, item = m.group("key"), m.group("item")
        if item is None or item == "?1":
            arg: str | None = None
        elif item == "?0":
            continue  # a false boolean: the directive is not set
        elif item.startswith('"'):
            arg = re.sub(r"\\(.)", r"\1", item[1:-1])
        else:
            arg = item
        if key in found and found[key] != arg:
            conflicts.add(key)  # SF says the last wins; we are stricter, as for Cache-Control
        found[key] = arg
    return Directives(found, frozenset(conflicts)) if found else None


def _split_sf(value: str) -> list[str]:
    members, current, quoted, i = [], [], False, 0
    while i < len(value):
        c = value[i]
        if c == '"':
            quoted = not quoted
        elif c == "\\" and quoted and i + 1 < len(value):
            current.append(c)
            i += 1
            c = value[i]
        elif c == "," and not quoted:
            members.append("".join(current).strip(" \t"))
            current = []
            i += 1
            continue
        current.append(c)
        i += 1
    members.append("".join(current).strip(" \t"))
    return members
