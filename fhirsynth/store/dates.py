"""FHIR date/dateTime/instant values as half-open UTC ranges [lo, hi) in epoch seconds.

A partial date is a range, not a point: "2019" covers the whole year, "2019-05" the month. Search semantics
(eq, lt, sa, ...) compare such ranges, so both stored values and search values are turned into (lo, hi).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

# Stand-ins for open period ends; SQLite REAL compares them like numbers.
NEG_INF = -1e18
POS_INF = 1e18

_DATE_RE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,9}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


class DateFormatError(ValueError):
    """A value is not a FHIR date, dateTime or instant."""


def _add_months(dt: datetime, months: int) -> datetime:
    y, m = divmod(dt.month - 1 + months, 12)
    return dt.replace(year=dt.year + y, month=m + 1)


def date_range(value: str) -> tuple[float, float]:
    """(lo, hi) for a FHIR date/dateTime/instant; hi is exclusive and reflects the value's precision.

    Values without a timezone are taken as UTC (the FHIR spec leaves it to the server; UTC keeps it reproducible).
    """
    m = _DATE_RE.match(value.strip())
    if not m:
        raise DateFormatError(f"not a FHIR date/dateTime: {value!r}")
    g = m.groupdict()
    try:
        tz = timezone.utc
        if g["tz"] and g["tz"] != "Z":
            sign = 1 if g["tz"][0] == "+" else -1
            hh, mm = int(g["tz"][1:3]), int(g["tz"][4:6])
            tz = timezone(sign * timedelta(hours=hh, minutes=mm))
        start = datetime(
            int(g["y"]), int(g["m"] or 1), int(g["d"] or 1),
            int(g["H"] or 0), int(g["M"] or 0), int(g["S"] or 0), tzinfo=tz,
        )
        if g["f"]:
            frac = g["f"]
            start = start.replace(microsecond=int(frac[:6].ljust(6, "0")))
    except ValueError as exc:  # e.g. month 13, Feb 30
        raise DateFormatError(f"not a valid date: {value!r} ({exc})") from None
    lo = start.timestamp()
    if g["m"] is None:
        hi = start.replace(year=start.year + 1).timestamp()
    elif g["d"] is None:
        hi = _add_months(start, 1).timestamp()
    elif g["H"] is None:
        hi = lo + 86400.0
    elif g["S"] is None:
        hi = lo + 60.0
    elif g["f"]:
        hi = lo + 10.0 ** -min(len(g["f"]), 6)
    else:
        hi = lo + 1.0
    return lo, hi


def period_range(period: dict) -> tuple[float, float] | None:
    """(lo, hi) for a FHIR Period; an open end is unbounded."""
    start, end = period.get("start"), period.get("end")
    if not start and not end:
        return None
    lo = date_range(start)[0] if start else NEG_INF
    hi = date_range(end)[1] if end else POS_INF
    return lo, hi


def parse_instant(value: str) -> float:
    """Epoch seconds for an instant-like value (used for _since); precision below a second is kept."""
    return date_range(value)[0]


def format_instant(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
