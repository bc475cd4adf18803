"""What one REST request costs in queries (issue 13 item 1): the agent's poll, a device's history,
an operation create and a managed object create and get, each pinned to its exact statement count
once the credentials are verified; the hand-built poll/history queryset is the filter set's; the
per-request user row still reflects a disabled user and a changed password at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.http import QueryDict
from rest_framework.test import APIClient

from devicecontrol.filters import OperationFilter, simple_operations
from devicecontrol.models import Operation
from devicecontrol.services import operation_create
from deviceplatform.api.authentication import active_user
from deviceplatform.roles import Role
from inventory.models import ManagedObject
from tests.devicecontrol.conftest import OPERATIONS, Hierarchy, add_child_devices, make_device
from tests.factories import ExternalIdFactory

ACCEPT = {"HTTP_ACCEPT": "application/json"}


def warm(client: APIClient, path: str) -> None:
    """The first request verifies the password, caches the roles and writes last_request_at."""
    assert client.get(path, **ACCEPT).status_code == 200


@pytest.fixture
def admin(make_user: Callable[..., Any], client_for: Callable[..., APIClient]) -> APIClient:
    return client_for(make_user("cost-admin", [Role.DEVICE_CONTROL_ADMIN, Role.INVENTORY_ADMIN]))


@pytest.fixture
def world(hierarchy: Hierarchy) -> Hierarchy:
    ExternalIdFactory(managed_object=hierarchy.device, external_id="serial-D")
    for device in (hierarchy.device, hierarchy.grandchild, hierarchy.device):
        operation_create(device=device, data={"c8y_Restart": {}})
    return hierarchy


# Committed transactions (transaction=True): the event-order statement runs at COMMIT, as in
# production, and no test-case SAVEPOINT statements are counted; Django counts BEGIN and COMMIT.
@pytest.mark.django_db(transaction=True)
def test_statements_per_request(
    admin: APIClient, world: Hierarchy, django_assert_num_queries: Any
) -> None:
    warm(admin, OPERATIONS)
    # PostgreSQL: the page's fixed statement reads the device names too (a join); SQLite's
    # queryset reads them with a second statement.
    page = 1 if connection.vendor == "postgresql" else 2
    # user row, page (with device names), external IDs
    with django_assert_num_queries(page + 2):
        response = admin.get(
            OPERATIONS, {"agentId": world.agent.pk, "status": "PENDING", "pageSize": 100}, **ACCEPT
        )
    body = response.json()
    assert [op["deviceId"] for op in body["operations"]] == [
        str(world.device.pk),
        str(world.grandchild.pk),
        str(world.device.pk),
    ]
    assert body["operations"][0]["deviceName"] == "Device D"
    assert body["operations"][0]["deviceExternalIDs"]["externalIds"][0]["externalId"] == "serial-D"
    # user row, page (with device names)
    with django_assert_num_queries(page + 1):
        response = admin.get(OPERATIONS, {"deviceId": world.device.pk, "pageSize": 20}, **ACCEPT)
    assert len(response.json()["operations"]) == 2
    # user row, device with its nearest agent, BEGIN, INSERT, event order, COMMIT
    with django_assert_num_queries(6):
        response = admin.post(
            OPERATIONS,
            {"deviceId": str(world.device.pk), "c8y_Restart": {}},
            format="json",
            **ACCEPT,
        )
    assert response.status_code == 201, response.content
    assert response.json()["status"] == "PENDING"
    # the grandchild's agent is two levels up: the walk reads both levels
    with django_assert_num_queries(8):
        response = admin.post(
            OPERATIONS, {"deviceId": str(world.grandchild.pk), "c8y_Restart": {}}, format="json"
        )
    assert response.status_code == 201, response.content
    assert Operation.objects.get(pk=response["Location"].rsplit("/", 1)[1]).agent_id == (
        world.agent.pk
    )
    # managed object create: user row, BEGIN, INSERT, event order, COMMIT
    with django_assert_num_queries(5):
        response = admin.post(
            "/inventory/managedObjects",
            {"name": "new", "c8y_IsDevice": {}},
            format="json",
            **ACCEPT,
        )
    assert response.status_code == 201, response.content
    created = response.json()["id"]
    # managed object get: user row, object, child references
    with django_assert_num_queries(3):
        response = admin.get(f"/inventory/managedObjects/{world.agent.pk}", **ACCEPT)
    assert response.status_code == 200
    assert [
        ref["managedObject"]["id"] for ref in response.json()["childDevices"]["references"]
    ] == [str(world.device.pk)]
    with django_assert_num_queries(3):
        assert admin.get(f"/inventory/managedObjects/{created}", **ACCEPT).status_code == 200


def test_agent_resolution_walks_levels_and_takes_the_smallest_agent(hierarchy: Hierarchy) -> None:
    from inventory.selectors import device_agent_id

    assert device_agent_id(device=hierarchy.grandchild) == hierarchy.agent.pk
    assert device_agent_id(device=hierarchy.agent) == hierarchy.agent.pk
    other = make_device("Other agent", agent=True)
    add_child_devices(other, hierarchy.grandchild)  # now one level up: other is nearer
    assert device_agent_id(device=hierarchy.grandchild) == other.pk
    orphan = make_device("Orphan")
    assert device_agent_id(device=orphan) is None


def test_the_device_is_read_with_its_nearest_agent(hierarchy: Hierarchy) -> None:
    from inventory.selectors import managed_object_with_agent

    device, agent = managed_object_with_agent(hierarchy.device.pk)
    assert (device.pk, device.name, device.fragments, agent) == (
        hierarchy.device.pk,
        "Device D",
        {"c8y_IsDevice": {}},
        hierarchy.agent.pk,
    )
    assert device.creation_time == ManagedObject.objects.get(pk=device.pk).creation_time
    assert managed_object_with_agent(hierarchy.agent.pk)[1] == hierarchy.agent.pk
    # two levels up: the walk (device_agent_id) decides, not this statement
    assert managed_object_with_agent(hierarchy.grandchild.pk)[1] is None
    second = make_device("Second agent", agent=True)
    first = make_device("Third agent", agent=True)
    add_child_devices(first, hierarchy.grandchild)
    add_child_devices(second, hierarchy.grandchild)
    assert managed_object_with_agent(hierarchy.grandchild.pk)[1] == min(first.pk, second.pk)
    assert managed_object_with_agent(10**12) is None
    assert managed_object_with_agent(2**63) is None


@pytest.mark.parametrize(
    "query",
    [
        "agentId=7&status=PENDING&pageSize=100",
        "deviceId=8&pageSize=20&currentPage=2",
        "deviceId=8&status=EXECUTING",
        "agentId=7&deviceId=8&status=FAILED&withTotalPages=true",
        "status=",
        "deviceId=&agentId=7",
        "deviceId=9223372036854775808",
        "",
    ],
)
def test_simple_queries_build_the_filter_sets_queryset(db: None, query: str) -> None:
    params = QueryDict(query)
    filterset = OperationFilter(params, queryset=Operation.objects.all())
    expected = filterset.qs.order_by(*filterset.ordering())
    simple = simple_operations(params, Operation.objects.all())
    assert simple is not None
    queryset, ordering = simple
    built = queryset.order_by(*ordering)
    if expected.query.is_empty():
        assert built.query.is_empty()
    else:
        assert str(built.query) == str(expected.query)


@pytest.mark.parametrize(
    "query",
    [
        "status=DONE",  # invalid: the filter set answers with its 422
        "deviceId=abc",
        "dateFrom=2024-01-01",  # any other parameter
        "revert=true&deviceId=1",
        "fragmentType=c8y_Restart",
    ],
)
def test_other_queries_go_through_the_filter_set(db: None, query: str) -> None:
    assert simple_operations(QueryDict(query), Operation.objects.all()) is None


def test_invalid_values_keep_their_error(api: Any) -> None:
    for query, message in [
        ("status=DONE", "status: 'DONE' is not one of"),
        ("deviceId=abc", "must be an ID, not 'abc'"),
    ]:
        response = api["admin"].get(f"{OPERATIONS}?{query}")
        assert response.status_code == 422, response.content
        assert message in response.json()["message"]


def test_the_user_row_applies_at_once(
    make_user: Callable[..., Any], client_for: Callable[..., APIClient]
) -> None:
    """Read on every request: no process keeps a disabled user or an old password."""
    user = make_user("Row-Reader", [Role.INVENTORY_READ])
    client = client_for(user)
    assert client.get("/inventory/managedObjects").status_code == 200
    # any letter case finds the user; an inactive or unknown one is None
    assert active_user("row-reader").pk == user.pk
    assert active_user("ROW-READER").pk == user.pk
    user.set_password("a-new-password")
    user.save()
    assert client.get("/inventory/managedObjects").status_code == 401
    assert (
        client_for(user, password="a-new-password").get("/inventory/managedObjects").status_code
        == 200
    )
    user.is_active = False
    user.save()
    assert active_user("row-reader") is None
    assert (
        client_for(user, password="a-new-password").get("/inventory/managedObjects").status_code
        == 401
    )
    ManagedObject.objects.all().delete()
    assert active_user("nobody") is None
