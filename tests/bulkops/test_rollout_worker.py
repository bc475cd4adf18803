"""Rollout rates, wave gates and pause with a real Celery worker (issue 14 items 2-4): beat's
ticks are sent to the worker's own queue every BULK_RAMP_INTERVAL, as `celery beat` would (a real
beat process would send to the shared default queue, which other workers on this machine consume),
and the worker's booked runs pace the ramp between them.

Waits are bounded polls; they bound a broken run. The assertions are about what happened (no child
before its due time on the rate's curve, no child of a wave before its gate passed, none while
paused), never how fast."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.utils import timezone

from bulkops import services, tasks
from bulkops.models import BulkOperation, BulkStatus, RolloutState
from devicecontrol.services import operation_update
from tests.bulkops.conftest import children, create_bulk, make_fleet
from tests.bulkops.test_crash_safety import Workers

pytestmark = pytest.mark.django_db(transaction=True)

WAIT = 60.0  # a bound for a broken run, not a timing assertion
TICK = 0.5  # BULK_RAMP_INTERVAL's default


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Workers]:
    assert settings.REDIS_URL, "a real worker needs the broker: bin/test sets REDIS_URL"
    workers = Workers(tmp_path)
    workers.queue = f"test-rollout-{uuid.uuid4().hex[:12]}"
    workers.env["BULK_RAMP_BOOKING"] = "1"
    try:
        workers.start().wait_ready()
        yield workers
    finally:
        workers.stop_all()


def tick_until(pool: Workers, done: Callable[[], bool], *, what: str) -> None:
    """Send beat's ramp task to the pool every TICK seconds until `done()`."""
    deadline = time.monotonic() + WAIT
    next_tick = 0.0
    while not done():
        log = pool.started[0].log()[-3000:]
        assert time.monotonic() < deadline, f"{what} never happened\n{log}"
        if time.monotonic() >= next_tick:
            tasks.advance_bulk_operations.apply_async(queue=pool.queue)
            next_tick = time.monotonic() + TICK
        time.sleep(0.02)


def row(bulk: BulkOperation) -> BulkOperation:
    return BulkOperation.objects.get(pk=bulk.pk)


def creation_by_position(bulk: BulkOperation) -> list[datetime]:
    by_device = {op.device_id: op.creation_time for op in children(bulk)}
    return [by_device[target.device_id] for target in bulk.targets.order_by("position")]


def test_an_exponential_rate_creates_no_child_before_its_place_on_the_curve(
    pool: Workers,
) -> None:
    fleet = make_fleet(7)
    config = {
        "exponentialRate": {
            "baseRatePerMinute": 60,  # one a second
            "incrementFactor": 2,
            "rateIncreaseCriteria": {"numberOfNotifiedDevices": 2},
        },
        "maximumPerMinute": 240,
    }
    now = timezone.now()
    start = now + timedelta(seconds=0.5)
    bulk = create_bulk(
        fleet.group, now=now, creationRamp=0, startDate=start.isoformat(), rolloutConfig=config
    )
    tick_until(pool, lambda: row(bulk).status == BulkStatus.COMPLETED, what="completion")
    # 60/min for two, 120/min for two, then 240/min (the cap).
    offsets = [0, 1, 2, 2.5, 3, 3.25, 3.5]
    due = [start + timedelta(seconds=s) for s in offsets]
    created = creation_by_position(bulk)
    assert len(created) == 7
    assert all(c >= d for c, d in zip(created, due, strict=True)), (created, due)
    assert row(bulk).current_rate == 240


def test_a_wave_gate_holds_the_next_wave_until_its_children_succeed(pool: Workers) -> None:
    fleet = make_fleet(4)
    bulk = create_bulk(
        fleet.group,
        now=timezone.now(),
        creationRamp=0,
        startDate=timezone.now().isoformat(),
        waves=[{"size": 2}, {"percentage": 100}],
    )
    tick_until(
        pool,
        lambda: row(bulk).rollout_state == RolloutState.WAITING_FOR_WAVE,
        what="the end of wave 1",
    )
    first_wave = children(bulk)
    assert len(first_wave) == 2
    # A few of beat's ticks: the gate holds (both children pending).
    held_until = time.monotonic() + 3 * TICK
    tick_until(pool, lambda: time.monotonic() > held_until, what="a wait")
    assert len(children(bulk)) == 2
    assert services.bulk_operations_next_due() is None
    passed = timezone.now()
    for operation in first_wave:
        operation_update(operation_id=operation.pk, data={"status": "SUCCESSFUL"})
    tick_until(pool, lambda: row(bulk).status == BulkStatus.COMPLETED, what="wave 2")
    second_wave = [op for op in children(bulk) if op.pk not in {o.pk for o in first_wave}]
    assert len(second_wave) == 2
    assert all(op.creation_time >= passed for op in second_wave)
    assert row(bulk).wave == 1


def test_a_paused_ramp_creates_nothing_until_resumed(pool: Workers) -> None:
    fleet = make_fleet(6)
    now = timezone.now()
    bulk = create_bulk(
        fleet.group, now=now, creationRamp=0.3, startDate=(now + timedelta(seconds=0.3)).isoformat()
    )
    tick_until(pool, lambda: len(children(bulk)) >= 2, what="two children")
    services.bulk_operation_pause(bulk_operation_id=bulk.pk, by="ops")
    paused_count = len(children(bulk))
    held_until = time.monotonic() + 2.0  # ~6 children would be due meanwhile
    tick_until(pool, lambda: time.monotonic() > held_until, what="a wait")
    assert len(children(bulk)) == paused_count
    resumed = timezone.now()
    services.bulk_operation_resume(bulk_operation_id=bulk.pk, by="ops")
    tick_until(pool, lambda: row(bulk).status == BulkStatus.COMPLETED, what="completion")
    later = creation_by_position(bulk)[paused_count:]
    assert len(later) == 6 - paused_count
    assert all(c >= resumed for c in later)
