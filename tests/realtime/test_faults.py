"""Smaller findings of the fault campaign, realtime side (issue 10, item 8): a subscription granted
by ownership ends when the device changes owner (it kept delivering), and while Redis is down every
Bayeux message gets a Bayeux failure with advice to retry, as CometD servers answer, instead of an
HTTP 500 with the REST error body. The outage tests run real uvicorn servers against a private
redis-server that they stop and start, never the shared one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from channels.db import database_sync_to_async

from deviceplatform.realtime.hub import get_store
from deviceplatform.realtime.rights import rights_cache
from deviceplatform.roles import Role
from inventory import services as inventory_services
from tests.helpers import PASSWORD
from tests.realtime.bayeux import (
    AGENT,
    LpBayeux,
    World,
    WsBayeux,
    create_operation,
    event_ids,
    handshake_message,
)
from tests.servers import PrivateRedis, Servers, free_port, launch, private_redis  # noqa: F401

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.asyncio,
]

LP_TYPE = "application/json;charset=UTF-8"


# --- rights are checked again at delivery -----------------------------------------------------------


@database_sync_to_async
def change_owner(device: Any, owner: str) -> None:
    inventory_services.managed_object_update(
        managed_object_id=device.pk, data={"owner": owner}, allow_owner=True
    )


@database_sync_to_async
def update_object(device: Any) -> None:
    inventory_services.managed_object_update(
        managed_object_id=device.pk, data={"c8y_Note": {"text": "changed"}}
    )


async def test_an_owner_subscription_stops_when_the_device_changes_owner(world: World) -> None:
    channel = f"/operations/{world.device.pk}"
    alice, reader, bob = LpBayeux(), LpBayeux(), LpBayeux()
    await alice.start("alice", channel)  # by ownership
    await reader.start("reader", channel)  # by ROLE_DEVICE_CONTROL_READ
    before = await create_operation(world.device)
    delivered_before = event_ids(await alice.connect_now())

    await change_owner(world.device, "bob")
    await bob.start("bob", channel)  # the new owner may subscribe now
    after = await create_operation(world.device)
    alice_after = await alice.connect_now()
    later = await create_operation(world.device)
    alice_later = await alice.connect_now()

    assert delivered_before == [before]
    assert event_ids(alice_after) == []
    assert alice_after[-1]["successful"] is True  # the session itself lives on
    assert event_ids(alice_later) == []
    assert channel not in await get_store().subscriptions(alice.client_id)
    assert event_ids(await reader.connect_now()) == [before, after, later]
    assert event_ids(await bob.connect_now()) == [after, later]
    refused = await alice.subscribe(channel)
    assert refused["error"] == "403::Subscription denied"


async def test_an_agent_channel_over_websocket_stops_with_the_agents_owner(world: World) -> None:
    async with WsBayeux(AGENT) as ws:
        await ws.start("alice", f"/{world.agent.pk}")
        first = await create_operation(world.agent)
        pushed_before, _reply = await ws.request([ws.connect_message(timeout=0)])
        held = ws.connect_message(timeout=400)
        await ws.send([held])
        await change_owner(world.agent, "bob")
        await create_operation(world.agent)  # wakes the held connect: nothing may go out
        answer = await ws.frame()

    assert pushed_before["data"]["id"] == first
    assert [m["channel"] for m in answer] == ["/meta/connect"], answer
    assert answer[0]["successful"] is True


async def test_managed_object_events_stop_with_ownership(world: World) -> None:
    channel = f"/managedobjects/{world.device.pk}"
    alice = LpBayeux()
    await alice.start("alice", channel)
    await update_object(world.device)
    seen = await alice.connect_now()
    await change_owner(world.device, "bob")  # its own UPDATE already goes to the new owner only
    await update_object(world.device)
    unseen = await alice.connect_now()

    assert [m["channel"] for m in seen] == [channel, "/meta/connect"]
    assert [m["channel"] for m in unseen] == ["/meta/connect"]


async def test_a_role_taken_away_ends_a_wildcard_subscription(
    world: World, make_user: Callable[..., Any], settings: Any
) -> None:
    # Role changes reach a subscription when its verdict is older than this (and the roles cache
    # has expired); 0 re-checks at every delivery.
    settings.AUTH_ROLES_CACHE_SECONDS = 0
    settings.REALTIME_RIGHTS_CACHE_SECONDS = 0
    lp = LpBayeux()
    await lp.start("reader", "/operations/*")
    kept = await create_operation(world.other)
    first = event_ids(await lp.connect_now())
    await database_sync_to_async(make_user)("reader", roles=[Role.INVENTORY_READ])
    await create_operation(world.other)

    assert first == [kept]
    assert event_ids(await lp.connect_now()) == []


async def test_verdicts_are_reused_until_they_are_too_old(
    world: World, make_user: Callable[..., Any], settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the default cache a role taken away ends the subscription once the verdict is older
    than REALTIME_RIGHTS_CACHE_SECONDS; an owner change ends it at once (above)."""
    settings.AUTH_ROLES_CACHE_SECONDS = 0
    lp = LpBayeux()
    await lp.start("reader", "/operations/*")
    await database_sync_to_async(make_user)("reader", roles=[Role.INVENTORY_READ])
    still = await create_operation(world.other)
    cached = event_ids(await lp.connect_now())
    later = rights_cache._clock() + settings.REALTIME_RIGHTS_CACHE_SECONDS
    monkeypatch.setattr(rights_cache, "_clock", lambda: later)  # the verdict's age is up
    await create_operation(world.other)
    expired = event_ids(await lp.connect_now())

    assert cached == [still]
    assert expired == []


@pytest.mark.asyncio
async def test_an_owner_change_in_another_process_ends_the_subscription_at_once(
    make_user: Callable[..., Any], server: Any
) -> None:
    """The subscriber holds its session on a server process; the owner changes in this one: the
    ownership epoch in Redis tells the server to check again at its next delivery."""
    from tests.realtime.conftest import LongPolling, http_session

    await database_sync_to_async(make_user)("carol")
    await database_sync_to_async(make_user)("dave")
    device = await database_sync_to_async(inventory_services.managed_object_create)(
        owner="carol", data={"name": "X", "c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}}
    )
    async with http_session() as http:
        carol = LongPolling(http, server, "/notification/realtime")
        cid = await carol.open("t100/carol", f"/operations/{device.pk}")
        before = await create_operation(device)
        seen, _ = await carol.connect(cid, timeout_ms=0)
        await change_owner(device, "dave")
        await create_operation(device)
        unseen, reply = await carol.connect(cid, timeout_ms=0)

    assert [event["data"]["data"]["id"] for event in seen] == [before]
    assert unseen == []
    assert reply["successful"] is True


# --- Redis down -------------------------------------------------------------------------------------


def handshake(id: str = "1") -> dict[str, Any]:  # noqa: A002
    return handshake_message("admin", id=id)


async def post(http: aiohttp.ClientSession, url: str, *messages: Any) -> list[dict[str, Any]]:
    """One long-polling request: it must be a 200 with a JSON array of Bayeux replies."""
    async with http.post(url, json=list(messages)) as response:
        body = await response.read()
        assert response.status == 200, (response.status, body[:300])
        assert response.headers["Content-Type"] == LP_TYPE
    replies = json.loads(body)
    assert isinstance(replies, list), replies
    return replies


def assert_retry_later(reply: dict[str, Any], reconnect: str) -> None:
    assert reply["successful"] is False, reply
    assert reply["error"].startswith("503::"), reply
    assert reply["advice"]["reconnect"] == reconnect, reply
    assert reply["advice"]["interval"] > 0, reply


@pytest.fixture
def admin_user(make_user: Callable[..., Any]) -> Any:
    return make_user("admin", groups=["admins"])


@pytest.fixture
def device(admin_user: Any) -> int:
    return inventory_services.managed_object_create(
        owner="admin", data={"name": "D", "c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}}
    ).pk


async def test_while_redis_is_down_every_message_gets_bayeux_advice(
    launch: Servers,  # noqa: F811
    private_redis: PrivateRedis,  # noqa: F811
    device: int,
) -> None:
    server = await asyncio.to_thread(
        launch.start, "uvicorn", REDIS_URL=private_redis.url, REALTIME_DEFAULT_TIMEOUT_MS="1000"
    )
    url = server.url + "/notification/realtime"
    channel = f"/operations/{device}"
    async with aiohttp.ClientSession() as http:
        [hello] = await post(http, url, handshake())
        cid = hello["clientId"]
        [subscribed] = await post(
            http, url, {"channel": "/meta/subscribe", "clientId": cid, "subscription": channel}
        )
        [first] = await post(http, url, {"channel": "/meta/connect", "clientId": cid})
        # A connect held when Redis goes away is answered when its hold ends.
        held = asyncio.create_task(
            post(http, url, {"channel": "/meta/connect", "clientId": cid, "id": "held"})
        )
        await asyncio.sleep(0.3)
        private_redis.stop()
        [held_reply] = await held

        [connect] = await post(http, url, {"channel": "/meta/connect", "clientId": cid, "id": "c"})
        [again] = await post(http, url, handshake("h"))
        [subscribe] = await post(
            http,
            url,
            {"channel": "/meta/subscribe", "clientId": cid, "subscription": channel, "id": "s"},
        )
        [unsubscribe] = await post(
            http,
            url,
            {"channel": "/meta/unsubscribe", "clientId": cid, "subscription": channel, "id": "u"},
        )
        [disconnect] = await post(http, url, {"channel": "/meta/disconnect", "clientId": cid})
        async with http.ws_connect(
            server.url.replace("http", "ws") + "/notification/realtime"
        ) as ws:
            await ws.send_str(json.dumps([handshake("w1")]))
            [ws_handshake] = json.loads((await ws.receive(timeout=30)).data)
            await ws.send_str(json.dumps([{"channel": "/meta/connect", "clientId": cid}]))
            [ws_connect] = json.loads((await ws.receive(timeout=30)).data)

        # Redis comes back empty (no persistence): the session is gone, the client starts over.
        private_redis.start()
        [lost] = await post(http, url, {"channel": "/meta/connect", "clientId": cid})
        [fresh] = await post(http, url, handshake("again"))

    assert (hello["successful"], subscribed["successful"], first["successful"]) == (True,) * 3
    for reply in (held_reply, connect, subscribe, unsubscribe, disconnect, ws_connect):
        assert_retry_later(reply, "retry")
    for reply in (again, ws_handshake):
        assert_retry_later(reply, "handshake")
    assert (held_reply["id"], connect["id"], subscribe["subscription"]) == ("held", "c", channel)
    assert lost["error"] == "402::Unknown client"
    assert lost["advice"]["reconnect"] == "handshake"
    assert fresh["successful"] is True
    assert "Internal Server Error" not in server.log()


async def test_a_server_whose_redis_never_answers_advises_to_retry(
    launch: Servers,  # noqa: F811
    admin_user: Any,
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    server = await asyncio.to_thread(launch.start, "uvicorn", REDIS_URL=nowhere)
    url = server.url + "/notification/realtime"
    async with aiohttp.ClientSession() as http:
        [hello] = await post(http, url, handshake())
        [subscribe] = await post(
            http, url, {"channel": "/meta/subscribe", "clientId": "x" * 32, "subscription": "/1"}
        )

    assert_retry_later(hello, "handshake")
    assert_retry_later(subscribe, "retry")
    assert PASSWORD not in server.log()
