"""Device control at 10,000 and 1,000,000 operations: the agent's poll, a device's history page, creates.

Creates a dedicated PostgreSQL database, migrates it, seeds 100 agents x 10 devices and grows the
operations table with COPY in two stages (10k rows, then 1M rows). At each size it measures, through
gunicorn (sync workers) and directly in SQL:

  * the agent's poll "my PENDING operations, oldest first":
    GET /devicecontrol/operations?agentId=A&status=PENDING&pageSize=100
  * a device's history page:   GET /devicecontrol/operations?deviceId=D&pageSize=20&currentPage=1
  * the same, newest first:    ...&dateFrom=1970-01-01&revert=true
  * a device's queue:          GET /devicecontrol/operations?deviceId=D&status=PENDING&pageSize=100
  * the poll as the agent's own device user (group `devices`, no ROLE_DEVICE_CONTROL_READ), so the
    owner visibility filter applies (SQL only: each user would pay a password hash per worker)

with p50/p99 over requests spread across agents and devices, and prints the SQL the view runs (captured
from a real request through Django's debug cursor) with its EXPLAIN (ANALYZE, BUFFERS) plan. With 1M
rows present it then measures create-operation requests/s with 16 concurrent connections as a ratio
to a raw single-row INSERT into the operations table in the same run (shared/PERFORMANCE.md), and to a
bare DRF CreateAPIView inserting the same row in the same server (bench/bare_drf), the two measured
alternately (bare, product, bare, product, ...).

Usage (see bench/README.md):  .venv/bin/python bench/operations.py [--large 200000] [--reads 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import random
import shlex
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson
import psycopg
from _common import (
    BENCH_PASSWORD,
    BENCH_USER,
    REPO,
    TABLE_HEADER,
    Call,
    Load,
    PhaseResult,
    Report,
    Server,
    basic_auth,
    bench_env,
    checked_database_url,
    combined,
    command_line,
    cores_used,
    cpu_sample,
    create_device_users,
    database_name,
    free_port,
    gunicorn_command,
    load_average_line,
    machine_line,
    migrate_and_create_user,
    recreate_database,
    run_main,
    setup_django,
    summary,
    time_statement,
    usable_cores,
    wait_for_idle,
)
from psycopg.types.json import Jsonb

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/dp_bench_ops"
AGENT_USER_PASSWORD = "agent-pw:not-secret"
TABLE = "devicecontrol_operation"

# The index each measured query must use (models.py Meta.indexes); alternatives after the first.
EXPECTED_INDEX = {
    "poll": ("operation_agent_status_idx",),
    # Under the owner filter the plan starts from the user's devices (mo_owner_upper_idx) and
    # needs (device_id, status) to stay independent of each device's history.
    "poll as agent's user": ("operation_device_status_idx",),
    # With a few rows per device the planner may take (device_id, status, id) and sort.
    "history": ("operation_device_idx", "operation_device_status_idx"),
    "history newest first": ("operation_device_idx", "operation_device_status_idx"),
    "device's PENDING": ("operation_device_status_idx",),
}


def uses_expected(name: str, indexes: list[str]) -> bool:
    return any(index in indexes for index in EXPECTED_INDEX[name])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=4, help="gunicorn sync workers")
    parser.add_argument("--concurrency", "-c", type=int, default=16, help="create connections")
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--devices-per-agent", type=int, default=10)
    parser.add_argument("--small", type=int, default=10_000, help="operations at the first size")
    parser.add_argument("--large", type=int, default=1_000_000, help="operations at the second")
    parser.add_argument(
        "--pending-per-device", type=int, default=2, help="queued PENDING operations per device"
    )
    parser.add_argument("--reads", type=int, default=300, help="requests per query and size")
    parser.add_argument("--creates", type=int, default=3000, help="product creates (all rounds)")
    parser.add_argument(
        "--ab-rounds",
        type=int,
        default=3,
        help="creates alternate bare DRF and product phases this many times each",
    )
    parser.add_argument("--raw-inserts", type=int, default=3000)
    parser.add_argument(
        "--phase-timeout", type=float, default=40.0, help="seconds before a phase stops issuing"
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_OPS_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="PostgreSQL on loopback; DROPPED and re-created (its name must contain 'bench')",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=60.0,
        help="before each measured size, wait up to this many seconds for the rest of the machine "
        "to be quiet (other people's test runs share these cores); 0: do not wait",
    )
    parser.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--save", action="store_true", help="also write bench/results/*.txt")
    args = parser.parse_args(argv)
    queue = args.agents * args.devices_per_agent * args.pending_per_device + args.agents
    if not queue < args.small < args.large:
        parser.error(f"need {queue} (queued operations) < --small < --large")
    return args


# --- seeding --------------------------------------------------------------------------------------


@dataclass
class Fleet:
    agents: list[int]
    devices: list[int]  # child devices only
    agent_of: dict[int, int]  # every target (agents and devices) -> its agent
    user_of_agent: dict[int, str]  # the device user that owns an agent and its children


def seed_inventory(args: argparse.Namespace) -> Fleet:
    """Agents with `com_cumulocity_model_Agent`, each with child devices (childDevices edges) and one
    c8y_Serial external ID per device. Each agent's objects are owned by its own device user (group
    `devices`, without ROLE_DEVICE_CONTROL_READ), as the agent's own credentials would create them."""

    from inventory.models import ExternalId, ManagedObject, ManagedObjectReference, Relation

    users = create_device_users(
        [f"agent-user-{a:03d}" for a in range(args.agents)], AGENT_USER_PASSWORD
    )
    agents = ManagedObject.objects.bulk_create(
        [
            ManagedObject(
                type="c8y_BenchAgent",
                name=f"agent-{a:03d}",
                owner=users[a].username,
                fragments={"com_cumulocity_model_Agent": {}, "c8y_IsDevice": {}},
                is_device=True,
                is_agent=True,
            )
            for a in range(args.agents)
        ]
    )
    children = ManagedObject.objects.bulk_create(
        [
            ManagedObject(
                type="c8y_BenchDevice",
                name=f"device-{a:03d}-{d:02d}",
                owner=users[a].username,
                fragments={"c8y_IsDevice": {}, "c8y_Hardware": {"serialNumber": f"sn-{a}-{d}"}},
                is_device=True,
            )
            for a in range(args.agents)
            for d in range(args.devices_per_agent)
        ]
    )
    per = args.devices_per_agent
    ManagedObjectReference.objects.bulk_create(
        [
            ManagedObjectReference(
                parent=agents[i // per], child=child, relation=Relation.DEVICE.value
            )
            for i, child in enumerate(children)
        ]
    )
    ExternalId.objects.bulk_create(
        [
            ExternalId(type="c8y_Serial", external_id=f"sn-{i:05d}", managed_object=child)
            for i, child in enumerate(children)
        ]
    )
    agent_of = {agent.pk: agent.pk for agent in agents}
    agent_of.update({child.pk: agents[i // per].pk for i, child in enumerate(children)})
    return Fleet(
        agents=[agent.pk for agent in agents],
        devices=[child.pk for child in children],
        agent_of=agent_of,
        user_of_agent={agents[a].pk: users[a].username for a in range(args.agents)},
    )


HISTORY_FRAGMENTS = [
    ("Restart device", '{"c8y_Restart": {}}'),
    ("Execute shell command", '{"c8y_Command": {"text": "uptime", "result": "up 3 days"}}'),
    ("Send configuration", '{"c8y_Configuration": {"config": "interval=60"}}'),
    (
        "Update software",
        '{"c8y_SoftwareUpdate": [{"name": "agent", "version": "1.4.2", "action": "install"}]}',
    ),
]
COPY_COLUMNS = (
    "device_id, agent_id, status, creation_time, status_changed_at, failure_reason, fragments,"
    " expires_at, executing_since"
)


class Timeline:
    """Row k of the final table was created at start + k * step: creation order follows id order,
    and every row is younger than the default retention, so no sweeper would touch it."""

    def __init__(self, total: int) -> None:
        self.start = datetime.now(UTC) - timedelta(days=20)
        self.step = timedelta(days=19) / total

    def at(self, k: int) -> datetime:
        return self.start + self.step * k


def _ts(moment: datetime) -> str:
    return moment.isoformat()


def history_rows(
    fleet: Fleet, timeline: Timeline, first: int, count: int, rng: random.Random
) -> Iterator[str]:
    """Finished operations, one COPY text line each: 88 % SUCCESSFUL, 12 % FAILED with a reason, on
    random targets (agents and their devices)."""
    targets = fleet.devices + fleet.agents
    for k in range(first, first + count):
        target = targets[rng.randrange(len(targets))]
        created = timeline.at(k)
        description, fragment = HISTORY_FRAGMENTS[k % len(HISTORY_FRAGMENTS)]
        body = fragment[:-1] + f', "description": "{description}"}}'
        failed = rng.random() < 0.12
        yield (
            f"{target}\t{fleet.agent_of[target]}\t{'FAILED' if failed else 'SUCCESSFUL'}\t"
            f"{_ts(created)}\t{_ts(created + timedelta(seconds=30))}\t"
            f"{'Timeout waiting for the device' if failed else chr(92) + 'N'}\t{body}\t\\N\t"
            f"{_ts(created + timedelta(seconds=5))}\n"
        )


def queue_rows(
    fleet: Fleet, timeline: Timeline, first: int, pending_per_device: int
) -> Iterator[str]:
    """The live queue, the newest rows: PENDING operations for every device and one EXECUTING
    operation per agent."""
    k = first
    for _ in range(pending_per_device):
        for device in fleet.devices:
            created = timeline.at(k)
            yield (
                f"{device}\t{fleet.agent_of[device]}\tPENDING\t{_ts(created)}\t{_ts(created)}\t\\N\t"
                f'{{"c8y_Restart": {{}}, "description": "Restart device"}}\t'
                f"{_ts(created + timedelta(days=7))}\t\\N\n"
            )
            k += 1
    for agent in fleet.agents:
        created = timeline.at(k)
        yield (
            f"{agent}\t{agent}\tEXECUTING\t{_ts(created)}\t{_ts(created)}\t\\N\t"
            f'{{"c8y_SoftwareUpdate": [], "description": "Update software"}}\t\\N\t'
            f"{_ts(created)}\n"
        )
        k += 1


def copy_rows(conn: psycopg.Connection, rows: Iterator[str], chunk: int = 20_000) -> int:
    """COPY text lines into the operations table; `id` comes from its default (the global
    sequence)."""
    written = 0
    with conn.cursor() as cursor, cursor.copy(f"COPY {TABLE} ({COPY_COLUMNS}) FROM STDIN") as copy:
        buffer = io.StringIO()
        for number, line in enumerate(rows, 1):
            buffer.write(line)
            if number % chunk == 0:
                copy.write(buffer.getvalue())
                buffer = io.StringIO()
            written = number
        copy.write(buffer.getvalue())
    return written


def grow_operations(
    url: str,
    fleet: Fleet,
    timeline: Timeline,
    *,
    current: int,
    target: int,
    queue: int,
    pending_per_device: int,
    rng: random.Random,
) -> tuple[int, float]:
    """Bring the table from `current` to `target` rows: the queued operations finish (so the queue
    stays the same size), history is appended, then a fresh queue; VACUUM ANALYZE. (rows, s)."""
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        if current:
            conn.execute(
                f"UPDATE {TABLE} SET status = 'SUCCESSFUL', status_changed_at = now(),"
                " expires_at = NULL WHERE status IN ('PENDING', 'EXECUTING')"
            )
        history = target - current - queue
        with conn.transaction():
            copy_rows(conn, history_rows(fleet, timeline, current, history, rng))
            copy_rows(conn, queue_rows(fleet, timeline, target - queue, pending_per_device))
        conn.execute(f"VACUUM (ANALYZE) {TABLE}")
        rows = conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]
    return rows, time.perf_counter() - started


def wait_idle(max_seconds: float, threshold: float = 0.4, quiet_windows: int = 3) -> str:
    """Wait until the machine (our idle server included) used less than `threshold` cores in
    `quiet_windows` consecutive one-second windows, or `max_seconds` passed. Returns a summary."""
    if max_seconds <= 0:
        return "not waiting for an idle machine (--wait-idle 0)"
    quiet, waited, busy = wait_for_idle(max_seconds, threshold, quiet_windows)
    if quiet:
        return f"machine quiet after {waited:.0f} s ({busy:.2f} cores busy)"
    return (
        f"machine still busy after {max_seconds:.0f} s ({busy:.2f} cores busy by others): "
        "figures below are disturbed, compare the 'other' columns"
    )


# --- the measured queries -------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """One measured list query: its name, the query string for a target, and whose it is."""

    name: str
    params: Callable[[int], dict[str, str]]
    targets: str  # "agents" or "devices"
    as_agent_user: bool = False


QUERIES = [
    Query(
        "poll",
        lambda agent: {"agentId": str(agent), "status": "PENDING", "pageSize": "100"},
        "agents",
    ),
    Query(
        "poll as agent's user",
        lambda agent: {"agentId": str(agent), "status": "PENDING", "pageSize": "100"},
        "agents",
        as_agent_user=True,
    ),
    Query(
        "history",
        lambda device: {"deviceId": str(device), "pageSize": "20", "currentPage": "1"},
        "devices",
    ),
    Query(
        "history newest first",
        lambda device: {
            "deviceId": str(device),
            "dateFrom": "1970-01-01",
            "revert": "true",
            "pageSize": "20",
            "currentPage": "1",
        },
        "devices",
    ),
    # The `operationsByDeviceIdAndStatus` template; what c8y-api's select(device_id, status) sends.
    Query(
        "device's PENDING",
        lambda device: {"deviceId": str(device), "status": "PENDING", "pageSize": "100"},
        "devices",
    ),
]


def view_sql(params: dict[str, str], user: Any) -> tuple[str, tuple[Any, ...]]:
    """The page query `OperationCollectionView.get` runs, built by the same code (filter set,
    visibility, ordering, page slice). It is checked against SQL captured from a real request."""
    from django.http import QueryDict

    from devicecontrol import selectors
    from devicecontrol.filters import OperationFilter, page_query
    from deviceplatform.api.pagination import PageRequest

    query = QueryDict(mutable=True)
    query.update(params)
    fixed = page_query(query)
    if fixed is not None and selectors.fixed_page_available():
        # the poll and history shapes: the view's fixed statement (selectors.OperationPage)
        page = PageRequest.from_params(query)
        owner = None if selectors.sees_all_operations(user) else user.username
        sql, sql_params = selectors.OperationPage(
            fixed[0], owner=owner, descending=fixed[1]
        ).statement(page.offset, page.page_size)
        return sql, tuple(sql_params)
    filterset = OperationFilter(query, queryset=selectors.operations_visible_to(user))
    queryset = filterset.qs.order_by(*filterset.ordering())
    page = PageRequest.from_params(query)
    sql, sql_params = queryset[page.offset : page.offset + page.page_size].query.sql_with_params()
    return sql, tuple(sql_params)


def captured_request(path: str, params: dict[str, str], authorization: str) -> list[str]:
    """Every SQL statement one real request runs in this process (Django's debug cursor)."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client(HTTP_AUTHORIZATION=authorization, HTTP_ACCEPT="application/json")
    client.get(path, params)  # the first request pays the password hash and the imports
    with CaptureQueriesContext(connection) as captured:
        response = client.get(path, params)
    if response.status_code != 200:
        raise SystemExit(f"GET {path} {params}: {response.status_code} {response.content[:300]!r}")
    return [query["sql"] for query in captured.captured_queries]


@dataclass
class Plan:
    text: str
    execution_ms: float
    shared_hit: int
    shared_read: int
    rows: int
    indexes: list[str]


def explain(sql: str, params: tuple[Any, ...] = ()) -> Plan:
    from django.db import connection

    def index_names(node: dict[str, Any]) -> list[str]:
        found = [node["Index Name"]] if "Index Name" in node else []
        for child in node.get("Plans", []):
            found += index_names(child)
        return found

    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params)
        data = cursor.fetchone()[0]
        document = (json.loads(data) if isinstance(data, str) else data)[0]
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
        text = "\n".join(row[0] for row in cursor.fetchall())
    top = document["Plan"]
    return Plan(
        text=text,
        execution_ms=document["Execution Time"],
        shared_hit=top.get("Shared Hit Blocks", 0),
        shared_read=top.get("Shared Read Blocks", 0),
        rows=top.get("Actual Rows", 0),
        indexes=index_names(top),
    )


def time_sql(
    query: Query, targets: list[int], users: dict[int, Any], admin: Any, count: int, database: str
) -> tuple[PhaseResult, PhaseResult]:
    """The view's own SQL for `count` random targets on one connection: (round trip including
    fetching every row, execution time inside PostgreSQL from EXPLAIN ANALYZE with TIMING OFF).
    The second is free of the client's and the loopback's scheduling noise."""
    from django.db import connection

    result = PhaseResult(name=query.name)
    inside = PhaseResult(name=query.name)
    before = cpu_sample(None, database)
    start = time.perf_counter()
    with connection.cursor() as cursor:
        for target in targets[:count]:
            user = users[target] if query.as_agent_user else admin
            sql, params = view_sql(query.params(target), user)
            t0 = time.perf_counter()
            cursor.execute(sql, params)
            cursor.fetchall()
            result.latencies.append(time.perf_counter() - t0)
    result.elapsed = time.perf_counter() - start
    result.cpu = cores_used(before, cpu_sample(None, database), result.elapsed)
    inside.cpu = result.cpu
    with connection.cursor() as cursor:
        for target in targets[:count]:
            user = users[target] if query.as_agent_user else admin
            sql, params = view_sql(query.params(target), user)
            cursor.execute("EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) " + sql, params)
            data = cursor.fetchone()[0]
            document = (json.loads(data) if isinstance(data, str) else data)[0]
            inside.latencies.append(document["Execution Time"] / 1000)
    return result, inside


@dataclass
class SizeResult:
    rows: int
    http: dict[str, PhaseResult] = field(default_factory=dict)
    sql: dict[str, PhaseResult] = field(default_factory=dict)
    db: dict[str, PhaseResult] = field(default_factory=dict)
    plans: dict[str, Plan] = field(default_factory=dict)
    result_rows: dict[str, float] = field(default_factory=dict)


def measure_size(
    label: str,
    rows: int,
    args: argparse.Namespace,
    fleet: Fleet,
    base: str,
    server: Server,
    database: str,
    out: Report,
) -> SizeResult:
    from django.contrib.auth import get_user_model
    from django.db import connection

    user_model = get_user_model()
    admin = user_model.objects.get(username=BENCH_USER)
    owners = {u.username: u for u in user_model.objects.filter(username__startswith="agent-user")}
    users = {agent: owners[name] for agent, name in fleet.user_of_agent.items()}
    rng = random.Random(f"{args.seed}-{label}")
    picks = {
        "agents": [rng.choice(fleet.agents) for _ in range(args.reads)],
        "devices": [rng.choice(fleet.devices) for _ in range(args.reads)],
    }
    result = SizeResult(rows=rows)
    out()
    out(f"=== {label}: {rows:,} operations ===")
    out(wait_idle(args.wait_idle))
    for query in QUERIES:
        example = picks[query.targets][0]
        params = query.params(example)
        if query.as_agent_user:
            authorization = basic_auth(fleet.user_of_agent[example], AGENT_USER_PASSWORD)
            user = users[example]
        else:
            authorization = basic_auth(BENCH_USER, BENCH_PASSWORD)
            user = admin
        statements = captured_request("/devicecontrol/operations", params, authorization)
        sql, sql_params = view_sql(params, user)
        composed = connection.ops.compose_sql(sql, sql_params)
        page_statements = [s for s in statements if f'FROM "{TABLE}"' in s]
        same = composed in page_statements
        plan = explain(sql, sql_params)
        result.plans[query.name] = plan
        expected = " or ".join(EXPECTED_INDEX[query.name])
        out()
        out(f"--- {query.name}: GET /devicecontrol/operations?{urlencode(params)}")
        out(
            f"{'' if query.as_agent_user else 'bench admin; '}"
            f"{'agent device user ' + fleet.user_of_agent[example] + ' (no ROLE_DEVICE_CONTROL_READ: owner filter); ' if query.as_agent_user else ''}"
            f"the request ran {len(statements)} SQL statements; the page query "
            f"({'identical to' if same else 'DIFFERS FROM'} the one timed below):"
        )
        out(f"  {composed}")
        for other in statements:
            if other != composed:
                out(f"  other: {other[:160]}{'...' if len(other) > 160 else ''}")
        out(
            f"EXPLAIN (ANALYZE, BUFFERS):  index use "
            f"{'OK' if uses_expected(query.name, plan.indexes) else 'MISSING'}"
            f" ({expected}; plan uses {', '.join(plan.indexes) or 'no index'})"
        )
        for line in plan.text.splitlines():
            out(f"  {line}")
        result.sql[query.name], result.db[query.name] = time_sql(
            query, picks[query.targets], users, admin, args.reads, database
        )

    async def drive() -> None:
        async with Load(base, 1, server.pid, database) as http:
            for query in QUERIES:
                if query.as_agent_user:
                    continue  # one password hash per agent user and worker: SQL-level only
                calls = [
                    Call("GET", "/devicecontrol/operations?" + urlencode(query.params(target)))
                    for target in picks[query.targets]
                ]
                counted: list[int] = []

                def check(payload: bytes, counted: list[int] = counted) -> str | None:
                    counted.append(len(orjson.loads(payload)["operations"]))
                    return None

                sample = await http.run(
                    query.name, calls, args.phase_timeout, check, error_body=120
                )
                result.http[query.name] = sample
                result.result_rows[query.name] = sum(counted) / max(1, len(counted))

    asyncio.run(drive())
    return result


# --- creates --------------------------------------------------------------------------------------


def raw_insert_ceiling(url: str, fleet: Fleet, rows: int, rng: random.Random) -> PhaseResult:
    """One psycopg connection, autocommit, a prepared single-row INSERT into the operations table
    itself (same indexes, same sequence) per round trip: one durable commit each."""
    sql = (
        f"INSERT INTO {TABLE} (device_id, agent_id, status, creation_time, status_changed_at,"
        " fragments, expires_at) VALUES (%s, %s, 'PENDING', now(), now(), %s,"
        " now() + interval '7 days')"
    )
    body = {"description": "Restart device", "c8y_Restart": {}}

    def params() -> tuple[Any, ...]:
        device = rng.choice(fleet.devices)
        return device, fleet.agent_of[device], Jsonb(body)

    with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cursor:
        with contextlib.suppress(psycopg.Error):
            conn.execute("CHECKPOINT")
        return time_statement(cursor, sql, params, rows, database_name(url))


def count_operations(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0])


BARE_CREATE_PATH = "/bench-bare/operations"


def create_calls(
    args: argparse.Namespace, fleet: Fleet, rng: random.Random, count: int, *, bare: bool
) -> list[Call]:
    """`count` creates on random devices: the product's body, or the bare DRF view's (the same
    row: device, its agent, the fragments and a pending deadline a week ahead)."""
    calls = []
    expires = (datetime.now(UTC) + timedelta(days=7)).isoformat()
    for number in range(count):
        device = rng.choice(fleet.devices)
        description = f"Restart device ({number})"
        if bare:
            body: dict[str, Any] = {
                "device": device,
                "agent_id": fleet.agent_of[device],
                "fragments": {"description": description, "c8y_Restart": {}},
                "expires_at": expires,
            }
            calls.append(Call("POST", BARE_CREATE_PATH, orjson.dumps(body)))
        else:
            body = {"deviceId": str(device), "description": description, "c8y_Restart": {}}
            calls.append(Call("POST", "/devicecontrol/operations", orjson.dumps(body)))
    return calls


def measure_creates(
    args: argparse.Namespace, fleet: Fleet, base: str, server: Server, database: str
) -> tuple[PhaseResult, PhaseResult, list[PhaseResult]]:
    """Bare DRF and product creates, alternately (`--ab-rounds` phases of each, bare first), on
    the same server and connections: (product, bare, every phase in order)."""
    rng = random.Random(f"{args.seed}-creates")
    rounds = max(1, args.ab_rounds)
    per_round = max(1, args.creates // rounds)

    def check(payload: bytes) -> str | None:
        return None if orjson.loads(payload).get("status") == "PENDING" else "not PENDING"

    async def drive() -> list[PhaseResult]:
        phases = []
        async with Load(base, args.concurrency, server.pid, database) as http:
            for number in range(1, rounds + 1):
                for bare in (True, False):
                    phases.append(
                        await http.run(
                            f"{'bare DRF' if bare else 'create'} {number}",
                            create_calls(args, fleet, rng, per_round, bare=bare),
                            args.phase_timeout,
                            check,
                            planned=per_round,
                            error_body=120,
                        )
                    )
        return phases

    phases = asyncio.run(drive())
    product = combined("create (HTTP)", [p for p in phases if p.name.startswith("create")])
    bare = combined("bare DRF create", [p for p in phases if p.name.startswith("bare")])
    return product, bare, phases


# --- report ---------------------------------------------------------------------------------------


KIND_LABEL = {"http": "HTTP", "sql": "SQL", "db": "in PG"}


def size_label(rows: int) -> str:
    if rows >= 1_000_000:
        return f"{rows / 1_000_000:.3g}M"
    return f"{rows / 1000:.3g}k"


def side_by_side(small: SizeResult, large: SizeResult, out: Report) -> None:
    sl, ll = size_label(small.rows), size_label(large.rows)
    out()
    out(
        f"=== side by side (latency in ms; rows: operations per page at {sl}/{ll}; a device has "
        "few operations at the small size, so its history page is shorter there) ==="
    )
    header = (
        f"{'query':<34}{'rows':>7}{sl + ' p50':>11}{sl + ' p99':>11}"
        f"{ll + ' p50':>10}{ll + ' p99':>10}{'p50 ' + ll + '/' + sl:>12}"
        f"{'other ' + sl:>10}{'other ' + ll:>10}"
    )
    out(header)
    out("-" * len(header))
    for query in QUERIES:
        for kind in ("http", "sql", "db"):
            a = getattr(small, kind).get(query.name)
            b = getattr(large, kind).get(query.name)
            if a is None or b is None:
                continue
            rows = "/".join(
                f"{size.result_rows.get(query.name, size.plans[query.name].rows):.0f}"
                for size in (small, large)
            )
            cut = "*" if a.cut or b.cut else ""
            out(
                f"{query.name + ' (' + KIND_LABEL[kind] + ')' + cut:<34}"
                f"{rows:>7}{a.p(0.5):>11.2f}{a.p(0.99):>11.2f}{b.p(0.5):>10.2f}"
                f"{b.p(0.99):>10.2f}{b.p(0.5) / a.p(0.5):>11.2f}x"
                f"{a.cpu.get('other', math.nan):>10.2f}{b.cpu.get('other', math.nan):>10.2f}"
            )
    out(
        "HTTP: whole request, one at a time; SQL: the page query's round trip on one connection "
        "(execute + fetch); in PG: its execution time inside PostgreSQL (EXPLAIN ANALYZE, TIMING OFF)"
    )
    out(
        "other: cores used by everything but this benchmark, its server and its database during "
        "the sample (noise)"
    )
    out()
    out("EXPLAIN ANALYZE of the example page query (one execution, warm cache):")
    header = (
        f"{'query':<24}{sl + ' ms':>9}{sl + ' buffers':>13}{ll + ' ms':>9}{ll + ' buffers':>13}"
        f"  index ({sl} / {ll})"
    )
    out(header)
    out("-" * len(header))
    for query in QUERIES:
        a, b = small.plans[query.name], large.plans[query.name]
        out(
            f"{query.name:<24}{a.execution_ms:>9.3f}{a.shared_hit + a.shared_read:>13}"
            f"{b.execution_ms:>9.3f}{b.shared_hit + b.shared_read:>13}"
            f"  {','.join(a.indexes) or '-'} / {','.join(b.indexes) or '-'}"
        )


def print_summary(
    out: Report,
    create: PhaseResult,
    bare: PhaseResult,
    raw: PhaseResult,
    small: SizeResult,
    large: SizeResult,
) -> None:
    """The headline figures as SUMMARY lines (bench/_common.summary)."""
    summary(
        out,
        "operation create vs bare DRF",
        create.rate,
        "req/s",
        ceiling="bare DRF CreateAPIView, same server, alternate phases",
        ceiling_value=bare.rate,
        goal=">= 0.9x bare DRF",
        met=create.rate >= 0.9 * bare.rate,
    )
    summary(
        out,
        "operation create vs raw INSERT",
        create.rate,
        "req/s",
        ceiling="raw single-row INSERT, one connection",
        ceiling_value=raw.rate,
        goal=">= 0.25x raw INSERT",
        met=create.rate >= 0.25 * raw.rate,
    )
    summary(
        out,
        "operation create p99",
        create.p(0.99),
        "ms",
        ceiling="bare DRF create p99",
        ceiling_value=bare.p(0.99),
        goal="p99 < 50 ms",
        met=create.p(0.99) < 50,
    )
    for name in ("poll", "history"):
        for size in (small, large):
            sample = size.http.get(name)
            if sample is None:
                continue
            p50 = sample.p(0.5)
            summary(
                out,
                f"{name} p50 at {size_label(size.rows)} operations",
                p50,
                "ms",
                ceiling="page query round trip (SQL p50)",
                ceiling_value=size.sql[name].p(0.5),
                goal="p50 < 3 ms",
                met=p50 < 3,
            )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = Report()
    url, admin_url = checked_database_url(args.database_url)
    database = database_name(url)
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    command = gunicorn_command(args.workers, port) + ["-c", "python:deviceplatform.gunicorn_conf"]
    usable = usable_cores()
    queue = args.agents * args.devices_per_agent * args.pending_per_device + args.agents

    out("# bench/operations.py")
    out(command_line("bench/operations.py", argv))
    out(
        f"server: gunicorn, {args.workers} sync worker(s), psycopg pool, DEBUG off, no REDIS_URL; "
        "settings bench.bare_drf.settings (the product's, plus the bare DRF ceiling's URLs)"
    )
    out(f"server command: {shlex.join(command)}")
    out(machine_line())
    out(f"database: {url} (dropped and re-created)")
    out(load_average_line())
    out(
        f"fleet: {args.agents} agents x {args.devices_per_agent} devices; queue: "
        f"{args.pending_per_device} PENDING per device + 1 EXECUTING per agent = {queue:,}; "
        f"history 88 % SUCCESSFUL / 12 % FAILED; sizes {args.small:,} and {args.large:,} rows"
    )
    out(
        f"reads: {args.reads} sequential requests per query and size (one connection), random "
        f"agents/devices; creates: {args.creates} with {args.concurrency} connections; "
        f"raw inserts: {args.raw_inserts}"
    )

    started = time.perf_counter()
    recreate_database(url, admin_url)
    env = bench_env(url, DJANGO_SETTINGS_MODULE="bench.bare_drf.settings", PYTHONPATH=str(REPO))
    migrate_and_create_user(env)
    # This process uses the app's own code to seed inventory and to build and capture its SQL.
    os.environ.pop("REDIS_URL", None)
    setup_django(env)
    fleet = seed_inventory(args)
    out(f"setup (database, migrate, users, inventory): {time.perf_counter() - started:.1f} s")

    rng = random.Random(args.seed)
    timeline = Timeline(args.large)
    rows, seconds = grow_operations(
        url, fleet, timeline, current=0, target=args.small, queue=queue,
        pending_per_device=args.pending_per_device, rng=rng,
    )  # fmt: skip
    out(f"seeded {rows:,} operations with COPY + VACUUM ANALYZE in {seconds:.1f} s")

    server = Server(command, env, Path(tempfile.mkdtemp(prefix="dp-bench-ops-")) / "server.log")
    try:
        server.wait_ready(f"{base}/tenant/loginOptions")

        async def warm() -> tuple[int, float]:
            async with Load(base, args.concurrency, server.pid, database) as http:
                return await http.warm_up("/devicecontrol/operations?pageSize=5")

        sent, slowest = asyncio.run(warm())
        out(
            f"client: aiohttp {aiohttp.__version__}; warm-up: {sent} untimed requests "
            f"(slowest {slowest * 1000:.0f} ms)"
        )
        small = measure_size("size 1", rows, args, fleet, base, server, database, out)

        rows, seconds = grow_operations(
            url, fleet, timeline, current=args.small, target=args.large, queue=queue,
            pending_per_device=args.pending_per_device, rng=rng,
        )  # fmt: skip
        out()
        out(
            f"grew the table to {rows:,} operations with COPY (queue finished and re-queued) "
            f"+ VACUUM ANALYZE in {seconds:.1f} s"
        )
        large = measure_size("size 2", rows, args, fleet, base, server, database, out)

        out()
        out(f"=== creates with {rows:,} operations present ===")
        out(wait_idle(args.wait_idle))
        raw = raw_insert_ceiling(url, fleet, args.raw_inserts, random.Random(args.seed))
        before = count_operations(url)
        create, bare, create_phases = measure_creates(args, fleet, base, server, database)
        created = count_operations(url) - before
        if not server.alive():
            raise SystemExit(f"server died during the run:\n{server.log_tail()}")
    finally:
        server.stop()

    side_by_side(small, large, out)
    out()
    out(TABLE_HEADER)
    out("-" * len(TABLE_HEADER))
    for sample in (*create_phases, create, bare, raw):
        out(sample.row())
    ratio = create.rate / raw.rate if raw.rate else math.nan
    bare_ratio = create.rate / bare.rate if bare.rate else math.nan
    out()
    out(
        f"ratio create req/s / raw INSERT rows/s: {create.rate:.1f} / {raw.rate:.1f} = {ratio:.2f}x"
        f"  ({args.concurrency} connections vs one; {args.workers} gunicorn sync workers)"
    )
    out(
        f"ratio create req/s / bare DRF create req/s: {create.rate:.1f} / {bare.rate:.1f} = "
        f"{bare_ratio:.2f}x  (alternate phases, same server; bare DRF / raw INSERT = "
        f"{bare.rate / raw.rate if raw.rate else math.nan:.2f}x)"
    )
    out(
        "server/pg/client/other: cores busy during the phase (server processes, postgres, this "
        f"client, everything else); {usable} usable cores"
    )
    failures = 0
    for sample in [create, bare, *small.http.values(), *large.http.values()]:
        if sample.error_kinds:
            failures += sample.errors
            out(f"errors in {sample.name}: {dict(sample.error_kinds)}")
        if sample.cut:
            out(f"* {sample.name} stopped at --phase-timeout")
    good_creates = len(create.latencies) - create.errors + len(bare.latencies) - bare.errors
    if created != good_creates:
        failures += 1
        out(f"MISMATCH: {good_creates} creates answered 2xx but {created} rows were added")
    missing = [
        f"{label} {name}"
        for label, size in (("size 1", small), ("size 2", large))
        for name, plan in size.plans.items()
        if not uses_expected(name, plan.indexes)
    ]
    out(
        f"index use: {'all plans use the expected index' if not missing else 'MISSING in ' + ', '.join(missing)}"
    )
    out(f"total run time {time.perf_counter() - started:.1f} s")
    print_summary(out, create, bare, raw, small, large)
    if args.save:
        out.save("operations")
    return 1 if failures or missing else 0


if __name__ == "__main__":
    run_main(main)
