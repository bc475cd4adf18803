"""ISO 8601 date-times as Cumulocity writes and reads them (spec README §4)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time

from deviceplatform.api.exceptions import ValidationFailed

_DATETIME = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[T ](?P<time>\d{2}:\d{2}(?::\d{2}(?:[.,]\d{1,9})?)?)"
    r"\s*(?P<tz>Z|z|[+\- ]\d{2}(?::?\d{2})?)?)?$"
)


def format_datetime(value: datetime) -> str:
    """`2024-05-14T10:18:33.477Z`: UTC, milliseconds, `Z`."""
    value = value.astimezone(UTC)
    # Not strftime: its %Y writes the year 1 as "1" on Linux, not "0001".
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:"
        f"{value.minute:02d}:{value.second:02d}.{value.microsecond // 1000:03d}Z"
    )


def parse_datetime(value: str, *, field: str = "date") -> datetime:
    """Any ISO 8601 date-time; no offset means UTC; a plain date means its midnight UTC; a `+` that
    arrived as a space in a query string is read as `+`. Anything else, and an instant outside
    years 1-9999 once in UTC, is a 422."""
    match = _DATETIME.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValidationFailed(f"Invalid value for {field}: {value!r} is not an ISO 8601 date-time")
    try:
        day = date.fromisoformat(match["date"])
        if match["time"] is None:
            return datetime.combine(day, time(0, 0), tzinfo=UTC)
        clock = match["time"].replace(",", ".")
        if "." in clock:
            main, fraction = clock.split(".")
            clock = f"{main}.{fraction[:6].ljust(6, '0')}"
        tz = match["tz"] or "Z"
        if tz in ("Z", "z"):
            offset = "+00:00"
        else:
            sign = "-" if tz[0] == "-" else "+"
            digits = tz[1:].replace(":", "")
            offset = f"{sign}{digits[:2]}:{digits[2:4] or '00'}"
        parsed = datetime.fromisoformat(f"{day.isoformat()}T{clock}{offset}")
    except ValueError as exc:
        raise ValidationFailed(f"Invalid value for {field}: {value!r} ({exc})") from exc
    try:
        # Stored and written in UTC: an instant outside years 1-9999 there (0001-01-01T00:00+01:00
        # is in year 0) has no Python datetime, so a stored one could never be read back.
        parsed.astimezone(UTC)
    except OverflowError:
        raise ValidationFailed(
            f"Invalid value for {field}: {value!r} is outside the years 1 to 9999 in UTC"
        ) from None
    return parsed
