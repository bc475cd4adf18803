"""`POST /devicecontrol/operations/{id}/retry` (extension, README "Beyond Cumulocity"): a FAILED
operation is re-issued as a new PENDING one with the same fragments, linked by `retryOf`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from rest_framework.test import APIClient

from devicecontrol import services
from devicecontrol.models import Operation, OperationStatus
from devicecontrol.realtime import OperationEvent, registered_events
from devicecontrol.serializers import operation_json
from deviceplatform.roles import Role
from inventory.models import ManagedObject
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


FRAGMENTS = {
    "description": "Run a command",
    "c8y_Command": {"text": "get uboot.sn"},
    "executionTimeout": 120,
    "custom_Nested": {"a": [1, 2, {"b": None}]},
}


def make_operation(device: ManagedObject, status: str, **extra: Any) -> Operation:
    operation = services.operation_create(device=device, data=dict(FRAGMENTS), now=T0)
    if status != "PENDING":
        data = {"status": status, **extra}
        operation = services.operation_update(operation_id=operation.pk, data=data, now=T0)
    return operation


@pytest.fixture
def failed(device: ManagedObject) -> Operation:
    # The agent wrote a result into a fragment before failing: it is part of the fragments.
    return make_operation(
        device,
        "FAILED",
        failureReason="command not found",
        c8y_Command={"text": "get uboot.sn", "result": "sh: not found"},
    )


def retry_path(pk: object) -> str:
    return f"/devicecontrol/operations/{pk}/retry"


def post_retry(client: APIClient, pk: object, **headers: Any) -> Any:
    return client.post(retry_path(pk), **headers)


def created_event(operation: Operation) -> OperationEvent:
    return OperationEvent(
        action="CREATE",
        operation_id=operation.pk,
        device_id=operation.device_id,
        agent_id=operation.agent_id,
        data=operation_json(operation, base=""),
    )


def test_retry_creates_a_linked_pending_copy(
    api: Clients,
    failed: Operation,
    agent: ManagedObject,
    device: ManagedObject,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    client = api["admin"]

    with django_capture_on_commit_callbacks() as callbacks:
        response = post_retry(client, failed.pk, HTTP_ACCEPT=OPERATION_TYPE)

    assert response.status_code == 201, response.content
    assert response["Content-Type"].startswith(OPERATION_TYPE)
    retry = Operation.objects.exclude(pk=failed.pk).get()
    assert response["Location"] == f"{BASE}/devicecontrol/operations/{retry.pk}"
    body = response.json()
    assert body["id"] == str(retry.pk)
    assert body["self"] == response["Location"]
    assert body["status"] == "PENDING"
    assert body["retryOf"] == str(failed.pk)
    assert body["deviceId"] == str(device.pk)
    assert "failureReason" not in body
    assert "deviceName" not in body
    assert retry.fragments == Operation.objects.get(pk=failed.pk).fragments
    for key, value in retry.fragments.items():
        assert body[key] == value
    assert retry.device_id == device.pk
    assert retry.agent_id == agent.pk
    assert retry.retry_of_id == failed.pk
    assert retry.execution_timeout == 120
    assert retry.expires_at is not None
    # The original is left as it was.
    original = Operation.objects.get(pk=failed.pk)
    assert original.status == OperationStatus.FAILED
    assert original.failure_reason == "command not found"
    events = registered_events(callbacks)
    assert events == [created_event(retry)]


def test_retry_without_accept_answers_201_location_and_no_body(
    api: Clients, failed: Operation
) -> None:
    response = post_retry(api["admin"], failed.pk)

    assert response.status_code == 201
    retry = Operation.objects.exclude(pk=failed.pk).get()
    assert response["Location"] == f"{BASE}/devicecontrol/operations/{retry.pk}"
    assert response.content == b""


def test_a_failed_retry_can_be_retried_again(api: Clients, failed: Operation) -> None:
    first = post_retry(api["admin"], failed.pk, HTTP_ACCEPT="application/json").json()
    services.operation_update(
        operation_id=int(first["id"]), data={"status": "FAILED", "failureReason": "again"}
    )

    second = post_retry(api["admin"], first["id"], HTTP_ACCEPT="application/json")

    assert second.status_code == 201
    assert second.json()["retryOf"] == first["id"]
    assert Operation.objects.count() == 3


def test_retry_keeps_the_sms_delivery_marker(api: Clients, device: ManagedObject) -> None:
    operation = services.operation_create(
        device=device, data={"deliveryType": "SMS", "c8y_Restart": {}}
    )
    services.operation_update(operation_id=operation.pk, data={"status": "FAILED"})

    body = post_retry(api["admin"], operation.pk, HTTP_ACCEPT="application/json").json()

    assert body["deliveryType"] == "SMS"
    assert body["c8y_Restart"] == {}


def test_an_operation_is_retried_once_then_its_latest_attempt_is(
    api: Clients,
    failed: Operation,
    row_counts: Callable[[], dict[str, int]],
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    """A second retry of the same attempt (a double click, a client resending after a timeout)
    would run the operation twice on the device and multiply its automatic retries: 422, as for a
    bulk child, naming the retry that exists; the latest attempt can be retried once it fails."""
    first = post_retry(api["admin"], failed.pk, HTTP_ACCEPT="application/json").json()
    before = row_counts()

    with django_capture_on_commit_callbacks() as callbacks:
        again = post_retry(api["admin"], failed.pk, HTTP_ACCEPT="application/json")

    body = assert_error(again, 422, "devicecontrol/Invalid Data")
    assert body["message"] == (
        f"Operation {failed.pk} was already retried (operation {first['id']}); only the latest "
        "attempt can be retried"
    )
    assert row_counts() == before
    assert callbacks == []
    services.operation_update(operation_id=int(first["id"]), data={"status": "FAILED"})
    assert post_retry(api["admin"], first["id"]).status_code == 201


@pytest.mark.postgresql  # row locks; SQLite runs one writer at a time anyway
@pytest.mark.django_db(transaction=True)
def test_concurrent_retries_of_one_operation_make_one_attempt(failed: Operation) -> None:
    """Eight at once (each holding the row as read before): the row lock makes each wait for the
    one before it, which then sees its retry. Before: eight PENDING copies."""
    stale = Operation.objects.get(pk=failed.pk)
    outcomes = run_together(lambda _: services.operation_retry(operation=stale), 8)

    assert (
        sorted(type(outcome).__name__ for outcome in outcomes)
        == ["Operation"] + ["ValidationFailed"] * 7
    ), outcomes
    assert Operation.objects.filter(retry_of=failed.pk).count() == 1


@pytest.mark.parametrize("status", ["PENDING", "EXECUTING", "SUCCESSFUL"])
def test_retry_of_an_operation_that_did_not_fail_is_422_and_writes_nothing(
    api: Clients,
    device: ManagedObject,
    status: str,
    row_counts: Callable[[], dict[str, int]],
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    operation = make_operation(device, status)
    client = api["admin"]
    before = row_counts()

    with django_capture_on_commit_callbacks() as callbacks:
        response = post_retry(client, operation.pk, HTTP_ACCEPT=OPERATION_TYPE)

    body = assert_error(response, 422, "devicecontrol/Invalid Data")
    assert status in body["message"]
    assert row_counts() == before
    assert callbacks == []


@pytest.mark.parametrize("pk", ["999999999", "not-a-number"])
def test_retry_of_an_unknown_operation_is_404(
    api: Clients, device: ManagedObject, pk: str, row_counts: Callable[[], dict[str, int]]
) -> None:
    client = api["admin"]
    before = row_counts()

    response = post_retry(client, pk, HTTP_ACCEPT=OPERATION_TYPE)

    assert_error(response, 404, "devicecontrol/Not Found")
    assert row_counts() == before


@pytest.mark.parametrize(
    ("user", "status"),
    [
        ("admin", 201),
        ("owner", 201),  # owner of the device: the owner rule (auth.md §4)
        ("reader", 403),
        ("inventory_admin", 403),
        ("stranger", 403),
        ("anon", 401),
        ("bad_password", 401),
    ],
)
def test_retry_permissions(
    api: Clients,
    failed: Operation,
    user: str,
    status: int,
    row_counts: Callable[[], dict[str, int]],
) -> None:
    client = api[user]
    before = row_counts()

    response = post_retry(client, failed.pk, HTTP_ACCEPT="application/json")

    if status == 201:
        assert response.status_code == 201, response.content
        assert Operation.objects.filter(retry_of=failed).count() == 1
    else:
        assert_error(response, status)
        assert row_counts() == before


@pytest.mark.parametrize("method", ["get", "put", "delete"])
def test_other_methods_on_retry_are_405(api: Clients, failed: Operation, method: str) -> None:
    response = getattr(api["admin"], method)(retry_path(failed.pk))

    assert_error(response, 405)
    assert Operation.objects.count() == 1


def test_quiescent_retry_emits_no_event(
    api: Clients,
    failed: Operation,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    client = api["admin"]

    with django_capture_on_commit_callbacks() as callbacks:
        response = post_retry(client, failed.pk, HTTP_X_CUMULOCITY_PROCESSING_MODE="QUIESCENT")

    assert response.status_code == 201
    assert Operation.objects.filter(retry_of=failed).count() == 1
    assert registered_events(callbacks) == []


def test_get_single_and_list_show_retry_of(api: Clients, failed: Operation) -> None:
    post_retry(api["admin"], failed.pk)
    retry = Operation.objects.get(retry_of=failed)
    reader = api["reader"]

    single = reader.get(f"/devicecontrol/operations/{retry.pk}", HTTP_ACCEPT=OPERATION_TYPE)
    original = reader.get(f"/devicecontrol/operations/{failed.pk}")
    listing = reader.get("/devicecontrol/operations", {"deviceId": failed.device_id})

    assert single.status_code == 200
    assert single.json()["retryOf"] == str(failed.pk)
    assert "retryOf" not in original.json()
    items = {item["id"]: item for item in listing.json()["operations"]}
    assert items[str(retry.pk)]["retryOf"] == str(failed.pk)
    assert "retryOf" not in items[str(failed.pk)]


def test_retry_of_in_a_put_body_is_ignored(api: Clients, failed: Operation) -> None:
    post_retry(api["admin"], failed.pk)
    retry = Operation.objects.get(retry_of=failed)

    response = api["admin"].put(
        f"/devicecontrol/operations/{retry.pk}",
        {"status": "EXECUTING", "retryOf": "12345"},
        format="json",
        HTTP_ACCEPT="application/json",
    )

    assert response.status_code == 200
    assert response.json()["retryOf"] == str(failed.pk)
    assert "retryOf" not in Operation.objects.get(pk=retry.pk).fragments
