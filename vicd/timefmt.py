"""Docker's time formats: RFC 3339 with nanoseconds, and relative/Unix times in queries."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

from vicd.errors import InvalidParameter

ZERO_TIME = "0001-01-01T00:00:00Z"


def rfc3339_now() -> str:
    return rfc3339(time.time_ns())


def rfc3339(ns: int) -> str:
    secs, frac = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{frac:09d}Z"


def parse_rfc3339(s: str) -> datetime:
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?$", s)
    if not m:
        raise ValueError(f"bad time {s!r}")
    dt = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")
    micro = int((m.group(2) or "0")[:6].ljust(6, "0"))
    tz = m.group(3) or "Z"
    dt = dt.replace(microsecond=micro, tzinfo=UTC)
    if tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        dt = dt.replace(tzinfo=None)
        from datetime import timedelta

        offset = timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])) * sign
        dt = (dt - offset).replace(tzinfo=UTC)
    return dt


def parse_api_time(value: str | None, default: float = 0.0) -> float:
    """A ``since``/``until`` query value: Unix seconds (with fraction) or RFC 3339."""
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return parse_rfc3339(value).timestamp()
    except ValueError:
        raise InvalidParameter(f"invalid time value {value!r}") from None


def created_seconds(rfc: str) -> int:
    return int(parse_rfc3339(rfc).timestamp())


def human_duration(seconds: float) -> str:
    """Go's units.HumanDuration, as ``docker ps`` shows it."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    m = s // 60
    if m == 1:
        return "About a minute"
    if m < 60:
        return f"{m} minutes"
    h = round(s / 3600)
    if h == 1:
        return "About an hour"
    if h < 48:
        return f"{h} hours"
    if h < 24 * 7 * 2:
        return f"{h // 24} days"
    if h < 24 * 30 * 2:
        return f"{h // 24 // 7} weeks"
    if h < 24 * 365 * 2:
        return f"{h // 24 // 30} months"
    return f"{h // 24 // 365} years"
