"""Inventory over HTTP under concurrent load, next to the raw-INSERT ceiling of the same machine.

Creates a dedicated PostgreSQL database, migrates it, starts gunicorn (sync workers) or uvicorn
(ASGI) on a loopback port, then drives N keep-alive connections from asyncio + aiohttp through three
phases (create, get by id, list) and prints requests/s, p50, p99 and errors per phase. In the same run
it measures one psycopg connection doing prepared single-row INSERTs (autocommit) and prints the
ratio create-rps / raw-insert-rps, the figure to compare across machines (shared/PERFORMANCE.md), and
creates and gets against a bare DRF CreateAPIView / RetrieveAPIView on the same model served by the
same server (bench/bare_drf), measured alternately (bare, product, bare, product, ...).

Usage (see bench/README.md):  .venv/bin/python bench/inventory_http.py [--server uvicorn] [--scale 0.5]
"""

import argparse
import asyncio
import contextlib
import math
import os
import random
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg
from _common import (
    BENCH_USER,
    REPO,
    TABLE_HEADER,
    Call,
    Load,
    PhaseResult,
    Report,
    Server,
    bench_env,
    checked_database_url,
    combined,
    command_line,
    database_name,
    free_port,
    gunicorn_command,
    load_average_line,
    machine_line,
    migrate_and_create_user,
    recreate_database,
    redacted,
    run_main,
    summary,
    time_statement,
    usable_cores,
    uvicorn_command,
    wait_for_idle,
)
from psycopg.types.json import Jsonb

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/dp_bench"
IDLE_CORES = 0.3  # --wait-idle: the machine counts as idle below this many busy cores
MAX_BALANCE_ATTEMPTS = 8
BUSY_WORKER_CORES = 0.05  # a server process using less than this during the probe serves nobody
NOISY_CORES = 0.25  # warn when other processes used more than this during a phase


# --- arguments ------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--server", choices=("gunicorn", "uvicorn"), default="gunicorn")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="server processes (default: gunicorn 4, uvicorn 2)",
    )
    parser.add_argument("--concurrency", "-c", type=int, default=16, help="client connections")
    parser.add_argument("--creates", type=int, default=3000)
    parser.add_argument("--gets", type=int, default=3000)
    parser.add_argument("--lists", type=int, default=1000)
    parser.add_argument("--list-page-size", type=int, default=20)
    parser.add_argument("--raw-inserts", type=int, default=3000)
    parser.add_argument(
        "--ab-rounds",
        type=int,
        default=3,
        help="creates and gets alternate bare DRF and product phases this many times each",
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiplies every request and row count"
    )
    parser.add_argument("--warmup", type=int, default=50, help="minimum untimed warm-up requests")
    parser.add_argument(
        "--phase-timeout",
        type=float,
        default=40.0,
        help="seconds after which a phase stops issuing requests (keeps the run bounded)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="PostgreSQL on loopback; the database is DROPPED and re-created (name must contain 'bench')",
    )
    parser.add_argument(
        "--no-pool",
        action="store_true",
        help="server without Django's psycopg pool (DATABASE_POOL=false, CONN_MAX_AGE=60)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for the machine to be idle (shared machines)",
    )
    parser.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--save", action="store_true", help="also write the report to bench/results/ (git-ignored)"
    )
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = 4 if args.server == "gunicorn" else 2
    for name in ("creates", "gets", "lists", "raw_inserts"):
        setattr(args, name, max(1, round(getattr(args, name) * args.scale)))
    if args.concurrency < 1 or args.workers < 1:
        parser.error("--concurrency and --workers must be at least 1")
    return args


# --- measurements ---------------------------------------------------------------------------------


def raw_insert_ceiling(url: str, rows: int, body: dict[str, Any]) -> PhaseResult:
    """One connection, autocommit, a prepared single-row INSERT of a jsonb document per round trip."""
    with psycopg.connect(url, autocommit=True) as conn:
        # Flush what CREATE DATABASE and migrate left dirty, so a checkpoint does not land here.
        with contextlib.suppress(psycopg.Error):
            conn.execute("CHECKPOINT")
        conn.execute("DROP TABLE IF EXISTS bench_raw_insert")
        conn.execute(
            "CREATE TABLE bench_raw_insert (id bigserial PRIMARY KEY, body jsonb NOT NULL,"
            " created timestamptz NOT NULL DEFAULT now())"
        )
        with conn.cursor() as cursor:
            result = time_statement(
                cursor,
                "INSERT INTO bench_raw_insert (body) VALUES (%s)",
                lambda: (Jsonb(body),),
                rows,
                database_name(url),
            )
        conn.execute("DROP TABLE bench_raw_insert")
    del result.cpu["server"]  # no server runs during this phase
    return result


def wait_until_idle(limit: float, out: Report) -> None:
    """Wait (at most `limit` s) for 3 consecutive seconds in which the machine used < 0.3 cores."""
    quiet, waited, _ = wait_for_idle(limit, IDLE_CORES)
    out(
        f"waited {min(limit, waited):.0f} s for an idle machine: {'idle' if quiet else 'still busy'}"
    )


# --- server ---------------------------------------------------------------------------------------


def server_command(args: argparse.Namespace, port: int) -> list[str]:
    if args.server == "gunicorn":
        # The production layout's configuration (Procfile `rest`).
        return gunicorn_command(args.workers, port) + ["-c", "python:deviceplatform.gunicorn_conf"]
    return uvicorn_command(args.workers, port)


# --- load -----------------------------------------------------------------------------------------


async def spread_over_workers(load: Load, workers: int, path: str) -> tuple[int, int]:
    """Keep-alive connections stay with the worker that accepted them, and an ASGI worker's
    event loop accepts while its thread is busy, so one worker may own every connection (seen
    with uvicorn). Probe for a second; reconnect until every worker serves (or give up).
    Returns (workers serving, attempts)."""
    expected = min(workers, load.concurrency)
    serving = 0
    for attempt in range(1, MAX_BALANCE_ATTEMPTS + 1):
        probe = await load.run("probe", (Call("GET", path) for _ in range(10**9)), 1.0)
        serving = sum(1 for cores in probe.per_process if cores > BUSY_WORKER_CORES)
        if serving >= expected:
            return serving, attempt
        await load.reconnect()
        await load.warm_up(path, load.concurrency, median_factor=3)
    return serving, MAX_BALANCE_ATTEMPTS


def device_body(number: int) -> dict[str, Any]:
    return {
        "name": f"bench-device-{number:06d}",
        "type": "c8y_BenchDevice",
        "c8y_IsDevice": {},
        "c8y_Hardware": {"model": "BenchBox 1", "serialNumber": f"bench-{number:06d}"},
        "c8y_SupportedOperations": ["c8y_Restart", "c8y_Command"],
    }


def bare_device_body(number: int) -> dict[str, Any]:
    """The same row for the bare DRF view's ModelSerializer: columns, and fragments as one field."""
    body = device_body(number)
    return {
        "name": body.pop("name"),
        "type": body.pop("type"),
        "owner": BENCH_USER,
        "is_device": True,
        "fragments": body,
    }


async def drive(args: argparse.Namespace, base: str, server: Server, out: Report) -> list[Any]:
    rng = random.Random(args.seed)
    created: list[str] = []
    list_path = (
        f"/inventory/managedObjects?pageSize={args.list_page_size}&fragmentType=c8y_IsDevice"
    )

    def remember(payload: bytes) -> None:
        created.append(orjson.loads(payload)["id"])

    database = database_name(args.database_url)
    async with Load(base, args.concurrency, server.pid, database) as load:
        sent, slowest = await load.warm_up(list_path, args.warmup, median_factor=3)
        out(f"warm-up: {sent} untimed requests (slowest {slowest * 1000:.0f} ms)")
        serving, attempts = await spread_over_workers(load, args.workers, list_path)
        out(
            f"connections served by {serving} of {args.workers} workers "
            f"(after {attempts} connection attempt{'s' if attempts > 1 else ''})"
        )
        if serving < min(args.workers, args.concurrency):
            out("WARNING: some workers own no connection; the figures reflect fewer workers")
        rounds = max(1, args.ab_rounds)
        phases: list[PhaseResult] = []
        numbers = iter(range(10**9))
        bare_created: list[str] = []

        def remember_bare(payload: bytes) -> None:
            bare_created.append(str(orjson.loads(payload)["id"]))

        # Creates, then gets: bare DRF and product alternately, bare first.
        for number in range(1, rounds + 1):
            count = max(1, args.creates // rounds)
            phases.append(
                await load.run(
                    f"bare create {number}",
                    (
                        Call(
                            "POST",
                            "/bench-bare/managedObjects",
                            orjson.dumps(bare_device_body(next(numbers))),
                        )
                        for _ in range(count)
                    ),
                    args.phase_timeout,
                    remember_bare,
                    planned=count,
                )
            )
            phases.append(
                await load.run(
                    f"create {number}",
                    (
                        Call(
                            "POST",
                            "/inventory/managedObjects",
                            orjson.dumps(device_body(next(numbers))),
                        )
                        for _ in range(count)
                    ),
                    args.phase_timeout,
                    remember,
                    planned=count,
                )
            )
        if not created:
            raise SystemExit(f"no create succeeded: {[dict(p.error_kinds) for p in phases]}")
        for number in range(1, rounds + 1):
            count = max(1, args.gets // rounds)
            phases.append(
                await load.run(
                    f"bare get {number}",
                    (
                        Call("GET", f"/bench-bare/managedObjects/{rng.choice(created)}")
                        for _ in range(count)
                    ),
                    args.phase_timeout,
                    planned=count,
                )
            )
            phases.append(
                await load.run(
                    f"get by id {number}",
                    (
                        Call("GET", f"/inventory/managedObjects/{rng.choice(created)}")
                        for _ in range(count)
                    ),
                    args.phase_timeout,
                    planned=count,
                )
            )
        create = combined("create", [p for p in phases if p.name.startswith("create")])
        bare_create = combined(
            "bare DRF create", [p for p in phases if p.name.startswith("bare c")]
        )
        get = combined("get by id", [p for p in phases if p.name.startswith("get")])
        bare_get = combined("bare DRF get", [p for p in phases if p.name.startswith("bare g")])
        listing = await load.run(
            f"list ({args.list_page_size}/page)",
            (Call("GET", list_path) for _ in range(args.lists)),
            args.phase_timeout,
            planned=args.lists,
        )
    return [create, get, listing, len(created) + len(bare_created), bare_create, bare_get, phases]


def count_rows(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM inventory_managedobject WHERE type = 'c8y_BenchDevice'"
        ).fetchone()
    return int(row[0]) if row else 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = Report()
    url, admin_url = checked_database_url(args.database_url)
    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    command = server_command(args, port)
    usable = usable_cores()

    out("# bench/inventory_http.py")
    out(command_line("bench/inventory_http.py", argv))
    out(
        f"server: {args.server}, {args.workers} worker(s), "
        f"{'no pool (CONN_MAX_AGE=60)' if args.no_pool else 'psycopg pool'}, DEBUG off"
    )
    out(f"server command: {shlex.join(command)}")
    out(machine_line())
    out(f"database: {redacted(url)} (dropped and re-created)")
    out(load_average_line())
    out(
        f"load: {args.concurrency} connections, creates={args.creates} gets={args.gets} "
        f"lists={args.lists} raw_inserts={args.raw_inserts}, phase timeout {args.phase_timeout:.0f} s"
    )

    if args.wait_idle > 0:
        wait_until_idle(args.wait_idle, out)
    started = time.perf_counter()
    recreate_database(url, admin_url)
    env = bench_env(url, DJANGO_SETTINGS_MODULE="bench.bare_drf.settings", PYTHONPATH=str(REPO))
    if args.no_pool:
        env["DATABASE_POOL"] = "false"
    migrate_and_create_user(env)
    out(f"setup (database, migrate, user): {time.perf_counter() - started:.1f} s")

    raw = raw_insert_ceiling(url, args.raw_inserts, device_body(0))

    log_dir = Path(tempfile.mkdtemp(prefix="dp-bench-"))
    server = Server(command, env, log_dir / "server.log")
    try:
        server.wait_ready(f"{base}/tenant/loginOptions")
        # uvloop makes the client cheaper; it competes with the server for the same cores.
        try:
            import uvloop

            runner: Any = uvloop.run
            loop_name = "uvloop"
        except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
            runner, loop_name = asyncio.run, "asyncio"
        out(f"client: aiohttp {aiohttp.__version__} on {loop_name}")
        create, get, listing, created, bare_create, bare_get, phases = runner(
            drive(args, base, server, out)
        )
        if not server.alive():
            raise SystemExit(f"server died during the run:\n{server.log_tail()}")
    finally:
        server.stop()
    rows = count_rows(url)

    out()
    out(TABLE_HEADER)
    out("-" * len(TABLE_HEADER))
    for result in (*phases, create, bare_create, get, bare_get, listing, raw):
        out(result.row())
    out()
    for result in (create, bare_create, get, bare_get, listing):
        split = " ".join(f"{cores:.2f}" for cores in result.per_process)
        out(f"server cores per process, {result.name}: {split}")
    ratio = create.rate / raw.rate if raw.rate else math.nan
    out(
        f"ratio create req/s / raw INSERT rows/s: {create.rate:.1f} / {raw.rate:.1f} = {ratio:.2f}x"
    )
    out(
        f"ratio create / bare DRF create: {create.rate:.1f} / {bare_create.rate:.1f} = "
        f"{create.rate / bare_create.rate if bare_create.rate else math.nan:.2f}x; get by id / bare "
        f"DRF get: {get.rate:.1f} / {bare_get.rate:.1f} = "
        f"{get.rate / bare_get.rate if bare_get.rate else math.nan:.2f}x (alternate phases, same server)"
    )
    out(
        "server/pg/client/other: cores busy during the phase (server processes, all postgres "
        f"processes, this client, everything else on the machine); {usable} usable cores"
    )
    noisy = [
        r.name
        for r in (create, bare_create, get, bare_get, listing, raw)
        if r.cpu.get("other", 0) > NOISY_CORES
    ]
    if noisy:
        out(
            f"WARNING: other processes used more than {NOISY_CORES} cores during {', '.join(noisy)}; "
            "these figures are not comparable (rerun, e.g. with --wait-idle 300)"
        )
    if any(r.cut for r in (create, bare_create, get, bare_get, listing)):
        out("* phase stopped at --phase-timeout before all planned requests were sent")
    for result in (create, bare_create, get, bare_get, listing):
        if result.error_kinds:
            out(f"errors in {result.name}: {dict(result.error_kinds)}")
    if rows != created:
        out(f"MISMATCH: {created} creates answered 2xx but {rows} rows exist")
    out(f"rows created: {rows}; total run time {time.perf_counter() - started:.1f} s")
    for figure, value, ceiling, ceiling_value, goal, met in (
        ("managed object create vs bare DRF", create.rate, "bare DRF CreateAPIView, same server, alternate phases", bare_create.rate, ">= 0.9x bare DRF", create.rate >= 0.9 * bare_create.rate),
        ("managed object create vs raw INSERT", create.rate, "raw single-row INSERT, one connection", raw.rate, ">= 0.25x raw INSERT", create.rate >= 0.25 * raw.rate),
        ("managed object create p99", create.p(0.99), "bare DRF create p99", bare_create.p(0.99), "p99 < 50 ms", create.p(0.99) < 50),
        ("managed object get vs bare DRF", get.rate, "bare DRF RetrieveAPIView, same server, alternate phases", bare_get.rate, ">= 0.9x bare DRF", get.rate >= 0.9 * bare_get.rate),
        ("managed object get p99", get.p(0.99), "bare DRF get p99", bare_get.p(0.99), "p99 < 50 ms", get.p(0.99) < 50),
    ):  # fmt: skip
        summary(out, figure, value, "req/s" if "p99" not in figure else "ms", ceiling=ceiling,
                ceiling_value=ceiling_value, goal=goal, met=met)  # fmt: skip
    if args.save:
        out.save(f"inventory_http-{args.server}")
    errors = sum(r.errors for r in (create, bare_create, get, bare_get, listing))
    return 1 if errors or rows != created else 0


if __name__ == "__main__":
    run_main(main)
