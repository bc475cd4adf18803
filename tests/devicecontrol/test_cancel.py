"""`POST /devicecontrol/operations/{id}/cancel` (extension, README "Cancel that reaches the
device"): a PENDING operation fails at once ("Cancelled by <user>"); an EXECUTING one gets
`c8y_CancelRequested` and an UPDATE on its agent's channel, and stays EXECUTING until its agent
decides; a finished one is 422."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rest_framework.test import APIClient

from devicecontrol import services
from devicecontrol.models import Operation, OperationStatus
from devicecontrol.realtime import (
    CANCEL_REQUESTS,
    OperationEvent,
    realtime_events,
    registered_events,
)
from devicecontrol.serializers import operation_json
from deviceplatform.api.exceptions import ValidationFailed
from deviceplatform.roles import Role
from inventory.models import ManagedObject
from tests.conftest import Subscribe
from tests.devicecontrol.conftest import (
    add_child_devices,
    as_get,
    call,
    changed,
    make_device,
    opted_in,
    to_agent,
)
from tests.factories import Clients
from tests.helpers import assert_error, run_together

pytestmark = pytest.mark.django_db

BASE = "http://testserver"
OPERATION_TYPE = "application/vnd.com.nsn.cumulocity.operation+json"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

USERS: dict[str, list[Role]] = {
    "admin": [Role.DEVICE_CONTROL_ADMIN],
    "reader": [Role.DEVICE_CONTROL_READ],
    "inventory_admin": [Role.INVENTORY_ADMIN],
    "owner": [],  # owns the device, holds no role
    "stranger": [],
}


@pytest.fixture
def api(make_user: Callable[..., Any], client_for: Callable[..., APIClient]) -> Clients:
    return Clients(make_user, client_for, USERS, usernames={"admin": "dc_admin"})


def make_operation(device: ManagedObject, status: str = "PENDING", **extra: Any) -> Operation:
    operation = services.operation_create(
        device=device, data={"description": "Restart", "c8y_Restart": {}}, now=T0
    )
    if status != "PENDING":
        operation = services.operation_update(
            operation_id=operation.pk, data={"status": status, **extra}, now=T0
        )
    return operation


def cancel_path(pk: object) -> str:
    return f"/devicecontrol/operations/{pk}/cancel"


def post_cancel(client: APIClient, pk: object, **headers: Any) -> Any:
    headers.setdefault("HTTP_ACCEPT", OPERATION_TYPE)
    return client.post(cancel_path(pk), **headers)


def row(operation: Operation) -> tuple[Any, ...]:
    """Everything a cancel could change."""
    return (
        Operation.objects.filter(pk=operation.pk)
        .values_list("status", "failure_reason", "fragments", "status_changed_at")
        .get()
    )


def update_event(operation: Operation, *, to_agent: bool = False) -> OperationEvent:
    fresh = Operation.objects.get(pk=operation.pk)
    return OperationEvent(
        action="UPDATE",
        operation_id=fresh.pk,
        device_id=fresh.device_id,
        agent_id=fresh.agent_id,
        data=operation_json(fresh, base=""),
        to_agent=to_agent,
    )


def test_cancel_of_a_pending_operation_fails_it_at_once(
    api: Clients, device: ManagedObject, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    pending = make_operation(device)

    with django_capture_on_commit_callbacks() as callbacks:
        response = post_cancel(api["admin"], pending.pk)

    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith(OPERATION_TYPE)
    body = response.json()
    assert body["id"] == str(pending.pk)
    assert body["status"] == "FAILED"
    assert body["failureReason"] == "Cancelled by dc_admin"
    assert "c8y_CancelRequested" not in body
    assert body == operation_json(Operation.objects.get(pk=pending.pk), base=BASE)
    # One UPDATE, on the device's channel only: the agent never took it.
    events = registered_events(callbacks)
    assert events == [update_event(pending)]
    assert [message.channel for message in realtime_events(events[0])] == [
        f"/operations/{device.pk}"
    ]


def test_cancel_of_an_executing_operation_asks_its_agent(
    api: Clients,
    agent: ManagedObject,
    device: ManagedObject,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    executing = make_operation(device, "EXECUTING")
    before = Operation.objects.get(pk=executing.pk)

    with django_capture_on_commit_callbacks() as callbacks:
        response = post_cancel(api["owner"], executing.pk)

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "EXECUTING"
    assert "failureReason" not in body
    requested = body["c8y_CancelRequested"]
    assert requested["by"] == "owner"
    assert datetime.fromisoformat(requested["time"]) > datetime.now(UTC) - timedelta(minutes=5)
    after = Operation.objects.get(pk=executing.pk)
    assert after.status_changed_at == before.status_changed_at
    assert after.fragments == {**before.fragments, "c8y_CancelRequested": requested}
    # The UPDATE goes to the device's channel and, unlike other updates, to the agent's, for
    # the subscribers there that asked for cancel requests only.
    events = registered_events(callbacks)
    assert events == [update_event(executing, to_agent=True)]
    assert [(message.channel, message.option) for message in realtime_events(events[0])] == [
        (f"/operations/{device.pk}", None),
        (f"/{agent.pk}", CANCEL_REQUESTS),
    ]


def test_only_an_agent_that_asked_receives_the_cancel_request_on_its_channel(
    api: Clients,
    agent: ManagedObject,
    device: ManagedObject,
    subscriber: Subscribe,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    executing = make_operation(device, "EXECUTING")
    asked = subscriber(*opted_in(agent))
    plain = subscriber(f"/{agent.pk}")
    device_listener = subscriber(f"/operations/{device.pk}")

    with django_capture_on_commit_callbacks(execute=True):
        body = post_cancel(api["admin"], executing.pk, HTTP_ACCEPT="application/json").json()
        created = make_operation(device)  # a new operation reaches both

    new = as_get(created)
    assert asked.received() == [to_agent(agent, body), to_agent(agent, new)]
    assert plain.received() == [to_agent(agent, new)]
    assert device_listener.received() == [changed("UPDATE", body), changed("CREATE", new)]


def test_a_second_cancel_of_an_executing_operation_keeps_the_first_request(
    api: Clients, device: ManagedObject, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    executing = make_operation(device, "EXECUTING")
    first = post_cancel(api["owner"], executing.pk).json()
    before = row(executing)

    with django_capture_on_commit_callbacks() as callbacks:
        again = post_cancel(api["admin"], executing.pk)

    assert again.status_code == 200
    assert again.json() == first
    assert again.json()["c8y_CancelRequested"]["by"] == "owner"
    assert row(executing) == before
    assert registered_events(callbacks) == []


def test_the_agent_decides_after_a_cancel_request(api: Clients, device: ManagedObject) -> None:
    executing = make_operation(device, "EXECUTING")
    post_cancel(api["admin"], executing.pk)

    # The agent may still finish it; the request stays on the operation as a record.
    done = services.operation_update(operation_id=executing.pk, data={"status": "SUCCESSFUL"})

    assert done.status == OperationStatus.SUCCESSFUL
    assert done.fragments["c8y_CancelRequested"]["by"] == "dc_admin"


@pytest.mark.parametrize(
    ("status", "extra"),
    [("SUCCESSFUL", {}), ("FAILED", {"failureReason": "broken"})],
)
def test_cancel_of_a_finished_operation_is_422_and_changes_nothing(
    api: Clients,
    device: ManagedObject,
    status: str,
    extra: dict[str, Any],
    row_counts: Callable[[], dict[str, int]],
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    operation = make_operation(device, status, **extra)
    api.prepare("admin")
    counts, before = row_counts(), row(operation)

    with django_capture_on_commit_callbacks() as callbacks:
        response = post_cancel(api["admin"], operation.pk)

    body = assert_error(response, 422, "devicecontrol/Invalid Data")
    assert status in body["message"]
    assert row(operation) == before
    assert row_counts() == counts
    assert callbacks == []


@pytest.mark.parametrize("user", ["admin", "stranger"])
@pytest.mark.parametrize("pk", ["999999999", "not-a-number", "0"])
def test_cancel_of_an_unknown_operation_is_404_before_403(
    api: Clients,
    device: ManagedObject,
    user: str,
    pk: str,
    row_counts: Callable[[], dict[str, int]],
) -> None:
    pending = make_operation(device)
    api.prepare(user)
    counts, before = row_counts(), row(pending)

    response = post_cancel(api[user], pk)

    assert_error(response, 404, "devicecontrol/Not Found")
    assert row_counts() == counts
    assert row(pending) == before


@pytest.mark.parametrize(
    ("user", "status"),
    [
        ("admin", 200),
        ("owner", 200),  # owner of the device: the owner rule (auth.md §4)
        ("reader", 403),
        ("inventory_admin", 403),
        ("stranger", 403),
        ("anon", 401),
        ("bad_password", 401),
    ],
)
def test_cancel_permissions(
    api: Clients,
    device: ManagedObject,
    user: str,
    status: int,
    row_counts: Callable[[], dict[str, int]],
) -> None:
    pending = make_operation(device)
    client = api[user]
    counts, before = row_counts(), row(pending)

    response = post_cancel(client, pending.pk)

    if status == 200:
        assert response.status_code == 200, response.content
        assert row(pending)[:2] == ("FAILED", f"Cancelled by {api.user(user).username}")
    else:
        assert_error(response, status)
        assert row(pending) == before
        assert row_counts() == counts


@pytest.mark.parametrize("method", ["get", "put", "delete"])
def test_other_methods_on_cancel_are_405(api: Clients, device: ManagedObject, method: str) -> None:
    pending = make_operation(device)

    response = getattr(api["admin"], method)(cancel_path(pending.pk))

    assert_error(response, 405)
    assert row(pending)[0] == "PENDING"


def test_cancel_without_accept_answers_200_without_body(
    api: Clients, device: ManagedObject
) -> None:
    pending = make_operation(device)

    response = api["admin"].post(cancel_path(pending.pk))

    assert response.status_code == 200
    assert response.content == b""
    assert row(pending)[0] == "FAILED"


def test_quiescent_cancel_emits_no_event(
    api: Clients, device: ManagedObject, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    pending, executing = make_operation(device), make_operation(device, "EXECUTING")

    with django_capture_on_commit_callbacks() as callbacks:
        for operation in (pending, executing):
            response = post_cancel(
                api["admin"], operation.pk, HTTP_X_CUMULOCITY_PROCESSING_MODE="QUIESCENT"
            )
            assert response.status_code == 200

    assert row(pending)[0] == "FAILED"
    assert "c8y_CancelRequested" in row(executing)[2]
    assert registered_events(callbacks) == []


def test_service_uses_the_given_time(device: ManagedObject) -> None:
    pending, executing = make_operation(device), make_operation(device, "EXECUTING")
    later = T0 + timedelta(minutes=3)

    cancelled = services.operation_cancel(operation=pending, by="ops", now=later)
    requested = services.operation_cancel(operation=executing, by="ops", now=later)

    assert (cancelled.status, cancelled.status_changed_at) == ("FAILED", later)
    assert cancelled.failure_reason == "Cancelled by ops"
    assert requested.fragments["c8y_CancelRequested"] == {
        "time": "2024-05-01T12:03:00.000Z",
        "by": "ops",
    }


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("agent_status", ["EXECUTING", "SUCCESSFUL"])
def test_cancel_racing_an_agent_put_loses_neither(agent_status: str) -> None:
    """The cancel and the agent's PUT run one after the other under the row lock: whichever
    comes second sees the first's result, so the agent's fragment is never lost."""
    agent = make_device("Gateway", agent=True)
    device = make_device("Pump")
    add_child_devices(agent, device)
    for _ in range(5):
        pending = make_operation(device)

        def work(index: int, pk: int = pending.pk) -> Any:
            if index == 0:
                return services.operation_cancel(operation=Operation(pk=pk), by="ops").status
            data = {"status": agent_status, "c8y_Progress": {"step": 1}}
            return services.operation_update(operation_id=pk, data=data).status

        cancel, put = run_together(work, 2)

        assert put == agent_status, put
        final = Operation.objects.get(pk=pending.pk)
        assert final.fragments["c8y_Progress"] == {"step": 1}
        if cancel == "FAILED":  # the cancel came first; the agent's later report wins
            assert final.status == agent_status
            assert "c8y_CancelRequested" not in final.fragments
        elif agent_status == "EXECUTING":  # the agent took it first: a cancel request
            assert cancel == "EXECUTING"
            assert final.status == "EXECUTING"
            assert final.fragments["c8y_CancelRequested"]["by"] == "ops"
        else:  # finished first: the cancel was refused, and changed nothing
            assert isinstance(cancel, ValidationFailed), cancel
            assert final.status == "SUCCESSFUL"
            assert "c8y_CancelRequested" not in final.fragments


def test_the_admin_cancel_button_asks_the_agent_once_with_history(
    admin_client: Any, device: ManagedObject
) -> None:
    from django.contrib.admin.models import CHANGE, LogEntry
    from django.urls import reverse

    executing = make_operation(device, "EXECUTING")
    button = reverse("admin:devicecontrol_operation_cancel", args=[executing.pk])

    for _ in range(2):
        assert admin_client.post(button).status_code == 302

    after = Operation.objects.get(pk=executing.pk)
    assert after.status == "EXECUTING"
    assert after.fragments["c8y_CancelRequested"]["by"] == "root-admin"
    history = LogEntry.objects.filter(object_id=str(executing.pk))
    assert [(e.action_flag, e.change_message) for e in history] == [
        (CHANGE, "Cancel requested from its agent")
    ]


@pytest.mark.django_db(transaction=True)
def test_rest_cancel_racing_the_agents_rest_put_loses_neither(api: Clients) -> None:
    """The same race over REST, each request on its own connection: the admin's cancel and the
    agent's PUT (EXECUTING with a progress fragment) end in one of the two serial outcomes."""
    agent = make_device("Gateway", agent=True)
    device = make_device("Pump", owner="owner")
    add_child_devices(agent, device)
    admin, owner = api["admin"], api["owner"]
    for _ in range(4):
        pending = make_operation(device)

        def work(index: int, pk: int = pending.pk) -> Any:
            if index == 0:
                return post_cancel(admin, pk, HTTP_ACCEPT="application/json").json()
            body = {"status": "EXECUTING", "c8y_Progress": {"step": 1}}
            return owner.put(
                f"/devicecontrol/operations/{pk}",
                body,
                format="json",
                HTTP_ACCEPT="application/json",
            ).json()

        cancelled, taken = run_together(work, 2)

        final = Operation.objects.get(pk=pending.pk)
        assert final.status == "EXECUTING"
        assert final.fragments["c8y_Progress"] == {"step": 1}
        if cancelled["status"] == "FAILED":  # first; the agent's PUT came after and applies
            assert "c8y_CancelRequested" not in final.fragments
            assert "c8y_CancelRequested" not in taken
        else:  # the agent took it first: the cancel became a request
            assert cancelled["c8y_CancelRequested"]["by"] == "dc_admin"
            assert final.fragments["c8y_CancelRequested"] == cancelled["c8y_CancelRequested"]


@pytest.mark.parametrize(
    ("raw", "content_type", "status"),
    [
        ("{not json", "application/json", 400),
        ("<a/>", "text/plain", 415),
        ("[]", "application/json", 422),
    ],
)
@pytest.mark.parametrize("action", ["cancel", "retry"])
def test_a_bad_body_on_cancel_or_retry_is_refused_and_changes_nothing(
    api: Clients, device: ManagedObject, raw: str, content_type: str, status: int, action: str
) -> None:
    """The actions read no body, but a malformed one is still an error, before anything."""
    operation = make_operation(device)
    if action == "retry":
        services.operation_update(operation_id=operation.pk, data={"status": "FAILED"})
    before = (Operation.objects.count(), Operation.objects.get(pk=operation.pk).status)
    response = call(
        api["admin"],
        "POST",
        f"/devicecontrol/operations/{operation.pk}/{action}",
        raw=raw,
        content_type=content_type,
    )
    assert_error(response, status)
    assert (Operation.objects.count(), Operation.objects.get(pk=operation.pk).status) == before
