"""Bulk-operation fixtures: a fleet (agent, devices, group) built through the inventory services,
API clients per bulk role, and helpers that count child operations directly for comparison."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rest_framework.test import APIClient

from bulkops import services
from bulkops.models import BulkOperation
from devicecontrol.models import Operation
from deviceplatform.roles import Role
from inventory import services as inventory_services
from inventory.models import ManagedObject, Relation
from tests.devicecontrol.conftest import OWNER, add_child_devices, call, make_device
from tests.factories import Clients

BULK = "/devicecontrol/bulkoperations"
T0 = datetime(2031, 3, 1, 12, 0, 0, tzinfo=UTC)
PROTOTYPE = {"description": "Restart device", "c8y_Restart": {}}

# `alice` owns the fleet (and its group) but holds no bulk role; `inv_admin` holds every other
# admin role but no bulk role.
USERS: dict[str, list[Role]] = {
    "bulk_admin": [Role.BULK_OPERATION_ADMIN],
    "bulk_reader": [Role.BULK_OPERATION_READ],
    "alice": [Role.INVENTORY_CREATE],
    "inv_admin": [Role.INVENTORY_ADMIN, Role.DEVICE_CONTROL_ADMIN],
    "nobody": [],
}


@pytest.fixture
def bapi(make_user: Callable[..., Any], client_for: Callable[..., APIClient]) -> Clients:
    return Clients(make_user, client_for, USERS)


@dataclass(frozen=True)
class Fleet:
    """An agent with `devices` (ascending IDs) as child devices; `group` holds them as assets."""

    agent: ManagedObject
    devices: list[ManagedObject]
    group: ManagedObject

    @property
    def device_ids(self) -> list[int]:
        return [device.pk for device in self.devices]


def make_group(*members: ManagedObject, owner: str = OWNER, **fragments: Any) -> ManagedObject:
    group = inventory_services.managed_object_create(
        owner=owner, data={"name": "Fleet", "c8y_IsDeviceGroup": {}, **fragments}
    )
    if members:
        inventory_services.managed_object_add_children(
            parent=group, relation=Relation.ASSET, children=list(members)
        )
    return group


def make_fleet(size: int) -> Fleet:
    agent = make_device("Agent", agent=True)
    devices = [make_device(f"Device {i}") for i in range(size)]
    add_child_devices(agent, *devices)
    return Fleet(agent=agent, devices=devices, group=make_group(*devices))


@pytest.fixture
def fleet(db: None) -> Fleet:
    return make_fleet(3)


@pytest.fixture
def fleet5(db: None) -> Fleet:
    return make_fleet(5)


def bulk_data(group: ManagedObject | int, **overrides: Any) -> dict[str, Any]:
    group_id = group if isinstance(group, int) else group.pk
    data: dict[str, Any] = {
        "groupId": str(group_id),
        "startDate": "2031-03-01T12:00:00.000Z",
        "creationRamp": 1,
        "operationPrototype": dict(PROTOTYPE),
    }
    data.update(overrides)
    return data


def create_bulk(
    group: ManagedObject | int, *, now: datetime = T0, **overrides: Any
) -> BulkOperation:
    return services.bulk_operation_create(data=bulk_data(group, **overrides), now=now)


def at(seconds: float, base: datetime = T0) -> datetime:
    return base + timedelta(seconds=seconds)


def advance(seconds: float, base: datetime = T0, **kwargs: Any) -> int:
    return services.bulk_operations_advance(now=at(seconds, base), **kwargs)


def children(bulk: BulkOperation | int) -> list[Operation]:
    pk = bulk if isinstance(bulk, int) else bulk.pk
    return list(Operation.objects.filter(bulk_operation_id=pk).order_by("pk"))


def child_device_ids(bulk: BulkOperation | int) -> list[int]:
    return [operation.device_id for operation in children(bulk)]


def reload(bulk: BulkOperation) -> BulkOperation:
    return BulkOperation.objects.get(pk=bulk.pk)


def counted_progress(bulk: BulkOperation | int) -> dict[str, int]:
    """The progress counters computed by counting the child operations directly, each device by
    its latest attempt (its child with the highest ID: a retry comes after what it retries), plus
    `all` from the stored targets not yet processed."""
    pk = bulk if isinstance(bulk, int) else bulk.pk
    latest: dict[int, str] = {}
    for device_id, status in (
        Operation.objects.filter(bulk_operation_id=pk)
        .order_by("pk")
        .values_list("device_id", "status")
    ):
        latest[device_id] = status
    by_status = Counter(latest.values())
    row = BulkOperation.objects.get(pk=pk)
    waiting = 0 if row.status == "DELETED" else max(row.target_count - row.next_index, 0)
    counts = {
        "pending": by_status["PENDING"],
        "failed": by_status["FAILED"],
        "executing": by_status["EXECUTING"],
        "successful": by_status["SUCCESSFUL"],
    }
    counts["all"] = sum(counts.values()) + waiting
    return counts


def counted_general_status(bulk: BulkOperation | int) -> str:
    """bulkoperations.md §6 derived from a direct count."""
    pk = bulk if isinstance(bulk, int) else bulk.pk
    row = BulkOperation.objects.get(pk=pk)
    progress = counted_progress(pk)
    if row.status == "DELETED":
        return "CANCELED"
    if row.status == "ACTIVE":
        return "SCHEDULED"
    done = progress["failed"] + progress["successful"]
    if progress["all"] > done:
        return "EXECUTING_WITH_ERRORS" if progress["failed"] else "EXECUTING"
    return "FAILED" if progress["failed"] else "SUCCESSFUL"


def get_bulk(client: APIClient, pk: object) -> dict[str, Any]:
    response = call(client, "GET", f"{BULK}/{pk}")
    assert response.status_code == 200, (response.status_code, response.content[:500])
    return response.json()
