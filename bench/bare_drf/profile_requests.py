"""Profile the product's hot REST requests in-process (cProfile), next to the bare DRF ceiling.

Not a benchmark of throughput: it runs each request N times through the real WSGI application
(middleware included, no network, no server) on a dedicated PostgreSQL database, prints the mean
CPU time per request of the product and of the bare DRF view, and the top of a cProfile of the
product requests. Used to decide what to cut (bench/README.md, "operations.py").

Usage: .venv/bin/python bench/bare_drf/profile_requests.py [--requests 1000] [--top 40]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH))

import orjson  # noqa: E402
from _common import (  # noqa: E402
    BENCH_USER,
    basic_auth,
    bench_env,
    checked_database_url,
    migrate_and_create_user,
    recreate_database,
    setup_django,
)

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/dp_bench"


def environ(method: str, path: str, body: bytes = b"", query: str = "") -> dict[str, object]:
    return {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1:8000",
        "HTTP_AUTHORIZATION": basic_auth(),
        "HTTP_ACCEPT": "application/json",
        "CONTENT_TYPE": "application/json" if body else "",
        "CONTENT_LENGTH": str(len(body)) if body else "",
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--only", default="", help="comma-separated request names to profile")
    args = parser.parse_args(argv)
    url, admin_url = checked_database_url(args.database_url)
    recreate_database(url, admin_url)
    env = bench_env(url, DJANGO_SETTINGS_MODULE="bench.bare_drf.settings")
    env["PYTHONPATH"] = str(BENCH.parent)
    migrate_and_create_user(env)
    setup_django(env)

    from django.core.wsgi import get_wsgi_application

    from inventory.models import ManagedObject, ManagedObjectReference, Relation

    agent = ManagedObject.objects.create(
        name="agent", owner=BENCH_USER, fragments={"com_cumulocity_model_Agent": {}}, is_agent=True
    )
    device = ManagedObject.objects.create(
        name="device", owner=BENCH_USER, fragments={"c8y_IsDevice": {}}, is_device=True
    )
    ManagedObjectReference.objects.create(parent=agent, child=device, relation=Relation.DEVICE)
    # Creates go to another agent's device, so the poll and history pages keep their size.
    other_agent = ManagedObject.objects.create(
        name="agent 2",
        owner=BENCH_USER,
        fragments={"com_cumulocity_model_Agent": {}},
        is_agent=True,
    )
    target = ManagedObject.objects.create(
        name="device 2", owner=BENCH_USER, fragments={"c8y_IsDevice": {}}, is_device=True
    )
    ManagedObjectReference.objects.create(
        parent=other_agent, child=target, relation=Relation.DEVICE
    )
    from devicecontrol.models import Operation

    # The bench's queue: 20 PENDING operations for the agent (its 10 devices x 2 there).
    Operation.objects.bulk_create(
        [
            Operation(
                device=device,
                agent_id=agent.pk,
                fragments={"c8y_Restart": {}, "description": "Restart"},
            )
            for _ in range(20)
        ]
    )
    app = get_wsgi_application()

    def call(env: dict[str, object]) -> tuple[str, bytes]:
        status: list[str] = []
        body = b"".join(app(env, lambda s, h, *a: status.append(s)))
        return status[0], body

    op_body = orjson.dumps(
        {"deviceId": str(target.pk), "description": "Restart", "c8y_Restart": {}}
    )
    bare_op_body = orjson.dumps(
        {
            "device": target.pk,
            "agent_id": other_agent.pk,
            "fragments": {"description": "Restart", "c8y_Restart": {}},
            "expires_at": "2030-01-01T00:00:00Z",
        }
    )
    mo_body = orjson.dumps(
        {
            "name": "bench-device",
            "type": "c8y_BenchDevice",
            "c8y_IsDevice": {},
            "c8y_Hardware": {"model": "BenchBox 1", "serialNumber": "bench-1"},
            "c8y_SupportedOperations": ["c8y_Restart", "c8y_Command"],
        }
    )
    bare_mo_body = orjson.dumps(
        {
            "name": "bench-device",
            "type": "c8y_BenchDevice",
            "owner": BENCH_USER,
            "is_device": True,
            "fragments": {
                "c8y_IsDevice": {},
                "c8y_Hardware": {"model": "BenchBox 1", "serialNumber": "bench-1"},
                "c8y_SupportedOperations": ["c8y_Restart", "c8y_Command"],
            },
        }
    )
    requests = {
        "poll": lambda: environ(
            "GET",
            "/devicecontrol/operations",
            query=f"agentId={agent.pk}&status=PENDING&pageSize=100",
        ),
        "history": lambda: environ(
            "GET", "/devicecontrol/operations", query=f"deviceId={device.pk}&pageSize=20"
        ),
        "operation create": lambda: environ("POST", "/devicecontrol/operations", op_body),
        "bare operation create": lambda: environ("POST", "/bench-bare/operations", bare_op_body),
        "managed object create": lambda: environ("POST", "/inventory/managedObjects", mo_body),
        "bare managed object create": lambda: environ(
            "POST", "/bench-bare/managedObjects", bare_mo_body
        ),
        "managed object get": lambda: environ("GET", f"/inventory/managedObjects/{device.pk}"),
        "bare managed object get": lambda: environ(
            "GET", f"/bench-bare/managedObjects/{device.pk}"
        ),
    }
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    for name, make in requests.items():
        for _ in range(30):  # warm: the password check, imports, the pool
            status, body = call(make())
            if not status.startswith("2"):
                raise SystemExit(f"{name}: {status} {body[:300]!r}")
    from django.db import connection

    print(f"# bench/bare_drf/profile_requests.py, {args.requests} requests each, in-process WSGI")
    print(f"{'request':<28}{'ms CPU':>8}{'queries':>9}")
    profiles: dict[str, cProfile.Profile] = {}
    for name, make in requests.items():
        statements: list[str] = []

        def capture(execute, sql, params, many, context, statements=statements):  # type: ignore[no-untyped-def]
            statements.append(sql)
            return execute(sql, params, many, context)

        with connection.execute_wrapper(capture):
            call(make())
        envs = [make() for _ in range(args.requests)]
        profile = (
            cProfile.Profile(time.process_time)
            if (not only or name in only) and "bare" not in name
            else None
        )
        started = time.process_time()
        if profile is not None:
            profile.enable()
        for env in envs:
            call(env)
        if profile is not None:
            profile.disable()
            profiles[name] = profile
        # CPU time without the profiler's overhead: run again unprofiled.
        envs = [make() for _ in range(args.requests)]
        started = time.process_time()
        for env in envs:
            call(env)
        cpu = (time.process_time() - started) / args.requests * 1000
        print(f"{name:<28}{cpu:>8.3f}{len(statements):>9}")
        for sql in statements:
            print(f"    {sql[:150]}")
    for name, profile in profiles.items():
        print(f"\n=== cProfile: {name} ({args.requests} requests), by own CPU time ===")
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.top)
        print("\n".join(out.getvalue().splitlines()[3:]))
        print(f"=== cProfile: {name}, by cumulative CPU time ===")
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(args.top)
        print("\n".join(out.getvalue().splitlines()[3:]))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
