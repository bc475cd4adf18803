"""The realtime endpoints end to end (realtime.md §10): the real CometD client `aiocometd-ng`
against a real uvicorn server, over long-polling and over WebSocket (aiocometd handshakes over
HTTP, then connects over a WebSocket with the clientId it got). Operations are created, updated and
deleted through the server's REST API, so every event comes from its on-commit path. Where the
client hides what is checked (held connects, 402 replies, HTTP statuses) the messages are sent by
hand."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiocometd_ng import Client, ConnectionType
from aiocometd_ng.exceptions import ServerError
from aiocometd_ng.extensions import Extension

from deviceplatform.roles import Role
from inventory import services as inventory_services
from inventory.models import Relation
from tests.helpers import PASSWORD, basic
from tests.realtime.conftest import (
    JSON_TYPE,
    LongPolling,
    Rest,
    Server,
    Socket,
    http_session,
    next_message,
    token,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.asyncio,
    # aiocometd-ng's own ws_connect call, on newer aiohttp
    pytest.mark.filterwarnings("ignore:float parameter 'receive_timeout':DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning"),
]

TRANSPORTS = [
    pytest.param(ConnectionType.LONG_POLLING, id="long-polling"),
    pytest.param(ConnectionType.WEBSOCKET, id="websocket"),
]
REALTIME = "/notification/realtime"
AGENT = "/notification/operations"

# Logins as c8y clients send them. The devices belong to OWNER, who holds no device-control role.
ADMIN = "t100/rt_admin"
OWNER = "t100/rt_owner"
NOBODY = "t100/rt_nobody"


@dataclass(frozen=True)
class World:
    """Agent A -childDevices-> C -childDevices-> G, and a second child device O of A."""

    agent: int
    child: int
    grandchild: int
    other: int


@pytest.fixture
def world(make_user: Callable[..., Any]) -> World:
    make_user("rt_admin", [Role.DEVICE_CONTROL_ADMIN, Role.INVENTORY_ADMIN])
    make_user("rt_owner", [Role.INVENTORY_CREATE])
    make_user("rt_nobody")

    def device(name: str, **fragments: Any) -> Any:
        return inventory_services.managed_object_create(
            owner="rt_owner", data={"name": name, "c8y_IsDevice": {}, **fragments}
        )

    agent = device("Agent A", com_cumulocity_model_Agent={})
    child, grandchild, other = device("Device C"), device("Sensor G"), device("Device O")
    for parent, children in ((agent, [child, other]), (child, [grandchild])):
        inventory_services.managed_object_add_children(
            parent=parent, relation=Relation.DEVICE, children=children
        )
    return World(agent.pk, child.pk, grandchild.pk, other.pk)


class CumulocityAuth(Extension):
    """Credentials the way Cumulocity clients send them: the `ext` token in the handshake, or
    (`header=True`) a Basic `Authorization` header on every request and on the upgrade."""

    def __init__(self, login: str, password: str = PASSWORD, *, header: bool = False) -> None:
        self.login = login
        self.password = password
        self.header = header

    async def outgoing(self, payload: list[dict[str, Any]], headers: dict[str, str]) -> None:
        if self.header:
            headers["Authorization"] = basic(self.login, self.password)
            return
        for message in payload:
            if message["channel"] == "/meta/handshake":
                authn = {"token": token(self.login, self.password)}
                message.setdefault("ext", {})["com.cumulocity.authn"] = authn

    async def incoming(self, payload: Any, headers: Any = None) -> None:
        return None


class ConnectLog(Extension):
    """What went through `/meta/connect`: the connection types sent, the replies received."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.replies: list[dict[str, Any]] = []

    async def outgoing(self, payload: list[dict[str, Any]], headers: dict[str, str]) -> None:
        self.sent += [m["connectionType"] for m in payload if m["channel"] == "/meta/connect"]

    async def incoming(self, payload: Any, headers: Any = None) -> None:
        self.replies += [m for m in payload if m.get("channel") == "/meta/connect"]


class CometD(Client):
    _HTTP_SESSION_CLOSE_TIMEOUT = 0  # the 250 ms grace is for TLS; these servers speak plain HTTP


def cometd(
    server: Server,
    path: str,
    login: str,
    transport: ConnectionType | None,
    *,
    password: str = PASSWORD,
    header: bool = False,
    extensions: tuple[Extension, ...] = (),
) -> CometD:
    return CometD(
        server.url + path,
        transport,
        extensions=[CumulocityAuth(login, password, header=header), *extensions],
    )


def assert_event(message: dict[str, Any], channel: str, data: Any) -> None:
    """An event message: the channel and data, an optional counter, nothing else."""
    assert message["channel"] == channel, message
    assert message["data"] == data, message
    assert set(message) <= {"channel", "data", "id"}, message


# --- operations on the realtime family -----------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_create_update_delete_reach_the_device_channel(
    server: Server, world: World, transport: ConnectionType
) -> None:
    """Over both paths of the realtime family: `/cep/realtime` is the legacy alias."""
    channel = f"/operations/{world.child}"
    async with (
        http_session(ADMIN) as http,
        cometd(server, REALTIME, ADMIN, transport) as current,
        cometd(server, "/cep/realtime", ADMIN, transport) as legacy,
    ):
        clients = (current, legacy)
        for client in clients:
            assert client.connection_type is transport
            await client.subscribe(channel)
        rest = Rest(http, server)

        created = await rest.create_operation(world.child)
        fetched = await rest.get_operation(created["id"])
        assert fetched["self"] == f"{server.url}/devicecontrol/operations/{created['id']}"
        assert fetched["status"] == "PENDING"
        for client in clients:
            message = await next_message(client)
            assert_event(message, channel, {"realtimeAction": "CREATE", "data": fetched})

        await rest.update_operation(created["id"], {"status": "EXECUTING"})
        fetched = await rest.get_operation(created["id"])
        assert fetched["status"] == "EXECUTING"
        for client in clients:
            message = await next_message(client)
            assert_event(message, channel, {"realtimeAction": "UPDATE", "data": fetched})

        await rest.delete_operations(deviceId=str(world.child))
        assert isinstance(created["id"], str)
        for client in clients:
            message = await next_message(client)
            assert_event(message, channel, {"realtimeAction": "DELETE", "data": created["id"]})


# aiocometd gives up on a connect 1.2 x the advised timeout after sending it: a hold answered
# more than a fifth of it late loses the connection. 5 s leaves a loaded machine a second.
SHORT_HOLD_MS = 5000


class ShortHolds(Extension):
    """Asks for SHORT_HOLD_MS holds in the handshake (the session default the server advises)."""

    async def outgoing(self, payload: list[dict[str, Any]], headers: dict[str, str]) -> None:
        for message in payload:
            if message["channel"] == "/meta/handshake":
                message["advice"] = {"timeout": SHORT_HOLD_MS, "interval": 0}

    async def incoming(self, payload: Any, headers: Any = None) -> None:
        return None


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_idle_client_keeps_connecting_within_the_advised_hold(
    server: Server, world: World, transport: ConnectionType
) -> None:
    """aiocometd times a connect out at 1.2 x the advised timeout: holds that end on time keep
    an idle client connected, over the transport it negotiated, and events still arrive."""
    log = ConnectLog()
    async with (
        http_session(ADMIN) as http,
        cometd(server, REALTIME, ADMIN, transport, extensions=(ShortHolds(), log)) as client,
    ):
        await client.subscribe(f"/operations/{world.child}")
        # Idle through two holds: the first connect's reply and two that ended on time.
        deadline = time.monotonic() + 6 * SHORT_HOLD_MS / 1000  # a bound for a broken run
        while len(log.replies) < 3:
            assert time.monotonic() < deadline, log.replies
            await asyncio.sleep(0.05)
        created = await Rest(http, server).create_operation(world.child)
        message = await next_message(client)
        assert message["data"]["data"]["id"] == created["id"]
        replies = list(log.replies)  # before the disconnect answers the connect held last
    assert set(log.sent) == {transport.value}
    assert len(replies) >= 3, replies
    assert all(reply["successful"] for reply in replies), replies
    assert {reply["advice"]["timeout"] for reply in replies} == {SHORT_HOLD_MS}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_wildcard_gets_every_device_once_per_session(
    server: Server, world: World, transport: ConnectionType
) -> None:
    async with (
        http_session(ADMIN) as http,
        cometd(server, REALTIME, ADMIN, transport) as everything,
        cometd(server, REALTIME, ADMIN, transport) as both,
    ):
        await everything.subscribe("/operations/*")
        await both.subscribe(f"/operations/{world.child}")
        await both.subscribe("/operations/*")
        rest = Rest(http, server)
        # The last one is a sentinel: a second copy of an earlier event would come before it.
        targets = [world.child, world.other, world.child]
        created = [await rest.create_operation(device) for device in targets]
        for client in (everything, both):
            received = [await next_message(client) for _ in targets]
            assert [
                (m["channel"], m["data"]["realtimeAction"], m["data"]["data"]["id"])
                for m in received
            ] == [
                (f"/operations/{device}", "CREATE", operation["id"])
                for device, operation in zip(targets, created, strict=True)
            ]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_quiescent_changes_send_nothing(
    server: Server, world: World, transport: ConnectionType
) -> None:
    quiet = {"X-Cumulocity-Processing-Mode": "QUIESCENT"}
    async with http_session(ADMIN) as http, cometd(server, REALTIME, ADMIN, transport) as client:
        await client.subscribe(f"/operations/{world.child}")
        rest = Rest(http, server)
        silent = await rest.create_operation(world.child, **quiet)
        await rest.update_operation(silent["id"], {"status": "EXECUTING"}, **quiet)
        loud = await rest.create_operation(world.child)
        message = await next_message(client)
        assert message["data"]["realtimeAction"] == "CREATE"
        assert message["data"]["data"]["id"] == loud["id"]


# --- operations on the agent family --------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_agent_gets_new_operations_of_its_grandchildren_only(
    server: Server, world: World, transport: ConnectionType
) -> None:
    """Over both paths of the agent family: `/devicecontrol/notifications` is the legacy alias."""
    channel = f"/{world.agent}"
    async with (
        http_session(ADMIN) as http,
        cometd(server, AGENT, ADMIN, transport) as current,
        cometd(server, "/devicecontrol/notifications", ADMIN, transport) as legacy,
    ):
        clients = (current, legacy)
        for client in clients:
            assert client.connection_type is transport
            await client.subscribe(channel)
        rest = Rest(http, server)

        created = await rest.create_operation(world.grandchild)
        fetched = await rest.get_operation(created["id"])
        assert fetched["deviceId"] == str(world.grandchild)
        for client in clients:
            assert_event(await next_message(client), channel, fetched)  # the bare operation

        # An update sends nothing to the agent: the next message is the next creation.
        await rest.update_operation(created["id"], {"status": "EXECUTING"})
        later = await rest.create_operation(world.grandchild)
        fetched = await rest.get_operation(later["id"])
        for client in clients:
            assert_event(await next_message(client), channel, fetched)


class CancelRequests(Extension):
    """Opts in to cancel requests on every `/meta/subscribe`, as the simulator's agents do."""

    async def outgoing(self, payload: list[dict[str, Any]], headers: dict[str, str]) -> None:
        for message in payload:
            if message["channel"] == "/meta/subscribe":
                message.setdefault("ext", {})["com.deviceplatform"] = {"cancelRequests": True}

    async def incoming(self, payload: Any, headers: Any = None) -> None:
        return None


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_cancel_requests_reach_only_the_agent_that_asked(
    server: Server, world: World, transport: ConnectionType
) -> None:
    """A plain client of the agent channel (every Cumulocity agent) gets new operations only, as
    Cumulocity sends; one that opted in also gets the cancel request of an EXECUTING operation.
    The device channel gets its standard UPDATE either way."""
    channel = f"/{world.agent}"
    device = f"/operations/{world.grandchild}"
    async with (
        http_session(ADMIN) as http,
        cometd(server, AGENT, OWNER, transport) as plain,
        cometd(server, AGENT, OWNER, transport, extensions=(CancelRequests(),)) as asked,
        cometd(server, REALTIME, ADMIN, transport) as watcher,
    ):
        await plain.subscribe(channel)
        await asked.subscribe(channel)
        await watcher.subscribe(device)
        rest = Rest(http, server)

        created = await rest.create_operation(world.grandchild)
        pending = await rest.get_operation(created["id"])
        await rest.update_operation(created["id"], {"status": "EXECUTING"})
        executing = await rest.get_operation(created["id"])
        await rest.cancel_operation(created["id"])
        requested = await rest.get_operation(created["id"])
        assert requested["status"] == "EXECUTING"
        assert requested["c8y_CancelRequested"]["by"] == "rt_admin"
        # A sentinel: anything sent to the plain client in between would come before it.
        later = await rest.get_operation((await rest.create_operation(world.grandchild))["id"])

        for expected in (pending, later):
            assert_event(await next_message(plain), channel, expected)
        for expected in (pending, requested, later):
            assert_event(await next_message(asked), channel, expected)
        for action, expected in (
            ("CREATE", pending),
            ("UPDATE", executing),
            ("UPDATE", requested),
            ("CREATE", later),
        ):
            message = await next_message(watcher)
            assert_event(message, device, {"realtimeAction": action, "data": expected})


# --- authentication and authorisation ------------------------------------------------------------


async def test_handshake_with_bad_credentials_is_denied(server: Server, world: World) -> None:
    for login, password in ((ADMIN, "wrong"), ("t100/rt_ghost", PASSWORD)):
        client = cometd(server, REALTIME, login, None, password=password)
        with pytest.raises(ServerError) as raised:
            await client.open()
        await client.close()
        reply = raised.value.response
        assert reply is not None
        assert (reply["channel"], reply["successful"]) == ("/meta/handshake", False)
        assert raised.value.error == "403::Handshake denied"
        assert reply["advice"] == {"reconnect": "none"}
        assert "clientId" not in reply

    # No credentials at all: the same refusal.
    async with http_session() as http:
        reply = await LongPolling(http, server, REALTIME).handshake(None)
        assert (reply["successful"], reply["error"]) == (False, "403::Handshake denied")

    # A present but invalid Authorization header is refused before any message (HTTP 401).
    async with http_session(ADMIN, "wrong") as http:
        body = [{"channel": "/meta/handshake", "version": "1.0", "id": "1"}]
        async with http.post(server.url + REALTIME, json=body) as response:
            assert response.status == 401
            assert response.headers["Content-Type"].startswith(
                "application/vnd.com.nsn.cumulocity.error+json"
            )
            assert (await response.json(content_type=None))["error"] == "security/Unauthorized"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_basic_header_authenticates_the_handshake(
    server: Server, world: World, transport: ConnectionType
) -> None:
    async with (
        http_session(ADMIN) as http,
        cometd(server, REALTIME, ADMIN, transport, header=True) as client,
    ):
        assert client.connection_type is transport
        await client.subscribe(f"/operations/{world.child}")
        created = await Rest(http, server).create_operation(world.child)
        message = await next_message(client)
        assert message["data"]["data"]["id"] == created["id"]


async def subscribe_error(client: CometD, channel: str) -> str | None:
    with pytest.raises(ServerError) as raised:
        await client.subscribe(channel)
    assert raised.value.response is not None
    assert raised.value.response["subscription"] == channel
    return raised.value.error


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_subscriptions_need_the_role_or_ownership(
    server: Server, world: World, transport: ConnectionType
) -> None:
    async with (
        http_session(ADMIN) as http,
        cometd(server, REALTIME, NOBODY, transport) as nobody,
        cometd(server, AGENT, NOBODY, transport) as nobody_agent,
        cometd(server, REALTIME, OWNER, transport) as owner,
        cometd(server, AGENT, OWNER, transport) as owner_agent,
    ):
        for channel in (f"/operations/{world.child}", "/operations/*"):
            assert await subscribe_error(nobody, channel) == "403::Subscription denied"
        assert await subscribe_error(nobody_agent, f"/{world.agent}") == "403::Subscription denied"
        # The owner may watch its own devices, but not every device.
        assert await subscribe_error(owner, "/operations/*") == "403::Subscription denied"
        # Channels of the other family, or outside the contract, are invalid.
        assert await subscribe_error(owner, f"/{world.agent}") == "400::Invalid channel"
        assert await subscribe_error(owner_agent, "/operations/*") == "400::Invalid channel"
        assert await subscribe_error(owner, "/alarms/*") == "400::Invalid channel"

        await owner.subscribe(f"/operations/{world.child}")
        await owner_agent.subscribe(f"/{world.agent}")
        created = await Rest(http, server).create_operation(world.child)
        message = await next_message(owner)
        assert (message["data"]["realtimeAction"], message["data"]["data"]["id"]) == (
            "CREATE",
            created["id"],
        )
        message = await next_message(owner_agent)
        assert (message["channel"], message["data"]["id"]) == (f"/{world.agent}", created["id"])


# --- sessions and holding, by hand ---------------------------------------------------------------


async def test_unknown_client_is_told_to_handshake(server: Server, world: World) -> None:
    unknown = {"reconnect": "handshake", "interval": 0}
    async with http_session() as http:
        # One message, not in an array, with a numeric id: the reply echoes the id as a number.
        body = {"channel": "/meta/connect", "clientId": "bogus", "id": 7}
        async with http.post(server.url + REALTIME, json=body) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == JSON_TYPE
            (reply,) = await response.json()
            assert (reply["id"], reply["successful"]) == (7, False)
            assert (reply["error"], reply["advice"]) == ("402::Unknown client", unknown)

        polling = LongPolling(http, server, REALTIME)
        events, reply = await polling.connect("bogus0000000000000000000000000000", timeout_ms=0)
        assert events == []
        assert (reply["successful"], reply["error"], reply["advice"]) == (
            False,
            "402::Unknown client",
            unknown,
        )
        reply = await polling.subscribe("bogus0000000000000000000000000000", "/operations/*")
        assert (reply["successful"], reply["error"]) == (False, "402::Unknown client")
        async with http.ws_connect(server.ws + REALTIME) as ws:
            socket = Socket(ws)
            sent = await socket.connect("bogus0000000000000000000000000000", timeout_ms=0)
            reply = await socket.next()
            assert reply["id"] == sent["id"]
            assert (reply["successful"], reply["error"], reply["advice"]) == (
                False,
                "402::Unknown client",
                unknown,
            )


async def test_long_polling_connect_is_held_and_queued_events_wait(
    server: Server, world: World
) -> None:
    async with http_session() as http, http_session(ADMIN) as admin_http:
        polling = LongPolling(http, server, REALTIME)
        rest = Rest(admin_http, server)
        handshake = await polling.handshake(ADMIN, advice={"timeout": 60_000, "interval": 0})
        assert handshake["advice"] == {"reconnect": "retry", "interval": 0, "timeout": 60_000}
        client_id = handshake["clientId"]
        assert (await polling.subscribe(client_id, f"/operations/{world.child}"))["successful"]

        # The first connect is answered at once, despite the session's 60 s hold.
        started = time.monotonic()
        events, reply = await polling.connect(client_id)
        assert time.monotonic() - started < 30  # not the 60 s hold (a bound, loaded or not)
        assert (events, reply["successful"]) == ([], True)

        # A later connect with nothing queued is held for its advice.timeout.
        started = time.monotonic()
        events, reply = await polling.connect(client_id, timeout_ms=1000)
        held = time.monotonic() - started
        assert 0.9 <= held < 30, held  # its 1 s, not the session's 60 s
        assert (events, reply["successful"]) == ([], True)
        assert reply["advice"] == {"reconnect": "retry", "interval": 0, "timeout": 1000}

        # Events created while no connect is held wait in the queue for the next one, which
        # answers at once with them before its own reply.
        first = await rest.create_operation(world.child)
        second = await rest.create_operation(world.child)
        started = time.monotonic()
        events, reply = await polling.connect(client_id)
        assert time.monotonic() - started < 30  # not the 60 s hold (a bound, loaded or not)
        assert reply["successful"] is True
        assert [(e["data"]["realtimeAction"], e["data"]["data"]["id"]) for e in events] == [
            ("CREATE", first["id"]),
            ("CREATE", second["id"]),
        ]

        # A held connect ends as soon as an event is queued.
        connect = asyncio.create_task(polling.connect(client_id))
        await asyncio.sleep(0.2)  # lets the connect reach its hold; not an assertion
        third = await rest.create_operation(world.child)
        events, reply = await asyncio.wait_for(connect, 30)
        assert reply["successful"] is True
        assert [e["data"]["data"]["id"] for e in events] == [third["id"]]


async def test_websocket_connect_is_held_and_events_are_pushed_during_the_hold(
    server: Server, world: World
) -> None:
    async with http_session() as http, http_session(ADMIN) as admin_http:
        client_id = await LongPolling(http, server, REALTIME).open(
            ADMIN, f"/operations/{world.child}"
        )
        rest = Rest(admin_http, server)
        async with http.ws_connect(server.ws + REALTIME) as ws:
            socket = Socket(ws)
            started = time.monotonic()
            sent = await socket.connect(client_id, timeout_ms=1000)
            reply = await socket.next()
            held = time.monotonic() - started
            assert 0.9 <= held < 30, held  # its 1 s, not the default 60 s
            assert (reply["id"], reply["successful"]) == (sent["id"], True)
            assert reply["advice"]["timeout"] == 1000

            # During a hold events come in their own frames; the connect is still held.
            held_connect = await socket.connect(client_id, timeout_ms=60_000)
            created = await rest.create_operation(world.child)
            event = await socket.next()
            assert event["channel"] == f"/operations/{world.child}"
            assert event["data"]["data"]["id"] == created["id"]
            assert event["data"]["data"]["self"].startswith(server.url + "/")

            # A newer connect answers the held one at once; a disconnect ends the newer one.
            newer = await socket.connect(client_id, timeout_ms=60_000)
            reply = await socket.next()
            assert (reply["id"], reply["successful"]) == (held_connect["id"], True)
            disconnect = socket.message("/meta/disconnect", clientId=client_id)
            await socket.send(disconnect)
            replies = {(await socket.next())["id"] for _ in range(2)}
            assert replies == {newer["id"], disconnect["id"]}

        events, reply = await LongPolling(http, server, REALTIME).connect(client_id, 0)
        assert reply["error"] == "402::Unknown client"
