"""Bulk operations end to end with the official Python client `c8y-api` 3.7.3 against a live server.

Every bulk-operation call goes through c8y-api unchanged: `BulkOperation(...).create()` (POST with the
bulkoperation media type in `Accept`; `start_time='now'` becomes the client's current time),
`bulk_operations.get`/`select`/`get_count` (`with_deleted` -> `withDeleted=true`, `general_status`
-> `generalStatus`; the client's `GeneralStatus.SCHEDULED` constant is the string `PENDING`),
`update()` (PUT of the changed fields only), `delete()` (DELETE without `Accept`), and
`c8y.operations.select(bulk_id=...)` for the children (sent as both `bulkId` and `bulkOperationId`).

The live server runs no beat: the test drives the ramp itself with
`bulkops.services.bulk_operations_advance(now=...)`, with `now` taken from the stored schedule
(`effective_start`), so the number of children after each step is exact. c8y-api parses `status`,
`generalStatus`, `groupId`, `failedParentId`, `startDate` and `creationRamp`; `progress` and
`operationPrototype` stay fragments (`bulk["progress"]`)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from c8y_api import CumulocityApi
from c8y_api.model import BulkOperation, Device, DeviceGroup, ManagedObject, Operation

from tests.c8y_support import RequestLog

pytestmark = pytest.mark.django_db(transaction=True)

BULK_MEDIA_TYPE = "application/vnd.com.nsn.cumulocity.bulkoperation+json"
NO_AGENT_REASON = "Device is not in the childDevices hierarchy of any agent"
PROTOTYPE = {"description": "Restart device", "c8y_Restart": {}}


def advance(bulk_id: str, seconds: float) -> int:
    """Run the ramp at `effective_start + seconds` of bulk operation `bulk_id`."""
    from bulkops.models import BulkOperation as BulkRow
    from bulkops.services import bulk_operations_advance

    start = BulkRow.objects.get(pk=int(bulk_id)).effective_start
    return bulk_operations_advance(now=start + timedelta(seconds=seconds))


def progress(bulk: BulkOperation) -> dict[str, int]:
    return dict(bulk["progress"])


def ids(objects: Any) -> list[str]:
    return [obj.id for obj in objects]


def test_bulk_operation_round_trip(c8y: CumulocityApi) -> None:
    # --- fleet: an agent with three child devices, a device without agent, all in one group -------
    agent = Device(c8y, type="c8y_Agent", name="agent", com_cumulocity_model_Agent={}).create()
    devices = [Device(c8y, type="c8y_Linux", name=f"dev-{i}").create() for i in range(3)]
    for device in devices:
        agent.add_child_device(device)
    loner = Device(c8y, type="c8y_Linux", name="loner").create()
    group = DeviceGroup(c8y, name="fleet").create()
    for member in [loner, *reversed(devices)]:  # insertion order must not matter
        group.add_child_asset(member)
    # A non-device asset of the group is not a target (bulkoperations.md §3).
    group.add_child_asset(ManagedObject(c8y, type="c8y_Building", name="hq").create())
    targets = sorted([d.id for d in devices] + [loner.id], key=int)
    log = RequestLog(c8y, first_values=False)

    # --- create with start_time='now' -----------------------------------------------------------
    bulk = BulkOperation(
        c8y,
        group_id=group.id,
        start_time="now",
        creation_ramp=1,
        operation_prototype=PROTOTYPE,
    ).create()
    posted = log.take()[0]
    assert (posted["method"], posted["path"], posted["status"]) == (
        "POST",
        "/devicecontrol/bulkoperations",
        201,
    )
    assert posted["accept"] == BULK_MEDIA_TYPE
    assert posted["body"]["groupId"] == group.id
    assert posted["body"]["creationRamp"] == 1
    assert posted["body"]["operationPrototype"] == PROTOTYPE
    assert posted["body"]["startDate"].endswith("Z") or "+" in posted["body"]["startDate"]

    assert bulk.id.isdigit()
    assert bulk.group_id == group.id
    assert bulk.failed_parent_id is None
    assert bulk.creation_ramp == 1
    assert bulk.start_datetime is not None  # c8y-api parses the server's startDate
    assert bulk.status == BulkOperation.Status.ACTIVE
    assert bulk.general_status == "SCHEDULED"
    assert progress(bulk) == {"pending": 0, "failed": 0, "executing": 0, "successful": 0, "all": 4}
    assert dict(bulk["operationPrototype"]) == PROTOTYPE
    assert c8y.bulk_operations.get(bulk.id).general_status == "SCHEDULED"

    # --- select / get_count by generalStatus; the client's SCHEDULED constant sends PENDING --------
    scheduled = BulkOperation.GeneralStatus.SCHEDULED
    assert scheduled == "PENDING"
    log.take()
    assert ids(c8y.bulk_operations.select(general_status=scheduled)) == [bulk.id]
    sent = log.take()[0]
    assert sent["query"]["generalStatus"] == ["PENDING"]
    log.take()
    assert c8y.bulk_operations.get_count(general_status=scheduled) == 1
    counted = log.take()[0]
    assert counted["query"]["withTotalPages"] == ["true"]
    assert c8y.bulk_operations.get_count(general_status="EXECUTING") == 0
    assert c8y.bulk_operations.get_count() == 1

    # --- ramp step 1: at effective_start + 0.5 s exactly the first target is due -----------------
    assert advance(bulk.id, 0.5) == 1
    running = c8y.bulk_operations.get(bulk.id)
    assert running.status == BulkOperation.Status.IN_PROGRESS
    assert running.general_status == BulkOperation.GeneralStatus.EXECUTING
    assert progress(running) == {
        "pending": 1,
        "failed": 0,
        "executing": 0,
        "successful": 0,
        "all": 4,
    }
    assert ids(c8y.bulk_operations.select(general_status="EXECUTING")) == [bulk.id]
    assert c8y.bulk_operations.get_count(general_status=scheduled) == 0

    # --- update the ramp through c8y-api: only the changed field is sent, the id stays -----------
    log.take()
    running.creation_ramp = 0.5
    updated = running.update()
    put = log.take()[-1]
    assert (put["method"], put["path"], put["status"]) == (
        "PUT",
        f"/devicecontrol/bulkoperations/{bulk.id}",
        200,
    )
    assert put["body"] == {"creationRamp": 0.5}
    assert updated.id == bulk.id
    assert updated.creation_ramp == 0.5
    assert updated.status == BulkOperation.Status.IN_PROGRESS
    # The rest is rescheduled from the update (k restarts at 0): two due at +0.6 s, the last at +1.1 s.
    assert advance(bulk.id, 0.6) == 2
    assert progress(c8y.bulk_operations.get(bulk.id))["pending"] == 3
    assert advance(bulk.id, 1.1) == 1
    assert advance(bulk.id, 60) == 0

    done = c8y.bulk_operations.get(bulk.id)
    assert done.status == BulkOperation.Status.COMPLETED
    assert done.general_status == BulkOperation.GeneralStatus.EXECUTING_WITH_ERRORS
    assert progress(done) == {"pending": 3, "failed": 1, "executing": 0, "successful": 0, "all": 4}

    # --- the children, through c8y.operations.select(bulk_id=...) --------------------------------
    children = list(c8y.operations.select(bulk_id=bulk.id))
    query = log.take()[-1]["query"]
    assert query["bulkId"] == query["bulkOperationId"] == [bulk.id]
    assert [op.device_id for op in children] == targets  # ascending device order, exactly once
    assert {op["bulkOperationId"] for op in children} == {bulk.id}
    assert {op.description for op in children} == {"Restart device"}
    assert all("c8y_Restart" in op.fragments for op in children)
    by_device = {op.device_id: op for op in children}
    assert by_device[loner.id].status == Operation.Status.FAILED
    assert by_device[loner.id]["failureReason"] == NO_AGENT_REASON
    assert {by_device[d.id].status for d in devices} == {Operation.Status.PENDING}
    assert c8y.operations.get_count(bulk_id=bulk.id) == 4

    # A child finishing moves the counters (read cheaply from the bulk operation).
    child = c8y.operations.get(by_device[devices[0].id].id)
    child.status = Operation.Status.SUCCESSFUL
    child.update()
    after = c8y.bulk_operations.get(bulk.id)
    assert progress(after) == {"pending": 2, "failed": 1, "executing": 0, "successful": 1, "all": 4}
    assert after.general_status == "EXECUTING_WITH_ERRORS"
    assert ids(c8y.bulk_operations.select(general_status="EXECUTING_WITH_ERRORS")) == [bulk.id]

    # A COMPLETED bulk operation can be neither changed nor cancelled: 422.
    after.creation_ramp = 2
    with pytest.raises(ValueError, match="422"):
        after.update()
    with pytest.raises(ValueError, match="422"):
        after.delete()

    # --- a failedParentId run targets the failed device; delete (cancel) it through c8y-api ------
    retry = BulkOperation(
        c8y,
        failed_parent_id=bulk.id,
        start_time="now",
        creation_ramp=0,
        operation_prototype=PROTOTYPE,
    ).create()
    assert retry.failed_parent_id == bulk.id
    assert retry.group_id is None
    assert retry.general_status == "SCHEDULED"
    assert progress(retry)["all"] == 1
    log.take()
    retry.delete()
    deleted = log.take()[-1]
    assert (deleted["method"], deleted["path"], deleted["status"]) == (
        "DELETE",
        f"/devicecontrol/bulkoperations/{retry.id}",
        204,
    )
    cancelled = c8y.bulk_operations.get(retry.id)
    assert cancelled.status == BulkOperation.Status.DELETED
    assert cancelled.general_status == BulkOperation.GeneralStatus.CANCELED
    assert advance(retry.id, 60) == 0  # no child is ever created for a cancelled one
    assert c8y.operations.get_count(bulk_id=retry.id) == 0

    # --- with_deleted --------------------------------------------------------------------------
    assert ids(c8y.bulk_operations.select()) == [bulk.id]
    assert ids(c8y.bulk_operations.select(with_deleted=True)) == [bulk.id, retry.id]
    assert log.take()[-1]["query"]["withDeleted"] == ["true"]
    assert c8y.bulk_operations.get_count(with_deleted=True) == 2
    assert c8y.bulk_operations.get_count(general_status="CANCELED") == 0
    assert ids(c8y.bulk_operations.select(with_deleted=True, general_status="CANCELED")) == [
        retry.id
    ]
    assert c8y.bulk_operations.get_count(with_deleted=True, general_status="CANCELED") == 1
    with pytest.raises(ValueError, match="422"):
        retry.delete()  # already DELETED
    with pytest.raises(KeyError):
        c8y.bulk_operations.get("999999999")
