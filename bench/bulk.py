"""Bulk operations: ramp throughput over 100,000 devices, on-time ramps, several workers at once.

Creates a dedicated PostgreSQL database and uses a dedicated Redis DB index, seeds agents, devices
and groups with multi-row INSERTs, then runs real Celery workers (`--pool solo`) and a real
`celery beat` (BULK_RAMP_INTERVAL), exactly as production would (runs booked for each next due
child included: bulkops/tasks.py):

  (a) throughput: one group of --devices devices under --agents agents, a bulk operation with
      creationRamp 0 created by POST /devicecontrol/bulkoperations (Django test client, in-process:
      the POST snapshots every target); time until COMPLETED, child operations per second beside
      the multi-row INSERT ceiling measured before and after, the worker's RSS (VmRSS idle, VmHWM
      peak), and the CREATE events a realtime session subscribed to /operations/* received (each
      child exactly once), compared with AWS IoT Jobs' 1,000 devices/minute;
  (b) lateness: for each beat interval in --intervals (default 0.5, the default), bulk operations
      with creationRamp --ramp over --ramp-devices devices and each of --ramps over as many devices
      as keeps the schedule as long; after COMPLETED, each child's creationTime minus its due time
      (effective_start + k * ramp, in whole microseconds as the ramp computes it): max, p99, p50,
      and the number created early (goal: max <= 0.2 s, none early);
  (c) profile: cProfile of one in-process `bulk_operations_advance()` over a --profile-devices
      group (same database, same Redis channel layer as the worker), top functions;
  (d) status updates: the children of one bulk operation over --status-devices devices, PUT
      through EXECUTING, SUCCESSFUL, PENDING, EXECUTING, SUCCESSFUL by --status-concurrency
      concurrent agents (real HTTP against gunicorn with --status-workers sync workers, worker and
      beat running as in production); updates per second beside a ceiling measured in the same
      run: the same PUTs on as many operations that belong to no bulk operation, each step in
      ABBA order; with the mean number of PostgreSQL backends waiting for a lock. Ends with a
      check that the bulk operation's progress is exact (every child SUCCESSFUL);
  (e) several workers: --workers workers and as many creationRamp 0 bulk operations over
      disjoint quarters of the devices, all starting at the same moment; total children/s beside
      the ceiling, and fairness while all of them ran (Jain's index of the children each got).

Ceiling (shared/PERFORMANCE.md: report ratios): 500-row multi-row INSERTs into a scratch copy of
the operations table (same columns, indexes and id default), one transaction per batch.

Usage (see bench/README.md):  .venv/bin/python bench/bulk.py [--devices 20000] [--wait-idle 60]
                              .venv/bin/python bench/bulk.py --parts d --devices 4000
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import math
import os
import pstats
import shlex
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
from _common import (
    TABLE_HEADER,
    Call,
    Load,
    PhaseResult,
    Process,
    Report,
    Server,
    basic_auth,
    bench_env,
    checked_database_url,
    checked_redis_url,
    command_line,
    cpu_sample,
    database_name,
    flush_redis,
    free_port,
    gunicorn_command,
    load_average_line,
    machine_line,
    manage,
    migrate_and_create_user,
    percentile,
    process_cpu_seconds,
    recreate_database,
    run_main,
    setup_django,
    summary,
    usable_cores,
    wait_for_idle,
)

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/dp_bench_bulk"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"
AWS_IOT_JOBS_PER_MINUTE = 1000
AIM_PER_MINUTE = 100 * AWS_IOT_JOBS_PER_MINUTE
PROTOTYPE = {"description": "Restart device", "c8y_Restart": {}}
REALTIME_PREFIX = "dp-bench-bulk:rt"  # the workers' realtime store keys (Redis DB is ours too)
IDLE_CORES = 0.3  # --wait-idle: the machine counts as idle below this many busy cores


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=100_000, help="(a) group size")
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--ramp-devices", type=int, default=2000, help="(b) group size")
    parser.add_argument("--ramp", type=float, default=0.05, help="(b) creationRamp, seconds")
    parser.add_argument(
        "--intervals",
        default="0.5",
        help="(b) BULK_RAMP_INTERVAL values (beat, the safety net), comma-separated",
    )
    parser.add_argument(
        "--ramps",
        default="0.5,5",
        help="(b) further creationRamp values after --ramp, each over as many devices as keeps "
        "the schedule as long as --ramp's (at least 5)",
    )
    parser.add_argument("--workers", type=int, default=4, help="(e) workers and bulk operations")
    parser.add_argument(
        "--embedded-devices", type=int, default=200,
        help="(f) the 0.05 s ramp's devices in the embedded server (the others: as long a schedule)",
    )  # fmt: skip
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        help="wait up to this many seconds for a quiet machine before (a) and (e); 0: do not",
    )
    parser.add_argument("--profile-devices", type=int, default=10_000, help="(c); 0: skip")
    parser.add_argument("--status-devices", type=int, default=1500, help="(d) children")
    parser.add_argument("--status-concurrency", type=int, default=16, help="(d) agents")
    parser.add_argument("--status-workers", type=int, default=4, help="(d) gunicorn workers")
    parser.add_argument(
        "--parts", default="a,b,c,d,e,f", help="which measurements to run, comma-separated"
    )
    parser.add_argument("--ceiling-rows", type=int, default=20_000)
    parser.add_argument("--timeout", type=float, default=300.0, help="per bulk operation, seconds")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_BULK_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="PostgreSQL on loopback; DROPPED and re-created (its name must contain 'bench')",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_BULK_REDIS_URL", DEFAULT_REDIS_URL),
        help="Redis on loopback with a dedicated DB index (FLUSHED at start and end)",
    )
    args = parser.parse_args(argv)
    args.interval_list = [float(x) for x in args.intervals.split(",") if x.strip()]
    args.part_set = {part.strip() for part in args.parts.split(",") if part.strip()}
    if args.part_set - {"a", "b", "c", "d", "e", "f"}:
        parser.error("--parts takes a, b, c, d, e and/or f")
    ramps = [args.ramp] + [float(x) for x in args.ramps.split(",") if x.strip()]
    args.ramp_plan = [
        (ramp, args.ramp_devices if ramp == args.ramp else
         max(5, round(args.ramp_devices * args.ramp / ramp)))
        for ramp in dict.fromkeys(ramps)
    ]  # fmt: skip
    if max(n for _, n in args.ramp_plan) > args.devices:
        parser.error("a ramp's device count exceeds --devices")
    if "c" not in args.part_set:
        args.profile_devices = 0
    if "b" not in args.part_set:
        args.ramp_devices = 0
    if "d" not in args.part_set:
        args.status_devices = 0
    if max(args.ramp_devices, args.profile_devices, args.status_devices) > args.devices:
        parser.error(
            "--ramp-devices, --profile-devices and --status-devices must not exceed --devices"
        )
    return args


# --- seeding ------------------------------------------------------------------------------------


MO_COLUMNS = (
    "type, name, owner, creation_time, last_updated, fragments, is_device, is_agent, is_group"
)


def seed(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Agents, devices (device i under agent i % agents, 'device' edges), and four static groups
    ('asset' edges): all devices, the first --ramp-devices, the first --profile-devices, the
    first --status-devices (an empty size: no group)."""
    groups: dict[str, int] = {}
    with psycopg.connect(url) as conn:
        agent_fragments = orjson.dumps({"com_cumulocity_model_Agent": {}, "c8y_IsDevice": {}})
        agents = [
            row[0]
            for row in conn.execute(
                f"INSERT INTO inventory_managedobject ({MO_COLUMNS}) SELECT 'c8y_BenchAgent',"
                " 'agent-' || g, 'bench', now(), now(), %s::jsonb, true, true, false"
                " FROM generate_series(0, %s) g RETURNING id",
                (agent_fragments.decode(), args.agents - 1),
            ).fetchall()
        ]
        agents.sort()
        device_fragments = orjson.dumps(
            {"c8y_IsDevice": {}, "c8y_SupportedOperations": ["c8y_Restart"]}
        )
        devices = [
            row[0]
            for row in conn.execute(
                f"INSERT INTO inventory_managedobject ({MO_COLUMNS}) SELECT 'c8y_BenchDevice',"
                " 'device-' || g, 'bench', now(), now(),"
                " jsonb_set(%s::jsonb, '{c8y_Hardware}', jsonb_build_object('serialNumber', 'sn-' || g)),"
                " true, false, false FROM generate_series(0, %s) g RETURNING id",
                (device_fragments.decode(), args.devices - 1),
            ).fetchall()
        ]
        devices.sort()
        # (name, first device, size): groups of consecutive devices
        ramp_groups = [(f"ramp-{ramp:g}", 0, n) for ramp, n in args.ramp_plan]
        quarters = [
            (f"e{k}", k * args.devices // args.workers, args.devices // args.workers)
            for k in range(args.workers if "e" in args.part_set else 0)
        ]
        sizes = (
            ("all", 0, args.devices),
            *(ramp_groups if args.ramp_devices else []),
            ("profile", 0, args.profile_devices),
            ("status", 0, args.status_devices),
            *quarters,
        )
        for name, _, size in sizes:
            if size <= 0:
                continue
            groups[name] = conn.execute(
                f"INSERT INTO inventory_managedobject ({MO_COLUMNS}) VALUES ('c8y_DeviceGroup',"
                " %s, 'bench', now(), now(), '{\"c8y_IsDeviceGroup\": {}}', false, false, true)"
                " RETURNING id",
                (f"bench-{name}",),
            ).fetchone()[0]
        with (
            conn.cursor() as cursor,
            cursor.copy(
                "COPY inventory_managedobjectreference (parent_id, child_id, relation) FROM STDIN"
            ) as copy,
        ):
            buffer = io.StringIO()
            for i, device in enumerate(devices):
                buffer.write(f"{agents[i % len(agents)]}\t{device}\tdevice\n")
                for name, first, size in sizes:
                    if first <= i < first + size:
                        buffer.write(f"{groups[name]}\t{device}\tasset\n")
            copy.write(buffer.getvalue())
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
    return {"agents": agents, "devices": devices, "groups": groups}


# --- processes ----------------------------------------------------------------------------------


def proc_status(pid: int, key: str) -> int:
    """A kB figure from /proc/<pid>/status (VmHWM: peak resident set, VmRSS: current)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def redis_cpu() -> float:
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm") as handle:
                if handle.read().startswith("redis-server"):
                    total += process_cpu_seconds(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return total


def cpu_totals(worker: int, database: str) -> tuple[float, float, float, float]:
    """CPU seconds so far of the worker's session, of PostgreSQL (the bench database's backends and
    the background processes), of Redis, and of the whole machine."""
    sample = cpu_sample(worker, database)
    return sum(sample.server.values()), sum(sample.postgres.values()), redis_cpu(), sample.machine


def wait_ready(worker: Process, seconds: float = 60.0, marker: str = "ready") -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not worker.alive():
            raise SystemExit(f"{worker.name} exited:\n{worker.log_tail(30)}")
        if marker in worker.log_path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise SystemExit(f"{worker.name} not ready after {seconds:.0f} s:\n{worker.log_tail(30)}")


# --- measurements ---------------------------------------------------------------------------------


def post_bulk(
    client: Any, group_id: int, ramp: float, start: datetime | None = None
) -> tuple[int, float]:
    body = {
        "groupId": str(group_id),
        "startDate": (start or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
        "creationRamp": ramp,
        "operationPrototype": PROTOTYPE,
    }
    t0 = time.perf_counter()
    response = client.post(
        "/devicecontrol/bulkoperations",
        data=orjson.dumps(body),
        content_type="application/json",
        HTTP_ACCEPT="application/vnd.com.nsn.cumulocity.bulkoperation+json",
    )
    elapsed = time.perf_counter() - t0
    if response.status_code != 201:
        raise SystemExit(f"POST failed: {response.status_code} {response.content[:300]!r}")
    return int(orjson.loads(response.content)["id"]), elapsed


def wait_completed(url: str, bulk_id: int, worker: Process, timeout: float) -> float:
    """Seconds (monotonic) at which the bulk operation was seen COMPLETED (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            status = conn.execute(
                "SELECT status FROM bulkops_bulkoperation WHERE id = %s", (bulk_id,)
            ).fetchone()[0]
            if status == "COMPLETED":
                return time.monotonic()
            if not worker.alive():
                raise SystemExit(f"worker died:\n{worker.log_tail(30)}")
            time.sleep(0.05)
    raise SystemExit(f"bulk operation {bulk_id} not COMPLETED after {timeout:.0f} s")


def children(url: str, bulk_id: int) -> list[tuple[int, datetime, datetime, int]]:
    """(position, creation_time, scheduled time, operation id) of every child, by position. The
    scheduled time as the ramp computes it: whole microseconds of ramp per position."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(
            "SELECT t.position, o.creation_time,"
            " b.effective_start + (t.position - b.first_index)"
            " * round(b.creation_ramp * 1000000)::bigint * interval '1 microsecond', o.id"
            " FROM bulkops_bulkoperationtarget t"
            " JOIN bulkops_bulkoperation b ON b.id = t.bulk_operation_id"
            " JOIN devicecontrol_operation o ON o.bulk_operation_id = b.id AND o.device_id = t.device_id"
            " WHERE b.id = %s ORDER BY t.position",
            (bulk_id,),
        ).fetchall()


def ceiling(url: str, rows: int, devices: list[int], agents: list[int]) -> float:
    """Rows/s of 500-row multi-row INSERTs (one transaction each) into a scratch copy of the
    operations table: what the database alone allows for the ramp's INSERT."""
    batch = 500
    body = orjson.dumps(PROTOTYPE).decode()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_ops_ceiling")
        conn.execute("CREATE TABLE bench_ops_ceiling (LIKE devicecontrol_operation INCLUDING ALL)")
        values = ", ".join(["(%s, %s, 'PENDING', now(), now(), %s::jsonb, %s)"] * batch)
        sql = (
            "INSERT INTO bench_ops_ceiling (device_id, agent_id, status, creation_time,"
            f" status_changed_at, fragments, bulk_operation_id) VALUES {values}"
        )
        start = time.perf_counter()
        for first in range(0, rows, batch):
            params: list[Any] = []
            for i in range(first, first + batch):
                device = devices[i % len(devices)]
                # A bulk operation ID per round over the devices: (bulk, device) stays unique.
                params += [device, agents[i % len(agents)], body, 1 + i // len(devices)]
            conn.execute(sql, params)
        elapsed = time.perf_counter() - start
        conn.execute("DROP TABLE bench_ops_ceiling")
    return (rows // batch * batch) / elapsed


class EventCounter:
    """A realtime session in the workers' store (same Redis, same prefix) subscribed to
    `/operations/*`, as a CometD client's would be: counts the CREATE events of the children it
    is told about. The workers run with REALTIME_QUEUE_LIMIT above the number of events, so none
    is dropped from its queue before it is drained."""

    CHANNEL = "/operations/*"

    def __init__(self, redis_url: str, prefix: str, queue_limit: int) -> None:
        from deviceplatform.realtime.store import RedisStore

        self.store = RedisStore(redis_url, prefix, queue_limit)
        self.cid = f"benchbulk{os.getpid()}x{int(time.time() * 1000)}"
        self.seen: dict[int, int] = {}  # operation id -> CREATE events received
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._open())

    async def _open(self) -> None:
        record = {"family": "realtime", "uid": "bench", "user": "bench", "timeout": "0",
                  "interval": "0", "base": "http://bench"}  # fmt: skip
        await self.store.create_session(self.cid, record, ttl_ms=3_600_000, limit=100)
        await self.store.subscribe(self.cid, [self.CHANNEL], add=True, ttl_ms=3_600_000)

    def take(self) -> list[bytes]:
        """The events queued for the session now."""
        attached = self.loop.run_until_complete(
            self.store.attach(
                self.cid, hub="bench", token="t", requested_ms=0, max_hold_ms=0,
                max_interval_ms=3_600_000, immediate=True,
            )
        )  # fmt: skip
        return attached.events if attached else []

    def drain(self) -> None:
        for payload in self.take():
            message = orjson.loads(payload)
            if message["data"].get("realtimeAction") == "CREATE":
                pk = int(message["data"]["data"]["id"])
                self.seen[pk] = self.seen.get(pk, 0) + 1

    def delivered(self, ids: list[int], wait: float = 10.0) -> tuple[int, int]:
        """(children with exactly one CREATE event, events in all for them), draining for up to
        `wait` s while some are missing (the last batch's events follow its commit)."""
        deadline = time.monotonic() + wait
        while True:
            self.drain()
            once = sum(1 for pk in ids if self.seen.get(pk) == 1)
            if once == len(ids) or time.monotonic() > deadline:
                return once, sum(self.seen.get(pk, 0) for pk in ids)
            time.sleep(0.2)

    def close(self) -> None:
        self.loop.run_until_complete(self.store.remove_session(self.cid))
        self.loop.close()


def run_bulk(
    label: str,
    *,
    url: str,
    database: str,
    client: Any,
    group_id: int | list[int],
    ramp: float,
    interval: float,
    env: dict[str, str],
    log_dir: Path,
    timeout: float,
    workers: int = 1,
    events: EventCounter | None = None,
    start_in: float = 0.0,
) -> dict[str, Any]:
    """Start `workers` workers + beat, POST a bulk operation per group (one after the other, at
    once), wait until all are COMPLETED, stop them; figures. With one group the rows are a list,
    with several a list per bulk operation (`rows_per_bulk`)."""
    # The worker's "ready" line is INFO; beat's "Sending due task" is quiet below DEBUG
    # (deviceplatform/logs.py PER_TASK_LOGGERS).
    run_env = {**env, "BULK_RAMP_INTERVAL": str(interval), "LOG_LEVEL": "INFO"}
    schedule = log_dir / f"beat-{label}.schedule"
    groups = group_id if isinstance(group_id, list) else [group_id]
    started = [
        Process(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "deviceplatform",
                "worker",
                "--pool",
                "solo",
                "--loglevel",
                "info",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"{label}-{n}@%h",
            ],
            run_env,
            log_dir / f"worker-{label}-{n}.log",
            name=f"worker-{label}-{n}",
        )  # fmt: skip
        for n in range(workers)
    ]
    worker = started[0]
    beat = None
    try:
        # Beat runs before the POST, as in production: its start-up must not count as lateness.
        beat = Process(
            [sys.executable, "-m", "celery", "-A", "deviceplatform", "beat", "--loglevel",
             "info", "--schedule", str(schedule)],
            {**run_env, "LOG_LEVEL": "DEBUG"},
            log_dir / f"beat-{label}.log",
            name=f"beat-{label}",
        )  # fmt: skip
        for each in started:
            wait_ready(each)
        wait_ready(beat, marker="Sending due task")
        rss_idle = [proc_status(each.pid, "VmRSS") for each in started]
        hwm_idle = [proc_status(each.pid, "VmHWM") for each in started]
        # start_in > 0: every bulk operation starts at the same moment, after all the POSTs.
        start = datetime.now(UTC) + timedelta(seconds=start_in) if start_in else None
        posts = [post_bulk(client, group, ramp, start) for group in groups]
        if start is not None:  # the clock (and the CPU count) start when the ramps do
            time.sleep(max(0.0, (start - datetime.now(UTC)).total_seconds()))
        posted_at = time.monotonic()  # the POSTs answered (each snapshots its targets first)
        cpu_before = cpu_totals(worker.pid, database)
        others_before = [cpu_totals(each.pid, database)[0] for each in started[1:]]
        bulk_ids = [bulk_id for bulk_id, _ in posts]
        completed = max(wait_completed(url, bulk_id, worker, timeout) for bulk_id in bulk_ids)
        wall = completed - posted_at
        cpu_after = cpu_totals(worker.pid, database)
        others_after = [cpu_totals(each.pid, database)[0] for each in started[1:]]
        hwm = [proc_status(each.pid, "VmHWM") for each in started]
    finally:
        if beat is not None:
            beat.stop()
        for each in started:
            each.stop()
    rows_per_bulk = [children(url, bulk_id) for bulk_id in bulk_ids]
    cores = [(a - b) / wall for a, b in zip(cpu_after, cpu_before, strict=True)]
    workers_cores = cores[0] + sum(
        (a - b) / wall for a, b in zip(others_after, others_before, strict=True)
    )
    delivered = None
    if events is not None:
        ids = [row[3] for rows in rows_per_bulk for row in rows]
        delivered = events.delivered(ids)
    return {
        "bulk_id": bulk_ids[0],
        "bulk_ids": bulk_ids,
        "post": posts[0][1],
        "wall": wall,
        "rows": rows_per_bulk[0],
        "rows_per_bulk": rows_per_bulk,
        "rss_idle_kb": max(rss_idle),
        "hwm_idle_kb": max(hwm_idle),
        "hwm_kb": max(hwm),
        "worker_cores": workers_cores,
        "pg_cores": cores[1],
        "redis_cores": cores[2],
        "other_cores": max(0.0, cores[3] - workers_cores - cores[1] - cores[2]),
        "worker_cmd": worker.command,
        "beat_cmd": beat.command if beat is not None else [],
        "delivered": delivered,
    }


def profile_advance(client: Any, group_id: int, top: int = 22) -> tuple[int, float, str]:
    """One in-process `bulk_operations_advance()` over a fresh ramp-0 bulk operation, under
    cProfile (worker and beat are stopped, so nothing else claims it)."""
    from bulkops.services import bulk_operations_advance

    post_bulk(client, group_id, 0)
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    created = bulk_operations_advance()
    profiler.disable()
    elapsed = time.perf_counter() - t0
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return created, elapsed, text.getvalue()


# (d): the status every child is PUT to, step by step (any transition is allowed).
STATUS_STEPS = ("EXECUTING", "SUCCESSFUL", "PENDING", "EXECUTING", "SUCCESSFUL")


class LockWaits:
    """Samples, in a thread, how many backends of `database` wait for a lock (pg_stat_activity)
    every EVERY seconds while the `with` block runs; `mean` afterwards."""

    EVERY = 0.005

    def __init__(self, url: str, database: str) -> None:
        self.url, self.database = url, database
        self.samples: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                    " AND wait_event_type = 'Lock'",
                    (self.database,),
                ).fetchone()
                self.samples.append(int(row[0]))
                time.sleep(self.EVERY)

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else math.nan

    def __enter__(self) -> LockWaits:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def ramp_processes(label: str, env: dict[str, str], log_dir: Path) -> tuple[Process, Process]:
    """A Celery worker (--pool solo) and beat with the default BULK_RAMP_INTERVAL, both ready
    (the worker's "ready" line is INFO; beat's "Sending due task" is quiet below DEBUG)."""
    worker = Process(
        [sys.executable, "-m", "celery", "-A", "deviceplatform", "worker", "--pool", "solo",
         "--loglevel", "info", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        {**env, "LOG_LEVEL": "INFO"}, log_dir / f"worker-{label}.log", name=f"worker-{label}",
    )  # fmt: skip
    beat = Process(
        [sys.executable, "-m", "celery", "-A", "deviceplatform", "beat", "--loglevel", "info",
         "--schedule", str(log_dir / f"beat-{label}.schedule")],
        {**env, "LOG_LEVEL": "DEBUG"}, log_dir / f"beat-{label}.log", name=f"beat-{label}",
    )  # fmt: skip
    wait_ready(worker)
    wait_ready(beat, marker="Sending due task")
    return worker, beat


def lateness_summary(out: Report, name: str, lateness: list[float], tolerance: float = 0.0) -> bool:
    """Print max, p99, p50, min and early creates (below -`tolerance`) and their SUMMARY lines;
    whether the goal (max <= 0.2 s, none early) was met."""
    early = sum(1 for late in lateness if late < -tolerance)
    worst, p99 = lateness[-1], percentile(lateness, 0.99)
    met = worst <= 0.2 and early == 0
    out(
        f"lateness creationTime - scheduled (s): max {worst:.3f}, p99 {p99:.3f}, "
        f"p50 {percentile(lateness, 0.5):.3f}, min {lateness[0]:+.4f}; early: {early}; "
        f"goal max <= 0.2 s, none early: {'met' if met else 'NOT met'}"
    )
    goal = "max late <= 0.2 s, none early"
    summary(out, f"{name} max", worst, "s", goal=goal, met=met)
    summary(out, f"{name} p99", p99, "s")
    summary(out, f"{name} early creates", early, "children", goal="0", met=early == 0)
    return met


EMBEDDED_ADMIN_PASSWORD = "bench-embedded-pw:not-secret"


def embedded_lateness(args: argparse.Namespace, log_dir: Path, out: Report) -> int:
    """(f): `manage.py serve` on SQLite without Redis (what `bin/run` starts without REDIS_URL: the
    beat schedule runs in the server's embedded scheduler, woken by the ramp's bookings), default
    settings; a fleet made over HTTP; each ramp of (b) over fewer devices; lateness from the
    children's creationTime (whole milliseconds, truncated: "early" allows 1 ms)."""
    import urllib.request

    folder = Path(tempfile.mkdtemp(prefix="dp-bench-bulk-embedded-"))
    env = bench_env(
        f"sqlite:///{folder / 'db.sqlite3'}",
        drop=("BULK_RAMP_INTERVAL", "BULK_RAMP_BOOKING", "REALTIME_PREFIX"),
        ADMIN_USERNAME="admin",
        ADMIN_PASSWORD=EMBEDDED_ADMIN_PASSWORD,
    )
    manage(env, "migrate", "--noinput")
    manage(env, "ensureadmin")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port", str(port)]
    out(f"server: {shlex.join(command)} (DATABASE_URL=sqlite:///…, no REDIS_URL)")
    server = Server(command, env, log_dir / "server-f.log", name="embedded")
    auth = basic_auth("admin", EMBEDDED_ADMIN_PASSWORD)
    failures = 0

    def call(method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(  # noqa: S310 (loopback)
            base + path, method=method, data=None if body is None else orjson.dumps(body),
            headers={"Authorization": auth, "Accept": "application/json",
                     "Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            return orjson.loads(response.read() or b"{}")

    try:
        server.wait_ready(f"{base}/tenant/loginOptions")
        plan = [
            (ramp, max(5, round(args.embedded_devices * args.ramp / ramp)))
            for ramp, _ in args.ramp_plan
        ]
        size = max(n for _, n in plan)
        t0 = time.perf_counter()
        agent = call("POST", "/inventory/managedObjects",
                     {"name": "agent", "c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}})  # fmt: skip
        devices = []
        for i in range(size):
            device = call(
                "POST", "/inventory/managedObjects", {"name": f"d{i}", "c8y_IsDevice": {}}
            )
            call("POST", f"/inventory/managedObjects/{agent['id']}/childDevices",
                 {"managedObject": {"id": device["id"]}})  # fmt: skip
            devices.append(device["id"])
        out(f"seeded 1 agent and {size} devices over HTTP in {time.perf_counter() - t0:.1f} s")
        for ramp, count in plan:
            group = call("POST", "/inventory/managedObjects",
                         {"name": f"ramp-{ramp:g}", "c8y_IsDeviceGroup": {}})  # fmt: skip
            for device_id in devices[:count]:
                call("POST", f"/inventory/managedObjects/{group['id']}/childAssets",
                     {"managedObject": {"id": device_id}})  # fmt: skip
            out()
            out(f"--- (f) embedded: creationRamp {ramp:g} s over {count} devices ---")
            # A start ahead of the POST: the schedule is then exactly startDate + k * ramp.
            start = datetime.now(UTC) + timedelta(seconds=2)
            bulk = call("POST", "/devicecontrol/bulkoperations", {
                "groupId": group["id"], "startDate": start.isoformat().replace("+00:00", "Z"),
                "creationRamp": ramp, "operationPrototype": PROTOTYPE,
            })  # fmt: skip
            deadline = time.monotonic() + args.timeout + 2 + count * ramp
            while (
                call("GET", f"/devicecontrol/bulkoperations/{bulk['id']}")["status"] != "COMPLETED"
            ):
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"(f) bulk operation {bulk['id']} not COMPLETED:\n{server.log_tail()}"
                    )
                time.sleep(0.2)
            listed = call(
                "GET", f"/devicecontrol/operations?bulkOperationId={bulk['id']}&pageSize=2000"
            )["operations"]
            created = sorted(
                datetime.fromisoformat(op["creationTime"].replace("Z", "+00:00")) for op in listed
            )
            if len(created) != count:
                failures += 1
                out(f"MISMATCH: {len(created)} children for {count} targets")
            lateness = sorted(
                (moment - start).total_seconds() - k * ramp for k, moment in enumerate(created)
            )
            lateness_summary(
                out, f"embedded ramp {ramp:g} s x {count} lateness", lateness, tolerance=0.001
            )
    finally:
        server.stop()
    return failures


def copy_without_bulk(url: str, bulk_id: int) -> list[int]:
    """Copies of the bulk operation's children that belong to no bulk operation (every column
    but the ID, the bulk operation and the retry link): the ceiling's operations."""
    with psycopg.connect(url, autocommit=True) as conn:
        columns = [
            row[0]
            for row in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name ="
                " 'devicecontrol_operation' AND column_name NOT IN"
                " ('id', 'bulk_operation_id', 'retry_of_id') ORDER BY ordinal_position"
            ).fetchall()
        ]
        names = ", ".join(columns)
        return sorted(
            row[0]
            for row in conn.execute(
                f"INSERT INTO devicecontrol_operation ({names}) SELECT {names}"  # noqa: S608
                " FROM devicecontrol_operation WHERE bulk_operation_id = %s ORDER BY id"
                " RETURNING id",
                (bulk_id,),
            ).fetchall()
        )


class BulkWatcher(EventCounter):
    """A session subscribed to `/bulkoperations/{id}` (bulkops/live.py), drained every 20 ms by a
    thread of its own: every message with the moment it was taken from the queue."""

    def __init__(self, redis_url: str, prefix: str, queue_limit: int, bulk_id: int) -> None:
        self.CHANNEL = f"/bulkoperations/{bulk_id}"
        self.messages: list[tuple[float, dict[str, Any]]] = []
        super().__init__(redis_url, prefix, queue_limit)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        from deviceplatform.realtime.events import absolute

        while not self._stop.wait(0.02):
            payloads = self.take()
            now = time.monotonic()
            self.messages.extend(
                (now, orjson.loads(absolute(p, b'"http://bench'))["data"]) for p in payloads
            )

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        super().close()


def status_updates(
    args: argparse.Namespace,
    *,
    redis_url: str,
    url: str,
    database: str,
    client: Any,
    group_id: int,
    env: dict[str, str],
    log_dir: Path,
    out: Report,
) -> int:
    """(d): PUT status updates on the children of one bulk operation and, as the ceiling, on as
    many operations outside any bulk operation, in ABBA order (ceiling, bulk, bulk, ceiling) so
    that a drift of the machine's speed hits both alike. Returns the number of failed checks."""
    from bulkops.services import bulk_operations_advance

    bulk_id, _ = post_bulk(client, group_id, 0)
    bulk_operations_advance()
    with psycopg.connect(url, autocommit=True) as conn:
        children_ids = [
            row[0]
            for row in conn.execute(
                "SELECT id FROM devicecontrol_operation WHERE bulk_operation_id = %s ORDER BY id",
                (bulk_id,),
            ).fetchall()
        ]
    loose_ids = copy_without_bulk(url, bulk_id)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
    out(
        f"bulk operation {bulk_id}: {len(children_ids):,} PENDING children; ceiling: "
        f"{len(loose_ids):,} copies of them in no bulk operation"
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = gunicorn_command(args.status_workers, port)
    out(f"server: {shlex.join(command)}")
    run_env = {**env, "BULK_RAMP_INTERVAL": "0.5"}
    worker, beat = ramp_processes("d", run_env, log_dir)
    server = Server(command, run_env, log_dir / "server-d.log")
    failures = 0
    # Live bulk operation (bulkops/live.py): what a dashboard subscribed to it receives.
    watcher = BulkWatcher(redis_url, REALTIME_PREFIX, 100_000, bulk_id)
    bulk_phases: list[tuple[float, float]] = []  # (start, end) of each bulk phase, monotonic
    try:
        server.wait_ready(f"{base}/tenant/loginOptions")

        def puts(ids: list[int], status: str) -> list[Call]:
            body = orjson.dumps({"status": status})
            return [Call("PUT", f"/devicecontrol/operations/{pk}", body) for pk in ids]

        def has(status: str) -> Any:
            def check(payload: bytes) -> str | None:
                found = orjson.loads(payload).get("status")
                return None if found == status else f"status {found}"

            return check

        async def drive() -> list[tuple[str, PhaseResult, float]]:
            results = []
            async with Load(base, args.status_concurrency, server.pid, database) as http:
                await http.warm_up(f"/devicecontrol/bulkoperations/{bulk_id}", median_factor=3)
                for step, status in enumerate(STATUS_STEPS):
                    # ABBA: each kind goes first every other step, so a drift of the machine's
                    # speed during the run hits both alike.
                    kinds = [("ceiling", loose_ids), ("bulk", children_ids)]
                    for kind, ids in kinds if step % 2 == 0 else kinds[::-1]:
                        phase_start = time.monotonic()
                        with LockWaits(url, database) as waits:
                            result = await http.run(
                                f"{kind} {status[:4]}", puts(ids, status), args.timeout,
                                has(status), error_body=200,
                            )  # fmt: skip
                        results.append((kind, result, waits.mean))
                        if kind == "bulk":
                            bulk_phases.append((phase_start, time.monotonic()))
                gets = [Call("GET", f"/devicecontrol/bulkoperations/{bulk_id}")] * 1000
                with LockWaits(url, database) as waits:
                    result = await http.run("GET bulk", gets, args.timeout)
                results.append(("get", result, waits.mean))
            return results

        results = asyncio.run(drive())
        time.sleep(1.0)  # the trailing message of the last change (one interval at most)
    finally:
        watcher.close()
        server.stop()
        beat.stop()
        worker.stop()
    out(TABLE_HEADER + "  lock waits")
    for _, result, waits in results:
        out(f"{result.row()}{waits:>12.2f}")
        if result.errors:
            failures += 1
            out(f"  errors: {dict(result.error_kinds.most_common(3))}")

    def rate(kind: str) -> tuple[float, float]:
        mine = [(result, waits) for k, result, waits in results if k == kind]
        elapsed = sum(result.elapsed for result, _ in mine)
        waited = sum(waits * result.elapsed for result, waits in mine) / elapsed
        return sum(result.done for result, _ in mine) / elapsed, waited

    (bulk_rate, bulk_waits), (ceiling_rate, ceiling_waits) = rate("bulk"), rate("ceiling")
    out(
        "lock waits: PostgreSQL backends of the bench database waiting for a lock, mean of "
        f"samples every {LockWaits.EVERY * 1000:.0f} ms during the phase"
    )
    out(
        f"status updates/s on children of one bulk operation: {bulk_rate:,.1f} (lock waits "
        f"{bulk_waits:.2f}); ceiling (the same PUTs on operations in no bulk operation): "
        f"{ceiling_rate:,.1f} (lock waits {ceiling_waits:.2f}); ratio {bulk_rate / ceiling_rate:.2f}x"
    )
    response = client.get(
        f"/devicecontrol/bulkoperations/{bulk_id}", HTTP_ACCEPT="application/json"
    )
    body = orjson.loads(response.content)
    size = len(children_ids)
    last = STATUS_STEPS[-1].lower()
    expected = {"pending": 0, "failed": 0, "executing": 0, "successful": 0, last: size, "all": size}
    exact = body.get("progress") == expected and body.get("generalStatus") == "SUCCESSFUL"
    out(
        f"progress right after the last PUT: {body.get('progress')}, generalStatus "
        f"{body.get('generalStatus')}: {'exact' if exact else 'WRONG, expected ' + str(expected)}"
    )
    summary(
        out, "bulk child status updates", bulk_rate, "updates/s",
        ceiling="same PUTs, no bulk operation", ceiling_value=ceiling_rate,
    )  # fmt: skip
    return failures + (0 if exact else 1) + live_figures(out, watcher, bulk_phases, body, size)


def live_figures(
    out: Report,
    watcher: BulkWatcher,
    phases: list[tuple[float, float]],
    body: dict[str, Any],
    changes_per_phase: int,
) -> int:
    """(d) continued: the messages on /bulkoperations/{id} while agents changed its children
    (throttled to one per BULK_LIVE_INTERVAL_MS, default 250 ms: the bound is 4/s), and how long
    after the last PUT the message equal to GET's answer arrived. Returns failed checks."""
    interval = float(os.environ.get("BULK_LIVE_INTERVAL_MS", "250")) / 1000
    during = [m for t, m in watcher.messages if any(a <= t <= b + interval for a, b in phases)]
    seconds = sum(b - a for a, b in phases)
    changes = changes_per_phase * len(phases)
    rate = len(during) / seconds if seconds else 0.0
    expected = {**body, "self": f"http://bench/devicecontrol/bulkoperations/{body.get('id')}"}
    # The first message showing the end state after the last phase began (an earlier phase may
    # have ended in the same state: all SUCCESSFUL).
    start = phases[-1][0] if phases else 0.0
    final = [t for t, m in watcher.messages if t >= start and m.get("data") == expected]
    lag = final[0] - phases[-1][1] if final and phases else float("nan")
    last_exact = bool(watcher.messages) and watcher.messages[-1][1].get("data") == expected
    out(
        f"live /bulkoperations/{body.get('id')}: {len(during):,} messages for {changes:,} status "
        f"changes in {seconds:.1f} s = {rate:.2f}/s (bound {1 / interval:.0f}/s, one per "
        f"{interval * 1000:.0f} ms); last PUT -> message equal to GET: {lag * 1000:.0f} ms; last "
        f"message {'equals GET' if last_exact else 'DIFFERS from GET'}"
    )
    summary(out, "live bulk messages", rate, "msg/s", goal=f"<= {1 / interval:.0f}/s + 1",
            met=rate <= 1 / interval + 1)  # fmt: skip
    summary(out, "live bulk last change -> exact message", lag, "s",
            goal=f"<= {2 * interval:g} s", met=lag <= 2 * interval)  # fmt: skip
    return 0 if last_exact else 1


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    url, admin_url = checked_database_url(args.database_url)
    redis_url = checked_redis_url(args.redis_url)
    database = database_name(url)
    usable = usable_cores()
    out = Report()
    out("# bench/bulk.py")
    out(command_line("bench/bulk.py", argv))
    out(machine_line())
    out(f"database: {url} (dropped and re-created); redis: {redis_url} (flushed)")
    out(load_average_line())

    started = time.perf_counter()
    recreate_database(url, admin_url)
    flush_redis(redis_url)
    env = bench_env(
        url,
        drop=("BULK_RAMP_INTERVAL",),
        REDIS_URL=redis_url,
        # Redis pub/sub ignores the DB index: a prefix of our own keeps our events off others' layers.
        CHANNELS_PREFIX="dp-bench-bulk",
    )
    migrate_and_create_user(env)
    t0 = time.perf_counter()
    fleet = seed(url, args)
    out(
        f"seeded {len(fleet['agents'])} agents, {len(fleet['devices']):,} devices (device i under "
        f"agent i mod {args.agents}), groups {fleet['groups']} in {time.perf_counter() - t0:.1f} s"
    )
    setup_django(env)
    from django.test import Client

    client = Client(HTTP_AUTHORIZATION=basic_auth(), HTTP_HOST="127.0.0.1")
    warm = client.get("/devicecontrol/bulkoperations")  # the password hash, once
    if warm.status_code != 200:
        raise SystemExit(f"warm-up GET failed: {warm.status_code} {warm.content[:200]!r}")
    ceilings: list[float] = []

    def measure_ceiling(when: str) -> float:
        rate = ceiling(url, args.ceiling_rows, fleet["devices"], fleet["agents"])
        ceilings.append(rate)
        out(
            f"ceiling ({when}): 500-row multi-row INSERTs into a copy of devicecontrol_operation "
            f"(same indexes), one transaction each: {rate:,.0f} rows/s"
        )
        return rate

    out(f"setup: {time.perf_counter() - started:.1f} s")
    log_dir = Path(tempfile.mkdtemp(prefix="dp-bench-bulk-"))
    out(f"process logs: {log_dir}")
    failures = 0
    # Every CREATE event of (a) and (e) is counted by a subscriber of /operations/*.
    queue_limit = 2 * args.devices + 1000
    env = {**env, "REALTIME_PREFIX": REALTIME_PREFIX, "REALTIME_QUEUE_LIMIT": str(queue_limit)}

    def quiet() -> None:
        if args.wait_idle > 0:
            idle, waited, busy = wait_for_idle(args.wait_idle, IDLE_CORES)
            out(
                f"waited {waited:.0f} s for a quiet machine: "
                + ("quiet" if idle else f"NOT quiet ({busy:.2f} cores busy)")
            )

    # --- (a) throughput ----------------------------------------------------------------------
    if "a" in args.part_set:
        out()
        out(f"=== (a) creationRamp 0 over {args.devices:,} devices, beat every 1.0 s ===")
        quiet()
        measure_ceiling("before (a)")
        events = EventCounter(redis_url, REALTIME_PREFIX, queue_limit)
        try:
            a = run_bulk(
                "a", url=url, database=database, client=client, group_id=fleet["groups"]["all"],
                ramp=0, interval=1.0, env=env, log_dir=log_dir, timeout=args.timeout,
                events=events,
            )  # fmt: skip
        finally:
            events.close()
        measure_ceiling("after (a)")
        ceiling_rate = sum(ceilings) / len(ceilings)
        out(f"ceiling: {ceiling_rate:,.0f} rows/s (mean of before and after)")
        out(f"worker: {shlex.join(a['worker_cmd'])}")
        out(f"beat:   {shlex.join(a['beat_cmd'])}   (BULK_RAMP_INTERVAL=1.0)")
        made = len(a["rows"])
        if made != args.devices:
            failures += 1
            out(f"MISMATCH: {made:,} children for {args.devices:,} targets")
        created_times = sorted(row[1] for row in a["rows"])
        span = (created_times[-1] - created_times[0]).total_seconds() if created_times else math.nan
        rate_wall = made / a["wall"]
        rate_span = made / span if span else math.nan
        out(
            f"POST /devicecontrol/bulkoperations (snapshot of {args.devices:,} targets): {a['post'] * 1000:.0f} ms"
        )
        out(f"children created: {made:,} (exactly one per device: {made == args.devices})")
        out(
            f"POST answered -> COMPLETED: {a['wall']:.2f} s = {rate_wall:,.0f} children/s "
            f"({rate_wall * 60:,.0f}/min; the POST books the first run, beat is the safety net)"
        )
        out(
            f"first -> last child creationTime: {span:.2f} s = {rate_span:,.0f} children/s "
            f"({rate_span * 60:,.0f}/min)"
        )
        out(
            f"vs AWS IoT Jobs 1,000/min: {rate_wall * 60 / AWS_IOT_JOBS_PER_MINUTE:.0f}x (wall), "
            f"{rate_span * 60 / AWS_IOT_JOBS_PER_MINUTE:.0f}x (creation span); aim 100x = "
            f"{AIM_PER_MINUTE / 60:,.0f}/s"
        )
        ratio = rate_span / ceiling_rate
        out(
            f"ratio to the multi-row INSERT ceiling: {rate_span:,.0f} / {ceiling_rate:,.0f} = "
            f"{ratio:.2f}x (goal >= 0.4x)"
        )
        once, total_events = a["delivered"]
        out(
            f"CREATE events received by a /operations/* subscriber: {once:,} of {made:,} children "
            f"exactly once ({total_events:,} events for them)"
        )
        if once != made:
            failures += 1
            out("EVENTS MISSING OR DUPLICATED")
        growth = (a["hwm_kb"] - a["hwm_idle_kb"]) / 1024
        out(
            f"worker RSS: idle {a['rss_idle_kb'] / 1024:.0f} MiB, peak (VmHWM) {a['hwm_kb'] / 1024:.0f} MiB "
            f"(+{growth:.0f} MiB over its idle peak)"
        )
        out(
            f"cores busy while ramping: worker {a['worker_cores']:.2f}, postgres {a['pg_cores']:.2f}, "
            f"redis {a['redis_cores']:.2f}, other {a['other_cores']:.2f} (of {usable})"
        )
        summary(
            out, "bulk ramp creationRamp 0 (1 worker)", rate_span, "children/s",
            ceiling="500-row multi-row INSERT", ceiling_value=ceiling_rate,
            goal=">= 0.4x ceiling, every event", met=ratio >= 0.4 and once == made,
        )  # fmt: skip
        summary(out, "bulk ramp worker RSS growth", growth, "MiB")
        summary(out, "bulk ramp worker cores", a["worker_cores"], "cores")

    # --- (b) lateness ----------------------------------------------------------------------------
    for interval in args.interval_list if "b" in args.part_set else []:
        for ramp, count in args.ramp_plan:
            out()
            out(
                f"=== (b) creationRamp {ramp:g} s over {count:,} devices, beat every {interval} s "
                f"(BULK_RAMP_INTERVAL={interval}; runs booked for each due child) ==="
            )
            b = run_bulk(
                f"b-{interval}-{ramp:g}", url=url, database=database, client=client,
                group_id=fleet["groups"][f"ramp-{ramp:g}"], ramp=ramp, interval=interval,
                env=env, log_dir=log_dir, timeout=args.timeout + count * ramp,
            )  # fmt: skip
            if len(b["rows"]) != count:
                failures += 1
                out(f"MISMATCH: {len(b['rows']):,} children for {count:,} targets")
            lateness = sorted((created - due).total_seconds() for _, created, due, _ in b["rows"])
            out(
                f"POST {b['post'] * 1000:.0f} ms; POST -> COMPLETED {b['wall']:.1f} s "
                f"(schedule length {(count - 1) * ramp:.1f} s)"
            )
            lateness_summary(out, f"ramp {ramp:g} s x {count} lateness", lateness)
            out(
                f"worker peak RSS {b['hwm_kb'] / 1024:.0f} MiB; cores: worker {b['worker_cores']:.2f}, "
                f"postgres {b['pg_cores']:.2f}, redis {b['redis_cores']:.2f}, other {b['other_cores']:.2f}"
            )

    # --- (e) several workers, several bulk operations --------------------------------------------
    if "e" in args.part_set:
        out()
        size = args.devices // args.workers
        out(
            f"=== (e) {args.workers} workers ramping {args.workers} bulk operations of {size:,} "
            "devices at once (creationRamp 0) ==="
        )
        quiet()
        before = measure_ceiling("before (e)")
        # All start together once every POST (each snapshots its targets) is answered.
        start_in = 3.0 + 0.0001 * args.devices
        out(f"every bulk operation starts {start_in:.1f} s after the first POST")
        events = EventCounter(redis_url, REALTIME_PREFIX, queue_limit)
        try:
            e = run_bulk(
                "e", url=url, database=database, client=client,
                group_id=[fleet["groups"][f"e{k}"] for k in range(args.workers)], ramp=0,
                interval=1.0, env=env, log_dir=log_dir, timeout=args.timeout,
                workers=args.workers, events=events, start_in=start_in,
            )  # fmt: skip
        finally:
            events.close()
        after = measure_ceiling("after (e)")
        e_ceiling = (before + after) / 2
        spans = [(min(r[1] for r in rows), max(r[1] for r in rows)) for rows in e["rows_per_bulk"]]
        made = sum(len(rows) for rows in e["rows_per_bulk"])
        if any(len(rows) != size for rows in e["rows_per_bulk"]):
            failures += 1
            out(f"MISMATCH: {[len(rows) for rows in e['rows_per_bulk']]} children, {size} each")
        first, last = min(s for s, _ in spans), max(t for _, t in spans)
        total_rate = made / (last - first).total_seconds()
        # Fairness: children each bulk operation got while all of them were running (until the
        # first completed), and Jain's index over those counts (1: equal shares, 1/n: one took all).
        window_end = min(t for _, t in spans)
        shares = [sum(1 for r in rows if r[1] <= window_end) for rows in e["rows_per_bulk"]]
        jain = sum(shares) ** 2 / (len(shares) * sum(x * x for x in shares)) if any(shares) else 0
        for bulk_id, rows, (s0, s1), share in zip(
            e["bulk_ids"], e["rows_per_bulk"], spans, shares, strict=True
        ):
            out(
                f"bulk operation {bulk_id}: {len(rows):,} children from +{(s0 - first).total_seconds():.2f} s "
                f"to +{(s1 - first).total_seconds():.2f} s; {share:,} while all ran"
            )
        out(
            f"total: {made:,} children in {(last - first).total_seconds():.2f} s = {total_rate:,.0f}/s "
            f"= {total_rate / e_ceiling:.2f}x the ceiling ({e_ceiling:,.0f} rows/s)"
        )
        out(
            f"fairness while all ran: Jain's index {jain:.3f}, smallest/largest share "
            f"{min(shares) / max(max(shares), 1):.2f}"
        )
        once, total_events = e["delivered"]
        out(f"CREATE events: {once:,} of {made:,} children exactly once ({total_events:,} events)")
        if once != made:
            failures += 1
            out("EVENTS MISSING OR DUPLICATED")
        out(
            f"cores: {args.workers} workers {e['worker_cores']:.2f}, postgres {e['pg_cores']:.2f}, "
            f"redis {e['redis_cores']:.2f}, other {e['other_cores']:.2f}; largest worker peak RSS "
            f"{e['hwm_kb'] / 1024:.0f} MiB"
        )
        summary(
            out, f"bulk ramp {args.workers} workers x {args.workers} bulk operations", total_rate,
            "children/s", ceiling="500-row multi-row INSERT", ceiling_value=e_ceiling,
            goal="every event", met=once == made,
        )  # fmt: skip
        summary(out, f"bulk ramp {args.workers} workers fairness (Jain)", jain, "index")

    # --- (c) profile ---------------------------------------------------------------------------
    if args.profile_devices:
        out()
        out(
            f"=== (c) cProfile: in-process bulk_operations_advance(), creationRamp 0 over "
            f"{args.profile_devices:,} devices (same database, Redis channel layer) ==="
        )
        created, elapsed, text = profile_advance(client, fleet["groups"]["profile"])
        out(
            f"{created:,} children in {elapsed:.2f} s under cProfile = {created / elapsed:,.0f}/s "
            "(profiling overhead included)"
        )
        for line in text.splitlines():
            if line.strip():
                out(line.rstrip())

    # --- (d) status updates ----------------------------------------------------------------------
    if args.status_devices:
        out()
        out(
            f"=== (d) status updates: {args.status_devices:,} children of one bulk operation, "
            f"{args.status_concurrency} concurrent agents, gunicorn {args.status_workers} sync "
            "workers, worker and beat running ==="
        )
        failures += status_updates(
            args, redis_url=redis_url, url=url, database=database, client=client, group_id=fleet["groups"]["status"],
            env=env, log_dir=log_dir, out=out,
        )  # fmt: skip

    # --- (f) the embedded mode ------------------------------------------------------------------
    if "f" in args.part_set:
        out()
        out(
            "=== (f) on-time ramps in the embedded mode: manage.py serve on SQLite without Redis, "
            "default settings ==="
        )
        failures += embedded_lateness(args, log_dir, out)

    flush_redis(redis_url)
    out()
    out(f"total run time {time.perf_counter() - started:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    run_main(main)
