"""Subscription rights at delivery: checked again, cheaply (issue 10: a subscription granted by
ownership kept delivering after the device changed owner).

Re-running the channel rule for every delivery costs a thread hand-off and a query or two; at a
thousand subscribers that multiplied the delivery latency. So each process remembers the verdicts
per (session, subscription), taken at the subscribe or at a delivery, and trusts them while

- the *ownership epoch* is unchanged: a counter in Redis (this process's memory without
  REDIS_URL) that every change of a managed object's owner increments after its commit
  (`ownership_changed`, called by the inventory service), so the next delivery anywhere checks
  the rule again and a subscription held by the old owner ends at once; and
- it is younger than `REALTIME_RIGHTS_CACHE_SECONDS`, which bounds how long a role taken away, a
  disabled user or a renamed one keeps a subscription it no longer may hold.

A delivery then costs one Redis GET (the epoch) when its verdicts are known.

Credentials revoked or rotated (`credentials_changed`, called by the user services after commit)
do not wait for a delivery: the user's sessions are removed from the store at once, in every
process (their held connects are woken and refused, their queues dropped), and the epoch moves
first, so a handshake that checked the old credentials just before is caught too
(`protocol.Exchange._handshake`)."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings

from deviceplatform.realtime.store import MemoryStore

logger = logging.getLogger(__name__)

_local_epoch = 0  # the epoch of the in-process store (no REDIS_URL: one server process)
_local_lock = threading.Lock()


def _epoch_key() -> str:
    return f"{settings.REALTIME_PREFIX}:owner-epoch"


def _advance_epoch(store: Any) -> None:
    """Void every process's verdicts (raises when Redis is unreachable)."""
    global _local_epoch
    if isinstance(store, MemoryStore):
        with _local_lock:
            _local_epoch += 1
        return
    store._sync.incr(_epoch_key())


def ownership_changed() -> None:
    """A managed object changed owner (committed): every process re-checks rights at its next
    delivery. Synchronous, for `transaction.on_commit`; a Redis outage is logged, never raised."""
    from deviceplatform.realtime.hub import get_store

    try:
        _advance_epoch(get_store())
    except Exception:
        logger.warning(
            "realtime: could not record an owner change; subscriptions of the old owner end "
            "within REALTIME_RIGHTS_CACHE_SECONDS instead of at once",
            exc_info=True,
        )


def credentials_changed(user_id: int) -> None:
    """A user was disabled or deleted, or got a new password (committed): end its realtime
    sessions now, in every process. Each held connect is answered at once and every later
    message of those sessions gets `401::Authentication invalid` (advice: handshake again, which
    the old credentials no longer pass). Synchronous, for `transaction.on_commit`; a Redis outage
    is logged, never raised (a disabled user's subscriptions then end at their next delivery
    within REALTIME_RIGHTS_CACHE_SECONDS, and its sessions when they time out)."""
    from deviceplatform.realtime.hub import get_store
    from deviceplatform.realtime.subscriptions import Family

    store = get_store()
    try:
        _advance_epoch(store)  # first: a handshake racing this one sees the epoch move
        ended = store.end_user_sessions(str(user_id), [str(family) for family in Family])
    except Exception:
        logger.warning(
            "realtime: could not end the sessions of user %s; they lose their subscriptions "
            "within REALTIME_RIGHTS_CACHE_SECONDS instead of at once",
            user_id,
            exc_info=True,
        )
        return
    if ended:
        logger.info("realtime: user %s: %d session(s) ended (credentials)", user_id, len(ended))


async def current_epoch(store: Any) -> int:
    """The ownership epoch (raises when Redis is unreachable: the caller answers an outage)."""
    if isinstance(store, MemoryStore):
        return _local_epoch
    client, _ = store._client()
    value = await client.get(_epoch_key())
    return int(value) if value is not None else 0


class RightsCache:
    """(session, subscription) -> (epoch, checked at, allowed), for this process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_entries: int = 100_000):
        self._entries: dict[tuple[str, str], tuple[int, float, bool]] = {}
        self._refreshing: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._clock = clock
        self._max_entries = max_entries

    def get(self, cid: str, subscription: str, epoch: int) -> bool | None:
        """The verdict, or None when unknown, from another epoch or too old."""
        with self._lock:
            entry = self._entries.get((cid, subscription))
        if entry is None or entry[0] != epoch:
            return None
        if self._clock() - entry[1] >= settings.REALTIME_RIGHTS_CACHE_SECONDS:
            return None
        return entry[2]

    def due(self, cid: str, subscription: str, epoch: int) -> bool:
        """Whether a verdict still trusted (get() answers it) is in the last quarter of its life:
        the delivery that asks checks it again in the background (protocol: refresh ahead), so
        that a session with events every few seconds never waits for a check on its delivery
        path. Claims the refresh: True once per verdict until put() replaces it."""
        lifetime = settings.REALTIME_RIGHTS_CACHE_SECONDS
        with self._lock:
            key = (cid, subscription)
            entry = self._entries.get(key)
            if entry is None or entry[0] != epoch or key in self._refreshing:
                return False
            if self._clock() - entry[1] < 0.75 * lifetime:
                return False
            self._refreshing.add(key)
            return True

    def refreshed(self, cid: str, subscription: str) -> None:
        """A background check ended (with or without a verdict): the next due() may claim it."""
        with self._lock:
            self._refreshing.discard((cid, subscription))

    def put(self, cid: str, subscription: str, epoch: int, allowed: bool) -> None:
        lifetime = settings.REALTIME_RIGHTS_CACHE_SECONDS
        if lifetime <= 0:
            return
        # Verdicts taken together (a thousand clients subscribing within seconds, after a restart)
        # would all go stale in the same second, and the deliveries then queue behind a thousand
        # checks (p99 0.15-1 s after the REST answer in bench/realtime.py). So each verdict lives
        # between half and all of REALTIME_RIGHTS_CACHE_SECONDS: never longer, spread out.
        aged = random.uniform(0.0, 0.5) * lifetime  # noqa: S311 (spreading, not a secret)
        with self._lock:
            if len(self._entries) >= self._max_entries:
                self._entries.clear()  # sessions come and go; dropping verdicts only costs checks
            self._entries[(cid, subscription)] = (epoch, self._clock() - aged, allowed)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._refreshing.clear()


rights_cache = RightsCache()
