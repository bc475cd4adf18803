"""The operations API end to end with the official Python client `c8y-api` 3.7.3 against a live server.

Every call goes through c8y-api unchanged, so this pins what it sends and what it parses:
`Operation.create()` (POST with the operation media type in `Accept`), `select` (always `revert=false`,
paging until an empty page), `get_count` (`pageSize=1&withTotalPages=true`, reads
`statistics.totalPages`), `get_last` (`dateFrom=1970-01-01&revert=true&pageSize=1`), `update()` (PUT of
the changed fields only), `delete_by` (DELETE with filters and no `Accept`), and that `bulk_id` is sent
as both `bulkId` and `bulkOperationId`.

Two client facts shape this test: `c8y.operations` has no public `create` (only `Operation(...).create()`),
and assigning a *new* attribute (`op.c8y_Result = {...}`) does not add a fragment in 3.7.3 (the
instance-level `__setattr__` is never called), so results are written with `op["..."] = ...` or through
an existing fragment (`op.c8y_Command.result = ...`)."""

from __future__ import annotations

from typing import Any

import pytest
from c8y_api import CumulocityApi
from c8y_api.model import Device, ExternalId, Operation

from tests.c8y_support import RequestLog

pytestmark = pytest.mark.django_db(transaction=True)

DEVICE_OPERATIONS = 12  # with page_size=5: pages of 5, 5, 2 and the empty fourth that ends paging
OPERATION_MEDIA_TYPE = "application/vnd.com.nsn.cumulocity.operation+json"


def ids(objects: Any) -> list[str]:
    return [obj.id for obj in objects]


def by_id(values: Any) -> list[str]:
    return sorted(values, key=int)


def test_operations_round_trip(c8y: CumulocityApi) -> None:
    from devicecontrol.services import operation_create
    from inventory.models import ManagedObject

    # --- topology: agent A with children D and D2; agent B with child E; a device without agent ---
    agent = Device(c8y, type="c8y_Agent", name="agent-a", com_cumulocity_model_Agent={}).create()
    device = Device(c8y, type="c8y_Linux", name="sensor-d").create()
    device2 = Device(c8y, type="c8y_Linux", name="sensor-d2").create()
    agent.add_child_device(device)
    agent.add_child_device(device2)
    other_agent = Device(
        c8y, type="c8y_Agent", name="agent-b", com_cumulocity_model_Agent={}
    ).create()
    other_device = Device(c8y, type="c8y_Linux", name="sensor-e").create()
    other_agent.add_child_device(other_device)
    loner = Device(c8y, type="c8y_Linux", name="loner").create()
    ExternalId(
        c8y, external_id="raspi-1", external_type="c8y_Serial", managed_object_id=device.id
    ).create()
    log = RequestLog(c8y, first_values=True)

    # --- create ---------------------------------------------------------------------------------
    ops = []
    for i in range(DEVICE_OPERATIONS):
        fragment = {"c8y_Restart": {}} if i % 2 == 0 else {"c8y_Command": {"text": f"cmd {i}"}}
        ops.append(
            Operation(c8y, device_id=device.id, description=f"op {i:02d}", **fragment).create()
        )
    first = ops[0]
    assert first.id.isdigit()
    assert first.device_id == device.id
    assert first.status == Operation.Status.PENDING
    assert first.description == "op 00"
    assert first.creation_time.endswith("Z")
    assert dict(first.fragments) == {"c8y_Restart": {}}  # no deviceName on a single operation
    assert ops[1].c8y_Command.text == "cmd 1"
    assert ids(ops) == by_id(ids(ops))
    posted = log.take()[0]
    assert (posted["method"], posted["path"], posted["status"]) == (
        "POST",
        "/devicecontrol/operations",
        201,
    )
    assert posted["accept"] == OPERATION_MEDIA_TYPE
    assert posted["body"] == {"deviceId": device.id, "description": "op 00", "c8y_Restart": {}}

    # A client-sent status does not start an operation elsewhere than PENDING (spec §6).
    on_agent = [
        Operation(c8y, device_id=agent.id, status="SUCCESSFUL", c8y_Restart={}).create()
        for _ in range(2)
    ]
    assert {op.status for op in on_agent} == {"PENDING"}
    on_device2 = [
        Operation(c8y, device_id=device2.id, c8y_Configuration={"config": f"c{i}"}).create()
        for i in range(3)
    ]
    on_other = [
        Operation(c8y, device_id=other_device.id, c8y_Restart={}).create() for _ in range(2)
    ]
    agent_ops = ids(ops) + ids(on_agent) + ids(on_device2)

    # Refusals: a device outside every agent's childDevices, and an unknown device: 422.
    for target in (loner.id, "999999999"):
        with pytest.raises(ValueError, match="422"):
            Operation(c8y, device_id=target, c8y_Restart={}).create()
    log.take()

    # --- select: FIFO, paged, by device / agent / status / fragment ------------------------------
    listed = list(c8y.operations.select(device_id=device.id, page_size=5))
    assert ids(listed) == ids(ops)
    pages = log.take()
    assert [entry["query"].get("currentPage") for entry in pages] == ["1", "2", "3", "4"]
    assert pages[0]["query"] == {
        "deviceId": device.id,
        "revert": "false",
        "pageSize": "5",
        "currentPage": "1",
    }
    assert {entry["status"] for entry in pages} == {200}
    assert listed[0].device_id == device.id
    assert listed[0].fragments["deviceName"] == "sensor-d"  # collections carry deviceName
    assert "deviceExternalIDs" not in listed[0].fragments  # only when listing by agentId
    assert listed[1].c8y_Command.text == "cmd 1"

    assert ids(c8y.operations.select(device_id=device.id, page_size=5, page_number=2)) == ids(
        ops[5:10]
    )
    assert ids(c8y.operations.get_all(device_id=device.id, page_size=5, limit=7)) == ids(ops[:7])

    by_agent = c8y.operations.get_all(agent_id=agent.id, page_size=5)
    assert ids(by_agent) == by_id(agent_ops)  # the agent itself and all its children, FIFO
    external = {op.id: op.fragments["deviceExternalIDs"] for op in by_agent}
    assert external[ops[0].id]["externalIds"][0]["externalId"] == "raspi-1"
    assert external[ops[0].id]["externalIds"][0]["type"] == "c8y_Serial"
    assert external[on_device2[0].id]["externalIds"] == []
    assert ids(c8y.operations.select(agent_id=other_agent.id)) == ids(on_other)
    assert ids(c8y.operations.select(agent_id=agent.id, status="PENDING", page_size=5)) == by_id(
        agent_ops
    )
    assert ids(c8y.operations.select(device_id=device.id, fragment="c8y_Command")) == ids(ops[1::2])
    # revert=true alone keeps ascending order; with a date filter it is newest first (spec §5).
    assert ids(c8y.operations.select(device_id=device.id, reverse=True)) == ids(ops)
    assert ids(
        c8y.operations.select(device_id=device.id, date_from="1970-01-01", reverse=True)
    ) == list(reversed(ids(ops)))

    # --- update: EXECUTING, then SUCCESSFUL with a result fragment --------------------------------
    log.take()
    fetched = c8y.operations.get(ops[1].id)
    assert fetched.status == "PENDING"
    fetched.status = Operation.Status.EXECUTING
    executing = fetched.update()
    assert executing.status == "EXECUTING"
    assert executing.id == ops[1].id
    put = log.take()[-1]
    assert (put["method"], put["path"], put["status"]) == (
        "PUT",
        f"/devicecontrol/operations/{ops[1].id}",
        200,
    )
    assert put["body"] == {"status": "EXECUTING"}
    assert put["accept"] == OPERATION_MEDIA_TYPE
    assert c8y.operations.get(ops[1].id).status == "EXECUTING"

    executing.status = Operation.Status.SUCCESSFUL
    executing.c8y_Command.result = "1657"  # into the existing fragment (signals the change)
    executing["c8y_Result"] = {"exitCode": 0, "output": "ok"}  # a new result fragment
    done = executing.update()
    assert log.take()[-1]["body"] == {
        "status": "SUCCESSFUL",
        "c8y_Command": {"text": "cmd 1", "result": "1657"},
        "c8y_Result": {"exitCode": 0, "output": "ok"},
    }
    assert done.status == "SUCCESSFUL"
    reread = c8y.operations.get(ops[1].id)
    assert reread.status == "SUCCESSFUL"
    assert reread.description == "op 01"
    assert dict(reread.c8y_Command) == {"text": "cmd 1", "result": "1657"}
    assert dict(reread.c8y_Result) == {"exitCode": 0, "output": "ok"}
    assert "failureReason" not in reread.fragments

    # FAILED with a reason; the reason is refused with another status and nothing changes.
    failing = c8y.operations.get(ops[3].id)
    failing.status = Operation.Status.FAILED
    failing["failureReason"] = "device unreachable"
    assert failing.update().fragments["failureReason"] == "device unreachable"
    refused = c8y.operations.get(ops[5].id)
    refused.status = Operation.Status.SUCCESSFUL
    refused["failureReason"] = "not allowed here"
    with pytest.raises(ValueError, match="422"):
        refused.update()
    assert c8y.operations.get(ops[5].id).status == "PENDING"
    running = c8y.operations.get(ops[4].id)
    running.status = Operation.Status.EXECUTING
    running.update()

    # --- get_count (exact) and get_last (newest) -------------------------------------------------
    log.take()
    assert c8y.operations.get_count(device_id=device.id) == DEVICE_OPERATIONS
    count_request = log.take()[0]
    assert count_request["query"] == {
        "deviceId": device.id,
        "pageSize": "1",
        "withTotalPages": "true",
    }
    assert c8y.operations.get_count(device_id=device.id, status="PENDING") == 9
    assert c8y.operations.get_count(agent_id=agent.id) == len(agent_ops)
    assert c8y.operations.get_count(agent_id=agent.id, status="EXECUTING") == 1
    assert c8y.operations.get_count(agent_id=other_agent.id) == 2
    assert c8y.operations.get_count(status="FAILED") == 1
    assert c8y.operations.get_count(device_id=device.id, fragment="c8y_Command") == 6
    assert c8y.operations.get_count(device_id=loner.id) == 0
    assert ids(c8y.operations.select(agent_id=agent.id, status="EXECUTING")) == [ops[4].id]
    assert ids(c8y.operations.select(device_id=device.id, status="FAILED")) == [ops[3].id]
    failed = c8y.operations.get_all(agent_id=agent.id, status="FAILED")
    assert failed[0].fragments["failureReason"] == "device unreachable"

    log.take()
    last = c8y.operations.get_last(device_id=device.id)
    assert last is not None
    assert last.id == ops[-1].id
    assert log.take()[0]["query"] == {
        "deviceId": device.id,
        "dateFrom": "1970-01-01",
        "revert": "true",
        "pageSize": "1",
        "currentPage": "1",
    }
    assert c8y.operations.get_last(device_id=device.id, status="SUCCESSFUL").id == ops[1].id
    assert c8y.operations.get_last(agent_id=agent.id).id == max(agent_ops, key=int)
    assert c8y.operations.get_last(device_id=loner.id) is None

    # --- bulk operation id (bulk operations themselves are a later issue: created by the service) -
    bulk_id, other_bulk_id = 4242, 4343
    rows = {mo.pk: mo for mo in ManagedObject.objects.filter(pk__in=[device.id, device2.id])}
    bulk_ops = [
        operation_create(
            device=rows[int(target)], data={"c8y_Restart": {}}, bulk_operation_id=bulk_id
        )
        for target in (device.id, device2.id)
    ]
    other_bulk = operation_create(
        device=rows[int(device2.id)], data={"c8y_Restart": {}}, bulk_operation_id=other_bulk_id
    )
    log.take()
    by_bulk = c8y.operations.get_all(bulk_id=str(bulk_id))
    assert ids(by_bulk) == [str(op.pk) for op in bulk_ops]
    assert {op.fragments["bulkOperationId"] for op in by_bulk} == {str(bulk_id)}
    assert log.take()[0]["query"]["bulkOperationId"] == str(bulk_id)  # sent with bulkId too
    assert c8y.operations.get_count(bulk_id=str(bulk_id)) == 2
    assert c8y.operations.get_count(bulk_id=str(bulk_id), device_id=device2.id) == 1
    assert ids(c8y.operations.select(bulk_id=str(bulk_id), status="PENDING")) == ids(by_bulk)
    assert c8y.operations.get_count(bulk_id="999999") == 0

    # --- no single DELETE (405); delete_by removes exactly the matching operations --------------
    with pytest.raises(ValueError, match="405"):
        ops[0].delete()
    assert c8y.operations.get(ops[0].id).status == "PENDING"

    total_before = c8y.operations.get_count()
    pending_on_device = c8y.operations.get_count(device_id=device.id, status="PENDING")
    assert pending_on_device == 9 + 1  # the bulk one too
    log.take()
    c8y.operations.delete_by(device_id=device.id, status="PENDING")
    deleted = log.take()[0]
    assert (deleted["method"], deleted["path"], deleted["status"]) == (
        "DELETE",
        "/devicecontrol/operations",
        204,
    )
    assert deleted["query"] == {"deviceId": device.id, "status": "PENDING"}
    assert ids(c8y.operations.select(device_id=device.id)) == [ops[1].id, ops[3].id, ops[4].id]
    assert c8y.operations.get_count() == total_before - pending_on_device
    # Nothing else was touched: the other devices' PENDING operations are all still there.
    assert ids(c8y.operations.select(device_id=device2.id, status="PENDING")) == by_id(
        [*ids(on_device2), str(bulk_ops[1].pk), str(other_bulk.pk)]
    )
    assert ids(c8y.operations.select(device_id=agent.id)) == ids(on_agent)
    assert ids(c8y.operations.select(agent_id=other_agent.id)) == ids(on_other)
    assert c8y.operations.get(ops[1].id).c8y_Command.result == "1657"

    c8y.operations.delete_by(device_id=device.id, status="PENDING")  # nothing left: still 204
    c8y.operations.delete_by(agent_id=other_agent.id)
    assert c8y.operations.get_count(agent_id=other_agent.id) == 0
    assert c8y.operations.get_count(agent_id=agent.id) == total_before - pending_on_device - 2
