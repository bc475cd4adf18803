"""Query-parameter readers: a bad value is a 422 (spec README §1 and §6), unknown ones are ignored."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from deviceplatform.api.dates import parse_datetime
from deviceplatform.api.exceptions import InvalidQuery

# IDs are bigints. A larger number is still a well-formed ID that names nothing, so it finds no
# row; keep it out of the SQL: PostgreSQL compares it as numeric, but SQLite's driver cannot even
# bind it (OverflowError). Django's own integer lookups (`pk=`, `pk__lt=`) already short-circuit;
# foreign keys and `__in` lists do not.
MAX_ID = 2**63 - 1


def get_bool(params: Mapping[str, str], name: str, default: bool = False) -> bool:
    value = params.get(name)
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    raise InvalidQuery(f"{name} must be true or false, not {value!r}")


def get_strict_bool(params: Mapping[str, str], name: str) -> bool:
    """An extension's boolean parameter (`cancelPending`): absent is false; otherwise exactly one
    `true` or `false`. An empty, differently spelt or repeated value is a 422: a cancel is not
    worth guessing at (Cumulocity's own parameters keep `get_bool`'s leniency)."""
    if name not in params:
        return False
    getlist = getattr(params, "getlist", None)  # a QueryDict keeps every repetition
    values = getlist(name) if getlist is not None else [params[name]]
    if len(values) != 1 or values[0] not in ("true", "false"):
        shown = ", ".join(repr(value) for value in values)
        raise InvalidQuery(f"{name} must be true or false (once), not {shown}")
    return values[0] == "true"


def get_int(params: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    value = params.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value.strip())
    except ValueError:
        raise InvalidQuery(f"{name} must be an integer, not {value!r}") from None
    if number < minimum:
        raise InvalidQuery(f"{name} must be at least {minimum}, not {number}")
    return number


def get_id(params: Mapping[str, str], name: str) -> int | None:
    """An ID parameter: digits only; absent or empty means no filter."""
    value = params.get(name)
    if value is None or value.strip() == "":
        return None
    return parse_id(value, field=name)


def parse_id(value: object, *, field: str = "id") -> int:
    """IDs are decimal strings on the wire; a JSON number is accepted too (spec README §3)."""
    if isinstance(value, bool):
        raise InvalidQuery(f"{field} must be an ID, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidQuery(f"{field} must be an ID, not {value!r}")
        return value
    if isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        return int(value.strip())
    raise InvalidQuery(f"{field} must be an ID, not {value!r}")


def parse_path_id(value: object, *, field: str = "id") -> int:
    """An ID in a URL path (or one already parsed): ASCII digits and nothing else. Unlike
    `parse_id` (query lists such as `ids=1, 2`, body values) no space is trimmed: `/%2042`
    names no resource, it is not 42."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    raise InvalidQuery(f"{field} must be an ID, not {value!r}")


def get_datetime(params: Mapping[str, str], name: str) -> datetime | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    return parse_datetime(value, field=name)
