"""The PENDING backlog of a stopped bulk operation leaves the ramp (bulkops.abort
`bulk_pending_fail_after_stop`): in a worker's run it goes to the task `fail_pending_children`
on the run's queue, so the ramp goes on creating other bulk operations' children while it is
failed; a `DELETE ...?cancelPending=true` fails it inline for BULK_PENDING_FAIL_INLINE_SECONDS
and hands the rest to that task (no broker: all inline); a lost task is finished by beat's sweep
once the lease expired.

Real Celery workers on a queue of their own (tests/bulkops/test_crash_safety.py `Workers`), small
batches (BULK_PENDING_FAIL_BATCH_SIZE in their environment) so a backlog spans many transactions.
Waits are bounded polls; they bound a broken run and assert nothing about speed."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db.models import Max, Min
from django.utils import timezone

from bulkops import abort, live, services, tasks
from bulkops.abort import ABORTED_PREFIX, PENDING_FAIL_LEASE, bulk_pending_fail_sweep
from bulkops.models import BulkOperation, BulkStatus
from devicecontrol.models import Operation, OperationStatus
from devicecontrol.services import operation_update
from deviceplatform.api.dates import parse_datetime
from deviceplatform.celery import app
from tests.bulkops.conftest import BULK, counted_progress
from tests.bulkops.test_crash_safety import Fleet, Workers, build_fleet
from tests.devicecontrol.conftest import call
from tests.factories import Clients

pytestmark = pytest.mark.django_db(transaction=True)

WAIT = 90.0  # a bound for a broken run, not a timing assertion
ANY_HALF = {
    "criteria": [{"failureType": "ANY", "thresholdPercentage": 50, "minNumberOfExecuted": 1}]
}


@pytest.fixture(autouse=True)
def live_published() -> Iterator[None]:
    """This process's live messages go out before the test's database does (bulkops/live.py's
    thread publishes the last change up to BULK_LIVE_INTERVAL_MS after it)."""
    yield
    live.throttle().wait_idle(WAIT)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Workers]:
    assert settings.REDIS_URL, "a real worker needs the broker: bin/test sets REDIS_URL"
    workers = Workers(tmp_path)
    workers.queue = f"test-backlog-{uuid.uuid4().hex[:12]}"
    workers.env.update(BULK_RAMP_BOOKING="1", BULK_PENDING_FAIL_BATCH_SIZE="10")
    try:
        yield workers
    finally:
        workers.stop_all()


def wait_for(done: Callable[[], bool], pool: Workers, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not done():
        logs = "\n".join(worker.log()[-2000:] for worker in pool.started)
        assert time.monotonic() < deadline, f"{what} never happened\n{logs}"
        time.sleep(0.05)


def children(bulk: BulkOperation) -> Any:
    return Operation.objects.filter(bulk_operation_id=bulk.pk)


def pending(bulk: BulkOperation) -> int:
    return children(bulk).filter(status=OperationStatus.PENDING).count()


def row(bulk: BulkOperation) -> BulkOperation:
    return BulkOperation.objects.get(pk=bulk.pk)


def created_bulk(fleet: Fleet, now: datetime | None = None, **data: Any) -> BulkOperation:
    return services.bulk_operation_create(
        data={
            "groupId": fleet.group.pk,
            "startDate": (now or timezone.now()).isoformat(),
            "creationRamp": 0,
            "operationPrototype": {"description": "Restart", "c8y_Restart": {}},
            **data,
        },
        now=now,
    )


def all_pending(size: int, **data: Any) -> BulkOperation:
    """A COMPLETED bulk operation whose `size` children are all PENDING (created in-process)."""
    bulk = created_bulk(build_fleet(size), **data)
    services.bulk_operations_advance()
    assert row(bulk).status == BulkStatus.COMPLETED
    assert pending(bulk) == size
    return bulk


def running(size: int) -> BulkOperation:
    """An IN_PROGRESS bulk operation with `size` PENDING children: its first wave, whose gate
    waits for them (no agent), and one device in the second."""
    bulk = created_bulk(build_fleet(size + 1), waves=[{"size": size}, {"percentage": 100}])
    services.bulk_operations_advance()
    assert row(bulk).status == BulkStatus.IN_PROGRESS
    assert pending(bulk) == size
    return bulk


def due_with_backlog(size: int) -> BulkOperation:
    """An IN_PROGRESS bulk operation with abort criteria, `size` PENDING children and its next
    child due now: a ramp run claims it (one second a child, started `size` seconds ago)."""
    start = timezone.now() - timedelta(seconds=size + 1)
    bulk = created_bulk(build_fleet(size + 1), now=start, creationRamp=1, abortConfig=ANY_HALF)
    services.bulk_operations_advance(now=start + timedelta(seconds=size - 0.5))
    assert row(bulk).status == BulkStatus.IN_PROGRESS
    assert pending(bulk) == size
    return bulk


@pytest.mark.parametrize("run", ["ramp", "beat"])
def test_the_ramp_creates_other_children_while_an_aborts_backlog_is_failed(
    pool: Workers, run: str
) -> None:
    """The ramp (its check before A's next batch) or beat's abort sweep (A being COMPLETED), in
    one beat tick, aborts A (3,000 PENDING children) and hands the backlog to a task: the booked runs
    that follow create B's children while that task fails A's, in the other worker. Inline
    (before), the run failed all of A's before it booked B's next run: no child of B was created
    between A's abort and its last failed child."""
    made = {"ramp": due_with_backlog, "beat": lambda n: all_pending(n, abortConfig=ANY_HALF)}
    aborted = made[run](3000)
    first = children(aborted).order_by("pk").first()
    operation_update(operation_id=first.pk, data={"status": "FAILED"})  # 1 of 1 failed: fires
    for _ in range(2):
        pool.start().wait_ready()
    other = created_bulk(build_fleet(200), creationRamp=0.05)  # 10 s of due children

    # One beat tick (a booked run would fan out a run for B: in parallel even before). Ramp: A is
    # due first, its check aborts it before its next batch; beat: the sweep after the ramp does.
    tasks.advance_bulk_operations.apply_async(queue=pool.queue)
    wait_for(lambda: row(aborted).status == BulkStatus.DELETED, pool, "the abort")
    wait_for(lambda: row(aborted).pending_fail is None, pool, "the backlog failed")

    assert pending(aborted) == 0
    reason = row(aborted).abort_reason
    assert reason is not None
    assert reason["pendingFailed"] == 2999
    assert reason["createdChildren"] == 3000  # ramp: stopped before A's next (due) child
    failed = children(aborted).filter(failure_reason__startswith=ABORTED_PREFIX)
    window = failed.aggregate(first=Min("status_changed_at"), last=Max("status_changed_at"))
    assert failed.count() == 2999
    abort_time = parse_datetime(reason["time"], field="time")
    assert abort_time <= window["first"]
    inside = children(other).filter(creation_time__gt=abort_time, creation_time__lt=window["last"])
    assert inside.exists(), (abort_time, window, list(children(other).values("creation_time")))


def test_a_killed_hand_off_task_is_finished_by_the_sweep_once_the_lease_expired(
    pool: Workers,
) -> None:
    bulk = all_pending(3000)
    services.bulk_operation_stop(bulk_operation_id=bulk.pk, cancel_pending=True, by="op")
    worker = pool.start()
    worker.wait_ready()

    tasks.fail_pending_children_send(bulk.pk, queue=pool.queue)
    wait_for(lambda: pending(bulk) <= 2900, pool, "the task's first batches")
    worker.process.kill()
    worker.process.wait(timeout=30)
    left = pending(bulk)
    assert left > 0, "the task finished before it was killed: nothing left to show"
    assert row(bulk).pending_fail is not None

    # The dead task's lease (renewed by its last batch) still runs: the sweep leaves it.
    assert bulk_pending_fail_sweep() == 0
    assert pending(bulk) == left
    # Once expired, the sweep finishes the children, each once.
    assert bulk_pending_fail_sweep(now=timezone.now() + PENDING_FAIL_LEASE) == left
    assert pending(bulk) == 0
    assert row(bulk).pending_fail is None
    assert set(children(bulk).values_list("failure_reason", flat=True)) == {"Cancelled by op"}
    assert counted_progress(bulk)["failed"] == 3000


def test_a_task_never_sent_is_handed_off_again_by_beats_sweep_once_the_lease_expired(
    pool: Workers,
) -> None:
    """The stop committed a lease that expired without any batch (its task was lost): beat's
    tick in a worker takes the lease and sends the task again instead of failing them in the tick."""
    bulk = running(300)
    past = timezone.now() - PENDING_FAIL_LEASE - timedelta(seconds=1)
    services.bulk_operation_stop(bulk_operation_id=bulk.pk, cancel_pending=True, by="op", now=past)
    worker = pool.start()
    worker.wait_ready()

    tasks.advance_bulk_operations.apply_async(queue=pool.queue)  # one beat tick
    wait_for(lambda: row(bulk).pending_fail is None, pool, "the sweep's task")

    assert pending(bulk) == 0
    assert set(children(bulk).values_list("failure_reason", flat=True)) == {"Cancelled by op"}
    assert "handing them to a task again" in worker.log()
    assert counted_progress(bulk)["failed"] == 300


@pytest.fixture
def default_queue(pool: Workers) -> Iterator[None]:
    """Tasks sent without a queue go to the pool's (a request's hand-off): the shared default
    queue is consumed by other workers on this machine."""
    before = app.conf.task_default_queue
    app.conf.task_default_queue = pool.queue
    try:
        yield
    finally:
        app.conf.task_default_queue = before


def test_a_cancel_pending_whose_budget_is_spent_answers_204_and_a_worker_finishes(
    pool: Workers, default_queue: None, bapi: Clients, settings: Any
) -> None:
    """Budget 0: no batch in the request. The stop is committed when the 204 comes, every child
    still PENDING; the task waits in the queue until a worker starts, which fails them all."""
    settings.BULK_PENDING_FAIL_INLINE_SECONDS = 0
    bulk = running(300)

    response = call(bapi["bulk_admin"], "DELETE", f"{BULK}/{bulk.pk}?cancelPending=true")

    assert response.status_code == 204
    assert row(bulk).status == BulkStatus.DELETED
    assert row(bulk).pending_fail is not None
    assert pending(bulk) == 300
    pool.start().wait_ready()
    wait_for(lambda: row(bulk).pending_fail is None, pool, "the worker's batches")
    assert pending(bulk) == 0
    assert set(children(bulk).values_list("failure_reason", flat=True)) == {
        "Cancelled by bulk_admin"
    }
    assert counted_progress(bulk)["failed"] == 300


@pytest.fixture
def no_broker() -> Iterator[None]:
    """As without REDIS_URL: tasks run eagerly in the caller (the embedded server)."""
    before = app.conf.task_always_eager
    app.conf.task_always_eager = True
    try:
        yield
    finally:
        app.conf.task_always_eager = before


def test_without_a_broker_a_cancel_pending_fails_every_child_before_the_204(
    no_broker: None, bapi: Clients, settings: Any
) -> None:
    settings.BULK_PENDING_FAIL_INLINE_SECONDS = 0
    settings.BULK_PENDING_FAIL_BATCH_SIZE = 7
    bulk = running(30)

    response = call(bapi["bulk_admin"], "DELETE", f"{BULK}/{bulk.pk}?cancelPending=true")

    assert response.status_code == 204
    assert row(bulk).status == BulkStatus.DELETED
    assert row(bulk).pending_fail is None
    assert pending(bulk) == 0
    assert counted_progress(bulk)["failed"] == 30


def test_a_ramp_run_outside_a_worker_fails_the_backlog_itself(settings: Any) -> None:
    """Tests, the shell, management code: no worker task to hand it to, so the run that aborts
    fails every PENDING child before it returns (the task is never sent)."""
    settings.BULK_PENDING_FAIL_BATCH_SIZE = 7
    bulk = all_pending(30, abortConfig=ANY_HALF)
    operation_update(
        operation_id=children(bulk).order_by("pk").first().pk, data={"status": "FAILED"}
    )

    tasks.advance_bulk_operations()  # beat's run, called directly: its abort sweep fires

    assert row(bulk).status == BulkStatus.DELETED
    assert row(bulk).pending_fail is None
    assert pending(bulk) == 0
    assert row(bulk).abort_reason["pendingFailed"] == 29


def test_a_task_that_waited_past_its_lease_leaves_the_children_to_whoever_took_it() -> None:
    """A hand-off task carries the lease as it was sent (the marker's `at`). Queued behind busy
    workers past the lease, beat's sweep takes the lease and sends another task; the first one,
    when it finally runs, finds the lease renewed by someone else and does nothing (before, every
    copy ran, one trailing the other). The second holds the current lease and fails them."""
    bulk = running(30)
    services.bulk_operation_stop(bulk_operation_id=bulk.pk, cancel_pending=True, by="op")
    first_lease = row(bulk).pending_fail["at"]
    later = timezone.now() + PENDING_FAIL_LEASE + timedelta(seconds=1)
    taken = abort._lease(bulk.pk, later, leased=False)  # the sweep takes the expired lease
    assert taken is not None
    assert taken["at"] != first_lease

    assert tasks.fail_pending_children(bulk.pk, lease_at=first_lease) == 0
    assert pending(bulk) == 30
    assert tasks.fail_pending_children(bulk.pk, lease_at=taken["at"]) == 30
    assert pending(bulk) == 0
    assert row(bulk).pending_fail is None
