"""Live bulk operations: each visible change of a bulk operation, published on the realtime channels
`/bulkoperations/{id}` and `/bulkoperations/*` (issue 14 item 8).

**The one entry point is `bulk_changed(bulk_id)`.** Call it from any write that may change what
GET answers for a bulk operation (status, progress, schedule, fragments, rollout state, ...),
inside the write's transaction or outside one: it acts once the transaction commits (at once
outside one) and never for a rolled-back one. `bulk_changed(bulk_id, created=True)` after the
create. It never raises and never waits for the database or Redis: a status change of a bulk
child (the hot path) only marks the bulk operation dirty in this process's memory.

What subscribers get, on both channels, is Cumulocity's notification shape:
`{"realtimeAction": "CREATE" | "UPDATE", "data": <the bulk operation as GET returns it, exact
progress included>}`. A cancelled bulk operation is still a resource (status DELETED,
generalStatus CANCELED), so its cancel is an UPDATE. Reading the channels needs
ROLE_BULK_OPERATION_READ (or ROLE_BULK_OPERATION_ADMIN, which implies it).

**Throttled, last state always delivered.** A background thread per process publishes marked bulk
operations: it reads the bulk operation *after* taking a per-bulk gate (Redis `SET NX PX`, shared
by every process; this process's memory without REDIS_URL) that lasts `BULK_LIVE_INTERVAL_MS`, so
at most one message per interval goes out per bulk operation whichever processes see its changes
(web servers, Celery workers, the embedded scheduler). A change marked while another process holds
the gate is published when the gate expires (trailing edge), unless a later holder took the gate
meanwhile: that holder read after the change and covered it. So after a burst the last message
equals GET. A message identical to the last one published for that bulk operation (a fold that
only moved counters from deltas into the row, a PUT that changed nothing) is not sent.

A Celery worker stopping gracefully publishes what it still holds back (`Throttle.flush`, from
bulkops.tasks). Limits: a process killed between a change and its trailing publish loses that
publish (the next change of the bulk operation brings the truth again); two publishes of one bulk operation
from two processes are ordered only by the gate, so one that took longer than the interval could
arrive after a newer one."""

from __future__ import annotations

import hashlib
import heapq
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import Any, Literal

from django.conf import settings
from django.db import connections, transaction

from bulkops.selectors import bulk_operations_with_progress
from bulkops.serializers import bulk_operation_json
from deviceplatform.api.permissions import has_any_role
from deviceplatform.api.renderers import dumps
from deviceplatform.realtime.events import BASE_URL, RealtimeEvent, publish
from deviceplatform.realtime.subscriptions import Family, register
from deviceplatform.roles import Role

logger = logging.getLogger(__name__)

Action = Literal["CREATE", "UPDATE"]
# How long the digest of the last published state of a bulk operation is kept (its dedupe).
LAST_TTL_SECONDS = 24 * 3600


def bulk_channel(bulk_id: int) -> str:
    return f"/bulkoperations/{bulk_id}"


# --- the entry point ---------------------------------------------------------------------------


def bulk_changed(bulk_id: int, *, created: bool = False) -> None:
    """Publish bulk operation `bulk_id` as it is after the current transaction commits (at once
    outside a transaction; nothing if it rolls back). `created`: the bulk operation is new; its
    CREATE is published in the committing thread, unthrottled. Any other change only marks it
    for the background publisher (throttled per bulk operation, last state always delivered)."""
    if created:
        transaction.on_commit(partial(_publish_created, bulk_id))
    else:
        transaction.on_commit(partial(_mark, bulk_id))


def _mark(bulk_id: int) -> None:
    try:
        throttle().mark(bulk_id)
    except Exception:  # the change is committed: never fail its request
        logger.exception("bulk live: could not mark bulk operation %s", bulk_id)


def _publish_created(bulk_id: int) -> None:
    try:
        gate = gate_for_settings()
        gate.hold(bulk_id, settings.BULK_LIVE_INTERVAL_MS)  # the ramp's first batch trails it
        publish_state(bulk_id, gate, "CREATE")
    except Exception:
        logger.exception("bulk live: could not publish the creation of bulk operation %s", bulk_id)


# --- one publish -------------------------------------------------------------------------------


def bulk_event(bulk_id: int, action: Action) -> dict[str, Any] | None:
    """The notification for `bulk_id` as it is now (committed): GET's body as `data`, with the
    subscriber's own base URL in `self`; None when there is no such bulk operation."""
    bulk = bulk_operations_with_progress().filter(pk=bulk_id).first()
    if bulk is None:
        return None
    data = bulk_operation_json(bulk, base="")
    data["self"] = BASE_URL + data["self"]
    return {"realtimeAction": action, "data": data}


def publish_state(bulk_id: int, gate: Gate, action: Action = "UPDATE") -> bool:
    """Read and publish the bulk operation's state now; False when nothing went out (no such
    bulk operation, or an UPDATE identical to the last message about it)."""
    payload = bulk_event(bulk_id, action)
    if payload is None:
        return False
    digest = hashlib.blake2b(dumps(payload["data"]), digest_size=16).hexdigest()
    if gate.swap_last(bulk_id, digest) == digest and action == "UPDATE":
        return False
    publish([RealtimeEvent(bulk_channel(bulk_id), payload)])
    return True


# --- the gate: one publish per interval per bulk operation, across processes --------------------


class Gate:
    """What the throttle needs shared between processes: a per-bulk gate that one taker holds for
    an interval, and the digest of the last published state."""

    def take(self, bulk_id: int, token: str, ms: int) -> tuple[bool, str, int]:
        """(True, token, ms) when taken for `ms`; else (False, the holder's token, ms left)."""
        raise NotImplementedError

    def hold(self, bulk_id: int, ms: int) -> None:
        """Take the gate whoever holds it (a CREATE goes out at once)."""
        self.take(bulk_id, secrets.token_hex(8), ms)

    def swap_last(self, bulk_id: int, digest: str) -> str | None:
        """Record `digest` as the last published state; the one recorded before."""
        raise NotImplementedError


class MemoryGate(Gate):
    """This process's memory: the embedded layout (no REDIS_URL, one server process)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[int, tuple[str, float]] = {}
        self._last: dict[int, str] = {}

    def take(self, bulk_id: int, token: str, ms: int) -> tuple[bool, str, int]:
        now = self._clock()
        with self._lock:
            holder = self._held.get(bulk_id)
            if holder is not None and holder[1] > now:
                return False, holder[0], max(1, round((holder[1] - now) * 1000))
            if len(self._held) > 10_000:  # expired gates only cost memory
                self._held = {k: v for k, v in self._held.items() if v[1] > now}
            self._held[bulk_id] = (token, now + ms / 1000)
            return True, token, ms

    def hold(self, bulk_id: int, ms: int) -> None:
        with self._lock:
            self._held[bulk_id] = (secrets.token_hex(8), self._clock() + ms / 1000)

    def swap_last(self, bulk_id: int, digest: str) -> str | None:
        with self._lock:
            if len(self._last) > 100_000:
                self._last.clear()
            previous, self._last[bulk_id] = self._last.get(bulk_id), digest
            return previous


# KEYS[1] the gate; ARGV[1] token, ARGV[2] ms. {1} when taken, else {0, holder token, ms left}.
_TAKE_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, ARGV[1], 0} end
return {0, redis.call('GET', KEYS[1]) or '', redis.call('PTTL', KEYS[1])}
"""


class RedisGate(Gate):
    """Redis, under REALTIME_PREFIX: every process of a deployment shares the gates."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self._client = redis.Redis.from_url(url)
        self._take = self._client.register_script(_TAKE_LUA)
        self._prefix = f"{prefix}:bulk-live"

    def take(self, bulk_id: int, token: str, ms: int) -> tuple[bool, str, int]:
        taken, holder, left = self._take(keys=[f"{self._prefix}:{bulk_id}:gate"], args=[token, ms])
        holder = holder.decode() if isinstance(holder, bytes) else str(holder)
        return bool(taken), holder, max(int(left), 1) if not taken else ms

    def hold(self, bulk_id: int, ms: int) -> None:
        self._client.set(f"{self._prefix}:{bulk_id}:gate", secrets.token_hex(8), px=max(ms, 1))

    def swap_last(self, bulk_id: int, digest: str) -> str | None:
        previous = self._client.set(
            f"{self._prefix}:{bulk_id}:last", digest, ex=LAST_TTL_SECONDS, get=True
        )
        return previous.decode() if isinstance(previous, bytes) else previous


@cache
def _gate(redis_url: str, prefix: str) -> Gate:
    return RedisGate(redis_url, prefix) if redis_url else MemoryGate()


def gate_for_settings() -> Gate:
    return _gate(settings.REDIS_URL, settings.REALTIME_PREFIX)


# --- the throttle: marks in, at most one publish per interval per bulk operation out -------------


@dataclass
class _Entry:
    due: float
    token: str | None = None  # the gate's holder at our last failed attempt
    again: bool = False  # marked since the last attempt began


class Throttle:
    """Marked bulk operations, published from one background thread per process.

    `step()` makes one pass over the entries that are due and returns when the next one is due;
    the thread just loops on it, and tests call it with a clock of their own instead."""

    def __init__(
        self,
        *,
        gate: Callable[[], Gate] = gate_for_settings,
        publisher: Callable[[int, Gate], bool] = publish_state,
        interval_ms: Callable[[], int] = lambda: settings.BULK_LIVE_INTERVAL_MS,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
    ) -> None:
        self._gate = gate
        self._publisher = publisher
        self._interval_ms = interval_ms
        self._clock = clock
        self._background = background
        self._reset()
        self.published = 0  # messages that went out (for tests and the bench)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._entries: dict[int, _Entry] = {}
        self._heap: list[tuple[float, int]] = []
        self._busy = 0
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def mark(self, bulk_id: int) -> None:
        """The bulk operation changed (committed): publish it soon. Cheap, never blocks on I/O."""
        if self._pid != os.getpid():  # forked (a Celery prefork child): no thread came along
            self._reset()
        with self._cond:
            entry = self._entries.get(bulk_id)
            if entry is not None:
                entry.again = True
                return
            due = self._clock()
            self._entries[bulk_id] = _Entry(due)
            heapq.heappush(self._heap, (due, bulk_id))
            if self._background and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="bulk-live", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._entries)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every mark so far is published (or covered); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._entries or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def step(self) -> float | None:
        """Attempt every entry due now; when the next one is due (None: none is pending)."""
        now = self._clock()
        with self._cond:
            due: list[tuple[int, _Entry, bool]] = []
            while self._heap and self._heap[0][0] <= now:
                _, bulk_id = heapq.heappop(self._heap)
                entry = self._entries[bulk_id]
                due.append((bulk_id, entry, entry.again))
                entry.again = False
            self._busy += len(due)
        for bulk_id, entry, again in due:
            try:
                later = self._attempt(bulk_id, entry, again)
            except Exception:
                logger.warning(
                    "bulk live: publishing bulk operation %s failed", bulk_id, exc_info=True
                )
                later = None
            with self._cond:
                self._busy -= 1
                if self._entries.get(bulk_id) is not entry:
                    pass  # flushed meanwhile
                elif later is None and not entry.again:
                    del self._entries[bulk_id]
                else:
                    if later is None:  # marked during the publish: trail it by an interval
                        entry.token, later = None, self._interval_ms() / 1000
                    entry.due = self._clock() + later
                    heapq.heappush(self._heap, (entry.due, bulk_id))
                self._cond.notify_all()
        with self._cond:
            return self._heap[0][0] if self._heap else None

    def flush(self) -> int:
        """Publish every marked bulk operation now, whoever holds its gate: this process is about
        to stop, and a trailing message waiting for its interval would be lost. Returns the
        messages that went out."""
        with self._cond:
            bulk_ids = list(self._entries)
        sent = 0
        for bulk_id in bulk_ids:
            try:
                sent += self._publisher(bulk_id, self._gate())
            except Exception:
                logger.warning(
                    "bulk live: publishing bulk operation %s failed", bulk_id, exc_info=True
                )
            with self._cond:
                self._entries.pop(bulk_id, None)
                self._heap = [item for item in self._heap if item[1] in self._entries]
                heapq.heapify(self._heap)
                self._cond.notify_all()
        self.published += sent
        return sent

    def _attempt(self, bulk_id: int, entry: _Entry, again: bool) -> float | None:
        """Publish if the gate is free; else how long until it is (None: done, or covered)."""
        interval = self._interval_ms()
        gate = self._gate()
        if interval <= 0:
            self.published += self._publisher(bulk_id, gate)
            return None
        taken, holder, left_ms = gate.take(bulk_id, secrets.token_hex(8), interval)
        if taken:
            self.published += self._publisher(bulk_id, gate)
            return None
        if entry.token is not None and holder != entry.token and not again:
            return None  # taken anew since our last try: its holder read after our changes
        entry.token = holder
        return left_ms / 1000

    def _run(self) -> None:
        while True:
            try:
                self.step()
            except Exception:  # never let the thread die
                logger.exception("bulk live: publisher pass failed")
            finally:
                connections.close_all()  # this thread's connections go back (to the pool)
            with self._cond:
                while True:
                    head = self._heap[0][0] if self._heap else None
                    if head is not None and head <= self._clock():
                        break
                    self._cond.wait(None if head is None else max(head - self._clock(), 0.001))


_throttle: Throttle | None = None
_throttle_lock = threading.Lock()


def throttle() -> Throttle:
    """This process's throttle (its thread starts with the first mark)."""
    global _throttle
    if _throttle is None:
        with _throttle_lock:
            if _throttle is None:
                _throttle = Throttle()
    return _throttle


# --- channels ----------------------------------------------------------------------------------


def _may_watch(user: Any, match: re.Match[str]) -> bool:
    """ROLE_BULK_OPERATION_READ (ROLE_BULK_OPERATION_ADMIN implies it), as GET requires."""
    return has_any_role(user, {Role.BULK_OPERATION_READ})


def register_channels() -> None:
    register(Family.REALTIME, r"/bulkoperations/\*", _may_watch)
    register(Family.REALTIME, r"/bulkoperations/([1-9][0-9]{0,18})", _may_watch)
