"""Device-control fixtures: an agent hierarchy built through the inventory services, the exact
realtime events a block registers (Zulip's `capture_send_event_calls`), and listeners on the real
Channels layer."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from channels.layers import get_channel_layer
from django.db import transaction
from rest_framework.test import APIClient

from devicecontrol.realtime import EventDelivery, OperationEvent
from deviceplatform.roles import Role
from inventory import services as inventory_services
from inventory.models import ManagedObject, Relation
from tests.factories import Clients

OWNER = "alice"  # owns the hierarchy's devices; a user of that name gets the owner rule
OPERATIONS = "/devicecontrol/operations"
VENDOR = "application/vnd.com.nsn.cumulocity."

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
    `execute=True` the callbacks also run, so the events reach the real channel layer."""

    @contextmanager
    def capture(*, execute: bool = False) -> Iterator[list[OperationEvent]]:
        events: list[OperationEvent] = []
        with django_capture_on_commit_callbacks(execute=execute) as callbacks:
            yield events
        events.extend(cb.event for cb in callbacks if isinstance(cb, EventDelivery))

    return capture


class GroupListener:
    """One channel subscribed to one group on the real channel layer."""

    def __init__(self, run: Callable[[Coroutine[Any, Any, Any]], Any], layer: Any, group: str):
        self._run = run
        self.layer = layer
        self.group = group
        self.channel = run(layer.new_channel())
        run(layer.group_add(group, self.channel))

    def receive(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next message; the timeout only bounds a hang, it is no timing assertion."""
        return self._run(asyncio.wait_for(self.layer.receive(self.channel), timeout))

    def receive_many(self, count: int) -> list[dict[str, Any]]:
        return [self.receive() for _ in range(count)]

    def close(self) -> None:
        self._run(self.layer.group_discard(self.group, self.channel))


@pytest.fixture
def group_listener(settings: Any) -> Iterator[Callable[[str], GroupListener]]:
    """`group_listener(device_group(pk))` subscribes to a group on the configured channel layer
    (channels_redis pub/sub when REDIS_URL is set). A prefix of its own keeps parallel runs sharing
    the Redis server apart. The pub/sub layer keeps per-event-loop state, so every listener call
    runs on one event loop in a background thread."""
    layers = copy.deepcopy(settings.CHANNEL_LAYERS)
    config = layers["default"].setdefault("CONFIG", {})
    if "hosts" in config:
        config["prefix"] = f"dptest{uuid.uuid4().hex[:12]}"
    settings.CHANNEL_LAYERS = layers  # channels resets its cached layers on setting_changed
    layer = get_channel_layer()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    listeners: list[GroupListener] = []

    def listen(group: str) -> GroupListener:
        listener = GroupListener(run, layer, group)
        listeners.append(listener)
        return listener

    try:
        yield listen
    finally:
        for listener in listeners:
            listener.close()
        if hasattr(layer, "flush"):
            run(layer.flush())
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


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
