"""Limits on device-credentials polls (README "Device onboarding"): per device id and per client.

Every device shares the bootstrap login, so the login itself limits nothing: what a poller could
abuse is the id. Each poll counts against its id (`DEVICE_CREDENTIALS_POLLS_PER_ID`: generous
enough for c8y-api's `await_credentials`, which polls once a second), and each miss (an id with no
request, a wrong or missing security token) against the client's address
(`DEVICE_CREDENTIALS_MISSES_PER_ADDRESS`), so guessing ids or tokens is slow. Over either limit a
poll is refused with 429 and `Retry-After` until the window, counted from the first poll or miss,
ends. The counters are those of the failed-login limiter (`deviceplatform.api.auth_throttle`):
Redis when REDIS_URL is set, this process's memory otherwise; a Redis outage lets polls through
(logged) rather than stopping every device's onboarding."""

from __future__ import annotations

import logging
import math

from django.conf import settings
from rest_framework import exceptions

from deviceplatform.api.auth_throttle import Counter, get_counters

logger = logging.getLogger(__name__)


class TooManyPolls(exceptions.Throttled):
    """429: too many polls for this device id, or too many misses from this address."""

    def __init__(self, wait: float) -> None:
        super().__init__(wait=max(1, math.ceil(wait)))
        self.detail = (
            f"Too many device credential requests; try again in {self.wait} second"
            f"{'' if self.wait == 1 else 's'}"
        )


def _poll_counter(device_id: str) -> list[Counter]:
    limit = settings.DEVICE_CREDENTIALS_POLLS_PER_ID
    return [(f"credpoll:id:{device_id.lower()}", limit)] if limit > 0 else []


def _miss_counter(client: str | None) -> list[Counter]:
    limit = settings.DEVICE_CREDENTIALS_MISSES_PER_ADDRESS
    return [(f"credpoll:miss:{client}", limit)] if client and limit > 0 else []


def poll_admit(device_id: str, client: str | None) -> None:
    """Refuse the poll (TooManyPolls) when its id or its address used up its allowance; count it
    against the id otherwise."""
    polls = _poll_counter(device_id)
    counters = polls + _miss_counter(client)
    if not counters:
        return
    window = settings.DEVICE_CREDENTIALS_WINDOW_SECONDS
    try:
        wait = get_counters().wait(counters)
        if wait <= 0 and polls:
            get_counters().record(polls, window)
    except Exception:
        logger.warning("device-credentials poll limiter unavailable; the poll goes ahead")
        return
    if wait > 0:
        raise TooManyPolls(wait)


def poll_missed(client: str | None) -> None:
    """Count a miss (no request for the id, or a wrong security token) against the address."""
    misses = _miss_counter(client)
    if not misses:
        return
    try:
        get_counters().record(misses, settings.DEVICE_CREDENTIALS_WINDOW_SECONDS)
    except Exception:
        logger.warning("device-credentials poll limiter unavailable; a miss was not counted")
