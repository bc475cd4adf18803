"""Progress counts target devices, each by its latest attempt (issue 10, item 4). A retry of a bulk
child (`POST /devicecontrol/operations/{id}/retry` or the admin's "Retry failed operations")
supersedes the failed attempt: `all` never exceeds the targets, a successful retry moves the device
from failed to successful and `generalStatus` follows; a superseded attempt no longer counts,
whatever happens to it; `failedParentId` takes the devices whose latest attempt failed."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.urls import reverse

from bulkops import services
from bulkops.models import BulkOperation
from devicecontrol import services as dc
from devicecontrol.models import Operation
from deviceplatform.api.exceptions import ValidationFailed
from deviceplatform.services import user_upsert
from tests.bulkops.conftest import (
    Fleet,
    advance,
    at,
    child_device_ids,
    children,
    counted_general_status,
    counted_progress,
    create_bulk,
    get_bulk,
    make_fleet,
)
from tests.devicecontrol.conftest import call
from tests.factories import Clients
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db

OPERATIONS = "/devicecontrol/operations"


def progress_of(bapi: Clients, bulk: BulkOperation) -> dict[str, Any]:
    """GET's progress and generalStatus, checked against a direct count (latest attempt per
    device: its child with the highest ID)."""
    body = get_bulk(bapi["bulk_reader"], bulk.pk)
    assert body["progress"] == counted_progress(bulk), body
    assert body["generalStatus"] == counted_general_status(bulk), body
    return {**body["progress"], "generalStatus": body["generalStatus"]}


def finish(operation: Operation, status: str, seconds: float = 1) -> Operation:
    return dc.operation_update(operation_id=operation.pk, data={"status": status}, now=at(seconds))


def retry_over_rest(bapi: Clients, operation: Operation) -> Any:
    return call(bapi["inv_admin"], "POST", f"{OPERATIONS}/{operation.pk}/retry")


def put_status(bapi: Clients, operation_id: int, status: str) -> None:
    response = call(bapi["inv_admin"], "PUT", f"{OPERATIONS}/{operation_id}", {"status": status})
    assert response.status_code == 200, response.content


def failed_parent_targets(parent: BulkOperation, seconds: float) -> list[int]:
    rerun = create_bulk(
        0, now=at(seconds), groupId=None, failedParentId=str(parent.pk), creationRamp=0
    )
    services.bulk_operations_advance(now=at(seconds))
    return child_device_ids(rerun)


def test_fifty_targets_three_failures_retried_through_rest_and_admin_end_successful(
    bapi: Clients, client: Client
) -> None:
    fleet = make_fleet(50)
    bulk = create_bulk(fleet.group, creationRamp=0)
    advance(0)
    ops = children(bulk)
    for operation in ops[3:]:
        finish(operation, "SUCCESSFUL")
    for operation in ops[:3]:
        finish(operation, "FAILED")
    assert progress_of(bapi, bulk) == {
        "pending": 0,
        "failed": 3,
        "executing": 0,
        "successful": 47,
        "all": 50,
        "generalStatus": "FAILED",
    }

    retries = []
    for operation in ops[:2]:
        response = retry_over_rest(bapi, operation)
        assert response.status_code == 201, response.content
        retries.append(int(response["Location"].rsplit("/", 1)[1]))
    client.force_login(user_upsert(username="root-admin", password="x", is_superuser=True))
    response = client.post(
        reverse("admin:devicecontrol_operation_changelist"),
        {"action": "retry_failed", "_selected_action": [ops[2].pk]},
    )
    assert response.status_code == 302
    retries.append(Operation.objects.get(retry_of=ops[2].pk).pk)
    page = client.get(reverse("admin:devicecontrol_operation_change", args=[ops[2].pk]))
    assert "superseded: the bulk operation counts the retry" in page.content.decode()
    assert progress_of(bapi, bulk) == {
        "pending": 3,
        "failed": 0,
        "executing": 0,
        "successful": 47,
        "all": 50,
        "generalStatus": "EXECUTING",
    }

    for pk in retries:
        put_status(bapi, pk, "EXECUTING")
        put_status(bapi, pk, "SUCCESSFUL")
    assert progress_of(bapi, bulk) == {
        "pending": 0,
        "failed": 0,
        "executing": 0,
        "successful": 50,
        "all": 50,
        "generalStatus": "SUCCESSFUL",
    }
    # 53 operations carry the bulk operation's ID; the progress counts 50 devices.
    assert Operation.objects.filter(bulk_operation_id=bulk.pk).count() == 53
    assert failed_parent_targets(bulk, 5) == []  # no device's latest attempt failed
    services.bulk_progress_fold()
    assert progress_of(bapi, bulk)["successful"] == 50


def test_a_superseded_attempt_no_longer_counts_whatever_happens_to_it(
    bapi: Clients, fleet: Fleet
) -> None:
    bulk = create_bulk(fleet.group, creationRamp=0)
    advance(0)
    first, second, third = children(bulk)
    failed = finish(second, "FAILED")
    dc.operation_retry(operation=failed, now=at(2))
    before = progress_of(bapi, bulk)
    assert before == {
        "pending": 3,
        "failed": 0,
        "executing": 0,
        "successful": 0,
        "all": 3,
        "generalStatus": "EXECUTING",
    }
    for status in ("PENDING", "EXECUTING", "SUCCESSFUL", "FAILED"):  # any transition (§7)
        put_status(bapi, failed.pk, status)
        assert progress_of(bapi, bulk) == before
    dc.operations_expire(now=at(10**8))  # the sweepers too: everything PENDING expires
    after_expiry = progress_of(bapi, bulk)
    assert after_expiry["failed"] == 3  # the three latest attempts, not the superseded one
    dc.operations_delete(queryset=Operation.objects.filter(pk=failed.pk))
    assert progress_of(bapi, bulk) == after_expiry


def test_deleting_the_latest_attempt_makes_the_one_before_it_count_again(
    bapi: Clients, fleet: Fleet
) -> None:
    bulk = create_bulk(fleet.group, creationRamp=0)
    advance(0)
    failed = finish(children(bulk)[1], "FAILED")
    retry = dc.operation_retry(operation=failed, now=at(2))
    assert progress_of(bapi, bulk)["failed"] == 0
    response = call(bapi["inv_admin"], "DELETE", f"{OPERATIONS}?status=PENDING")
    assert response.status_code == 204
    assert not Operation.objects.filter(pk=retry.pk).exists()
    # The failed attempt is the device's latest again: counted, a failedParentId target, and
    # retryable again.
    assert progress_of(bapi, bulk) == {
        "pending": 0,
        "failed": 1,
        "executing": 0,
        "successful": 0,
        "all": 1,
        "generalStatus": "FAILED",
    }
    assert failed_parent_targets(bulk, 3) == [fleet.device_ids[1]]
    assert retry_over_rest(bapi, failed).status_code == 201


def test_only_the_latest_attempt_can_be_retried(
    bapi: Clients, fleet: Fleet, row_counts: Any
) -> None:
    bulk = create_bulk(fleet.group, creationRamp=0)
    advance(0)
    failed = finish(children(bulk)[0], "FAILED")
    assert retry_over_rest(bapi, failed).status_code == 201
    before = row_counts()
    response = retry_over_rest(bapi, failed)
    assert_error(response, 422, "devicecontrol/Invalid Data")
    assert f"Operation {failed.pk} was already retried" in response.json()["message"]
    assert row_counts() == before
    assert progress_of(bapi, bulk)["all"] == 3


def test_failed_parent_takes_the_devices_whose_latest_attempt_failed(bapi: Clients) -> None:
    fleet = make_fleet(4)
    parent = create_bulk(fleet.group, creationRamp=0)
    advance(0)
    again, recovered, plain, fine = children(parent)
    for operation in (again, recovered, plain):
        finish(operation, "FAILED")
    finish(fine, "SUCCESSFUL")
    finish(dc.operation_retry(operation=Operation.objects.get(pk=again.pk)), "FAILED", 3)
    finish(dc.operation_retry(operation=Operation.objects.get(pk=recovered.pk)), "SUCCESSFUL", 3)
    # `again` failed twice: one target (its latest attempt), not two.
    assert failed_parent_targets(parent, 4) == [again.device_id, plain.device_id]
    assert progress_of(bapi, parent) == {
        "pending": 0,
        "failed": 2,
        "executing": 0,
        "successful": 2,
        "all": 4,
        "generalStatus": "FAILED",
    }


@pytest.mark.postgresql  # row locks; SQLite runs one writer at a time anyway
@pytest.mark.django_db(transaction=True)
def test_two_concurrent_retries_of_one_failed_child_make_one_attempt(bapi: Clients) -> None:
    fleet = make_fleet(2)
    bulk = create_bulk(fleet.group, creationRamp=0)
    advance(0)
    failed = finish(children(bulk)[0], "FAILED")
    stale = Operation.objects.get(pk=failed.pk)  # both callers hold the row as read before
    barrier = threading.Barrier(2)
    outcomes: list[Any] = []

    def retry() -> None:
        try:
            barrier.wait(timeout=10)
            outcomes.append(dc.operation_retry(operation=stale))
        except ValidationFailed as exc:
            outcomes.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=retry) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(type(outcome).__name__ for outcome in outcomes) == [
        "Operation",
        "ValidationFailed",
    ]
    assert Operation.objects.filter(retry_of=failed.pk).count() == 1
    assert progress_of(bapi, bulk) == {
        "pending": 2,
        "failed": 0,
        "executing": 0,
        "successful": 0,
        "all": 2,
        "generalStatus": "EXECUTING",
    }
