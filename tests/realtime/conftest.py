"""Real server processes for the realtime end-to-end tests: `uvicorn` running
`deviceplatform.asgi:application` against this run's test database (PostgreSQL or SQLite) and the
shared Redis, under this run's `REALTIME_PREFIX`, so several processes (and the test itself) share
the sessions, queues and wake-ups. Tests using them need `@pytest.mark.django_db(transaction=True)`:
the servers only see committed rows.

The processes start once per session (two of them, concurrently) and stop before the test database
is dropped. A test that kills a server starts a spare one of its own with `start_servers`."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from django.conf import settings

from tests.helpers import PASSWORD, basic, database_url
from tests.realtime.bayeux import World, build_world
from tests.servers import Process as Server

REPO = Path(__file__).resolve().parents[2]
DEFAULT_HOLD_MS = 2000  # the servers' default connect hold: keeps idle clients cycling quickly

# The servers check the passwords the `make_user` fixture stored with the MD5 hasher of the test
# settings (tests/conftest.py), so they get the same hasher list (with the device hasher of
# generated device passwords); everything else is production.
BOOT = """
import sys
from django.conf import settings
settings.PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.MD5PasswordHasher",
    "deviceplatform.hashers.DevicePasswordHasher",
]
import uvicorn
uvicorn.run(
    "deviceplatform.asgi:application",
    host="127.0.0.1",
    port=int(sys.argv[1]),
    lifespan="off",
    log_level="warning",
)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def token(login: str, password: str = PASSWORD) -> str:
    """The `ext."com.cumulocity.authn".token` of a handshake: base64 of `<login>:<password>`."""
    return base64.b64encode(f"{login}:{password}".encode()).decode()


class Launcher:
    """Starts servers with this run's database, Redis and realtime prefix; stops all it started."""

    def __init__(self, log_dir: Path) -> None:
        assert settings.REDIS_URL, "the realtime end-to-end tests need REDIS_URL (shared state)"
        self.log_dir = log_dir
        self.started: list[Server] = []
        env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
        env.update(
            DJANGO_SETTINGS_MODULE="deviceplatform.settings",
            DATABASE_URL=database_url(),
            DATABASE_POOL_MIN_SIZE="1",
            REDIS_URL=settings.REDIS_URL,
            REALTIME_PREFIX=settings.REALTIME_PREFIX,
            REALTIME_DEFAULT_TIMEOUT_MS=str(DEFAULT_HOLD_MS),
            AUTH_ROLES_CACHE_SECONDS="0",  # users are recreated with other roles between tests
        )
        self.env = env

    def start(self, count: int = 1) -> list[Server]:
        """`count` servers, started concurrently, once they answer HTTP."""
        servers = []
        for _ in range(count):
            port = free_port()
            log_path = self.log_dir / f"uvicorn-{port}.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-c", BOOT, str(port)],
                    cwd=REPO,
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            servers.append(Server("uvicorn", port, process, log_path))
        self.started.extend(servers)
        for server in servers:
            server.wait_ready()
        return servers

    def stop_all(self) -> None:
        for server in self.started:
            if server.process.poll() is None:
                server.process.terminate()
        for server in self.started:
            server.stop()


@pytest.fixture(scope="session")
def launcher(django_db_setup: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """Stops every server before the test database is dropped, then removes this run's realtime
    keys from Redis."""
    launcher = Launcher(tmp_path_factory.mktemp("uvicorn"))
    try:
        yield launcher
    finally:
        launcher.stop_all()
        client = redis.Redis.from_url(settings.REDIS_URL)
        keys = list(client.scan_iter(match=f"{settings.REALTIME_PREFIX}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture(scope="session")
def servers(launcher: Launcher) -> tuple[Server, Server]:
    """Two server processes sharing Redis, for the whole session."""
    first, second = launcher.start(2)
    return first, second


@pytest.fixture(scope="session")
def server(servers: tuple[Server, Server]) -> Server:
    return servers[0]


@pytest.fixture
def start_servers(launcher: Launcher) -> Any:
    """`start_servers(n)`: extra servers for one test (one it may kill); stopped after the test."""
    mine: list[Server] = []

    def start(count: int = 1) -> list[Server]:
        started = launcher.start(count)
        mine.extend(started)
        return started

    yield start
    for extra in mine:
        extra.stop(signal.SIGKILL)


# --- talking to the servers ---------------------------------------------------------------------

WAIT = 10.0  # bounds a hang while waiting for a message; never a timing assertion
JSON_TYPE = "application/json;charset=UTF-8"


def http_session(login: str | None = None, password: str = PASSWORD) -> aiohttp.ClientSession:
    """An aiohttp session, with Basic credentials `<login>:<password>` when a login is given."""
    headers = {"Authorization": basic(login, password)} if login else None
    return aiohttp.ClientSession(headers=headers)


class Rest:
    """The operations API of one server, as one user (`t100/<username>`)."""

    def __init__(self, http: aiohttp.ClientSession, server: Server) -> None:
        self.http = http
        self.server = server

    async def _call(self, method: str, path: str, status: int, **kwargs: Any) -> Any:
        async with self.http.request(method, self.server.url + path, **kwargs) as response:
            body = await response.read()
            assert response.status == status, (method, path, response.status, body[:500])
            return json.loads(body) if body else None

    async def create_operation(self, device_id: object, **headers: str) -> dict[str, Any]:
        body = {"deviceId": str(device_id), "description": "Restart", "c8y_Restart": {}}
        return await self._call(
            "POST", "/devicecontrol/operations", 201, json=body, headers=headers
        )

    async def get_operation(self, operation_id: object) -> dict[str, Any]:
        return await self._call("GET", f"/devicecontrol/operations/{operation_id}", 200)

    async def update_operation(
        self, operation_id: object, body: dict[str, Any], **headers: str
    ) -> dict[str, Any]:
        return await self._call(
            "PUT", f"/devicecontrol/operations/{operation_id}", 200, json=body, headers=headers
        )

    async def cancel_operation(self, operation_id: object) -> None:
        await self._call("POST", f"/devicecontrol/operations/{operation_id}/cancel", 200)

    async def delete_operations(self, **params: str) -> None:
        await self._call("DELETE", "/devicecontrol/operations", 204, params=params)


class LongPolling:
    """Bayeux by hand over HTTP long-polling: one POST per `post`, replies parsed and checked
    (status 200, JSON content type, every reply echoes its request's `id`)."""

    def __init__(self, http: aiohttp.ClientSession, server: Server, path: str) -> None:
        self.http = http
        self.url = server.url + path
        self.ids = itertools.count(1)

    def message(self, channel: str, **fields: Any) -> dict[str, Any]:
        return {"channel": channel, "id": str(next(self.ids)), **fields}

    async def post(self, *messages: dict[str, Any]) -> list[dict[str, Any]]:
        async with self.http.post(self.url, json=list(messages)) as response:
            body = await response.read()
            assert response.status == 200, (response.status, body[:500])
            assert response.headers["Content-Type"] == JSON_TYPE
        replies = json.loads(body)
        assert isinstance(replies, list), replies
        return replies

    async def handshake(self, login: str | None, **fields: Any) -> dict[str, Any]:
        """The handshake reply; with `login`, the `ext` token of `<login>:PASSWORD`."""
        if login is not None:
            fields.setdefault("ext", {"com.cumulocity.authn": {"token": token(login)}})
        message = self.message(
            "/meta/handshake",
            version="1.0",
            supportedConnectionTypes=["long-polling", "websocket"],
            **fields,
        )
        (reply,) = await self.post(message)
        assert reply["id"] == message["id"], reply
        return reply

    async def open(self, login: str, *subscriptions: str, **fields: Any) -> str:
        """Handshake, subscribe and the first connect; the clientId."""
        reply = await self.handshake(login, **fields)
        assert reply["successful"] is True, reply
        client_id = reply["clientId"]
        for channel in subscriptions:
            reply = await self.subscribe(client_id, channel)
            assert reply["successful"] is True, reply
        events, reply = await self.connect(client_id)
        assert (events, reply["successful"]) == ([], True), (events, reply)
        return client_id

    async def subscribe(self, client_id: str, channel: str) -> dict[str, Any]:
        message = self.message("/meta/subscribe", clientId=client_id, subscription=channel)
        (reply,) = await self.post(message)
        assert reply["id"] == message["id"], reply
        return reply

    async def connect(
        self, client_id: str, timeout_ms: int | None = None
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """One `/meta/connect`: the events it delivered and its reply (which comes last)."""
        fields: dict[str, Any] = {"clientId": client_id, "connectionType": "long-polling"}
        if timeout_ms is not None:
            fields["advice"] = {"timeout": timeout_ms}
        message = self.message("/meta/connect", **fields)
        *events, reply = await self.post(message)
        assert (reply["channel"], reply["id"]) == ("/meta/connect", message["id"]), reply
        return events, reply


class Socket:
    """Bayeux by hand over one WebSocket: frames out, frames in (each a JSON array)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1000)
        self.backlog: list[dict[str, Any]] = []

    def message(self, channel: str, **fields: Any) -> dict[str, Any]:
        return {"channel": channel, "id": str(next(self.ids)), **fields}

    async def send(self, *messages: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(list(messages)))

    async def next(self) -> dict[str, Any]:
        """The next message the server sent (frames may carry several)."""
        while not self.backlog:
            frame = await self.ws.receive(timeout=WAIT)
            assert frame.type == aiohttp.WSMsgType.TEXT, frame
            messages = json.loads(frame.data)
            assert isinstance(messages, list), messages
            self.backlog.extend(messages)
        return self.backlog.pop(0)

    async def connect(self, client_id: str, timeout_ms: int | None = None) -> dict[str, Any]:
        """Send a `/meta/connect` (not waiting for its reply); the message sent."""
        fields: dict[str, Any] = {"clientId": client_id, "connectionType": "websocket"}
        if timeout_ms is not None:
            fields["advice"] = {"timeout": timeout_ms}
        message = self.message("/meta/connect", **fields)
        await self.send(message)
        return message


async def next_message(client: Any) -> dict[str, Any]:
    """The next event an aiocometd client received (bounded wait)."""
    return await asyncio.wait_for(client.receive(), WAIT)


@pytest.fixture
def world(make_user: Callable[..., Any]) -> World:
    """The users of tests/realtime/bayeux.py and three agents that are their own devices."""
    return build_world(make_user)
