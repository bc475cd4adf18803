"""Device-control fixtures: an agent hierarchy built through the inventory services, the exact
realtime events a block registers (Zulip's `capture_send_event_calls`), and subscribers on the real
realtime store that receive the Bayeux messages clients would."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from django.db import transaction
from rest_framework.test import APIClient

from devicecontrol.models import Operation
from devicecontrol.realtime import CANCEL_REQUESTS, OperationEvent, registered_events
from devicecontrol.serializers import operation_json
from deviceplatform.realtime.subscriptions import variant
from deviceplatform.roles import Role
from inventory import services as inventory_services
from inventory.models import ManagedObject, Relation
from tests.factories import Clients

OWNER = "alice"  # owns the hierarchy's devices; a user of that name gets the owner rule
OPERATIONS = "/devicecontrol/operations"
VENDOR = "application/vnd.com.nsn.cumulocity."
BASE_URL = "http://testserver"  # where the test client's requests (and subscribers) connect

# API users: `alice` owns the hierarchy (no device-control role), `bob` owns nothing of it.
USERS: dict[str, list[Role]] = {
    "admin": [Role.DEVICE_CONTROL_ADMIN, Role.INVENTORY_ADMIN],
    "reader": [Role.DEVICE_CONTROL_READ],
    "alice": [Role.INVENTORY_CREATE],
    "bob": [Role.INVENTORY_CREATE],
    "nobody": [],
}


@pytest.fixture
def api(make_user: Callable[..., Any], client_for: Callable[..., APIClient]) -> Clients:
    return Clients(make_user, client_for, USERS, usernames={"admin": "dc_admin"})


def call(
    client: APIClient,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: str | bytes | None = None,
    accept: str | None = None,
    content_type: str | None = "application/json",
    **extra: Any,
) -> Any:
    """One request; `body` is JSON-encoded, `raw` is sent as is; no Accept header unless given."""
    data = raw if raw is not None else ("" if body is None else json.dumps(body))
    if accept is not None:
        extra["HTTP_ACCEPT"] = accept
    return client.generic(method, path, data, content_type=content_type, **extra)


def ok_json(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, (response.status_code, response.content[:500])
    return response.json()


def operation_path(pk: object) -> str:
    return f"{OPERATIONS}/{pk}"


def make_device(
    name: str | None = None, *, owner: str = OWNER, agent: bool = False, **fragments: Any
) -> ManagedObject:
    """A device (an agent with `agent=True`) created through `inventory.services`."""
    data: dict[str, Any] = {"c8y_IsDevice": {}, **fragments}
    if name is not None:
        data["name"] = name
    if agent:
        data["com_cumulocity_model_Agent"] = {}
    return inventory_services.managed_object_create(owner=owner, data=data)


def add_child_devices(parent: ManagedObject, *children: ManagedObject) -> None:
    inventory_services.managed_object_add_children(
        parent=parent, relation=Relation.DEVICE, children=list(children)
    )


def relative(body: dict[str, Any]) -> dict[str, Any]:
    """An API representation as the event carries it: `self` without scheme and host."""
    assert body["self"].startswith(BASE_URL)
    return {**body, "self": body["self"][len(BASE_URL) :]}


def as_get(operation: Operation | int) -> dict[str, Any]:
    """The operation as `GET /devicecontrol/operations/{id}` shows it to a client of BASE_URL."""
    pk = operation if isinstance(operation, int) else operation.pk
    return operation_json(Operation.objects.get(pk=pk), base=BASE_URL)


# --- the Bayeux messages of realtime.md §5.1 and §5.2, as a subscriber of BASE_URL receives them

Message = dict[str, Any]


def changed(action: str, body: dict[str, Any]) -> Message:
    return {
        "channel": f"/operations/{body['deviceId']}",
        "data": {"realtimeAction": action, "data": body},
    }


def deleted(operation: Operation) -> Message:
    return {
        "channel": f"/operations/{operation.device_id}",
        "data": {"realtimeAction": "DELETE", "data": str(operation.pk)},
    }


def to_agent(agent: ManagedObject | int, body: dict[str, Any]) -> Message:
    pk = agent if isinstance(agent, int) else agent.pk
    return {"channel": f"/{pk}", "data": body}


def opted_in(agent: ManagedObject) -> list[str]:
    """What a session holds after subscribing to the agent's channel with the cancel-request
    option (`"ext": {"com.deviceplatform": {"cancelRequests": true}}`): the channel and its
    variant. A plain subscriber holds the channel only."""
    channel = f"/{agent.pk}"
    return [channel, variant(channel, CANCEL_REQUESTS)]


class Abort(Exception):
    """Raised inside a transaction to roll it back."""


def rolled_back(action: Callable[[], object]) -> None:
    """Run `action` in `transaction.atomic()` and raise Abort, so the block rolls back."""
    with transaction.atomic():
        action()
        raise Abort


@dataclass(frozen=True)
class Hierarchy:
    """Agent A -> child device D -> grandchild G (childDevices), all owned by OWNER."""

    agent: ManagedObject
    device: ManagedObject
    grandchild: ManagedObject


@pytest.fixture
def hierarchy(db: None) -> Hierarchy:
    agent = make_device("Agent A", agent=True)
    device = make_device("Device D")
    grandchild = make_device("Sensor G")
    add_child_devices(agent, device)
    add_child_devices(device, grandchild)
    return Hierarchy(agent=agent, device=device, grandchild=grandchild)


EventCapture = Callable[..., Any]


@pytest.fixture
def capture_events(django_capture_on_commit_callbacks: Callable[..., Any]) -> EventCapture:
    """`with capture_events() as events:` collects exactly the operation events registered with
    `transaction.on_commit` in the block (other on-commit callbacks are ignored). With
    `execute=True` the callbacks also run, so the events reach the real realtime store."""

    @contextmanager
    def capture(*, execute: bool = False) -> Iterator[list[OperationEvent]]:
        events: list[OperationEvent] = []
        with django_capture_on_commit_callbacks(execute=execute) as callbacks:
            yield events
        events.extend(registered_events(callbacks))

    return capture


# An agent and its one child device, both owned by `owner` (who holds no role): the owner rule.
@pytest.fixture
def agent(db: None) -> ManagedObject:
    return inventory_services.managed_object_create(
        owner="owner",
        data={"name": "Agent", "c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}},
    )


@pytest.fixture
def device(agent: ManagedObject) -> ManagedObject:
    child = inventory_services.managed_object_create(
        owner="owner", data={"name": "Device", "c8y_IsDevice": {}}
    )
    inventory_services.managed_object_add_children(
        parent=agent, relation=Relation.DEVICE, children=[child]
    )
    return child
