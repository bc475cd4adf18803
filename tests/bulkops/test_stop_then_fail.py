"""Stopping a bulk operation with a backlog of PENDING children (README "Abort thresholds" and
"Cancel that reaches the device"): the stop (DELETED, abortReason, no further child, retries
dropped) commits in one short transaction; the PENDING children are failed afterwards in batches
of their own; and if the process dies in between, beat's sweep finishes them once the lease of
the process that stopped it expired."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.db import connection, transaction

from bulkops import services as bulk_services
from bulkops.abort import (
    PENDING_FAIL_LEASE,
    bulk_operation_abort_check,
    bulk_pending_fail,
    bulk_pending_fail_sweep,
)
from bulkops.models import BulkOperation, BulkStatus
from devicecontrol.models import Operation
from devicecontrol.services import operation_update
from tests.bulkops.conftest import (
    advance,
    at,
    children,
    counted_progress,
    create_bulk,
    make_fleet,
    reload,
)

MICROSECOND = PENDING_FAIL_LEASE / PENDING_FAIL_LEASE.total_seconds() / 1_000_000


def statuses(bulk: BulkOperation) -> list[tuple[str, str | None]]:
    return [(op.status, op.failure_reason) for op in children(bulk)]


def pending_bulk(size: int, **overrides: Any) -> BulkOperation:
    """An IN_PROGRESS bulk operation with `size` children, all PENDING, and one target left."""
    bulk = create_bulk(make_fleet(size + 1).group, creationRamp=1, **overrides)
    advance(size - 1)
    assert reload(bulk).status == BulkStatus.IN_PROGRESS
    assert [status for status, _ in statuses(bulk)] == ["PENDING"] * size
    return bulk


@pytest.mark.django_db
def test_a_cancel_whose_process_died_after_the_stop_is_finished_by_the_sweep() -> None:
    bulk = pending_bulk(3)
    stopped = at(10)
    # The DELETE's stop committed; its process died before the first batch.
    bulk_services.bulk_operation_stop(
        bulk_operation_id=bulk.pk, cancel_pending=True, by="op", now=stopped
    )
    assert reload(bulk).status == BulkStatus.DELETED
    assert reload(bulk).pending_fail is not None
    assert statuses(bulk) == [("PENDING", None)] * 3

    # While the lease runs, the sweep leaves it to its holder.
    assert bulk_pending_fail_sweep(now=stopped + PENDING_FAIL_LEASE - MICROSECOND) == 0
    assert statuses(bulk) == [("PENDING", None)] * 3

    assert bulk_pending_fail_sweep(now=stopped + PENDING_FAIL_LEASE) == 3
    assert statuses(bulk) == [("FAILED", "Cancelled by op")] * 3
    assert reload(bulk).pending_fail is None
    assert counted_progress(bulk)["failed"] == 3
    # Idempotent: nothing left, nothing marked.
    assert bulk_pending_fail_sweep(now=stopped + 2 * PENDING_FAIL_LEASE) == 0
    assert bulk_pending_fail(bulk_operation_id=bulk.pk, leased=True) == 0


@pytest.mark.django_db
def test_an_abort_whose_process_died_after_the_stop_is_finished_by_the_sweep() -> None:
    criteria = [{"failureType": "ANY", "thresholdPercentage": 50, "minNumberOfExecuted": 1}]
    bulk = pending_bulk(4, abortConfig={"criteria": criteria})
    first = children(bulk)[0]
    operation_update(operation_id=first.pk, data={"status": "FAILED"}, now=at(1))
    # The ramp's transaction that aborted committed; its process died before the first batch.
    with transaction.atomic():
        locked = BulkOperation.objects.select_for_update().get(pk=bulk.pk)
        assert bulk_operation_abort_check(bulk=locked, now=at(2))
    stopped = reload(bulk)
    assert stopped.status == BulkStatus.DELETED
    assert stopped.abort_reason["pendingFailed"] == 0
    assert [status for status, _ in statuses(bulk)] == ["FAILED", "PENDING", "PENDING", "PENDING"]

    assert bulk_pending_fail_sweep(now=at(2) + PENDING_FAIL_LEASE) == 3
    reason = "Rollout aborted: ANY failures reached 50% (minNumberOfExecuted 1)"
    assert statuses(bulk)[1:] == [("FAILED", reason)] * 3
    done = reload(bulk)
    assert done.abort_reason["pendingFailed"] == 3  # counted by the batches that failed them
    assert done.pending_fail is None


@pytest.mark.django_db
def test_the_batches_count_pending_failed_and_leave_the_marker_once_done() -> None:
    """An abort found by beat's sweep: the stop, then batches of one child each, every batch
    adding what it failed to abortReason.pendingFailed."""
    criteria = [{"failureType": "ANY", "thresholdPercentage": 50, "minNumberOfExecuted": 1}]
    bulk = pending_bulk(4, abortConfig={"criteria": criteria})
    operation_update(operation_id=children(bulk)[0].pk, data={"status": "FAILED"}, now=at(1))
    with transaction.atomic():
        locked = BulkOperation.objects.select_for_update().get(pk=bulk.pk)
        assert bulk_operation_abort_check(bulk=locked, now=at(2))
    assert bulk_pending_fail(bulk_operation_id=bulk.pk, batch_size=1, leased=True) == 3
    assert reload(bulk).abort_reason["pendingFailed"] == 3
    assert reload(bulk).pending_fail is None
    assert counted_progress(bulk) == {
        "pending": 0,
        "executing": 0,
        "successful": 0,
        "failed": 4,
        "all": 4,
    }


@pytest.mark.django_db(transaction=True)
def test_cancel_pending_commits_the_stop_before_failing_the_children() -> None:
    """An agent holds a PENDING child's row: DELETED is visible at once while the cancel's batch
    waits for that row; the agent's move to EXECUTING is kept, the others are cancelled."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks: PostgreSQL only (SQLite serialises whole transactions)")
    bulk = pending_bulk(3)
    first, second, third = children(bulk)
    locked, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def agent() -> None:
        try:
            with transaction.atomic():
                Operation.objects.select_for_update().get(pk=second.pk)
                locked.set()
                release.wait(30)
                operation_update(operation_id=second.pk, data={"status": "EXECUTING"})
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    def cancel() -> None:
        try:
            bulk_services.bulk_operation_cancel(
                bulk_operation_id=bulk.pk, cancel_pending=True, by="op"
            )
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    holder = threading.Thread(target=agent)
    holder.start()
    assert locked.wait(30)
    canceller = threading.Thread(target=cancel)
    canceller.start()
    deadline = time.monotonic() + 30
    while reload(bulk).status != BulkStatus.DELETED and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reload(bulk).status == BulkStatus.DELETED  # committed while a child's row is held
    assert canceller.is_alive()  # its batch waits for the agent's row
    assert statuses(bulk) == [("PENDING", None)] * 3  # that batch has not committed
    release.set()
    holder.join(30)
    canceller.join(30)
    assert errors == []
    assert statuses(bulk) == [
        ("FAILED", "Cancelled by op"),
        ("EXECUTING", None),
        ("FAILED", "Cancelled by op"),
    ]
    assert reload(bulk).pending_fail is None
    assert bulk_pending_fail_sweep(now=at(0) + 10 * PENDING_FAIL_LEASE) == 0
    del first, third
