"""What the OpenAPI description costs (issue 15 item 1): generating the document in-process (what
every request would pay without the cache), rendering it as JSON and YAML, and `GET /openapi.json`
over HTTP from a gunicorn worker that has it cached, beside `GET /health/live` (an HTTP round trip
through the same stack, the ceiling). The worker's first `/openapi.json` (generation included) is
reported too.

One gunicorn server (one sync worker, as bin/run's REST server) on a dedicated database; one
connection, so each figure is one request's latency.

Usage:  .venv/bin/python bench/openapi.py [--generations 20] [--requests 1000]
"""

import argparse
import asyncio
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
    combined,
    command_line,
    database_name,
    free_port,
    gunicorn_command,
    load_average_line,
    machine_line,
    manage,
    recreate_database,
    redacted,
    run_main,
    setup_django,
    summary,
)

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/dp_bench_openapi"
ROUNDS = 3  # the HTTP phases alternate this many times


def in_process(report: Report, env: dict[str, str], generations: int) -> float:
    """Median ms of one whole generation (the schema hooks attach once per process, as a server
    does on its first request: the first generation is reported apart)."""
    setup_django(env)
    import orjson
    import yaml
    from drf_spectacular.generators import SchemaGenerator

    from deviceplatform.api.openapi_views import _Dumper

    t0 = time.perf_counter()
    document = SchemaGenerator().get_schema(request=None, public=True)
    first = (time.perf_counter() - t0) * 1000
    times = []
    for _ in range(generations):
        t0 = time.perf_counter()
        SchemaGenerator().get_schema(request=None, public=True)
        times.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    as_json = orjson.dumps(document)
    json_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    as_yaml = yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    yaml_ms = (time.perf_counter() - t0) * 1000
    operations = sum(len(item) for item in document["paths"].values())
    report(
        f"document: {len(document['paths'])} paths, {operations} operations, "
        f"{len(document['components']['schemas'])} component schemas, "
        f"{len(as_json)} bytes JSON, {len(as_yaml)} bytes YAML"
    )
    report(
        f"generation: first {first:.1f} ms (hooks attach), then median "
        f"{statistics.median(times):.1f} ms, min {min(times):.1f} ms over {generations}"
    )
    report(f"rendering: JSON {json_ms:.2f} ms, YAML {yaml_ms:.1f} ms (each once per process)")
    return statistics.median(times)


async def over_http(report: Report, base: str, pid: int, database: str, requests: int) -> None:
    phases: dict[str, list[PhaseResult]] = {}
    async with Load(base, 1, pid, database) as load:
        status, body, seconds, _ = await load.one(Call("GET", "/openapi.json"))
        report(f"first /openapi.json of the worker: HTTP {status}, {seconds * 1000:.1f} ms")
        await load.warm_up("/health/live")
        report(TABLE_HEADER)
        for _ in range(ROUNDS):
            for name, path in (("health/live", "/health/live"), ("openapi.json", "/openapi.json")):
                result = await load.run(name, (Call("GET", path) for _ in range(requests)), 300)
                phases.setdefault(name, []).append(result)
                report(result.row())
    report("combined:")
    results = {name: combined(name, parts) for name, parts in phases.items()}
    for result in results.values():
        report(result.row())
    live = results["health/live"].p(0.5)
    summary(
        report,
        "/openapi.json p50 (cached)",
        results["openapi.json"].p(0.5),
        "ms",
        ceiling="/health/live p50",
        ceiling_value=live,
    )
    summary(report, "first /openapi.json of a worker", seconds * 1000, "ms")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--generations", type=int, default=20)
    parser.add_argument("--requests", type=int, default=1000, help="per phase and round")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args(argv)
    url, admin_url = checked_database_url(args.database_url)
    database = database_name(url)
    report = Report()
    report(command_line("bench/openapi.py", argv))
    report(machine_line())
    report(load_average_line())
    report(f"database {redacted(url)}")
    recreate_database(url, admin_url)
    env = bench_env(url, PYTHONPATH=str(REPO))
    manage(env, "migrate", "--noinput", "-v", "0")
    generation = in_process(report, env, args.generations)
    with tempfile.TemporaryDirectory(prefix="dp-bench-openapi-") as scratch:
        port = free_port()
        server = Server(gunicorn_command(1, port), env, Path(scratch) / "server.log", "gunicorn")
        server.wait_ready(f"http://127.0.0.1:{port}/health/live")
        try:
            asyncio.run(
                over_http(report, f"http://127.0.0.1:{port}", server.pid, database, args.requests)
            )
        finally:
            server.stop()
    summary(report, "schema generation (uncached, per request)", generation, "ms")
    if args.save:
        report.save("openapi")
    return 0


if __name__ == "__main__":
    run_main(main)
