"""Automatic retries (extension, README "Automatic retries"): `retryConfig` on an operation (or
top-level on a bulk operation, for its children) books a retry when an attempt fails (`retryAt`);
the sweeper creates it when due, as `POST .../retry` would, with `attempt` + 1. Time goes in
through `now=`; tests/devicecontrol/test_auto_retry_beat.py runs it with real beat and worker."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rest_framework.test import APIClient

from bulkops import services as bulk_services
from bulkops.models import BulkOperation
from devicecontrol import services
from devicecontrol.models import Operation
from devicecontrol.realtime import registered_events
from deviceplatform.roles import Role
from inventory import services as inventory_services
from inventory.models import ManagedObject, Relation
from tests.bulkops.conftest import BULK, bulk_data, counted_progress, make_fleet
from tests.devicecontrol.conftest import call, ok_json
from tests.factories import Clients
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
START = "2030-01-01T12:00:00.000Z"
OPERATIONS = "/devicecontrol/operations"
CONFIG = {
    "criteria": [{"failureType": "FAILED", "numberOfRetries": 2}],
    "backoffSeconds": 60,
    "backoffFactor": 2,
}
USERS: dict[str, list[Role]] = {
    "admin": [Role.DEVICE_CONTROL_ADMIN, Role.DEVICE_CONTROL_READ, Role.BULK_OPERATION_ADMIN],
}


@pytest.fixture
def api(make_user: Callable[..., Any], client_for: Callable[..., APIClient]) -> Clients:
    return Clients(make_user, client_for, USERS)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def create(device: ManagedObject, config: Any = CONFIG, **extra: Any) -> Operation:
    data = {"c8y_Restart": {}, **extra}
    if config is not None:
        data["retryConfig"] = config
    return services.operation_create(device=device, data=data, now=T0)


def fail(operation: Operation | int, seconds: float, **extra: Any) -> Operation:
    pk = operation if isinstance(operation, int) else operation.pk
    data = {"status": "FAILED", "failureReason": "boom", **extra}
    return services.operation_update(operation_id=pk, data=data, now=at(seconds))


def fresh(operation: Operation) -> Operation:
    return Operation.objects.get(pk=operation.pk)


def latest_retry(operation: Operation) -> Operation | None:
    return Operation.objects.filter(retry_of=operation).order_by("-pk").first()


# --- validation --------------------------------------------------------------------------------


BAD_CONFIGS = [
    ("not an object", "must be a JSON object"),
    ({}, "criteria must be a non-empty list"),
    ({"criteria": []}, "criteria must be a non-empty list"),
    ({"criteria": [{"failureType": "LOST", "numberOfRetries": 1}]}, "failureType 'LOST'"),
    ({"criteria": [{"failureType": "FAILED", "numberOfRetries": -1}]}, "numberOfRetries"),
    ({"criteria": [{"failureType": "FAILED", "numberOfRetries": 101}]}, "numberOfRetries"),
    ({"criteria": [{"failureType": "FAILED", "numberOfRetries": 1.5}]}, "numberOfRetries"),
    ({"criteria": [{"failureType": "FAILED", "numberOfRetries": True}]}, "numberOfRetries"),
    ({"criteria": [{"failureType": "FAILED"}]}, "each criterion"),
    ({"criteria": [{"failureType": "FAILED", "numberOfRetries": 1, "x": 1}]}, "each criterion"),
    (
        {
            "criteria": [
                {"failureType": "FAILED", "numberOfRetries": 1},
                {"failureType": "FAILED", "numberOfRetries": 2},
            ]
        },
        "given twice",
    ),
    ({**CONFIG, "backoffSeconds": -1}, "backoffSeconds"),
    ({**CONFIG, "backoffSeconds": 10**9}, "backoffSeconds"),
    ({**CONFIG, "backoffSeconds": "60"}, "backoffSeconds"),
    ({**CONFIG, "backoffFactor": 0.5}, "backoffFactor"),
    ({**CONFIG, "backoffFactor": 11}, "backoffFactor"),
    ({**CONFIG, "maxAttempts": 3}, "unknown key(s) maxAttempts"),
]


@pytest.mark.parametrize(("config", "message"), BAD_CONFIGS)
def test_a_bad_retry_config_is_422_and_writes_nothing(
    api: Clients,
    device: ManagedObject,
    config: Any,
    message: str,
    row_counts: Callable[[], dict[str, int]],
) -> None:
    client = api["admin"]
    before = row_counts()

    response = call(
        client,
        "POST",
        OPERATIONS,
        {"deviceId": str(device.pk), "c8y_Restart": {}, "retryConfig": config},
    )

    body = assert_error(response, 422, "devicecontrol/Invalid Data")
    assert message in body["message"], body
    assert "retryConfig" in body["message"]
    assert row_counts() == before


def test_a_bad_retry_config_in_a_put_is_422_and_changes_nothing(
    api: Clients, device: ManagedObject
) -> None:
    operation = create(device)
    before = fresh(operation)

    response = call(
        api["admin"],
        "PUT",
        f"{OPERATIONS}/{operation.pk}",
        {
            "status": "FAILED",
            "retryConfig": {"criteria": [{"failureType": "ANY", "numberOfRetries": 1}]},
        },
    )

    assert_error(response, 422, "devicecontrol/Invalid Data")
    after = fresh(operation)
    assert (after.status, after.fragments, after.retry_at) == (
        before.status,
        before.fragments,
        None,
    )


def test_a_valid_config_is_kept_as_a_fragment_with_attempt_one(
    api: Clients, device: ManagedObject
) -> None:
    body = ok_json(
        call(
            api["admin"],
            "POST",
            OPERATIONS,
            {"deviceId": str(device.pk), "c8y_Restart": {}, "retryConfig": CONFIG},
            accept="application/json",
        ),
        201,
    )

    assert body["retryConfig"] == CONFIG
    assert body["attempt"] == 1
    assert "retryAt" not in body
    # `attempt` and `retryAt` are read-only: ignored on input.
    plain = ok_json(
        call(
            api["admin"],
            "POST",
            OPERATIONS,
            {"deviceId": str(device.pk), "c8y_Restart": {}, "attempt": 7, "retryAt": "x"},
            accept="application/json",
        ),
        201,
    )
    assert "attempt" not in plain
    assert "retryAt" not in plain
    assert Operation.objects.get(pk=plain["id"]).attempt == 1


# --- booking and creating retries --------------------------------------------------------------


def test_a_failed_attempt_is_retried_after_its_back_off(
    api: Clients, device: ManagedObject, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    operation = create(device)

    with django_capture_on_commit_callbacks() as callbacks:
        failed = fail(operation, 10)

    assert failed.retry_at == at(70)  # 60 s * 2**0
    (event,) = registered_events(callbacks)
    assert isinstance(event.data, dict)
    assert event.data["retryAt"] == "2030-01-01T12:01:10.000Z"
    shown = ok_json(call(api["admin"], "GET", f"{OPERATIONS}/{operation.pk}"))
    assert (shown["status"], shown["attempt"], shown["retryAt"]) == (
        "FAILED",
        1,
        "2030-01-01T12:01:10.000Z",
    )

    assert services.operations_retry_due(now=at(69)) == 0
    with django_capture_on_commit_callbacks() as callbacks:
        assert services.operations_retry_due(now=at(70)) == 1
    assert services.operations_retry_due(now=at(70)) == 0  # idempotent

    retry = latest_retry(operation)
    assert retry is not None
    assert (retry.status, retry.attempt, retry.creation_time) == ("PENDING", 2, at(70))
    assert retry.fragments == {"c8y_Restart": {}, "retryConfig": CONFIG}
    assert fresh(operation).retry_at is None
    assert [(e.action, e.operation_id) for e in registered_events(callbacks)] == [
        ("CREATE", retry.pk)
    ]
    body = ok_json(call(api["admin"], "GET", f"{OPERATIONS}/{retry.pk}"))
    assert (body["attempt"], body["retryOf"]) == (2, str(operation.pk))
    # The second failure waits twice as long; after the second retry no more.
    assert fail(retry, 100).retry_at == at(100 + 120)
    services.operations_retry_due(now=at(220))
    third = latest_retry(retry)
    assert third is not None
    assert third.attempt == 3
    assert fail(third, 300).retry_at is None
    assert services.operations_retry_due(now=at(10**6)) == 0


def test_the_list_shows_attempt_and_retry_at_on_both_read_paths(
    api: Clients, agent: ManagedObject, device: ManagedObject
) -> None:
    operation = create(device)
    fail(operation, 0)
    services.operations_retry_due(now=at(60))
    retry = latest_retry(operation)
    assert retry is not None

    # agentId&status: the agent's poll (the fixed statement on PostgreSQL); deviceId&x: the ORM.
    poll = ok_json(call(api["admin"], "GET", f"{OPERATIONS}?agentId={agent.pk}&status=PENDING"))[
        "operations"
    ]
    listed = ok_json(call(api["admin"], "GET", f"{OPERATIONS}?deviceId={device.pk}&pageSize=5"))
    assert [(item["id"], item["attempt"], item["retryOf"]) for item in poll] == [
        (str(retry.pk), 2, str(operation.pk))
    ]
    by_id = {item["id"]: item for item in listed["operations"]}
    assert (by_id[str(retry.pk)]["attempt"], by_id[str(retry.pk)]["retryOf"]) == (
        2,
        str(operation.pk),
    )
    assert "attempt" in by_id[str(operation.pk)]  # it has a retryConfig: attempt 1 shown
    fail(retry, 100)
    failed = ok_json(call(api["admin"], "GET", f"{OPERATIONS}?agentId={agent.pk}&status=FAILED"))[
        "operations"
    ]
    assert [item.get("retryAt") for item in failed] == [None, "2030-01-01T12:03:40.000Z"]


def test_only_failures_of_a_listed_type_are_retried(device: ManagedObject) -> None:
    timed_out_only = {"criteria": [{"failureType": "TIMED_OUT", "numberOfRetries": 1}]}
    by_agent = create(device, timed_out_only)
    expiring = create(device, CONFIG, pendingTimeout=30)
    expiring_retried = create(device, timed_out_only, pendingTimeout=30)
    executing = create(device, timed_out_only, executionTimeout=30)
    services.operation_update(operation_id=executing.pk, data={"status": "EXECUTING"}, now=T0)

    assert fail(by_agent, 5).retry_at is None  # FAILED by the agent: not listed
    assert services.operations_expire(now=at(30)) == 2
    assert services.operations_time_out(now=at(30)) == 1

    assert fresh(expiring).retry_at is None  # TIMED_OUT: not listed
    assert fresh(expiring_retried).retry_at == at(90)
    assert fresh(executing).retry_at == at(90)
    assert services.operations_retry_due(now=at(90)) == 2
    assert {op.retry_of_id for op in Operation.objects.filter(attempt=2)} == {
        expiring_retried.pk,
        executing.pk,
    }


def test_a_cancel_is_never_retried(device: ManagedObject) -> None:
    pending = create(device)
    executing = create(device)
    services.operation_update(operation_id=executing.pk, data={"status": "EXECUTING"}, now=T0)

    cancelled = services.operation_cancel(operation=pending, by="ops", now=at(1))
    services.operation_cancel(operation=executing, by="ops", now=at(1))
    stopped = fail(executing, 2, failureReason="Cancelled on request")

    assert (cancelled.status, cancelled.retry_at) == ("FAILED", None)
    assert (stopped.status, stopped.retry_at) == ("FAILED", None)
    assert services.operations_retry_due(now=at(10**6)) == 0


def test_a_manual_retry_or_a_delete_takes_the_place_of_the_booked_one(
    device: ManagedObject,
) -> None:
    retried, deleted = create(device), create(device)
    fail(retried, 0)
    fail(deleted, 0)

    manual = services.operation_retry(operation=fresh(retried), now=at(5))
    services.operations_delete(queryset=Operation.objects.filter(pk=deleted.pk))

    assert manual.attempt == 2
    assert fresh(retried).retry_at is None
    assert services.operations_retry_due(now=at(10**6)) == 0
    assert Operation.objects.filter(retry_of=retried).count() == 1


def test_leaving_failed_drops_the_booking_and_failed_again_keeps_it(
    device: ManagedObject,
) -> None:
    operation = create(device)
    assert fail(operation, 0).retry_at == at(60)

    # A second FAILED report (say a new reason) keeps the first booking.
    assert fail(operation, 30, failureReason="still broken").retry_at == at(60)
    # Back to PENDING (an operator's PUT): nothing to retry.
    services.operation_update(operation_id=operation.pk, data={"status": "PENDING"}, now=at(40))
    assert fresh(operation).retry_at is None
    assert services.operations_retry_due(now=at(10**6)) == 0
    # Failing again books anew from then.
    assert fail(operation, 50).retry_at == at(110)


def test_a_policy_removed_before_the_retry_is_due_creates_none(device: ManagedObject) -> None:
    operation = create(device)
    fail(operation, 0)
    fail(operation, 10, retryConfig=None)  # the fragment removed; the booking stays

    assert fresh(operation).retry_at == at(60)
    assert services.operations_retry_due(now=at(60)) == 0
    assert fresh(operation).retry_at is None


def test_a_retry_that_cannot_be_created_is_dropped_and_logged(
    device: ManagedObject, agent: ManagedObject, caplog: pytest.LogCaptureFixture
) -> None:
    operation = create(device)
    fail(operation, 0)
    inventory_services.managed_object_remove_children(
        parent=agent, relation=Relation.DEVICE, child_ids=[device.pk]
    )

    with caplog.at_level(logging.WARNING, logger="devicecontrol.services"):
        assert services.operations_retry_due(now=at(60)) == 0

    assert fresh(operation).retry_at is None
    assert Operation.objects.count() == 1
    assert f"automatic retry of operation {operation.pk} dropped" in caplog.text


def test_back_off_is_capped_and_zero_is_at_once(device: ManagedObject) -> None:
    config = {
        "criteria": [{"failureType": "FAILED", "numberOfRetries": 100}],
        "backoffSeconds": 7 * 24 * 3600,
        "backoffFactor": 10,
    }
    assert services.retry_due_at(config, failure_type="FAILED", attempt=100, now=T0) == T0 + (
        timedelta(days=7)
    )
    now_config = {
        "criteria": [{"failureType": "FAILED", "numberOfRetries": 1}],
        "backoffSeconds": 0,
    }
    assert fail(create(device, now_config), 3).retry_at == at(3)


# --- bulk operations ----------------------------------------------------------------------------


def bulk_with_children(retry_config: Any, size: int = 3, **overrides: Any) -> BulkOperation:
    fleet = make_fleet(size)
    data = bulk_data(fleet.group, creationRamp=0, startDate=START, **overrides)
    if retry_config is not None:
        data["retryConfig"] = retry_config
    bulk = bulk_services.bulk_operation_create(data=data, now=T0)
    bulk_services.bulk_operations_advance(now=T0)
    return bulk


def test_bulk_children_follow_the_bulk_operations_retry_config(api: Clients) -> None:
    bulk = bulk_with_children(CONFIG)
    first, second, _ = Operation.objects.filter(bulk_operation_id=bulk.pk).order_by("pk")
    assert "attempt" not in ok_json(call(api["admin"], "GET", f"{OPERATIONS}/{first.pk}"))

    assert fail(first, 10).retry_at == at(70)
    services.operation_update(operation_id=second.pk, data={"status": "SUCCESSFUL"}, now=at(10))
    assert counted_progress(bulk)["failed"] == 1
    assert services.operations_retry_due(now=at(70)) == 1

    retry = latest_retry(first)
    assert retry is not None
    assert (retry.bulk_operation_id, retry.attempt, retry.status) == (bulk.pk, 2, "PENDING")
    assert fresh(first).superseded
    state = ok_json(call(api["admin"], "GET", f"{BULK}/{bulk.pk}"))
    assert state["progress"] == counted_progress(bulk)
    assert (state["progress"]["failed"], state["progress"]["pending"]) == (0, 2)
    assert state["retryConfig"] == CONFIG
    # Its own attempts count: attempt 2 fails, attempt 3 comes after 120 s, then no more.
    assert fail(retry, 100).retry_at == at(220)


def test_a_prototypes_own_config_wins_over_the_bulk_operations(api: Clients) -> None:
    own = {"criteria": [{"failureType": "FAILED", "numberOfRetries": 1}], "backoffSeconds": 5}
    prototype = {"c8y_Restart": {}, "retryConfig": own}
    bulk = bulk_with_children(CONFIG, operationPrototype=prototype)
    child = Operation.objects.filter(bulk_operation_id=bulk.pk).order_by("pk").first()
    assert child is not None

    assert fail(child, 0).retry_at == at(5)


def test_cancelling_the_bulk_operation_drops_its_booked_retries(api: Clients) -> None:
    fleet = make_fleet(3)
    data = bulk_data(fleet.group, creationRamp=10, startDate=START, retryConfig=CONFIG)
    bulk = bulk_services.bulk_operation_create(data=data, now=T0)
    bulk_services.bulk_operations_advance(now=at(0))  # one of three children
    (child,) = Operation.objects.filter(bulk_operation_id=bulk.pk)
    fail(child, 1)
    assert fresh(child).retry_at == at(61)

    assert call(api["admin"], "DELETE", f"{BULK}/{bulk.pk}").status_code == 204

    assert fresh(child).retry_at is None
    assert services.operations_retry_due(now=at(10**6)) == 0
    # And a child failing after the cancel books none.
    services.operation_update(operation_id=child.pk, data={"status": "EXECUTING"}, now=at(2))
    assert fail(child, 3).retry_at is None


@pytest.mark.parametrize(("config", "message"), BAD_CONFIGS[:6])
def test_a_bad_bulk_retry_config_is_422_and_writes_nothing(
    api: Clients, config: Any, message: str, row_counts: Callable[[], dict[str, int]]
) -> None:
    fleet = make_fleet(2)
    bulk = bulk_services.bulk_operation_create(data=bulk_data(fleet.group), now=T0)
    client = api["admin"]
    before = row_counts()
    stored = BulkOperation.objects.get(pk=bulk.pk).fragments

    created = call(client, "POST", BULK, {**bulk_data(fleet.group), "retryConfig": config})
    changed = call(client, "PUT", f"{BULK}/{bulk.pk}", {"retryConfig": config})

    for response in (created, changed):
        body = assert_error(response, 422, "devicecontrol/Invalid Data")
        assert message in body["message"]
    assert row_counts() == before
    assert BulkOperation.objects.get(pk=bulk.pk).fragments == stored


def test_a_bulk_retry_config_can_be_set_and_removed_by_put(api: Clients) -> None:
    fleet = make_fleet(2)
    bulk = bulk_services.bulk_operation_create(data=bulk_data(fleet.group), now=T0)

    set_ = call(
        api["admin"], "PUT", f"{BULK}/{bulk.pk}", {"retryConfig": CONFIG}, accept="application/json"
    )
    assert ok_json(set_)["retryConfig"] == CONFIG
    removed = call(
        api["admin"], "PUT", f"{BULK}/{bulk.pk}", {"retryConfig": None}, accept="application/json"
    )
    assert "retryConfig" not in ok_json(removed)  # removed, not echoed as null
    assert "retryConfig" not in BulkOperation.objects.get(pk=bulk.pk).fragments
    assert "retryConfig" not in ok_json(call(api["admin"], "GET", f"{BULK}/{bulk.pk}"))


def test_a_bulk_retry_config_of_null_removes_it_and_no_child_is_retried(api: Clients) -> None:
    fleet = make_fleet(2)
    data = bulk_data(fleet.group, creationRamp=0, startDate=START, retryConfig=CONFIG)
    bulk = bulk_services.bulk_operation_create(data=data, now=T0)
    created = call(
        api["admin"],
        "POST",
        BULK,
        {**bulk_data(fleet.group), "retryConfig": None},
        accept="application/json",
    )
    created = ok_json(created, 201)
    assert "retryConfig" not in created  # a POST's null: no policy, nothing stored
    assert "retryConfig" not in BulkOperation.objects.get(pk=created["id"]).fragments

    bulk_services.bulk_operation_update(
        bulk_operation_id=bulk.pk, data={"retryConfig": None}, now=T0
    )
    bulk_services.bulk_operations_advance(now=T0)
    child = Operation.objects.filter(bulk_operation_id=bulk.pk).order_by("pk").first()
    assert child is not None
    assert fail(child, 1).retry_at is None


def test_an_operations_retry_config_of_null_removes_it(api: Clients, device: ManagedObject) -> None:
    client = api["admin"]
    created = call(
        client,
        "POST",
        OPERATIONS,
        {"deviceId": str(device.pk), "c8y_Restart": {}, "retryConfig": None},
        accept="application/json",
    )
    body = ok_json(created, 201)
    assert "retryConfig" not in body
    assert "attempt" not in body
    operation = create(device)
    assert ok_json(call(client, "GET", f"{OPERATIONS}/{operation.pk}"))["attempt"] == 1

    changed = call(
        client,
        "PUT",
        f"{OPERATIONS}/{operation.pk}",
        {"status": "EXECUTING", "retryConfig": None},
        accept="application/json",
    )

    body = ok_json(changed)
    assert ("retryConfig" in body, "attempt" in body) == (False, False)
    assert "retryConfig" not in fresh(operation).fragments
    assert fail(operation, 10).retry_at is None  # no policy left: no retry booked


def test_the_admin_change_page_shows_attempt_and_booked_retry(
    admin_client: Any, device: ManagedObject
) -> None:
    from django.urls import reverse

    operation = create(device)
    fail(operation, 0)

    page = admin_client.get(reverse("admin:devicecontrol_operation_change", args=[operation.pk]))

    text = page.content.decode()
    assert page.status_code == 200
    assert "Retry at" in text
    assert "Attempt" in text
