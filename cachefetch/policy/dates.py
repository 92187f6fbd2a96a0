"""HTTP-date (RFC 9110 §5.6.7), parsed strictly.

werkzeug's ``parse_date`` accepts whatever ``email.utils`` does: two-digit
years in the IMF form, numeric zones, missing weekdays. A cache must read
anything that is not one of the three HTTP-date forms, in GMT, as invalid
(and an invalid ``Expires`` as already expired, RFC 9111 §5.3).
"""
from __future__ import annotations

import calendar
import re
import time

__all__ = ["parse_http_date", "format_http_date"]

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_LONG_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_TIME = r"(\d\d):(\d\d):(\d\d)"
_IMF = re.compile(rf"({'|'.join(_DAYS)}), (\d\d) ({'|'.join(_MONTHS)}) (\d{{4}}) {_TIME} GMT")
_RFC850 = re.compile(rf"({'|'.join(_LONG_DAYS)}), (\d\d)-({'|'.join(_MONTHS)})-(\d\d) {_TIME} GMT")
_ASCTIME = re.compile(rf"({'|'.join(_DAYS)}) ({'|'.join(_MONTHS)}) ([ \d]\d) {_TIME} (\d{{4}})")


def parse_http_date(value: str | None, now: float | None = None) -> float | None:
    """Epoch seconds of an HTTP-date, or ``None`` if ``value`` is not one.

    The obsolete RFC 850 form's two-digit year is read as the most recent
    year with those digits that is not more than 50 years ahead of ``now``.
    """
    if value is None:
        return None
    value = value.strip(" \t")
    if m := _IMF.fullmatch(value):
        _, day, mon, year, hh, mm, ss = m.groups()
    elif m := _RFC850.fullmatch(value):
        _, day, mon, yy, hh, mm, ss = m.groups()
        this_year = time.gmtime(time.time() if now is None else now).tm_year
        candidate = this_year - this_year % 100 + int(yy)
        year = str(candidate - 100 if candidate > this_year + 50 else candidate)
    elif m := _ASCTIME.fullmatch(value):
        _, mon, day, hh, mm, ss, year = m.groups()
    else:
        return None
    fields = (int(year), _MONTHS.index(mon) + 1, int(day.strip()), int(hh), int(mm), int(ss))
    if not (1 <= fields[2] <= 31 and fields[3] < 24 and fields[4] < 60 and fields[5] < 61):
        return None
    if fields[2] > calendar.monthrange(fields[0], fields[1])[1]:
        return None
    return float(calendar.timegm(fields + (0, 0, 0)))


def format_http_date(when: float) -> str:
    """``when`` (epoch seconds) as an IMF-fixdate."""
    t = time.gmtime(when)
    return f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} " \
           f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
