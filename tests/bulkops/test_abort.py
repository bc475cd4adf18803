"""Abort thresholds (issue 14 item 1, README "Abort thresholds"): "abortConfig" is validated and
echoed; once enough children have finished and the failed share reaches a criterion's threshold,
the ramp creates no further child, PENDING children fail with "Rollout aborted: ...", and the
bulk operation ends DELETED / CANCELED with "abortReason". Driven by `now`; the end-to-end runs
with a real worker and beat are in test_abort_live.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, transaction
from django.utils import timezone

from bulkops import abort
from bulkops.abort import AbortCounts, abort_counts, bulk_operations_abort_sweep
from bulkops.models import BulkOperation, BulkStatus
from bulkops.serializers import bulk_operation_json
from devicecontrol.models import Operation, OperationStatus
from devicecontrol.services import (
    operation_retry,
    operation_update,
    operations_expire,
    operations_retry_due,
)
from tests.bulkops.conftest import (
    BULK,
    T0,
    Fleet,
    advance,
    at,
    bulk_data,
    children,
    counted_progress,
    create_bulk,
    get_bulk,
    make_device,
    make_fleet,
    make_group,
    reload,
)
from tests.bulkops.test_events import Capture, hand_offs
from tests.devicecontrol.conftest import as_get, call, changed, ok_json
from tests.factories import Clients
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db

INVALID = "devicecontrol/Invalid Data"
BULK_TYPE = "application/vnd.com.nsn.cumulocity.bulkoperation+json"


def config(failure_type: str = "ANY", threshold: float = 30, minimum: int = 5) -> dict[str, Any]:
    return {
        "criteria": [
            {
                "failureType": failure_type,
                "thresholdPercentage": threshold,
                "minNumberOfExecuted": minimum,
            }
        ]
    }


def set_status(operation: Operation, status: str, seconds: float = 0, **data: Any) -> None:
    operation_update(operation_id=operation.pk, data={"status": status, **data}, now=at(seconds))


# --- validation --------------------------------------------------------------------------------


BAD_CONFIGS = [
    pytest.param("ANY", id="not-an-object"),
    pytest.param([], id="a-list"),
    pytest.param({}, id="no-criteria"),
    pytest.param({"criteria": []}, id="empty-criteria"),
    pytest.param({"criteria": {"failureType": "ANY"}}, id="criteria-not-a-list"),
    pytest.param(
        {"criteria": [{"failureType": "ANY", "thresholdPercentage": 10}], "x": 1},
        id="unknown-config-key",
    ),  # fmt: skip
    pytest.param({"criteria": ["ANY"]}, id="criterion-not-an-object"),
    pytest.param({"criteria": [{"thresholdPercentage": 10}]}, id="no-failure-type"),
    pytest.param(
        {"criteria": [{"failureType": "BROKEN", "thresholdPercentage": 10}]},
        id="unknown-failure-type",
    ),  # fmt: skip
    pytest.param(
        {"criteria": [{"failureType": "any", "thresholdPercentage": 10}]},
        id="failure-type-lower-case",
    ),  # fmt: skip
    pytest.param({"criteria": [{"failureType": "ANY"}]}, id="no-threshold"),
    pytest.param({"criteria": [{"failureType": "ANY", "thresholdPercentage": 0}]}, id="zero"),
    pytest.param({"criteria": [{"failureType": "ANY", "thresholdPercentage": -5}]}, id="negative"),
    pytest.param(
        {"criteria": [{"failureType": "ANY", "thresholdPercentage": 100.5}]}, id="above-100"
    ),  # fmt: skip
    pytest.param(
        {"criteria": [{"failureType": "ANY", "thresholdPercentage": "10"}]}, id="threshold-string"
    ),  # fmt: skip
    pytest.param(
        {"criteria": [{"failureType": "ANY", "thresholdPercentage": True}]}, id="threshold-bool"
    ),  # fmt: skip
    pytest.param(
        {"criteria": [{"failureType": "ANY", "thresholdPercentage": 10, "minNumberOfExecuted": 0}]},
        id="min-zero",
    ),
    pytest.param(
        {
            "criteria": [
                {"failureType": "ANY", "thresholdPercentage": 10, "minNumberOfExecuted": 2.5}
            ]
        },
        id="min-fraction",
    ),
    pytest.param(
        {
            "criteria": [
                {"failureType": "ANY", "thresholdPercentage": 10, "minNumberOfExecuted": "5"}
            ]
        },
        id="min-string",
    ),
    pytest.param(
        {"criteria": [{"failureType": "ANY", "thresholdPercentage": 10, "maxNumberOfFailed": 5}]},
        id="unknown-criterion-key",
    ),
    pytest.param(
        {"criteria": [{"failureType": "ANY", "thresholdPercentage": 10}] * 11}, id="too-many"
    ),
]


@pytest.mark.parametrize("bad", BAD_CONFIGS)
def test_a_bad_abort_config_is_422_on_create_and_writes_nothing(
    bapi: Clients, fleet: Fleet, row_counts: Callable[[], dict[str, int]], bad: Any
) -> None:
    admin = bapi["bulk_admin"]
    before = row_counts()
    response = call(admin, "POST", BULK, bulk_data(fleet.group, abortConfig=bad))
    body = assert_error(response, 422, INVALID)
    assert "abortConfig" in body["message"]
    assert row_counts() == before


@pytest.mark.parametrize("bad", BAD_CONFIGS[:6])
def test_a_bad_abort_config_is_422_on_put_and_changes_nothing(
    bapi: Clients, fleet: Fleet, bad: Any
) -> None:
    bulk = create_bulk(fleet.group, abortConfig=config())
    before = get_bulk(bapi["bulk_reader"], bulk.pk)
    response = call(bapi["bulk_admin"], "PUT", f"{BULK}/{bulk.pk}", {"abortConfig": bad})
    assert_error(response, 422, INVALID)
    assert get_bulk(bapi["bulk_reader"], bulk.pk) == before


def test_abort_config_is_echoed_as_validated_and_a_plain_bulk_shows_none(
    bapi: Clients, fleet: Fleet
) -> None:
    given = {
        "criteria": [
            {"failureType": "FAILED", "thresholdPercentage": 12.5, "minNumberOfExecuted": 20},
            {"failureType": "TIMED_OUT", "thresholdPercentage": 50.0},
        ]
    }
    body = bulk_data(fleet.group, abortConfig=given)
    response = call(bapi["bulk_admin"], "POST", BULK, body, accept=BULK_TYPE)
    created = ok_json(response, 201)
    expected = {
        "criteria": [
            {"failureType": "FAILED", "thresholdPercentage": 12.5, "minNumberOfExecuted": 20},
            # minNumberOfExecuted defaults to 1; a whole-number percentage reads back as one.
            {"failureType": "TIMED_OUT", "thresholdPercentage": 50, "minNumberOfExecuted": 1},
        ]
    }
    assert created["abortConfig"] == expected
    assert "abortReason" not in created
    row = BulkOperation.objects.get(pk=int(created["id"]))
    assert row.abort_config == expected
    assert "abortConfig" not in row.fragments  # a column, not a fragment
    assert get_bulk(bapi["bulk_reader"], created["id"])["abortConfig"] == expected

    plain = ok_json(
        call(bapi["bulk_admin"], "POST", BULK, bulk_data(fleet.group), accept=BULK_TYPE), 201
    )
    assert "abortConfig" not in plain
    assert "abortReason" not in plain
    # An explicit null is no thresholds at all; abortReason is read-only and ignored.
    body = bulk_data(fleet.group, abortConfig=None, abortReason={"failed": 1})
    quiet = ok_json(call(bapi["bulk_admin"], "POST", BULK, body, accept=BULK_TYPE), 201)
    assert "abortConfig" not in quiet
    assert "abortReason" not in quiet


def test_put_changes_or_removes_the_abort_config_of_a_running_bulk(
    bapi: Clients, fleet: Fleet
) -> None:
    bulk = create_bulk(fleet.group, abortConfig=config())
    advance(0)
    assert reload(bulk).status == BulkStatus.IN_PROGRESS
    path = f"{BULK}/{bulk.pk}"
    changed_config = config("FAILED", 50, 2)
    body = ok_json(
        call(bapi["bulk_admin"], "PUT", path, {"abortConfig": changed_config}, accept=BULK_TYPE)
    )
    assert body["abortConfig"] == changed_config
    assert reload(bulk).abort_config == changed_config
    # A PUT without the key keeps it; null removes it.
    ok_json(call(bapi["bulk_admin"], "PUT", path, {"creationRamp": 2}, accept=BULK_TYPE))
    assert reload(bulk).abort_config == changed_config
    body = ok_json(call(bapi["bulk_admin"], "PUT", path, {"abortConfig": None}, accept=BULK_TYPE))
    assert "abortConfig" not in body
    assert reload(bulk).abort_config is None


def test_the_preview_refuses_a_bad_abort_config() -> None:
    from bulkops.services import bulk_operation_preview

    fleet = make_fleet(1)
    with pytest.raises(Exception, match="abortConfig"):
        bulk_operation_preview(data=bulk_data(fleet.group, abortConfig={"criteria": []}), now=T0)


# --- the ramp stops ----------------------------------------------------------------------------


def test_the_ramp_aborts_before_its_next_batch_once_the_threshold_is_crossed(
    bapi: Clients, django_capture_on_commit_callbacks: Capture
) -> None:
    fleet = make_fleet(10)
    bulk = create_bulk(fleet.group, creationRamp=1, abortConfig=config("ANY", 30, 5))
    assert advance(4) == 5
    ops = children(bulk)
    set_status(ops[0], "FAILED", 4.1, failureReason="Disk full")
    for op in ops[1:4]:
        set_status(op, "SUCCESSFUL", 4.2)
    # 1 of 4 finished failed: fewer than minNumberOfExecuted, the ramp goes on.
    assert advance(5) == 1
    set_status(ops[4], "EXECUTING", 5.1)
    set_status(ops[4], "FAILED", 5.2)  # 2 of 5 = 40% >= 30%: crossed
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        assert advance(6) == 0  # this batch is not created
    assert advance(60) == 0  # nor any later one

    ops = children(bulk)
    assert len(ops) == 6
    row = reload(bulk)
    assert (row.status, row.next_due_at, row.next_index) == (BulkStatus.DELETED, None, 6)
    summary = "ANY failures reached 30% (minNumberOfExecuted 5)"
    assert row.abort_reason == {
        "criterion": {"failureType": "ANY", "thresholdPercentage": 30, "minNumberOfExecuted": 5},
        "failed": 2,
        "finished": 5,
        "percentage": 40,
        "pendingFailed": 1,
        "createdChildren": 6,
        "time": "2031-03-01T12:00:06.000Z",
        "message": f"Rollout aborted: {summary}: 2 of 5 finished failed",
    }
    pending = ops[5]
    assert (pending.status, pending.failure_reason) == ("FAILED", f"Rollout aborted: {summary}")
    assert pending.status_changed_at == at(6)
    # Its UPDATE event went out with the abort's commit; the others kept what they had.
    assert hand_offs(callbacks) == [1]
    assert ops[0].failure_reason == "Disk full"
    assert [op.status for op in ops[1:4]] == ["SUCCESSFUL"] * 3

    body = get_bulk(bapi["bulk_reader"], bulk.pk)
    assert (body["status"], body["generalStatus"]) == ("DELETED", "CANCELED")
    assert body["abortReason"] == row.abort_reason
    assert body["progress"] == {
        "pending": 0,
        "failed": 3,
        "executing": 0,
        "successful": 3,
        "all": 6,
    }
    assert body["progress"] == counted_progress(bulk)
    # An aborted bulk operation is over: a PUT is refused like on any cancelled one.
    response = call(bapi["bulk_admin"], "PUT", f"{BULK}/{bulk.pk}", {"abortConfig": None})
    assert_error(response, 422, INVALID)


def test_the_abort_sends_an_update_event_for_each_pending_child(
    subscriber: Any, django_capture_on_commit_callbacks: Capture
) -> None:
    fleet = make_fleet(3)
    bulk = create_bulk(fleet.group, creationRamp=0, abortConfig=config("ANY", 50, 1))
    advance(0)
    first, *rest = children(bulk)
    set_status(first, "FAILED", 0.5)
    every = subscriber("/operations/*")
    with django_capture_on_commit_callbacks(execute=True):
        assert bulk_operations_abort_sweep(now=at(1)) == [bulk.pk]
    assert every.received() == [changed("UPDATE", as_get(op)) for op in rest]
    assert all(as_get(op)["failureReason"].startswith("Rollout aborted: ") for op in rest)


def test_below_the_minimum_nothing_fires_and_a_success_can_reach_it(fleet5: Fleet) -> None:
    bulk = create_bulk(fleet5.group, creationRamp=1, abortConfig=config("ANY", 50, 4))
    advance(4)
    ops = children(bulk)
    for op in ops[:3]:
        set_status(op, "FAILED", 4.5)  # 3 of 3: 100%, but fewer than 4 finished
    assert bulk_operations_abort_sweep(now=at(5)) == []
    assert reload(bulk).status == BulkStatus.COMPLETED
    set_status(ops[3], "SUCCESSFUL", 5.5)  # 3 of 4 = 75%: the 4th finished one fires
    assert bulk_operations_abort_sweep(now=at(6)) == [bulk.pk]
    row = reload(bulk)
    assert row.status == BulkStatus.DELETED
    assert (row.abort_reason["failed"], row.abort_reason["finished"]) == (3, 4)
    assert Operation.objects.get(pk=ops[4].pk).failure_reason.startswith("Rollout aborted: ")


def test_exactly_the_threshold_fires_and_just_below_does_not() -> None:
    fleet = make_fleet(8)
    bulk = create_bulk(fleet.group, creationRamp=0, abortConfig=config("ANY", 25, 1))
    advance(0)
    ops = children(bulk)
    for op in ops[:5]:
        set_status(op, "SUCCESSFUL", 1)
    set_status(ops[5], "FAILED", 1)  # 1 of 6 = 16.7%
    assert bulk_operations_abort_sweep(now=at(2)) == []
    set_status(ops[6], "SUCCESSFUL", 2)
    set_status(ops[7], "FAILED", 2)
    assert abort_counts(bulk_operation_id=bulk.pk) == AbortCounts(8, 2, 0)
    assert bulk_operations_abort_sweep(now=at(3)) == []  # all finished: the rollout is over
    exact = config("ANY", 25, 1)["criteria"][0]
    assert abort.criterion_fires(exact, AbortCounts(finished=8, failed=2, timed_out=0))
    assert not abort.criterion_fires(exact, AbortCounts(finished=9, failed=2, timed_out=0))
    assert not abort.criterion_fires(exact, AbortCounts(finished=0, failed=0, timed_out=0))


# --- failure types -----------------------------------------------------------------------------


def test_timed_out_counts_only_the_sweepers_failures_and_failed_only_the_others() -> None:
    fleet = make_fleet(8)
    prototype = {"description": "Restart", "c8y_Restart": {}, "pendingTimeout": 5}
    timed = create_bulk(
        fleet.group,
        creationRamp=1,
        operationPrototype=prototype,
        abortConfig=config("TIMED_OUT", 50, 4),
    )
    failed = create_bulk(
        fleet.group,
        creationRamp=1,
        operationPrototype=prototype,
        abortConfig=config("FAILED", 50, 4),
    )
    advance(5)  # 6 children each; 2 targets left
    for bulk in (timed, failed):
        ops = children(bulk)
        set_status(ops[0], "FAILED", 5.5, failureReason="Agent says no")
        set_status(ops[1], "FAILED", 5.5)
        set_status(ops[2], "SUCCESSFUL", 5.5)
    # The other three of each expire (5 s after their creation at 3, 4, 5): TIMED_OUT failures.
    assert operations_expire(now=at(10)) == 6
    assert abort_counts(bulk_operation_id=timed.pk) == AbortCounts(6, 5, 3)
    assert abort_counts(bulk_operation_id=failed.pk) == AbortCounts(6, 5, 3)
    # TIMED_OUT: 3 of 6 = 50% fires; FAILED: 2 of 6 = 33% does not.
    assert bulk_operations_abort_sweep(now=at(5.9)) == [timed.pk]
    row = reload(timed)
    assert row.abort_reason["criterion"]["failureType"] == "TIMED_OUT"
    assert (row.abort_reason["failed"], row.abort_reason["finished"]) == (3, 6)
    assert reload(failed).status == BulkStatus.IN_PROGRESS


def test_a_device_counts_by_its_latest_attempt() -> None:
    fleet = make_fleet(4)
    bulk = create_bulk(fleet.group, creationRamp=0, abortConfig=config("ANY", 50, 2))
    advance(0)
    ops = children(bulk)
    set_status(ops[0], "FAILED", 1)
    retry = operation_retry(operation=Operation.objects.get(pk=ops[0].pk), now=at(1.5))
    set_status(ops[1], "SUCCESSFUL", 1)
    # The failed first attempt was superseded by a PENDING retry: 0 of 1 finished failed.
    assert abort_counts(bulk_operation_id=bulk.pk) == AbortCounts(1, 0, 0)
    set_status(retry, "FAILED", 2)
    set_status(ops[2], "FAILED", 2)
    assert abort_counts(bulk_operation_id=bulk.pk) == AbortCounts(3, 2, 0)
    assert bulk_operations_abort_sweep(now=at(3)) == [bulk.pk]
    assert Operation.objects.get(pk=ops[3].pk).failure_reason.startswith("Rollout aborted: ")


def test_a_device_without_an_agent_counts_as_failed() -> None:
    fleet = make_fleet(2)
    orphans = [make_device(f"Orphan {i}") for i in range(3)]
    group = make_group(*fleet.devices, *orphans)
    bulk = create_bulk(group, creationRamp=1, abortConfig=config("FAILED", 50, 2))
    # The agent's two devices first, then two without an agent, created FAILED.
    assert advance(3) == 4
    assert abort_counts(bulk_operation_id=bulk.pk) == AbortCounts(2, 2, 0)
    assert advance(4) == 0
    row = reload(bulk)
    assert (row.status, row.abort_reason["pendingFailed"]) == (BulkStatus.DELETED, 2)


def test_the_first_criterion_that_fires_is_reported() -> None:
    fleet = make_fleet(4)
    both = {
        "criteria": [
            {"failureType": "TIMED_OUT", "thresholdPercentage": 10},
            {"failureType": "FAILED", "thresholdPercentage": 60, "minNumberOfExecuted": 2},
            {"failureType": "ANY", "thresholdPercentage": 50, "minNumberOfExecuted": 2},
        ]
    }
    bulk = create_bulk(fleet.group, creationRamp=0, abortConfig=both)
    advance(0)
    ops = children(bulk)
    set_status(ops[0], "FAILED", 1)
    set_status(ops[1], "SUCCESSFUL", 1)  # FAILED: 50% < 60%; ANY: 50% >= 50%
    assert bulk_operations_abort_sweep(now=at(2)) == [bulk.pk]
    reason = reload(bulk).abort_reason
    assert reason["criterion"] == {
        "failureType": "ANY",
        "thresholdPercentage": 50,
        "minNumberOfExecuted": 2,
    }
    assert reason["pendingFailed"] == 2


# --- the sweep (beat) --------------------------------------------------------------------------


def test_the_sweep_aborts_a_bulk_that_is_not_due(fleet: Fleet) -> None:
    bulk = create_bulk(fleet.group, creationRamp=3600, abortConfig=config("ANY", 100, 1))
    advance(0)
    (first,) = children(bulk)
    set_status(first, "FAILED", 1)
    assert advance(10) == 0  # not due for an hour: the ramp does not look at it
    assert reload(bulk).status == BulkStatus.IN_PROGRESS
    assert bulk_operations_abort_sweep(now=at(11)) == [bulk.pk]
    row = reload(bulk)
    assert (row.status, row.next_due_at, row.abort_reason["pendingFailed"]) == ("DELETED", None, 0)
    assert advance(7200) == 0
    assert len(children(bulk)) == 1


def test_the_sweep_aborts_a_completed_bulk_with_pending_children_only(fleet5: Fleet) -> None:
    over = create_bulk(fleet5.group, creationRamp=0, abortConfig=config("ANY", 20, 1))
    running = create_bulk(fleet5.group, creationRamp=0, abortConfig=config("ANY", 20, 1))
    advance(0)
    for op in children(over):
        set_status(op, "FAILED", 1)
    set_status(children(running)[0], "FAILED", 1)
    set_status(children(running)[1], "EXECUTING", 1)
    assert {reload(over).status, reload(running).status} == {BulkStatus.COMPLETED}
    assert bulk_operations_abort_sweep(now=at(2)) == [running.pk]
    assert reload(over).status == BulkStatus.COMPLETED  # finished: nothing left to stop
    assert reload(over).abort_reason is None
    statuses = [op.status for op in children(running)]
    assert statuses == ["FAILED", "EXECUTING", "FAILED", "FAILED", "FAILED"]  # EXECUTING stays


def test_the_sweep_costs_one_query_without_firing_candidates(
    fleet: Fleet, django_assert_num_queries: Any
) -> None:
    plain = create_bulk(fleet.group, creationRamp=0)
    watched = create_bulk(fleet.group, creationRamp=0, abortConfig=config("ANY", 50, 1))
    advance(0)
    for op in children(plain):
        set_status(op, "FAILED", 1)  # a plain bulk is never aborted
    set_status(children(watched)[0], "SUCCESSFUL", 1)
    with django_assert_num_queries(1):
        assert bulk_operations_abort_sweep(now=at(2)) == []
    assert reload(plain).status == BulkStatus.COMPLETED


def test_the_beat_task_runs_the_sweep(fleet: Fleet, settings: Any) -> None:
    from bulkops.tasks import advance_bulk_operations

    settings.BULK_RAMP_BOOKING = False
    bulk = create_bulk(
        fleet.group,
        now=timezone.now(),
        startDate="2020-01-01T00:00:00.000Z",
        creationRamp=3600,
        abortConfig=config("ANY", 100, 1),
    )
    advance_bulk_operations.apply(kwargs={})  # creates the first child; the next in an hour
    (first,) = children(bulk)
    operation_update(operation_id=first.pk, data={"status": "FAILED"})
    advance_bulk_operations.apply(kwargs={})
    assert reload(bulk).status == BulkStatus.DELETED


def test_the_abort_config_of_a_bulk_json_is_its_column(fleet: Fleet) -> None:
    bulk = create_bulk(fleet.group, abortConfig=config())
    body = bulk_operation_json(reload(bulk), base="")
    assert body["abortConfig"] == config()


# --- locking -----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_sweep_leaves_a_bulk_locked_by_the_ramp_and_takes_it_on_its_next_run() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("SKIP LOCKED: PostgreSQL only (SQLite serialises whole transactions)")
    fleet = make_fleet(2)
    bulk = create_bulk(fleet.group, creationRamp=3600, abortConfig=config("ANY", 100, 1))
    advance(0)
    set_status(children(bulk)[0], "FAILED", 1)
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        try:
            with transaction.atomic():
                BulkOperation.objects.select_for_update().get(pk=bulk.pk)
                locked.set()
                release.wait(30)
        finally:
            connection.close()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(30)
        assert bulk_operations_abort_sweep(now=at(2)) == []
        assert reload(bulk).status == BulkStatus.IN_PROGRESS
    finally:
        release.set()
        holder.join(30)
    assert bulk_operations_abort_sweep(now=at(3)) == [bulk.pk]
    assert reload(bulk).status == BulkStatus.DELETED


@pytest.mark.django_db(transaction=True)
def test_the_abort_waits_for_a_child_an_agent_holds_and_leaves_it_if_it_moved_on() -> None:
    """An agent holds a PENDING child's row while moving it to EXECUTING: the stop (DELETED,
    abortReason) commits at once, without waiting for it; the batch that fails the PENDING
    children waits for the row, sees it EXECUTING, and leaves it."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks: PostgreSQL only (SQLite serialises whole transactions)")
    fleet = make_fleet(3)
    bulk = create_bulk(fleet.group, creationRamp=0, abortConfig=config("ANY", 100, 1))
    advance(0)
    first, second, third = children(bulk)
    set_status(first, "FAILED", 1)
    locked, release = threading.Event(), threading.Event()

    def agent() -> None:
        try:
            with transaction.atomic():
                Operation.objects.select_for_update().get(pk=second.pk)
                locked.set()
                release.wait(30)
                operation_update(operation_id=second.pk, data={"status": "EXECUTING"})
        finally:
            connection.close()

    thread = threading.Thread(target=agent)
    thread.start()
    assert locked.wait(30)
    result: list[list[int]] = []
    sweeper = threading.Thread(
        target=lambda: (result.append(bulk_operations_abort_sweep(now=at(2))), connection.close())
    )
    sweeper.start()
    deadline = time.monotonic() + 30
    while reload(bulk).status != BulkStatus.DELETED and time.monotonic() < deadline:
        time.sleep(0.01)
    stopped = reload(bulk)
    assert stopped.status == BulkStatus.DELETED  # the stop committed while the agent holds a row
    assert stopped.abort_reason["pendingFailed"] == 0  # no batch committed yet
    assert stopped.pending_fail is not None
    assert sweeper.is_alive()  # its batch waits for the agent's row
    assert Operation.objects.get(pk=third.pk).status == "PENDING"
    release.set()
    thread.join(30)
    sweeper.join(30)
    assert result == [[bulk.pk]]
    statuses = {op.pk: op.status for op in children(bulk)}
    assert statuses == {first.pk: "FAILED", second.pk: "EXECUTING", third.pk: "FAILED"}
    assert reload(bulk).abort_reason["pendingFailed"] == 1
    assert reload(bulk).pending_fail is None  # done: the sweep has nothing left


@pytest.mark.django_db(transaction=True)
def test_agents_failing_children_while_the_ramp_runs_stop_it_consistently() -> None:
    """Race: two agent threads fail every child they see while the ramp advances in small
    batches. The bulk operation ends aborted, no child is created after the abort, none is
    left PENDING, and the progress is exact."""
    fleet = make_fleet(120)
    bulk = create_bulk(fleet.group, creationRamp=0.01, abortConfig=config("FAILED", 50, 10))
    stop = threading.Event()
    errors: list[BaseException] = []

    def agent(parity: int) -> None:
        try:
            while not stop.is_set():
                pending = list(
                    Operation.objects.filter(bulk_operation_id=bulk.pk, status="PENDING")
                    .order_by("pk")
                    .values_list("pk", flat=True)
                )
                for pk in pending:
                    if pk % 2 == parity:
                        operation_update(operation_id=pk, data={"status": "FAILED"}, now=at(99))
                stop.wait(0.005)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    agents = [threading.Thread(target=agent, args=(parity,)) for parity in (0, 1)]
    for thread in agents:
        thread.start()
    try:
        for step in range(200):
            advance(step * 0.01, batch_size=3)
            if reload(bulk).status == BulkStatus.DELETED:
                break
    finally:
        stop.set()
        for thread in agents:
            thread.join(30)
    assert errors == []
    row = reload(bulk)
    assert row.status == BulkStatus.DELETED, row
    reason = row.abort_reason
    assert reason["finished"] >= 10
    assert reason["failed"] * 100 >= 50 * reason["finished"]
    ops = children(bulk)
    assert len(ops) == row.next_index < 120
    assert all(op.creation_time <= at(step * 0.01) for op in ops)
    assert not [op for op in ops if op.status == OperationStatus.PENDING]
    assert counted_progress(bulk)["pending"] == 0
    body = bulk_operation_json(reload(bulk), base="")
    assert {k: v for k, v in body["progress"].items()} == counted_progress(bulk)
    assert advance(100) == 0


def test_the_sweep_sees_pending_children_in_folded_counters_and_in_deltas(fleet: Fleet) -> None:
    from bulkops.services import bulk_progress_fold

    folded = create_bulk(fleet.group, creationRamp=0, abortConfig=config("ANY", 50, 1))
    advance(0)
    set_status(children(folded)[0], "FAILED", 1)
    assert bulk_progress_fold() > 0  # the row's columns now say 2 PENDING, no delta left
    unfolded = create_bulk(fleet.group, creationRamp=0, abortConfig=config("ANY", 50, 1))
    advance(0)
    set_status(children(unfolded)[0], "FAILED", 1)  # its counts are in deltas only
    assert bulk_operations_abort_sweep(now=at(2)) == [folded.pk, unfolded.pk]


def test_a_bulk_whose_check_fails_does_not_stop_the_sweep_for_the_others(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    broken = create_bulk(fleet.group, creationRamp=0, abortConfig=config("ANY", 50, 1))
    fine = create_bulk(fleet.group, creationRamp=0, abortConfig=config("ANY", 50, 1))
    advance(0)
    for bulk in (broken, fine):
        set_status(children(bulk)[0], "FAILED", 1)
    # A stored config today's validation refuses (written around it): its check raises.
    BulkOperation.objects.filter(pk=broken.pk).update(abort_config={"criteria": [{}]})
    assert bulk_operations_abort_sweep(now=at(2)) == [fine.pk]
    assert reload(broken).status == BulkStatus.COMPLETED
    assert f"Abort check of bulk operation {broken.pk} failed" in caplog.text


def test_a_failed_attempt_with_a_booked_retry_is_not_failed_until_its_retries_are_spent() -> None:
    """Abort meets automatic retries (README "Automatic retries"): a device whose FAILED attempt
    has a booked retry (`retryAt`) counts neither as finished nor as failed; once its retries are
    spent it does. An abort drops the booked retries of the bulk's children."""
    fleet = make_fleet(4)
    retry = {"criteria": [{"failureType": "FAILED", "numberOfRetries": 1}], "backoffSeconds": 10}
    bulk = create_bulk(
        fleet.group, creationRamp=0, abortConfig=config("ANY", 50, 2), retryConfig=retry
    )
    advance(0)
    ops = children(bulk)
    set_status(ops[0], "FAILED", 1)
    set_status(ops[1], "SUCCESSFUL", 1)
    first = Operation.objects.get(pk=ops[0].pk)
    assert first.retry_at == at(11)
    # 0 of 1 finished failed: the failed device still has a retry to come.
    assert abort_counts(bulk_operation_id=bulk.pk) == AbortCounts(1, 0, 0)
    assert bulk_operations_abort_sweep(now=at(2)) == []
    set_status(ops[2], "FAILED", 3)  # its retry is booked too
    assert bulk_operations_abort_sweep(now=at(4)) == []
    # The retry of the first device runs and fails: its one retry is spent, it is failed now.
    assert operations_retry_due(now=at(11)) == 1
    second = Operation.objects.get(retry_of_id=first.pk)
    set_status(second, "FAILED", 12)
    assert Operation.objects.get(pk=second.pk).retry_at is None
    assert abort_counts(bulk_operation_id=bulk.pk) == AbortCounts(2, 1, 0)
    assert bulk_operations_abort_sweep(now=at(13)) == [bulk.pk]
    # The abort failed the PENDING child and dropped the third device's booked retry.
    assert Operation.objects.get(pk=ops[3].pk).failure_reason.startswith("Rollout aborted: ")
    assert Operation.objects.get(pk=ops[2].pk).retry_at is None
    assert operations_retry_due(now=at(100)) == 0
