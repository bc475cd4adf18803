"""devicecontrol.services and the agent walk of inventory.selectors, without HTTP
(devicecontrol.md §3, §4, §6, §7, §8, §11)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from devicecontrol.models import Operation, OperationStatus
from devicecontrol.realtime import OperationEvent
from devicecontrol.serializers import operation_json
from devicecontrol.services import operation_create, operation_update, operations_delete
from deviceplatform.api.exceptions import MissingFields, NotFound, ValidationFailed
from inventory import services as inventory_services
from inventory.models import ManagedObjectReference, Relation
from inventory.selectors import device_agent_id
from tests.devicecontrol.conftest import (
    Abort,
    EventCapture,
    Hierarchy,
    add_child_devices,
    make_device,
    rolled_back,
)

pytestmark = pytest.mark.django_db

T0 = datetime(2024, 5, 14, 10, 18, 33, 477000, tzinfo=UTC)
STATUSES = [status.value for status in OperationStatus]
NO_AGENT_MESSAGE = (
    "Device {pk} is not in the childDevices hierarchy of any agent (com_cumulocity_model_Agent)"
)


def stored(operation: Operation) -> dict[str, Any]:
    return Operation.objects.values().get(pk=operation.pk)


def event(action: str, operation: Operation, data: Any = None) -> OperationEvent:
    return OperationEvent(
        action=action,  # type: ignore[arg-type]
        operation_id=operation.pk,
        device_id=operation.device_id,
        agent_id=operation.agent_id,
        data=data if data is not None else operation_json(operation, base=""),
    )


# --- device_agent_id (devicecontrol.md §4) --------------------------------------------------------


def test_agent_of_agent_child_and_grandchild(hierarchy: Hierarchy) -> None:
    assert device_agent_id(device=hierarchy.agent) == hierarchy.agent.pk
    assert device_agent_id(device=hierarchy.device) == hierarchy.agent.pk
    assert device_agent_id(device=hierarchy.grandchild) == hierarchy.agent.pk


def test_agent_under_agent_resolves_to_itself_and_its_children_to_it(
    hierarchy: Hierarchy,
) -> None:
    inner = make_device("Inner agent", agent=True)
    child = make_device("Child of inner")
    add_child_devices(hierarchy.device, inner)
    add_child_devices(inner, child)

    assert device_agent_id(device=inner) == inner.pk
    assert device_agent_id(device=child) == inner.pk


def test_device_without_parents_has_no_agent() -> None:
    assert device_agent_id(device=make_device("Lonely")) is None


def test_deep_chain_without_agent_has_no_agent() -> None:
    chain = [make_device(f"Link {n}") for n in range(6)]
    for parent, child in itertools.pairwise(chain):
        add_child_devices(parent, child)

    assert device_agent_id(device=chain[-1]) is None


def test_deep_chain_reaches_the_agent_at_the_top() -> None:
    agent = make_device("Top", agent=True)
    chain = [make_device(f"Link {n}") for n in range(6)]
    add_child_devices(agent, chain[0])
    for parent, child in itertools.pairwise(chain):
        add_child_devices(parent, child)

    assert device_agent_id(device=chain[-1]) == agent.pk


def test_tie_on_one_level_goes_to_the_smallest_agent_id() -> None:
    first = make_device("Agent 1", agent=True)
    second = make_device("Agent 2", agent=True)
    third = make_device("Agent 3", agent=True)
    device = make_device("Shared")
    add_child_devices(third, device)
    add_child_devices(second, device)
    add_child_devices(first, device)

    assert device_agent_id(device=device) == min(first.pk, second.pk, third.pk) == first.pk


def test_tie_on_the_second_level_goes_to_the_smallest_agent_id() -> None:
    small = make_device("Small", agent=True)
    large = make_device("Large", agent=True)
    left = make_device("Left")
    right = make_device("Right")
    device = make_device("Shared")
    add_child_devices(large, left)
    add_child_devices(small, right)
    add_child_devices(left, device)
    add_child_devices(right, device)

    assert device_agent_id(device=device) == small.pk


def test_the_nearest_level_wins_over_a_smaller_id_further_up() -> None:
    far = make_device("Far agent", agent=True)  # created first: the smaller ID
    middle = make_device("Middle")
    near = make_device("Near agent", agent=True)
    device = make_device("Target")
    add_child_devices(far, middle)
    add_child_devices(middle, device)
    add_child_devices(near, device)

    assert far.pk < near.pk
    assert device_agent_id(device=device) == near.pk


@pytest.mark.parametrize("relation", [Relation.ASSET, Relation.ADDITION])
def test_only_child_devices_edges_count(relation: Relation) -> None:
    agent = make_device("Agent", agent=True)
    device = make_device("Asset")
    inventory_services.managed_object_add_children(
        parent=agent, relation=relation, children=[device]
    )

    assert device_agent_id(device=device) is None


def test_an_asset_edge_on_the_way_up_breaks_the_chain() -> None:
    agent = make_device("Agent", agent=True)
    middle = make_device("Middle")
    device = make_device("Device")
    inventory_services.managed_object_add_children(
        parent=agent, relation=Relation.ASSET, children=[middle]
    )
    add_child_devices(middle, device)

    assert device_agent_id(device=device) is None


def test_a_cycle_without_agent_ends_the_walk() -> None:
    # Cycles are refused at assignment (inventory.md §7); the walk protects itself anyway.
    first, second, third = make_device("1"), make_device("2"), make_device("3")
    add_child_devices(first, second)
    add_child_devices(second, third)
    ManagedObjectReference.objects.create(parent=third, child=first, relation=Relation.DEVICE)

    assert device_agent_id(device=third) is None


def test_a_cycle_below_an_agent_still_finds_it() -> None:
    agent = make_device("Agent", agent=True)
    first, second = make_device("1"), make_device("2")
    add_child_devices(first, second)
    ManagedObjectReference.objects.create(parent=second, child=first, relation=Relation.DEVICE)
    add_child_devices(agent, first)

    assert device_agent_id(device=second) == agent.pk


def test_unmarking_the_agent_leaves_its_children_without_agent(hierarchy: Hierarchy) -> None:
    inventory_services.managed_object_update(
        managed_object_id=hierarchy.agent.pk, data={"com_cumulocity_model_Agent": None}
    )

    assert device_agent_id(device=hierarchy.device) is None
    with pytest.raises(ValidationFailed):
        operation_create(device=hierarchy.device, data={"c8y_Restart": {}})


# --- operation_create (devicecontrol.md §6) -------------------------------------------------------


@pytest.mark.parametrize("target", ["agent", "device", "grandchild"])
def test_create_routes_to_the_agent_and_starts_pending(hierarchy: Hierarchy, target: str) -> None:
    device = getattr(hierarchy, target)

    operation = operation_create(
        device=device, data={"description": "Restart", "c8y_Restart": {}}, now=T0
    )

    row = stored(operation)
    assert row["device_id"] == device.pk
    assert row["agent_id"] == hierarchy.agent.pk
    assert row["status"] == "PENDING"
    assert row["creation_time"] == T0
    assert row["failure_reason"] is None
    assert row["bulk_operation_id"] is None
    assert row["fragments"] == {"description": "Restart", "c8y_Restart": {}}


def test_create_ignores_read_only_keys_and_drops_nulls(hierarchy: Hierarchy) -> None:
    operation = operation_create(
        device=hierarchy.device,
        data={
            "id": "1",
            "self": "http://elsewhere/devicecontrol/operations/1",
            "deviceId": "424242",
            "status": "SUCCESSFUL",
            "creationTime": "2000-01-01T00:00:00.000Z",
            "failureReason": "nope",
            "bulkOperationId": "77",
            "deviceName": "Renamed",
            "deviceExternalIDs": {"externalIds": []},
            "agentId": "12345",
            "delivery": {"status": "x"},
            "retryOf": "3",
            "c8y_Restart": {},
            "c8y_Gone": None,
        },
        now=T0,
    )

    operation.refresh_from_db()
    assert operation.status == OperationStatus.PENDING
    assert operation.device_id == hierarchy.device.pk
    assert operation.agent_id == hierarchy.agent.pk
    assert operation.creation_time == T0
    assert operation.failure_reason is None
    assert operation.bulk_operation_id is None
    assert operation.retry_of_id is None
    assert operation.fragments == {"c8y_Restart": {}}


def test_create_stores_the_bulk_operation_id(hierarchy: Hierarchy) -> None:
    operation = operation_create(device=hierarchy.device, data={}, bulk_operation_id=4711)

    assert stored(operation)["bulk_operation_id"] == 4711
    assert operation_json(operation, base="")["bulkOperationId"] == "4711"


def test_create_ids_increase(hierarchy: Hierarchy) -> None:
    created = [operation_create(device=hierarchy.device, data={}) for _ in range(3)]

    assert [op.pk for op in created] == sorted(op.pk for op in created)
    assert len({op.pk for op in created}) == 3


def test_create_stores_fragments_of_every_json_type(hierarchy: Hierarchy) -> None:
    fragments = {
        "c8y_Command": {"text": "get uboot.sn", "nested": {"deep": [1, 2.5, None, True]}},
        "c8y_SoftwareUpdate": [{"name": "a", "version": "4.0.0", "action": "install"}],
        "c8y_Text": "plain",
        "c8y_Number": 7,
        "c8y_Flag": False,
        "c8y_Unicode": "Grüße ✓",
    }

    operation = operation_create(device=hierarchy.device, data=fragments)

    assert stored(operation)["fragments"] == fragments


def test_create_without_agent_is_refused(capture_events: EventCapture) -> None:
    lonely = make_device("Lonely")

    with capture_events() as events, pytest.raises(ValidationFailed) as raised:
        operation_create(device=lonely, data={"c8y_Restart": {}})

    assert raised.value.error == "devicecontrol/Invalid Data"
    assert raised.value.message == NO_AGENT_MESSAGE.format(pk=lonely.pk)
    assert not Operation.objects.exists()
    assert events == []


@pytest.mark.parametrize("name", ["a.b", "$set", "with space", "tab\there", ""])
def test_create_refuses_bad_fragment_names(
    hierarchy: Hierarchy, capture_events: EventCapture, name: str
) -> None:
    with capture_events() as events, pytest.raises(ValidationFailed):
        operation_create(device=hierarchy.device, data={name: {}})

    assert not Operation.objects.exists()
    assert events == []


@pytest.mark.parametrize("key", ["pendingTimeout", "executionTimeout"])
@pytest.mark.parametrize("value", [-1, 0, "x", "10", 1.5, True, {}, [], 2**31, 10**12, 10**30])
def test_create_refuses_bad_timeouts(
    hierarchy: Hierarchy, capture_events: EventCapture, key: str, value: Any
) -> None:
    with capture_events() as events, pytest.raises(ValidationFailed):
        operation_create(device=hierarchy.device, data={key: value})

    assert not Operation.objects.exists()
    assert events == []


@pytest.mark.parametrize("key", ["pendingTimeout", "executionTimeout"])
def test_timeouts_up_to_the_column_range_are_accepted(hierarchy: Hierarchy, key: str) -> None:
    operation = operation_create(device=hierarchy.device, data={key: 2**31 - 1}, now=T0)

    updated = operation_update(
        operation_id=operation.pk, data={"status": "PENDING", key: 2**31 - 1}, now=T0
    )

    assert stored(updated)["fragments"] == {key: 2**31 - 1}


def test_create_registers_one_create_event(
    hierarchy: Hierarchy, capture_events: EventCapture
) -> None:
    with capture_events() as events:
        operation = operation_create(device=hierarchy.grandchild, data={"c8y_Restart": {}}, now=T0)

    assert events == [
        OperationEvent(
            action="CREATE",
            operation_id=operation.pk,
            device_id=hierarchy.grandchild.pk,
            agent_id=hierarchy.agent.pk,
            data={
                "id": str(operation.pk),
                "self": f"/devicecontrol/operations/{operation.pk}",
                "deviceId": str(hierarchy.grandchild.pk),
                "status": "PENDING",
                "creationTime": "2024-05-14T10:18:33.477Z",
                "c8y_Restart": {},
            },
        )
    ]


def test_create_without_notify_registers_nothing(
    hierarchy: Hierarchy, capture_events: EventCapture
) -> None:
    with capture_events() as events:
        operation_create(device=hierarchy.device, data={}, notify=False)

    assert Operation.objects.count() == 1
    assert events == []


def test_agent_is_not_recomputed_when_the_hierarchy_changes(hierarchy: Hierarchy) -> None:
    operation = operation_create(device=hierarchy.device, data={})
    other = make_device("Other agent", agent=True)
    inventory_services.managed_object_remove_children(
        parent=hierarchy.agent, relation=Relation.DEVICE, child_ids=[hierarchy.device.pk]
    )
    add_child_devices(other, hierarchy.device)

    assert stored(operation)["agent_id"] == hierarchy.agent.pk
    assert operation_create(device=hierarchy.device, data={}).agent_id == other.pk


# --- operation_update (devicecontrol.md §7) -------------------------------------------------------


@pytest.fixture
def operation(hierarchy: Hierarchy) -> Operation:
    return operation_create(
        device=hierarchy.device,
        data={"description": "Run", "c8y_Command": {"text": "ls", "extra": 1}, "c8y_Keep": 1},
        now=T0,
    )


def test_update_requires_status(operation: Operation) -> None:
    before = stored(operation)

    with pytest.raises(MissingFields) as raised:
        operation_update(operation_id=operation.pk, data={"c8y_Command": {}})

    assert raised.value.message == "Following mandatory fields should be included: status"
    assert stored(operation) == before


@pytest.mark.parametrize("status", ["BOGUS", "pending", "", 5, None, True, ["PENDING"]])
def test_update_refuses_unknown_status(
    operation: Operation, capture_events: EventCapture, status: Any
) -> None:
    before = stored(operation)

    with capture_events() as events, pytest.raises(ValidationFailed) as raised:
        operation_update(operation_id=operation.pk, data={"status": status})

    assert raised.value.error == "devicecontrol/Invalid Data"
    assert stored(operation) == before
    assert events == []


@pytest.mark.parametrize("status", ["PENDING", "EXECUTING", "SUCCESSFUL"])
def test_update_refuses_failure_reason_without_failed(
    operation: Operation, capture_events: EventCapture, status: str
) -> None:
    before = stored(operation)

    with capture_events() as events, pytest.raises(ValidationFailed) as raised:
        operation_update(
            operation_id=operation.pk, data={"status": status, "failureReason": "broken"}
        )

    assert raised.value.error == "devicecontrol/Invalid Data"
    assert stored(operation) == before
    assert events == []


@pytest.mark.parametrize("reason", [7, True, {"text": "x"}, ["x"]])
def test_update_refuses_a_failure_reason_that_is_no_string(
    operation: Operation, reason: Any
) -> None:
    before = stored(operation)

    with pytest.raises(ValidationFailed):
        operation_update(
            operation_id=operation.pk, data={"status": "FAILED", "failureReason": reason}
        )

    assert stored(operation) == before


def test_update_accepts_a_null_failure_reason_with_any_status(operation: Operation) -> None:
    updated = operation_update(
        operation_id=operation.pk, data={"status": "SUCCESSFUL", "failureReason": None}
    )

    assert updated.status == OperationStatus.SUCCESSFUL
    assert updated.failure_reason is None


def test_update_of_an_unknown_id_is_not_found(capture_events: EventCapture) -> None:
    with capture_events() as events, pytest.raises(NotFound) as raised:
        operation_update(operation_id=987654321, data={"status": "EXECUTING"})

    assert raised.value.error == "devicecontrol/Not Found"
    assert raised.value.message == (
        "Finding device data from database failed : No operation for gid '987654321'!"
    )
    assert events == []


def test_failure_reason_lifecycle(operation: Operation) -> None:
    failed = operation_update(
        operation_id=operation.pk, data={"status": "FAILED", "failureReason": "disk full"}
    )
    assert failed.failure_reason == "disk full"
    assert operation_json(failed, base="")["failureReason"] == "disk full"

    again = operation_update(operation_id=operation.pk, data={"status": "FAILED"})
    assert again.failure_reason == "disk full"  # FAILED without a reason keeps the old one

    replaced = operation_update(
        operation_id=operation.pk, data={"status": "FAILED", "failureReason": "no power"}
    )
    assert replaced.failure_reason == "no power"

    retried = operation_update(operation_id=operation.pk, data={"status": "PENDING"})
    assert retried.failure_reason is None
    assert "failureReason" not in operation_json(retried, base="")
    assert stored(operation)["failure_reason"] is None

    failed_without = operation_update(operation_id=operation.pk, data={"status": "FAILED"})
    assert failed_without.failure_reason is None
    assert "failureReason" not in operation_json(failed_without, base="")


def test_update_replaces_fragments_whole_and_null_removes(operation: Operation) -> None:
    updated = operation_update(
        operation_id=operation.pk,
        data={
            "status": "SUCCESSFUL",
            "c8y_Command": {"text": "ls", "result": "a b"},
            "description": None,
            "c8y_Result": [1, 2],
            "c8y_NeverThere": None,
        },
    )

    assert stored(operation)["fragments"] == {
        "c8y_Command": {"text": "ls", "result": "a b"},
        "c8y_Keep": 1,
        "c8y_Result": [1, 2],
    }
    assert updated.status == OperationStatus.SUCCESSFUL


def test_update_ignores_read_only_keys(operation: Operation, hierarchy: Hierarchy) -> None:
    updated = operation_update(
        operation_id=operation.pk,
        data={
            "status": "EXECUTING",
            "id": "1",
            "self": "x",
            "deviceId": str(hierarchy.grandchild.pk),
            "creationTime": "2000-01-01T00:00:00Z",
            "bulkOperationId": "5",
            "deviceName": "x",
            "deviceExternalIDs": {},
            "agentId": "5",
            "delivery": {},
            "retryOf": "1",
        },
    )

    row = stored(updated)
    assert row["device_id"] == hierarchy.device.pk
    assert row["agent_id"] == hierarchy.agent.pk
    assert row["creation_time"] == T0
    assert row["bulk_operation_id"] is None
    assert row["retry_of_id"] is None
    assert row["fragments"] == {
        "description": "Run",
        "c8y_Command": {"text": "ls", "extra": 1},
        "c8y_Keep": 1,
    }


@pytest.mark.parametrize(("start", "target"), list(itertools.product(STATUSES, STATUSES)))
def test_any_transition_is_allowed(operation: Operation, start: str, target: str) -> None:
    data: dict[str, Any] = {"status": start}
    if start == "FAILED":
        data["failureReason"] = "earlier"
    operation_update(operation_id=operation.pk, data=data)

    updated = operation_update(operation_id=operation.pk, data={"status": target})

    assert stored(updated)["status"] == target
    assert stored(updated)["failure_reason"] == ("earlier" if start == target == "FAILED" else None)


def test_every_update_registers_an_update_event_even_unchanged(
    operation: Operation, capture_events: EventCapture
) -> None:
    with capture_events() as events:
        first = operation_update(operation_id=operation.pk, data={"status": "PENDING"})
        first_json = operation_json(first, base="")
        second = operation_update(
            operation_id=operation.pk, data={"status": "EXECUTING", "c8y_Progress": 50}
        )

    assert first_json["status"] == "PENDING"
    assert events == [
        event("UPDATE", operation, first_json),
        event("UPDATE", operation, operation_json(second, base="")),
    ]
    assert events[1].data["c8y_Progress"] == 50  # type: ignore[index]


def test_update_without_notify_registers_nothing(
    operation: Operation, capture_events: EventCapture
) -> None:
    with capture_events() as events:
        operation_update(operation_id=operation.pk, data={"status": "EXECUTING"}, notify=False)

    assert stored(operation)["status"] == "EXECUTING"
    assert events == []


def test_status_changed_at_moves_only_when_the_status_changes(operation: Operation) -> None:
    later = T0 + timedelta(minutes=5)
    latest = T0 + timedelta(minutes=9)

    operation_update(operation_id=operation.pk, data={"status": "EXECUTING"}, now=later)
    operation_update(
        operation_id=operation.pk, data={"status": "EXECUTING", "c8y_Progress": 1}, now=latest
    )

    row = stored(operation)
    assert row["status_changed_at"] == later
    assert row["executing_since"] == later


# --- operations_delete (devicecontrol.md §8, §11) -------------------------------------------------


def test_delete_removes_exactly_the_queryset_with_one_event_each(
    hierarchy: Hierarchy, capture_events: EventCapture
) -> None:
    keep = operation_create(device=hierarchy.agent, data={})
    doomed = [operation_create(device=hierarchy.device, data={}) for _ in range(3)]

    with capture_events() as events:
        count = operations_delete(queryset=Operation.objects.filter(device=hierarchy.device))

    assert count == 3
    assert list(Operation.objects.values_list("pk", flat=True)) == [keep.pk]
    assert events == [event("DELETE", op, str(op.pk)) for op in doomed]  # in ID order


def test_delete_of_nothing_is_zero_without_events(
    hierarchy: Hierarchy, capture_events: EventCapture
) -> None:
    operation_create(device=hierarchy.device, data={})

    with capture_events() as events:
        count = operations_delete(queryset=Operation.objects.filter(device=hierarchy.agent))

    assert count == 0
    assert Operation.objects.count() == 1
    assert events == []


def test_delete_without_notify_registers_nothing(
    hierarchy: Hierarchy, capture_events: EventCapture
) -> None:
    operation_create(device=hierarchy.device, data={})

    with capture_events() as events:
        assert operations_delete(queryset=Operation.objects.all(), notify=False) == 1

    assert not Operation.objects.exists()
    assert events == []


def test_deleting_a_device_deletes_its_operations_with_events(
    hierarchy: Hierarchy, capture_events: EventCapture
) -> None:
    on_agent = operation_create(device=hierarchy.agent, data={})
    on_device = [operation_create(device=hierarchy.device, data={}) for _ in range(2)]
    on_grandchild = operation_create(device=hierarchy.grandchild, data={})

    with capture_events() as events:
        inventory_services.managed_object_delete(managed_object=hierarchy.device)

    assert sorted(Operation.objects.values_list("pk", flat=True)) == [
        on_agent.pk,
        on_grandchild.pk,
    ]
    assert sorted(events, key=lambda e: e.operation_id) == [
        event("DELETE", op, str(op.pk)) for op in on_device
    ]


def test_deleting_the_agent_leaves_its_childrens_operations(
    hierarchy: Hierarchy, capture_events: EventCapture
) -> None:
    on_agent = operation_create(device=hierarchy.agent, data={})
    on_device = operation_create(device=hierarchy.device, data={})

    with capture_events() as events:
        inventory_services.managed_object_delete(managed_object=hierarchy.agent)

    assert list(Operation.objects.values_list("pk", "agent_id")) == [
        (on_device.pk, hierarchy.agent.pk)
    ]
    assert events == [event("DELETE", on_agent, str(on_agent.pk))]
    with pytest.raises(ValidationFailed):
        operation_create(device=hierarchy.device, data={})


def test_cascade_delete_takes_the_whole_hierarchy_and_its_operations(
    hierarchy: Hierarchy, capture_events: EventCapture
) -> None:
    created = [
        operation_create(device=device, data={})
        for device in (hierarchy.agent, hierarchy.device, hierarchy.grandchild)
    ]

    with capture_events() as events:
        inventory_services.managed_object_delete(managed_object=hierarchy.agent, cascade=True)

    assert not Operation.objects.exists()
    assert sorted(events, key=lambda e: e.operation_id) == [
        event("DELETE", op, str(op.pk)) for op in created
    ]


def test_rolled_back_device_deletion_keeps_operations_and_sends_nothing(
    hierarchy: Hierarchy, capture_events: EventCapture
) -> None:
    operation = operation_create(device=hierarchy.device, data={})

    with capture_events() as events, pytest.raises(Abort):
        rolled_back(
            lambda: inventory_services.managed_object_delete(managed_object=hierarchy.device)
        )

    assert Operation.objects.filter(pk=operation.pk).exists()
    assert events == []
