"""What keeping realtime events in commit order costs a write (deviceplatform/realtime/events.py).

Each committed transaction with events runs one more statement just before COMMIT (the upsert on
`deviceplatform_eventsequence`), and the store's publish does a little more per object. This runs
the same service calls in-process against a dedicated PostgreSQL database and Redis DB index, in
two variants, each in a fresh process, alternated --rounds times:

  * `ordered`: the default (REALTIME_ORDER_TIMEOUT_MS 3000): every transaction with events takes
               its numbers just before COMMIT, the store checks them;
  * `plain`:   REALTIME_ORDER_TIMEOUT_MS=0: no numbers, events go out as they come, as before
               commit order existed (the ceiling).

Phases per round: --count `managed_object_create` (the sequence row is inserted), then one
`managed_object_update` of each (the row is updated), each in its own transaction, with a session
subscribed to `/managedobjects/*` so every event is queued once. Reported per call: wall time, CPU
time of this process (Django, the publish), CPU time of the PostgreSQL backends of the bench
database; and the ratio ordered / plain of the medians over the rounds.

Usage:  .venv/bin/python bench/event_order.py [--count 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from _common import (
    REPO,
    Report,
    bench_env,
    checked_database_url,
    checked_redis_url,
    command_line,
    cpu_sample,
    database_name,
    flush_redis,
    load_average_line,
    machine_line,
    manage,
    recreate_database,
    redacted,
    run_main,
    setup_django,
)

VARIANTS = ("ordered", "plain")


def measure(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """One variant in this process: {phase: {wall, client, postgres}} in milliseconds per call."""
    env = bench_env(
        args.database_url,
        REDIS_URL=args.redis_url,
        REALTIME_PREFIX="bench:order",
        REALTIME_ORDER_TIMEOUT_MS="0" if args.variant == "plain" else "3000",
    )
    setup_django(env)
    from deviceplatform.models import EventSequence
    from deviceplatform.realtime.hub import get_hub, watching
    from inventory.services import managed_object_create, managed_object_update

    loop = asyncio.new_event_loop()
    watch = loop.run_until_complete(watching(["/managedobjects/*"]).__aenter__())
    assert watch is not None
    database = database_name(args.database_url)
    ids: list[int] = []
    results: dict[str, dict[str, float]] = {}

    def phase(name: str, call: Any) -> None:
        before, started = cpu_sample(None, database), time.perf_counter()
        for index in range(args.count):
            call(index)
        seconds = time.perf_counter() - started
        after = cpu_sample(None, database)
        postgres = sum(v - before.postgres.get(pid, 0.0) for pid, v in after.postgres.items())
        results[name] = {
            "wall": seconds * 1000 / args.count,
            "client": (after.client - before.client) * 1000 / args.count,
            "postgres": postgres * 1000 / args.count,
        }
        loop.run_until_complete(watch.next(0))  # empty the session's queue

    data = {"c8y_IsDevice": {}, "c8y_Hardware": {"model": "bench"}}
    phase(
        "create",
        lambda i: ids.append(
            managed_object_create(owner="bench", data={**data, "name": f"d{i}"}).pk
        ),
    )
    phase(
        "update",
        lambda i: managed_object_update(managed_object_id=ids[i], data={"c8y_Note": {"n": i}}),
    )
    numbered = EventSequence.objects.count()
    assert numbered == (0 if args.variant == "plain" else args.count), numbered

    async def close() -> None:
        await get_hub().close()

    loop.run_until_complete(close())
    loop.close()
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default="postgres://root@127.0.0.1:5432/dp_bench_order")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--count", type=int, default=2000, help="calls per phase")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two variants")
    parser.add_argument("--save", action="store_true", help="also write bench/results/...")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    url, admin_url = checked_database_url(args.database_url)
    checked_redis_url(args.redis_url)
    if args.variant:
        print(json.dumps(measure(args)))
        return 0

    report = Report()
    report(command_line("bench/event_order.py", argv))
    report(machine_line())
    report(load_average_line())
    report(f"database: {redacted(url)}, redis: {args.redis_url}, {args.count} calls per phase")
    samples: dict[str, dict[str, dict[str, list[float]]]] = {}
    for round_ in range(args.rounds):
        for variant in VARIANTS if round_ % 2 == 0 else reversed(VARIANTS):
            recreate_database(url, admin_url)
            flush_redis(args.redis_url)
            manage(bench_env(url), "migrate", "--noinput", "-v", "0")
            child = subprocess.run(
                [sys.executable, __file__, *argv, "--variant", variant],
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                capture_output=True,
                text=True,
                check=False,
            )
            if child.returncode != 0:
                raise SystemExit(f"{variant} failed:\n{child.stdout}{child.stderr}")
            result = json.loads(child.stdout.strip().splitlines()[-1])
            for name, figures in result.items():
                for what, value in figures.items():
                    samples.setdefault(name, {}).setdefault(what, {}).setdefault(
                        variant, []
                    ).append(value)
            report(
                f"round {round_ + 1} {variant:8}"
                + "".join(
                    f"  {name}: {f['wall']:.3f} ms wall, {f['client']:.3f} ms client CPU, "
                    f"{f['postgres']:.3f} ms postgres CPU"
                    for name, f in result.items()
                )
            )
    report()
    report("median per call        ordered      plain   ordered/plain")
    for name, whats in samples.items():
        for what, variants in whats.items():
            ordered = statistics.median(variants["ordered"])
            plain = statistics.median(variants["plain"])
            ratio = ordered / plain if plain else float("nan")
            report(f"{name:7} {what:9} {ordered:9.3f} ms {plain:8.3f} ms   {ratio:6.2f}x")
    recreate_database(url, admin_url)
    flush_redis(args.redis_url)
    if args.save:
        report.save("event_order")
    return 0


if __name__ == "__main__":
    run_main(main)
