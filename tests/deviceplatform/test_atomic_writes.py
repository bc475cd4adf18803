"""Every public write service is atomic by itself (issue 10): a fault injected at any statement after
the first leaves the database as it was and sends no realtime event.

The tests commit for real (`transaction=True`): pytest-django's usual wrapping transaction would
make a service without a transaction of its own look atomic. The fault is a database error raised
by a Django execute wrapper just before the k-th statement a service sends, for every k from 2 to
the number of statements the service sends (counted in a rehearsal that is rolled back); savepoint
statements are not counted, because a service nested in the rehearsal's transaction sends some
that it does not send on its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.apps import apps
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from bulkops import services as bulk_services
from devicecontrol import services as operation_services
from devicecontrol.models import Operation, OperationStatus
from deviceplatform import services as platform_services
from deviceplatform.realtime.events import RealtimeEvent, publish
from inventory import services as inventory_services
from inventory.models import ExternalId, ManagedObject, Relation
from tests.conftest import Subscribe

pytestmark = pytest.mark.django_db(transaction=True)

SENTINEL = "/managedobjects/999999999"


class InjectedFault(DatabaseError):
    """The fault: what a dropped connection or a failing disk would raise mid-service."""


class Rehearsal(Exception):
    """Rolls the counting rehearsal back."""


def _counted(sql: str) -> bool:
    return not sql.lstrip().upper().startswith(("SAVEPOINT", "RELEASE SAVEPOINT", "ROLLBACK TO"))


@contextmanager
def statements(fail_at: int | None = None) -> Iterator[list[str]]:
    """Record the statements sent; with `fail_at`, raise InjectedFault instead of sending the
    `fail_at`-th one (1-based)."""
    sent: list[str] = []

    def wrapper(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        if _counted(sql):
            if fail_at is not None and len(sent) + 1 == fail_at:
                raise InjectedFault(f"injected before statement {fail_at}: {sql[:80]}")
            sent.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(wrapper):
        yield sent


def rehearse(write: Callable[[], object]) -> list[str]:
    """The statements `write` sends, in a transaction that is then rolled back."""
    try:
        with transaction.atomic(), statements() as sent:
            write()
            raise Rehearsal
    except Rehearsal:
        return sent
    raise AssertionError("the rehearsal was not rolled back")


def database_state() -> dict[str, list[dict[str, Any]]]:
    """Every row of every table of our apps, in primary-key order."""
    state = {}
    for label in ("deviceplatform", "inventory", "devicecontrol", "bulkops"):
        for model in apps.get_app_config(label).get_models():
            if not model._meta.managed:
                continue
            state[model._meta.label] = list(model.objects.order_by("pk").values())
    return state


@dataclass
class World:
    agent: ManagedObject
    device: ManagedObject
    grandchild: ManagedObject
    group: ManagedObject
    external_id: ExternalId
    pending: Operation
    failed_child: Operation
    bulk_id: int


@pytest.fixture
def world() -> World:
    def device(name: str, **fragments: Any) -> ManagedObject:
        return inventory_services.managed_object_create(
            owner="alice", data={"name": name, "c8y_IsDevice": {}, **fragments}
        )

    agent = device("Agent", com_cumulocity_model_Agent={})
    child, grandchild = device("Device"), device("Sensor")
    inventory_services.managed_object_add_children(
        parent=agent, relation=Relation.DEVICE, children=[child]
    )
    inventory_services.managed_object_add_children(
        parent=child, relation=Relation.DEVICE, children=[grandchild]
    )
    group = inventory_services.managed_object_create(
        owner="alice", data={"name": "Fleet", "c8y_IsDeviceGroup": {}}
    )
    inventory_services.managed_object_add_children(
        parent=group, relation=Relation.ASSET, children=[child, grandchild]
    )
    external_id, _ = inventory_services.external_id_create(
        managed_object=child, type="c8y_Serial", external_id="S-1"
    )
    pending = operation_services.operation_create(device=child, data={"c8y_Restart": {}})
    bulk = bulk_services.bulk_operation_create(
        data={
            "groupId": group.pk,
            "startDate": (timezone.now() - timedelta(minutes=1)).isoformat(),
            "creationRamp": 0,
            "operationPrototype": {"c8y_Restart": {}},
        }
    )
    bulk_services.bulk_operations_advance()
    failed_child = Operation.objects.get(bulk_operation_id=bulk.pk, device=child)
    operation_services.operation_update(
        operation_id=failed_child.pk, data={"status": "FAILED", "failureReason": "x"}
    )
    return World(
        agent=agent,
        device=child,
        grandchild=grandchild,
        group=group,
        external_id=external_id,
        pending=pending,
        failed_child=failed_child,
        bulk_id=bulk.pk,
    )


WRITES: dict[str, Callable[[World], Callable[[], object]]] = {
    "managed_object_create": lambda w: (
        lambda: inventory_services.managed_object_create(
            owner="alice", data={"name": "New", "c8y_IsDevice": {}}
        )
    ),
    "managed_object_update": lambda w: (
        lambda: inventory_services.managed_object_update(
            managed_object_id=w.device.pk,
            data={"name": "Renamed", "c8y_Firmware": {"version": "2"}},
        )
    ),
    "managed_object_delete cascade": lambda w: (
        lambda: inventory_services.managed_object_delete(managed_object=w.device, cascade=True)
    ),
    "managed_object_delete group": lambda w: (
        lambda: inventory_services.managed_object_delete(managed_object=w.group)
    ),
    "managed_object_add_children": lambda w: (
        lambda: inventory_services.managed_object_add_children(
            parent=w.agent, relation=Relation.DEVICE, children=[w.grandchild]
        )
    ),
    "managed_object_create_child": lambda w: (
        lambda: inventory_services.managed_object_create_child(
            parent=w.agent, relation=Relation.DEVICE, owner="alice", data={"name": "Kid"}
        )
    ),
    "managed_object_remove_children": lambda w: (
        lambda: inventory_services.managed_object_remove_children(
            parent=w.group, relation=Relation.ASSET, child_ids=[w.device.pk, w.grandchild.pk]
        )
    ),
    "external_id_create": lambda w: (
        lambda: inventory_services.external_id_create(
            managed_object=w.device, type="c8y_Serial", external_id="S-2"
        )
    ),
    "external_id_delete": lambda w: (
        lambda: inventory_services.external_id_delete(external_id=w.external_id)
    ),
    "operation_create": lambda w: (
        lambda: operation_services.operation_create(
            device=w.grandchild, data={"c8y_Command": {"text": "ls"}}
        )
    ),
    "operation_update": lambda w: (
        lambda: operation_services.operation_update(
            operation_id=w.pending.pk, data={"status": "EXECUTING", "c8y_Progress": 1}
        )
    ),
    "operation_update of a bulk child": lambda w: (
        lambda: operation_services.operation_update(
            operation_id=w.failed_child.pk, data={"status": OperationStatus.PENDING}
        )
    ),
    "operation_retry": lambda w: (
        lambda: operation_services.operation_retry(
            operation=Operation.objects.get(pk=w.failed_child.pk)
        )
    ),
    "operations_delete": lambda w: (
        lambda: operation_services.operations_delete(
            queryset=Operation.objects.filter(device=w.device)
        )
    ),
    "operations_create_many": lambda w: (
        lambda: operation_services.operations_create_many(
            devices=[w.agent],  # no agent above it: created FAILED
            data={"c8y_Restart": {}},
            bulk_operation_id=w.bulk_id,
            no_agent_reason="none",
        )
    ),
    "bulk_operation_create": lambda w: (
        lambda: bulk_services.bulk_operation_create(
            data={
                "groupId": w.group.pk,
                "startDate": "2031-01-01T00:00:00Z",
                "creationRamp": 5,
                "operationPrototype": {"c8y_Restart": {}},
            }
        )
    ),
    "bulk_operation_create failedParentId": lambda w: (
        lambda: bulk_services.bulk_operation_create(
            data={
                "failedParentId": w.bulk_id,
                "startDate": "2031-01-01T00:00:00Z",
                "creationRamp": 5,
                "operationPrototype": {"c8y_Restart": {}},
            }
        )
    ),
    "user_upsert": lambda w: (
        lambda: platform_services.user_upsert(
            username="newcomer", password="pw", roles=["ROLE_INVENTORY_READ"]
        )
    ),
}


def _scheduled_bulk(w: World) -> int:
    return bulk_services.bulk_operation_create(
        data={
            "groupId": w.group.pk,
            "startDate": "2031-01-01T00:00:00Z",
            "creationRamp": 5,
            "operationPrototype": {"c8y_Restart": {}},
        }
    ).pk


# Writes on a bulk operation that is still running (the one in World has completed).
RUNNING_BULK_WRITES: dict[str, Callable[[int], Callable[[], object]]] = {
    "bulk_operation_update": lambda pk: (
        lambda: bulk_services.bulk_operation_update(
            bulk_operation_id=pk, data={"creationRamp": 1, "c8y_Note": "x"}
        )
    ),
    "bulk_operation_cancel": lambda pk: (
        lambda: bulk_services.bulk_operation_cancel(bulk_operation_id=pk)
    ),
}


def assert_atomic(write: Callable[[], object], subscriber: Subscribe, agent_id: int) -> int:
    """Inject a fault before each statement from the second on; returns the statement count."""
    listener = subscriber("/managedobjects/*", "/operations/*", f"/{agent_id}")
    count = len(rehearse(write))
    before = database_state()
    for fail_at in range(2, count + 1):
        with pytest.raises(InjectedFault), statements(fail_at=fail_at):
            write()
        assert database_state() == before, f"fault before statement {fail_at} left rows behind"
    # Nothing was published: the first message the listener gets is one sent after the faults.
    publish([RealtimeEvent(SENTINEL, {"realtimeAction": "UPDATE", "data": "sentinel"})])
    assert [message["channel"] for message in listener.receive(1)] == [SENTINEL]
    # The write itself works (the faults were the only reason it failed).
    write()
    return count


@pytest.mark.parametrize("name", WRITES)
def test_a_fault_after_the_first_statement_leaves_nothing_behind(
    world: World, subscriber: Subscribe, name: str
) -> None:
    count = assert_atomic(WRITES[name](world), subscriber, world.agent.pk)
    assert count >= 1


@pytest.mark.parametrize("name", RUNNING_BULK_WRITES)
def test_a_fault_in_a_bulk_operation_write_leaves_nothing_behind(
    world: World, subscriber: Subscribe, name: str
) -> None:
    pk = _scheduled_bulk(world)
    assert assert_atomic(RUNNING_BULK_WRITES[name](pk), subscriber, world.agent.pk) >= 2


def test_the_injector_sees_a_multi_statement_write_fail(world: World) -> None:
    """The harness itself: a write of several statements, faulted at its last one, raises."""
    sent = rehearse(WRITES["managed_object_delete cascade"](world))
    assert len(sent) > 3
    with pytest.raises(InjectedFault), statements(fail_at=len(sent)):
        WRITES["managed_object_delete cascade"](world)()
