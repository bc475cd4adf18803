"""Live bulk operations (issue 14 item 8, bulkops/live.py): each change of a bulk operation goes out
on /bulkoperations/{id} and /bulkoperations/* as Cumulocity's `{realtimeAction, data}`, `data`
being what GET answers; throttled per bulk operation with the last state always delivered;
readable with the bulk-operation read role only.

The subscribers are real Bayeux sessions on the ASGI application (tests/realtime/bayeux.py); the
changes come from the real services in committed transactions (Redis store, and the embedded
in-process store). The throttle's rules are driven by a clock of the tests' own (`Throttle.step`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.db import transaction

from bulkops import live, services
from bulkops.abort import bulk_operations_abort_sweep
from bulkops.live import MemoryGate, Throttle, bulk_changed, publish_state
from bulkops.models import BulkOperation
from devicecontrol.models import Operation
from devicecontrol.services import operation_update
from deviceplatform.realtime.hub import get_store
from deviceplatform.realtime.store import MemoryStore
from deviceplatform.roles import Role
from tests.bulkops.conftest import BULK, T0, Fleet, at, bulk_data, make_fleet
from tests.devicecontrol.conftest import call
from tests.factories import Clients
from tests.realtime.bayeux import WsBayeux

pytestmark = pytest.mark.django_db(transaction=True)

IDLE = 30.0  # bounds a hang while waiting for the publisher; never a timing assertion


def events(messages: list[dict[str, Any]], channel: str | None = None) -> list[dict[str, Any]]:
    """The data messages among `messages` (on `channel` when given)."""
    return [
        m
        for m in messages
        if not m["channel"].startswith("/meta/") and (channel is None or m["channel"] == channel)
    ]


def get_json(bapi: Clients, pk: int) -> dict[str, Any]:
    response = call(bapi["bulk_reader"], "GET", f"{BULK}/{pk}")
    assert response.status_code == 200, response.content[:500]
    return response.json()


def idle() -> None:
    assert live.throttle().wait_idle(IDLE)


def set_status(operation_id: int, status: str) -> None:
    operation_update(operation_id=operation_id, data={"status": status})


def child_ids(pk: int) -> list[int]:
    return list(
        Operation.objects.filter(bulk_operation_id=pk).order_by("pk").values_list("pk", flat=True)
    )


# --- end to end: a subscriber's view --------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_subscriber_sees_the_create_the_ramp_and_the_final_state_as_get_answers(
    bapi: Clients, settings: Any
) -> None:
    settings.BULK_LIVE_INTERVAL_MS = 100
    await database_sync_to_async(bapi.prepare)("bulk_reader")
    fleet: Fleet = await database_sync_to_async(make_fleet)(6)
    async with WsBayeux() as every, WsBayeux() as one:
        await every.start("bulk_reader", "/bulkoperations/*")
        bulk = await database_sync_to_async(services.bulk_operation_create)(
            data=bulk_data(fleet.group, creationRamp=1), now=T0
        )
        channel = f"/bulkoperations/{bulk.pk}"
        [created] = events(await every.connect_now())
        await one.start("bulk_reader", channel)

        # The ramp creates two children, then the rest: an UPDATE each time (or one for both,
        # throttled), the last one as GET answers.
        await database_sync_to_async(services.bulk_operations_advance)(now=at(1))
        await database_sync_to_async(idle)()
        await database_sync_to_async(services.bulk_operations_advance)(now=at(10))
        await database_sync_to_async(idle)()
        ramped = events(await one.connect_now())
        after_ramp = await database_sync_to_async(get_json)(bapi, bulk.pk)

        # Every child succeeds, one transaction each.
        for operation_id in await database_sync_to_async(child_ids)(bulk.pk):
            for status in ("EXECUTING", "SUCCESSFUL"):
                await database_sync_to_async(set_status)(operation_id, status)
        await database_sync_to_async(idle)()
        finished = events(await one.connect_now())
        final = await database_sync_to_async(get_json)(bapi, bulk.pk)
        on_every = events(await every.connect_now())

    assert created["channel"] == channel
    assert created["data"]["realtimeAction"] == "CREATE"
    assert created["data"]["data"]["id"] == str(bulk.pk)
    assert created["data"]["data"]["generalStatus"] == "SCHEDULED"
    assert created["data"]["data"]["self"] == f"http://testserver{BULK}/{bulk.pk}"
    assert created["data"]["data"]["progress"]["all"] == 6

    assert ramped, "the ramp's batches were published"
    assert {m["data"]["realtimeAction"] for m in ramped} == {"UPDATE"}
    assert ramped[-1]["data"]["data"] == after_ramp
    assert after_ramp["progress"] == {
        "pending": 6,
        "failed": 0,
        "executing": 0,
        "successful": 0,
        "all": 6,
    }

    assert finished[-1]["data"]["data"] == final
    assert final["generalStatus"] == "SUCCESSFUL"
    assert final["progress"]["successful"] == 6
    # /bulkoperations/* got the same messages as /bulkoperations/{id}.
    assert [m["data"] for m in on_every] == [m["data"] for m in [*ramped, *finished]]


@pytest.mark.asyncio
async def test_a_burst_of_status_changes_gives_a_few_messages_and_the_last_is_exact(
    bapi: Clients, settings: Any
) -> None:
    # 40 changes: however long the burst takes on a loaded machine (up to 24 s), one message per
    # 3 s interval stays well below a message per change.
    settings.BULK_LIVE_INTERVAL_MS = 3000
    await database_sync_to_async(bapi.prepare)("bulk_reader")
    fleet: Fleet = await database_sync_to_async(make_fleet)(20)
    bulk = await database_sync_to_async(services.bulk_operation_create)(
        data=bulk_data(fleet.group, creationRamp=0), now=T0
    )
    await database_sync_to_async(services.bulk_operations_advance)(now=at(0))
    await database_sync_to_async(idle)()
    ids = await database_sync_to_async(child_ids)(bulk.pk)
    async with WsBayeux() as ws:
        await ws.start("bulk_reader", f"/bulkoperations/{bulk.pk}")
        started = time.monotonic()
        for operation_id in ids:
            for status in ("EXECUTING", "SUCCESSFUL" if operation_id % 3 else "FAILED"):
                await database_sync_to_async(set_status)(operation_id, status)
        burst = time.monotonic() - started
        await database_sync_to_async(idle)()
        received = events(await ws.connect_now())
        final = await database_sync_to_async(get_json)(bapi, bulk.pk)

    changes = 2 * len(ids)
    # A leading message, at most one per interval during the burst, one trailing message.
    ceiling = 2 + int(burst / 3.0)
    assert 1 <= len(received) <= ceiling, (len(received), burst)
    assert len(received) < changes / 4, (len(received), burst)
    assert received[-1]["data"]["data"] == final
    assert final["progress"]["pending"] == final["progress"]["executing"] == 0


@pytest.mark.asyncio
async def test_cancel_and_put_are_updates_with_the_resource(bapi: Clients, settings: Any) -> None:
    settings.BULK_LIVE_INTERVAL_MS = 0  # every change at once
    await database_sync_to_async(bapi.prepare)("bulk_reader")
    fleet: Fleet = await database_sync_to_async(make_fleet)(2)
    bulk = await database_sync_to_async(services.bulk_operation_create)(
        data=bulk_data(fleet.group), now=T0
    )
    async with WsBayeux() as ws:
        await ws.start("bulk_reader", f"/bulkoperations/{bulk.pk}")
        await database_sync_to_async(services.bulk_operation_update)(
            bulk_operation_id=bulk.pk, data={"creationRamp": 5, "note": "slower"}, now=T0
        )
        await database_sync_to_async(idle)()
        await database_sync_to_async(services.bulk_operation_cancel)(bulk_operation_id=bulk.pk)
        await database_sync_to_async(idle)()
        received = events(await ws.connect_now())
        final = await database_sync_to_async(get_json)(bapi, bulk.pk)

    put, cancel = received
    assert put["data"]["realtimeAction"] == "UPDATE"
    assert (put["data"]["data"]["creationRamp"], put["data"]["data"]["note"]) == (5, "slower")
    assert cancel["data"] == {"realtimeAction": "UPDATE", "data": final}
    assert (final["status"], final["generalStatus"]) == ("DELETED", "CANCELED")


@pytest.mark.asyncio
async def test_the_embedded_layout_publishes_through_the_in_process_store(
    bapi: Clients, settings: Any
) -> None:
    settings.REDIS_URL = ""
    settings.BULK_LIVE_INTERVAL_MS = 100
    assert isinstance(get_store(), MemoryStore)
    assert isinstance(live.gate_for_settings(), MemoryGate)
    await database_sync_to_async(bapi.prepare)("bulk_reader")
    fleet: Fleet = await database_sync_to_async(make_fleet)(3)
    async with WsBayeux() as ws:
        await ws.start("bulk_reader", "/bulkoperations/*")
        bulk = await database_sync_to_async(services.bulk_operation_create)(
            data=bulk_data(fleet.group, creationRamp=0), now=T0
        )
        await database_sync_to_async(services.bulk_operations_advance)(now=at(0))
        await database_sync_to_async(idle)()
        received = events(await ws.connect_now())
        final = await database_sync_to_async(get_json)(bapi, bulk.pk)

    assert [m["data"]["realtimeAction"] for m in received] == ["CREATE", "UPDATE"]
    assert received[-1]["data"]["data"] == final
    assert final["status"] == "COMPLETED"


# --- rights -----------------------------------------------------------------------------------

RIGHTS = [
    ("bulk_reader", True),
    ("bulk_admin", True),
    ("dc_reader", False),  # device-control read is not bulk-operation read
    ("nobody", False),
]


@pytest.mark.asyncio
async def test_subscribing_needs_the_bulk_operation_read_role(
    bapi: Clients, make_user: Callable[..., Any]
) -> None:
    for username, _ in RIGHTS:
        if username == "dc_reader":
            await database_sync_to_async(make_user)(username, [Role.DEVICE_CONTROL_READ])
        else:
            await database_sync_to_async(bapi.prepare)(username)
    replies = []
    for username, allowed in RIGHTS:
        async with WsBayeux() as ws:
            await ws.handshake(username)
            for channel in ("/bulkoperations/*", "/bulkoperations/4711"):
                replies.append((username, channel, allowed, await ws.subscribe(channel)))

    for username, channel, allowed, reply in replies:
        case = (username, channel, reply)
        assert reply["successful"] is allowed, case
        assert reply["subscription"] == channel, case
        if not allowed:
            assert reply["error"] == "403::Subscription denied", case


@pytest.mark.asyncio
async def test_a_denied_subscriber_gets_nothing(bapi: Clients, settings: Any) -> None:
    settings.BULK_LIVE_INTERVAL_MS = 0
    await database_sync_to_async(bapi.prepare)("bulk_reader", "nobody")
    fleet: Fleet = await database_sync_to_async(make_fleet)(1)
    async with WsBayeux() as denied, WsBayeux() as allowed:
        await denied.start("nobody")
        refused = await denied.subscribe("/bulkoperations/*")
        await allowed.start("bulk_reader", "/bulkoperations/*")
        await database_sync_to_async(services.bulk_operation_create)(
            data=bulk_data(fleet.group), now=T0
        )
        seen = events(await allowed.connect_now())
        unseen = events(await denied.connect_now())

    assert refused["error"] == "403::Subscription denied"
    assert [m["data"]["realtimeAction"] for m in seen] == ["CREATE"]
    assert unseen == []


# --- what is published, and when ------------------------------------------------------------------


def test_a_rolled_back_change_publishes_nothing(fleet: Fleet) -> None:
    bulk = services.bulk_operation_create(data=bulk_data(fleet.group), now=T0)
    idle()
    before = live.throttle().published

    def change_and_fail() -> None:
        with transaction.atomic():
            bulk_changed(bulk.pk)
            raise RuntimeError

    with pytest.raises(RuntimeError):
        change_and_fail()
    assert live.throttle().pending() == 0
    assert live.throttle().published == before


@pytest.mark.django_db  # the test's transaction: callbacks are captured, not run
def test_a_child_status_change_only_marks_the_bulk_operation(
    fleet: Fleet, django_capture_on_commit_callbacks: Any, django_assert_num_queries: Any
) -> None:
    """The hot path: the change registers a mark for after its commit, and the mark itself
    touches neither the database nor Redis (the publisher thread reads later)."""
    bulk = services.bulk_operation_create(data=bulk_data(fleet.group, creationRamp=0), now=T0)
    services.bulk_operations_advance(now=at(0))
    [first, *_] = child_ids(bulk.pk)
    throttle = Throttle(background=False)
    live._throttle, saved = throttle, live._throttle
    try:
        with django_capture_on_commit_callbacks() as callbacks, transaction.atomic():
            set_status(first, "EXECUTING")
        marks = [cb for cb in callbacks if getattr(cb, "func", None) is live._mark]
        with django_assert_num_queries(0):
            for callback in marks:
                callback()
    finally:
        live._throttle = saved
    assert [mark.args for mark in marks] == [(bulk.pk,)]
    assert throttle.pending() == 1


@pytest.mark.django_db
def test_a_fold_publishes_nothing(fleet: Fleet, django_capture_on_commit_callbacks: Any) -> None:
    """Folding moves deltas into the row: GET's answer does not change, so nothing goes out."""
    bulk = services.bulk_operation_create(data=bulk_data(fleet.group, creationRamp=0), now=T0)
    services.bulk_operations_advance(now=at(0))
    with django_capture_on_commit_callbacks() as callbacks:
        assert services.bulk_progress_fold() >= 1
    with django_capture_on_commit_callbacks() as changed:
        set_status(child_ids(bulk.pk)[0], "EXECUTING")
    assert [cb for cb in changed if getattr(cb, "func", None) is live._mark]  # the test can fail
    assert not [cb for cb in callbacks if getattr(cb, "func", None) is live._mark]
    assert BulkOperation.objects.get(pk=bulk.pk).pending == 3


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """The real publish, recording which bulk operations it was called for and what went out."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.sent = 0

    def __call__(self, bulk_id: int, gate: Any) -> bool:
        self.calls.append(bulk_id)
        sent = publish_state(bulk_id, gate)
        self.sent += sent
        return sent


def throttled(clock: Clock, gate: MemoryGate, interval_ms: int = 250) -> tuple[Throttle, Recorder]:
    recorder = Recorder()
    throttle = Throttle(
        gate=lambda: gate,
        publisher=recorder,
        interval_ms=lambda: interval_ms,
        clock=clock,
        background=False,
    )
    return throttle, recorder


def running_bulk(fleet: Fleet) -> BulkOperation:
    bulk = services.bulk_operation_create(data=bulk_data(fleet.group, creationRamp=0), now=T0)
    services.bulk_operations_advance(now=at(0))
    assert live.throttle().wait_idle(IDLE)
    return bulk


def test_a_burst_publishes_at_once_and_once_more_after_the_interval(fleet: Fleet) -> None:
    bulk = running_bulk(fleet)
    clock = Clock()
    gate = MemoryGate(clock)
    throttle, recorder = throttled(clock, gate)
    [first, second, third] = child_ids(bulk.pk)

    set_status(first, "EXECUTING")
    for _ in range(100):
        throttle.mark(bulk.pk)
    assert throttle.step() is None
    assert recorder.calls == [bulk.pk]  # the leading edge, at once

    clock.now += 0.1
    set_status(second, "EXECUTING")
    set_status(third, "EXECUTING")
    for _ in range(50):
        throttle.mark(bulk.pk)
    next_due = throttle.step()
    assert recorder.calls == [bulk.pk]  # the gate is held: wait for it
    assert next_due == pytest.approx(1000.25)

    clock.now = 1000.25
    assert throttle.step() is None
    assert recorder.calls == [bulk.pk, bulk.pk]  # the trailing edge: the state after the burst
    assert recorder.sent == 2
    assert throttle.pending() == 0


def test_a_change_covered_by_another_process_is_not_published_twice(fleet: Fleet) -> None:
    """Two processes (two throttles) share the gate: B's change, seen while A held the gate, is
    covered by A's next publish, which took the gate after it; B sends nothing."""
    bulk = running_bulk(fleet)
    clock = Clock()
    gate = MemoryGate(clock)
    a, sent_by_a = throttled(clock, gate)
    b, sent_by_b = throttled(clock, gate)
    [first, second, third] = child_ids(bulk.pk)

    set_status(first, "EXECUTING")
    a.mark(bulk.pk)
    a.step()
    clock.now += 0.1
    set_status(second, "EXECUTING")
    b.mark(bulk.pk)
    assert b.step() == pytest.approx(1000.25)  # A holds the gate
    clock.now = 1000.25
    set_status(third, "EXECUTING")
    a.mark(bulk.pk)
    a.step()  # A takes the gate anew and reads after B's change
    clock.now = 1000.26
    assert b.step() is None  # held by A's new token: B's change is covered
    assert b.pending() == 0

    assert (sent_by_a.calls, sent_by_b.calls) == ([bulk.pk, bulk.pk], [])


def test_a_change_after_the_covering_publish_is_still_published(fleet: Fleet) -> None:
    bulk = running_bulk(fleet)
    clock = Clock()
    gate = MemoryGate(clock)
    a, sent_by_a = throttled(clock, gate)
    b, sent_by_b = throttled(clock, gate)
    [first, second, _] = child_ids(bulk.pk)

    set_status(first, "EXECUTING")
    a.mark(bulk.pk)
    a.step()
    clock.now += 0.1
    b.mark(bulk.pk)
    b.step()  # A holds the gate: B waits for it
    clock.now = 1000.25
    a.mark(bulk.pk)
    a.step()  # A publishes (covers B's first change) ...
    clock.now = 1000.3
    set_status(second, "EXECUTING")
    b.mark(bulk.pk)  # ... but B sees another change after that
    assert b.step() is not None
    clock.now = 1000.5
    b.step()
    assert sent_by_b.calls == [bulk.pk]
    assert b.pending() == 0
    assert sent_by_a.calls == [bulk.pk, bulk.pk]


def test_an_unchanged_state_is_not_sent_again(fleet: Fleet) -> None:
    bulk = running_bulk(fleet)
    clock = Clock()
    throttle, recorder = throttled(clock, MemoryGate(clock), interval_ms=0)
    throttle.mark(bulk.pk)
    throttle.step()
    throttle.mark(bulk.pk)  # nothing visible changed (a fold, a no-op PUT)
    throttle.step()
    [first, *_] = child_ids(bulk.pk)
    set_status(first, "EXECUTING")
    throttle.mark(bulk.pk)
    throttle.step()
    assert (recorder.calls, recorder.sent) == ([bulk.pk] * 3, 2)


def test_a_mark_during_a_publish_is_published_after_the_interval(fleet: Fleet) -> None:
    bulk = running_bulk(fleet)
    clock = Clock()
    gate = MemoryGate(clock)
    throttle: Throttle

    class Marking(Recorder):
        def __call__(self, bulk_id: int, gate: Any) -> bool:
            if not self.calls:
                throttle.mark(bulk_id)  # a change committed while we read
            return super().__call__(bulk_id, gate)

    recorder = Marking()
    throttle = Throttle(
        gate=lambda: gate,
        publisher=recorder,
        interval_ms=lambda: 250,
        clock=clock,
        background=False,
    )
    throttle.mark(bulk.pk)
    assert throttle.step() == pytest.approx(1000.25)
    clock.now = 1000.25
    assert throttle.step() is None
    assert recorder.calls == [bulk.pk, bulk.pk]


def test_an_unknown_bulk_operation_publishes_nothing(db: None) -> None:
    clock = Clock()
    throttle, recorder = throttled(clock, MemoryGate(clock))
    throttle.mark(987654321)
    assert throttle.step() is None
    assert (recorder.calls, recorder.sent) == ([987654321], 0)


@pytest.mark.asyncio
async def test_an_abort_is_published_with_its_reason(bapi: Clients, settings: Any) -> None:
    """An abort (README "Abort thresholds") changes the bulk operation without a request: its
    final state, DELETED with `abortReason`, goes out as GET answers it."""
    settings.BULK_LIVE_INTERVAL_MS = 0
    await database_sync_to_async(bapi.prepare)("bulk_reader")
    fleet: Fleet = await database_sync_to_async(make_fleet)(3)
    config = {"criteria": [{"failureType": "ANY", "thresholdPercentage": 50}]}
    bulk = await database_sync_to_async(services.bulk_operation_create)(
        data=bulk_data(fleet.group, creationRamp=0, abortConfig=config), now=T0
    )
    await database_sync_to_async(services.bulk_operations_advance)(now=at(1))
    first, *_ = await database_sync_to_async(child_ids)(bulk.pk)
    await database_sync_to_async(idle)()
    async with WsBayeux() as ws:
        await ws.start("bulk_reader", f"/bulkoperations/{bulk.pk}")
        await database_sync_to_async(set_status)(first, "FAILED")
        aborted = await database_sync_to_async(bulk_operations_abort_sweep)()
        await database_sync_to_async(idle)()
        received = events(await ws.connect_now())
        final = await database_sync_to_async(get_json)(bapi, bulk.pk)

    assert aborted == [bulk.pk]
    assert (final["status"], final["abortReason"]["failed"]) == ("DELETED", 1)
    assert received[-1]["data"] == {"realtimeAction": "UPDATE", "data": final}
