"""The one JSON renderer: orjson, ~14x DRF's JSONRenderer on lists (shared/PERFORMANCE.md §5).

orjson refuses integers outside 64 bits and nesting deeper than 254 levels. The parser keeps both
out of new bodies (`deviceplatform.api.parsers`), but rows stored before it did, or written around
the API, must still read back: such a document is written by `_dumps_any` instead, slower and
without those limits, so a stored value can never turn a read into a 500."""

from __future__ import annotations

from typing import Any

import orjson
from rest_framework.renderers import BaseRenderer

_OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps(data: Any) -> bytes:
    try:
        return orjson.dumps(data, option=_OPTIONS)
    except orjson.JSONEncodeError:
        return _dumps_any(data)


def _dumps_any(data: Any) -> bytes:
    """`data` as JSON with integers of any size and any depth: an iterative walk that hands every
    scalar (and any type it does not know, such as a datetime) to orjson, so the text is what
    orjson would have written where it could."""
    parts: list[bytes] = []
    # A stack of things still to write: a value, or raw bytes (punctuation) written as they are.
    pending: list[Any] = [data]
    while pending:
        item = pending.pop()
        if isinstance(item, bytes):
            parts.append(item)
        elif isinstance(item, dict):
            if not item:
                parts.append(b"{}")
                continue
            parts.append(b"{")
            pending.append(b"}")
            for index, (key, value) in enumerate(reversed(item.items())):
                pending.append(value)
                pending.append(_key(key) + b":")
                if index < len(item) - 1:
                    pending.append(b",")
        elif isinstance(item, list | tuple):
            if not item:
                parts.append(b"[]")
                continue
            parts.append(b"[")
            pending.append(b"]")
            for index, value in enumerate(reversed(item)):
                pending.append(value)
                if index < len(item) - 1:
                    pending.append(b",")
        elif isinstance(item, int) and not isinstance(item, bool):
            parts.append(str(item).encode())  # any size, exactly
        else:
            parts.append(orjson.dumps(item, option=_OPTIONS))
    return b"".join(parts)


def _key(key: Any) -> bytes:
    if not isinstance(key, str):
        # As OPT_NON_STR_KEYS writes it (an int as "1", a datetime in ISO 8601, ...).
        key = next(iter(orjson.loads(orjson.dumps({key: None}, option=_OPTIONS))))
    return orjson.dumps(key)


class CumulocityJSONRenderer(BaseRenderer):
    media_type = "application/json"
    format = "json"
    charset = "UTF-8"

    def render(
        self,
        data: Any,
        accepted_media_type: str | None = None,
        renderer_context: dict[str, Any] | None = None,
    ) -> bytes:
        if data is None:
            return b""
        return dumps(data)
