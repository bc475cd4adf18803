"""Abort thresholds (issue 14 item 1): how soon a crossed threshold stops a ramp.

Creates a dedicated PostgreSQL database and uses a dedicated Redis DB index, seeds agents and
--devices devices in one group with multi-row INSERTs, then runs a real Celery worker (`--pool
solo`, bookings on) and a real `celery beat` (BULK_RAMP_INTERVAL, default 0.5 s), as production
does. A fake agent in this process (a thread, through devicecontrol's `operation_update` service,
so every status change takes the real path: row lock, progress delta, commit) finishes children as
they appear:

  (a) fast ramp: a bulk operation over every device with creationRamp --ramp and
      abortConfig FAILED --threshold % after --min-executed; the agent makes the first
      --fault-after children SUCCESSFUL and fails every later one, so the failed share climbs
      until it crosses the threshold while the ramp is creating children;
  (b) slow ramp: creationRamp --slow-ramp over --slow-devices devices, ANY 50 % after 3, every
      child failed: the threshold is crossed between two due children, and only beat's run can
      abort it before the next one.

For each it prints when the threshold was crossed (the commit of the agent's status change that
made failed/finished reach it: between the start and the return of that call), the abort's moment
(abortReason.time), when creation stopped (the last child's creationTime), the latencies, the
children created after the crossing, the PENDING children the abort failed, and, for (a), the
creation-rate curve against the configured one. Ceiling: the ramp tick (BULK_RAMP_INTERVAL), the
goal: creation stops within one tick of the crossing.

Usage (see bench/README.md):  .venv/bin/python bench/rollout_abort.py [--devices 100000]
                              .venv/bin/python bench/rollout_abort.py --devices 5000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
from _common import (
    Process,
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
    recreate_database,
    run_main,
    setup_django,
    summary,
)

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/dp_bench_abort"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/10"
PROTOTYPE = {"description": "Restart device", "c8y_Restart": {}}
MO_COLUMNS = (
    "type, name, owner, creation_time, last_updated, fragments, is_device, is_agent, is_group"
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=100_000, help="(a) targets")
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--ramp", type=float, default=0.002, help="(a) creationRamp, seconds")
    parser.add_argument("--threshold", type=float, default=10, help="(a) thresholdPercentage")
    parser.add_argument("--min-executed", type=int, default=100, help="(a) minNumberOfExecuted")
    parser.add_argument(
        "--fault-after",
        type=int,
        default=0,
        help="(a) children the agent makes SUCCESSFUL before it fails every one "
        "(0: a tenth of --devices, at most 2000)",
    )
    parser.add_argument("--slow-ramp", type=float, default=2.0, help="(b) creationRamp, seconds")
    parser.add_argument("--slow-devices", type=int, default=20, help="(b) targets")
    parser.add_argument("--interval", type=float, default=0.5, help="BULK_RAMP_INTERVAL (beat)")
    parser.add_argument("--bins", type=int, default=12, help="(a) rows of the rate curve")
    parser.add_argument("--timeout", type=float, default=900.0, help="per bulk operation, seconds")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_ABORT_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="PostgreSQL on loopback; DROPPED and re-created (its name must contain 'bench')",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_ABORT_REDIS_URL", DEFAULT_REDIS_URL),
        help="Redis on loopback with a dedicated DB index (FLUSHED at start and end)",
    )
    args = parser.parse_args(argv)
    if not args.fault_after:
        args.fault_after = min(args.devices // 10, 2000)
    if args.slow_devices > args.devices or args.fault_after >= args.devices:
        parser.error("--slow-devices and --fault-after must be below --devices")
    return args


def seed(url: str, devices: int, agents: int, slow: int) -> dict[str, int]:
    """Agents, devices (device i under agent i % agents), a group of all devices and one of the
    first `slow`."""
    with psycopg.connect(url) as conn:
        agent_ids = [
            row[0]
            for row in conn.execute(
                f"INSERT INTO inventory_managedobject ({MO_COLUMNS}) SELECT 'c8y_BenchAgent',"
                " 'agent-' || g, 'bench', now(), now(), %s::jsonb, true, true, false"
                " FROM generate_series(0, %s) g RETURNING id",
                (
                    orjson.dumps({"com_cumulocity_model_Agent": {}, "c8y_IsDevice": {}}).decode(),
                    agents - 1,
                ),
            ).fetchall()
        ]
        device_ids = [
            row[0]
            for row in conn.execute(
                f"INSERT INTO inventory_managedobject ({MO_COLUMNS}) SELECT 'c8y_BenchDevice',"
                " 'device-' || g, 'bench', now(), now(), '{\"c8y_IsDevice\": {}}', true, false,"
                " false FROM generate_series(0, %s) g RETURNING id",
                (devices - 1,),
            ).fetchall()
        ]
        agent_ids.sort()
        device_ids.sort()
        groups = {}
        for name in ("all", "slow"):
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
            lines = []
            for i, device in enumerate(device_ids):
                lines.append(f"{agent_ids[i % len(agent_ids)]}\t{device}\tdevice\n")
                lines.append(f"{groups['all']}\t{device}\tasset\n")
                if i < slow:
                    lines.append(f"{groups['slow']}\t{device}\tasset\n")
            copy.write("".join(lines))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
    return groups


def wait_for(log: Path, marker: str, process: Process, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not process.alive():
            raise SystemExit(f"{process.name} exited:\n{process.log_tail(30)}")
        if marker in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise SystemExit(f"{process.name} not ready after {seconds:.0f} s:\n{process.log_tail(30)}")


def ramp_processes(env: dict[str, str], log_dir: Path) -> tuple[Process, Process]:
    """A Celery worker (--pool solo) and beat, both ready."""
    worker_log, beat_log = log_dir / "worker.log", log_dir / "beat.log"
    worker = Process(
        [sys.executable, "-m", "celery", "-A", "deviceplatform", "worker", "--pool", "solo",
         "--loglevel", "info", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        {**env, "LOG_LEVEL": "INFO"}, worker_log, name="worker",
    )  # fmt: skip
    beat = Process(
        [sys.executable, "-m", "celery", "-A", "deviceplatform", "beat", "--loglevel", "info",
         "--schedule", str(log_dir / "beat.schedule")],
        {**env, "LOG_LEVEL": "DEBUG"}, beat_log, name="beat",
    )  # fmt: skip
    wait_for(worker_log, "ready", worker)
    wait_for(beat_log, "Sending due task", beat)
    return worker, beat


# --- the fake agent -------------------------------------------------------------------------------


class MovedOn(Exception):
    """The child was no longer PENDING once locked (the abort failed it first)."""


@dataclass
class Crossing:
    started: datetime  # the crossing status change's call began ...
    returned: datetime  # ... and returned: its commit lies in between
    finished: int
    failed: int


class FakeAgent(threading.Thread):
    """Finishes the bulk operation's PENDING children in ID order, one `operation_update` each
    (notify=False: no realtime event, the agent's own cost only): the first `succeed` SUCCESSFUL,
    every later one FAILED. Notes the status change that made `criterion` fire on its tally
    (the same rule as bulkops.abort, and the agent is the only one finishing children)."""

    def __init__(self, bulk_id: int, criterion: dict[str, Any], succeed: int) -> None:
        super().__init__(name="fake-agent", daemon=True)
        self.bulk_id = bulk_id
        self.criterion = criterion
        self.succeed = succeed
        self.finished = 0
        self.failed = 0
        self.crossing: Crossing | None = None
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        from django.db import connection
        from django.utils import timezone

        from bulkops.abort import AbortCounts, criterion_fires
        from devicecontrol.models import Operation, OperationStatus
        from devicecontrol.services import operation_update

        def still_pending(operation: Operation) -> None:
            if operation.status != OperationStatus.PENDING:
                raise MovedOn

        pending = Operation.objects.filter(
            bulk_operation_id=self.bulk_id, status=OperationStatus.PENDING
        ).order_by("pk")
        try:
            while not self.stop.is_set():
                batch = list(pending.values_list("pk", flat=True)[:200])
                if not batch:
                    time.sleep(0.005)
                    continue
                for pk in batch:
                    status = "SUCCESSFUL" if self.finished < self.succeed else "FAILED"
                    started = timezone.now()
                    try:
                        operation_update(
                            operation_id=pk,
                            data={"status": status},
                            notify=False,
                            precondition=still_pending,
                        )
                    except MovedOn:
                        continue
                    returned = timezone.now()
                    self.finished += 1
                    self.failed += status == "FAILED"
                    if self.crossing is None and criterion_fires(
                        self.criterion, AbortCounts(self.finished, self.failed, 0)
                    ):
                        self.crossing = Crossing(started, returned, self.finished, self.failed)
                    if self.stop.is_set():
                        break
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            connection.close()


# --- one run ------------------------------------------------------------------------------------


def post_bulk(client: Any, group_id: int, ramp: float, criterion: dict[str, Any]) -> int:
    body = {
        "groupId": str(group_id),
        "startDate": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "creationRamp": ramp,
        "operationPrototype": PROTOTYPE,
        "abortConfig": {"criteria": [criterion]},
    }
    response = client.post(
        "/devicecontrol/bulkoperations",
        data=orjson.dumps(body),
        content_type="application/json",
        HTTP_ACCEPT="application/vnd.com.nsn.cumulocity.bulkoperation+json",
    )
    if response.status_code != 201:
        raise SystemExit(f"POST failed: {response.status_code} {response.content[:300]!r}")
    return int(orjson.loads(response.content)["id"])


def wait_ended(
    url: str, bulk_id: int, worker: Process, agent: FakeAgent, timeout: float
) -> datetime:
    """When the bulk operation was first seen DELETED (polled every 10 ms): just after the
    abort's commit."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            status = conn.execute(
                "SELECT status FROM bulkops_bulkoperation WHERE id = %s", (bulk_id,)
            ).fetchone()[0]
            if status == "DELETED":
                return datetime.now(UTC)
            if agent.error is not None:
                raise SystemExit(f"the fake agent failed: {agent.error!r}")
            if not worker.alive():
                raise SystemExit(f"worker died:\n{worker.log_tail(30)}")
            time.sleep(0.01)
    raise SystemExit(f"bulk operation {bulk_id} not aborted after {timeout:.0f} s")


@dataclass
class Outcome:
    crossing: Crossing
    aborted: datetime  # abortReason.time: the moment of the run that aborted
    seen: datetime  # the abort committed before this
    reason: dict[str, Any]
    creation: list[datetime]  # every child's creationTime, ascending
    start: datetime
    post_seconds: float  # the POST: validation, the targets' snapshot, commit

    @property
    def last(self) -> datetime:
        return self.creation[-1]

    def after(self, moment: datetime) -> int:
        return sum(1 for created in self.creation if created > moment)


def run(
    client: Any,
    url: str,
    worker: Process,
    group_id: int,
    ramp: float,
    criterion: dict[str, Any],
    succeed: int,
    timeout: float,
) -> Outcome:
    from bulkops.models import BulkOperation
    from devicecontrol.models import Operation

    posted = time.perf_counter()
    bulk_id = post_bulk(client, group_id, ramp, criterion)
    posted = time.perf_counter() - posted
    agent = FakeAgent(bulk_id, criterion, succeed)
    agent.start()
    try:
        seen = wait_ended(url, bulk_id, worker, agent, timeout)
    finally:
        agent.stop.set()
        agent.join(timeout=30)
    bulk = BulkOperation.objects.get(pk=bulk_id)
    if agent.crossing is None or bulk.abort_reason is None:
        raise SystemExit(f"bulk operation {bulk_id} ended without a crossing: {bulk.abort_reason}")
    reason = bulk.abort_reason
    creation = sorted(
        Operation.objects.filter(bulk_operation_id=bulk_id).values_list("creation_time", flat=True)
    )
    aborted = datetime.fromisoformat(reason["time"].replace("Z", "+00:00"))
    return Outcome(agent.crossing, aborted, seen, reason, creation, bulk.effective_start, posted)


def report_outcome(out: Report, name: str, outcome: Outcome, tick: float) -> None:
    c = outcome.crossing
    s = outcome.start
    window = (c.returned - c.started).total_seconds()
    out(
        f"threshold crossed: +{(c.returned - s).total_seconds():.3f} s after the start "
        f"(the status change ran {window * 1000:.1f} ms; {c.failed} of {c.finished} finished "
        f"failed); abortReason: {outcome.reason['failed']} of {outcome.reason['finished']} "
        f"({outcome.reason['percentage']} %)"
    )
    abort_latency = (outcome.seen - c.returned).total_seconds()
    stop_latency = max((outcome.last - c.returned).total_seconds(), 0.0)
    out(
        f"abort: its run's moment (abortReason.time) +{(outcome.aborted - s).total_seconds():.3f}"
        f" s, seen committed +{(outcome.seen - s).total_seconds():.3f} s: {abort_latency * 1000:.0f}"
        f" ms after the crossing commit (10 ms polls; the abort's transaction, PENDING children "
        f"failed included, took at most {(outcome.seen - outcome.aborted).total_seconds() * 1000:.0f}"
        f" ms); last child created at +{(outcome.last - s).total_seconds():.3f}"
        f" s ({stop_latency * 1000:.0f} ms after it); children created after the crossing: "
        f"{outcome.after(c.returned)} (after its call began: {outcome.after(c.started)}); "
        f"created in all: {len(outcome.creation):,}; PENDING children failed by the abort: "
        f"{outcome.reason['pendingFailed']:,}"
    )
    met = stop_latency <= tick
    pending = outcome.reason["pendingFailed"]
    took = (outcome.seen - outcome.aborted).total_seconds()
    out(
        f"ceiling: one ramp tick (BULK_RAMP_INTERVAL) = {tick * 1000:.0f} ms; goal creation stops "
        f"within one tick of the crossing: {'met' if met else 'NOT met'}; the abort's commit "
        f"(DELETED visible) {abort_latency / tick:.2f} ticks after it"
        + (f", {took / pending * 1000:.2f} ms per PENDING child failed" if pending else "")
    )
    summary(
        out,
        f"{name} creation stop after crossing",
        stop_latency,
        "s",
        ceiling="ramp tick",
        ceiling_value=tick,
        goal="<= 1 tick",
        met=stop_latency <= tick,
    )
    summary(
        out,
        f"{name} abort committed after crossing",
        abort_latency,
        "s",
        ceiling="ramp tick",
        ceiling_value=tick,
    )
    summary(out, f"{name} children after crossing", outcome.after(c.returned), "children")


def rate_curve(out: Report, outcome: Outcome, ramp: float, bins: int) -> None:
    """Children created per second in `bins` equal slices from the start to the abort, beside
    the configured rate (1 / creationRamp)."""
    span = max((outcome.aborted - outcome.start).total_seconds(), 1e-3)
    width = span / bins
    counts = [0] * bins
    for created in outcome.creation:
        index = min(int((created - outcome.start).total_seconds() / width), bins - 1)
        counts[max(index, 0)] += 1
    configured = 1 / ramp if ramp else float("inf")
    out(
        f"the POST took {outcome.post_seconds:.2f} s; the schedule (effectiveStart) starts once it "
        "has read its targets, before it stores them and commits: the ramp first catches up"
    )
    out(f"rate curve (children/s per {width:.2f} s slice; configured {configured:,.1f}/s):")
    out("  from (s)   created/s   configured/s   ratio")
    for k, count in enumerate(counts):
        rate = count / width
        out(f"  {k * width:8.2f}   {rate:9.1f}   {configured:12.1f}   {rate / configured:5.2f}")
    whole = len(outcome.creation) / span
    out(f"  overall    {whole:9.1f}   {configured:12.1f}   {whole / configured:5.2f}")
    summary(
        out,
        "fast ramp creation rate",
        whole,
        "children/s",
        ceiling="configured rate",
        ceiling_value=configured,
    )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    url, admin_url = checked_database_url(args.database_url)
    redis_url = checked_redis_url(args.redis_url)
    out = Report()
    out("# bench/rollout_abort.py")
    out(command_line("bench/rollout_abort.py", argv))
    out(machine_line())
    out(f"database: {url} (dropped and re-created); redis: {redis_url} (flushed)")
    out(load_average_line())
    recreate_database(url, admin_url)
    flush_redis(redis_url)
    env = bench_env(
        url,
        REDIS_URL=redis_url,
        BULK_RAMP_INTERVAL=str(args.interval),
        BULK_RAMP_BOOKING="1",
        CHANNELS_PREFIX="dp-bench-abort",
        REALTIME_PREFIX="dp-bench-abort:rt",
    )
    migrate_and_create_user(env)
    t0 = time.perf_counter()
    groups = seed(url, args.devices, args.agents, args.slow_devices)
    out(
        f"seeded {args.agents} agents, {args.devices:,} devices in {time.perf_counter() - t0:.1f} s"
    )
    setup_django(env)
    from django.test import Client

    client = Client(HTTP_AUTHORIZATION=basic_auth(), HTTP_HOST="127.0.0.1")
    log_dir = Path(tempfile.mkdtemp(prefix="dp-bench-abort-"))
    out(f"process logs: {log_dir}")
    worker, beat = ramp_processes(env, log_dir)
    try:
        out()
        fast = {
            "failureType": "FAILED",
            "thresholdPercentage": args.threshold,
            "minNumberOfExecuted": args.min_executed,
        }
        out(
            f"=== (a) creationRamp {args.ramp:g} s over {args.devices:,} devices, abort "
            f"{orjson.dumps(fast).decode()}; the agent fails every child after "
            f"{args.fault_after:,} ==="
        )
        a = run(client, url, worker, groups["all"], args.ramp, fast, args.fault_after,
                args.timeout)  # fmt: skip
        rate_curve(out, a, args.ramp, args.bins)
        report_outcome(out, "fast ramp", a, args.interval)

        out()
        slow = {"failureType": "ANY", "thresholdPercentage": 50, "minNumberOfExecuted": 3}
        out(
            f"=== (b) creationRamp {args.slow_ramp:g} s over {args.slow_devices} devices, abort "
            f"{orjson.dumps(slow).decode()}; the agent fails every child ==="
        )
        b = run(client, url, worker, groups["slow"], args.slow_ramp, slow, 0, args.timeout)
        report_outcome(out, "slow ramp", b, args.interval)
        due = b.start + timedelta(seconds=args.slow_ramp * len(b.creation))
        out(
            f"the next child was due at +{(due - b.start).total_seconds():.3f} s: the abort came "
            f"{(due - b.aborted).total_seconds():.3f} s before it (beat's run, not the ramp)"
        )
    finally:
        beat.stop()
        worker.stop()
        flush_redis(redis_url)
    return 0


if __name__ == "__main__":
    run_main(main)
