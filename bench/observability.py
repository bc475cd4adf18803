"""What observability costs (issue 15): a /metrics scrape (time and size) with the HTTP series of
every route filled, /health/ready, the per-request overhead of the request-id access log and the
request-metrics middleware, the cached /openapi.json, and counting the PENDING operations per agent
that a scrape shows. Each figure beside a ceiling measured in the same run:

* `GET /health/live` on the product, the same GET on `bench/observability_off` (the product's
  settings without the request-metrics and access-log middlewares: the request-id and metrics
  overhead is their difference), and a managed-object GET on both (a request with auth and a query);
* `/health/ready` (its UP path: fresh heartbeats), `/metrics` and the cached `/openapi.json` beside
  `/health/live` on the same server (an HTTP round trip through the same stack);
* the PENDING-per-agent count (devicecontrol/metrics.py `count_pending`, what a scrape pays once per
  METRICS_PENDING_CACHE_SECONDS) beside a bare `SELECT count(*)` of the PENDING rows.

Two gunicorn servers (`--workers` sync workers each, PROMETHEUS_MULTIPROC_DIR set as bin/run sets it,
LOG_LEVEL=INFO so that the access log writes its line per request) on a dedicated database; one
connection, so each figure is one request's latency. Before the timed phases every route of the API
is requested once with and once without credentials, which gives the scrape the series a running
platform has (one per route, method and status).

Usage:  .venv/bin/python bench/observability.py [--requests 300] [--pending 100000] [--agents 1000]
        .venv/bin/python bench/observability.py --pending 1000000   # the scrape's count at 1M rows
"""

import argparse
import asyncio
import json
import re
import statistics
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

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/dp_bench_observability"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/11"
ROUNDS = 2  # product and ceiling phases alternate this many times
COUNTS = 5  # in-process PENDING counts (the median is reported)
_GROUP = re.compile(r"\(\?P<\w+>[^)]*\)")


def seed(pending: int, agents: int) -> int:
    """A device and `pending` PENDING operations spread over `agents` agent ids, inserted by one
    INSERT ... SELECT (the ORM would take minutes at 1,000,000); the device id."""
    from django.db import connection

    from inventory.models import ManagedObject

    device = ManagedObject.objects.create(name="bench device", owner="bench", is_device=True)
    with connection.cursor() as cursor:
        cursor.execute(
            """INSERT INTO devicecontrol_operation (device_id, agent_id, status, creation_time,
                   status_changed_at, fragments, superseded, attempt)
               SELECT %s, 1000000 + g %% %s, 'PENDING', now(), now(),
                   '{"c8y_Restart": {}}'::jsonb, false, 1
               FROM generate_series(1, %s) AS g""",
            [device.pk, agents, pending],
        )
        cursor.execute("ANALYZE devicecontrol_operation")
    return device.pk


def route_paths(device: int) -> list[str]:
    """A path for every URL pattern of the API (not the admin UI or static files), its groups
    filled with the device's id."""
    from django.urls import URLResolver, get_resolver

    def walk(patterns: list, prefix: str = "") -> list[str]:
        found = []
        for pattern in patterns:
            regex = prefix + str(pattern.pattern.regex.pattern)
            if isinstance(pattern, URLResolver):
                found += walk(pattern.url_patterns, regex)
            else:
                found.append(regex)
        return found

    paths = []
    for regex in walk(get_resolver().url_patterns):
        if regex.startswith(("^admin", "^static")):
            continue
        path = _GROUP.sub(str(device), regex)
        path = re.sub(r"\\Z|\$|\^|/\?|\?", "", path).replace("\\", "")
        paths.append("/" + path.lstrip("/"))
    return sorted(set(paths))


def time_counts(report: Report) -> tuple[float, float]:
    """Median ms of `count_pending()` and of a bare count of the PENDING rows."""
    from django.db import connection

    from devicecontrol.metrics import count_pending

    counted, bare = [], []
    for _ in range(COUNTS):
        t0 = time.perf_counter()
        figures = count_pending()
        counted.append((time.perf_counter() - t0) * 1000)
        with connection.cursor() as cursor:
            t0 = time.perf_counter()
            cursor.execute("SELECT count(*) FROM devicecontrol_operation WHERE status = 'PENDING'")
            (rows,) = cursor.fetchone()
            bare.append((time.perf_counter() - t0) * 1000)
    report(
        f"PENDING per agent: {rows} PENDING operations, {sum(figures['agents_in'])} agents; "
        f"count_pending median {statistics.median(counted):.1f} ms (max {max(counted):.1f}), "
        f"bare count(*) median {statistics.median(bare):.1f} ms"
    )
    return statistics.median(counted), statistics.median(bare)


def library_floor(directory: str) -> float:
    """Median ms of prometheus-client merging the multi-process files in `directory` and rendering
    them (the scrape's floor: what is left is HTTP, the access checks and our collectors)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=directory)
    times = []
    for _ in range(COUNTS):
        t0 = time.perf_counter()
        generate_latest(registry)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


async def fill_series(load: Load, anonymous: Load, paths: list[str]) -> int:
    """GET every path with and without credentials (each answer's status makes a series)."""
    for path in paths:
        await load.one(Call("GET", path))
        await anonymous.one(Call("GET", path))
    return 2 * len(paths)


async def measure(
    report: Report,
    args: argparse.Namespace,
    product: tuple[str, int],
    bare: tuple[str, int],
    device: int,
    paths: list[str],
) -> None:
    get = f"/inventory/managedObjects/{device}"
    n = args.requests
    phases: dict[str, list[PhaseResult]] = {}
    async with (
        Load(product[0], 1, product[1], args.database) as on,
        Load(bare[0], 1, bare[1], args.database) as off,
        Load(product[0], 1, product[1], args.database) as anonymous,
    ):
        anonymous.headers = {"Accept": "application/json"}
        for load in (on, off):
            await load.warm_up(get)
        first = await on.one(Call("GET", "/openapi.json"))
        report(f"first /openapi.json of a worker: HTTP {first[0]}, {first[2] * 1000:.1f} ms")
        sent = await fill_series(on, anonymous, paths)
        report(f"series filled: {len(paths)} routes, {sent} requests")
        report(TABLE_HEADER)
        for _ in range(ROUNDS):
            for name, load, path, count in (
                ("live, bare", off, "/health/live", n),
                ("live", on, "/health/live", n),
                ("GET mo, bare", off, get, n),
                ("GET mo", on, get, n),
                ("health/ready", on, "/health/ready", n),
                ("metrics scrape", on, "/metrics", max(20, n // 10)),
                ("openapi.json", on, "/openapi.json", max(50, n // 4)),
            ):
                result = await load.run(name, (Call("GET", path) for _ in range(count)), 300)
                phases.setdefault(name, []).append(result)
                report(result.row())
        report("combined:")
        results = {name: combined(name, parts) for name, parts in phases.items()}
        for result in results.values():
            report(result.row())
        scrape = await on.one(Call("GET", "/metrics"))
        ready = await on.one(Call("GET", "/health/ready"))
        schema = await on.one(Call("GET", "/openapi.json"))
    text = scrape[1].decode()
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    report(f"scrape: {len(scrape[1])} bytes, {series} series (samples)")
    report(f"ready answer: HTTP {ready[0]} {json.loads(ready[1])}")
    report(f"/openapi.json: {len(schema[1])} bytes")
    p50 = {name: result.p(0.5) for name, result in results.items()}
    report(
        f"request-id log + metrics middleware: live {p50['live'] - p50['live, bare']:+.3f} ms, "
        f"managed-object GET {p50['GET mo'] - p50['GET mo, bare']:+.3f} ms (p50 differences)"
    )
    summary(
        report,
        "/health/live p50, request-id log + metrics mw",
        p50["live"],
        "ms",
        ceiling="same GET without both",
        ceiling_value=p50["live, bare"],
    )
    summary(
        report,
        "GET mo p50, request-id log + metrics mw",
        p50["GET mo"],
        "ms",
        ceiling="same GET without both",
        ceiling_value=p50["GET mo, bare"],
    )
    summary(
        report,
        "/health/ready p50",
        p50["health/ready"],
        "ms",
        ceiling="/health/live p50",
        ceiling_value=p50["live"],
        goal="polled every second: < 10 ms",
        met=p50["health/ready"] < 10,
    )
    floor = library_floor(args.product_metrics_dir)
    report(
        f"prometheus-client alone, in this process, merging and rendering the product's "
        f"{args.workers} workers' files: median {floor:.1f} ms"
    )
    summary(
        report,
        f"/metrics scrape p50 ({series} series, {len(scrape[1]) // 1024} KiB)",
        p50["metrics scrape"],
        "ms",
        ceiling="prometheus-client merge + render of the same files",
        ceiling_value=floor,
    )
    summary(
        report,
        "/openapi.json p50 (cached)",
        p50["openapi.json"],
        "ms",
        ceiling="/health/live p50",
        ceiling_value=p50["live"],
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--requests", type=int, default=300, help="per phase and round")
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers per server")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args(argv)
    url, admin_url = checked_database_url(args.database_url)
    redis_url = checked_redis_url(args.redis_url)
    args.database = database_name(url)
    report = Report()
    report(command_line("bench/observability.py", argv))
    report(machine_line())
    report(load_average_line())
    report(f"database {redacted(url)}, redis {redis_url}")
    started = time.monotonic()
    recreate_database(url, admin_url)
    flush_redis(redis_url)
    # Ready is measured on its UP path: the heartbeats are written once, and may be an hour old.
    health = {"HEALTH_WORKER_MAX_AGE_SECONDS": "3600", "HEALTH_BEAT_MAX_AGE_SECONDS": "3600"}
    env = bench_env(url, REDIS_URL=redis_url, PYTHONPATH=str(REPO), **health)
    migrate_and_create_user(env)
    setup_django(env)
    t0 = time.monotonic()
    device = seed(args.pending, args.agents)
    report(f"seeded {args.pending} PENDING operations in {time.monotonic() - t0:.1f} s")
    counted, bare_count = time_counts(report)
    paths = route_paths(device)
    import redis

    client = redis.Redis.from_url(redis_url)
    for name in ("worker", "beat"):
        client.set(f"dp:health:{name}", repr(time.time()))
    with tempfile.TemporaryDirectory(prefix="dp-bench-observability-") as scratch:
        servers = []
        try:
            for name, settings in (
                ("product", "deviceplatform.settings"),
                ("bare", "bench.observability_off.settings"),
            ):
                directory = Path(scratch) / name
                directory.mkdir()
                if name == "product":
                    args.product_metrics_dir = str(directory)
                port = free_port()
                server_env = dict(
                    env,
                    DJANGO_SETTINGS_MODULE=settings,
                    PROMETHEUS_MULTIPROC_DIR=str(directory),
                    LOG_LEVEL="INFO",
                )
                server = Server(
                    gunicorn_command(args.workers, port),
                    server_env,
                    Path(scratch) / f"{name}.log",
                    name,
                )
                servers.append((server, (f"http://127.0.0.1:{port}", server.pid)))
            for server, (base, _) in servers:
                server.wait_ready(f"{base}/health/live")
            asyncio.run(measure(report, args, servers[0][1], servers[1][1], device, paths))
        finally:
            for server, _ in servers:
                server.stop()
    summary(
        report,
        f"PENDING-per-agent count at {args.pending:,} PENDING (once per cache period)",
        counted,
        "ms",
        ceiling="bare count(*) of the PENDING rows",
        ceiling_value=bare_count,
    )
    report(f"done in {time.monotonic() - started:.1f} s")
    if args.save:
        report.save("observability")
    return 0


if __name__ == "__main__":
    run_main(main)
