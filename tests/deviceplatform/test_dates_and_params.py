"""Date-times (spec README §4) and query-parameter readers (README §1, §5, §6): unit tests, no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from deviceplatform.api.dates import format_datetime, parse_datetime
from deviceplatform.api.exceptions import InvalidQuery, ValidationFailed
from deviceplatform.api.params import get_bool, get_datetime, get_id, get_int, parse_id

# --- format_datetime ------------------------------------------------------------------------------


def test_format_is_utc_with_milliseconds_and_z() -> None:
    value = datetime(2024, 5, 14, 10, 18, 33, 477999, tzinfo=UTC)

    assert format_datetime(value) == "2024-05-14T10:18:33.477Z"


def test_format_converts_an_offset_to_utc() -> None:
    value = datetime(2024, 5, 14, 0, 30, 0, 5000, tzinfo=timezone(timedelta(hours=2)))

    assert format_datetime(value) == "2024-05-13T22:30:00.005Z"


def test_format_pads_whole_seconds_with_three_zeros() -> None:
    assert format_datetime(datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2024-01-02T03:04:05.000Z"


def test_format_then_parse_round_trips_to_the_millisecond() -> None:
    value = datetime(2023, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)

    assert parse_datetime(format_datetime(value)) == value


# --- parse_datetime -------------------------------------------------------------------------------

INSTANT = datetime(2024, 5, 14, 10, 18, 33, 477000, tzinfo=UTC)


@pytest.mark.parametrize(
    "text",
    [
        "2024-05-14T10:18:33.477Z",
        "2024-05-14T10:18:33.477z",
        "2024-05-14T12:18:33.477+02:00",
        "2024-05-14T12:18:33.477+0200",
        "2024-05-14T12:18:33.477 02:00",  # `+` decoded to a space in a query string
        "2024-05-14T12:18:33.477 0200",
        "2024-05-14T07:18:33.477-03:00",
        "2024-05-14T07:18:33.477-0300",
        "2024-05-14T10:18:33.477",  # no offset: UTC
        "2024-05-14T10:18:33.477+00:00",
        "2024-05-14 10:18:33.477Z",  # space instead of T
        "2024-05-14T10:18:33,477Z",  # ISO 8601 allows a decimal comma
        "  2024-05-14T10:18:33.477Z  ",
    ],
)
def test_parse_accepts_every_offset_form(text: str) -> None:
    parsed = parse_datetime(text)

    assert parsed == INSTANT
    assert parsed.tzinfo is not None


@pytest.mark.parametrize(
    ("fraction", "microseconds"),
    [
        ("4", 400000),
        ("47", 470000),
        ("477", 477000),
        ("4771", 477100),
        ("47712", 477120),
        ("477123", 477123),
        ("4771234", 477123),
        ("47712345", 477123),
        ("477123456", 477123),
    ],
)
def test_parse_accepts_one_to_nine_fraction_digits(fraction: str, microseconds: int) -> None:
    parsed = parse_datetime(f"2024-05-14T10:18:33.{fraction}Z")

    assert parsed == datetime(2024, 5, 14, 10, 18, 33, microseconds, tzinfo=UTC)


def test_parse_without_fraction_or_without_seconds() -> None:
    assert parse_datetime("2024-05-14T10:18:33Z") == datetime(2024, 5, 14, 10, 18, 33, tzinfo=UTC)
    assert parse_datetime("2024-05-14T10:18+01:00") == datetime(2024, 5, 14, 9, 18, tzinfo=UTC)


def test_parse_without_offset_is_utc_not_the_server_zone(settings: Any) -> None:
    settings.TIME_ZONE = "Europe/Berlin"

    parsed = parse_datetime("2024-05-14T10:18:33")

    assert parsed.utcoffset() == timedelta(0)
    assert parsed == datetime(2024, 5, 14, 10, 18, 33, tzinfo=UTC)


def test_parse_plain_date_is_midnight_utc() -> None:
    parsed = parse_datetime("2024-05-14")

    assert parsed == datetime(2024, 5, 14, 0, 0, tzinfo=UTC)
    assert parsed.utcoffset() == timedelta(0)


def test_parse_keeps_the_offset_as_an_aware_instant() -> None:
    parsed = parse_datetime("2024-05-14T23:30:00-05:00")

    assert parsed == datetime(2024, 5, 15, 4, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "yesterday",
        "2024-05-14T",
        "2024-13-01",
        "2024-02-30T10:00:00Z",
        "2024-05-14T25:00:00Z",
        "2024-05-14T10:61:00Z",
        "2024-05-14T10:18:33.1234567890Z",  # ten fraction digits
        "2024-05-14T10:18:33.Z",
        "2024-05-14T10:18:33+2",
        "2024-05-14T10:18:33+25:00",
        "2024-05-14T10:18:33Zjunk",
        "14.05.2024",
        "1715681913",
        "2024-5-14",
    ],
)
def test_parse_rejects_anything_else_with_a_validation_error(text: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_datetime(text, field="dateFrom")

    assert caught.value.status_code == 422
    assert "dateFrom" in caught.value.message


@pytest.mark.parametrize("value", [None, 1715681913, 12.5, ["2024-05-14"]])
def test_parse_rejects_non_strings(value: object) -> None:
    with pytest.raises(ValidationFailed):
        parse_datetime(value)  # type: ignore[arg-type]


# --- params ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("True", True),
        ("tRuE", True),
        (" true ", True),
        ("false", False),
        ("FALSE", False),
        ("False", False),
    ],
)
def test_get_bool_is_case_insensitive(value: str, expected: bool) -> None:
    assert get_bool({"flag": value}, "flag") is expected
    assert get_bool({"flag": value}, "flag", default=not expected) is expected


def test_get_bool_missing_or_empty_is_the_default() -> None:
    assert get_bool({}, "flag") is False
    assert get_bool({}, "flag", True) is True
    assert get_bool({"flag": ""}, "flag", True) is True
    assert get_bool({"other": "true"}, "flag") is False


@pytest.mark.parametrize("value", ["yes", "no", "1", "0", "t", "f", "on", "maybe", "truee", "null"])
def test_get_bool_rejects_anything_else_with_422(value: str) -> None:
    with pytest.raises(InvalidQuery) as caught:
        get_bool({"withTotalPages": value}, "withTotalPages")

    assert caught.value.status_code == 422
    assert caught.value.error == "undefined/validationError"
    assert "withTotalPages" in caught.value.message


@pytest.mark.parametrize(("value", "expected"), [("1", 1), ("5", 5), (" 7 ", 7), ("2000", 2000)])
def test_get_int_parses_integers(value: str, expected: int) -> None:
    assert get_int({"pageSize": value}, "pageSize", 5) == expected


def test_get_int_missing_or_empty_is_the_default() -> None:
    assert get_int({}, "pageSize", 5) == 5
    assert get_int({"pageSize": ""}, "pageSize", 5) == 5


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "x", "1e3", "0x10", "five"])
def test_get_int_rejects_non_integers_and_values_below_the_minimum(value: str) -> None:
    with pytest.raises(InvalidQuery) as caught:
        get_int({"pageSize": value}, "pageSize", 5)

    assert caught.value.status_code == 422
    assert "pageSize" in caught.value.message


def test_get_int_honours_a_lower_minimum() -> None:
    assert get_int({"n": "0"}, "n", 3, minimum=0) == 0
    with pytest.raises(InvalidQuery):
        get_int({"n": "-1"}, "n", 3, minimum=0)


@pytest.mark.parametrize(("value", "expected"), [("42", 42), (" 42 ", 42), (42, 42), ("0", 0)])
def test_parse_id_accepts_digit_strings_and_json_numbers(value: object, expected: int) -> None:
    assert parse_id(value) == expected


@pytest.mark.parametrize(
    "value", ["abc", "-1", "1.5", "", "4 2", "４２", True, False, -1, 1.5, None]
)
def test_parse_id_rejects_everything_else(value: object) -> None:
    with pytest.raises(InvalidQuery):
        parse_id(value, field="deviceId")


def test_get_id_missing_or_blank_means_no_filter() -> None:
    assert get_id({}, "deviceId") is None
    assert get_id({"deviceId": ""}, "deviceId") is None
    assert get_id({"deviceId": "  "}, "deviceId") is None
    assert get_id({"deviceId": "17"}, "deviceId") == 17
    with pytest.raises(InvalidQuery):
        get_id({"deviceId": "x"}, "deviceId")


def test_get_datetime() -> None:
    assert get_datetime({}, "dateFrom") is None
    assert get_datetime({"dateFrom": ""}, "dateFrom") is None
    assert get_datetime({"dateFrom": "2024-05-14T12:00:00 02:00"}, "dateFrom") == datetime(
        2024, 5, 14, 10, 0, tzinfo=UTC
    )
    with pytest.raises(ValidationFailed) as caught:
        get_datetime({"dateFrom": "soon"}, "dateFrom")
    assert caught.value.status_code == 422
