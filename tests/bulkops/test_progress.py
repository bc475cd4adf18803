"""Progress and generalStatus (bulkoperations.md §5, §6) always equal a direct count of the child
operations, whatever changes them; and reading a bulk operation never counts its children."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from bulkops import services
from bulkops.models import BulkOperation
from devicecontrol import services as dc
from devicecontrol.models import Operation
from tests.bulkops.conftest import (
    BULK,
    Fleet,
    advance,
    at,
    children,
    counted_general_status,
    counted_progress,
    create_bulk,
    get_bulk,
    reload,
)
from tests.devicecontrol.conftest import Abort, call, rolled_back
from tests.factories import Clients

pytestmark = pytest.mark.django_db

OPERATIONS = "/devicecontrol/operations"


def assert_truthful(bapi: Clients, bulk: BulkOperation) -> dict[str, Any]:
    body = get_bulk(bapi["bulk_reader"], bulk.pk)
    assert body["progress"] == counted_progress(bulk), body
    assert body["generalStatus"] == counted_general_status(bulk), body
    return body


def put_status(bapi: Clients, operation: Operation, status: str, **extra: Any) -> None:
    response = call(
        bapi["inv_admin"], "PUT", f"{OPERATIONS}/{operation.pk}", {"status": status}, **extra
    )
    assert response.status_code == 200, response.content[:500]


@pytest.fixture
def started(fleet5: Fleet) -> BulkOperation:
    """Five targets, ramp 1 s, three children created (two still waiting)."""
    bulk = create_bulk(fleet5.group, creationRamp=1)
    for k in range(3):
        advance(k)
    return bulk


def test_progress_follows_children_put_through_every_status(
    bapi: Clients, started: BulkOperation
) -> None:
    body = assert_truthful(bapi, started)
    assert body["progress"] == {
        "pending": 3,
        "failed": 0,
        "executing": 0,
        "successful": 0,
        "all": 5,
    }
    assert body["generalStatus"] == "EXECUTING"
    first, second, third = children(started)
    put_status(bapi, first, "EXECUTING")
    assert assert_truthful(bapi, started)["progress"]["executing"] == 1
    put_status(bapi, first, "SUCCESSFUL")
    put_status(bapi, second, "FAILED")
    body = assert_truthful(bapi, started)
    assert body["generalStatus"] == "EXECUTING_WITH_ERRORS"
    put_status(bapi, second, "PENDING")  # back to PENDING
    body = assert_truthful(bapi, started)
    assert body["progress"]["failed"] == 0
    assert body["generalStatus"] == "EXECUTING"
    advance(4)
    for operation in children(started):
        put_status(bapi, operation, "SUCCESSFUL")
    body = assert_truthful(bapi, started)
    assert (body["status"], body["generalStatus"]) == ("COMPLETED", "SUCCESSFUL")
    put_status(bapi, third, "FAILED")
    body = assert_truthful(bapi, started)
    assert body["generalStatus"] == "FAILED"


def test_progress_after_expiry_and_timeout(bapi: Clients, fleet: Fleet) -> None:
    bulk = create_bulk(
        fleet.group,
        creationRamp=0,
        operationPrototype={"c8y_Restart": {}, "pendingTimeout": 60, "executionTimeout": 30},
    )
    advance(0)
    first, second, third = children(bulk)
    dc.operation_update(operation_id=first.pk, data={"status": "EXECUTING"}, now=at(10))
    dc.operation_update(operation_id=third.pk, data={"status": "SUCCESSFUL"}, now=at(10))
    assert dc.operations_time_out(now=at(41)) == 1
    body = assert_truthful(bapi, bulk)
    assert body["progress"]["failed"] == 1
    assert body["generalStatus"] == "EXECUTING_WITH_ERRORS"
    assert dc.operations_expire(now=at(61)) == 1
    body = assert_truthful(bapi, bulk)
    assert body["progress"] == {
        "pending": 0,
        "failed": 2,
        "executing": 0,
        "successful": 1,
        "all": 3,
    }
    assert body["generalStatus"] == "FAILED"


def test_retry_replaces_the_failed_attempt_in_the_counters(bapi: Clients, fleet: Fleet) -> None:
    bulk = create_bulk(fleet.group, creationRamp=0)
    advance(0)
    first, second, third = children(bulk)
    for operation in (first, third):
        dc.operation_update(operation_id=operation.pk, data={"status": "SUCCESSFUL"}, now=at(1))
    failed = dc.operation_update(operation_id=second.pk, data={"status": "FAILED"}, now=at(1))
    assert assert_truthful(bapi, bulk)["generalStatus"] == "FAILED"
    retry = dc.operation_retry(operation=failed, now=at(2))
    assert retry.bulk_operation_id == bulk.pk
    # The retry is the device's attempt now: the failure leaves the counters, `all` stays 3.
    body = assert_truthful(bapi, bulk)
    assert body["progress"] == {
        "pending": 1,
        "failed": 0,
        "executing": 0,
        "successful": 2,
        "all": 3,
    }
    assert body["generalStatus"] == "EXECUTING"
    dc.operation_update(operation_id=retry.pk, data={"status": "SUCCESSFUL"}, now=at(3))
    body = assert_truthful(bapi, bulk)
    assert body["progress"] == {
        "pending": 0,
        "failed": 0,
        "executing": 0,
        "successful": 3,
        "all": 3,
    }
    assert body["generalStatus"] == "SUCCESSFUL"


def test_children_deleted_by_filter_lower_the_counters(
    bapi: Clients, started: BulkOperation, fleet5: Fleet
) -> None:
    first = children(started)[0]
    put_status(bapi, first, "SUCCESSFUL")
    response = call(bapi["inv_admin"], "DELETE", f"{OPERATIONS}?deviceId={fleet5.device_ids[0]}")
    assert response.status_code == 204
    body = assert_truthful(bapi, started)
    assert body["progress"] == {
        "pending": 2,
        "failed": 0,
        "executing": 0,
        "successful": 0,
        "all": 4,
    }
    response = call(bapi["inv_admin"], "DELETE", f"{OPERATIONS}?status=PENDING")
    assert response.status_code == 204
    body = assert_truthful(bapi, started)
    assert body["progress"]["all"] == 2  # only the two not yet created
    advance(4)
    body = assert_truthful(bapi, started)
    assert (body["status"], body["progress"]["pending"]) == ("COMPLETED", 2)


def test_device_deleted_through_inventory_cascades_its_child(
    bapi: Clients, started: BulkOperation, fleet5: Fleet
) -> None:
    put_status(bapi, children(started)[1], "FAILED")
    response = call(
        bapi["inv_admin"], "DELETE", f"/inventory/managedObjects/{fleet5.device_ids[1]}"
    )
    assert response.status_code == 204
    assert not Operation.objects.filter(device_id=fleet5.device_ids[1]).exists()
    body = assert_truthful(bapi, started)
    assert body["progress"] == {
        "pending": 2,
        "failed": 0,
        "executing": 0,
        "successful": 0,
        "all": 4,
    }
    assert body["generalStatus"] == "EXECUTING"
    # A device not yet processed is deleted: dropped when its turn comes.
    response = call(
        bapi["inv_admin"], "DELETE", f"/inventory/managedObjects/{fleet5.device_ids[4]}"
    )
    assert response.status_code == 204
    advance(4)
    body = assert_truthful(bapi, started)
    assert body["progress"]["all"] == 3
    assert body["status"] == "COMPLETED"


def test_quiescent_updates_move_the_counters_too(bapi: Clients, started: BulkOperation) -> None:
    first = children(started)[0]
    put_status(bapi, first, "EXECUTING", HTTP_X_CUMULOCITY_PROCESSING_MODE="QUIESCENT")
    assert assert_truthful(bapi, started)["progress"]["executing"] == 1


def test_rolled_back_update_leaves_counters_unchanged(
    bapi: Clients, started: BulkOperation
) -> None:
    before = get_bulk(bapi["bulk_reader"], started.pk)["progress"]
    first = children(started)[0]
    with pytest.raises(Abort):
        rolled_back(lambda: dc.operation_update(operation_id=first.pk, data={"status": "FAILED"}))
    with pytest.raises(Abort):
        rolled_back(lambda: dc.operations_delete(queryset=Operation.objects.filter(pk=first.pk)))
    with pytest.raises(Abort):
        rolled_back(lambda: advance(4))
    assert get_bulk(bapi["bulk_reader"], started.pk)["progress"] == before
    assert assert_truthful(bapi, started)["progress"] == before
    services.bulk_progress_fold()
    row = reload(started)
    assert (row.pending, row.failed, row.next_index) == (3, 0, 3)


def test_reading_a_bulk_operation_does_not_count_children(
    bapi: Clients,
    fleet5: Fleet,
    django_assert_max_num_queries: Callable[..., Any],
) -> None:
    bulk = create_bulk(fleet5.group, creationRamp=0)
    advance(0)
    client = bapi["bulk_reader"]
    get_bulk(client, bulk.pk)  # the user exists before counting
    with django_assert_max_num_queries(4), CaptureQueriesContext(connection) as queries:
        body = get_bulk(client, bulk.pk)
    assert body["progress"]["pending"] == 5
    touched = [q["sql"] for q in queries.captured_queries if "devicecontrol_operation" in q["sql"]]
    assert touched == []
    with django_assert_max_num_queries(5), CaptureQueriesContext(connection) as queries:
        response = call(client, "GET", f"{BULK}?pageSize=100&withTotalPages=true")
    assert response.status_code == 200
    assert [b["progress"]["all"] for b in response.json()["bulkOperations"]] == [5]
    touched = [q["sql"] for q in queries.captured_queries if "devicecontrol_operation" in q["sql"]]
    assert touched == []
