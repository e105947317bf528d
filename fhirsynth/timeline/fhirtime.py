"""FHIR date / dateTime / instant strings -> UTC datetimes with an honest precision.

"2019" -> 2019-01-01 (year), "2019-05" -> 2019-05-01 (month), "2019-05-17" -> day, a dateTime -> second.
A dateTime with an offset is converted to UTC; one without an offset (not allowed by FHIR, seen in the wild)
is read as UTC. Results are cached because Synthea-like data repeats each visit's timestamp across all of the
visit's resources, which makes parsing a visible cost on the hot path otherwise.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

UTC = timezone.utc
_CACHE_MAX = 50_000
_cache: dict[str, tuple[datetime, str] | None] = {}


def _parse(text: str) -> tuple[datetime, str] | None:
    n = len(text)
    try:
        if n > 10 and text[10] == "T":
            # fromisoformat (3.11) reads fractions, "Z" and +hh:mm offsets
            dt = datetime.fromisoformat(text)
            if dt.tzinfo is None:
                return dt.replace(tzinfo=UTC), "second"
            return dt.astimezone(UTC), "second"
        if n == 10 and text[4] == "-" and text[7] == "-":
            return datetime(int(text[:4]), int(text[5:7]), int(text[8:10]), tzinfo=UTC), "day"
        if n == 7 and text[4] == "-":
            return datetime(int(text[:4]), int(text[5:7]), 1, tzinfo=UTC), "month"
        if n == 4 and text.isdigit():
            return datetime(int(text), 1, 1, tzinfo=UTC), "year"
    except ValueError:
        return None
    return None


def parse_fhir_time(text: object) -> tuple[datetime, str] | None:
    """(UTC datetime, precision) or None when `text` is not a usable FHIR date/dateTime."""
    if not isinstance(text, str):
        return None
    hit = _cache.get(text, False)
    if hit is not False:
        return hit  # type: ignore[return-value]
    res = _parse(text)
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[text] = res
    return res


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_ORDINAL = _EPOCH.toordinal()
_US = timedelta(microseconds=1)
_us_cache: dict[str, tuple[int, str] | None] = {}


def _to_us(dt: datetime) -> int:
    """Exact integer microseconds since 1970-01-01 UTC (dt is aware and already in UTC)."""
    return (
        ((dt.toordinal() - _EPOCH_ORDINAL) * 86400 + dt.hour * 3600 + dt.minute * 60 + dt.second) * 1_000_000
        + dt.microsecond
    )


def parse_fhir_time_us(text: object) -> tuple[int, str] | None:
    """Like parse_fhir_time but microseconds since the Unix epoch (UTC): cheap to batch into Arrow."""
    if type(text) is not str:
        return None
    hit = _us_cache.get(text, False)
    if hit is not False:
        return hit  # type: ignore[return-value]
    out: tuple[int, str] | None
    if len(text) > 10 and text[10] == "T":
        # the common case, without the astimezone() round trip: aware datetime minus the epoch is exact
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            dt = None
        if dt is None:
            out = None
        else:
            out = ((dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)) - _EPOCH) // _US, "second"
    else:
        res = _parse(text)
        out = (_to_us(res[0]), res[1]) if res is not None else None
    if len(_us_cache) >= _CACHE_MAX:
        _us_cache.clear()
    _us_cache[text] = out
    return out


def parse_fhir_date(text: object) -> date | None:
    """A birthDate-like value as a date (partial dates take the first day of their period)."""
    res = parse_fhir_time(text)
    return res[0].date() if res else None
