"""Revoked or rotated credentials end a user's realtime sessions at once (issue 11 item 3), in every
process: `rights.credentials_changed` (run on commit by the user services) removes the user's
sessions from the store, which wakes each connect they hold, drops their queues and
subscriptions, and leaves a one-minute mark, so the held connect and every later message of those
sessions get `401::Authentication invalid` with advice to handshake again, which the old
credentials no longer pass. Other users' sessions go on.

The store contract runs against both stores; the protocol in process (WebSocket and
long-polling, Redis and the in-process store) and across real server processes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async

from deviceplatform.models import User
from deviceplatform.realtime.hub import get_store
from deviceplatform.realtime.store import ENDED, MemoryStore, Store
from deviceplatform.services import device_user_provision, device_user_rotate, user_set_active
from inventory.models import ManagedObject
from tests.helpers import PASSWORD, basic
from tests.realtime.bayeux import (
    REALTIME,
    LpBayeux,
    World,
    WsBayeux,
    agent_device,
    create_operation,
    event_ids,
    handshake_message,
)
from tests.realtime.conftest import WAIT, LongPolling, Rest, Server, http_session, token
from tests.realtime.test_store import (  # noqa: F401  (the store and listen fixtures)
    Wakes,
    attach,
    connected,
    held,
    listen,
    new_session,
    store,
)

pytestmark = pytest.mark.asyncio

REVOKED = {
    "successful": False,
    "error": "401::Authentication invalid",
    "advice": {"reconnect": "handshake", "interval": 0},
}
DENIED = {"successful": False, "error": "403::Handshake denied", "advice": {"reconnect": "none"}}
FAMILIES = ["realtime", "agent"]
HOLD_MS = 60_000  # far longer than any wait below: a connect answered earlier was woken


def failure(reply: dict[str, Any]) -> dict[str, Any]:
    return {key: reply.get(key) for key in ("successful", "error", "advice")}


# --- the store contract (both stores) -------------------------------------------------------------


async def test_ending_a_users_sessions_removes_each_and_wakes_its_holder(
    store: Store,  # noqa: F811
    listen: Callable[[str], Awaitable[Wakes]],  # noqa: F811
) -> None:
    wakes = await listen("hub-a")
    holding = await new_session(store, "/operations/5", uid="7")
    await held(store, holding, hold="t1")
    idle = await new_session(store, "/operations/5", uid="7")
    await connected(store, idle)
    agent_family = await new_session(store, "/5", uid="7", family="agent")
    other_user = await new_session(store, "/operations/5", uid="8")
    internal = await new_session(store, "/operations/5", uid="7", family="internal")

    ended = await asyncio.to_thread(store.end_user_sessions, "7", FAMILIES)

    assert sorted(ended) == sorted([holding, idle, agent_family])
    assert await wakes.next() == [holding]
    assert await store.drain(holding, "t1", release=True) == (ENDED, [])
    for cid in ended:
        assert await store.get_session(cid) is None
        assert await store.revoked(cid)
    for cid in (other_user, internal):
        assert await store.get_session(cid) is not None
        assert not await store.revoked(cid)
    # Their subscriptions are gone with them: an event reaches the other user only.
    await store.apublish([(b"e#1", ["/operations/5", "/operations/*"])])
    assert await attach(store, idle, hold="late") is None
    taken = await attach(store, other_user, hold="take", immediate=True)
    assert taken is not None
    assert taken.events == [b"e#1"]
    # Nothing left to end the second time.
    assert await asyncio.to_thread(store.end_user_sessions, "7", FAMILIES) == []


# --- the protocol, in process ---------------------------------------------------------------------


async def _wait_held(cid: str) -> None:
    """Until a connect holds session `cid` (so the revoke below wakes a held connect)."""
    store = get_store()  # noqa: F811
    for _ in range(1000):
        session = await store.get_session(cid)
        if session is not None and session["hold"]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no connect held {cid}")


def device_user(serial: str) -> tuple[User, ManagedObject]:
    """A device user (password PASSWORD) owning an agent, whose operations it may subscribe to."""
    user, _, _ = device_user_provision(serial, password=PASSWORD)
    return user, agent_device(f"Agent {serial}", user.username)


revoke = database_sync_to_async(lambda user: user_set_active(user.pk, active=False))
rotate = database_sync_to_async(lambda user: device_user_rotate(user.pk)[1])


@pytest.mark.django_db(transaction=True)
async def test_revoke_answers_the_held_long_polling_connect_and_refuses_what_follows(
    world: World,
) -> None:
    user, agent = await database_sync_to_async(device_user)("lp-rv")
    channel = f"/operations/{agent.pk}"
    device = LpBayeux()
    cid = await device.start(user.username, channel)
    reader = LpBayeux()
    await reader.start("reader", channel)
    waiting = asyncio.create_task(device.request([device.connect_message(timeout=HOLD_MS)]))
    await _wait_held(cid)

    await revoke(user)
    [answer] = await asyncio.wait_for(waiting, WAIT)

    assert failure(answer) == REVOKED
    assert (answer["channel"], answer["clientId"]) == ("/meta/connect", cid)
    # Its events stop: the reader gets the next operation, the revoked session nothing.
    operation = await create_operation(agent)
    assert event_ids(await reader.connect_now()) == [operation]
    [connect] = await device.request([device.connect_message(timeout=0)])
    [subscribe] = await device.request([device.message("/meta/subscribe", subscription=channel)])
    [disconnect] = await device.request([device.message("/meta/disconnect")])
    assert [failure(reply) for reply in (connect, subscribe, disconnect)] == [REVOKED] * 3
    assert subscribe["subscription"] == channel
    # Handshaking again, as advised, is denied with advice to stop.
    [handshake] = await LpBayeux().request([handshake_message(user.username)])
    assert failure(handshake) == DENIED
    # A long-polling request with the old Basic header is refused by HTTP itself.
    with_header = LpBayeux(Authorization=basic(f"t100/{user.username}"))
    response = await with_header.post([device.connect_message(timeout=0)])
    assert response.status_code == 401


@pytest.mark.django_db(transaction=True)
async def test_rotate_ends_the_websocket_session_and_only_the_new_password_handshakes(
    world: World,
) -> None:
    user, agent = await database_sync_to_async(device_user)("ws-rot")
    channel = f"/operations/{agent.pk}"
    async with WsBayeux() as ws, WsBayeux() as other:
        cid = await ws.start(user.username, channel)
        await other.start("reader", channel)
        await ws.send([ws.connect_message(timeout=HOLD_MS)])
        await _wait_held(cid)

        password = await rotate(user)
        [answer] = await ws.frame(WAIT)
        [subscribe] = await ws.request([ws.message("/meta/subscribe", subscription=channel)])
        [old] = await ws.request([handshake_message(user.username)])
        [new] = await ws.request(
            [
                handshake_message(None)
                | {"ext": {"com.cumulocity.authn": {"token": token(user.username, password)}}}
            ]
        )
        ws.client_id = new["clientId"]
        await ws.subscribed(channel)
        await ws.connect_now()
        operation = await create_operation(agent)
        received = await ws.connect_now()
        # The other user's session went on throughout.
        assert event_ids(await other.connect_now()) == [operation]

    assert failure(answer) == REVOKED
    assert answer["clientId"] == cid
    assert failure(subscribe) == REVOKED
    assert failure(old) == DENIED
    assert new["successful"] is True
    assert event_ids(received) == [operation]


@pytest.mark.django_db(transaction=True)
async def test_the_in_process_store_ends_sessions_the_same_way(world: World, settings: Any) -> None:
    settings.REDIS_URL = ""
    assert isinstance(get_store(), MemoryStore)
    user, agent = await database_sync_to_async(device_user)("mem-rv")
    async with WsBayeux() as ws:
        cid = await ws.start(user.username, f"/operations/{agent.pk}")
        await ws.send([ws.connect_message(timeout=HOLD_MS)])
        await _wait_held(cid)

        await revoke(user)
        [answer] = await ws.frame(WAIT)
        [later] = await ws.request([ws.connect_message(timeout=0)])

    assert failure(answer) == REVOKED
    assert failure(later) == REVOKED


@pytest.mark.django_db(transaction=True)
async def test_handshakes_racing_a_revoke_leave_no_session_behind(world: World) -> None:
    """Handshakes whose password check passed just before the revoke committed: each is denied,
    or its session is ended (by the revoke, or by the handshake itself when the revoke ended the
    user's sessions before this one existed)."""
    user, _ = await database_sync_to_async(device_user)("race-rv")

    async def handshake(header: bool) -> dict[str, Any] | None:
        """With the `ext` token, or with the Basic header (checked before the messages are
        read); None: the header was refused with HTTP 401."""
        if not header:
            [reply] = await LpBayeux().request([handshake_message(user.username)])
            return reply
        lp = LpBayeux(Authorization=basic(f"t100/{user.username}"))
        response = await lp.post([handshake_message(None)])
        if response.status_code == 401:
            return None
        assert response.status_code == 200, response.status_code
        [reply] = json.loads(response.content)
        return reply

    replies = await asyncio.gather(*[handshake(i % 2 == 1) for i in range(10)], revoke(user))
    store = get_store()  # noqa: F811
    for reply in replies[:-1]:
        if reply is not None and reply["successful"]:
            assert await store.get_session(reply["clientId"]) is None, reply
        elif reply is not None:
            assert failure(reply) == DENIED
    # And afterwards every handshake is denied.
    assert failure(await handshake(False)) == DENIED
    assert await handshake(True) is None


# --- across server processes ----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_a_revoke_in_one_process_ends_a_connect_held_by_another(
    servers: tuple[Server, Server], make_user: Callable[..., Any]
) -> None:
    first, second = servers
    user, agent = await database_sync_to_async(device_user)("xp-rv")
    await database_sync_to_async(make_user)("xp_reader", ["ROLE_DEVICE_CONTROL_ADMIN"])
    channel = f"/operations/{agent.pk}"
    login = f"t100/{user.username}"
    async with http_session() as http, http_session("t100/xp_reader") as reader_http:
        device = LongPolling(http, first, REALTIME)
        handshake = await device.handshake(login)
        cid = handshake["clientId"]
        assert (await device.subscribe(cid, channel))["successful"] is True
        on_second = LongPolling(http, second, REALTIME)
        _, first_connect = await on_second.connect(cid)
        assert first_connect["successful"] is True
        reader = LongPolling(http, second, REALTIME)
        reader_id = await reader.open("t100/xp_reader", channel)
        waiting = asyncio.create_task(on_second.connect(cid, timeout_ms=HOLD_MS))
        await _wait_held(cid)

        await revoke(user)  # in this process: neither server is told but through Redis
        events, answer = await asyncio.wait_for(waiting, WAIT)
        _, later = await device.connect(cid)
        created = await Rest(reader_http, first).create_operation(agent.pk)
        reader_events, _ = await reader.connect(reader_id)
        async with http.get(
            second.url + "/user/currentUser", headers={"Authorization": basic(login)}
        ) as response:
            rest_status = response.status

    assert events == []
    assert failure(answer) == REVOKED
    assert failure(later) == REVOKED
    assert [event["data"]["data"]["id"] for event in reader_events] == [created["id"]]
    assert rest_status == 401
