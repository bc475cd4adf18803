"""What health and metrics cost (issue 15): /health/ready and a /metrics scrape beside
/health/live (an HTTP round trip through the same stack, the ceiling), and a GET of a managed object
with the request-metrics middleware beside the same GET without it (bench/metrics_off).

Two gunicorn servers (one sync worker each, PROMETHEUS_MULTIPROC_DIR set as bin/run sets it) on a
dedicated database; one connection, so each figure is one request's latency. The database gets
`--pending` PENDING operations spread over `--agents` agents first, which the scrape reads (the
per-agent histogram); the product server's own requests fill the HTTP series the scrape renders.

Usage:  .venv/bin/python bench/metrics.py [--requests 2000] [--pending 20000] [--agents 1000]
"""

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from _common import (
    REPO,
    TABLE_HEADER,
    Call,
    Load,
    PhaseResult,
    Report,
    Server,
    bench_env,
    checked_database_url,
    checked_redis_url,
    combined,
    command_line,
    database_name,
    flush_redis,
    free_port,
    gunicorn_command,
    load_average_line,
    machine_line,
    migrate_and_create_user,
    recreate_database,
    redacted,
    run_main,
    setup_django,
    summary,
)

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/dp_bench_metrics"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/11"
ROUNDS = 3  # product and ceiling phases alternate this many times


def seed(env: dict[str, str], pending: int, agents: int) -> int:
    """A device and `pending` PENDING operations spread over `agents` agent ids; the device id."""
    setup_django(env)
    from devicecontrol.models import Operation, OperationStatus
    from inventory.models import ManagedObject

    device = ManagedObject.objects.create(name="bench device", owner="bench", is_device=True)
    Operation.objects.bulk_create(
        (
            Operation(
                device=device,
                agent_id=1_000_000 + i % agents,
                status=OperationStatus.PENDING,
                fragments={"c8y_Restart": {}},
            )
            for i in range(pending)
        ),
        batch_size=5000,
    )
    return device.pk


async def measure(
    args: argparse.Namespace, product: tuple[str, int], bare: tuple[str, int], device: int
) -> None:
    report = Report()
    get = f"/inventory/managedObjects/{device}"
    n = args.requests
    phases: dict[str, list[PhaseResult]] = {}
    async with (
        Load(product[0], 1, product[1], args.database) as on,
        Load(bare[0], 1, bare[1], args.database) as off,
    ):
        for load in (on, off):
            await load.warm_up(get)
        # The scrape's HTTP series come from these requests (and the warm-up's).
        report(TABLE_HEADER)
        for _ in range(ROUNDS):
            for name, load, path in (
                ("GET mo, no mw", off, get),
                ("GET mo, metrics", on, get),
                ("health/live", on, "/health/live"),
                ("health/ready", on, "/health/ready"),
                ("metrics scrape", on, "/metrics"),
            ):
                count = n if "scrape" not in name else max(50, n // 10)
                result = await load.run(name, (Call("GET", path) for _ in range(count)), 300)
                phases.setdefault(name, []).append(result)
        report("combined:")
        results = {name: combined(name, parts) for name, parts in phases.items()}
        for result in results.values():
            report(result.row())
        scrape = await on.one(Call("GET", "/metrics"))
        ready = await on.one(Call("GET", "/health/ready"))
    lines = scrape[1].count(b"\n")
    report(f"scrape size: {len(scrape[1])} bytes, {lines} lines")
    report(f"ready answer: HTTP {ready[0]} {json.loads(ready[1])}")
    mw_on, mw_off = results["GET mo, metrics"], results["GET mo, no mw"]
    live = results["health/live"]
    report(
        f"middleware: p50 {mw_on.p(0.5):.3f} ms with, {mw_off.p(0.5):.3f} ms without "
        f"({(mw_on.p(0.5) - mw_off.p(0.5)) * 1000:+.0f} µs)"
    )
    summary(
        report,
        "GET with metrics middleware p50",
        mw_on.p(0.5),
        "ms",
        ceiling="same GET without it",
        ceiling_value=mw_off.p(0.5),
    )
    summary(
        report,
        "/health/ready p50",
        results["health/ready"].p(0.5),
        "ms",
        ceiling="/health/live p50",
        ceiling_value=live.p(0.5),
    )
    summary(
        report,
        "/metrics scrape p50",
        results["metrics scrape"].p(0.5),
        "ms",
        ceiling="/health/live p50",
        ceiling_value=live.p(0.5),
    )
    if args.save:
        report.save("metrics")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--requests", type=int, default=2000, help="per phase and round")
    parser.add_argument("--pending", type=int, default=20_000)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args(argv)
    url, admin_url = checked_database_url(args.database_url)
    redis_url = checked_redis_url(args.redis_url)
    args.database = database_name(url)
    print(command_line("bench/metrics.py", argv))
    print(machine_line())
    print(load_average_line())
    print(f"database {redacted(url)}, redis {redis_url}")
    recreate_database(url, admin_url)
    flush_redis(redis_url)
    # Ready is measured on its UP path: the heartbeats are written once, and may be an hour old.
    health = {"HEALTH_WORKER_MAX_AGE_SECONDS": "3600", "HEALTH_BEAT_MAX_AGE_SECONDS": "3600"}
    env = bench_env(url, REDIS_URL=redis_url, PYTHONPATH=str(REPO), **health)
    migrate_and_create_user(env)
    device = seed(env, args.pending, args.agents)
    import redis

    client = redis.Redis.from_url(redis_url)
    for name in ("worker", "beat"):
        client.set(f"dp:health:{name}", repr(time.time()))
    with tempfile.TemporaryDirectory(prefix="dp-bench-metrics-") as scratch:
        servers = []
        for name, settings in (
            ("product", "deviceplatform.settings"),
            ("bare", "bench.metrics_off.settings"),
        ):
            directory = Path(scratch) / name
            directory.mkdir()
            port = free_port()
            server_env = dict(
                env, DJANGO_SETTINGS_MODULE=settings, PROMETHEUS_MULTIPROC_DIR=str(directory)
            )
            server = Server(
                gunicorn_command(1, port), server_env, Path(scratch) / f"{name}.log", name
            )
            server.wait_ready(f"http://127.0.0.1:{port}/health/live")
            servers.append((server, (f"http://127.0.0.1:{port}", server.pid)))
        try:
            asyncio.run(measure(args, servers[0][1], servers[1][1], device))
        finally:
            for server, _ in servers:
                server.stop()
    return 0


if __name__ == "__main__":
    run_main(main)
