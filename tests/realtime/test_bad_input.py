"""Bad input on both transports (realtime.md §2, §4): what is not JSON, not a message, not for
this endpoint, not allowed, too large or too much. Each case is answered (never a crash or a
hang), a socket stays usable, and a bystander session keeps receiving its events."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import pytest_asyncio

from tests.helpers import PASSWORD, assert_error, basic
from tests.realtime.bayeux import (
    AGENT,
    REALTIME,
    LpBayeux,
    World,
    WsBayeux,
    create_operation,
    event_ids,
    handshake_message,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.asyncio,
]


class Bystander:
    """A long-polling session of `reader` on the operations of `world.other` (which the tests leave
    alone), opened before the bad input; `assert_unaffected` proves it still gets exactly the next
    event."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.lp = LpBayeux()

    async def open(self) -> Bystander:
        await self.lp.start("reader", f"/operations/{self.world.other.pk}")
        return self

    async def assert_unaffected(self) -> None:
        operation = await create_operation(self.world.other)
        received = await self.lp.connect_now()
        assert received[-1]["successful"] is True, received
        assert event_ids(received) == [operation]


@pytest_asyncio.fixture
async def bystander(world: World) -> Bystander:
    return await Bystander(world).open()


def invalid_message(reply: dict[str, Any]) -> None:
    assert reply["successful"] is False, reply
    assert reply["error"] == "400::Invalid message", reply


# --- not JSON, not messages -------------------------------------------------------------------------

NOT_JSON = ["not json", "{", '[{"channel": "/meta/handshake"', "[1,]", "{'single': 'quotes'}"]
NOT_MESSAGES = ["42", '"/meta/handshake"', "null", "true", "1.5"]


async def test_websocket_frames_that_are_not_json_or_not_messages(
    world: World, bystander: Bystander
) -> None:
    async with WsBayeux() as ws:
        not_json = [await ws.request(frame) for frame in NOT_JSON]
        not_messages = [await ws.request(frame) for frame in NOT_MESSAGES]
        # the socket is still usable
        usable = await ws.start("reader", f"/operations/{world.device.pk}")

    assert not_json == [[{"successful": False, "error": "400::Invalid JSON"}]] * len(NOT_JSON)
    for [reply] in not_messages:
        invalid_message(reply)
    assert usable
    await bystander.assert_unaffected()


async def test_long_polling_bodies_that_are_not_json_or_not_messages(
    world: World, bystander: Bystander
) -> None:
    lp = LpBayeux()
    for body in [*NOT_JSON, *NOT_MESSAGES, ""]:
        response = await lp.post(body)
        assert_error(response, 400, "general/badRequest")

    await bystander.assert_unaffected()


async def test_members_that_are_not_messages_are_refused_and_the_others_answered(
    world: World, bystander: Bystander
) -> None:
    batch = [
        42,
        "text",
        None,
        [],
        {"id": "no-channel"},
        {"channel": 5, "id": 6},
        handshake_message("reader", id="hs"),
        {"channel": "/meta/handshake", "id": "denied"},  # no credentials
    ]
    async with WsBayeux() as ws:
        over_ws = await ws.request(batch)
    over_lp = await LpBayeux().request(batch)

    for replies in (over_ws, over_lp):
        assert len(replies) == len(batch), replies
        for reply in replies[:6]:
            invalid_message(reply)
        assert replies[4]["id"] == "no-channel"
        assert replies[5]["id"] == 6
        assert "channel" not in replies[5]  # not a channel: not echoed
        assert replies[6]["id"] == "hs"
        assert replies[6]["successful"] is True
        assert replies[7]["error"] == "403::Handshake denied"
    assert over_ws[6]["clientId"] != over_lp[6]["clientId"]
    # an empty batch: nothing to answer
    assert await LpBayeux().request([]) == []
    async with WsBayeux() as ws:
        await ws.send([])
        assert await ws.nothing(0.05)
        assert (await ws.handshake("reader"))["successful"] is True
    await bystander.assert_unaffected()


# --- channels: meta, publishing, families ---------------------------------------------------------


async def test_unknown_meta_channels_and_publishing(world: World, bystander: Bystander) -> None:
    async with WsBayeux() as ws:
        await ws.start("reader")
        messages = [
            ws.message("/meta/foo"),
            ws.message("/meta/"),
            ws.message("/meta/connect/x"),
            ws.message(f"/operations/{world.device.pk}", data={"c8y_Restart": {}}),
            ws.message("/operations/*", data={}),
            ws.message("/some/channel", data="x", clientId="bogus"),
        ]
        replies = await ws.request(messages)
        [without_session] = await LpBayeux().request(
            [{"channel": "/operations/1", "id": 1, "data": {}}]
        )

    assert len(replies) == len(messages)
    for message, reply in zip(messages, replies, strict=True):
        assert reply["channel"] == message["channel"]
        assert reply["id"] == message["id"]
        assert reply["successful"] is False
    assert [r["error"] for r in replies[:3]] == ["400::Unknown meta channel"] * 3
    assert [r["error"] for r in replies[3:]] == ["403::Publish denied"] * 3
    assert without_session["error"] == "403::Publish denied"
    assert without_session["id"] == 1
    await bystander.assert_unaffected()


INVALID_CHANNELS: list[tuple[str, Any]] = [
    (REALTIME, "/{agent}"),  # the agent family's channel on the realtime endpoint
    (REALTIME, "/4711"),
    (AGENT, "/operations/{device}"),  # and the other way round
    (AGENT, "/operations/*"),
    (REALTIME, "/alarms/*"),
    (REALTIME, "/events/*"),
    (REALTIME, "/measurements/*"),
    (REALTIME, "/managedobjects/abc"),
    (REALTIME, "/operations/abc"),
    (REALTIME, "/operations/0"),
    (REALTIME, "/operations/{device}/x"),
    (REALTIME, "/operations"),
    (REALTIME, "/meta/connect"),
    (REALTIME, ""),
    (REALTIME, 4711),
    (REALTIME, None),
    (REALTIME, {"channel": "/operations/*"}),
    (REALTIME, []),
    (REALTIME, ["/operations/*", 5]),
    (REALTIME, ["/operations/*", "/alarms/*"]),  # all or nothing
    (AGENT, "/{agent}/x"),
    (AGENT, "*"),
]


async def test_channels_that_do_not_exist_on_the_endpoint(
    world: World, bystander: Bystander
) -> None:
    ids = {"device": world.device.pk, "agent": world.agent.pk}
    sockets = {path: WsBayeux(path) for path in (REALTIME, AGENT)}
    outcomes = []
    for ws in sockets.values():
        await ws.__aenter__()
        await ws.start("reader")  # the role would allow every valid channel
    try:
        for path, channel in INVALID_CHANNELS:
            if isinstance(channel, str):
                channel = channel.format(**ids)
            outcomes.append((path, channel, await sockets[path].subscribe(channel)))
        # none of the refused ones was subscribed: the star of the array is not delivered
        await create_operation(world.device)
        leftovers = await sockets[REALTIME].connect_now()
    finally:
        for ws in sockets.values():
            await ws.close()

    for path, channel, reply in outcomes:
        case = (path, channel, reply)
        assert reply["channel"] == "/meta/subscribe", case
        assert reply["successful"] is False, case
        assert reply["error"] == "400::Invalid channel", case
        assert reply["subscription"] == channel, case  # echoed on failure too
    assert event_ids(leftovers) == []
    await bystander.assert_unaffected()


# --- sessions that do not exist ------------------------------------------------------------------


def session_messages(client_id: Any) -> list[dict[str, Any]]:
    """subscribe, unsubscribe, disconnect and connect for `client_id` (left out when ...)."""
    session = {} if client_id is ... else {"clientId": client_id}
    return [
        {"channel": "/meta/subscribe", "id": "s", "subscription": "/operations/*", **session},
        {"channel": "/meta/unsubscribe", "id": "u", "subscription": "/operations/*", **session},
        {"channel": "/meta/disconnect", "id": "d", **session},
        {"channel": "/meta/connect", "id": "c", "connectionType": "websocket", **session},
    ]


def unknown_client(reply: dict[str, Any], message: dict[str, Any]) -> None:
    assert reply["channel"] == message["channel"], reply
    assert reply["id"] == message["id"], reply
    assert reply["successful"] is False, reply
    assert reply["error"] == "402::Unknown client", reply
    assert reply["advice"]["reconnect"] == "handshake", reply
    if "subscription" in message:
        assert reply["subscription"] == message["subscription"], reply


async def test_messages_without_a_session_get_unknown_client(
    world: World, bystander: Bystander
) -> None:
    """Before any handshake (no clientId) or with one the server never issued."""
    for client_id in (..., "", "nosuchclient0000000000000000000", 42, None):
        async with WsBayeux() as ws:
            for message in session_messages(client_id):
                unknown_client(*(await ws.request([message])), message)
            # a batch: the connect is answered after the others (in its own frame)
            batch = session_messages(client_id)
            replies = await ws.request(batch)
            if len(replies) < len(batch):
                replies += await ws.frame()
        for message, reply in zip(batch, replies, strict=True):
            unknown_client(reply, message)
        lp_replies = await LpBayeux().request(session_messages(client_id))
        for message, reply in zip(session_messages(client_id), lp_replies, strict=True):
            unknown_client(reply, message)
    await bystander.assert_unaffected()


async def test_another_users_client_id_is_a_session_not_a_credential(
    world: World, bystander: Bystander
) -> None:
    """A subscribe carrying bob's clientId is bob's request: his rights, not the reader's whose
    header comes along (credentials count only at the handshake)."""
    bob = LpBayeux()
    await bob.start("bob")
    as_reader = LpBayeux(Authorization=basic("t100/reader"))
    as_reader.client_id = bob.client_id
    reply = await as_reader.subscribe("/operations/*")

    assert reply["error"] == "403::Subscription denied"
    await bystander.assert_unaffected()


# --- too large, too many ---------------------------------------------------------------------------


async def test_a_websocket_frame_over_the_limit(
    world: World, bystander: Bystander, settings: Any
) -> None:
    settings.REALTIME_MAX_MESSAGE_BYTES = 2000

    def frame_of(size: int) -> str:
        message = handshake_message("reader", pad="")
        message["pad"] = "x" * (size - len(json.dumps([message])))
        frame = json.dumps([message])
        assert len(frame.encode()) == size
        return frame

    async with WsBayeux() as ws:
        [too_large] = await ws.request(frame_of(2001))
        [at_the_limit] = await ws.request(frame_of(2000))
        [far_too_large] = await ws.request("[" + " " * 100_000 + "]")
        usable = await ws.start("reader")

    assert too_large == {"successful": False, "error": "413::Message too large"}
    assert far_too_large == too_large
    assert at_the_limit["successful"] is True
    assert usable
    await bystander.assert_unaffected()


async def test_a_long_polling_body_over_the_limit(
    world: World, bystander: Bystander, settings: Any
) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2000  # MAX_REQUEST_BODY_BYTES
    body = json.dumps([handshake_message("reader", pad="x" * 2000)])
    response = await LpBayeux().post(body)

    assert_error(response, 413)
    await bystander.assert_unaffected()


async def test_a_flood_of_connects_for_one_session(world: World, bystander: Bystander) -> None:
    """50 concurrent long-polling connects: each newer one answers the one before, all succeed,
    and the next event reaches the session exactly once."""
    lp = LpBayeux()
    await lp.start("reader", f"/operations/{world.device.pk}")
    connects = [lp.connect_message(timeout=3000) for _ in range(50)]
    tasks = [asyncio.create_task(lp.request([message])) for message in connects]
    for answered, next_done in enumerate(asyncio.as_completed(tasks), start=1):
        await next_done
        if answered == len(tasks) - 1:
            break  # every older connect was answered: one may still hold the session
    operation = await create_operation(world.device)
    responses = await asyncio.gather(*tasks)
    received = [m for response in responses for m in response]
    if operation not in event_ids(received):  # the store had no connect held for it
        received += await lp.connect_now()
    afterwards = await lp.connect_now()

    replies = [m for m in received if m["channel"] == "/meta/connect"]
    assert len(replies) >= len(connects)
    assert all(r["successful"] is True for r in replies), replies
    assert {r["id"] for r in replies} >= {m["id"] for m in connects}
    assert event_ids(received) == [operation]
    assert event_ids(afterwards) == []
    await bystander.assert_unaffected()


async def test_a_flood_of_connects_on_one_socket(world: World, bystander: Bystander) -> None:
    async with WsBayeux() as ws:
        await ws.start("reader", f"/operations/{world.device.pk}")
        connects = [ws.connect_message(timeout=300) for _ in range(50)]
        for message in connects:
            await ws.send([message])
        received: list[dict[str, Any]] = []
        while len([m for m in received if m["channel"] == "/meta/connect"]) < len(connects) - 1:
            received += await ws.frame()
        operation = await create_operation(world.device)
        while len([m for m in received if m["channel"] == "/meta/connect"]) < len(connects):
            received += await ws.frame()
        if operation not in event_ids(received):
            received += await ws.connect_now()
        afterwards = await ws.connect_now()

    replies = [m for m in received if m["channel"] == "/meta/connect"]
    assert all(r["successful"] is True for r in replies), replies
    assert {r["id"] for r in replies} >= {m["id"] for m in connects}
    assert event_ids(received) == [operation]
    assert event_ids(afterwards) == []
    await bystander.assert_unaffected()


# --- HTTP-level refusals of the long-polling endpoint ---------------------------------------------


INVALID_AUTHORIZATION = [
    basic("t100/reader", "wrong"),
    basic("t100/nosuchuser", PASSWORD),
    "Basic !!!not-base64",
    "Basic dXNlcg==",  # no colon
    "Bearer abc.def.ghi",
    "garbage",
]


async def test_http_refusals(world: World, bystander: Bystander) -> None:
    """Only POST; a present but invalid Authorization header is refused with 401 (realtime.md §2)."""
    lp = LpBayeux()
    for method in ("get", "put", "delete"):
        response = await getattr(lp.http, method)(REALTIME)
        assert_error(response, 405)
        assert response["Allow"] == "POST"
    for authorization in INVALID_AUTHORIZATION:
        lp = LpBayeux(Authorization=authorization)
        handshake = await lp.post([handshake_message("reader")])  # even with a valid ext token
        in_session = await lp.post(
            [{"channel": "/meta/connect", "clientId": bystander.lp.client_id, "id": "1"}]
        )
        for refused in (handshake, in_session):
            assert_error(refused, 401)
            assert refused["WWW-Authenticate"].startswith("Basic"), authorization
    await bystander.assert_unaffected()


async def test_a_valid_authorization_header_is_accepted_on_every_request(
    world: World, bystander: Bystander
) -> None:
    """The Java SDK sends its Basic header with every POST (realtime.md §7)."""
    lp = LpBayeux(Authorization=basic("t100/reader"))
    await lp.start("reader", f"/operations/{world.device.pk}")
    operation = await create_operation(world.device)

    assert event_ids(await lp.connect_now()) == [operation]
    await bystander.assert_unaffected()
