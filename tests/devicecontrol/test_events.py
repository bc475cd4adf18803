"""Realtime events of operation changes (devicecontrol.md §6-§8, realtime.md §5): the exact events each
write registers on commit, and the Bayeux messages subscribers of the real realtime store receive
for them, whether the change came through REST, the admin, a beat sweep or a device deletion.
Nothing is sent for a refused request, a rolled-back transaction or
`X-Cumulocity-Processing-Mode: QUIESCENT`, and nothing before the transaction commits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from django.db import transaction
from django.test import Client
from django.urls import reverse

from devicecontrol import tasks
from devicecontrol.models import Operation, OperationStatus
from devicecontrol.realtime import OperationEvent
from devicecontrol.serializers import operation_json
from devicecontrol.services import operation_create, operation_update, operations_delete
from deviceplatform.services import user_upsert
from inventory.models import ManagedObject
from tests.conftest import Subscribe, Subscriber
from tests.devicecontrol.conftest import (
    BASE_URL,
    OPERATIONS,
    Abort,
    EventCapture,
    Hierarchy,
    Message,
    add_child_devices,
    as_get,
    call,
    changed,
    deleted,
    make_device,
    ok_json,
    operation_path,
    opted_in,
    relative,
    rolled_back,
    to_agent,
)
from tests.factories import Clients
from tests.inventory.test_admin import form_data

pytestmark = pytest.mark.django_db

PAST = datetime(2024, 1, 1, 12, tzinfo=UTC)
CHANGELIST = reverse("admin:devicecontrol_operation_changelist")


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


def post(api: Clients, device: ManagedObject, **header: str) -> dict[str, Any]:
    return ok_json(
        call(api["admin"], "POST", OPERATIONS, {"deviceId": device.pk}, accept="*/*", **header),
        201,
    )


def subscribers_of(subscriber: Subscribe, hierarchy: Hierarchy) -> dict[str, Subscriber]:
    """The device's own channel, every device, and the agent channel."""
    return {
        "device": subscriber(f"/operations/{hierarchy.device.pk}"),
        "all": subscriber("/operations/*"),
        "agent": subscriber(f"/{hierarchy.agent.pk}"),
    }


def assert_silent_until_next_create(
    api: Clients, hierarchy: Hierarchy, capture: EventCapture, listeners: dict[str, Subscriber]
) -> None:
    """Nothing is queued for the listeners; the next successful create reaches each of them
    (so they were listening all along)."""
    assert {name: s.received() for name, s in listeners.items()} == {name: [] for name in listeners}
    with capture(execute=True):
        created = post(api, hierarchy.device)
    for name, listener in listeners.items():
        expected = to_agent(hierarchy.agent, created) if name == "agent" else None
        assert listener.received() == [expected or changed("CREATE", created)], name


# --- CREATE --------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["agent", "device", "grandchild"])
def test_post_sends_create_to_the_device_wildcard_and_agent_channels(
    api: Clients,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    subscriber: Subscribe,
    target: str,
) -> None:
    device = getattr(hierarchy, target)
    own = subscriber(f"/operations/{device.pk}")
    every = subscriber("/operations/*")
    both = subscriber(f"/operations/{device.pk}", "/operations/*", "/operations/987654321")
    agent = subscriber(f"/{hierarchy.agent.pk}")
    elsewhere = hierarchy.grandchild if target != "grandchild" else hierarchy.device
    other = subscriber(f"/operations/{elsewhere.pk}")

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
    assert events == [event("CREATE", operation, relative(body))]
    assert body == {
        "id": body["id"],
        "self": f"{BASE_URL}/devicecontrol/operations/{body['id']}",
        "deviceId": str(device.pk),
        "status": "PENDING",
        "creationTime": body["creationTime"],
        "description": "Restart",
        "c8y_Restart": {},
    }
    # The full operation with an absolute `self`, once per session even when two of its
    # subscriptions match; the agent gets the bare operation.
    assert own.received() == [changed("CREATE", body)]
    assert every.received() == [changed("CREATE", body)]
    assert both.received() == [changed("CREATE", body)]
    assert agent.received() == [to_agent(hierarchy.agent, body)]
    assert other.received() == []


def test_create_under_a_nested_agent_goes_to_that_agent_only(
    api: Clients,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    subscriber: Subscribe,
) -> None:
    inner = make_device("Inner agent", agent=True)
    child = make_device("Inner child")
    add_child_devices(hierarchy.device, inner)
    add_child_devices(inner, child)
    inner_agent = subscriber(f"/{inner.pk}")
    outer_agent = subscriber(f"/{hierarchy.agent.pk}")

    with capture_events(execute=True) as events:
        body = post(api, child)

    assert [(e.action, e.agent_id, e.device_id) for e in events] == [("CREATE", inner.pk, child.pk)]
    assert inner_agent.received() == [to_agent(inner, body)]
    assert outer_agent.received() == []
    with capture_events(execute=True):
        outer = post(api, hierarchy.device)
    assert outer_agent.received() == [to_agent(hierarchy.agent, outer)]
    assert inner_agent.received() == []


# --- UPDATE ----------------------------------------------------------------------------------------


def test_every_put_sends_an_update_even_when_nothing_changes(
    api: Clients,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    subscriber: Subscribe,
) -> None:
    operation = operation_create(device=hierarchy.device, data={"c8y_Restart": {}})
    listeners = subscribers_of(subscriber, hierarchy)

    def put(who: str, body: dict[str, Any]) -> dict[str, Any]:
        path = operation_path(operation.pk)
        return ok_json(call(api[who], "PUT", path, body, accept="application/json"))

    with capture_events(execute=True) as events:
        bodies = [put("admin", {"status": "PENDING"}) for _ in range(2)]
        # the owner of the device
        bodies.append(
            put("alice", {"status": "FAILED", "failureReason": "no", "c8y_Restart": None})
        )

    assert events == [event("UPDATE", operation, relative(body)) for body in bodies]
    assert bodies[2]["failureReason"] == "no"
    assert "c8y_Restart" not in bodies[2]
    messages = [changed("UPDATE", body) for body in bodies]
    assert listeners["device"].received() == messages
    assert listeners["all"].received() == messages
    # Updates never go to the agent channel: the next thing the agent hears is a new operation.
    assert_silent_until_next_create(api, hierarchy, capture_events, {"agent": listeners["agent"]})


def test_one_devices_changes_arrive_in_commit_order(
    api: Clients, hierarchy: Hierarchy, capture_events: EventCapture, subscriber: Subscribe
) -> None:
    listeners = subscribers_of(subscriber, hierarchy)
    grandchild = subscriber(f"/operations/{hierarchy.grandchild.pk}")

    with capture_events(execute=True):
        first = post(api, hierarchy.device)
        other = post(api, hierarchy.grandchild)
        path = operation_path(first["id"])
        executing = ok_json(call(api["admin"], "PUT", path, {"status": "EXECUTING"}, accept="*/*"))
        done = ok_json(call(api["admin"], "PUT", path, {"status": "SUCCESSFUL"}, accept="*/*"))
        assert call(api["admin"], "DELETE", f"{OPERATIONS}?status=SUCCESSFUL").status_code == 204

    mine = [
        changed("CREATE", first),
        changed("UPDATE", executing),
        changed("UPDATE", done),
        {
            "channel": f"/operations/{hierarchy.device.pk}",
            "data": {"realtimeAction": "DELETE", "data": first["id"]},
        },
    ]
    assert listeners["device"].received() == mine
    assert grandchild.received() == [changed("CREATE", other)]
    assert listeners["all"].received() == [*mine[:1], changed("CREATE", other), *mine[1:]]
    assert listeners["agent"].received() == [
        to_agent(hierarchy.agent, first),
        to_agent(hierarchy.agent, other),
    ]


# --- DELETE ----------------------------------------------------------------------------------------


def test_delete_by_filter_sends_one_delete_per_operation_with_the_id_string(
    api: Clients,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    subscriber: Subscribe,
) -> None:
    doomed = [operation_create(device=hierarchy.device, data={}) for _ in range(3)]
    kept = operation_create(device=hierarchy.grandchild, data={})
    listeners = subscribers_of(subscriber, hierarchy)
    grandchild = subscriber(f"/operations/{hierarchy.grandchild.pk}")

    with capture_events(execute=True) as events:
        response = call(api["admin"], "DELETE", f"{OPERATIONS}?deviceId={hierarchy.device.pk}")

    assert response.status_code == 204
    assert list(Operation.objects.values_list("pk", flat=True)) == [kept.pk]
    assert by_id(events) == [event("DELETE", op, str(op.pk)) for op in doomed]
    assert listeners["device"].received() == [deleted(op) for op in doomed]  # in ID order
    assert listeners["all"].received() == [deleted(op) for op in doomed]
    assert grandchild.received() == []
    assert_silent_until_next_create(api, hierarchy, capture_events, {"agent": listeners["agent"]})


def test_delete_without_filter_sends_a_delete_for_every_operation(
    api: Clients, hierarchy: Hierarchy, capture_events: EventCapture, subscriber: Subscribe
) -> None:
    created = [
        operation_create(device=device, data={})
        for device in (hierarchy.agent, hierarchy.device, hierarchy.grandchild)
    ]
    every = subscriber("/operations/*")

    with capture_events(execute=True) as events:
        assert call(api["admin"], "DELETE", OPERATIONS).status_code == 204

    assert by_id(events) == [event("DELETE", op, str(op.pk)) for op in created]
    assert every.received() == [deleted(op) for op in created]


def test_deleting_the_device_through_the_inventory_api_deletes_its_operations(
    api: Clients,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    subscriber: Subscribe,
) -> None:
    doomed = [operation_create(device=hierarchy.device, data={}) for _ in range(2)]
    kept = operation_create(device=hierarchy.grandchild, data={})
    listeners = subscribers_of(subscriber, hierarchy)

    with capture_events(execute=True) as events:
        response = call(api["alice"], "DELETE", f"/inventory/managedObjects/{hierarchy.device.pk}")

    assert response.status_code == 204, response.content
    assert list(Operation.objects.values_list("pk", flat=True)) == [kept.pk]
    assert by_id(events) == [event("DELETE", op, str(op.pk)) for op in doomed]
    assert listeners["device"].received() == [deleted(op) for op in doomed]
    assert listeners["all"].received() == [deleted(op) for op in doomed]
    assert listeners["agent"].received() == []


def test_quiescent_device_deletion_deletes_its_operations_silently(
    api: Clients,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    subscriber: Subscribe,
) -> None:
    doomed = operation_create(device=hierarchy.grandchild, data={})
    kept = operation_create(device=hierarchy.device, data={})
    listeners = subscribers_of(subscriber, hierarchy)
    grandchild = subscriber(f"/operations/{hierarchy.grandchild.pk}")

    with capture_events(execute=True) as events:
        response = call(
            api["alice"],
            "DELETE",
            f"/inventory/managedObjects/{hierarchy.grandchild.pk}",
            HTTP_X_CUMULOCITY_PROCESSING_MODE="QUIESCENT",
        )

    assert response.status_code == 204, response.content
    assert not Operation.objects.filter(pk=doomed.pk).exists()
    assert Operation.objects.filter(pk=kept.pk).exists()
    assert events == []
    assert grandchild.received() == []
    assert_silent_until_next_create(api, hierarchy, capture_events, listeners)


def test_cascading_device_deletion_sends_deletes_for_the_whole_hierarchy(
    api: Clients, hierarchy: Hierarchy, capture_events: EventCapture, subscriber: Subscribe
) -> None:
    doomed = [
        operation_create(device=device, data={"c8y_Restart": {}})
        for device in (hierarchy.device, hierarchy.grandchild, hierarchy.device)
    ]
    kept = operation_create(device=hierarchy.agent, data={})
    every = subscriber("/operations/*")

    with capture_events(execute=True):
        response = call(
            api["admin"], "DELETE", f"/inventory/managedObjects/{hierarchy.device.pk}?cascade=true"
        )

    assert response.status_code == 204, response.content
    assert not ManagedObject.objects.filter(pk=hierarchy.grandchild.pk).exists()
    assert list(Operation.objects.values_list("pk", flat=True)) == [kept.pk]
    assert every.received() == [deleted(op) for op in doomed]


def test_refused_device_deletion_deletes_and_sends_nothing(
    api: Clients, hierarchy: Hierarchy, capture_events: EventCapture, subscriber: Subscribe
) -> None:
    operation = operation_create(device=hierarchy.device, data={})
    listeners = subscribers_of(subscriber, hierarchy)

    with capture_events(execute=True) as events:
        response = call(api["bob"], "DELETE", f"/inventory/managedObjects/{hierarchy.device.pk}")

    assert response.status_code == 403
    assert Operation.objects.filter(pk=operation.pk).exists()
    assert events == []
    assert_silent_until_next_create(api, hierarchy, capture_events, listeners)


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


def test_refused_requests_register_and_send_nothing(
    api: Clients,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    subscriber: Subscribe,
) -> None:
    operation = operation_create(device=hierarchy.device, data={})
    listeners = subscribers_of(subscriber, hierarchy)
    before = Operation.objects.values().get(pk=operation.pk)

    for who, method, body, path in refused_requests(hierarchy, operation):
        with capture_events(execute=True) as events:
            response = call(api[who], method, path, body)
        assert response.status_code >= 400, (who, method, path, body)
        assert events == [], (who, method, path, body)

    assert Operation.objects.count() == 1
    assert Operation.objects.values().get(pk=operation.pk) == before
    assert_silent_until_next_create(api, hierarchy, capture_events, listeners)


def test_rolled_back_changes_register_and_send_nothing(
    hierarchy: Hierarchy, capture_events: EventCapture, subscriber: Subscribe
) -> None:
    existing = operation_create(device=hierarchy.device, data={})
    listener = subscriber(f"/operations/{hierarchy.device.pk}", f"/{hierarchy.agent.pk}")
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
    assert listener.received() == []

    with capture_events(execute=True) as events:
        updated = operation_update(operation_id=existing.pk, data={"status": "SUCCESSFUL"})
    assert events == [event("UPDATE", updated, operation_json(updated, base=""))]
    assert listener.received() == [changed("UPDATE", as_get(existing))]


def test_only_the_rolled_back_part_of_a_transaction_is_silent(
    hierarchy: Hierarchy, capture_events: EventCapture, subscriber: Subscribe
) -> None:
    listener = subscriber("/operations/*")

    with capture_events(execute=True) as events, transaction.atomic():
        kept = operation_create(device=hierarchy.device, data={})
        with pytest.raises(Abort):
            rolled_back(lambda: operation_create(device=hierarchy.device, data={}))

    assert [(e.action, e.operation_id) for e in events] == [("CREATE", kept.pk)]
    assert list(Operation.objects.values_list("pk", flat=True)) == [kept.pk]
    assert listener.received() == [changed("CREATE", as_get(kept))]


@pytest.mark.parametrize("mode", ["QUIESCENT", "quiescent"])
def test_quiescent_changes_send_nothing(
    api: Clients,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    subscriber: Subscribe,
    mode: str,
) -> None:
    listeners = subscribers_of(subscriber, hierarchy)
    header = {"HTTP_X_CUMULOCITY_PROCESSING_MODE": mode}

    with capture_events(execute=True) as events:
        created = post(api, hierarchy.device, **header)
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
        removed = call(api["admin"], "DELETE", f"{OPERATIONS}?status=EXECUTING", **header)

    assert updated["status"] == "EXECUTING"
    assert removed.status_code == 204
    assert not Operation.objects.exists()
    assert events == []
    assert_silent_until_next_create(api, hierarchy, capture_events, listeners)


@pytest.mark.parametrize("mode", ["PERSISTENT", "TRANSIENT", "CEP"])
def test_other_processing_modes_notify(
    api: Clients,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    subscriber: Subscribe,
    mode: str,
) -> None:
    listener = subscriber(f"/operations/{hierarchy.device.pk}")

    with capture_events(execute=True) as events:
        created = post(api, hierarchy.device, HTTP_X_CUMULOCITY_PROCESSING_MODE=mode)

    assert [e.action for e in events] == ["CREATE"]
    assert listener.received() == [changed("CREATE", created)]


# --- the admin -------------------------------------------------------------------------------------


def admin_change_url(operation: Operation) -> str:
    return reverse("admin:devicecontrol_operation_change", args=[operation.pk])


def test_admin_status_edit_sends_an_update(
    admin_client: Client,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    subscriber: Subscribe,
) -> None:
    operation = operation_create(device=hierarchy.device, data={"c8y_Restart": {}})
    listeners = subscribers_of(subscriber, hierarchy)
    data = form_data(admin_client, admin_change_url(operation))
    data.update(status="FAILED", failure_reason="Device unreachable")

    with capture_events(execute=True) as events:
        response = admin_client.post(admin_change_url(operation), data)

    assert response.status_code == 302
    body = as_get(operation)
    assert (body["status"], body["failureReason"]) == ("FAILED", "Device unreachable")
    assert events == [event("UPDATE", operation, relative(body))]
    assert listeners["device"].received() == [changed("UPDATE", body)]
    assert listeners["all"].received() == [changed("UPDATE", body)]
    assert listeners["agent"].received() == []


def test_admin_form_refused_or_unchanged_sends_nothing(
    api: Clients,
    admin_client: Client,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    subscriber: Subscribe,
) -> None:
    operation = operation_create(device=hierarchy.device, data={"c8y_Restart": {}})
    listeners = subscribers_of(subscriber, hierarchy)
    unchanged = form_data(admin_client, admin_change_url(operation))
    refused = {**unchanged, "status": "SUCCESSFUL", "failure_reason": "not with SUCCESSFUL"}

    with capture_events(execute=True) as events:
        assert admin_client.post(admin_change_url(operation), unchanged).status_code == 302
        assert admin_client.post(admin_change_url(operation), refused).status_code == 200

    assert events == []
    assert Operation.objects.get(pk=operation.pk).status == OperationStatus.PENDING
    assert_silent_until_next_create(api, hierarchy, capture_events, listeners)


def test_admin_cancel_action_sends_an_update_per_open_operation(
    admin_client: Client,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    subscriber: Subscribe,
) -> None:
    pending = operation_create(device=hierarchy.device, data={"c8y_Restart": {}})
    executing = operation_create(device=hierarchy.grandchild, data={"c8y_Command": {"text": "ls"}})
    operation_update(operation_id=executing.pk, data={"status": "EXECUTING"})
    done = operation_create(device=hierarchy.device, data={"c8y_Restart": {}})
    operation_update(operation_id=done.pk, data={"status": "SUCCESSFUL"})
    every = subscriber("/operations/*")
    agent = subscriber(*opted_in(hierarchy.agent))
    plain_agent = subscriber(f"/{hierarchy.agent.pk}")

    with capture_events(execute=True) as events:
        response = admin_client.post(
            CHANGELIST,
            {"action": "mark_failed", "_selected_action": [pending.pk, executing.pk, done.pk]},
        )

    assert response.status_code == 302
    bodies = [as_get(pending), as_get(executing)]
    assert (bodies[0]["status"], bodies[0]["failureReason"]) == (
        "FAILED",
        "Cancelled by root-admin",
    )
    # The EXECUTING one stays so: its agent gets the cancel request and decides.
    assert bodies[1]["status"] == "EXECUTING"
    assert bodies[1]["c8y_CancelRequested"]["by"] == "root-admin"
    request = replace(event("UPDATE", executing, relative(bodies[1])), to_agent=True)
    assert events == [event("UPDATE", pending, relative(bodies[0])), request]
    assert every.received() == [changed("UPDATE", body) for body in bodies]
    assert agent.received() == [to_agent(hierarchy.agent, bodies[1])]
    assert plain_agent.received() == []  # it did not ask for cancel requests


def test_admin_retry_and_delete_send_create_and_delete(
    admin_client: Client,
    hierarchy: Hierarchy,
    capture_events: EventCapture,
    subscriber: Subscribe,
) -> None:
    broken = operation_create(device=hierarchy.device, data={"c8y_Firmware": {"version": "2"}})
    operation_update(operation_id=broken.pk, data={"status": "FAILED", "failureReason": "x"})
    listeners = subscribers_of(subscriber, hierarchy)

    with capture_events(execute=True):
        response = admin_client.post(
            CHANGELIST, {"action": "retry_failed", "_selected_action": [broken.pk]}
        )
    assert response.status_code == 302
    retry = Operation.objects.get(retry_of=broken)
    body = as_get(retry)
    assert (body["status"], body["retryOf"]) == ("PENDING", str(broken.pk))
    assert listeners["device"].received() == [changed("CREATE", body)]
    assert listeners["agent"].received() == [to_agent(hierarchy.agent, body)]

    with capture_events(execute=True):
        response = admin_client.post(
            CHANGELIST,
            {"action": "delete_selected", "_selected_action": [broken.pk, retry.pk], "post": "yes"},
        )
    assert response.status_code == 302
    assert not Operation.objects.exists()
    assert listeners["device"].received() == [deleted(broken), deleted(retry)]
    assert listeners["all"].received() == [
        changed("CREATE", body),
        deleted(broken),
        deleted(retry),
    ]
    assert listeners["agent"].received() == []


# --- beat sweeps -----------------------------------------------------------------------------------


@pytest.fixture
def timeouts(settings: Any) -> Any:
    settings.OPERATION_PENDING_TIMEOUT = 3600
    settings.OPERATION_EXECUTION_TIMEOUT = 600
    settings.OPERATION_RETENTION_DAYS = 30
    return settings


def test_beat_expiry_and_timeout_send_updates(
    hierarchy: Hierarchy,
    timeouts: Any,
    capture_events: EventCapture,
    subscriber: Subscribe,
) -> None:
    stale = operation_create(device=hierarchy.device, data={"c8y_Restart": {}}, now=PAST)
    fresh = operation_create(device=hierarchy.device, data={"c8y_Restart": {}})
    stuck = operation_create(device=hierarchy.grandchild, data={"c8y_Command": {}}, now=PAST)
    operation_update(operation_id=stuck.pk, data={"status": "EXECUTING"}, now=PAST)
    every = subscriber("/operations/*")
    agent = subscriber(f"/{hierarchy.agent.pk}")

    with capture_events(execute=True) as expiry:
        assert tasks.expire_pending_operations() == 1
    with capture_events(execute=True) as timeout:
        assert tasks.time_out_executing_operations() == 1

    expired, timed_out = as_get(stale), as_get(stuck)
    assert expired["status"] == timed_out["status"] == "FAILED"
    assert "expired" in expired["failureReason"]
    assert "timed out" in timed_out["failureReason"]
    assert expiry == [event("UPDATE", stale, relative(expired))]
    assert timeout == [event("UPDATE", stuck, relative(timed_out))]
    assert every.received() == [changed("UPDATE", expired), changed("UPDATE", timed_out)]
    assert agent.received() == []
    assert as_get(fresh)["status"] == "PENDING"

    with capture_events(execute=True) as again:  # nothing left to sweep: nothing to say
        assert tasks.expire_pending_operations() == 0
        assert tasks.time_out_executing_operations() == 0
    assert again == []
    assert every.received() == []


def test_beat_purge_sends_deletes(
    hierarchy: Hierarchy,
    timeouts: Any,
    capture_events: EventCapture,
    subscriber: Subscribe,
) -> None:
    old = operation_create(device=hierarchy.device, data={}, now=PAST)
    operation_update(operation_id=old.pk, data={"status": "SUCCESSFUL"}, now=PAST)
    recent = operation_create(device=hierarchy.device, data={})
    operation_update(operation_id=recent.pk, data={"status": "SUCCESSFUL"})
    listener = subscriber(f"/operations/{hierarchy.device.pk}")

    with capture_events(execute=True):
        assert tasks.purge_old_operations() == 1

    assert list(Operation.objects.values_list("pk", flat=True)) == [recent.pk]
    assert listener.received() == [deleted(old)]


# --- only after the commit, with real transactions ----------------------------------------------


def _rest_put(api: Clients, hierarchy: Hierarchy) -> Callable[[], list[Message]]:
    operation = operation_create(device=hierarchy.device, data={})

    def change() -> list[Message]:
        path = operation_path(operation.pk)
        body = ok_json(call(api["admin"], "PUT", path, {"status": "EXECUTING"}, accept="*/*"))
        return [changed("UPDATE", body)]

    return change


def _rest_post(api: Clients, hierarchy: Hierarchy) -> Callable[[], list[Message]]:
    def change() -> list[Message]:
        body = post(api, hierarchy.grandchild)
        return [changed("CREATE", body), to_agent(hierarchy.agent, body)]

    return change


def _admin_cancel(api: Clients, hierarchy: Hierarchy) -> Callable[[], list[Message]]:
    operation = operation_create(device=hierarchy.device, data={})
    client = Client()
    client.force_login(user_upsert(username="root-admin", password="x", is_superuser=True))

    def change() -> list[Message]:
        selected = {"action": "mark_failed", "_selected_action": [operation.pk]}
        assert client.post(CHANGELIST, selected).status_code == 302
        return [changed("UPDATE", as_get(operation))]

    return change


def _beat_expiry(api: Clients, hierarchy: Hierarchy) -> Callable[[], list[Message]]:
    operation = operation_create(device=hierarchy.device, data={"pendingTimeout": 60}, now=PAST)

    def change() -> list[Message]:
        assert tasks.expire_pending_operations() == 1
        return [changed("UPDATE", as_get(operation))]

    return change


def _device_deletion(api: Clients, hierarchy: Hierarchy) -> Callable[[], list[Message]]:
    operation = operation_create(device=hierarchy.grandchild, data={})

    def change() -> list[Message]:
        path = f"/inventory/managedObjects/{hierarchy.grandchild.pk}"
        assert call(api["alice"], "DELETE", path).status_code == 204
        return [deleted(operation)]

    return change


CHANGES = {
    "rest-post": _rest_post,
    "rest-put": _rest_put,
    "admin-cancel": _admin_cancel,
    "device-deletion": _device_deletion,
}


@pytest.mark.django_db(transaction=True)
def test_a_sweep_batch_is_its_own_transaction_and_sends_after_its_commit(
    api: Clients, hierarchy: Hierarchy, subscriber: Subscribe
) -> None:
    """The sweepers commit each batch durably (its locks go with it): a caller cannot wrap them
    in a transaction of its own, and the events leave once the batch committed."""
    change = _beat_expiry(api, hierarchy)
    listener = subscriber("/operations/*", f"/{hierarchy.agent.pk}")

    with pytest.raises(RuntimeError, match="durable"), transaction.atomic():
        tasks.expire_pending_operations()
    assert listener.received() == []

    expected = change()
    assert listener.receive(len(expected)) == expected


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind", CHANGES)
def test_events_are_sent_only_when_the_enclosing_transaction_commits(
    api: Clients, hierarchy: Hierarchy, subscriber: Subscribe, kind: str
) -> None:
    api.prepare("admin", "alice")  # the users, made now: not in the transaction rolled back below
    change = CHANGES[kind](api, hierarchy)
    listener = subscriber("/operations/*", f"/{hierarchy.agent.pk}")

    with pytest.raises(Abort):
        rolled_back(change)
    assert listener.received() == []  # rolled back: never sent

    with transaction.atomic():
        expected = change()
        assert listener.received() == []  # done, not yet committed
    assert listener.received() == expected
