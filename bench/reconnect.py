"""A fleet reconnecting after a restart of the web tier: every device user's first request again.

Creates a dedicated PostgreSQL database with N device users (group `devices`), each with its own
generated password stored as onboarding and rotation store it (the fast device hash,
deviceplatform/hashers.py), and P device users stored with PBKDF2 (what every device user had
before). The server is gunicorn as in production
(`gunicorn -c python:deviceplatform.gunicorn_conf deviceplatform.wsgi --workers W`) with REDIS_URL
(a dedicated DB, flushed first): the verified-credentials cache and the failed-login counters are
shared by the workers and outlive them (deviceplatform/api/credential_cache.py, auth_throttle.py).
Each client request carries an `X-Forwarded-For` address of its own (USE_X_FORWARDED_FOR=true), so
that the per-address limit sees the flood's one source apart from the good clients.

  first server (nothing verified anywhere yet):
    `device first`   every device user sends one `GET /inventory/managedObjects?pageSize=1`, C at a time;
    `pbkdf2 first`   the same for the PBKDF2 users (each pays PBKDF2 once: the "before");
  a restart of every web process (a new gunicorn), then:
    `device restart` the same N users again: the headline, "all served within 60 s";
    `device again`   once more: the ceiling (every password in its worker's memory);
    `pbkdf2 restart` the PBKDF2 users after the restart (verified before: from Redis, no PBKDF2);
    `flood fleet`    1,000 wrong passwords from one source, spread over the device users, paced;
    `flood pbkdf2`   the same over the PBKDF2 users (the first checks cost PBKDF2 until the limit);
    `good alone` / `good + flood`: the first 2,000 device users (at most half) again without, then
                     with a flood beside them (alternating ceiling and product in the same minute).

For each round: wall time until every user was served, requests/s, latency p50/p99/max, the cores
used (server, PostgreSQL, client, everything else) and the server's CPU seconds in total and per
request. Headline figures are printed with `summary(...)` (bench/_common.py).

Usage (see bench/README.md):  .venv/bin/python bench/reconnect.py [--users 10000] [--pbkdf2-users 200]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
from _common import (
    TABLE_HEADER,
    PhaseResult,
    Report,
    Server,
    basic_auth,
    bench_env,
    checked_database_url,
    checked_redis_url,
    command_line,
    cores_used,
    cpu_sample,
    database_name,
    flush_redis,
    free_port,
    load_average_line,
    machine_line,
    migrate_and_create_user,
    recreate_database,
    run_main,
    server_split,
    setup_django,
    summary,
    wait_for_idle,
)

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/dp_bench_reconnect"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
PATH = "/inventory/managedObjects?pageSize=1"
PBKDF2_PASSWORD = "pbkdf2-device-pw:not-secret-0123456789"  # noqa: S105 (bench fixture)
WRONG_PASSWORD = "wrong-password:not-secret-0123456789"  # noqa: S105 (bench fixture)
# Each flood comes from a source of its own (documentation addresses, only ever written into a
# header), so that each starts with a fresh per-address window.
FLOOD_SOURCES = {"fleet": "192.0.2.66", "pbkdf2": "192.0.2.67", "mixed": "192.0.2.68"}
IDLE_CORES = 0.5
GOAL_SECONDS = 60.0
GOAL_FLOOD_SHARE = 10.0  # % of one core, per source, for a flood of --flood requests a window
MIXED_USERS = 2000
Login = tuple[str, str]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--users", "-n", type=int, default=10_000, help="device-hash users")
    parser.add_argument("--pbkdf2-users", type=int, default=200, help="PBKDF2 users (before)")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn sync workers")
    parser.add_argument("--concurrency", "-c", type=int, default=32, help="client connections")
    parser.add_argument(
        "--round-timeout", type=float, default=600.0, help="seconds before a round stops issuing"
    )
    parser.add_argument(
        "--flood", type=int, default=1000, help="wrong-password requests per flood (0: none)"
    )
    parser.add_argument(
        "--flood-rate", type=float, default=100.0, help="flood requests per second (0: unpaced)"
    )
    parser.add_argument("--flood-connections", type=int, default=4, help="the flood's connections")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_RECONNECT_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="PostgreSQL on loopback; DROPPED and re-created (its name must contain 'bench')",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_RECONNECT_REDIS_URL", DEFAULT_REDIS_URL),
        help="Redis DB for the server (FLUSHED; not DB 0); '' runs without Redis (then each "
        "worker keeps its own verified passwords and counters)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=60.0,
        help="before each server start, wait up to this many seconds for the machine to be quiet",
    )
    parser.add_argument("--save", action="store_true", help="also write bench/results/*.txt")
    args = parser.parse_args(argv)
    if args.users < args.pbkdf2_users or args.users < 1:
        parser.error("need --users >= --pbkdf2-users and >= 1")
    if args.redis_url:
        checked_redis_url(args.redis_url)
    return args


def create_users(users: int, pbkdf2_users: int) -> tuple[list[Login], list[str]]:
    """(device-hash users as (name, password), PBKDF2 users' names), created in bulk: each
    device-hash user with its own generated password, the PBKDF2 ones sharing one hash (a check
    costs the same whatever the password)."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password
    from django.contrib.auth.models import Group

    from deviceplatform.hashers import device_password_hash
    from deviceplatform.services import generate_password

    user_model = get_user_model()
    fast = [(f"device_fast-{i:05d}", generate_password()) for i in range(users)]
    slow = [f"device_slow-{i:05d}" for i in range(pbkdf2_users)]
    pbkdf2 = make_password(PBKDF2_PASSWORD)
    assert pbkdf2.startswith("pbkdf2_sha256$")
    rows = [user_model(username=name, password=device_password_hash(pw)) for name, pw in fast]
    rows += [user_model(username=name, password=pbkdf2) for name in slow]
    created = user_model.objects.bulk_create(rows, batch_size=2000)
    group = Group.objects.get(name="devices")
    through = user_model.groups.through
    through.objects.bulk_create(
        [through(user_id=user.pk, group_id=group.pk) for user in created], batch_size=5000
    )
    return fast, slow


def start_server(args: argparse.Namespace, env: dict[str, str], log_dir: Path) -> Server:
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle, IDLE_CORES)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        "python:deviceplatform.gunicorn_conf",
        "deviceplatform.wsgi",
        "--workers",
        str(args.workers),
        "--bind",
        f"127.0.0.1:{port}",
    ]
    server = Server(command, env, log_dir / f"server-{time.monotonic_ns()}.log")
    server.port = port  # type: ignore[attr-defined]
    server.wait_ready(f"http://127.0.0.1:{port}/tenant/loginOptions")
    return server


def good_source(index: int) -> str:
    """A client address of its own for each good client (a documentation range, header only)."""
    return f"198.51.{100 + index // 250 % 4}.{1 + index % 250}"


async def send_all(
    server: Server,
    requests: list[tuple[Login, str]],
    args: argparse.Namespace,
    result: PhaseResult,
    *,
    connections: int,
    expected: frozenset[int] = frozenset({200}),
    rate: float = 0.0,
) -> None:
    """Each ((login, password), client address) sends one GET; `connections` at a time, paced at
    `rate` requests/s when above 0. Answers outside `expected` count as errors; every status is
    tallied in `result.error_kinds` as `HTTP <status>` when it is not 200."""
    base = f"http://127.0.0.1:{server.port}"  # type: ignore[attr-defined]
    pending = iter(enumerate(requests))
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=args.round_timeout)
    start = time.perf_counter()
    deadline = start + args.round_timeout
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            for index, ((login, password), source) in pending:
                if rate > 0:
                    delay = start + index / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if time.perf_counter() > deadline:
                    result.cut = True
                    return
                headers = {
                    "Authorization": basic_auth(login, password),
                    "Accept": "application/json",
                    "X-Forwarded-For": source,
                }
                t0 = time.perf_counter()
                problem = ""
                try:
                    async with session.get(base + PATH, headers=headers) as response:
                        await response.read()
                        if response.status != 200:
                            result.error_kinds[f"HTTP {response.status}"] += 1
                        if response.status not in expected:
                            problem = f"HTTP {response.status}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    problem = type(exc).__name__
                    result.error_kinds[problem] += 1
                result.latencies.append(time.perf_counter() - t0)
                if problem:
                    result.errors += 1

        await asyncio.gather(*(client() for _ in range(connections)))


def measure_phase(
    name: str, server: Server, db: str, run: Callable[[PhaseResult], object], planned: int
) -> PhaseResult:
    """Run `run(result)` (a coroutine function) with the server's CPU sampled around it."""
    result = PhaseResult(name=name, planned=planned)
    before = cpu_sample(server.pid, db)
    start = time.perf_counter()
    asyncio.run(run(result))  # type: ignore[arg-type]
    result.elapsed = time.perf_counter() - start
    after = cpu_sample(server.pid, db)
    result.cpu = cores_used(before, after, result.elapsed)
    result.per_process = server_split(before, after, result.elapsed)
    return result


def good(logins: list[Login]) -> list[tuple[Login, str]]:
    return [(login, good_source(index)) for index, login in enumerate(logins)]


def flood(names: list[str], count: int, source: str) -> list[tuple[Login, str]]:
    """`count` wrong passwords from one source, spread over `names` (round robin)."""
    return [((names[i % len(names)], WRONG_PASSWORD), source) for i in range(count)]


HEADER = TABLE_HEADER + f"{'wall s':>9}{'server CPU s':>14}{'CPU ms/req':>12}"


def server_cpu_seconds(result: PhaseResult) -> float:
    return result.cpu.get("server", math.nan) * result.elapsed


def cpu_per_request(result: PhaseResult) -> float:
    """Server CPU milliseconds per completed request."""
    return server_cpu_seconds(result) / result.done * 1000 if result.done else math.nan


def row(result: PhaseResult) -> str:
    return (
        result.row()
        + f"{result.elapsed:>9.1f}{server_cpu_seconds(result):>14.1f}"
        + f"{cpu_per_request(result):>12.2f}"
    )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    url, admin_url = checked_database_url(args.database_url)
    db = database_name(url)
    report = Report()
    report(command_line("bench/reconnect.py", argv))
    report(machine_line())
    report(load_average_line())
    report(
        f"device users: {args.users:,} with the device hash, {args.pbkdf2_users:,} with PBKDF2; "
        f"gunicorn {args.workers} sync workers (gunicorn_conf); {args.concurrency} connections; "
        f"each user one GET {PATH}; Redis: {args.redis_url or 'none (per-process caches)'}"
    )
    recreate_database(url, admin_url)
    extra = {"USE_X_FORWARDED_FOR": "true"}
    if args.redis_url:
        flush_redis(args.redis_url)
        extra["REDIS_URL"] = args.redis_url
    env = bench_env(url, **extra)
    migrate_and_create_user(env)
    setup_django(env)
    from django.conf import settings

    window = settings.AUTH_FAILURE_WINDOW_SECONDS
    report(
        f"failed-login limits: {settings.AUTH_FAILURES_PER_USER} per user, "
        f"{settings.AUTH_FAILURES_PER_ADDRESS} per address, in {window:.0f} s; verified "
        f"credentials kept {settings.AUTH_VERIFIED_CACHE_SECONDS:.0f} s"
    )
    t0 = time.perf_counter()
    fast, slow = create_users(args.users, args.pbkdf2_users)
    report(f"created the users in {time.perf_counter() - t0:.1f} s")
    slow_logins = [(name, PBKDF2_PASSWORD) for name in slow]
    mixed = fast[: max(1, min(MIXED_USERS, len(fast) // 2))]
    results: dict[str, PhaseResult] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-reconnect-") as tmp:
            log_dir = Path(tmp)

            def measure(
                key: str,
                name: str,
                server: Server,
                requests: list[tuple[Login, str]],
                *,
                connections: int = args.concurrency,
                expected: frozenset[int] = frozenset({200}),
                rate: float = 0.0,
            ) -> PhaseResult:
                async def run(result: PhaseResult) -> None:
                    await send_all(
                        server,
                        requests,
                        args,
                        result,
                        connections=connections,
                        expected=expected,
                        rate=rate,
                    )

                result = measure_phase(name, server, db, run, len(requests))
                results[key] = result
                report(row(result))
                if result.error_kinds:
                    report(f"  answers other than 200: {dict(result.error_kinds.most_common(5))}")
                return result

            report()
            report(HEADER)
            server = start_server(args, env, log_dir)
            try:
                measure("first", f"device x{args.users} first", server, good(fast))
                if slow_logins:
                    measure("pbkdf2 first", f"pbkdf2 x{len(slow)} first", server, good(slow_logins))
            finally:
                server.stop()
            report("-- restart: every web process new --")
            server = start_server(args, env, log_dir)
            try:
                measure("restart", f"device x{args.users} restart", server, good(fast))
                measure("again", f"device x{args.users} again", server, good(fast))
                if slow_logins:
                    measure(
                        "pbkdf2 restart", f"pbkdf2 x{len(slow)} restart", server, good(slow_logins)
                    )
                if args.flood > 0:
                    refused = frozenset({401, 429})
                    flood_args = {
                        "connections": args.flood_connections,
                        "expected": refused,
                        "rate": args.flood_rate,
                    }
                    names = [name for name, _ in fast]
                    measure(
                        "flood fleet",
                        f"flood x{args.flood} fleet",
                        server,
                        flood(names, args.flood, FLOOD_SOURCES["fleet"]),
                        **flood_args,
                    )
                    if slow:
                        measure(
                            "flood pbkdf2",
                            f"flood x{args.flood} pbkdf2",
                            server,
                            flood(slow, args.flood, FLOOD_SOURCES["pbkdf2"]),
                            **flood_args,
                        )
                    measure("good alone", f"good x{len(mixed)} alone", server, good(mixed))

                    async def both(result: PhaseResult) -> None:
                        """The good clients, with the flood beside them until they are done (the
                        flood is stopped then, so the phase lasts as long as the good clients)."""
                        flood_result = PhaseResult(name="flood", planned=args.flood)
                        flooding = asyncio.create_task(
                            send_all(
                                server,
                                flood([n for n, _ in mixed], args.flood, FLOOD_SOURCES["mixed"]),
                                args,
                                flood_result,
                                **flood_args,
                            )
                        )
                        await send_all(
                            server, good(mixed), args, result, connections=args.concurrency
                        )
                        flooding.cancel()
                        await asyncio.gather(flooding, return_exceptions=True)
                        result.error_kinds.update(
                            {f"flood {k}": v for k, v in flood_result.error_kinds.items()}
                        )
                        result.errors += flood_result.errors

                    mixed_result = measure_phase(
                        f"good x{len(mixed)} + flood", server, db, both, len(mixed)
                    )
                    results["good + flood"] = mixed_result
                    report(row(mixed_result) + "  (server CPU includes the flood's)")
                    report(
                        f"  answers other than 200: {dict(mixed_result.error_kinds.most_common(5))}"
                    )
            finally:
                server.stop()
    finally:
        # Also when stopped (bench/all's time limit: SIGTERM): the figures of the rounds done.
        report()
        summarize(report, args, results, window)
    failed = [
        key
        for key, result in results.items()
        if result.cut or (result.errors and not key.startswith("good +"))
    ]
    if failed:
        report(f"ERRORS or cut rounds: {', '.join(failed)} (see above)")
    if args.save:
        report.save("reconnect")
    return 1 if failed else 0


def summarize(
    report: Report, args: argparse.Namespace, results: dict[str, PhaseResult], window: float
) -> None:
    """The figures of the rounds that ran (all of them, or those done before a stop)."""
    if not {"first", "restart", "again"} <= results.keys():
        return
    first, restart, again = results["first"], results["restart"], results["again"]
    report(
        f"{args.users:,} device users after a restart of every web process: all served in "
        f"{restart.elapsed:.1f} s ({restart.rate:.0f} req/s, {cpu_per_request(restart):.2f} ms "
        f"server CPU each); once verified {again.elapsed:.1f} s ({again.rate:.0f} req/s, "
        f"{cpu_per_request(again):.2f} ms); the very first round (nothing verified anywhere) "
        f"{first.elapsed:.1f} s ({cpu_per_request(first):.2f} ms). Compare CPU per request: wall "
        "time moves with whatever else runs (the `other` column)."
    )
    summary(
        report,
        f"{args.users} device users served after a restart",
        restart.elapsed,
        "s",
        ceiling="the same users again, verified",
        ceiling_value=again.elapsed,
        goal=f"<= {GOAL_SECONDS:.0f} s",
        met=restart.elapsed <= GOAL_SECONDS and not restart.errors and not restart.cut,
    )
    summary(
        report,
        "server CPU per request after a restart",
        cpu_per_request(restart),
        "ms",
        ceiling="the same users again, verified",
        ceiling_value=cpu_per_request(again),
    )
    check_seconds = math.nan
    if {"pbkdf2 first", "pbkdf2 restart"} <= results.keys():
        slow_first, slow_restart = results["pbkdf2 first"], results["pbkdf2 restart"]
        check_seconds = server_cpu_seconds(slow_first) / max(1, slow_first.done)
        report(
            f"PBKDF2 device users: first {slow_first.elapsed:.1f} s, {check_seconds:.3f} s of "
            f"server CPU each; after the restart (verified before, from Redis) "
            f"{slow_restart.elapsed:.1f} s, {cpu_per_request(slow_restart):.2f} ms each"
        )
    for key in ("flood fleet", "flood pbkdf2"):
        if key not in results:
            continue
        flooded = results[key]
        seconds = server_cpu_seconds(flooded)
        share = seconds / window * 100
        refused = flooded.error_kinds.get("HTTP 429", 0)
        report(
            f"{key}: {flooded.done} wrong passwords from one source at "
            f"{args.flood_rate or 'full'} req/s cost {seconds:.1f} s of server CPU "
            f"({cpu_per_request(flooded):.2f} ms each; {refused} refused with 429 unchecked): "
            f"{share:.1f} % of a core for {flooded.done} per {window:.0f} s window"
        )
        unlimited = check_seconds * flooded.done / window * 100 if key == "flood pbkdf2" else None
        summary(
            report,
            f"wrong-password flood ({key.split()[1]} users), CPU share per source",
            share,
            "% of a core",
            ceiling="the same checks unlimited (PBKDF2 per check measured above)"
            if unlimited is not None
            else "",
            ceiling_value=unlimited,
            goal=f"<= {GOAL_FLOOD_SHARE:.0f} % of a core",
            met=share <= GOAL_FLOOD_SHARE and not flooded.errors,
        )
    if {"good alone", "good + flood"} <= results.keys():
        alone, mixed = results["good alone"], results["good + flood"]
        flooded = sum(v for k, v in mixed.error_kinds.items() if k.startswith("flood"))
        report(
            f"good clients beside a flood: {mixed.rate:.0f} req/s against {alone.rate:.0f} "
            f"alone ({mixed.rate / alone.rate:.2f}x; {flooded} flood requests meanwhile)"
        )
        summary(
            report,
            "good clients' rate during a flood",
            mixed.rate,
            "req/s",
            ceiling="the same clients alone, just before",
            ceiling_value=alone.rate,
        )


if __name__ == "__main__":
    run_main(main)
