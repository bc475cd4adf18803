"""Realtime events of managed object changes (realtime.md §5.3, inventory.md §5-§7): what
subscribers of `/managedobjects/{id}` and `/managedobjects/*` on the real realtime store receive
for REST creates, updates, deletes and reference changes; nothing for QUIESCENT requests or
rolled-back changes; one on-commit batch per transaction; and who may subscribe (auth.md §7),
asked through the Bayeux protocol layer."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from django.db import transaction
from rest_framework.test import APIClient

from deviceplatform.realtime.events import EventBatch
from deviceplatform.realtime.protocol import Context, Exchange
from deviceplatform.realtime.subscriptions import Family
from deviceplatform.roles import Role
from inventory import services
from inventory.models import ManagedObject, Relation
from tests.conftest import Run, Subscribe
from tests.helpers import PASSWORD

pytestmark = pytest.mark.django_db(transaction=True)  # on commit

BASE = "http://testserver"  # where the test client's requests and the subscribers connect
MOS = "/inventory/managedObjects"
MO_TYPE = "application/vnd.com.nsn.cumulocity.managedobject+json"
QUIESCENT = {"HTTP_X_CUMULOCITY_PROCESSING_MODE": "QUIESCENT"}

Message = dict[str, Any]


# --- users and requests -------------------------------------------------------------------------


@pytest.fixture
def api(make_user: Callable[..., Any], client_for: Callable[..., APIClient]) -> APIClient:
    return client_for(make_user("inv_admin", roles=[Role.INVENTORY_ADMIN]))


def call(client: APIClient, method: str, path: str, body: Any = None, **extra: Any) -> Any:
    return getattr(client, method.lower())(
        path,
        data=json.dumps(body) if body is not None else None,
        content_type="application/json",
        HTTP_ACCEPT="application/json",
        **extra,
    )


def ok(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, response.content[:500]
    return response.json() if response.content else None


def get(client: APIClient, pk: int) -> dict[str, Any]:
    """The object as `GET /inventory/managedObjects/{id}` renders it: what events must carry."""
    return ok(call(client, "GET", f"{MOS}/{pk}"))


def create(name: str, owner: str = "inv_admin", **fragments: Any) -> ManagedObject:
    return services.managed_object_create(owner=owner, data={"name": name, **fragments})


def event(action: str, pk: int, data: Any) -> Message:
    return {"channel": f"/managedobjects/{pk}", "data": {"realtimeAction": action, "data": data}}


# --- events -------------------------------------------------------------------------------------


def test_create_sends_the_new_object_as_get_returns_it(
    api: APIClient, subscriber: Subscribe
) -> None:
    every = subscriber("/managedobjects/*")

    body = ok(call(api, "POST", MOS, {"name": "Pump", "c8y_IsDevice": {}, "x": [1]}), 201)

    created = get(api, int(body["id"]))
    assert created == body
    assert every.received() == [event("CREATE", int(body["id"]), created)]


def test_put_sends_the_whole_object_with_its_references_once_and_only_to_its_channels(
    api: APIClient, subscriber: Subscribe
) -> None:
    parent, child = create("Parent", c8y_IsDevice={}), create("Child")
    services.managed_object_add_children(parent=parent, relation=Relation.DEVICE, children=[child])
    own = subscriber(f"/managedobjects/{parent.pk}", "/managedobjects/*")  # one copy each
    other = subscriber(f"/managedobjects/{child.pk}")

    ok(call(api, "PUT", f"{MOS}/{parent.pk}", {"name": "Renamed", "c8y_IsDevice": None}))
    after_rename = get(api, parent.pk)
    ok(call(api, "PUT", f"{MOS}/{parent.pk}", {}))  # nothing changes but lastUpdated

    assert after_rename["name"] == "Renamed"
    assert "c8y_IsDevice" not in after_rename
    [child_ref] = after_rename["childDevices"]["references"]
    assert child_ref["managedObject"] == {
        "id": str(child.pk),
        "self": f"{BASE}{MOS}/{child.pk}",
        "name": "Child",
    }
    assert own.received() == [
        event("UPDATE", parent.pk, after_rename),
        event("UPDATE", parent.pk, get(api, parent.pk)),
    ]
    assert other.received() == []


def test_delete_sends_delete_for_each_deleted_object_and_update_for_its_surviving_parent(
    api: APIClient, subscriber: Subscribe
) -> None:
    group = create("Group", c8y_IsDeviceGroup={})
    device, sub1, sub2 = create("Device"), create("Sub 1"), create("Sub 2")
    services.managed_object_add_children(parent=group, relation=Relation.ASSET, children=[device])
    services.managed_object_add_children(
        parent=device, relation=Relation.DEVICE, children=[sub1, sub2]
    )
    every = subscriber("/managedobjects/*")

    ok(call(api, "DELETE", f"{MOS}/{device.pk}?cascade=true"), 204)

    after = get(api, group.pk)
    assert after["childAssets"]["references"] == []
    assert every.received() == [
        event("DELETE", device.pk, str(device.pk)),
        event("DELETE", sub1.pk, str(sub1.pk)),
        event("DELETE", sub2.pk, str(sub2.pk)),
        event("UPDATE", group.pk, after),
    ]


def test_reference_changes_update_the_parent(api: APIClient, subscriber: Subscribe) -> None:
    parent, child = create("Parent"), create("Child")
    stranger = create("Stranger")
    every = subscriber("/managedobjects/*")
    children = f"{MOS}/{parent.pk}/childDevices"
    assets = f"{MOS}/{parent.pk}/childAssets"

    ok(call(api, "POST", children, {"managedObject": {"id": str(child.pk)}}), 201)
    with_child = get(api, parent.pk)
    ok(call(api, "DELETE", f"{children}/{child.pk}"), 204)
    without_child = get(api, parent.pk)
    # Unassigning what is not assigned changes nothing and sends nothing.
    ref = {"references": [{"managedObject": {"id": str(stranger.pk)}}]}
    ok(call(api, "DELETE", children, ref), 204)
    new = ok(call(api, "POST", assets, {"name": "New asset"}), 201)["managedObject"]
    with_asset = get(api, parent.pk)

    assert [r["managedObject"]["id"] for r in with_child["childDevices"]["references"]] == [
        str(child.pk)
    ]
    assert without_child["childDevices"]["references"] == []
    assert with_asset["childAssets"]["references"][0]["managedObject"]["id"] == new["id"]
    assert every.received() == [
        event("UPDATE", parent.pk, with_child),
        event("UPDATE", parent.pk, without_child),
        event("CREATE", int(new["id"]), get(api, int(new["id"]))),
        event("UPDATE", parent.pk, with_asset),
    ]


def test_quiescent_requests_send_nothing(api: APIClient, subscriber: Subscribe) -> None:
    parent, child = create("Parent"), create("Child")
    every = subscriber("/managedobjects/*")
    children = f"{MOS}/{parent.pk}/childDevices"

    created = ok(call(api, "POST", MOS, {"name": "Quiet"}, **QUIESCENT), 201)
    ok(call(api, "PUT", f"{MOS}/{parent.pk}", {"x": 1}, **QUIESCENT))
    ok(call(api, "POST", children, {"managedObject": {"id": str(child.pk)}}, **QUIESCENT), 201)
    ok(call(api, "POST", children, {"name": "Quiet child"}, **QUIESCENT), 201)
    ok(call(api, "DELETE", f"{children}/{child.pk}", **QUIESCENT), 204)
    ok(call(api, "DELETE", f"{MOS}/{created['id']}", **QUIESCENT), 204)
    assert every.received() == []

    ok(call(api, "PUT", f"{MOS}/{parent.pk}", {"x": 2}))  # the same change, not quiescent
    assert every.received() == [event("UPDATE", parent.pk, get(api, parent.pk))]


def test_a_refused_change_sends_nothing(api: APIClient, subscriber: Subscribe) -> None:
    parent, child = create("Parent"), create("Child")
    every = subscriber("/managedobjects/*")
    refs = [{"managedObject": {"id": str(pk)}} for pk in (child.pk, parent.pk)]

    # The child is linked first, then the self-reference is refused: all of it rolls back.
    response = call(api, "POST", f"{MOS}/{parent.pk}/childDevices", {"references": refs})

    assert response.status_code == 422, response.content
    assert get(api, parent.pk)["childDevices"]["references"] == []
    assert every.received() == []


def test_the_subscriber_sees_urls_with_the_host_it_connected_to(
    api: APIClient, realtime_loop: Run, make_user: Callable[..., Any]
) -> None:
    make_user("reader", roles=[Role.INVENTORY_READ])
    parent, child = create("Parent"), create("Child")
    services.managed_object_add_children(parent=parent, relation=Relation.DEVICE, children=[child])
    host = "https://other.example:8443"
    bayeux = Bayeux(realtime_loop, Family.REALTIME, host)
    client_id = bayeux.handshake("reader")
    assert bayeux.subscribe(client_id, f"/managedobjects/{parent.pk}")["successful"] is True
    bayeux.connect(client_id)  # the first connect, answered at once

    ok(call(api, "PUT", f"{MOS}/{parent.pk}", {"x": 1}))

    [message, reply] = bayeux.connect(client_id)
    assert reply["channel"] == "/meta/connect"
    assert reply["successful"] is True
    assert message["channel"] == f"/managedobjects/{parent.pk}"
    assert message["data"]["realtimeAction"] == "UPDATE"
    data = message["data"]["data"]
    assert data == json.loads(json.dumps(get(api, parent.pk)).replace(BASE, host))
    assert data["self"] == f"{host}{MOS}/{parent.pk}"
    [ref] = data["childDevices"]["references"]
    assert ref["self"] == f"{host}{MOS}/{parent.pk}/childDevices/{child.pk}"
    assert ref["managedObject"]["self"] == f"{host}{MOS}/{child.pk}"


# --- batching -----------------------------------------------------------------------------------


def batches(callbacks: list[Any]) -> list[list[Message]]:
    return [
        [{"channel": m.channel, "data": m.data} for e in cb.events for m in e.messages()]
        for cb in callbacks
        if isinstance(cb, EventBatch)
    ]


def actions(batch: list[Message]) -> list[tuple[str, str]]:
    return [(m["data"]["realtimeAction"], m["channel"]) for m in batch]


@pytest.mark.django_db
def test_one_request_registers_one_batch(
    api: APIClient, django_capture_on_commit_callbacks: Callable[..., Any]
) -> None:
    parent = create("Parent")
    sub1, sub2 = create("Sub 1"), create("Sub 2")
    services.managed_object_add_children(
        parent=parent, relation=Relation.DEVICE, children=[sub1, sub2]
    )

    with django_capture_on_commit_callbacks() as created:
        new = ok(call(api, "POST", f"{MOS}/{parent.pk}/childDevices", {"name": "New"}), 201)
    with django_capture_on_commit_callbacks() as deleted:
        ok(call(api, "DELETE", f"{MOS}/{parent.pk}?cascade=true"), 204)

    new_id = new["managedObject"]["id"]
    [batch] = batches(created)
    assert actions(batch) == [
        ("CREATE", f"/managedobjects/{new_id}"),
        ("UPDATE", f"/managedobjects/{parent.pk}"),
    ]
    [batch] = batches(deleted)
    assert actions(batch) == [
        ("DELETE", f"/managedobjects/{pk}")
        for pk in sorted([parent.pk, sub1.pk, sub2.pk, int(new_id)])
    ]


class Abort(Exception):
    pass


@pytest.mark.django_db
def test_a_rolled_back_savepoint_drops_only_its_own_events(
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    with django_capture_on_commit_callbacks() as callbacks, transaction.atomic():
        first = create("First")
        try:
            with transaction.atomic():
                create("Rolled back")  # registered apart: the batch above must survive this
                raise Abort
        except Abort:
            pass
        with transaction.atomic():
            kept = create("Kept")
        last = create("Last")

    # Each create is atomic by itself (a savepoint of its own inside the test's transaction), so
    # each registers a batch that a rollback of its savepoint alone can drop.
    assert [actions(batch) for batch in batches(callbacks)] == [
        [("CREATE", f"/managedobjects/{first.pk}")],
        [("CREATE", f"/managedobjects/{kept.pk}")],
        [("CREATE", f"/managedobjects/{last.pk}")],
    ]


# --- who may subscribe (auth.md §7) ------------------------------------------------------------


class Bayeux:
    """Raw Bayeux messages through the protocol layer, as a transport connected to `base` would
    send them."""

    def __init__(self, run: Run, family: Family, base: str = BASE) -> None:
        self._run = run
        self._context = Context(family, base, None)
        self._ids = iter(range(1, 1_000_000))

    def exchange(self, *messages: Message) -> list[Message]:
        async def go() -> list[bytes]:
            return await Exchange(self._context).run(list(messages), holdable=False)

        return [orjson.loads(part) for part in self._run(go())]

    def handshake(self, username: str) -> str:
        token = base64.b64encode(f"t100/{username}:{PASSWORD}".encode()).decode()
        [reply] = self.exchange(
            {
                "channel": "/meta/handshake",
                "id": str(next(self._ids)),
                "version": "1.0",
                "supportedConnectionTypes": ["long-polling"],
                "ext": {"com.cumulocity.authn": {"token": token}},
            }
        )
        assert reply["successful"] is True, reply
        return reply["clientId"]

    def subscribe(self, client_id: str, channel: str) -> Message:
        message = {
            "channel": "/meta/subscribe",
            "id": str(next(self._ids)),
            "clientId": client_id,
            "subscription": channel,
        }
        [reply] = self.exchange(message)
        assert reply["subscription"] == channel
        return reply

    def connect(self, client_id: str) -> list[Message]:
        return self.exchange(
            {
                "channel": "/meta/connect",
                "id": str(next(self._ids)),
                "clientId": client_id,
                "connectionType": "long-polling",
                "advice": {"timeout": 0},
            }
        )


def outcomes(bayeux: Bayeux, username: str, channels: list[str]) -> dict[str, str]:
    client_id = bayeux.handshake(username)
    result = {}
    for channel in channels:
        reply = bayeux.subscribe(client_id, channel)
        result[channel] = "ok" if reply["successful"] else reply["error"]
    return result


def test_subscription_rights(realtime_loop: Run, make_user: Callable[..., Any]) -> None:
    make_user("reader", roles=[Role.INVENTORY_READ])
    make_user("alice", roles=[Role.INVENTORY_CREATE])
    make_user("admin_dc", roles=[Role.DEVICE_CONTROL_READ, Role.INVENTORY_CREATE])
    alices, bobs = create("Alice's", owner="Alice"), create("Bob's", owner="bob")
    missing = bobs.pk + 1000
    bayeux = Bayeux(realtime_loop, Family.REALTIME)
    denied = "403::Subscription denied"
    invalid = "400::Invalid channel"

    assert outcomes(
        bayeux,
        "reader",
        [
            "/managedobjects/*",
            "/managedobjects/**",
            f"/managedobjects/{alices.pk}",
            f"/managedobjects/{missing}",
        ],
    ) == {
        "/managedobjects/*": "ok",
        "/managedobjects/**": "ok",
        f"/managedobjects/{alices.pk}": "ok",
        f"/managedobjects/{missing}": "ok",
    }
    # The owner rule (owner names match case-insensitively); a missing object has no owner.
    assert outcomes(
        bayeux,
        "alice",
        [
            f"/managedobjects/{alices.pk}",
            f"/managedobjects/{bobs.pk}",
            f"/managedobjects/{missing}",
            "/managedobjects/9999999999999999999",  # beyond bigint: no owner either
            "/managedobjects/*",
        ],
    ) == {
        f"/managedobjects/{alices.pk}": "ok",
        f"/managedobjects/{bobs.pk}": denied,
        f"/managedobjects/{missing}": denied,
        "/managedobjects/9999999999999999999": denied,
        "/managedobjects/*": denied,
    }
    # Device-control roles say nothing about managed object channels.
    assert outcomes(bayeux, "admin_dc", ["/managedobjects/*", f"/managedobjects/{bobs.pk}"]) == {
        "/managedobjects/*": denied,
        f"/managedobjects/{bobs.pk}": denied,
    }
    assert outcomes(
        bayeux,
        "reader",
        [
            "/managedobjects/0",
            "/managedobjects/x1",
            f"/managedobjects/{bobs.pk}/childDevices",
            "/managedobjects/12345678901234567890",
            "/managedobjects",
        ],
    ) == dict.fromkeys(
        [
            "/managedobjects/0",
            "/managedobjects/x1",
            f"/managedobjects/{bobs.pk}/childDevices",
            "/managedobjects/12345678901234567890",
            "/managedobjects",
        ],
        invalid,
    )
    # Managed object channels exist on the realtime family only.
    agent = Bayeux(realtime_loop, Family.AGENT)
    assert outcomes(agent, "reader", [f"/managedobjects/{bobs.pk}", "/managedobjects/*"]) == {
        f"/managedobjects/{bobs.pk}": invalid,
        "/managedobjects/*": invalid,
    }
