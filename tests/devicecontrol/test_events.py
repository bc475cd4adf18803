"""Realtime events of operation changes (devicecontrol.md §6-§8, realtime.md): the exact events each
write registers on commit, and their delivery through the real channel layer. Nothing is registered
for a refused request, a rolled-back transaction or `X-Cumulocity-Processing-Mode: QUIESCENT`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.db import transaction

from devicecontrol.models import Operation
from devicecontrol.realtime import (
    ALL_OPERATIONS_GROUP,
    OperationEvent,
    agent_group,
    device_group,
)
from devicecontrol.serializers import operation_json
from devicecontrol.services import operation_create, operation_update, operations_delete
from tests.devicecontrol.conftest import (
    OPERATIONS,
    Abort,
    EventCapture,
    GroupListener,
    Hierarchy,
    add_child_devices,
    call,
    make_device,
    ok_json,
    operation_path,
    rolled_back,
)
from tests.factories import Clients

pytestmark = pytest.mark.django_db

BASE = "http://testserver"
Listen = Callable[[str], GroupListener]


def relative(body: dict[str, Any]) -> dict[str, Any]:
    """An API representation as the event carries it: `self` without scheme and host."""
    assert body["self"].startswith(BASE)
    return {**body, "self": body["self"][len(BASE) :]}


def event(action: str, operation: Operation, data: Any) -> OperationEvent:
    return OperationEvent(
        action=action,  # type: ignore[arg-type]
        operation_id=operation.pk,
        device_id=operation.device_id,
        agent_id=operation.agent_id,
        data=data,
    )


def by_id(events: list[Any]) -> list[Any]:
    return sorted(events, key=lambda item: int(item.operation_id))


# --- CREATE --------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["agent", "device", "grandchild"])
def test_post_registers_create_and_delivers_to_device_all_and_agent_groups(
    api: Clients,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    group_listener: Listen,
    target: str,
) -> None:
    device = getattr(hierarchy, target)
    listeners = [
        group_listener(device_group(device.pk)),
        group_listener(ALL_OPERATIONS_GROUP),
        group_listener(agent_group(hierarchy.agent.pk)),
    ]

    with capture_events(execute=True) as events:
        response = call(
            api["admin"],
            "POST",
            OPERATIONS,
            {"deviceId": str(device.pk), "description": "Restart", "c8y_Restart": {}},
            accept="application/json",
        )

    body = ok_json(response, 201)
    operation = Operation.objects.get(pk=body["id"])
    assert events == [
        OperationEvent(
            action="CREATE",
            operation_id=operation.pk,
            device_id=device.pk,
            agent_id=hierarchy.agent.pk,
            data=relative(body),
        )
    ]
    assert events[0].data == {
        "id": body["id"],
        "self": f"/devicecontrol/operations/{body['id']}",
        "deviceId": str(device.pk),
        "status": "PENDING",
        "creationTime": body["creationTime"],
        "description": "Restart",
        "c8y_Restart": {},
    }
    message = events[0].as_message()
    assert message == {
        "type": "operation.changed",
        "action": "CREATE",
        "operationId": body["id"],
        "deviceId": str(device.pk),
        "agentId": str(hierarchy.agent.pk),
        "data": events[0].data,
    }
    for listener in listeners:
        assert listener.receive() == message


def test_create_event_of_an_operation_under_a_nested_agent_goes_to_that_agent(
    api: Clients,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    group_listener: Listen,
) -> None:
    inner = make_device("Inner agent", agent=True)
    child = make_device("Inner child")
    add_child_devices(hierarchy.device, inner)
    add_child_devices(inner, child)
    inner_listener = group_listener(agent_group(inner.pk))

    with capture_events(execute=True) as events:
        body = ok_json(
            call(api["admin"], "POST", OPERATIONS, {"deviceId": child.pk}, accept="*/*"), 201
        )

    assert [(e.action, e.agent_id, e.device_id) for e in events] == [("CREATE", inner.pk, child.pk)]
    assert inner_listener.receive()["operationId"] == body["id"]


# --- UPDATE ----------------------------------------------------------------------------------------


def test_every_put_registers_an_update_even_when_nothing_changes(
    api: Clients,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    group_listener: Listen,
) -> None:
    operation = operation_create(device=hierarchy.device, data={"c8y_Restart": {}})
    device_listener = group_listener(device_group(hierarchy.device.pk))
    all_listener = group_listener(ALL_OPERATIONS_GROUP)
    agent_listener = group_listener(agent_group(hierarchy.agent.pk))

    with capture_events(execute=True) as events:
        bodies = [
            ok_json(
                call(
                    api["admin"],
                    "PUT",
                    operation_path(operation.pk),
                    {"status": "PENDING"},
                    accept="application/json",
                )
            )
            for _ in range(2)
        ]
        bodies.append(
            ok_json(
                call(
                    api["alice"],  # the owner of the device
                    "PUT",
                    operation_path(operation.pk),
                    {"status": "FAILED", "failureReason": "no", "c8y_Restart": None},
                    accept="application/json",
                )
            )
        )

    assert events == [event("UPDATE", operation, relative(body)) for body in bodies]
    assert events[2].data["failureReason"] == "no"  # type: ignore[index]
    assert "c8y_Restart" not in events[2].data
    messages = [e.as_message() for e in events]
    assert device_listener.receive_many(3) == messages
    assert all_listener.receive_many(3) == messages

    # Updates never go to the agent channel: the next thing the agent hears is a new operation.
    with capture_events(execute=True) as events:
        created = ok_json(
            call(api["admin"], "POST", OPERATIONS, {"deviceId": hierarchy.device.pk}, accept="*/*"),
            201,
        )
    assert [e.action for e in events] == ["CREATE"]
    first = agent_listener.receive()
    assert (first["action"], first["operationId"]) == ("CREATE", created["id"])


# --- DELETE ----------------------------------------------------------------------------------------


def test_delete_by_filter_registers_one_delete_per_operation(
    api: Clients,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    group_listener: Listen,
) -> None:
    doomed = [operation_create(device=hierarchy.device, data={}) for _ in range(3)]
    kept = operation_create(device=hierarchy.grandchild, data={})
    listener = group_listener(device_group(hierarchy.device.pk))
    agent_listener = group_listener(agent_group(hierarchy.agent.pk))

    with capture_events(execute=True) as events:
        response = call(api["admin"], "DELETE", f"{OPERATIONS}?deviceId={hierarchy.device.pk}")

    assert response.status_code == 204
    assert list(Operation.objects.values_list("pk", flat=True)) == [kept.pk]
    assert by_id(events) == [event("DELETE", op, str(op.pk)) for op in doomed]
    received = listener.receive_many(3)
    assert sorted(received, key=lambda m: int(m["operationId"])) == [
        e.as_message() for e in by_id(events)
    ]
    assert all(m["action"] == "DELETE" and m["data"] == m["operationId"] for m in received)

    with capture_events(execute=True):
        created = ok_json(
            call(api["admin"], "POST", OPERATIONS, {"deviceId": hierarchy.device.pk}, accept="*/*"),
            201,
        )
    assert agent_listener.receive()["operationId"] == created["id"]


def test_delete_without_filter_registers_a_delete_for_every_operation(
    api: Clients, hierarchy: Hierarchy, capture_events: EventCapture
) -> None:
    created = [
        operation_create(device=device, data={})
        for device in (hierarchy.agent, hierarchy.device, hierarchy.grandchild)
    ]

    with capture_events() as events:
        assert call(api["admin"], "DELETE", OPERATIONS).status_code == 204

    assert by_id(events) == [event("DELETE", op, str(op.pk)) for op in created]


def test_deleting_the_device_through_the_inventory_api_deletes_its_operations(
    api: Clients,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    group_listener: Listen,
) -> None:
    doomed = [operation_create(device=hierarchy.device, data={}) for _ in range(2)]
    kept = operation_create(device=hierarchy.grandchild, data={})
    listener = group_listener(device_group(hierarchy.device.pk))

    with capture_events(execute=True) as events:
        response = call(api["alice"], "DELETE", f"/inventory/managedObjects/{hierarchy.device.pk}")

    assert response.status_code == 204, response.content
    assert list(Operation.objects.values_list("pk", flat=True)) == [kept.pk]
    assert by_id(events) == [event("DELETE", op, str(op.pk)) for op in doomed]
    received = listener.receive_many(2)
    assert sorted(m["data"] for m in received) == sorted(str(op.pk) for op in doomed)


def test_refused_device_deletion_deletes_no_operation(
    api: Clients, hierarchy: Hierarchy, capture_events: EventCapture
) -> None:
    operation = operation_create(device=hierarchy.device, data={})

    with capture_events() as events:
        response = call(api["bob"], "DELETE", f"/inventory/managedObjects/{hierarchy.device.pk}")

    assert response.status_code == 403
    assert Operation.objects.filter(pk=operation.pk).exists()
    assert events == []


# --- nothing on failure, rollback or QUIESCENT --------------------------------------------------


def refused_requests(hierarchy: Hierarchy, operation: Operation) -> list[tuple[str, str, Any, str]]:
    lonely = make_device("Lonely")
    path = operation_path(operation.pk)
    return [
        ("admin", "POST", {"deviceId": "987654321"}, OPERATIONS),
        ("admin", "POST", {"deviceId": lonely.pk}, OPERATIONS),
        ("admin", "POST", {"deviceId": True}, OPERATIONS),
        ("admin", "POST", {"deviceId": hierarchy.device.pk, "a.b": 1}, OPERATIONS),
        ("admin", "POST", {"deviceId": hierarchy.device.pk, "pendingTimeout": -1}, OPERATIONS),
        ("bob", "POST", {"deviceId": hierarchy.device.pk}, OPERATIONS),
        ("reader", "POST", {"deviceId": hierarchy.device.pk}, OPERATIONS),
        ("admin", "PUT", {}, path),
        ("admin", "PUT", {"status": "BOGUS"}, path),
        ("admin", "PUT", {"status": "SUCCESSFUL", "failureReason": "x"}, path),
        ("admin", "PUT", {"status": "EXECUTING"}, operation_path(987654321)),
        ("bob", "PUT", {"status": "EXECUTING"}, path),
        ("reader", "PUT", {"status": "EXECUTING"}, path),
        ("admin", "DELETE", None, f"{OPERATIONS}?status=BOGUS"),
        ("reader", "DELETE", None, OPERATIONS),
        ("alice", "DELETE", None, f"{OPERATIONS}?deviceId={hierarchy.device.pk}"),
        ("admin", "DELETE", None, path),
    ]


def test_refused_requests_register_and_deliver_nothing(
    api: Clients,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    group_listener: Listen,
) -> None:
    operation = operation_create(device=hierarchy.device, data={})
    listeners = [
        group_listener(device_group(hierarchy.device.pk)),
        group_listener(ALL_OPERATIONS_GROUP),
        group_listener(agent_group(hierarchy.agent.pk)),
    ]
    before = Operation.objects.values().get(pk=operation.pk)

    for who, method, body, path in refused_requests(hierarchy, operation):
        with capture_events(execute=True) as events:
            response = call(api[who], method, path, body)
        assert response.status_code >= 400, (who, method, path, body)
        assert events == [], (who, method, path, body)

    assert Operation.objects.count() == 1
    assert Operation.objects.values().get(pk=operation.pk) == before
    # The first message anyone hears is the one of the next successful change.
    with capture_events(execute=True):
        created = ok_json(
            call(api["admin"], "POST", OPERATIONS, {"deviceId": hierarchy.device.pk}, accept="*/*"),
            201,
        )
    for listener in listeners:
        assert listener.receive()["operationId"] == created["id"]


def test_rolled_back_changes_register_and_deliver_nothing(
    hierarchy: Hierarchy, capture_events: EventCapture, group_listener: Listen
) -> None:
    existing = operation_create(device=hierarchy.device, data={})
    listener = group_listener(device_group(hierarchy.device.pk))
    before = Operation.objects.values().get(pk=existing.pk)

    with capture_events(execute=True) as events:
        with pytest.raises(Abort):
            rolled_back(lambda: operation_create(device=hierarchy.device, data={"c8y_Restart": {}}))
        with pytest.raises(Abort):
            rolled_back(
                lambda: operation_update(operation_id=existing.pk, data={"status": "EXECUTING"})
            )
        with pytest.raises(Abort):
            rolled_back(lambda: operations_delete(queryset=Operation.objects.all()))

    assert events == []
    assert list(Operation.objects.values()) == [before]

    with capture_events(execute=True) as events:
        updated = operation_update(operation_id=existing.pk, data={"status": "SUCCESSFUL"})
    assert events == [event("UPDATE", updated, operation_json(updated, base=""))]
    assert listener.receive()["data"]["status"] == "SUCCESSFUL"


def test_only_the_rolled_back_part_of_a_transaction_is_silent(
    hierarchy: Hierarchy, capture_events: EventCapture
) -> None:
    with capture_events() as events, transaction.atomic():
        kept = operation_create(device=hierarchy.device, data={})
        with pytest.raises(Abort):
            rolled_back(lambda: operation_create(device=hierarchy.device, data={}))

    assert [(e.action, e.operation_id) for e in events] == [("CREATE", kept.pk)]
    assert list(Operation.objects.values_list("pk", flat=True)) == [kept.pk]


@pytest.mark.parametrize("mode", ["QUIESCENT", "quiescent"])
def test_quiescent_changes_register_nothing(
    api: Clients,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    group_listener: Listen,
    mode: str,
) -> None:
    listeners = [
        group_listener(device_group(hierarchy.device.pk)),
        group_listener(agent_group(hierarchy.agent.pk)),
    ]
    header = {"HTTP_X_CUMULOCITY_PROCESSING_MODE": mode}

    with capture_events(execute=True) as events:
        created = ok_json(
            call(
                api["admin"],
                "POST",
                OPERATIONS,
                {"deviceId": hierarchy.device.pk},
                accept="*/*",
                **header,
            ),
            201,
        )
        updated = ok_json(
            call(
                api["admin"],
                "PUT",
                operation_path(created["id"]),
                {"status": "EXECUTING"},
                accept="*/*",
                **header,
            )
        )
        deleted = call(api["admin"], "DELETE", f"{OPERATIONS}?status=EXECUTING", **header)

    assert updated["status"] == "EXECUTING"
    assert deleted.status_code == 204
    assert not Operation.objects.exists()
    assert events == []

    with capture_events(execute=True):
        sentinel = ok_json(
            call(api["admin"], "POST", OPERATIONS, {"deviceId": hierarchy.device.pk}, accept="*/*"),
            201,
        )
    for listener in listeners:
        assert listener.receive()["operationId"] == sentinel["id"]


@pytest.mark.parametrize("mode", ["PERSISTENT", "TRANSIENT", "CEP"])
def test_other_processing_modes_notify(
    api: Clients, hierarchy: Hierarchy, capture_events: EventCapture, mode: str
) -> None:
    with capture_events() as events:
        response = call(
            api["admin"],
            "POST",
            OPERATIONS,
            {"deviceId": hierarchy.device.pk},
            HTTP_X_CUMULOCITY_PROCESSING_MODE=mode,
        )

    assert response.status_code == 201
    assert [e.action for e in events] == ["CREATE"]
