"""Realtime across server processes (realtime.md §3, §6.4): sessions, subscriptions, queues and
wake-ups live in Redis, so a client may handshake on one process and connect on another (what
aiocometd does behind a load balancer: HTTP first, then a WebSocket), an event created through any
process reaches a connect held by any other, and a worker that stops, gracefully or not, loses
nothing. The Bayeux messages are sent by hand, so each goes to the process the test chooses."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from deviceplatform.roles import Role
from inventory import services as inventory_services
from inventory.models import Relation
from tests.realtime.conftest import LongPolling, Rest, Server, Socket, http_session

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.asyncio,
]

REALTIME = "/notification/realtime"
ADMIN = "t100/rt_mp_admin"


@pytest.fixture
def device(make_user: Callable[..., Any]) -> int:
    """A device under an agent (so operations can be created for it), and the admin user."""
    make_user("rt_mp_admin", [Role.DEVICE_CONTROL_ADMIN, Role.INVENTORY_ADMIN])
    agent = inventory_services.managed_object_create(
        owner="rt_mp_admin",
        data={"name": "Agent", "c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}},
    )
    child = inventory_services.managed_object_create(
        owner="rt_mp_admin", data={"name": "Device", "c8y_IsDevice": {}}
    )
    inventory_services.managed_object_add_children(
        parent=agent, relation=Relation.DEVICE, children=[child]
    )
    return child.pk


def created_event(device: int, operation: dict[str, Any]) -> dict[str, Any]:
    """The event fields of a CREATE as a subscriber of `operation`'s server sees it."""
    return {
        "channel": f"/operations/{device}",
        "data": {"realtimeAction": "CREATE", "data": operation},
    }


def without_counter(message: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in message.items() if key != "id"}


async def test_handshake_on_one_process_websocket_on_another(
    servers: tuple[Server, Server], device: int
) -> None:
    first, second = servers
    channel = f"/operations/{device}"
    async with http_session() as http, http_session(ADMIN) as admin_http:
        on_first, on_second = Rest(admin_http, first), Rest(admin_http, second)

        # Handshake and subscribe over HTTP on the first process ...
        polling = LongPolling(http, first, REALTIME)
        handshake = await polling.handshake(ADMIN)
        assert handshake["successful"] is True
        client_id = handshake["clientId"]
        assert (await polling.subscribe(client_id, channel))["successful"] is True

        # ... connect over a WebSocket to the second with the same clientId.
        async with http.ws_connect(second.ws + REALTIME) as ws:
            socket = Socket(ws)
            sent = await socket.connect(client_id)  # the first connect: answered at once
            reply = await socket.next()
            assert (reply["id"], reply["clientId"], reply["successful"]) == (
                sent["id"],
                client_id,
                True,
            )
            held = await socket.connect(client_id, timeout_ms=60_000)

            # An operation created through the first process wakes the second one's socket; its
            # URLs carry the host this subscriber connected to.
            created = await on_first.create_operation(device)
            event = await socket.next()
            fetched = await on_second.get_operation(created["id"])
            assert fetched["self"].startswith(second.url + "/")
            assert without_counter(event) == created_event(device, fetched)

            disconnect = socket.message("/meta/disconnect", clientId=client_id)
            await socket.send(disconnect)
            answered = {(await socket.next())["id"] for _ in range(2)}
            assert answered == {held["id"], disconnect["id"]}

        # The other way round: a long-polling connect held by the first process is woken by an
        # operation created through the second.
        client_id = await LongPolling(http, second, REALTIME).open(ADMIN, channel)
        connect = asyncio.create_task(polling.connect(client_id, timeout_ms=60_000))
        await asyncio.sleep(0.2)  # lets the connect reach its hold; not an assertion
        created = await on_second.create_operation(device)
        events, reply = await asyncio.wait_for(connect, 30)
        assert reply["successful"] is True
        fetched = await on_first.get_operation(created["id"])
        assert [without_counter(event) for event in events] == [created_event(device, fetched)]


async def test_a_stopped_worker_loses_nothing(
    servers: tuple[Server, Server], device: int, start_servers: Callable[[int], list[Server]]
) -> None:
    """One session on a worker that shuts down gracefully between connects, one on a worker
    killed while it holds the session's connect. Events created meanwhile wait in Redis; the
    next connect, on another process, gets them and then holds there as usual."""
    first, second = servers
    graceful, killed = await asyncio.to_thread(start_servers, 2)
    channel = f"/operations/{device}"
    async with http_session() as http, http_session(ADMIN) as admin_http:
        rest = Rest(admin_http, first)
        calm = await LongPolling(http, graceful, REALTIME).open(ADMIN, channel)
        on_killed = LongPolling(http, killed, REALTIME)
        abrupt = await on_killed.open(ADMIN, channel)
        lost = asyncio.create_task(on_killed.connect(abrupt, timeout_ms=60_000))
        await asyncio.sleep(0.2)  # lets the connect reach its hold; not an assertion

        await asyncio.to_thread(graceful.stop, signal.SIGTERM)
        await asyncio.to_thread(killed.stop, signal.SIGKILL)
        with pytest.raises(aiohttp.ClientError):
            await lost

        created = await rest.create_operation(device)
        fetched = await Rest(admin_http, second).get_operation(created["id"])
        on_second = LongPolling(http, second, REALTIME)
        for client_id in (calm, abrupt):
            events, reply = await on_second.connect(client_id)
            assert reply["successful"] is True
            assert [without_counter(event) for event in events] == [created_event(device, fetched)]

        # Both sessions live on: the next connects hold on the second process until an event.
        connects = [
            asyncio.create_task(on_second.connect(client_id, timeout_ms=60_000))
            for client_id in (calm, abrupt)
        ]
        await asyncio.sleep(0.2)  # lets the connects reach their hold; not an assertion
        later = await rest.create_operation(device)
        fetched = await Rest(admin_http, second).get_operation(later["id"])
        for connect in connects:
            events, reply = await asyncio.wait_for(connect, 30)
            assert reply["successful"] is True
            assert [without_counter(event) for event in events] == [created_event(device, fetched)]
