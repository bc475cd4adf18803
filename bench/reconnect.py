"""A fleet reconnecting after a restart of the web tier: every device user's first request again.

Creates a dedicated PostgreSQL database with N device users (group `devices`), each with its own
generated password stored as onboarding and rotation store it (the fast device hash,
deviceplatform/hashers.py), and P device users stored with PBKDF2 (what every device user had
before: the "before"). Then, against freshly started gunicorn workers
(`gunicorn -c python:deviceplatform.gunicorn_conf deviceplatform.wsgi --workers W`):

  1. device hash, N users, cold: every user sends one `GET /inventory/managedObjects?pageSize=1`
     with its own Basic credentials over C concurrent connections (no worker has seen any of them);
  2. the same users again (the ceiling: each password is now in the verified-password cache of the
     worker that served it, so at most a cheap check is left);
  3. after a restart: the first P device-hash users cold, the same round as 1 at the small size;
  4. the P PBKDF2 users cold, then again (about W-1 in W of them reach a worker that has not
     verified them yet and pay PBKDF2 once more).

For each round: wall time until every user was served, requests/s, latency p50/p99/max, and the
server's CPU (seconds in total and per request). Errors (non-2xx answers) are counted and shown.

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
    command_line,
    cores_used,
    cpu_sample,
    database_name,
    free_port,
    load_average_line,
    machine_line,
    migrate_and_create_user,
    recreate_database,
    run_main,
    server_split,
    setup_django,
    wait_for_idle,
)

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/dp_bench_reconnect"
PATH = "/inventory/managedObjects?pageSize=1"
PBKDF2_PASSWORD = "pbkdf2-device-pw:not-secret-0123456789"  # noqa: S105 (bench fixture)
IDLE_CORES = 0.5


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
        "--database-url",
        default=os.environ.get("BENCH_RECONNECT_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="PostgreSQL on loopback; DROPPED and re-created (its name must contain 'bench')",
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
    return args


def create_users(users: int, pbkdf2_users: int) -> tuple[list[tuple[str, str]], list[str]]:
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


async def one_round(
    name: str, server: Server, logins: list[tuple[str, str]], args: argparse.Namespace, db: str
) -> PhaseResult:
    """Each (login, password) sends one GET with its own credentials; `concurrency` at a time."""
    base = f"http://127.0.0.1:{server.port}"  # type: ignore[attr-defined]
    result = PhaseResult(name=name, planned=len(logins))
    pending = iter(logins)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=args.round_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        before = cpu_sample(server.pid, db)
        start = time.perf_counter()
        deadline = start + args.round_timeout

        async def client() -> None:
            for login, password in pending:
                if time.perf_counter() > deadline:
                    result.cut = True
                    return
                headers = {
                    "Authorization": basic_auth(login, password),
                    "Accept": "application/json",
                }
                t0 = time.perf_counter()
                problem = ""
                try:
                    async with session.get(base + PATH, headers=headers) as response:
                        await response.read()
                        if response.status != 200:
                            problem = f"HTTP {response.status}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    problem = type(exc).__name__
                result.latencies.append(time.perf_counter() - t0)
                if problem:
                    result.errors += 1
                    result.error_kinds[problem] += 1

        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        result.elapsed = time.perf_counter() - start
        after = cpu_sample(server.pid, db)
    result.cpu = cores_used(before, after, result.elapsed)
    result.per_process = server_split(before, after, result.elapsed)
    return result


HEADER = TABLE_HEADER + f"{'wall s':>9}{'server CPU s':>14}{'CPU ms/req':>12}"


def cpu_per_request(result: PhaseResult) -> float:
    """Server CPU milliseconds per completed request."""
    cpu_seconds = result.cpu.get("server", math.nan) * result.elapsed
    return cpu_seconds / result.done * 1000 if result.done else math.nan


def row(result: PhaseResult) -> str:
    cpu_seconds = result.cpu.get("server", math.nan) * result.elapsed
    return (
        result.row() + f"{result.elapsed:>9.1f}{cpu_seconds:>14.1f}{cpu_per_request(result):>12.2f}"
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
        f"each user one GET {PATH}"
    )
    recreate_database(url, admin_url)
    env = bench_env(url)
    migrate_and_create_user(env)
    setup_django(env)
    t0 = time.perf_counter()
    fast, slow = create_users(args.users, args.pbkdf2_users)
    report(f"created the users in {time.perf_counter() - t0:.1f} s")
    slow_logins = [(name, PBKDF2_PASSWORD) for name in slow]
    fast_logins = [(name, password) for name, password in fast]
    small = fast_logins[: args.pbkdf2_users]
    results: list[PhaseResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-reconnect-") as tmp:
        log_dir = Path(tmp)

        def measure(name: str, server: Server, logins: list[tuple[str, str]]) -> None:
            result = asyncio.run(one_round(name, server, logins, args, db))
            results.append(result)
            report(row(result))
            if result.errors:
                report(f"  errors: {dict(result.error_kinds.most_common(5))}")

        report()
        report(HEADER)
        server = start_server(args, env, log_dir)
        try:
            measure(f"device x{args.users} cold", server, fast_logins)
            measure(f"device x{args.users} again", server, fast_logins)
        finally:
            server.stop()
        server = start_server(args, env, log_dir)
        try:
            if small:
                measure(f"device x{len(small)} cold", server, small)
            if slow_logins:
                measure(f"pbkdf2 x{len(slow_logins)} cold", server, slow_logins)
                measure(f"pbkdf2 x{len(slow_logins)} again", server, slow_logins)
        finally:
            server.stop()
    report()
    cold, again = results[0], results[1]
    report(
        f"{args.users:,} device users after a restart: all served in {cold.elapsed:.1f} s "
        f"({cold.rate:.0f} req/s, {cpu_per_request(cold):.2f} ms server CPU each); once verified "
        f"{again.elapsed:.1f} s ({again.rate:.0f} req/s, {cpu_per_request(again):.2f} ms): "
        f"the first round ran at {cold.rate / again.rate:.2f}x the ceiling's rate and cost "
        f"{cpu_per_request(cold) / cpu_per_request(again):.2f}x its CPU per request (CPU is the "
        "steadier figure when other work shares the machine: see the `other` column)"
    )
    if slow_logins:
        slow_cold = results[-2]
        per_user = slow_cold.cpu.get("server", math.nan) * slow_cold.elapsed / slow_cold.done
        report(
            f"PBKDF2 before: {len(slow_logins)} users cold took {slow_cold.elapsed:.1f} s, "
            f"{per_user:.3f} s of server CPU per user; at that cost {args.users:,} users would "
            f"need about {per_user * args.users / 60:.0f} CPU-minutes per restart (first worker "
            "only; each further worker a user reaches pays again)"
        )
    if any(result.errors for result in results):
        report("ERRORS: see above")
    if args.save:
        report.save("reconnect")
    return 1 if any(result.errors or result.cut for result in results) else 0


if __name__ == "__main__":
    run_main(main)
