"""The one JSON parser: plain and vendor JSON bodies; invalid JSON is a 400 (spec README §2)."""

from __future__ import annotations

from typing import Any

import orjson
from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import BaseParser

from deviceplatform.api.exceptions import PayloadTooLarge, ValidationFailed


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
        # PostgreSQL can store no NUL character (jsonb and text refuse it: a 500 otherwise). JSON
        # can only carry one escaped, so the cheap byte test spares the walk for every other body.
        if b"\\u0000" in raw and _contains_nul(data):
            raise ValidationFailed(
                "Invalid data: strings may not contain the NUL character \\u0000"
            )
        return data


def _contains_nul(data: Any) -> bool:
    pending = [data]  # iterative: orjson allows deeper nesting than Python's recursion limit
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return True
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return False
