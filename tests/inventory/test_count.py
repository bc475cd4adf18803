"""`GET /inventory/managedObjects/count`: the number the list would hold for the same filters, as a
bare JSON number (@c8y/client's `inventory.count` reads it), visible objects only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from deviceplatform.roles import Role
from tests.factories import AgentFactory, DeviceFactory, ExternalIdFactory, GroupFactory, link
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db

COUNT = "/inventory/managedObjects/count"
COLLECTION = "/inventory/managedObjects"

# Query strings whose count must equal the list's totalRecords for the same filters.
FILTERS = [
    "",
    "type=c8y_Linux",
    "fragmentType=c8y_IsDevice",
    "fragmentType=c8y_IsDeviceGroup",
    "owner=device-a",
    "text=Pump",
    "query=name eq 'Pump*'",
    "query=$filter=(type eq 'c8y_Linux') $orderby=name desc",
    "q=$filter=(name eq 'Pump*')",
    "query=name eq 'Pump*'&q=type eq 'c8y_Linux'",
    "type=nothing-like-this",
]


@pytest.fixture
def fleet() -> dict[str, Any]:
    group = GroupFactory(name="Plant")
    agent = AgentFactory(name="Gateway", owner="device-a")
    pumps = [DeviceFactory(name=f"Pump {n}", owner="device-a") for n in range(3)]
    others = [DeviceFactory(name=f"Valve {n}", type="c8y_Valve") for n in range(2)]
    link(agent, *pumps)
    ExternalIdFactory(managed_object=pumps[0], external_id="pump-0")
    return {"group": group, "agent": agent, "pumps": pumps, "others": others}


def listed_total(client: APIClient, query: str) -> int:
    response = client.get(f"{COLLECTION}?{query}&withTotalPages=true&pageSize=1")
    assert response.status_code == 200, response.content
    return response.json()["statistics"]["totalPages"]


@pytest.mark.parametrize("query", FILTERS)
def test_count_matches_the_list_for_the_same_filters(
    admin_api: APIClient, fleet: dict[str, Any], query: str
) -> None:
    response = admin_api.get(f"{COUNT}?{query}")

    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/json;charset=UTF-8"
    assert isinstance(response.json(), int)
    assert response.json() == listed_total(admin_api, query)


def test_count_of_everything_and_of_ids(admin_api: APIClient, fleet: dict[str, Any]) -> None:
    assert admin_api.get(COUNT).json() == 7
    assert admin_api.get(f"{COUNT}/").json() == 7  # with a trailing slash, like every path
    ids = f"{fleet['pumps'][0].pk},{fleet['group'].pk},999999999"
    assert admin_api.get(f"{COUNT}?ids={ids}").json() == 2


def test_count_ignores_paging(admin_api: APIClient, fleet: dict[str, Any]) -> None:
    assert admin_api.get(f"{COUNT}?pageSize=1&currentPage=3&withTotalPages=true").json() == 7


def test_a_device_user_counts_only_what_it_may_see(
    make_user: Callable[..., Any], client_for: Callable[..., APIClient], fleet: dict[str, Any]
) -> None:
    device = client_for(make_user("device-a", roles=[Role.INVENTORY_CREATE]))
    reader = client_for(make_user("reader", roles=[Role.INVENTORY_READ]))

    assert device.get(COUNT).json() == 4  # its agent and three pumps
    assert device.get(f"{COUNT}?type=c8y_Valve").json() == 0
    assert reader.get(COUNT).json() == 7


def test_count_is_not_a_managed_object_id(admin_api: APIClient, fleet: dict[str, Any]) -> None:
    # Before the route existed, "count" fell to the detail view: 404 "No managedObject for id".
    assert admin_api.get(COUNT).status_code == 200
    assert_error(admin_api.put(COUNT, {}, format="json"), 405)


def test_count_refuses_what_the_list_refuses(admin_api: APIClient, anon_api: APIClient) -> None:
    assert_error(anon_api.get(COUNT), 401)
    assert_error(admin_api.get(f"{COUNT}?query=name eq"), 422)
    assert_error(admin_api.get(f"{COUNT}?ids=abc"), 422)
