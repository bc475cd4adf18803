"""Where issue 14's pieces meet (review): automatic retries of a paused rollout wait for its
resume, the resume refusal names the state it refuses, and the admin's rollout cell gives an
abort's message as the API's `rollout.reason` does."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.admin.models import LogEntry
from django.db import connection, transaction
from django.test import Client
from django.urls import reverse

from bulkops import services
from bulkops.abort import bulk_operations_abort_sweep
from bulkops.models import BulkOperation
from devicecontrol import services as operation_services
from devicecontrol.models import Operation, OperationStatus
from tests.bulkops.conftest import BULK, T0, Fleet, at, children, create_bulk, make_fleet, reload
from tests.devicecontrol.conftest import call
from tests.factories import Clients
from tests.helpers import assert_error, shown_messages

pytestmark = pytest.mark.django_db

INVALID = "devicecontrol/Invalid Data"
MEDIA = "application/vnd.com.nsn.cumulocity.bulkoperation+json"
RETRY = {"criteria": [{"failureType": "FAILED", "numberOfRetries": 2}], "backoffSeconds": 10}


def fail(operation: Operation, seconds: float) -> None:
    operation_services.operation_update(
        operation_id=operation.pk,
        data={"status": "FAILED", "failureReason": "boom"},
        now=at(seconds),
    )


def rows(bulk: BulkOperation) -> list[tuple[int, str, Any, bool]]:
    return [(op.pk, op.status, op.retry_at, op.superseded) for op in children(bulk)]


def test_a_paused_bulk_operations_due_retries_wait_for_the_resume(bapi: Clients) -> None:
    fleet = make_fleet(4)
    bulk = create_bulk(fleet.group, creationRamp=1, retryConfig=RETRY)
    services.bulk_operations_advance(now=at(1))  # two of four children
    first, _ = children(bulk)
    fail(first, 2)
    assert Operation.objects.get(pk=first.pk).retry_at == at(12)
    admin = bapi["bulk_admin"]
    assert call(admin, "POST", f"{BULK}/{bulk.pk}/pause").status_code == 200
    held = rows(bulk)

    # Due, but paused: nothing is created and the booking stays.
    assert operation_services.operations_retry_due(now=at(60)) == 0
    assert rows(bulk) == held
    # Another bulk operation's (and a plain operation's) due retries are not held.
    other = create_bulk(make_fleet(1).group, creationRamp=0, retryConfig=RETRY)
    services.bulk_operations_advance(now=at(1))
    (other_child,) = children(other)
    fail(other_child, 2)
    assert operation_services.operations_retry_due(now=at(60)) == 1
    assert rows(bulk) == held

    resumed = call(admin, "POST", f"{BULK}/{bulk.pk}/resume", accept=MEDIA)
    assert resumed.status_code == 200, resumed.content[:300]
    assert operation_services.operations_retry_due(now=at(61)) == 1
    retry = Operation.objects.get(retry_of_id=first.pk)
    assert (retry.bulk_operation_id, retry.attempt, retry.status) == (bulk.pk, 2, "PENDING")


def test_a_wave_gate_pause_holds_the_retries_too(bapi: Clients) -> None:
    """A wave that passes with then PAUSE below 100 % leaves a booked retry: it waits for the
    operator's resume like the next wave does."""
    fleet = make_fleet(4)
    bulk = create_bulk(
        fleet.group,
        creationRamp=0,
        rolloutConfig={"maximumPerMinute": 600},
        waves=[{"size": 2, "successThreshold": 50, "then": "PAUSE"}, {"percentage": 100}],
        retryConfig=RETRY,
    )
    services.bulk_operations_advance(now=at(1))
    first, second = children(bulk)
    fail(first, 2)
    operation_services.operation_update(
        operation_id=second.pk, data={"status": "SUCCESSFUL"}, now=at(2)
    )
    assert services.bulk_rollout_gates_check(now=at(3)) == 1
    assert reload(bulk).rollout_state == "PAUSED"

    assert operation_services.operations_retry_due(now=at(60)) == 0
    assert Operation.objects.get(pk=first.pk).retry_at == at(12)


@pytest.mark.parametrize("waiting", [False, True], ids=["running", "waiting"])
def test_resume_refusal_names_the_state(bapi: Clients, waiting: bool) -> None:
    fleet = make_fleet(4)
    bulk = create_bulk(
        fleet.group,
        creationRamp=0,
        rolloutConfig={"maximumPerMinute": 60},
        waves=[{"size": 1}, {"percentage": 100}],
    )
    if waiting:
        services.bulk_operations_advance(now=at(1))
    before = reload(bulk)
    expected = "waiting for its wave's gate" if waiting else "running"
    assert before.rollout_state == ("WAITING_FOR_WAVE" if waiting else "RUNNING")

    body = assert_error(
        call(bapi["bulk_admin"], "POST", f"{BULK}/{bulk.pk}/resume", accept=MEDIA), 422, INVALID
    )

    assert body["message"].endswith(f"{bulk.pk} is {expected}")
    after = reload(bulk)
    assert (after.rollout_state, after.next_due_at, after.wave, after.last_updated) == (
        before.rollout_state,
        before.next_due_at,
        before.wave,
        before.last_updated,
    )


def test_the_admin_shows_an_aborts_message_not_its_object(
    admin_client: Client, bapi: Clients
) -> None:
    fleet: Fleet = make_fleet(3)
    bulk = create_bulk(
        fleet.group,
        creationRamp=0,
        abortConfig={
            "criteria": [
                {"failureType": "ANY", "thresholdPercentage": 50, "minNumberOfExecuted": 1}
            ]
        },
    )
    services.bulk_operations_advance(now=at(1))
    fail(children(bulk)[0], 2)
    assert bulk_operations_abort_sweep(now=T0 + timedelta(seconds=3)) == [bulk.pk]
    message = reload(bulk).abort_reason["message"]
    api_reason = call(bapi["bulk_admin"], "GET", f"{BULK}/{bulk.pk}").json()["rollout"]["reason"]
    assert api_reason == message

    page = admin_client.get(reverse("admin:bulkops_bulkoperation_change", args=[bulk.pk]))
    text = page.content.decode()
    assert '<strong class="bulk-rollout-state">ABORTED</strong>' in text
    assert f'<span class="bulk-rollout-reason">{message}</span>' in text.replace("&#x27;", "'")
    assert "criterion" not in text.split("bulk-rollout-reason", 1)[1][:300]
    # Its PENDING children were failed by the abort.
    assert not Operation.objects.filter(bulk_operation_id=bulk.pk, status=OperationStatus.PENDING)


@pytest.mark.django_db(transaction=True)
def test_a_retry_created_while_an_abort_runs_is_failed_by_it() -> None:
    """The retry sweep claims a FAILED child (row lock) and creates its retry while the abort runs:
    the abort waits for that row when it drops the booked retries, and only then fails the
    PENDING children, so the new attempt is among them (no PENDING child of an aborted bulk)."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks: PostgreSQL only (SQLite serialises whole transactions)")
    fleet = make_fleet(3)
    retry_once = {
        "criteria": [{"failureType": "FAILED", "numberOfRetries": 1}],
        "backoffSeconds": 1,
    }
    bulk = create_bulk(
        fleet.group,
        creationRamp=3600,
        retryConfig=retry_once,
        abortConfig={
            "criteria": [
                {"failureType": "ANY", "thresholdPercentage": 50, "minNumberOfExecuted": 1}
            ]
        },
    )
    services.bulk_operations_advance(now=at(0))
    (first,) = children(bulk)
    fail(first, 1)  # attempt 1: a retry is booked, so not failed for the criteria yet
    operation_services.operation_retry(operation=Operation.objects.get(pk=first.pk), now=at(2))
    services.bulk_operations_advance(now=at(3600))
    second_attempt, second = [op for op in children(bulk) if not op.superseded]
    fail(second_attempt, 3)  # attempt 2: its retries are spent, failed for good
    fail(second, 4)  # attempt 1 of the second device: a retry is booked
    assert Operation.objects.get(pk=second.pk).retry_at is not None
    locked, release = threading.Event(), threading.Event()

    def sweep_claim() -> None:
        try:
            with transaction.atomic():
                claimed = Operation.objects.select_for_update().get(pk=second.pk)
                locked.set()
                release.wait(30)
                time.sleep(0.5)  # the abort is waiting for this row by now
                operation_services.operation_retry(operation=claimed, now=at(5))
        finally:
            connection.close()

    sweeper = threading.Thread(target=sweep_claim)
    sweeper.start()
    try:
        assert locked.wait(30)
        release.set()
        assert bulk_operations_abort_sweep(now=at(6)) == [bulk.pk]
    finally:
        release.set()
        sweeper.join(30)

    assert reload(bulk).status == "DELETED"
    latest = [op for op in children(bulk) if not op.superseded]
    assert OperationStatus.PENDING not in [op.status for op in latest], [
        (op.pk, op.status, op.failure_reason) for op in latest
    ]
    retry = Operation.objects.get(retry_of_id=second.pk)
    assert retry.status == OperationStatus.FAILED
    assert retry.failure_reason.startswith("Rollout aborted: ")


@pytest.mark.parametrize("finished", ["cancelled", "completed"])
def test_a_second_abort_press_is_refused_and_changes_nothing(
    admin_client: Client, finished: str
) -> None:
    fleet = make_fleet(2)
    bulk = create_bulk(fleet.group, creationRamp=1)
    url = reverse("admin:bulkops_bulkoperation_abort", args=[bulk.pk])
    if finished == "cancelled":
        assert admin_client.post(url).status_code == 302
    else:
        services.bulk_operations_advance(now=at(5))  # every child created, PENDING
    before = reload(bulk)
    statuses = [(op.pk, op.status, op.failure_reason) for op in children(bulk)]
    history = LogEntry.objects.count()

    response = admin_client.post(url, follow=True)

    expected = f"is {before.status}"
    assert any(
        message.startswith("Not aborted: ") and expected in message
        for message in shown_messages(response)
    ), shown_messages(response)
    after = reload(bulk)
    assert (after.status, after.last_updated) == (before.status, before.last_updated)
    assert [(op.pk, op.status, op.failure_reason) for op in children(bulk)] == statuses
    assert LogEntry.objects.count() == history


def test_children_an_operator_cancelled_are_no_failures_for_abort_criteria() -> None:
    fleet = make_fleet(5)
    bulk = create_bulk(
        fleet.group,
        creationRamp=0,
        abortConfig={
            "criteria": [
                {"failureType": "ANY", "thresholdPercentage": 50, "minNumberOfExecuted": 1}
            ]
        },
    )
    services.bulk_operations_advance(now=at(1))
    pending, executing, succeeding, failing, last = children(bulk)
    operation_services.operation_cancel(operation=pending, by="ops", now=at(2))
    operation_services.operation_update(
        operation_id=executing.pk, data={"status": "EXECUTING"}, now=at(2)
    )
    operation_services.operation_cancel(operation=executing, by="ops", now=at(3))
    fail(executing, 4)  # the agent honours the cancel request
    operation_services.operation_update(
        operation_id=succeeding.pk, data={"status": "SUCCESSFUL"}, now=at(5)
    )

    # Two of three finished are FAILED, both by the operator's cancels: no abort.
    assert bulk_operations_abort_sweep(now=at(6)) == []
    assert reload(bulk).status == "COMPLETED"
    assert Operation.objects.get(pk=last.pk).status == OperationStatus.PENDING

    fail(failing, 7)  # a device's own failure: 1 of 2 counted finished, 50 %
    assert bulk_operations_abort_sweep(now=at(8)) == [bulk.pk]
    reason = reload(bulk).abort_reason
    assert (reason["failed"], reason["finished"], reason["pendingFailed"]) == (1, 2, 1)
