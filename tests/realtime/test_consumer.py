"""The Bayeux protocol over the WebSocket consumer, in process (realtime.md §2-§6): replies and
their fields, subscriptions and who may make them, holding a connect on a socket, sessions moving
to long-polling, the per-user session limit, expiry, and the in-process store (embedded default).

Events come from the real services (a committed `operation_create`) through the shared store."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest
import redis
from django.conf import settings

from deviceplatform.realtime.hub import get_store
from deviceplatform.realtime.store import MemoryStore, RedisStore
from tests.realtime.bayeux import (
    AGENT,
    REALTIME,
    LpBayeux,
    World,
    WsBayeux,
    authn,
    create_operation,
    event_channels,
    event_ids,
    handshake_message,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.asyncio,
]

NOWHERE = 987654321  # no managed object has this ID


# --- replies: id, channel, clientId, handshake fields ---------------------------------------------


async def test_every_reply_echoes_channel_and_id_with_its_json_type(world: World) -> None:
    channel = f"/operations/{world.device.pk}"
    replies: list[tuple[Any, dict[str, Any]]] = []
    async with WsBayeux() as ws:
        for message_id in ("7", 7):
            [handshake] = await ws.request([handshake_message("reader", id=message_id)])
            cid = handshake["clientId"]
            base = {"id": message_id, "clientId": cid}
            [subscribe] = await ws.request(
                [{"channel": "/meta/subscribe", "subscription": channel, **base}]
            )
            [connect] = await ws.request(
                [{"channel": "/meta/connect", "advice": {"timeout": 0}, **base}]
            )
            [unsubscribe] = await ws.request(
                [{"channel": "/meta/unsubscribe", "subscription": channel, **base}]
            )
            [disconnect] = await ws.request([{"channel": "/meta/disconnect", **base}])
            for reply in (handshake, subscribe, connect, unsubscribe, disconnect):
                replies.append((message_id, reply))
            assert subscribe["subscription"] == channel
            assert unsubscribe["subscription"] == channel
            assert [
                r["channel"] for r in (handshake, subscribe, connect, unsubscribe, disconnect)
            ] == [
                "/meta/handshake",
                "/meta/subscribe",
                "/meta/connect",
                "/meta/unsubscribe",
                "/meta/disconnect",
            ]
            assert {r["clientId"] for _, r in replies[-5:]} == {cid}

    assert len(replies) == 10
    for message_id, reply in replies:
        assert reply["successful"] is True, reply
        assert reply["id"] == message_id
        assert type(reply["id"]) is type(message_id), reply


async def test_handshake_reply_fields(world: World) -> None:
    async with WsBayeux() as ws:
        [reply] = await ws.request(
            [handshake_message("reader", minimumVersion="1.0", ext={"ack": True, "x": 1})]
        )
        [other] = await ws.request([handshake_message("reader", id="2", ext=authn("reader"))])

    assert reply["successful"] is True, reply
    assert re.fullmatch(r"[a-z0-9]{26,}", reply["clientId"])
    assert other["successful"] is True, other
    assert other["clientId"] != reply["clientId"]
    assert reply["version"] == "1.0"
    assert reply["minimumVersion"] == "1.0"
    assert reply["supportedConnectionTypes"] == ["websocket", "long-polling"]
    assert reply["advice"] == {
        "reconnect": "retry",
        "interval": 0,
        "timeout": settings.REALTIME_DEFAULT_TIMEOUT_MS,
    }
    for handshake in (reply, other):
        assert "data" not in handshake
        assert "ack" not in handshake.get("ext", {})  # the ack extension is not implemented


async def test_supported_connection_types_are_the_intersection(world: World) -> None:
    cases: list[tuple[list[str] | None, list[str] | None]] = [
        (["long-polling"], ["long-polling"]),
        (["websocket"], ["websocket"]),
        (None, ["websocket", "long-polling"]),  # no list: the server's
        (["callback-polling", "long-polling", "smartrest-long-polling"], ["long-polling"]),
        (["long-polling", "websocket"], ["websocket", "long-polling"]),
        (["callback-polling"], None),  # only unknown types: refused
        (["smartrest-long-polling", "x"], None),
        ([], None),
    ]
    async with WsBayeux() as ws:
        for requested, expected in cases:
            [reply] = await ws.request([handshake_message("reader", types=requested)])
            assert reply["channel"] == "/meta/handshake"
            assert reply["id"] == "1"
            if expected is None:
                assert reply["successful"] is False, (requested, reply)
                assert reply["error"] == "400::Unsupported connection types"
                assert "clientId" not in reply
            else:
                assert reply["successful"] is True, (requested, reply)
                assert reply["supportedConnectionTypes"] == expected, requested


async def test_handshake_advice_becomes_the_session_default(world: World) -> None:
    async with WsBayeux() as ws:
        handshake = await ws.handshake("reader", advice={"timeout": 300, "interval": 250})
        [first] = await ws.request([ws.connect_message()])
        started = time.monotonic()
        await ws.send([ws.connect_message()])  # no advice: held for the session's 300 ms
        assert await ws.nothing(0.15)
        [held] = await ws.frame()
        elapsed = time.monotonic() - started

    assert handshake["advice"] == {"reconnect": "retry", "interval": 250, "timeout": 300}
    assert first["successful"] is True
    assert first["advice"] == {"reconnect": "retry", "interval": 250, "timeout": 300}
    assert held["channel"] == "/meta/connect"
    assert held["successful"] is True
    assert held["advice"] == {"reconnect": "retry", "interval": 250, "timeout": 300}
    assert 0.3 <= elapsed < 30, elapsed


# --- subscriptions ---------------------------------------------------------------------------------


async def test_subscription_forms(world: World) -> None:
    """An array of strings, `/operations/**` as `/operations/*`, subscribing twice, and both a
    channel and its wildcard: each event once."""
    channels = [f"/operations/{world.device.pk}", f"/operations/{world.agent.pk}"]
    async with WsBayeux() as array, WsBayeux() as stars:
        await array.start("reader")
        await stars.start("reader")
        as_array = await array.subscribe(channels)
        double_star = await stars.subscribe("/operations/**")
        again = [await stars.subscribe(channels[0]), await stars.subscribe(channels[0])]
        first = await create_operation(world.device)
        second = await create_operation(world.agent)
        to_array = await array.connect_now()
        to_stars = await stars.connect_now()

    assert as_array["successful"] is True, as_array
    assert as_array["subscription"] == channels
    assert event_ids(to_array) == [first, second]
    assert event_channels(to_array) == channels

    assert double_star["successful"] is True, double_star
    assert double_star["subscription"] == "/operations/**"
    assert [r["successful"] for r in again] == [True, True], again
    assert event_ids(to_stars) == [first, second]  # once each, with the concrete channel
    assert event_channels(to_stars) == channels


async def test_unsubscribe(world: World) -> None:
    """Unsubscribing a channel never subscribed succeeds; after unsubscribing no more events."""
    async with WsBayeux() as ws:
        await ws.start("reader", f"/operations/{world.device.pk}", f"/operations/{world.agent.pk}")
        never = await ws.unsubscribe(f"/operations/{NOWHERE}")
        star = await ws.unsubscribe("/operations/*")
        before = await create_operation(world.device)
        assert event_ids(await ws.connect_now()) == [before]
        reply = await ws.unsubscribe(f"/operations/{world.device.pk}")
        await create_operation(world.device)  # no longer subscribed
        still = await create_operation(world.agent)
        received = await ws.connect_now()

    for unsubscribed in (never, star, reply):
        assert unsubscribed["successful"] is True, unsubscribed
        assert unsubscribed["clientId"] == ws.client_id
    assert never["subscription"] == f"/operations/{NOWHERE}"
    assert event_ids(received) == [still]


# --- who may subscribe (auth.md §7) ----------------------------------------------------------------

PERMISSIONS = [
    (REALTIME, "reader", "/operations/*", True),
    (REALTIME, "alice", "/operations/*", False),  # owning devices does not cover all of them
    (REALTIME, "nobody", "/operations/*", False),
    (REALTIME, "nobody", "/operations/**", False),
    (REALTIME, "reader", "/operations/{device}", True),
    (REALTIME, "alice", "/operations/{device}", True),  # the owner rule
    (REALTIME, "bob", "/operations/{device}", False),  # another owner's device
    (REALTIME, "nobody", "/operations/{device}", False),
    (REALTIME, "reader", "/operations/{nowhere}", True),  # not existing (yet): the role may
    (REALTIME, "alice", "/operations/{nowhere}", False),  # ... no owner rule without an owner
    (AGENT, "reader", "/{agent}", True),
    (AGENT, "alice", "/{agent}", True),
    (AGENT, "bob", "/{agent}", False),
    (AGENT, "reader", "/{nowhere}", True),
    (AGENT, "alice", "/{nowhere}", False),
]


async def test_subscription_permissions(world: World) -> None:
    ids = {"device": world.device.pk, "agent": world.agent.pk, "nowhere": NOWHERE}
    sockets = {path: WsBayeux(path) for path in (REALTIME, AGENT)}
    outcomes = []
    for ws in sockets.values():
        await ws.__aenter__()
    try:
        for path, username, pattern, allowed in PERMISSIONS:
            ws = sockets[path]
            await ws.handshake(username)
            channel = pattern.format(**ids)
            reply = await ws.subscribe(channel)
            outcomes.append((path, username, channel, allowed, reply))
    finally:
        for ws in sockets.values():
            await ws.close()

    for path, username, channel, allowed, reply in outcomes:
        case = (path, username, channel, reply)
        assert reply["channel"] == "/meta/subscribe", case
        assert reply["subscription"] == channel, case
        assert reply["successful"] is allowed, case
        if not allowed:
            assert reply["error"] == "403::Subscription denied", case


async def test_a_denied_subscription_never_delivers(world: World) -> None:
    """bob may watch his own device but not alice's: her event must not reach him, though he holds
    a connect when it happens; his own later event is the first thing he gets."""
    async with WsBayeux() as ws:
        await ws.start("bob", f"/operations/{world.other.pk}")
        denied = await ws.subscribe(f"/operations/{world.device.pk}")
        also_denied = await ws.subscribe([f"/operations/{world.other.pk}", "/operations/*"])
        await ws.send([ws.connect_message(timeout=3000)])
        await create_operation(world.device)  # alice's device: not for bob
        mine = await create_operation(world.other)
        # A slow machine may answer the held connect (3 s) in the same frame or first: only the
        # data messages matter here.
        data = [m for m in await ws.frame() if not m["channel"].startswith("/meta/")]
        if not data:  # the connect was answered empty first: the event waits for the next one
            await ws.send([ws.connect_message(timeout=3000)])
            data = [m for m in await ws.frame() if not m["channel"].startswith("/meta/")]
        [pushed] = data

    assert denied["error"] == "403::Subscription denied"
    assert also_denied["error"] == "403::Subscription denied"
    assert pushed["channel"] == f"/operations/{world.other.pk}"
    assert pushed["data"]["data"]["id"] == mine


async def test_agent_channel_delivers_the_bare_operation(world: World) -> None:
    async with WsBayeux(AGENT) as ws:
        await ws.start("alice", f"/{world.agent.pk}")
        operation = await create_operation(world.agent)
        received = await ws.connect_now()

    [event] = [m for m in received if m["channel"] == f"/{world.agent.pk}"]
    assert event["data"]["id"] == operation
    assert event["data"]["self"] == f"http://testserver/devicecontrol/operations/{operation}"
    assert "realtimeAction" not in event["data"]


# --- holding a connect on a socket (§6.2, §6.3) ----------------------------------------------------


async def test_events_are_pushed_in_their_own_frames_while_the_connect_is_held(
    world: World,
) -> None:
    async with WsBayeux() as ws:
        await ws.start("reader", f"/operations/{world.device.pk}")
        # Held long enough for two operations to be created during the hold on a loaded machine.
        connect = ws.connect_message(timeout=5000)
        started = time.monotonic()
        await ws.send([connect])
        assert await ws.nothing(0.1)  # held: nothing is queued
        first = await create_operation(world.device)
        pushed = await ws.frame()
        second = await create_operation(world.device)
        pushed_again = await ws.frame()
        [reply] = await ws.frame()
        ended = time.monotonic() - started

    assert event_ids(pushed) == [first]
    assert [m["channel"] for m in pushed] == [f"/operations/{world.device.pk}"]  # no connect reply
    assert event_ids(pushed_again) == [second]
    assert reply["channel"] == "/meta/connect"
    assert reply["id"] == connect["id"]
    assert reply["successful"] is True
    assert reply["advice"]["timeout"] == 5000
    assert 5 <= ended < 30, ended  # when the hold ended, not when the events came


async def test_a_newer_connect_answers_the_held_one_at_once(world: World) -> None:
    async with WsBayeux() as ws:
        await ws.start("reader", f"/operations/{world.device.pk}")
        older = ws.connect_message(timeout=60_000)
        await ws.send([older])
        assert await ws.nothing(0.1)
        newer = ws.connect_message(timeout=5000)  # outlasts the operation's creation when loaded
        started = time.monotonic()
        await ws.send([newer])
        [older_reply] = await ws.frame()
        older_after = time.monotonic() - started
        operation = await create_operation(world.device)
        pushed = await ws.frame()
        [newer_reply] = await ws.frame()

    assert older_reply["id"] == older["id"]
    assert older_reply["successful"] is True
    assert older_after < 30, older_after  # not after its own 60 s
    assert event_ids(pushed) == [operation]  # the newer connect holds the session now
    assert newer_reply["id"] == newer["id"]
    assert newer_reply["successful"] is True


async def test_disconnect_answers_the_held_connect(world: World) -> None:
    async with WsBayeux() as ws:
        await ws.start("reader", f"/operations/{world.device.pk}")
        held = ws.connect_message(timeout=60_000)
        await ws.send([held])
        assert await ws.nothing(0.1)
        started = time.monotonic()
        frames = [await ws.request([ws.message("/meta/disconnect")]), await ws.frame()]
        elapsed = time.monotonic() - started
        after = await ws.connect_now()

    replies = {reply["channel"]: reply for frame in frames for reply in frame}
    assert set(replies) == {"/meta/disconnect", "/meta/connect"}, frames
    assert replies["/meta/disconnect"]["successful"] is True
    connect = replies["/meta/connect"]
    assert connect["id"] == held["id"]
    # as CometD answers it: the held connect ends normally and tells the client to stop
    assert connect["successful"] is True, connect
    assert connect["advice"]["reconnect"] == "none", connect
    assert elapsed < 30, elapsed  # not after its 60 s
    # the session is gone
    assert after[-1]["error"] == "402::Unknown client"


async def test_a_session_moves_between_transports(world: World) -> None:
    """A closed socket leaves its session to long-polling within maxInterval, and a session
    handshaken over long-polling continues over a WebSocket (aiocometd's way, realtime.md §3)."""
    async with WsBayeux() as ws:
        cid = await ws.start("reader", f"/operations/{world.device.pk}")
        await ws.send([ws.connect_message(timeout=10_000)])  # held when the socket closes
        assert await ws.nothing(0.05)
    queued = await create_operation(world.device)  # while no transport is there
    lp = LpBayeux()
    lp.client_id = cid
    over_http = await lp.connect_now()

    async with WsBayeux() as again:
        again.client_id = cid
        await again.send([again.connect_message(timeout=3000)])
        pushed_operation = await create_operation(world.device)
        pushed = await again.frame()

    assert event_ids(over_http) == [queued]
    assert over_http[-1]["successful"] is True
    assert over_http[-1]["clientId"] == cid
    assert event_ids(pushed) == [pushed_operation]


# --- sessions: per-user limit, expiry --------------------------------------------------------------


async def test_the_oldest_session_of_a_user_is_evicted_beyond_the_limit(
    world: World, settings: Any
) -> None:
    settings.REALTIME_SESSIONS_PER_USER = 2
    async with WsBayeux() as other_user, WsBayeux(AGENT) as agent_family:
        await other_user.start("alice")
        await agent_family.start("reader")  # the limit counts per endpoint family
        sockets = [WsBayeux(), WsBayeux(), WsBayeux()]
        for ws in sockets:
            await ws.__aenter__()
            await ws.start("reader")
        try:
            replies = [(await ws.connect_now())[-1] for ws in sockets]
        finally:
            for ws in sockets:
                await ws.close()
        survivors = [(await other_user.connect_now())[-1], (await agent_family.connect_now())[-1]]

    oldest, second, third = replies
    assert oldest["successful"] is False
    assert oldest["error"] == "402::Unknown client"
    assert oldest["advice"]["reconnect"] == "handshake"
    assert second["successful"] is True
    assert third["successful"] is True
    assert [r["successful"] for r in survivors] == [True, True]


async def test_a_session_without_connects_expires_and_the_sweep_drops_its_subscriptions(
    world: World, settings: Any
) -> None:
    settings.REALTIME_MAX_INTERVAL_MS = 200
    settings.REALTIME_SWEEP_SECONDS = 3600  # only the explicit sweep below runs
    channel = f"/operations/{world.device.pk}"
    store = get_store()
    assert isinstance(store, RedisStore)
    index = redis.Redis.from_url(settings.REDIS_URL)
    index_key = f"{settings.REALTIME_PREFIX}:c:{channel}"
    async with WsBayeux() as idle, WsBayeux() as active:
        await idle.handshake("reader")
        await idle.subscribed(channel)
        await active.start("reader", channel)
        await active.send([active.connect_message(timeout=60_000)])  # held: alive meanwhile
        cid = idle.client_id
        assert await store.subscriptions(cid) == {channel}
        assert cid.encode() in index.smembers(index_key)

        await asyncio.sleep(0.35)  # past interval + maxInterval without a connect
        [expired] = await idle.request([idle.connect_message(timeout=0)])
        await store.sweep()
        members = index.smembers(index_key)
        operation = await create_operation(world.device)
        pushed = await active.frame()
    index.close()

    assert expired["successful"] is False
    assert expired["error"] == "402::Unknown client"
    assert expired["advice"] == {"reconnect": "handshake", "interval": 0}
    assert await store.subscriptions(cid) == set()
    assert cid.encode() not in members
    assert active.client_id.encode() in members
    assert event_ids(pushed) == [operation]


# --- the embedded default -------------------------------------------------------------------------


async def test_the_in_process_store_speaks_the_same_protocol(world: World, settings: Any) -> None:
    settings.REDIS_URL = ""
    assert isinstance(get_store(), MemoryStore)
    async with WsBayeux() as ws:
        handshake = await ws.handshake("reader")
        subscribe = await ws.subscribe(f"/operations/{world.device.pk}")
        [first] = await ws.request([ws.connect_message()])
        connect = ws.connect_message(timeout=5000)  # outlasts the operation's creation when loaded
        await ws.send([connect])
        assert await ws.nothing(0.05)
        operation = await create_operation(world.device)
        pushed = await ws.frame()
        [reply] = await ws.frame()
        [unknown] = await ws.request(
            [{"channel": "/meta/connect", "clientId": "nosuchclient", "id": "9"}]
        )

    assert handshake["successful"] is True
    assert subscribe["successful"] is True
    assert first["successful"] is True
    assert event_ids(pushed) == [operation]
    assert pushed[0]["data"]["realtimeAction"] == "CREATE"
    assert reply["id"] == connect["id"]
    assert reply["successful"] is True
    assert unknown["error"] == "402::Unknown client"
