"""Limits on failed authentications, per username and per client address (README "Failed logins").

A password check costs hundreds of milliseconds of CPU by design (PBKDF2), and anyone can ask for
one: without a limit, a stream of wrong passwords is a cheap way to burn the server's CPU. Each
failed check counts against the username and the client address it came from; once either has
reached its limit within the window, further attempts are refused without checking the password
(`TooManyFailures`: 429 on REST, a failed handshake with advice on Bayeux) until the window ends.
Credentials this process has already verified against the stored hash are still accepted (the
check is a keyed digest, no hash): a device whose username is under attack keeps working.

The counters are fixed windows that start at the first failure: Redis keys with an expiry when
REDIS_URL is set (shared by every server process), a dictionary in this process otherwise. A Redis
outage never locks anyone out: the limiter then lets the check happen (and logs)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from rest_framework import exceptions

from deviceplatform import metrics

logger = logging.getLogger(__name__)

# (key, limit): a counter and the number of failures it may hold within the window
Counter = tuple[str, int]


class TooManyFailures(exceptions.Throttled):
    """Too many failed authentications for this username or client address: refused unchecked."""

    default_detail = "Too many failed authentications"

    def __init__(self, wait: float) -> None:
        super().__init__(wait=max(1, math.ceil(wait)))
        self.detail = (
            f"Too many failed authentications; try again in {self.wait} second"
            f"{'' if self.wait == 1 else 's'}"
        )


class MemoryCounters:
    """Failure counters in this process (no REDIS_URL: one server process)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000):
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()  # key -> count, end
        self._lock = threading.Lock()
        self._clock = clock
        self._max_keys = max_keys

    def wait(self, counters: Sequence[Counter]) -> float:
        now = self._clock()
        longest = 0.0
        with self._lock:
            for key, limit in counters:
                count, end = self._entries.get(key, (0, now))
                if end > now and count >= limit:
                    longest = max(longest, end - now)
        return longest

    def record(
        self, counters: Sequence[Counter], window: float, amounts: Sequence[int] = ()
    ) -> None:
        """Add 1 to each counter (or its entry in `amounts`)."""
        with self._lock:
            self._add(counters, window, amounts, self._clock())

    def reserve(self, counters: Sequence[Counter], window: float, amounts: Sequence[int]) -> float:
        """`record` at once unless a counter is used up: 0.0 when recorded, else the wait."""
        now = self._clock()
        with self._lock:
            longest = 0.0
            for key, limit in counters:
                count, end = self._entries.get(key, (0, now))
                if end > now and count >= limit:
                    longest = max(longest, end - now)
            if longest == 0.0:
                self._add(counters, window, amounts, now)
            return longest

    def refund(self, counters: Sequence[Counter], amounts: Sequence[int]) -> None:
        """Take back a reservation (the windows it started, if any, stay)."""
        now = self._clock()
        with self._lock:
            for (key, _), amount in zip(counters, amounts, strict=True):
                count, end = self._entries.get(key, (0, now))
                if end > now:
                    self._entries[key] = (max(0, count - amount), end)

    def _add(
        self, counters: Sequence[Counter], window: float, amounts: Sequence[int], now: float
    ) -> None:
        for index, (key, _) in enumerate(counters):
            count, end = self._entries.get(key, (0, now))
            if end <= now:
                count, end = 0, now + window
            self._entries[key] = (count + (amounts[index] if amounts else 1), end)
            self._entries.move_to_end(key)
        if len(self._entries) > self._max_keys:
            for key in [k for k, (_, end) in self._entries.items() if end <= now]:
                del self._entries[key]
            while len(self._entries) > self._max_keys:  # a flood of distinct keys
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class RedisCounters:
    """Failure counters in Redis, shared by every process (REDIS_URL). Short socket timeouts: an
    unreachable Redis must not stall logins (the limiter then fails open)."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self._client = redis.Redis.from_url(
            url, socket_timeout=0.5, socket_connect_timeout=0.5, health_check_interval=30
        )
        self._prefix = f"{prefix}:"

    def wait(self, counters: Sequence[Counter]) -> float:
        pipe = self._client.pipeline(transaction=False)
        for key, _ in counters:
            pipe.get(self._prefix + key)
            pipe.pttl(self._prefix + key)
        replies = pipe.execute()
        longest = 0.0
        for (_, limit), count, ttl in zip(counters, replies[::2], replies[1::2], strict=True):
            if count is not None and int(count) >= limit and ttl > 0:
                longest = max(longest, ttl / 1000)
        return longest

    def record(
        self, counters: Sequence[Counter], window: float, amounts: Sequence[int] = ()
    ) -> None:
        """Add 1 to each counter (or its entry in `amounts`)."""
        pipe = self._client.pipeline(transaction=True)
        for index, (key, _) in enumerate(counters):
            # The window starts with the first failure: SET NX gives the key its expiry once.
            pipe.set(self._prefix + key, 0, px=max(1, int(window * 1000)), nx=True)
            pipe.incrby(self._prefix + key, amounts[index] if amounts else 1)
        pipe.execute()

    def reserve(self, counters: Sequence[Counter], window: float, amounts: Sequence[int]) -> float:
        """`record` at once unless a counter is used up: 0.0 when recorded, else the wait. One
        script, so that concurrent attempts cannot all pass the check before any is counted."""
        keys = [self._prefix + key for key, _ in counters]
        limits = [limit for _, limit in counters]
        wait_ms = self._client.register_script(RESERVE_SCRIPT)(
            keys=keys, args=[max(1, int(window * 1000)), *limits, *amounts]
        )
        return int(wait_ms) / 1000

    def refund(self, counters: Sequence[Counter], amounts: Sequence[int]) -> None:
        """Take back a reservation from the counters that still exist."""
        keys = [self._prefix + key for key, _ in counters]
        self._client.register_script(REFUND_SCRIPT)(keys=keys, args=list(amounts))

    def clear(self) -> None:
        keys = list(self._client.scan_iter(match=f"{self._prefix}*", count=1000))
        if keys:
            self._client.delete(*keys)


# KEYS: the counters; ARGV: window (ms), then each counter's limit, then each one's amount.
RESERVE_SCRIPT = """
local n = #KEYS
local longest = 0
for i = 1, n do
  local count = tonumber(redis.call('GET', KEYS[i]) or '0')
  if count >= tonumber(ARGV[1 + i]) then
    local ttl = redis.call('PTTL', KEYS[i])
    if ttl > longest then longest = ttl end
  end
end
if longest > 0 then return longest end
for i = 1, n do
  redis.call('SET', KEYS[i], 0, 'PX', ARGV[1], 'NX')
  redis.call('INCRBY', KEYS[i], ARGV[1 + n + i])
end
return 0
"""
# KEYS: the counters; ARGV: each one's amount. A counter that expired meanwhile stays gone.
REFUND_SCRIPT = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('DECRBY', KEYS[i], ARGV[i]) end
end
return 0
"""

Counters = MemoryCounters | RedisCounters


@cache
def _counters(redis_url: str, prefix: str) -> Counters:
    return RedisCounters(redis_url, prefix) if redis_url else MemoryCounters()


def get_counters() -> Counters:
    """The counters the settings name: Redis when REDIS_URL is set, else this process's memory."""
    return _counters(settings.REDIS_URL, settings.AUTH_FAILURE_PREFIX)


def _reset(setting: str, **_: object) -> None:
    if setting in {"REDIS_URL", "AUTH_FAILURE_PREFIX"}:
        _counters.cache_clear()


setting_changed.connect(_reset)


def _counters_for(username: str, client: str | None) -> list[Counter]:
    counters: list[Counter] = []
    if settings.AUTH_FAILURES_PER_USER > 0:
        counters.append((f"u:{username.lower()}", settings.AUTH_FAILURES_PER_USER))
    if client and settings.AUTH_FAILURES_PER_ADDRESS > 0:
        counters.append((f"a:{client}", settings.AUTH_FAILURES_PER_ADDRESS))
    return counters


def check_allowed(username: str, client: str | None) -> None:
    """Raise TooManyFailures when this username or address has used up its failures."""
    counters = _counters_for(username, client)
    if not counters:
        return
    try:
        wait = get_counters().wait(counters)
    except Exception:
        logger.warning("failed-login limiter unavailable; checking the password anyway")
        return
    if wait > 0:
        metrics.auth_failed("throttled")
        raise TooManyFailures(wait)


def _amounts(counters: Sequence[Counter], slow: bool) -> list[int]:
    weight = max(1, settings.AUTH_SLOW_FAILURE_WEIGHT) if slow else 1
    return [weight if key.startswith("a:") else 1 for key, _ in counters]


def reserve_slow_check(username: str, client: str | None) -> None:
    """Count a slow check (PBKDF2) as a failure before it runs, atomically with the test of the
    limits: raises TooManyFailures when the username or address is used up, so concurrent
    attempts cannot run more slow checks than the limits allow. `refund_slow_check` takes it
    back when the password was right."""
    counters = _counters_for(username, client)
    if not counters:
        return
    try:
        wait = get_counters().reserve(
            counters, settings.AUTH_FAILURE_WINDOW_SECONDS, _amounts(counters, slow=True)
        )
    except Exception:
        logger.warning("failed-login limiter unavailable; checking the password anyway")
        return
    if wait > 0:
        metrics.auth_failed("throttled")
        raise TooManyFailures(wait)


def refund_slow_check(username: str, client: str | None) -> None:
    counters = _counters_for(username, client)
    if not counters:
        return
    try:
        get_counters().refund(counters, _amounts(counters, slow=True))
    except Exception:
        logger.warning("failed-login limiter unavailable; a right password stays counted")


def record_failure(username: str, client: str | None, *, slow: bool = False) -> None:
    """Count a failed login against the username (1) and the client address: 1, or
    AUTH_SLOW_FAILURE_WEIGHT when a slow hash (PBKDF2) was checked, so that one address can make
    the server run only a few slow checks a window, however many usernames it tries."""
    counters = _counters_for(username, client)
    if not counters:
        return
    amounts = _amounts(counters, slow)
    try:
        get_counters().record(counters, settings.AUTH_FAILURE_WINDOW_SECONDS, amounts)
    except Exception:
        logger.warning("failed-login limiter unavailable; a failed login was not counted")


def client_address(meta: dict[str, Any]) -> str | None:
    """The client's address for the per-address limit: REMOTE_ADDR, or behind a trusted proxy
    (USE_X_FORWARDED_FOR) the last address of X-Forwarded-For, the one our proxy appended (the
    ones before it are whatever the client claimed)."""
    if settings.USE_X_FORWARDED_FOR:
        forwarded = meta.get("HTTP_X_FORWARDED_FOR", "")
        last = forwarded.rpartition(",")[2].strip()
        if last:
            return last
    else:
        _warn_if_proxied(meta)
    return meta.get("REMOTE_ADDR") or None


_proxy_warned = threading.Event()


def _warn_if_proxied(meta: dict[str, Any]) -> None:
    """Once per process: a request forwarded by a proxy on a private or loopback address while
    USE_X_FORWARDED_FOR is off means every client behind that proxy shares its address, and so one
    per-address failure count: 30 wrong passwords from anyone would hold back everyone's new
    logins for a window. Not fixed here by trusting the header (a client could then pick its own
    address and escape the limit): the operator is told which setting says the proxy is trusted."""
    if _proxy_warned.is_set() or not meta.get("HTTP_X_FORWARDED_FOR"):
        return
    import ipaddress

    try:
        remote = ipaddress.ip_address(meta.get("REMOTE_ADDR") or "")
    except ValueError:
        return
    if not (remote.is_private or remote.is_loopback):
        return  # a client on the internet sending the header itself, not a proxy of ours
    _proxy_warned.set()
    logger.warning(
        "Requests arrive through a proxy at %s (X-Forwarded-For) but USE_X_FORWARDED_FOR is off: "
        "the failed-login limit per address counts that proxy's address for all its clients. "
        "Set USE_X_FORWARDED_FOR=true when this proxy is yours and appends the client's address "
        '(README "Failed logins"). Said once per process.',
        remote,
    )
