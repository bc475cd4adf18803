"""The Bayeux protocol over HTTP long-polling, in process through Django's async test client
(realtime.md §2, §4, §6): URL forms, media type, the order inside a response, holding a connect,
credentials from the header, and the bounded queue."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.helpers import basic
from tests.realtime.bayeux import (
    AGENT,
    LP_CONTENT_TYPE,
    REALTIME,
    LpBayeux,
    World,
    create_operation,
    event_ids,
    handshake_message,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.asyncio,
]


async def test_message_type_suffixes_and_trailing_slash_are_the_same_endpoint(
    world: World,
) -> None:
    lp = LpBayeux()
    [handshake] = await lp.request(
        [handshake_message("reader", types=["long-polling"])], path=f"{REALTIME}/handshake"
    )
    lp.client_id = handshake["clientId"]
    channel = f"/operations/{world.device.pk}"
    [subscribe] = await lp.request(
        [lp.message("/meta/subscribe", subscription=channel)], path=f"{REALTIME}/subscribe/"
    )
    [first] = await lp.request([lp.connect_message()], path=f"{REALTIME}/connect")
    operation = await create_operation(world.device)
    # the legacy alias of the same family, with a trailing slash
    received = await lp.request([lp.connect_message(timeout=0)], path="/cep/realtime/")
    [unsubscribe] = await lp.request(
        [lp.message("/meta/unsubscribe", subscription=channel)], path=f"{REALTIME}/unsubscribe"
    )
    [disconnect] = await lp.request(
        [lp.message("/meta/disconnect")], path=f"{REALTIME}/disconnect/"
    )
    agent = LpBayeux("/devicecontrol/notifications/handshake/")
    [agent_handshake] = await agent.request([handshake_message("reader")])
    agent.client_id = agent_handshake["clientId"]
    agent_subscribe = await agent.subscribe(f"/{world.agent.pk}")

    assert handshake["successful"] is True
    assert handshake["supportedConnectionTypes"] == ["long-polling"]
    for reply in (subscribe, first, received[-1], unsubscribe, disconnect, agent_subscribe):
        assert reply["successful"] is True, reply
    assert event_ids(received) == [operation]
    # a realtime endpoint URL suffix does not change the family
    assert agent_subscribe["subscription"] == f"/{world.agent.pk}"


async def test_content_type_length_and_a_single_object(world: World) -> None:
    lp = LpBayeux()
    response = await lp.post([handshake_message("reader")])
    single = await lp.request(handshake_message("reader", id=5))  # not in an array

    assert response.status_code == 200
    assert response["Content-Type"] == LP_CONTENT_TYPE
    assert int(response["Content-Length"]) == len(response.content)
    assert response.json()[0]["successful"] is True
    assert len(single) == 1
    assert single[0]["id"] == 5
    assert single[0]["successful"] is True


async def test_replies_then_events_then_the_connect_reply(world: World) -> None:
    lp = LpBayeux()
    await lp.start("reader", f"/operations/{world.device.pk}")
    first = await create_operation(world.device)
    second = await create_operation(world.device)
    connect = lp.connect_message(timeout=60_000)  # first in the request, last in the answer
    subscribe = lp.message("/meta/subscribe", subscription=f"/operations/{world.agent.pk}")
    unsubscribe = lp.message("/meta/unsubscribe", subscription=f"/operations/{world.other.pk}")
    started = time.monotonic()
    body = await lp.request([connect, subscribe, unsubscribe])
    elapsed = time.monotonic() - started

    assert [m["channel"] for m in body] == [
        "/meta/subscribe",
        "/meta/unsubscribe",
        f"/operations/{world.device.pk}",
        f"/operations/{world.device.pk}",
        "/meta/connect",
    ]
    assert [body[0]["id"], body[1]["id"], body[-1]["id"]] == [
        subscribe["id"],
        unsubscribe["id"],
        connect["id"],
    ]
    assert event_ids(body) == [first, second]
    assert all(m["successful"] is True for m in body if m["channel"].startswith("/meta/"))
    assert elapsed < 30  # more than a single connect: not held for its 60 s (§6.2)
    # the events were delivered: the queue is empty now
    assert event_ids(await lp.connect_now()) == []


async def test_a_held_connect_ends_with_the_first_event_or_its_timeout(world: World) -> None:
    lp = LpBayeux()
    await lp.start("reader", f"/operations/{world.device.pk}")

    started = time.monotonic()
    waiting = asyncio.create_task(lp.request([lp.connect_message(timeout=60_000)]))
    done, _ = await asyncio.wait({waiting}, timeout=0.2)
    assert not done  # held: nothing queued
    operation = await create_operation(world.device)
    woken = await waiting
    woken_after = time.monotonic() - started

    started = time.monotonic()
    timed_out = await lp.request([lp.connect_message(timeout=300)])
    timed_out_after = time.monotonic() - started

    assert event_ids(woken) == [operation]
    assert woken[-1]["channel"] == "/meta/connect"
    assert woken[-1]["successful"] is True
    assert woken[-1]["advice"] == {"reconnect": "retry", "interval": 0, "timeout": 60_000}
    assert woken_after < 30, woken_after  # woken, not timed out after 60 s
    assert [m["channel"] for m in timed_out] == ["/meta/connect"]
    assert timed_out[0]["successful"] is True
    assert timed_out[0]["advice"]["timeout"] == 300
    assert 0.3 <= timed_out_after < 30, timed_out_after


async def test_handshake_credentials_from_the_authorization_header(world: World) -> None:
    with_header = LpBayeux(Authorization=basic("t100/reader"))
    [by_header] = await with_header.request([handshake_message(None)])
    with_header.client_id = by_header["clientId"]
    # later requests need no header (aiocometd sends none)
    without_header = LpBayeux()
    without_header.client_id = by_header["clientId"]
    subscribe = await without_header.subscribe("/operations/*")
    [anonymous] = await LpBayeux().request([handshake_message(None, id=3)])
    [wrong_token] = await LpBayeux().request(
        [
            handshake_message(
                None, ext={"com.cumulocity.authn": {"token": "dDEwMC9yZWFkZXI6bm9wZQ=="}}
            )
        ]
    )
    # the ext token wins over a valid header of another user
    as_alice = LpBayeux(Authorization=basic("alice"))
    [by_token] = await as_alice.request([handshake_message("reader")])
    as_alice.client_id = by_token["clientId"]
    star = await as_alice.subscribe("/operations/*")

    assert by_header["successful"] is True, by_header
    assert subscribe["successful"] is True, subscribe
    for refused in (anonymous, wrong_token):
        assert refused["successful"] is False
        assert refused["error"] == "403::Handshake denied"
        assert refused["advice"] == {"reconnect": "none"}
        assert "clientId" not in refused
    assert anonymous["id"] == 3
    assert star["successful"] is True, star  # reader's role, not alice's


async def test_the_queue_keeps_the_newest_events(world: World, settings: Any) -> None:
    settings.REALTIME_QUEUE_LIMIT = 3
    lp = LpBayeux(AGENT)
    await lp.start("alice", f"/{world.agent.pk}")
    created = [await create_operation(world.agent) for _ in range(5)]
    received = await lp.connect_now()

    assert [m["data"]["id"] for m in received[:-1]] == created[2:]
    assert received[-1]["successful"] is True
