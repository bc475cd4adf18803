"""A tiny Bayeux client over both in-process transports, for the protocol tests.

`WsBayeux` talks to `deviceplatform.asgi.application` through a WebSocket communicator;
`LpBayeux` posts to the long-polling view through Django's `AsyncClient`. Both speak raw Bayeux
messages (dicts), so the tests see exactly what a CometD client would see. Events are produced by
the real services inside committed transactions and travel through the configured store (Redis in
the test runs, the in-process store when REDIS_URL is empty)."""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import transaction
from django.test import AsyncClient

from devicecontrol import services as devicecontrol_services
from devicecontrol.models import Operation
from deviceplatform.asgi import application
from deviceplatform.roles import Role
from inventory import services as inventory_services
from inventory.models import ManagedObject
from tests.helpers import PASSWORD

REALTIME = "/notification/realtime"
AGENT = "/notification/operations"
LP_CONTENT_TYPE = "application/json;charset=UTF-8"
# Bounds a hang only: every awaited frame is expected to arrive much sooner.
FRAME_TIMEOUT = 30.0  # a bound for a broken run, not a timing assertion

Message = dict[str, Any]


def token(username: str, password: str = PASSWORD, tenant: str = "t100") -> str:
    return base64.b64encode(f"{tenant}/{username}:{password}".encode()).decode()


def authn(username: str) -> dict[str, Any]:
    """The handshake `ext` that authenticates `username` (realtime.md §3)."""
    return {"com.cumulocity.authn": {"token": token(username)}}


BOTH_TYPES = ["websocket", "long-polling"]


def handshake_message(
    username: str | None,
    *,
    id: Any = "1",  # noqa: A002 - the Bayeux field name
    types: list[str] | None = BOTH_TYPES,
    advice: dict[str, Any] | None = None,
    **extra: Any,
) -> Message:
    """A handshake as CometD clients send it; `types=None` leaves the list out."""
    message: Message = {"channel": "/meta/handshake", "version": "1.0", **extra}
    if id is not None:
        message["id"] = id
    if types is not None:
        message["supportedConnectionTypes"] = types
    if advice is not None:
        message["advice"] = advice
    if username is not None:
        message["ext"] = authn(username)
    return message


def event_channels(messages: list[Message]) -> list[str]:
    """The channels of the event messages (everything that is not a /meta reply)."""
    return [m["channel"] for m in messages if not m["channel"].startswith("/meta/")]


def event_ids(messages: list[Message]) -> list[str]:
    """The operation IDs of the realtime-family operation events in `messages`, in order."""
    return [
        m["data"]["data"]["id"]
        for m in messages
        if not m["channel"].startswith("/meta/") and isinstance(m["data"].get("data"), dict)
    ]


def only(messages: list[Message], channel: str) -> Message:
    found = [m for m in messages if m.get("channel") == channel]
    assert len(found) == 1, messages
    return found[0]


class Bayeux:
    """Message builders and the common flows; subclasses provide `request`."""

    path: str
    client_id: str | None = None
    _ids = itertools.count(100)

    async def request(self, messages: Any) -> list[Message]:
        raise NotImplementedError

    def next_id(self) -> str:
        return str(next(self._ids))

    async def handshake(self, username: str, **kwargs: Any) -> Message:
        [reply] = await self.request([handshake_message(username, **kwargs)])
        assert reply["successful"] is True, reply
        self.client_id = reply["clientId"]
        return reply

    def message(self, channel: str, **fields: Any) -> Message:
        message: Message = {"channel": channel, "id": self.next_id(), **fields}
        if self.client_id is not None and "clientId" not in fields:
            message["clientId"] = self.client_id
        return message

    def connect_message(self, timeout: int | None = None, **fields: Any) -> Message:
        if timeout is not None:
            fields["advice"] = {"timeout": timeout}
        return self.message("/meta/connect", connectionType=self.connection_type, **fields)

    connection_type = "websocket"

    async def subscribe(self, subscription: Any, **fields: Any) -> Message:
        [reply] = await self.request(
            [self.message("/meta/subscribe", subscription=subscription, **fields)]
        )
        return reply

    async def unsubscribe(self, subscription: Any, **fields: Any) -> Message:
        [reply] = await self.request(
            [self.message("/meta/unsubscribe", subscription=subscription, **fields)]
        )
        return reply

    async def subscribed(self, *subscriptions: Any) -> None:
        for subscription in subscriptions:
            reply = await self.subscribe(subscription)
            assert reply["successful"] is True, reply

    async def start(self, username: str, *subscriptions: Any, **handshake: Any) -> str:
        """Handshake, subscribe and send the first connect (answered at once, §6.2)."""
        await self.handshake(username, **handshake)
        await self.subscribed(*subscriptions)
        first = await self.connect_now()
        assert first[-1]["successful"] is True, first
        assert self.client_id is not None
        return self.client_id

    async def connect_now(self) -> list[Message]:
        """A connect with `advice.timeout: 0`: answered at once with whatever is queued."""
        messages = await self.request([self.connect_message(timeout=0)])
        assert messages[-1]["channel"] == "/meta/connect", messages
        return messages


class WsBayeux(Bayeux):
    """One WebSocket to the ASGI application."""

    connection_type = "websocket"

    def __init__(self, path: str = REALTIME, headers: list[tuple[bytes, bytes]] | None = None):
        self.path = path
        headers = [(b"host", b"testserver"), *(headers or [])]
        self.communicator = WebsocketCommunicator(application, path, headers=headers)
        self.open = False

    async def __aenter__(self) -> WsBayeux:
        connected, _ = await self.communicator.connect()
        assert connected
        self.open = True
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.open:
            self.open = False
            await self.communicator.disconnect()

    async def send(self, messages: Any) -> None:
        """`messages` is sent JSON-encoded, a `str` as is."""
        text = messages if isinstance(messages, str) else json.dumps(messages)
        await self.communicator.send_to(text_data=text)

    async def frame(self, timeout: float = FRAME_TIMEOUT) -> list[Message]:
        text = await self.communicator.receive_from(timeout)
        body = json.loads(text)
        assert isinstance(body, list), body  # every outbound frame is an array (§2)
        return body

    async def request(self, messages: Any) -> list[Message]:
        """Send, then the next frame (the whole answer unless a connect is held)."""
        await self.send(messages)
        return await self.frame()

    async def nothing(self, seconds: float = 0.2) -> bool:
        return await self.communicator.receive_nothing(seconds)


class LpBayeux(Bayeux):
    """Long-polling through Django's async test client: one POST per `request`."""

    connection_type = "long-polling"

    def __init__(self, path: str = REALTIME, **headers: str) -> None:
        self.path = path
        self.http = AsyncClient()
        self.headers = headers  # per request: AsyncClient(headers=...) sends them misnamed

    async def post(self, body: Any, *, path: str | None = None, **headers: str) -> Any:
        data = body if isinstance(body, str | bytes) else json.dumps(body)
        return await self.http.post(
            path or self.path,
            data=data,
            content_type="application/json",
            headers={**self.headers, **headers},
        )

    async def request(self, messages: Any, *, path: str | None = None) -> list[Message]:
        response = await self.post(messages, path=path)
        assert response.status_code == 200, (response.status_code, response.content[:500])
        assert response["Content-Type"] == LP_CONTENT_TYPE
        body = json.loads(response.content)
        assert isinstance(body, list), body
        return body


# --- the world: users and devices -------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """`reader` holds ROLE_DEVICE_CONTROL_READ; `alice` owns `device` and `agent` (no role);
    `bob` owns `other` (no role); `nobody` owns nothing. Every device is an agent, so operations
    can be created for each directly."""

    device: ManagedObject
    agent: ManagedObject
    other: ManagedObject


USERS: dict[str, list[Role]] = {
    "reader": [Role.DEVICE_CONTROL_READ],
    "alice": [],
    "bob": [],
    "nobody": [],
}


def agent_device(name: str, owner: str) -> ManagedObject:
    return inventory_services.managed_object_create(
        owner=owner,
        data={"name": name, "c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}},
    )


def build_world(make_user: Callable[..., Any]) -> World:
    for username, roles in USERS.items():
        make_user(username, roles=roles)
    return World(
        device=agent_device("Device", "alice"),
        agent=agent_device("Agent", "alice"),
        other=agent_device("Bob's", "bob"),
    )


def _create_operation(device: ManagedObject) -> Operation:
    with transaction.atomic():
        return devicecontrol_services.operation_create(device=device, data={"c8y_Restart": {}})


async def create_operation(device: ManagedObject) -> str:
    """Create an operation for `device` in a committed transaction (its events are published on
    commit); returns its ID as the events carry it. Like the app's own ORM calls, the thread's
    connection goes back to the pool afterwards."""
    operation = await database_sync_to_async(_create_operation)(device)
    return str(operation.pk)
