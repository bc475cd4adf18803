"""Cancel requests on the agent channel are opt-in (README "Cancel that reaches the device").

In Cumulocity `/{agentId}` of `/notification/operations` carries new operations only, and a plain
agent runs whatever arrives there. So the UPDATE of a cancel request (the EXECUTING operation with
`c8y_CancelRequested`) reaches only the subscriptions made with
`"ext": {"com.deviceplatform": {"cancelRequests": true}}`; every other subscriber of the channel
gets exactly what Cumulocity sends, and `/operations/{deviceId}` keeps its standard UPDATE. Both
transports, through the real consumer and view, with the events of committed service calls."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.db import transaction
from django.test import Client

from devicecontrol import services as devicecontrol_services
from devicecontrol.models import Operation
from devicecontrol.realtime import CANCEL_REQUESTS
from deviceplatform.realtime.hub import get_store
from deviceplatform.realtime.store import MemoryStore, RedisStore
from deviceplatform.realtime.subscriptions import variant
from inventory import services as inventory_services
from tests.deviceplatform.test_metrics import parse, value
from tests.realtime.bayeux import (
    AGENT,
    REALTIME,
    Bayeux,
    LpBayeux,
    Message,
    World,
    WsBayeux,
    create_operation,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.asyncio,
]

OPT_IN = {"com.deviceplatform": {"cancelRequests": True}}


def session(transport: str, path: str) -> Bayeux:
    return WsBayeux(path) if transport == "websocket" else LpBayeux(path)


TRANSPORTS = ["websocket", "long-polling"]


@database_sync_to_async
def take(operation_id: str) -> None:
    with transaction.atomic():
        devicecontrol_services.operation_update(
            operation_id=int(operation_id), data={"status": "EXECUTING"}
        )


@database_sync_to_async
def cancel(operation_id: str) -> None:
    with transaction.atomic():
        operation = Operation.objects.get(pk=int(operation_id))
        devicecontrol_services.operation_cancel(operation=operation, by="alice")


@database_sync_to_async
def change_owner(device: Any, owner: str) -> None:
    inventory_services.managed_object_update(
        managed_object_id=device.pk, data={"owner": owner}, allow_owner=True
    )


def seen(messages: list[Message]) -> list[tuple[str, str, str, bool]]:
    """The events among `messages` as (channel, operation id, status, cancel requested); the
    realtime family's envelope is opened."""
    events = []
    for message in messages:
        if message["channel"].startswith("/meta/"):
            continue
        data = message["data"]
        operation = data["data"] if "realtimeAction" in data else data
        requested = "c8y_CancelRequested" in operation
        events.append((message["channel"], operation["id"], operation["status"], requested))
    return events


async def open_session(transport: str, path: str, username: str, *subscribes: Message) -> Bayeux:
    """A session of `username` on `path` with one `/meta/subscribe` per dict of its fields, and
    its first connect."""
    client = session(transport, path)
    if isinstance(client, WsBayeux):
        await client.__aenter__()
    await client.handshake(username)
    for fields in subscribes:
        [reply] = await client.request([client.message("/meta/subscribe", **fields)])
        assert reply["successful"] is True, reply
    first = await client.connect_now()
    assert first[-1]["successful"] is True, first
    return client


async def close(*clients: Bayeux) -> None:
    for client in clients:
        if isinstance(client, WsBayeux):
            await client.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_only_the_subscription_that_asked_gets_the_cancel_request(
    world: World, transport: str
) -> None:
    agent = f"/{world.agent.pk}"
    plain = await open_session(transport, AGENT, "alice", {"subscription": agent})
    asked = await open_session(transport, AGENT, "alice", {"subscription": agent, "ext": OPT_IN})
    device = f"/operations/{world.agent.pk}"
    watcher = await open_session(transport, REALTIME, "reader", {"subscription": device})
    try:
        first = await create_operation(world.agent)
        await take(first)
        await cancel(first)
        second = await create_operation(world.agent)  # after the request: nothing comes between

        got = {name: seen(await c.connect_now()) for name, c in _named(plain, asked, watcher)}
    finally:
        await close(plain, asked, watcher)

    assert got["plain"] == [(agent, first, "PENDING", False), (agent, second, "PENDING", False)]
    assert got["asked"] == [
        (agent, first, "PENDING", False),
        (agent, first, "EXECUTING", True),
        (agent, second, "PENDING", False),
    ]
    assert got["watcher"] == [
        (device, first, "PENDING", False),
        (device, first, "EXECUTING", False),
        (device, first, "EXECUTING", True),
        (device, second, "PENDING", False),
    ]


def _named(plain: Bayeux, asked: Bayeux, watcher: Bayeux) -> list[tuple[str, Bayeux]]:
    return [("plain", plain), ("asked", asked), ("watcher", watcher)]


async def test_the_last_subscribe_decides_and_an_unsubscribe_ends_the_option(
    world: World,
) -> None:
    agent = f"/{world.agent.pk}"
    client = await open_session("long-polling", AGENT, "alice", {"subscription": agent})
    store = get_store()
    requests = []
    for fields, unsubscribe_first in (
        ({"ext": OPT_IN}, False),  # asks
        ({}, False),  # the same channel again without the ext: no longer
        ({"ext": {"com.deviceplatform": {"cancelRequests": False}}}, False),  # explicitly not
        ({"ext": OPT_IN}, False),  # asks again
        ({}, True),  # unsubscribed, then subscribed plainly: the option went with the channel
    ):
        if unsubscribe_first:
            reply = await client.unsubscribe(agent)
            assert reply["successful"] is True, reply
            assert await store.subscriptions(client.client_id) == set()  # type: ignore[arg-type]
        reply = await client.subscribe(agent, **fields)
        assert reply["successful"] is True, reply
        assert reply["subscription"] == agent
        operation = await create_operation(world.agent)
        await take(operation)
        await cancel(operation)
        requests.append([event[3] for event in seen(await client.connect_now())])

    assert requests == [[False, True], [False], [False], [False, True], [False]]


@database_sync_to_async
def subscriptions_gauge() -> float:
    """`deviceplatform_realtime_subscriptions` read back through a real scrape of /metrics (the
    scrape's database connection closed after it, as a server's request thread does)."""
    response = Client().get("/metrics")
    assert response.status_code == 200, response.content
    return value(parse(response.content.decode()), "deviceplatform_realtime_subscriptions")


@pytest.mark.parametrize("kind", ["memory", "redis"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_opted_in_subscription_counts_once_in_the_subscriptions_gauge(
    world: World, settings: Any, transport: str, kind: str
) -> None:
    settings.REALTIME_PREFIX = f"test:gauge:{uuid.uuid4().hex[:12]}"
    settings.REDIS_URL = settings.REDIS_URL if kind == "redis" else ""
    assert isinstance(get_store(), RedisStore if kind == "redis" else MemoryStore)
    agent = f"/{world.agent.pk}"
    before = await subscriptions_gauge()
    client = await open_session(transport, AGENT, "alice", {"subscription": agent, "ext": OPT_IN})
    try:
        held = await get_store().subscriptions(client.client_id)  # type: ignore[arg-type]
        assert held == {agent, variant(agent, CANCEL_REQUESTS)}  # the store holds both
        assert await subscriptions_gauge() == before + 1  # the client made one

        reply = await client.unsubscribe(agent)
        assert reply["successful"] is True, reply
        assert await subscriptions_gauge() == before
    finally:
        await close(client)


async def test_an_agent_channel_that_loses_its_right_drops_the_option_too(world: World) -> None:
    agent = f"/{world.agent.pk}"
    client = await open_session(
        "long-polling", AGENT, "alice", {"subscription": agent, "ext": OPT_IN}
    )
    first = await create_operation(world.agent)
    await take(first)
    assert seen(await client.connect_now()) == [(agent, first, "PENDING", False)]
    await change_owner(world.agent, "bob")
    await cancel(first)  # queued for the option's subscription: its delivery checks the channel

    received = await client.connect_now()

    assert seen(received) == []
    assert received[-1]["successful"] is True  # the session lives on
    assert await get_store().subscriptions(client.client_id) == set()  # type: ignore[arg-type]


BAD_OPTIONS = [
    pytest.param(
        AGENT,
        "/{agent}",
        {"com.deviceplatform": True},
        "400::Invalid ext com.deviceplatform (an object of options is expected)",
        id="not-an-object",
    ),
    pytest.param(
        AGENT,
        "/{agent}",
        {"com.deviceplatform": {"cancelRequests": "yes"}},
        "400::Invalid ext com.deviceplatform (cancelRequests must be true or false)",
        id="not-a-boolean",
    ),
    pytest.param(
        AGENT,
        "/{agent}",
        {"com.deviceplatform": {"cancelRequests": None}},
        "400::Invalid ext com.deviceplatform (cancelRequests must be true or false)",
        id="null",
    ),
    pytest.param(
        AGENT,
        "/{agent}",
        {"com.deviceplatform": {"cancelRequest": True}},
        "400::Invalid ext com.deviceplatform (the channel offers no option cancelRequest)",
        id="unknown-option",
    ),
    pytest.param(
        REALTIME,
        "/operations/{agent}",
        {"com.deviceplatform": {"cancelRequests": True}},
        "400::Invalid ext com.deviceplatform (the channel offers no option cancelRequests)",
        id="not-on-the-device-channel",
    ),
    pytest.param(
        REALTIME,
        "/operations/*",
        {"com.deviceplatform": {"cancelRequests": False}},
        "400::Invalid ext com.deviceplatform (the channel offers no option cancelRequests)",
        id="not-on-the-wildcard",
    ),
]


@pytest.mark.parametrize(("path", "channel", "ext", "error"), BAD_OPTIONS)
async def test_bad_options_are_refused_and_subscribe_nothing(
    world: World, path: str, channel: str, ext: dict[str, Any], error: str
) -> None:
    subscription = channel.format(agent=world.agent.pk)
    async with WsBayeux(path) as ws:
        await ws.handshake("reader")
        refused = await ws.subscribe(subscription, ext=ext)
        assert (refused["successful"], refused["error"]) == (False, error), refused
        assert refused["subscription"] == subscription
        assert await get_store().subscriptions(ws.client_id) == set()  # type: ignore[arg-type]
        # The session goes on, and other extensions (ours absent) change nothing.
        reply = await ws.subscribe(subscription, ext={"com.example": {"cancelRequests": 1}})
        assert reply["successful"] is True, reply
        assert await get_store().subscriptions(ws.client_id) == {subscription}  # type: ignore[arg-type]
