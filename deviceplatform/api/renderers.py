"""The one JSON renderer: orjson, ~14x DRF's JSONRenderer on lists (shared/PERFORMANCE.md §5)."""

from __future__ import annotations

from typing import Any

import orjson
from rest_framework.renderers import BaseRenderer


def dumps(data: Any) -> bytes:
    return orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)


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
