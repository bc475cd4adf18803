"""On-time ramps (issue 13 item 3): each ramp run books the next one for the moment the next child
is due, so a ramp keeps its pace with beat far coarser than the ramp, and never creates a child
before its time. With a broker the booking is a Celery task with that ETA (deduplicated in Redis,
per queue); without one it wakes the embedded scheduler's ramp entry.

Waits are bounded polls; they bound a broken run. The assertions are about what happened (runs
without beat, nothing early, exactly one child per device), not how fast."""

from __future__ import annotations

import json
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from bulkops import tasks
from bulkops.models import BulkOperation, BulkStatus
from bulkops.services import bulk_operations_next_due
from deviceplatform import scheduler as scheduler_module
from deviceplatform.celery import app
from deviceplatform.scheduler import Scheduler, wake_entry
from tests.bulkops.conftest import children, create_bulk, make_fleet
from tests.bulkops.test_crash_safety import Workers
from tests.deviceplatform import test_embedded as embedded

WAIT = 60.0  # a bound for a broken run, not a timing assertion


def due_times(bulk: BulkOperation) -> list[datetime]:
    """When each target position is due, as the ramp computes it (whole microseconds per step)."""
    bulk.refresh_from_db()
    step = timedelta(microseconds=round(bulk.creation_ramp * 1_000_000))
    return [bulk.effective_start + k * step for k in range(bulk.target_count)]


def creation_by_position(bulk: BulkOperation) -> list[datetime]:
    by_device = {op.device_id: op.creation_time for op in children(bulk)}
    return [by_device[target.device_id] for target in bulk.targets.order_by("position")]


# --- the embedded scheduler ----------------------------------------------------------------------


RAMP_ENTRY = {"ramp": {"task": tasks.RAMP_TASK, "schedule": 30.0}}


def test_wake_moves_an_entry_earlier_and_never_later() -> None:
    scheduler = Scheduler(RAMP_ENTRY)
    assert scheduler.tick(100.0) == []  # first due at 130
    assert scheduler.wake(tasks.RAMP_TASK, 140.0)
    assert scheduler.seconds_until_next_due(100.0) == 30.0
    assert scheduler.wake(tasks.RAMP_TASK, 100.25)
    assert scheduler.seconds_until_next_due(100.0) == 0.25
    assert not scheduler.wake("no.such.task", 100.0)


def test_a_woken_entry_runs_then_and_goes_on_from_there(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[float] = []
    scheduler = Scheduler(RAMP_ENTRY)
    monkeypatch.setattr(scheduler, "_run", lambda entry: ran.append(now))
    now = 100.0
    scheduler.tick(now)
    scheduler.wake(tasks.RAMP_TASK, 100.5)
    now = 100.4
    assert scheduler.tick(now) == []
    now = 100.5
    assert scheduler.tick(now) == ["ramp"]
    assert ran == [100.5]
    assert scheduler.seconds_until_next_due(100.5) == 30.0  # the safety net again


def test_the_loop_runs_a_woken_entry_without_waiting_for_its_interval() -> None:
    """The scheduler thread sleeps up to a second between checks; a wake cuts that sleep."""
    woken = threading.Event()
    scheduler = Scheduler({"ramp": {"task": "tests.bulkops.woken", "schedule": 3600.0}})

    @app.task(name="tests.bulkops.woken")
    def mark() -> None:
        woken.set()

    scheduler.start()
    try:
        time.sleep(0.1)
        assert scheduler.wake("tests.bulkops.woken", scheduler.clock() + 0.05)
        assert woken.wait(timeout=WAIT)
    finally:
        scheduler.stop()


def test_booking_without_a_broker_wakes_the_running_scheduler(
    monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    settings.BULK_RAMP_BOOKING = True
    monkeypatch.setitem(app.conf, "task_always_eager", True)
    clock = [1000.0]
    scheduler = Scheduler(RAMP_ENTRY, clock=lambda: clock[0])
    scheduler.tick(clock[0])
    assert not wake_entry(tasks.RAMP_TASK, timezone.now())  # none running in this process
    monkeypatch.setattr(scheduler_module, "_running", scheduler)
    now = timezone.now()  # what the scheduler's clock reads now: clock[0]
    tasks.ramp_wake(now + timedelta(seconds=2), now=now)
    assert scheduler.seconds_until_next_due(clock[0]) == 2.0


# --- booking with a broker -----------------------------------------------------------------------


@pytest.fixture
def queue() -> Iterator[str]:
    """A queue of this test's own in the suite's Redis, removed afterwards."""
    name = f"test-booking-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        stale = list(client.scan_iter(match=f"*{name}*"))
        if stale:
            client.delete(*stale)
    finally:
        client.close()


def queued(name: str) -> list[bytes]:
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        return list(client.lrange(name, 0, -1))
    finally:
        client.close()


def test_one_booking_per_moment_and_an_earlier_one_replaces_it(queue: str, settings: Any) -> None:
    assert settings.REDIS_URL, "bookings go through the broker: bin/test sets REDIS_URL"
    settings.BULK_RAMP_BOOKING = True
    now = timezone.now()
    soon = now + timedelta(seconds=30)
    tasks.ramp_wake(soon, queue=queue, now=now)
    tasks.ramp_wake(soon, queue=queue, now=now)  # already booked
    tasks.ramp_wake(soon + timedelta(seconds=1), queue=queue, now=now)  # its run books that
    assert len(queued(queue)) == 1
    tasks.ramp_wake(soon - timedelta(seconds=10), queue=queue, now=now)  # earlier: booked too
    assert len(queued(queue)) == 2
    tasks.ramp_wake(soon + timedelta(minutes=10), queue=queue, now=now)  # beyond the horizon
    tasks.ramp_wake(None, queue=queue, now=now)
    assert len(queued(queue)) == 2
    # Once the booked moment has passed, its run is under way: a new booking is made.
    later = soon - timedelta(seconds=5)
    tasks.ramp_wake(later + timedelta(seconds=1), queue=queue, now=later)
    assert len(queued(queue)) == 3
    settings.BULK_RAMP_BOOKING = False
    tasks.ramp_wake(now - timedelta(seconds=60), queue=queue, now=now)
    assert len(queued(queue)) == 3


def test_the_default_queue_is_booked_under_its_name(
    queue: str, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A booking for no queue in particular (a request creating a bulk operation) and one for the
    default queue by name (a run taken from it books on its routing key) are one booking."""
    settings.BULK_RAMP_BOOKING = True
    monkeypatch.setitem(app.conf, "task_default_queue", queue)
    now = timezone.now()
    soon = now + timedelta(seconds=30)
    tasks.ramp_wake(soon, now=now)
    tasks.ramp_wake(soon, queue=queue, now=now)
    tasks.ramp_wake(soon + timedelta(seconds=1), now=now)
    assert len(queued(queue)) == 1
    assert booked(queue) == math.ceil(soon.timestamp() * 1000)


def booked(queue: str) -> int | None:
    """The moment (ms since the epoch) of the run booked on `queue`, None if there is none."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        value = client.get(f"bulkops:ramp:booked:{queue}")
    finally:
        client.close()
    return None if value is None else int(value)


@pytest.mark.django_db(transaction=True)
def test_a_run_creates_what_is_due_and_books_the_next_child_on_its_own_queue(
    queue: str, settings: Any
) -> None:
    """The chain of runs, without a worker's timing: a run taken from `queue` (here run in this
    process) creates the child due now, and books the run for the next child on that queue,
    with that ETA. The next child is a minute away: this test never gets there."""
    fleet = make_fleet(3)
    now = timezone.now()
    bulk = create_bulk(fleet.group, now=now, creationRamp=60, startDate=now.isoformat())
    settings.BULK_RAMP_BOOKING = True  # after the creation: its own booking would go elsewhere
    assert tasks.advance_bulk_operations.apply(routing_key=queue).get() == 1
    assert len(children(bulk)) == 1
    second = due_times(bulk)[1]
    assert booked(queue) == math.ceil(second.timestamp() * 1000)
    [message] = queued(queue)
    headers = json.loads(message)["headers"]
    assert headers["task"] == tasks.RAMP_TASK
    assert datetime.fromisoformat(headers["eta"]) == second
    assert headers["kwargsrepr"] == repr({"booked_ms": booked(queue)})


@pytest.mark.django_db(transaction=True)
def test_one_run_paces_a_whole_ramp_through_its_bookings_with_no_child_early(
    tmp_path: Path,
) -> None:
    """One task (one beat tick) and no more: the worker's booked runs create every child, each
    at or after its due time. Without bookings the ramp would stop after the first child."""
    assert settings.REDIS_URL, "a real worker needs the broker: bin/test sets REDIS_URL"
    fleet = make_fleet(4)
    pool = Workers(tmp_path)
    pool.queue = f"test-booking-{uuid.uuid4().hex[:12]}"
    pool.env["BULK_RAMP_BOOKING"] = "1"
    try:
        worker = pool.start()
        worker.wait_ready()
        # Due at +1, +2, +3 and +4 s: the one task finds nothing due yet and books the first.
        now = timezone.now()
        start = (now + timedelta(seconds=1)).isoformat()
        bulk = create_bulk(fleet.group, now=now, creationRamp=1, startDate=start)
        tasks.advance_bulk_operations.apply_async(queue=pool.queue)
        deadline = time.monotonic() + WAIT
        # Completed, and the run that completed it has logged its line (after its commit).
        while (
            BulkOperation.objects.get(pk=bulk.pk).status != BulkStatus.COMPLETED
            or sum(worker.results()) < 4
        ):
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.1)
    finally:
        pool.stop_all()
    created = creation_by_position(bulk)
    assert len(created) == 4
    assert all(c >= d for c, d in zip(created, due_times(bulk), strict=True)), created
    # Only one task was sent: the runs after it were booked by the one before. How many there
    # were depends on how late the worker ran them (a late one creates all that are due);
    # test_a_run_creates_what_is_due_and_books_the_next_child_on_its_own_queue shows the chain.
    assert sum(worker.results()) == 4, worker.log()[-3000:]
    assert bulk_operations_next_due() is None


# --- the embedded server -------------------------------------------------------------------------


@pytest.fixture
def embedded_env(tmp_path: Path) -> dict[str, str]:
    """No Redis, bookings on, and a scheduler interval far longer than the ramp and the wait:
    only bookings can drive it."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "REDIS_URL"} and not key.startswith("PYTEST_")
    }
    env.update(
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        ADMIN_USERNAME="admin",
        ADMIN_PASSWORD=embedded.ADMIN_PASSWORD,
        LOG_LEVEL="INFO",
        BULK_RAMP_BOOKING="1",
        BULK_RAMP_INTERVAL="3600",
    )
    return env


served = embedded.served


def test_the_embedded_server_paces_a_ramp_by_bookings_alone(served: tuple[int, Path]) -> None:
    port, log_path = served

    def create(path: str, body: dict[str, object]) -> dict[str, Any]:
        status, created = embedded.request(port, "POST", path, body)
        assert status == 201, (path, status, created)
        return created

    agent = create(
        "/inventory/managedObjects",
        {"name": "Agent", "c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}},
    )
    group = create("/inventory/managedObjects", {"name": "Fleet", "c8y_IsDeviceGroup": {}})
    for i in range(3):
        device = create("/inventory/managedObjects", {"name": f"Device {i}", "c8y_IsDevice": {}})
        reference = {"managedObject": {"id": device["id"]}}
        create(f"/inventory/managedObjects/{agent['id']}/childDevices", reference)
        create(f"/inventory/managedObjects/{group['id']}/childAssets", reference)
    start = datetime.now(UTC) + timedelta(seconds=1)
    bulk = create(
        "/devicecontrol/bulkoperations",
        {
            "groupId": group["id"],
            "startDate": start.isoformat(timespec="milliseconds"),
            "creationRamp": 0.4,
            "operationPrototype": {"description": "Restart", "c8y_Restart": {}},
        },
    )
    deadline = time.monotonic() + WAIT
    while True:
        status, current = embedded.request(
            port, "GET", f"/devicecontrol/bulkoperations/{bulk['id']}"
        )
        assert status == 200, current
        if current["status"] == "COMPLETED":
            break
        assert time.monotonic() < deadline, (current, log_path.read_text()[-3000:])
        time.sleep(0.1)
    status, listed = embedded.request(
        port, "GET", f"/devicecontrol/operations?bulkOperationId={bulk['id']}&pageSize=10"
    )
    assert status == 200, listed
    created = sorted(
        datetime.fromisoformat(op["creationTime"].replace("Z", "+00:00"))
        for op in listed["operations"]
    )
    assert len(created) == 3
    # creationTime shows whole milliseconds, truncated: at most 1 ms before the real moment.
    for k, moment in enumerate(created):
        assert moment >= start + timedelta(seconds=0.4 * k) - timedelta(milliseconds=1), created
