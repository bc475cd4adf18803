"""Publishing realtime events: the one way every app hands them over (realtime.md §5).

Services call `publish_on_commit(events)` inside their transaction. The events go to the store after
the transaction commits, all of one transaction in one batch (one store round trip), and nothing
goes out for a transaction that rolls back. Tests see the registered events: the on-commit callback
is an `EventBatch` holding them (`registered`).

**Commit order per managed object.** Two transactions that change one device publish from their
own on-commit callbacks, maybe in two processes, so the later commit could reach the store first.
Each event therefore names the managed object it is about (`key`: the device of an operation event,
the object of an inventory event), and just before COMMIT our database backends call `take_order`:
one `INSERT … ON CONFLICT DO UPDATE … RETURNING` on `EventSequence` numbers the transaction among
those of each of its objects. The row lock it takes is held until the commit, so a second
transaction on the same object waits there and gets the next number: numbers follow commit order
(on SQLite the database write lock, held from BEGIN, orders the commits anyway). The store delivers
a batch only after those before it for the same objects, holding it back otherwise, for at most
`REALTIME_ORDER_TIMEOUT_MS` (a publisher that died after its commit leaves a gap for ever).

The sequence rows are locked last in the transaction, in ascending ID order and in one statement
(also for the hundreds of devices of a bulk ramp batch), so they cannot close a deadlock with the
row locks taken before them. The cost is that one statement per committed transaction with events
(none with `REALTIME_ORDER_TIMEOUT_MS` 0, which gives the guarantee up).
Events registered outside a transaction (autocommit) are published at once and unordered: every
write service owns its transaction.

URLs inside event data are written as `BASE_URL + path`; each session sees them with the scheme and
host it connected to (`absolute`)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from django.conf import settings
from django.db import transaction

from deviceplatform.api.renderers import dumps
from deviceplatform.logs import current_request_id
from deviceplatform.realtime.hub import get_store
from deviceplatform.realtime.store import Order
from deviceplatform.realtime.subscriptions import subscriptions_matching

logger = logging.getLogger(__name__)

BASE_URL = "\x00base"  # stands for the subscriber's base URL in event data
_BASE_URL_JSON = b'"\\u0000base'  # how orjson writes a string that starts with it


@dataclass(frozen=True)
class RealtimeEvent:
    channel: str  # a concrete Bayeux channel: /operations/4712, /4711, /managedobjects/4712
    data: Any
    key: int | None = None  # the managed object whose commit order it keeps (None: unordered)
    # Only for subscribers who opted in to this option of the channel (subscriptions.py); None:
    # for every subscriber.
    option: str | None = None

    def messages(self) -> list[RealtimeEvent]:
        return [self]


class Event(Protocol):
    """What `publish_on_commit` takes: a `RealtimeEvent`, or an app's own typed event (such as
    devicecontrol's `OperationEvent`) that renders its messages when it is published."""

    @property
    def key(self) -> int | None: ...

    def messages(self) -> list[RealtimeEvent]: ...


@dataclass(eq=False)
class EventBatch:
    """The on-commit callback of a transaction's events. `order` and `joined` are set just before
    the commit: the first batch of the transaction publishes the events of the others with its own,
    and they publish nothing."""

    events: list[Event] = field(default_factory=list)
    order: list[Order] = field(default_factory=list)
    joined: list[EventBatch] = field(default_factory=list)
    lead: bool = True

    def __call__(self) -> None:
        if self.lead:
            publish([*self.events, *(e for batch in self.joined for e in batch.events)], self.order)


def publish_on_commit(events: Sequence[Event]) -> None:
    """Publish `events` once the current transaction commits (at once outside a transaction).

    Django drops an on-commit callback when a savepoint that was active at its registration rolls
    back. Events join the last registered callback only if it is a batch and every savepoint
    active now was active at its registration: then no rollback can drop the new events without
    the batch or the batch without the new events' changes, and order is kept. Otherwise they
    start a batch of their own (joined to the first one at commit)."""
    if not events:
        return
    connection = transaction.get_connection()
    if connection.in_atomic_block and connection.run_on_commit:
        savepoints, callback, _robust = connection.run_on_commit[-1]
        active = set(connection.savepoint_ids) - {None}  # atomic(savepoint=False) levels: None
        if isinstance(callback, EventBatch) and active <= savepoints:
            callback.events.extend(events)
            return
    transaction.on_commit(EventBatch(list(events)))


def registered(callbacks: Sequence[Any]) -> list[Event]:
    """The events among captured on-commit callbacks, in order (for tests)."""
    return [event for cb in callbacks if isinstance(cb, EventBatch) for event in cb.events]


def take_order(connection: Any) -> None:
    """Number the committing transaction among the transactions of each object its events are
    about. Called by our database backends inside `commit()`, before the COMMIT itself."""
    batches = [cb for _, cb, _ in connection.run_on_commit if isinstance(cb, EventBatch)]
    if not batches:
        return
    first, *rest = batches
    for batch in rest:
        batch.lead = False
    first.joined = rest
    if settings.REALTIME_ORDER_TIMEOUT_MS <= 0:  # no order kept: no numbers needed
        return
    keys = sorted({e.key for batch in batches for e in batch.events if e.key is not None})
    if keys:
        first.order = take_sequences(connection, keys, now_ms=int(time.time() * 1000))


# The objects come as one array literal (PostgreSQL) or JSON text (SQLite): a VALUES list of
# two placeholders per object cost the client ~15 ms of query splitting for a 500-device ramp batch.
# ORDER BY makes the row locks come in ascending ID order.
_KEYS = {
    "postgresql": "SELECT k, 1, %s FROM unnest(%s::bigint[]) AS k ORDER BY k",
    "sqlite": "SELECT value, 1, %s FROM json_each(%s) WHERE true ORDER BY value",
}


def _array(keys: list[int]) -> str:
    """A bigint[] literal: psycopg's own adaptation of a 500-element list cost 1.5 ms of CPU."""
    return "{" + ",".join(str(int(key)) for key in keys) + "}"


def take_sequences(connection: Any, keys: list[int], *, now_ms: int) -> list[Order]:
    """(key, seq, after_ms) for each of `keys` (ascending): the next number of each object, under
    its row lock until the transaction ends; `after_ms` is how long after the object's previous
    number this one was taken (None for its first)."""
    from deviceplatform.models import EventSequence  # the backends import us before apps load

    table = connection.ops.quote_name(EventSequence._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (object_id, seq, taken_ms) {_KEYS[connection.vendor]} "  # noqa: S608 - our table
            f"ON CONFLICT (object_id) DO UPDATE SET seq = {table}.seq + 1, "
            f"after_ms = excluded.taken_ms - {table}.taken_ms, taken_ms = excluded.taken_ms "
            "RETURNING object_id, seq, after_ms",
            [now_ms, _array(keys) if connection.vendor == "postgresql" else json.dumps(keys)],
        )
        return sorted((int(key), int(seq), after) for key, seq, after in cursor.fetchall())


def publish(events: Sequence[Event], order: Sequence[Order] = ()) -> None:
    """Queue `events` for every session subscribed to their channels and wake those sessions;
    `order` holds them back until the batches before them arrived (see the module docstring).
    A realtime outage is logged, never raised: the change it reports is already committed."""
    messages = [message for event in events for message in event.messages()]
    if not messages and not order:
        return
    suffix = envelope_suffix(current_request_id())
    prepared = [
        (
            # The renderer's dumps: a row stored before the parser's checks may hold a value
            # orjson refuses (a huge integer, deep nesting), and must not break its event.
            dumps({"channel": message.channel, "data": message.data})[:-1] + suffix,
            subscriptions_matching(message.channel, message.option),
        )
        for message in messages
    ]
    try:
        get_store().publish(prepared, order)
    except Exception:
        logger.exception("could not publish %d realtime event(s)", len(prepared))


# The envelope: an event is stored as `{"channel":...,"data":...,"requestId":"..."}`, the last key
# naming the request (or the task it caused) that published it. The delivering server logs it and
# takes it off (`delivered`): subscribers get the Bayeux message `{"channel":...,"data":...}` only.
# A request id holds no character JSON escapes (deviceplatform/logs.py), so it is written as is.
_ENVELOPE_KEY = b',"requestId":"'


def envelope_suffix(request_id: str | None) -> bytes:
    """What closes an event's JSON object: its request id, if any, and the final brace."""
    if request_id is None:
        return b"}"
    return _ENVELOPE_KEY + request_id.encode() + b'"}'


def delivered(payload: bytes) -> tuple[bytes, str | None]:
    """A stored event as subscribers get it (the Bayeux message), and its request id. Only our own
    last key can match: inside `data` a quote before `requestId` would be escaped, and a nested
    object would end the payload with two braces."""
    if payload.endswith(b'"}'):
        start = payload.rfind(_ENVELOPE_KEY)
        if start > 0:
            return payload[:start] + b"}", payload[start + len(_ENVELOPE_KEY) : -2].decode()
    return payload, None


def absolute(payload: bytes, base: bytes) -> bytes:
    """`payload` with its base URL marks replaced by `base` (e.g. b'"https://host')."""
    return payload.replace(_BASE_URL_JSON, base) if _BASE_URL_JSON in payload else payload
