"""Realtime: operation events from the REST create to 1,000 WebSocket CometD subscribers.

Creates a dedicated PostgreSQL database and uses a dedicated Redis DB index, seeds one agent with
--clients child devices (owned by --users device users), starts uvicorn (`deviceplatform.asgi`,
--workers processes, REDIS_URL set: sessions, queues and wake-ups in Redis) and then:

  1. connects --clients lean Bayeux clients over WebSocket (aiohttp `ws_connect`, Bayeux frames
     written by hand: handshake with the `com.cumulocity.authn` token, subscribe to the client's
     own `/operations/{deviceId}`, then `/meta/connect` again after every connect reply), one
     client on `/operations/*` (bench admin) and --cometd-clients aiocometd-ng clients (WebSocket
     transport) on the first devices' channels; the clients run in --client-procs processes;
  2. server memory: RSS of the server's processes and Redis `used_memory` before and after;
  3. the ceiling: raw Redis PUBLISH -> subscriber (another connection, in a client process);
  4. --rounds burst rounds (one operation per device over --concurrency keep-alive connections)
     and one paced round (--paced-rate creates per second, open loop): for every event, the time
     from the REST response (in this process) to the client receiving it (in its process; both
     clocks are CLOCK_MONOTONIC); p50/p99/max, events delivered per second, lost events.

With --rest nginx the layout is the one `bin/run` starts with REDIS_URL, PostgreSQL and nginx:
gunicorn for REST and uvicorn for the realtime paths behind nginx on one port (deploy/nginx.conf).
`--clients 10000 --rounds 0 --paced-rate 0 --workers 1 --client-procs 4` holds 10,000 idle
subscribed clients on one uvicorn process and reports its memory per client.

Usage (see bench/README.md):  .venv/bin/python bench/realtime.py [--clients 1000] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import math
import multiprocessing
import os
import resource
import shlex
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from _common import (
    BENCH_PASSWORD,
    BENCH_USER,
    TENANT,
    Call,
    Load,
    Report,
    Server,
    bench_env,
    checked_database_url,
    checked_redis_url,
    command_line,
    cpu_sample,
    create_device_users,
    database_name,
    flush_redis,
    free_port,
    gunicorn_command,
    load_average_line,
    machine_line,
    migrate_and_create_user,
    percentile,
    proc_status_kb,
    process_cpu_seconds,
    recreate_database,
    redacted,
    redis_cpu_seconds,
    run_main,
    session_pids,
    setup_django,
    summary,
    uvicorn_command,
)

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/dp_bench_rt"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
PREFIX = "dp-bench-rt"
FLEET_PASSWORD = "fleet-pw:not-secret"
AUTHN_EXT = "com.cumulocity.authn"
AIM_P99_MS = 50.0  # issue 13 item 5: p99 from the REST answer to the subscriber
WARM_PATH = "/devicecontrol/operations?pageSize=1"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=1000, help="devices = WebSocket clients")
    parser.add_argument(
        "--users",
        type=int,
        default=10,
        help="device users owning the devices; REALTIME_SESSIONS_PER_USER is raised to "
        "ceil(clients / users) + 10 for the bench server (each user costs one password hash per "
        "server process, so one user per device is impractical)",
    )
    parser.add_argument("--workers", type=int, default=2, help="uvicorn processes")
    parser.add_argument(
        "--rest",
        choices=("uvicorn", "gunicorn", "nginx"),
        default="uvicorn",
        help="who serves the REST creates: the same uvicorn (one ASGI server for everything), "
        "gunicorn sync workers next to it (the production layout, clients straight to each "
        "server), or gunicorn and uvicorn behind nginx on one port (deploy/nginx.conf: the "
        "layout bin/run uses with REDIS_URL, PostgreSQL and nginx)",
    )
    parser.add_argument(
        "--rest-workers", type=int, default=3, help="gunicorn workers (--rest gunicorn/nginx)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="burst rounds (1 op per device)")
    parser.add_argument("--concurrency", type=int, default=8, help="HTTP connections, bursts")
    parser.add_argument("--paced-rate", type=float, default=200.0, help="creates/s; 0: skip")
    parser.add_argument(
        "--paced-connections", type=int, default=32, help="HTTP connections, paced round"
    )
    parser.add_argument("--client-procs", type=int, default=2, help="processes for the clients")
    parser.add_argument("--cometd-clients", type=int, default=2, help="aiocometd-ng clients")
    parser.add_argument("--redis-samples", type=int, default=2000, help="raw PUBLISH ceiling")
    parser.add_argument("--connect-batch", type=int, default=100, help="concurrent handshakes")
    parser.add_argument("--settle", type=float, default=15.0, help="s to wait for late events")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_RT_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="PostgreSQL on loopback; DROPPED and re-created (its name must contain 'bench')",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_RT_REDIS_URL", DEFAULT_REDIS_URL),
        help="Redis on loopback with a dedicated DB index (FLUSHED at start and end)",
    )
    parser.add_argument("--save", action="store_true", help="also write bench/results/*.txt")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.users < 1 or args.client_procs < 1:
        parser.error("--clients, --users and --client-procs must be at least 1")
    args.cometd_clients = min(args.cometd_clients, args.clients)
    if args.rest == "nginx" and shutil.which("nginx") is None:
        parser.error("--rest nginx needs an nginx binary (Debian/Ubuntu: apt-get install nginx)")
    return args


def layout_name(args: argparse.Namespace) -> str:
    """The server layout in words, for the SUMMARY lines."""
    if args.rest == "uvicorn":
        return f"one uvicorn server, {args.workers} worker(s)"
    proxy = " behind nginx" if args.rest == "nginx" else ""
    return f"gunicorn {args.rest_workers} + uvicorn {args.workers}{proxy}"


def nginx_server(log_dir: Path, env: dict[str, str], port: int, rest: int, rt: int) -> Server:
    """nginx in front of gunicorn and uvicorn with the repository's deploy/ configuration, the
    three addresses replaced as bin/run replaces them."""
    from _common import REPO

    prefix = log_dir / "nginx"
    prefix.mkdir()
    log_dir.chmod(0o755)  # nginx's workers run as nobody when the bench runs as root
    prefix.chmod(0o755)
    shutil.copy(REPO / "deploy" / "nginx-main.conf", prefix / "nginx.conf")
    site = (REPO / "deploy" / "nginx.conf").read_text()
    site = site.replace("listen 127.0.0.1:8000;", f"listen 127.0.0.1:{port};")
    site = site.replace("127.0.0.1:8001;", f"127.0.0.1:{rest};")
    site = site.replace("127.0.0.1:8002;", f"127.0.0.1:{rt};")
    (prefix / "site.conf").write_text(site)
    command = ["nginx", "-p", str(prefix), "-c", "nginx.conf", "-e", "stderr"]
    return Server(command, env, log_dir / "nginx.log", name="nginx")


def redis_used_memory(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def token(login: str, password: str) -> str:
    """The `com.cumulocity.authn` token: base64 of `<tenant>/<login>:<password>`."""
    return base64.b64encode(f"{TENANT}/{login}:{password}".encode()).decode()


# --- seeding --------------------------------------------------------------------------------------


@dataclass
class Fleet:
    agent: int
    devices: list[int]
    owners: list[str]  # per device


def seed(args: argparse.Namespace) -> Fleet:
    """One agent with every device as a child device (the agent rule of devicecontrol.md), each
    device owned by one of --users device users (group `devices`, no ROLE_DEVICE_CONTROL_READ:
    their subscriptions are allowed as the device's owner)."""
    from django.db import connections

    from inventory.models import ManagedObject, ManagedObjectReference, Relation

    users = create_device_users([f"fleet-{u:03d}" for u in range(args.users)], FLEET_PASSWORD)
    agent = ManagedObject.objects.create(
        type="c8y_BenchAgent",
        name="bench-agent",
        owner=BENCH_USER,
        fragments={"com_cumulocity_model_Agent": {}, "c8y_IsDevice": {}},
        is_device=True,
        is_agent=True,
    )
    owners = [users[i % len(users)].username for i in range(args.clients)]
    devices = ManagedObject.objects.bulk_create(
        [
            ManagedObject(
                type="c8y_BenchDevice",
                name=f"device-{i:05d}",
                owner=owners[i],
                fragments={"c8y_IsDevice": {}, "c8y_SupportedOperations": ["c8y_Restart"]},
                is_device=True,
            )
            for i in range(args.clients)
        ],
        batch_size=1000,
    )
    ManagedObjectReference.objects.bulk_create(
        [
            ManagedObjectReference(parent=agent, child=device, relation=Relation.DEVICE.value)
            for device in devices
        ],
        batch_size=1000,
    )
    connections.close_all()
    return Fleet(agent=agent.pk, devices=[d.pk for d in devices], owners=owners)


# --- the client processes -------------------------------------------------------------------------


@dataclass
class PoolSpec:
    """What one client process runs."""

    index: int
    ws_url: str  # ws://host:port/notification/realtime
    clients: list[tuple[int, int, str]]  # (client number = device index, device id, token)
    star_token: str | None  # the /operations/* client, if this process runs it
    cometd: list[tuple[int, int, str]]  # aiocometd-ng clients: (device index, device id, token)


# receipts: (kind, client number, operation id, receive time); kind d: device, s: star, c: cometd
Receipt = tuple[str, int, str, float]


class RawClient:
    """One Bayeux session over one WebSocket, Bayeux frames written by hand."""

    def __init__(
        self, number: int, kind: str, channel: str, auth: str, receipts: list[Receipt]
    ) -> None:
        self.number = number
        self.kind = kind
        self.channel = channel
        self.auth = auth
        self.receipts = receipts
        self.client_id = ""
        self.errors: list[str] = []
        self.connects = 0
        self.rehandshakes = 0
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def _exchange(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.ws is not None
        await self.ws.send_str(orjson.dumps([message]).decode())
        frame = await self.ws.receive(timeout=60)
        if frame.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"{message['channel']}: {frame.type.name}")
        replies = orjson.loads(frame.data)
        reply = replies[0] if replies else {}
        if not reply.get("successful"):
            raise ConnectionError(f"{message['channel']}: {reply.get('error')}")
        return reply

    async def open(self, session: aiohttp.ClientSession, url: str) -> None:
        self.ws = await session.ws_connect(url, autoping=True, max_msg_size=0, timeout=60)
        for attempt in range(3):
            try:
                await self._handshake()
                return
            except ConnectionError as exc:  # 402: the session expired before the subscribe
                if "402::" not in str(exc) or attempt == 2:
                    raise
                self.errors.append(f"re-handshake after {exc}")
                self.rehandshakes += 1

    async def _handshake(self) -> None:
        reply = await self._exchange(
            {
                "channel": "/meta/handshake",
                "version": "1.0",
                "minimumVersion": "1.0",
                "supportedConnectionTypes": ["websocket"],
                "ext": {AUTHN_EXT: {"token": self.auth}},
            }
        )
        self.client_id = reply["clientId"]
        await self._exchange(
            {"channel": "/meta/subscribe", "clientId": self.client_id, "subscription": self.channel}
        )
        await self._connect()  # the first connect is answered at once; the loop sends the next

    async def _connect(self) -> None:
        assert self.ws is not None
        self.connects += 1
        await self.ws.send_str(
            orjson.dumps(
                [
                    {
                        "channel": "/meta/connect",
                        "clientId": self.client_id,
                        "connectionType": "websocket",
                    }
                ]
            ).decode()
        )

    async def listen(self) -> None:
        assert self.ws is not None
        append = self.receipts.append
        async for frame in self.ws:
            received = time.perf_counter()
            if frame.type != aiohttp.WSMsgType.TEXT:
                self.errors.append(f"frame {frame.type.name}")
                break
            for message in orjson.loads(frame.data):
                channel = message.get("channel", "")
                if channel == "/meta/connect":
                    if not message.get("successful"):
                        # As CometD clients do on advice reconnect=handshake: a new session (the
                        # events published meanwhile are lost and counted as such).
                        self.errors.append(f"connect: {message.get('error')}; re-handshake")
                        self.rehandshakes += 1
                        if self.rehandshakes > 3:
                            return
                        await self._handshake()
                        continue
                    await self._connect()
                elif channel.startswith("/operations/"):
                    data = message.get("data") or {}
                    if data.get("realtimeAction") == "CREATE":
                        append((self.kind, self.number, str(data["data"]["id"]), received))
        if not self.errors and self.ws.close_code is not None:
            self.errors.append(f"closed {self.ws.close_code}")

    async def close(self) -> None:
        if self.ws is not None and not self.ws.closed:
            with contextlib.suppress(Exception):
                await self.ws.send_str(
                    orjson.dumps(
                        [{"channel": "/meta/disconnect", "clientId": self.client_id}]
                    ).decode()
                )
            with contextlib.suppress(Exception):
                await self.ws.close()


async def _cometd_client(
    spec: tuple[int, int, str],
    url: str,
    receipts: list[Receipt],
    ready: asyncio.Future[None],
    stop: asyncio.Event,
) -> None:
    """aiocometd-ng over WebSocket, the credentials in the handshake's ext (as c8y agents do)."""
    from aiocometd_ng import Client, ConnectionType
    from aiocometd_ng.extensions import Extension

    number, device, auth = spec

    class Authn(Extension):  # type: ignore[misc]
        async def outgoing(self, payload: list[dict[str, Any]], headers: Any) -> None:
            for message in payload:
                if message["channel"] == "/meta/handshake":
                    message.setdefault("ext", {})[AUTHN_EXT] = {"token": auth}

        async def incoming(self, payload: list[dict[str, Any]], headers: Any = None) -> None:
            pass

    try:
        async with Client(
            url, connection_types=[ConnectionType.WEBSOCKET], extensions=[Authn()]
        ) as client:
            await client.subscribe(f"/operations/{device}")
            ready.set_result(None)
            stopping = asyncio.create_task(stop.wait())
            while True:
                receiving = asyncio.ensure_future(client.receive())
                await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not receiving.done():  # stop: leave the context, which disconnects cleanly
                    receiving.cancel()
                    await asyncio.gather(receiving, return_exceptions=True)
                    return
                received = time.perf_counter()
                data = receiving.result().get("data") or {}
                if data.get("realtimeAction") == "CREATE":
                    receipts.append(("c", number, str(data["data"]["id"]), received))
    except Exception as exc:
        if not ready.done():
            ready.set_exception(exc)
        raise


def pool_main(conn: Connection, spec: PoolSpec) -> None:
    """Entry point of a client process: answers the parent's commands over `conn`."""
    try:
        import uvloop

        uvloop.run(_pool(conn, spec))
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        asyncio.run(_pool(conn, spec))


async def _pool(conn: Connection, spec: PoolSpec) -> None:
    loop = asyncio.get_running_loop()

    def quiet_cancellations(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # aiocometd-ng's done-callbacks re-raise the cancellation of its own tasks on close.
        if not isinstance(context.get("exception"), asyncio.CancelledError):
            loop.default_exception_handler(context)

    loop.set_exception_handler(quiet_cancellations)
    receipts: list[Receipt] = []
    clients: list[RawClient] = []
    tasks: list[asyncio.Task[None]] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    session = aiohttp.ClientSession(connector=connector)
    errors: Counter[str] = Counter()
    stop_cometd = asyncio.Event()
    cometd_tasks: list[asyncio.Task[None]] = []

    async def receive() -> Any:
        return await loop.run_in_executor(None, conn.recv)

    async def connect_all(batch: int) -> tuple[int, float]:
        started = time.perf_counter()
        planned = [
            RawClient(number, "d", f"/operations/{device}", auth, receipts)
            for number, device, auth in spec.clients
        ]
        if spec.star_token is not None:
            planned.append(RawClient(-1, "s", "/operations/*", spec.star_token, receipts))
        semaphore = asyncio.Semaphore(batch)

        async def one(client: RawClient) -> None:
            async with semaphore:
                try:
                    await client.open(session, spec.ws_url)
                except Exception as exc:
                    errors[f"open: {type(exc).__name__}: {exc}"[:120]] += 1
                    return
            clients.append(client)
            tasks.append(asyncio.create_task(client.listen()))

        await asyncio.gather(*(one(c) for c in planned))
        for item in spec.cometd:
            ready: asyncio.Future[None] = loop.create_future()
            cometd_tasks.append(
                asyncio.create_task(_cometd_client(item, spec.ws_url, receipts, ready, stop_cometd))
            )
            try:
                await asyncio.wait_for(ready, 60)
                clients.append(RawClient(item[0], "c", "", "", receipts))  # counted as connected
            except Exception as exc:
                errors[f"aiocometd-ng: {type(exc).__name__}: {exc}"[:120]] += 1
        return len(clients), time.perf_counter() - started

    async def redis_ceiling(url: str, channel: str) -> None:
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(channel)
        conn.send(("subscribed",))
        latencies: list[float] = []
        async for message in pubsub.listen():
            received = time.perf_counter()
            if message["type"] != "message":
                continue
            if message["data"] == b"end":
                break
            latencies.append(received - float(message["data"][:24]))
        await pubsub.aclose()
        await client.aclose()
        conn.send(("latencies", latencies))

    while True:
        command = await receive()
        kind = command[0]
        if kind == "connect":
            connected, seconds = await connect_all(command[1])
            conn.send(("connected", connected, seconds, dict(errors)))
        elif kind == "count":
            counts = Counter(r[0] for r in receipts)
            conn.send(("count", dict(counts)))
        elif kind == "redis":
            await redis_ceiling(command[1], command[2])
        elif kind == "collect":
            for client in clients:
                for problem in client.errors:
                    errors[problem] += 1
            connects = sum(c.connects for c in clients)
            conn.send(("receipts", receipts, dict(errors), connects))
        elif kind == "stop":
            stop_cometd.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    asyncio.gather(*cometd_tasks, return_exceptions=True), timeout=10
                )
            for task in tasks:
                task.cancel()
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
            await asyncio.gather(*tasks, return_exceptions=True)
            await session.close()
            conn.send(("stopped",))
            return


class Pools:
    """The client processes and their pipes."""

    def __init__(self, specs: list[PoolSpec]) -> None:
        context = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.processes = []
        for spec in specs:
            parent, child = context.Pipe()
            process = context.Process(target=pool_main, args=(child, spec), daemon=True)
            process.start()
            child.close()
            self.conns.append(parent)
            self.processes.append(process)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    async def ask(self, command: tuple[Any, ...], only: int | None = None) -> list[Any]:
        loop = asyncio.get_running_loop()
        conns = self.conns if only is None else [self.conns[only]]
        for conn in conns:
            conn.send(command)
        return list(await asyncio.gather(*(loop.run_in_executor(None, c.recv) for c in conns)))

    async def counts(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for _, counts in await self.ask(("count",)):
            total.update(counts)
        return total

    def stop(self) -> None:
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)


# --- measurements ---------------------------------------------------------------------------------


@dataclass
class Created:
    number: int  # device index
    sent: float
    answered: float
    round: str


@dataclass
class Round:
    name: str
    planned: int
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    rest: list[float] = field(default_factory=list)  # REST latencies, s
    started: float = 0.0
    last_answer: float = 0.0
    delivered_at: float = 0.0  # when the counts reached the expected figures (or settle ended)
    late_sends: int = 0  # paced: requests sent more than 10 ms after their slot
    cpu: dict[str, float] = field(default_factory=dict)
    per_process: list[float] = field(default_factory=list)  # uvicorn processes, busiest first


def cpu_groups(
    server_sessions: list[int], database: str, clients: list[int]
) -> tuple[float, float, float, float, float]:
    """CPU seconds so far: server(s), PostgreSQL, Redis, client processes (this one included),
    whole machine."""
    server = 0.0
    machine = 0.0
    postgres = 0.0
    for number, session in enumerate(server_sessions):
        sample = cpu_sample(session, database)
        server += sum(sample.server.values())
        if number == 0:
            postgres, machine = sum(sample.postgres.values()), sample.machine
    client = time.process_time()
    for pid in clients:
        with contextlib.suppress(OSError):
            client += process_cpu_seconds(pid)
    return server, postgres, redis_cpu_seconds(), client, machine


def process_seconds(session: int) -> dict[int, float]:
    seconds = {}
    for pid in session_pids(session):
        with contextlib.suppress(OSError, IndexError, ValueError):
            seconds[pid] = process_cpu_seconds(pid)
    return seconds


def cores_between(
    before: tuple[float, ...], after: tuple[float, ...], seconds: float
) -> dict[str, float]:
    names = ("server", "pg", "redis", "clients", "machine")
    used = {name: (b - a) / seconds for name, a, b in zip(names, before, after, strict=True)}
    used["other"] = max(
        0.0, used["machine"] - used["server"] - used["pg"] - used["redis"] - used["clients"]
    )
    return used


def rss_kb(sessions: list[int]) -> int:
    return sum(proc_status_kb(pid, "VmRSS") for s in sessions for pid in session_pids(s))


async def create_one(
    load: Load, fleet: Fleet, number: int, name: str, result: Round, created: dict[str, Created]
) -> None:
    body = orjson.dumps(
        {
            "deviceId": str(fleet.devices[number]),
            "description": f"bench {name}",
            "c8y_Restart": {},
        }
    )
    sent = time.perf_counter()
    status, payload, seconds, problem = await load.one(
        Call("POST", "/devicecontrol/operations", body)
    )
    answered = time.perf_counter()
    result.rest.append(seconds)
    result.last_answer = max(result.last_answer, answered)
    if status != 201:
        result.errors[problem or f"HTTP {status} {payload[:120]!r}"] += 1
        return
    result.ok += 1
    created[str(orjson.loads(payload)["id"])] = Created(number, sent, answered, name)


async def burst(
    load: Load, fleet: Fleet, name: str, concurrency: int, created: dict[str, Created]
) -> Round:
    result = Round(name, len(fleet.devices))
    pending = iter(range(len(fleet.devices)))
    result.started = time.perf_counter()

    async def connection() -> None:
        for number in pending:
            await create_one(load, fleet, number, name, result, created)

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return result


async def paced(load: Load, fleet: Fleet, rate: float, created: dict[str, Created]) -> Round:
    name = f"paced {rate:g}/s"
    result = Round(name, len(fleet.devices))
    result.started = start = time.perf_counter()
    tasks = []
    for number in range(len(fleet.devices)):
        slot = start + number / rate
        delay = slot - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.010:
            result.late_sends += 1
        tasks.append(asyncio.create_task(create_one(load, fleet, number, name, result, created)))
    await asyncio.gather(*tasks)
    return result


async def wait_delivered(
    pools: Pools, expected: Counter[str], result: Round, settle: float
) -> Counter[str]:
    """Poll the client processes until every expected event arrived, or `settle` seconds after
    the round's last REST answer."""
    while True:
        counts = await pools.counts()
        now = time.perf_counter()
        if all(counts[kind] >= n for kind, n in expected.items()):
            result.delivered_at = now
            return counts
        if now - result.last_answer > settle:
            result.delivered_at = now
            return counts
        await asyncio.sleep(0.05)


async def redis_ceiling(pools: Pools, url: str, samples: int) -> list[float]:
    """PUBLISH from this process, SUBSCRIBE in client process 0 (another connection, another
    process): the send time travels in the payload (an operation event's size)."""
    import redis

    channel = f"{PREFIX}:ceiling"
    loop = asyncio.get_running_loop()
    pools.conns[0].send(("redis", url, channel))
    await loop.run_in_executor(None, pools.conns[0].recv)  # subscribed
    client = redis.Redis.from_url(url)
    padding = b" " * 600
    for _ in range(samples):
        client.publish(channel, f"{time.perf_counter():<24.9f}".encode() + padding)
        await asyncio.sleep(0.002)
    client.publish(channel, b"end")
    client.close()
    _, latencies = await loop.run_in_executor(None, pools.conns[0].recv)
    return latencies


@dataclass
class Outcome:
    rounds: list[Round]
    created: dict[str, Created]
    receipts: list[Receipt]
    client_errors: Counter[str]
    connected: int
    connect_seconds: float
    connect_errors: Counter[str]
    rss_before_kb: int
    rss_after_kb: int
    redis_before: int
    redis_after: int
    redis_latencies: list[float]
    connects_sent: int
    expected_clients: int
    warm: tuple[int, float] = (0, 0.0)


async def drive(
    args: argparse.Namespace,
    rest_base: str,
    server_sessions: list[int],
    uvicorn_session: int,
    database: str,
    fleet: Fleet,
    pools: Pools,
    out: Report,
) -> Outcome:
    async with Load(rest_base, args.concurrency, server_sessions[0], database) as load:
        warm = await load.warm_up(WARM_PATH, minimum=4 * args.concurrency, median_factor=3)
        out(f"REST warm-up: {warm[0]} requests, slowest {warm[1] * 1000:.0f} ms")
        await asyncio.sleep(1.0)
        rss_before = rss_kb([uvicorn_session])
        redis_before = redis_used_memory(args.redis_url)

        answers = await pools.ask(("connect", args.connect_batch))
        connected = sum(a[1] for a in answers)
        connect_seconds = max(a[2] for a in answers)
        connect_errors: Counter[str] = Counter()
        for answer in answers:
            connect_errors.update(answer[3])
        expected_clients = args.clients + 1 + args.cometd_clients
        out(
            f"connected {connected} of {expected_clients} clients in {connect_seconds:.1f} s"
            + (f"; errors: {dict(connect_errors)}" if connect_errors else "")
        )
        await asyncio.sleep(2.0)  # every first connect answered and the next one held
        rss_after = rss_kb([uvicorn_session])
        redis_after = redis_used_memory(args.redis_url)

        redis_latencies = await redis_ceiling(pools, args.redis_url, args.redis_samples)
        out(f"raw Redis PUBLISH -> subscriber: {len(redis_latencies)} samples")

        created: dict[str, Created] = {}
        cometd_numbers = set(range(args.cometd_clients))
        expected: Counter[str] = Counter()
        rounds: list[Round] = []
        plans: list[tuple[str, Any]] = [(f"burst {i + 1}", None) for i in range(args.rounds)]
        if args.paced_rate > 0:
            plans.append(("paced", args.paced_rate))
        for name, rate in plans:
            before = cpu_groups(server_sessions, database, pools.pids)
            workers_before = process_seconds(uvicorn_session)
            if rate is None:
                result = await burst(load, fleet, name, args.concurrency, created)
            else:
                async with Load(
                    rest_base, args.paced_connections, server_sessions[0], database
                ) as open_loop:
                    result = await paced(open_loop, fleet, rate, created)
            ok_numbers = [c.number for c in created.values() if c.round == result.name]
            expected["d"] += len(ok_numbers)
            expected["s"] += len(ok_numbers)
            expected["c"] += sum(1 for n in ok_numbers if n in cometd_numbers)
            counts = await wait_delivered(pools, expected, result, args.settle)
            result.cpu = cores_between(
                before,
                cpu_groups(server_sessions, database, pools.pids),
                result.delivered_at - result.started,
            )
            result.per_process = sorted(
                (
                    (value - workers_before.get(pid, 0.0)) / (result.delivered_at - result.started)
                    for pid, value in process_seconds(uvicorn_session).items()
                ),
                reverse=True,
            )
            rounds.append(result)
            missing = {k: expected[k] - counts[k] for k in expected if counts[k] < expected[k]}
            out(
                f"{result.name}: {result.ok} creates in {result.last_answer - result.started:.1f} s, "
                f"all events in {result.delivered_at - result.started:.1f} s"
                + (f"; MISSING {missing}" if missing else "")
            )
            await asyncio.sleep(1.0)

    receipts: list[Receipt] = []
    client_errors: Counter[str] = Counter()
    connects_sent = 0
    for _, part, errors, connects in await pools.ask(("collect",)):
        receipts.extend(part)
        client_errors.update(errors)
        connects_sent += connects
    return Outcome(
        rounds=rounds,
        created=created,
        receipts=receipts,
        client_errors=client_errors,
        connected=connected,
        connect_seconds=connect_seconds,
        connect_errors=connect_errors,
        rss_before_kb=rss_before,
        rss_after_kb=rss_after,
        redis_before=redis_before,
        redis_after=redis_after,
        redis_latencies=redis_latencies,
        connects_sent=connects_sent,
        expected_clients=expected_clients,
        warm=warm,
    )


# --- report ---------------------------------------------------------------------------------------


def ms(values: list[float], q: float) -> float:
    return percentile(values, q) * 1000


def report(args: argparse.Namespace, outcome: Outcome, out: Report) -> int:
    """Print the tables; the exit status (1: lost events, errors or misrouted events)."""
    created = outcome.created
    by_kind: dict[tuple[str, str], list[float]] = defaultdict(list)  # (round, kind) -> latencies
    last_receive: dict[str, float] = defaultdict(float)
    from_sent: dict[str, list[float]] = defaultdict(list)  # device events, from the request sent
    seen: Counter[tuple[str, int, str]] = Counter()
    misrouted = unknown = 0
    for kind, number, op_id, received in outcome.receipts:
        seen[(kind, number, op_id)] += 1
        origin = created.get(op_id)
        if origin is None:
            unknown += 1
            continue
        if kind in "dc" and number != origin.number:
            misrouted += 1
            continue
        if seen[(kind, number, op_id)] > 1:
            continue
        by_kind[(origin.round, kind)].append(received - origin.answered)
        if kind == "d":
            last_receive[origin.round] = max(last_receive[origin.round], received)
            from_sent[origin.round].append(received - origin.sent)
    duplicates = sum(n - 1 for n in seen.values() if n > 1)

    out()
    out(
        f"{'round':<14}{'creates':>8}{'errors':>7}{'REST/s':>8}{'REST p50':>9}{'REST p99':>9}"
        f"{'events':>8}{'lost':>6}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'ev/s':>8}"
        f"{'* lost':>7}{'* p50':>7}{'* p99':>7}{'* max':>7}"
    )
    total_lost = 0
    all_device: list[float] = []
    all_star: list[float] = []
    for result in outcome.rounds:
        device = sorted(by_kind[(result.name, "d")])
        star = sorted(by_kind[(result.name, "s")])
        all_device.extend(device)
        all_star.extend(star)
        lost = result.ok - len(device)
        star_lost = result.ok - len(star)
        total_lost += lost + star_lost
        rest = sorted(result.rest)
        rest_rate = result.ok / (result.last_answer - result.started)
        span = last_receive[result.name] - result.started
        ev_rate = len(device) / span if span > 0 else math.nan
        out(
            f"{result.name:<14}{result.ok:>8}{sum(result.errors.values()):>7}{rest_rate:>8.1f}"
            f"{ms(rest, 0.5):>9.1f}{ms(rest, 0.99):>9.1f}{len(device):>8}{lost:>6}"
            f"{ms(device, 0.5):>8.1f}{ms(device, 0.99):>8.1f}{ms(device, 1.0):>8.1f}"
            f"{ev_rate:>8.1f}{star_lost:>7}{ms(star, 0.5):>7.1f}{ms(star, 0.99):>7.1f}"
            f"{ms(star, 1.0):>7.1f}"
        )
    all_device.sort()
    all_star.sort()
    redis = sorted(outcome.redis_latencies)
    out(
        f"{'all rounds':<14}{sum(r.ok for r in outcome.rounds):>8}"
        f"{sum(sum(r.errors.values()) for r in outcome.rounds):>7}{'':>8}{'':>9}{'':>9}"
        f"{len(all_device):>8}{sum(r.ok for r in outcome.rounds) - len(all_device):>6}"
        f"{ms(all_device, 0.5):>8.1f}{ms(all_device, 0.99):>8.1f}{ms(all_device, 1.0):>8.1f}"
        f"{'':>8}{sum(r.ok for r in outcome.rounds) - len(all_star):>7}"
        f"{ms(all_star, 0.5):>7.1f}{ms(all_star, 0.99):>7.1f}{ms(all_star, 1.0):>7.1f}"
    )
    out(
        f"{'Redis ceiling':<14}{len(redis):>8}{'':>7}{'':>8}{'':>9}{'':>9}{'':>8}{'':>6}"
        f"{ms(redis, 0.5):>8.2f}{ms(redis, 0.99):>8.2f}{ms(redis, 1.0):>8.2f}"
    )
    cometd = sorted(lat for (_, kind), lats in by_kind.items() if kind == "c" for lat in lats)
    cometd_expected = sum(1 for c in created.values() if c.number < args.cometd_clients)
    out(
        f"aiocometd-ng clients ({args.cometd_clients}, same devices as raw clients 0..): "
        f"{len(cometd)} of {cometd_expected} events, p50 {ms(cometd, 0.5):.1f} ms, "
        f"max {ms(cometd, 1.0):.1f} ms; raw clients of the same devices: p50 "
        f"{ms(raw_same_devices(outcome, args.cometd_clients), 0.5):.1f} ms"
    )
    total_lost += cometd_expected - len(cometd)

    out()
    out("device events, latency from the REST request sent (not its response) to the client:")
    for result in outcome.rounds:
        values = sorted(from_sent[result.name])
        out(
            f"  {result.name:<12} p50 {ms(values, 0.5):7.1f} ms  p99 {ms(values, 0.99):7.1f} ms"
            f"  max {ms(values, 1.0):7.1f} ms"
        )

    out()
    out(
        f"{'cores busy':<14}"
        + "".join(f"{n:>9}" for n in ("server", "pg", "redis", "clients", "other"))
    )
    for result in outcome.rounds:
        out(
            f"{result.name:<14}"
            + "".join(
                f"{result.cpu.get(n, math.nan):>9.2f}"
                for n in ("server", "pg", "redis", "clients", "other")
            )
        )
    for result in outcome.rounds:
        split = " ".join(f"{cores:.2f}" for cores in result.per_process)
        out(f"uvicorn cores per process, {result.name}: {split}")
    late = [r for r in outcome.rounds if r.late_sends]
    for result in late:
        out(f"{result.name}: {result.late_sends} requests sent more than 10 ms after their slot")

    out()
    sessions = max(1, outcome.connected)
    rss_delta = (outcome.rss_after_kb - outcome.rss_before_kb) * 1024
    redis_delta = outcome.redis_after - outcome.redis_before
    out(
        f"server RSS ({args.workers} uvicorn worker(s) + supervisor): "
        f"{outcome.rss_before_kb / 1024:.1f} MiB before, {outcome.rss_after_kb / 1024:.1f} MiB "
        f"with {outcome.connected} clients connected and subscribed: "
        f"{rss_delta / sessions / 1024:.1f} KiB per client"
    )
    out(
        f"Redis used_memory: {outcome.redis_before / 2**20:.1f} MiB before, "
        f"{outcome.redis_after / 2**20:.1f} MiB after: {redis_delta / sessions / 1024:.2f} KiB "
        "per client (session hash, subscription sets, expiry and user zsets)"
    )

    p50_ratio = ms(all_device, 0.5) / ms(redis, 0.5) if redis else math.nan
    p99_ratio = ms(all_device, 0.99) / ms(redis, 0.99) if redis else math.nan
    out(
        f"ratio event latency / raw Redis PUBLISH latency: p50 {ms(all_device, 0.5):.1f} / "
        f"{ms(redis, 0.5):.2f} ms = {p50_ratio:.0f}x, p99 {ms(all_device, 0.99):.1f} / "
        f"{ms(redis, 0.99):.2f} ms = {p99_ratio:.0f}x"
    )
    if outcome.rounds:
        aim = ms(all_device, 0.99) < AIM_P99_MS
        out(
            f"aim p99 < {AIM_P99_MS:.0f} ms at {args.clients} clients: "
            f"{'met' if aim else 'MISSED'} (p99 {ms(all_device, 0.99):.1f} ms); events lost: "
            f"{total_lost}"
        )
    out(
        f"Bayeux connects sent by the raw clients: {outcome.connects_sent} "
        f"(handshake to end; each held connect answered at its timeout or when superseded)"
    )
    if outcome.client_errors:
        out(f"client errors: {dict(outcome.client_errors)}")
    for result in outcome.rounds:
        if result.errors:
            out(f"REST errors in {result.name}: {dict(result.errors)}")
    if misrouted or unknown or duplicates:
        out(f"MISROUTED {misrouted}, UNKNOWN {unknown}, DUPLICATE {duplicates} events")
    out(
        "latency = client's receive time - this process's REST response time (CLOCK_MONOTONIC, "
        "same host); negative when the event beats the response"
    )
    bad = total_lost or misrouted or unknown or outcome.connected < outcome.expected_clients
    bad = bad or any(r.errors for r in outcome.rounds)

    layout = layout_name(args)
    if outcome.rounds:
        p99 = ms(all_device, 0.99)
        summary(
            out,
            f"event p99 after REST answer, {args.clients} clients, {layout}",
            p99,
            "ms",
            ceiling="raw Redis PUBLISH p99",
            ceiling_value=ms(redis, 0.99) if redis else None,
            goal=f"< {AIM_P99_MS:.0f} ms, 0 lost",
            met=bool(p99 < AIM_P99_MS and not total_lost and not misrouted),
        )
        bursts = [r for r in outcome.rounds if r.name.startswith("burst")] or outcome.rounds
        seconds = sum(r.last_answer - r.started for r in bursts)
        summary(
            out,
            f"REST creates/s beside it ({args.concurrency} connections), {layout}",
            sum(r.ok for r in bursts) / seconds if seconds > 0 else math.nan,
            "req/s",
        )
        busiest = max((r.per_process[0] for r in bursts if r.per_process), default=math.nan)
        summary(out, f"busiest uvicorn process during bursts, {layout}", busiest, "cores")
    summary(
        out,
        f"server RSS per idle subscribed client, {outcome.connected} clients on "
        f"{args.workers} uvicorn process(es)",
        rss_delta / sessions / 1024,
        "KiB",
        goal="reported (Redis: see above)",
    )
    return 1 if bad else 0


def raw_same_devices(outcome: Outcome, count: int) -> list[float]:
    """Latencies of the raw clients whose devices the aiocometd-ng clients also watch."""
    values = []
    for kind, number, op_id, received in outcome.receipts:
        origin = outcome.created.get(op_id)
        if kind == "d" and number < count and origin is not None and origin.number == number:
            values.append(received - origin.answered)
    return sorted(values)


# --- main -----------------------------------------------------------------------------------------


def raise_open_files(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else wanted
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = Report()
    clock = time.get_clock_info("perf_counter").implementation
    if "CLOCK_MONOTONIC" not in clock:
        raise SystemExit(f"perf_counter is {clock}, not CLOCK_MONOTONIC: cannot compare processes")
    files = raise_open_files(4 * args.clients + 1000)  # inherited by the server and the clients
    url, admin_url = checked_database_url(args.database_url)
    redis_url = checked_redis_url(args.redis_url)
    port = free_port()
    rest_port = free_port() if args.rest in ("gunicorn", "nginx") else port
    public_port = free_port() if args.rest == "nginx" else None  # nginx: REST and WebSocket
    per_user = math.ceil(args.clients / args.users) + 10
    command = uvicorn_command(args.workers, port)

    out("# bench/realtime.py")
    out(command_line("bench/realtime.py", argv))
    out(f"server command: {shlex.join(command)}")
    if args.rest in ("gunicorn", "nginx"):
        out(f"REST served by: {shlex.join(gunicorn_command(args.rest_workers, rest_port))}")
        if public_port is not None:
            out(
                f"nginx on 127.0.0.1:{public_port} in front of both (deploy/nginx.conf): the "
                "clients and the REST load go through it"
            )
    else:
        out("REST served by the same uvicorn (one ASGI server for HTTP and WebSocket)")
    out(
        f"server env: REDIS_URL={redis_url} REALTIME_PREFIX={PREFIX} CHANNELS_PREFIX={PREFIX} "
        f"REALTIME_SESSIONS_PER_USER={per_user} (default 10: {args.clients} devices are owned by "
        f"{args.users} device users); open files limit {files}"
    )
    out(machine_line())
    out(f"database: {redacted(url)} (dropped and re-created); Redis {redis_url} (flushed)")
    out(load_average_line())
    out(
        f"clients: {args.clients} raw WebSocket Bayeux clients (aiohttp {aiohttp.__version__}) + 1 on "
        f"/operations/* + {args.cometd_clients} aiocometd-ng, in {args.client_procs} process(es); "
        f"load: {args.rounds} burst round(s) over {args.concurrency} connections"
        + (f", 1 paced round at {args.paced_rate:g}/s" if args.paced_rate else "")
    )

    started = time.perf_counter()
    recreate_database(url, admin_url)
    flush_redis(redis_url)
    env = bench_env(
        url,
        REDIS_URL=redis_url,
        REALTIME_PREFIX=PREFIX,
        CHANNELS_PREFIX=PREFIX,
        REALTIME_SESSIONS_PER_USER=str(per_user),
    )
    migrate_and_create_user(env)
    setup_django(env)
    fleet = seed(args)
    out(
        f"setup (database, migrate, users, {args.clients} devices): {time.perf_counter() - started:.1f} s"
    )

    ws_url = f"ws://127.0.0.1:{public_port or port}/notification/realtime"
    star = token(BENCH_USER, BENCH_PASSWORD)
    shares: list[list[tuple[int, int, str]]] = [[] for _ in range(args.client_procs)]
    for number, device in enumerate(fleet.devices):
        shares[number % args.client_procs].append(
            (number, device, token(fleet.owners[number], FLEET_PASSWORD))
        )
    cometd = [(n, fleet.devices[n], star) for n in range(args.cometd_clients)]
    specs = [
        PoolSpec(
            index=i,
            ws_url=ws_url,
            clients=share,
            star_token=star if i == 0 else None,
            cometd=cometd if i == args.client_procs - 1 else [],
        )
        for i, share in enumerate(shares)
    ]

    log_dir = Path(tempfile.mkdtemp(prefix="dp-bench-rt-"))
    servers = [Server(command, env, log_dir / "uvicorn.log")]
    ready_ports = [port]
    if args.rest in ("gunicorn", "nginx"):
        servers.append(
            Server(gunicorn_command(args.rest_workers, rest_port), env, log_dir / "gunicorn.log")
        )
        ready_ports.append(rest_port)
    if public_port is not None:
        servers.append(nginx_server(log_dir, env, public_port, rest_port, port))
        ready_ports.append(public_port)
    pools: Pools | None = None
    try:
        for server, ready_port in zip(servers, ready_ports, strict=True):
            server.wait_ready(f"http://127.0.0.1:{ready_port}/tenant/loginOptions")
        pools = Pools(specs)
        try:
            import uvloop

            runner: Any = uvloop.run
        except ImportError:  # pragma: no cover
            runner = asyncio.run
        outcome = runner(
            drive(
                args,
                f"http://127.0.0.1:{public_port or rest_port}",
                [s.pid for s in servers],
                servers[0].pid,
                database_name(url),
                fleet,
                pools,
                out,
            )
        )
        for server in servers:
            if not server.alive():
                raise SystemExit(f"server died during the run:\n{server.log_tail()}")
        status = report(args, outcome, out)
    finally:
        if pools is not None:
            for conn in pools.conns:
                with contextlib.suppress(OSError):
                    conn.send(("stop",))
            pools.stop()
        for server in servers:
            server.stop()
        with contextlib.suppress(Exception):
            flush_redis(redis_url)
    out(f"server log: {log_dir}; total run time {time.perf_counter() - started:.1f} s")
    if args.save:
        out.save("realtime")
    return status


if __name__ == "__main__":
    run_main(main)
