"""Publishing realtime events: the one entry point for every app (realtime.md §5).

Apps build `RealtimeEvent`s after their transaction commits and call `publish` (synchronous; one
store round trip per batch). URLs inside event data are written as `BASE_URL + path`; each session
sees them with the scheme and host it connected to (`absolute`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from deviceplatform.api.renderers import dumps
from deviceplatform.realtime.hub import get_store
from deviceplatform.realtime.subscriptions import subscriptions_matching

logger = logging.getLogger(__name__)

BASE_URL = "\x00base"  # stands for the subscriber's base URL in event data
_BASE_URL_JSON = b'"\\u0000base'  # how orjson writes a string that starts with it


@dataclass(frozen=True)
class RealtimeEvent:
    channel: str  # a concrete Bayeux channel: /operations/4712, /4711, /managedobjects/4712
    data: Any


def publish(events: Sequence[RealtimeEvent]) -> None:
    """Queue `events` for every session subscribed to their channels and wake those sessions.
    A realtime outage is logged, never raised: the change it reports is already committed."""
    if not events:
        return
    prepared = [
        (
            dumps({"channel": event.channel, "data": event.data}),
            subscriptions_matching(event.channel),
        )
        for event in events
    ]
    try:
        get_store().publish(prepared)
    except Exception:
        logger.exception("could not publish %d realtime event(s)", len(prepared))


def absolute(payload: bytes, base: bytes) -> bytes:
    """`payload` with its base URL marks replaced by `base` (e.g. b'"https://host')."""
    return payload.replace(_BASE_URL_JSON, base) if _BASE_URL_JSON in payload else payload
