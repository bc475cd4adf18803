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
from django.utils import timezone

from bulkops import services as bulk_services
from bulkops.abort import (
    PENDING_FAIL_LEASE,
    bulk_operation_abort_check,
    bulk_pending_fail,
    bulk_pending_fail_sweep,
)
from bulkops.models import BulkOperation, BulkStatus
from devicecontrol.models import Operation
from devicecontrol.services import operation_retry, operation_update
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


ABORTED = "Rollout aborted: ANY failures reached 50% (minNumberOfExecuted 1)"
ANY_HALF = {
    "criteria": [{"failureType": "ANY", "thresholdPercentage": 50, "minNumberOfExecuted": 1}]
}


def aborted_bulk(size: int) -> BulkOperation:
    """An aborted bulk operation whose stop committed: its first child FAILED (by its agent), the
    `size - 1` others PENDING, the abort's marker leased (its finisher has not run yet)."""
    bulk = pending_bulk(size, abortConfig=ANY_HALF)
    operation_update(operation_id=children(bulk)[0].pk, data={"status": "FAILED"}, now=at(1))
    with transaction.atomic():
        locked = BulkOperation.objects.select_for_update().get(pk=bulk.pk)
        assert bulk_operation_abort_check(bulk=locked, now=timezone.now())
    assert reload(bulk).abort_reason["pendingFailed"] == 0
    return bulk


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


@pytest.mark.django_db(transaction=True)
def test_a_cancel_during_an_abort_joins_it_and_every_child_counts_in_pending_failed() -> None:
    """cancelPending while the abort's finisher still holds its lease (between two batches, or
    before its first): the abort's reason and count are kept, the cancel fails the children with
    them before it answers, and the abort's finisher then finds nothing left."""
    bulk = aborted_bulk(4)
    bulk_services.bulk_operation_cancel(bulk_operation_id=bulk.pk, cancel_pending=True, by="op")
    assert statuses(bulk)[1:] == [("FAILED", ABORTED)] * 3
    done = reload(bulk)
    assert done.abort_reason["pendingFailed"] == 3
    assert done.pending_fail is None
    assert done.status == BulkStatus.DELETED
    # The abort's own finisher, resumed: nothing left, the count unchanged.
    assert bulk_pending_fail(bulk_operation_id=bulk.pk, leased=True) == 0
    assert reload(bulk).abort_reason["pendingFailed"] == 3


@pytest.mark.django_db(transaction=True)
def test_a_cancel_while_an_abort_batch_runs_fails_each_child_once_counted_by_the_abort() -> None:
    """The abort's finisher (one child per batch) failed the first PENDING child and waits for a
    row an agent holds; a cancelPending then commits its stop and its own batch waits for that
    row too. The agent takes its child; the two finishers share the rest: every other child gets
    the abort's reason, once, and abortReason.pendingFailed counts exactly those."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks: PostgreSQL only (SQLite serialises whole transactions)")
    bulk = aborted_bulk(5)
    _, first, held, *rest = children(bulk)
    locked, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run(target: Any) -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    def agent() -> None:
        with transaction.atomic():
            Operation.objects.select_for_update().get(pk=held.pk)
            locked.set()
            release.wait(30)
            operation_update(operation_id=held.pk, data={"status": "EXECUTING"})

    holder = threading.Thread(target=run, args=(agent,))
    holder.start()
    assert locked.wait(30)
    canceller: threading.Thread | None = None
    finisher = threading.Thread(
        target=run,
        args=(lambda: bulk_pending_fail(bulk_operation_id=bulk.pk, batch_size=1, leased=True),),
    )
    finisher.start()
    try:
        deadline = time.monotonic() + 30
        while (
            Operation.objects.get(pk=first.pk).status == "PENDING" and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        assert Operation.objects.get(pk=first.pk).failure_reason == ABORTED  # its first batch
        stamp = reload(bulk).pending_fail["at"]
        canceller = threading.Thread(
            target=run,
            args=(
                lambda: bulk_services.bulk_operation_cancel(
                    bulk_operation_id=bulk.pk, cancel_pending=True, by="op"
                ),
            ),
        )
        canceller.start()
        while reload(bulk).pending_fail["at"] == stamp and time.monotonic() < deadline:
            time.sleep(0.01)
        marker = reload(bulk).pending_fail
        assert marker["at"] != stamp  # the cancel's stop committed, joining the abort's marker
        assert marker["reason"] == ABORTED
        assert finisher.is_alive()  # both wait for the agent's row
        assert canceller.is_alive()
    finally:  # never leave the agent's row held, nor a thread behind
        release.set()
        for thread in (holder, finisher, canceller):
            if thread is not None:
                thread.join(30)
    assert errors == []
    assert statuses(bulk)[1:] == [
        ("FAILED", ABORTED),
        ("EXECUTING", None),
        *[("FAILED", ABORTED)] * len(rest),
    ]
    done = reload(bulk)
    assert done.abort_reason["pendingFailed"] == 1 + len(rest)
    assert done.pending_fail is None


@pytest.mark.django_db(transaction=True)
def test_a_retry_by_hand_after_the_stop_is_left_pending_by_its_batches() -> None:
    """The batches fail the children that existed at the stop; an attempt created afterwards (a
    retry by hand of a FAILED child) is a later, explicit request and stays PENDING."""
    bulk = pending_bulk(3)
    first = children(bulk)[0]
    operation_update(operation_id=first.pk, data={"status": "FAILED"}, now=at(5))
    bulk_services.bulk_operation_stop(
        bulk_operation_id=bulk.pk, cancel_pending=True, by="op", now=at(10)
    )
    retry = operation_retry(operation=Operation.objects.get(pk=first.pk), now=at(11))
    assert bulk_pending_fail(bulk_operation_id=bulk.pk, leased=True) == 2
    assert statuses(bulk) == [
        ("FAILED", None),
        ("FAILED", "Cancelled by op"),
        ("FAILED", "Cancelled by op"),
        ("PENDING", None),
    ]
    assert Operation.objects.get(pk=retry.pk).status == "PENDING"
    assert reload(bulk).pending_fail is None
    assert counted_progress(bulk)["pending"] == 1
    assert bulk_pending_fail_sweep(now=at(10) + 10 * PENDING_FAIL_LEASE) == 0


@pytest.mark.django_db(transaction=True)
def test_a_retry_by_hand_after_an_abort_is_left_pending_and_not_counted() -> None:
    bulk = aborted_bulk(3)
    first = children(bulk)[0]
    retry = operation_retry(operation=Operation.objects.get(pk=first.pk))
    assert bulk_pending_fail(bulk_operation_id=bulk.pk, batch_size=1, leased=True) == 2
    assert Operation.objects.get(pk=retry.pk).status == "PENDING"
    assert statuses(bulk)[1:3] == [("FAILED", ABORTED)] * 2
    assert reload(bulk).abort_reason["pendingFailed"] == 2
    assert reload(bulk).pending_fail is None


@pytest.mark.django_db(transaction=True)
def test_no_abort_while_a_cancel_fails_the_pending_children() -> None:
    """cancelPending on a COMPLETED bulk operation keeps its status; while its batches run, the
    abort criteria are not evaluated (the first stop wins), so the cancel's children keep
    "Cancelled by" and no abortReason counts them."""
    bulk = create_bulk(make_fleet(3).group, creationRamp=1, abortConfig=ANY_HALF)
    advance(2)
    assert reload(bulk).status == BulkStatus.COMPLETED
    operation_update(operation_id=children(bulk)[0].pk, data={"status": "FAILED"}, now=at(3))
    bulk_services.bulk_operation_stop(
        bulk_operation_id=bulk.pk, cancel_pending=True, by="op", now=at(4)
    )
    with transaction.atomic():
        locked = BulkOperation.objects.select_for_update().get(pk=bulk.pk)
        assert not bulk_operation_abort_check(bulk=locked, now=at(5))
    assert bulk_pending_fail(bulk_operation_id=bulk.pk, leased=True) == 2
    assert statuses(bulk)[1:] == [("FAILED", "Cancelled by op")] * 2
    done = reload(bulk)
    assert done.abort_reason is None
    assert done.status == BulkStatus.COMPLETED
