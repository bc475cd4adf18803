"""The one JSON parser: plain and vendor JSON bodies; invalid JSON is a 400 (spec README §2). And
the multipart parser of the one view that takes a file upload (`CsvUploadParser`).

A body is also checked, once, for what could be stored but not written back: every JSON document a
client sends may end up in a jsonb column and in every later read of it (a list page, a parent's
`childDevices`, an agent's poll, a realtime event), so a value the renderer cannot write would
turn one accepted request into a 500 for everyone who reads it afterwards (`check_json_document`)."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import orjson
from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import BaseParser, MultiPartParser

from deviceplatform.api.exceptions import PayloadTooLarge, ValidationFailed

# Objects and arrays nest at most this deep in a body, the body's own object being level 1. The
# renderer (orjson) writes 254 levels; responses and realtime messages wrap a stored document in a
# few more (a page, a reference, an event); SQLite's JSON functions read 1,000 and Python's json
# module (Django's JSONField) about 1,000.
MAX_JSON_DEPTH = 100
# The numbers orjson writes. PostgreSQL's jsonb keeps a number as a decimal, and reads a float
# such as 1e20 back as the integer 100000000000000000000, which no 64-bit type holds: a body number
# outside this range (an integer or not) is refused rather than stored.
MIN_JSON_NUMBER = -(2**63)
MAX_JSON_NUMBER = 2**64 - 1

# Cheap tests on the raw bytes spare the walk for nearly every body (a few microseconds; a regex
# took 10): a NUL can only arrive escaped; nesting deeper than the limit needs more opening
# brackets than the limit; a number outside the range needs 19 digits in a row or an exponent.
# They run on a copy in which every digit reads 0, `E` reads `e` and `[` reads `{`.
_FOLD = bytes.maketrans(b"123456789E[", b"000000000e{")
_NINETEEN_DIGITS = b"0" * 19


class CumulocityJSONParser(BaseParser):
    media_type = "application/json"

    def parse(
        self,
        stream: Any,
        media_type: str | None = None,
        parser_context: dict[str, Any] | None = None,
    ) -> Any:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        raw = stream.read(limit + 1) if stream is not None else b""
        if len(raw) > limit:  # a chunked body has no Content-Length for the middleware to check
            raise PayloadTooLarge()
        if not raw.strip():
            return None
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ParseError(f"Could not parse the request body as JSON: {exc}") from exc
        folded = raw.translate(_FOLD)
        if (
            b"\\u0000" in folded
            or folded.count(b"{") > MAX_JSON_DEPTH
            or _NINETEEN_DIGITS in folded
            or b"0e" in folded
        ):
            check_json_document(data)
        return data


def json_document_problem(data: Any) -> str | None:
    """Why `data` (a parsed JSON document) cannot be stored, or None. Checks every string and key
    for NUL (PostgreSQL's jsonb and text refuse it), the nesting depth (MAX_JSON_DEPTH) and the
    range of every number (MIN_JSON_NUMBER .. MAX_JSON_NUMBER, finite)."""
    if not _unstorable(data):
        return None
    # Walked again, now keeping the path to name the place: only for a refused document. A path
    # is a linked (parent, step) pair, spelled out for the message.
    pending: list[tuple[Any, int, Any]] = [(data, 1, None)]
    while pending:
        value, depth, path = pending.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return f"{_spell(path)}: strings may not contain the NUL character \\u0000"
        elif isinstance(value, dict):
            if depth > MAX_JSON_DEPTH:
                return _too_deep(path)
            for key, item in value.items():
                if isinstance(key, str) and "\x00" in key:
                    return f"{_spell(path)}: names may not contain the NUL character \\u0000"
                pending.append((item, depth + 1, (path, key)))
        elif isinstance(value, list):
            if depth > MAX_JSON_DEPTH:
                return _too_deep(path)
            pending.extend((item, depth + 1, (path, index)) for index, item in enumerate(value))
        elif (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and not _storable_number(value)
        ):
            return (
                f"{_spell(path)}: the number {value} is outside the range this server "
                f"stores ({MIN_JSON_NUMBER} to {MAX_JSON_NUMBER})"
            )
    return None


def _unstorable(data: Any) -> bool:
    """The walk of json_document_problem without paths, about twice as fast (a 576 kB body of
    60,000 values: 32 ms). Iterative: a document may nest deeper than Python's recursion limit.
    Exact types: parsed JSON holds no subclasses, and a bool is no number here."""
    pending: list[tuple[Any, int]] = [(data, 1)]
    push, pop = pending.append, pending.pop
    while pending:
        value, depth = pop()
        kind = type(value)
        if kind is str:
            if "\x00" in value:
                return True
        elif kind is dict:
            if depth > MAX_JSON_DEPTH:
                return True
            for key, item in value.items():
                if isinstance(key, str) and "\x00" in key:
                    return True
                push((item, depth + 1))
        elif kind is list:
            if depth > MAX_JSON_DEPTH:
                return True
            pending.extend([(item, depth + 1) for item in value])
        elif (kind is int or kind is float) and not _storable_number(value):
            return True
    return False


def _storable_number(value: int | float) -> bool:
    if isinstance(value, int):
        return MIN_JSON_NUMBER <= value <= MAX_JSON_NUMBER
    if not math.isfinite(value):
        return False
    if abs(value) < 2**62:
        return True
    # What is stored is the decimal the float is written as (Django's json.dumps writes repr), not
    # the float's exact value: -9.223372036854776e+18 is below -2**63 although the float is -2**63.
    return MIN_JSON_NUMBER <= Decimal(repr(value)) <= MAX_JSON_NUMBER


def check_json_document(data: Any) -> None:
    """422 (ValidationFailed) with the reason when `data` cannot be stored; see json_document_problem."""
    problem = json_document_problem(data)
    if problem is not None:
        raise ValidationFailed(f"Invalid data: {problem}")


def _too_deep(path: Any) -> str:
    return f"{_spell(path)}: objects and arrays may nest at most {MAX_JSON_DEPTH} levels deep"


def _spell(path: Any) -> str:
    """`c8y_A.b[2]` for the linked path; `the body` for the document itself."""
    steps: list[Any] = []
    while path is not None:
        path, step = path
        steps.append(step)
    text = ""
    for step in reversed(steps):
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else str(step))
    if len(text) > 200:
        text = text[:100] + "..." + text[-100:]
    return text or "the body"


class CsvUploadParser(MultiPartParser):
    """`multipart/form-data`, for `POST /devicecontrol/bulkNewDeviceRequests` alone: a view lists
    it in `parser_classes` to take uploads, and the content negotiation hands multipart bodies to
    no other view (415). The body limit (MAX_REQUEST_BODY_BYTES) applies as to every body; a
    malformed multipart body is a 400."""
