"""Rollout rates (issue 14 item 2): an exponential creation rate over --devices devices, measured
against the configured curve, and how soon a pause stops creation.

Creates a dedicated PostgreSQL database and uses a dedicated Redis DB index, seeds agents and
devices and one group with multi-row INSERTs, then runs a real Celery worker (`--pool solo`) and a
real `celery beat` (BULK_RAMP_INTERVAL), as production would (bulkops/tasks.py):

  (a) curve: a bulk operation created by POST /devicecontrol/bulkoperations with
      "rolloutConfig": {"exponentialRate": {"baseRatePerMinute": --base, "incrementFactor":
      --factor, "rateIncreaseCriteria": {"numberOfNotifiedDevices": --every}},
      "maximumPerMinute": --max}. After COMPLETED: the children created in each --interval
      seconds beside the number the configured curve creates in it (the reference: the due time
      of position p is the sum of 60/rate over the positions before it, the rate multiplied by
      --factor every --every positions up to --max), and each child's creationTime minus its due
      time on that curve (max, p99, p50; none may be early). The ceiling of the capped part is
      the configured maximum itself: created per second there beside --max / 60.
  (b) pause: a second bulk operation with a constant rate (--pause-rate per minute) is paused
      --pause-after seconds after its start through POST .../pause; how long the request took
      (it waits for a ramp batch holding the row), and how many children were created after it
      answered (goal: none), beside the ramp's tick (BULK_RAMP_INTERVAL) and the time between two
      children at that rate.

Usage (see bench/README.md):  .venv/bin/python bench/rollout.py [--devices 100000]
                              .venv/bin/python bench/rollout.py --devices 5000 --interval 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
from _common import (
    Report,
    basic_auth,
    bench_env,
    checked_database_url,
    checked_redis_url,
    command_line,
    flush_redis,
    load_average_line,
    machine_line,
    migrate_and_create_user,
    percentile,
    recreate_database,
    run_main,
    setup_django,
    summary,
)
from bulk import MO_COLUMNS, ramp_processes

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/dp_bench_rollout"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
PROTOTYPE = {"description": "Restart device", "c8y_Restart": {}}
MEDIA = "application/vnd.com.nsn.cumulocity.bulkoperation+json"
RAMP_TICK = 0.5  # BULK_RAMP_INTERVAL's default, which the processes run with


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--base", type=float, default=3000, help="baseRatePerMinute")
    parser.add_argument("--factor", type=float, default=2.0, help="incrementFactor")
    parser.add_argument(
        "--every", type=int, default=0, help="numberOfNotifiedDevices (0: --devices / 20)"
    )
    parser.add_argument("--max", type=float, default=120_000, help="maximumPerMinute")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds per curve row")
    parser.add_argument("--pause-devices", type=int, default=2000, help="(b); 0: skip")
    parser.add_argument("--pause-rate", type=float, default=6000, help="(b) per minute")
    parser.add_argument("--pause-after", type=float, default=3.0, help="(b) seconds")
    parser.add_argument("--timeout", type=float, default=900.0, help="per bulk operation, seconds")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_ROLLOUT_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="PostgreSQL on loopback; DROPPED and re-created (its name must contain 'bench')",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_ROLLOUT_REDIS_URL", DEFAULT_REDIS_URL),
        help="Redis on loopback with a dedicated DB index (FLUSHED at start and end)",
    )
    args = parser.parse_args(argv)
    args.every = args.every or max(args.devices // 20, 1)
    if args.pause_devices > args.devices:
        parser.error("--pause-devices must not exceed --devices")
    return args


# --- seeding ------------------------------------------------------------------------------------


def seed(url: str, devices: int, agents: int, groups: dict[str, int]) -> dict[str, int]:
    """Agents, devices (device i under agent i % agents) and a group per `groups` entry holding
    the first that many devices. Returns the group IDs by name."""
    ids: dict[str, int] = {}
    with psycopg.connect(url) as conn:
        agent_fragments = orjson.dumps({"com_cumulocity_model_Agent": {}, "c8y_IsDevice": {}})
        agent_ids = sorted(
            row[0]
            for row in conn.execute(
                f"INSERT INTO inventory_managedobject ({MO_COLUMNS}) SELECT 'c8y_BenchAgent',"  # noqa: S608
                " 'agent-' || g, 'bench', now(), now(), %s::jsonb, true, true, false"
                " FROM generate_series(0, %s) g RETURNING id",
                (agent_fragments.decode(), agents - 1),
            ).fetchall()
        )
        device_ids = sorted(
            row[0]
            for row in conn.execute(
                f"INSERT INTO inventory_managedobject ({MO_COLUMNS}) SELECT 'c8y_BenchDevice',"  # noqa: S608
                " 'device-' || g, 'bench', now(), now(), '{\"c8y_IsDevice\": {}}'::jsonb,"
                " true, false, false FROM generate_series(0, %s) g RETURNING id",
                (devices - 1,),
            ).fetchall()
        )
        for name in groups:
            ids[name] = conn.execute(
                f"INSERT INTO inventory_managedobject ({MO_COLUMNS}) VALUES ('c8y_DeviceGroup',"  # noqa: S608
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
            lines = []
            for i, device in enumerate(device_ids):
                lines.append(f"{agent_ids[i % len(agent_ids)]}\t{device}\tdevice\n")
                lines.extend(
                    f"{ids[name]}\t{device}\tasset\n" for name, size in groups.items() if i < size
                )
            copy.write("".join(lines))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
    return ids


# --- the configured curve ----------------------------------------------------------------------


def configured_offsets(
    count: int, base: float, factor: float, every: int, cap: float
) -> list[float]:
    """Seconds from the start at which each position is due on the configured curve, as the ramp
    computes it (bulkops.rollout): the rate of position p is min(base * factor^(p // every), cap);
    each step is rounded to whole microseconds as the schedule does."""
    offsets = []
    at_us = 0
    step_start_us = 0
    step_first = 0
    rate = min(base, cap)
    level = 0
    for position in range(count):
        if rate < cap and position // every > level:
            level = position // every
            step_start_us = at_us
            step_first = position
            rate = min(base * factor**level, cap)
        ramp_us = round(60.0 / rate * 1_000_000)
        at_us = step_start_us + (position - step_first) * ramp_us
        offsets.append(at_us / 1_000_000)
    return offsets


def curve_table(
    out: Report, actual: list[float], due: list[float], interval: float, until: float | None = None
) -> None:
    """Children created in each `interval` seconds (`actual`: offsets from the start) beside the
    number the configured curve makes due in it (`due`: offsets by position), with both running
    totals. With `until` (an abort's offset) the rows end with the one holding it and the
    configured side counts only what fell due before it."""
    end = max(actual[-1] if actual else 0.0, due[-1] if until is None else until)
    horizon = float("inf") if until is None else until
    rows = int(end // interval) + 1
    out(f"{'seconds':>13} {'created':>9} {'expected':>9} {'cum.':>9} {'exp. cum.':>9}")
    cumulative = expected_cumulative = 0
    for row in range(rows):
        low, high = row * interval, (row + 1) * interval
        got = sum(1 for a in actual if low <= a < high)
        want = sum(1 for d in due if low <= d < min(high, horizon))
        cumulative += got
        expected_cumulative += want
        mark = "  <- abort" if low <= horizon < high else ""
        out(
            f"{low:6.0f}-{high:<6.0f} {got:9,} {want:9,} {cumulative:9,} "
            f"{expected_cumulative:9,}{mark}"
        )


# --- measurements ---------------------------------------------------------------------------------


def snapshot_lead(targets: int) -> float:
    """Seconds ahead of the POST to set a curve's startDate: the POST snapshots every target
    first, and the curve should start after it has committed (else the ramp first catches up what
    fell due meanwhile). 30 s at 100,000 targets, whose POST took 9-12 s on a loaded machine."""
    return 5 + targets / 4000


def post_bulk(client: Any, body: dict[str, Any]) -> int:
    response = client.post(
        "/devicecontrol/bulkoperations",
        data=orjson.dumps(body),
        content_type="application/json",
        HTTP_ACCEPT=MEDIA,
    )
    if response.status_code != 201:
        raise SystemExit(f"POST failed: {response.status_code} {response.content[:300]!r}")
    return int(orjson.loads(response.content)["id"])


def wait_status(url: str, bulk_id: int, worker: Any, timeout: float, status: str) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT status FROM bulkops_bulkoperation WHERE id = %s", (bulk_id,)
            ).fetchone()
            if row[0] == status:
                return
            if not worker.alive():
                raise SystemExit(f"worker died:\n{worker.log_tail(30)}")
            time.sleep(0.1)
    raise SystemExit(f"bulk operation {bulk_id} not {status} after {timeout:.0f} s")


def creation_times(url: str, bulk_id: int) -> tuple[datetime, list[datetime]]:
    """The bulk operation's effective start and its children's creation times by position."""
    with psycopg.connect(url, autocommit=True) as conn:
        start = conn.execute(
            "SELECT start_date FROM bulkops_bulkoperation WHERE id = %s", (bulk_id,)
        ).fetchone()[0]
        rows = conn.execute(
            "SELECT o.creation_time FROM bulkops_bulkoperationtarget t"
            " JOIN devicecontrol_operation o ON o.bulk_operation_id = t.bulk_operation_id"
            " AND o.device_id = t.device_id"
            " WHERE t.bulk_operation_id = %s ORDER BY t.position",
            (bulk_id,),
        ).fetchall()
    return start, [row[0] for row in rows]


def curve(
    args: argparse.Namespace, url: str, client: Any, group: int, worker: Any, out: Report
) -> int:
    start = datetime.now(UTC) + timedelta(seconds=snapshot_lead(args.devices))
    config = {
        "exponentialRate": {
            "baseRatePerMinute": args.base,
            "incrementFactor": args.factor,
            "rateIncreaseCriteria": {"numberOfNotifiedDevices": args.every},
        },
        "maximumPerMinute": args.max,
    }
    out(f"\n## (a) curve: {args.devices:,} devices, rolloutConfig {orjson.dumps(config).decode()}")
    posted = time.perf_counter()
    bulk_id = post_bulk(
        client,
        {
            "groupId": str(group),
            "startDate": start.isoformat().replace("+00:00", "Z"),
            "creationRamp": 0,
            "operationPrototype": PROTOTYPE,
            "rolloutConfig": config,
        },
    )
    out(f"POST (targets snapshot) took {time.perf_counter() - posted:.1f} s")
    wait_status(url, bulk_id, worker, args.timeout, "COMPLETED")
    effective, created = creation_times(url, bulk_id)
    if len(created) != args.devices:
        out(f"FAIL: {len(created)} children for {args.devices} targets")
        return 1
    due = configured_offsets(args.devices, args.base, args.factor, args.every, args.max)
    actual = [(moment - effective).total_seconds() for moment in created]
    lateness = sorted(a - d for a, d in zip(actual, due, strict=True))
    curve_table(out, actual, due, args.interval)
    early = sum(1 for value in lateness if value < -0.001)  # creationTime keeps whole ms
    out(
        f"lateness (creationTime - due on the configured curve): max {lateness[-1]:.3f} s, "
        f"p99 {percentile(lateness, 0.99):.3f} s, p50 {percentile(lateness, 0.5):.3f} s, "
        f"early {early}; last child at {actual[-1]:.1f} s, due at {due[-1]:.1f} s"
    )
    capped = next((p for p in range(args.devices) if p // args.every and
                   min(args.base * args.factor ** (p // args.every), args.max) >= args.max), None)  # fmt: skip
    failures = 0
    if capped is not None and args.devices - capped > 100:
        span = actual[-1] - actual[capped]
        rate = (args.devices - 1 - capped) / span if span > 0 else float("inf")
        out(
            f"at the cap (positions {capped:,}+): {rate:,.0f} children/s (configured {args.max / 60:,.0f}/s)"
        )
        summary(
            out,
            "rollout rate at the cap",
            rate,
            "children/s",
            ceiling="configured maximumPerMinute / 60",
            ceiling_value=args.max / 60,
            goal=">= 0.95x the configured rate",
            met=rate >= 0.95 * args.max / 60,
        )
    summary(
        out,
        "rollout lateness max (exponential curve)",
        lateness[-1],
        "s",
        ceiling="ramp tick (BULK_RAMP_INTERVAL)",
        ceiling_value=RAMP_TICK,
        goal="<= one ramp tick, none early",
        met=lateness[-1] <= RAMP_TICK and early == 0,
    )
    summary(out, "rollout lateness p99 (exponential curve)", percentile(lateness, 0.99), "s")
    if early:
        failures += 1
    return failures


def pause_latency(
    args: argparse.Namespace, url: str, client: Any, group: int, worker: Any, out: Report
) -> int:
    out(f"\n## (b) pause: {args.pause_devices:,} devices at {args.pause_rate:g}/min, paused after "
        f"{args.pause_after:g} s")  # fmt: skip
    start = datetime.now(UTC) + timedelta(seconds=1)
    bulk_id = post_bulk(
        client,
        {
            "groupId": str(group),
            "startDate": start.isoformat().replace("+00:00", "Z"),
            "operationPrototype": PROTOTYPE,
            "rolloutConfig": {"maximumPerMinute": args.pause_rate},
        },
    )
    time.sleep(max((start - datetime.now(UTC)).total_seconds(), 0) + args.pause_after)
    t0 = time.perf_counter()
    response = client.post(f"/devicecontrol/bulkoperations/{bulk_id}/pause", HTTP_ACCEPT=MEDIA)
    took = time.perf_counter() - t0
    answered = datetime.now(UTC)
    if response.status_code != 200:
        out(f"FAIL: pause answered {response.status_code} {response.content[:200]!r}")
        return 1
    time.sleep(3 * RAMP_TICK + 60 / args.pause_rate)  # ticks and a due child or more go by
    _, created = creation_times(url, bulk_id)
    after = sum(1 for moment in created if moment > answered)
    gap = 60 / args.pause_rate
    out(
        f"pause request: {took * 1000:.1f} ms; children before it answered: "
        f"{len(created) - after:,}; after: {after} (ramp tick {RAMP_TICK} s, a child every "
        f"{gap * 1000:.1f} ms)"
    )
    summary(
        out,
        "pause: time until creation stops",
        took,
        "s",
        ceiling="ramp tick (BULK_RAMP_INTERVAL)",
        ceiling_value=RAMP_TICK,
        goal="within one ramp tick, no child after",
        met=took <= RAMP_TICK and after == 0,
    )
    summary(
        out,
        "pause: children created after it answered",
        after,
        "children",
        goal="0",
        met=after == 0,
    )
    return 1 if after else 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    url, admin_url = checked_database_url(args.database_url)
    redis_url = checked_redis_url(args.redis_url)
    out = Report()
    out("# bench/rollout.py")
    out(command_line("bench/rollout.py", argv))
    out(machine_line())
    out(f"database: {url} (dropped and re-created); redis: {redis_url} (flushed)")
    out(load_average_line())
    recreate_database(url, admin_url)
    flush_redis(redis_url)
    env = bench_env(
        url, drop=("BULK_RAMP_INTERVAL",), REDIS_URL=redis_url, CHANNELS_PREFIX="dp-bench-rollout"
    )
    migrate_and_create_user(env)
    t0 = time.perf_counter()
    groups = {"all": args.devices}
    if args.pause_devices:
        groups["pause"] = args.pause_devices
    group_ids = seed(url, args.devices, args.agents, groups)
    out(
        f"seeded {args.agents} agents, {args.devices:,} devices in {time.perf_counter() - t0:.1f} s"
    )
    setup_django(env)
    from django.test import Client

    client = Client(HTTP_AUTHORIZATION=basic_auth(), HTTP_HOST="127.0.0.1")
    log_dir = Path(tempfile.mkdtemp(prefix="dp-bench-rollout-"))
    out(f"process logs: {log_dir}")
    worker, beat = ramp_processes("rollout", env, log_dir)
    failures = 0
    try:
        failures += curve(args, url, client, group_ids["all"], worker, out)
        if args.pause_devices:
            failures += pause_latency(args, url, client, group_ids["pause"], worker, out)
    finally:
        beat.stop()
        worker.stop()
        flush_redis(redis_url)
    return 1 if failures else 0


if __name__ == "__main__":
    run_main(main)
