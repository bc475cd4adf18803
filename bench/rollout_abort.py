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
      abort it before the next one;
  (c) exponential rollout (issue 14 item 9): every device with "rolloutConfig": {"exponentialRate":
      {"baseRatePerMinute": --exp-base, "incrementFactor": --exp-factor, "rateIncreaseCriteria":
      {"numberOfNotifiedDevices": --exp-every}}, "maximumPerMinute": --exp-max} and the abort
      criterion of (a); the agent makes the first --exp-fault-after children SUCCESSFUL, then fails
      every one, so the threshold is crossed while the rate climbs or runs at its cap. Printed:
      children created per --curve-interval seconds beside the configured curve (bench/rollout.py's
      reference) up to the abort, each child's lateness on that curve, and what (a) prints;
  (d) cancel: creationRamp 0 over every device but one (a first wave; the second, of one
      device, waits for the first's gate), no agent: once the first wave is created (all
      PENDING), `DELETE ...?cancelPending=true` (sent from this process, with this process's
      BULK_PENDING_FAIL_INLINE_SECONDS: the request fails children that long, then hands the
      rest to the worker). Printed: the DELETE's answer time (204), when DELETED was first seen
      (10 ms polls from another connection) and when the last PENDING child was seen failed,
      each from the moment the DELETE was sent.

For each it prints when the threshold was crossed (the commit of the agent's status change that
made failed/finished reach it: between the start and the return of that call), the abort's moment
(abortReason.time), when creation stopped (the last child's creationTime), the latencies, the
children created after the crossing, the PENDING children the abort failed, and, for (a) and (c),
the creation-rate curve against the configured one. Ceiling: the ramp tick (BULK_RAMP_INTERVAL), the
goal: creation stops within one tick of the crossing.

Usage (see bench/README.md):  .venv/bin/python bench/rollout_abort.py [--devices 100000]
                              .venv/bin/python bench/rollout_abort.py --parts c
                              bench/all's size: --devices 5000 --exp-max 12000 --curve-interval 2
"""

from __future__ import annotations

import argparse
import os
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
    percentile,
    recreate_database,
    run_main,
    setup_django,
    summary,
)
from bulk import ramp_processes
from rollout import configured_offsets, curve_table, post_bulk, seed, snapshot_lead

DEFAULT_DATABASE_URL = "postgres://root@127.0.0.1:5432/dp_bench_abort"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/10"
PROTOTYPE = {"description": "Restart device", "c8y_Restart": {}}


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
    parser.add_argument("--exp-base", type=float, default=600, help="(c) baseRatePerMinute")
    parser.add_argument("--exp-factor", type=float, default=2.0, help="(c) incrementFactor")
    parser.add_argument(
        "--exp-every",
        type=int,
        default=0,
        help="(c) numberOfNotifiedDevices (0: --devices / 50, 2,000 at 100,000)",
    )
    parser.add_argument("--exp-max", type=float, default=60_000, help="(c) maximumPerMinute")
    parser.add_argument(
        "--exp-fault-after",
        type=int,
        default=0,
        help="(c) children the agent makes SUCCESSFUL before it fails every one (0: a tenth of "
        "--devices: at 100,000 the agent, slower than the cap, crosses at the cap)",
    )
    parser.add_argument(
        "--curve-interval", type=float, default=10.0, help="(c) seconds per row of the curve"
    )
    parser.add_argument("--parts", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
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
    args.exp_every = args.exp_every or max(args.devices // 50, 1)
    args.exp_fault_after = args.exp_fault_after or args.devices // 10
    if (
        args.slow_devices > args.devices
        or max(args.fault_after, args.exp_fault_after) >= args.devices
    ):
        parser.error("--slow-devices, --fault-after and --exp-fault-after must be below --devices")
    args.parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    if not args.parts or args.parts - {"a", "b", "c", "d"}:
        parser.error("--parts: a comma-separated subset of a,b,c,d")
    return args


def bulk_body(
    group_id: int, criterion: dict[str, Any], start: datetime | None = None, **extra: Any
) -> dict[str, Any]:
    """A bulk operation over the group with one abort criterion, starting now or at `start`."""
    return {
        "groupId": str(group_id),
        "startDate": (start or datetime.now(UTC)).isoformat().replace("+00:00", "Z"),
        "operationPrototype": PROTOTYPE,
        "abortConfig": {"criteria": [criterion]},
        **extra,
    }


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


def wait_drained(url: str, bulk_id: int, timeout: float) -> datetime:
    """When no PENDING child of the bulk operation was left (polled every 10 ms): the abort's
    batches, which follow its commit, are done."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            left = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM devicecontrol_operation WHERE bulk_operation_id = %s"
                " AND status = 'PENDING')",
                (bulk_id,),
            ).fetchone()[0]
            if not left:
                return datetime.now(UTC)
            time.sleep(0.01)
    raise SystemExit(f"bulk operation {bulk_id}: PENDING children left after {timeout:.0f} s")


@dataclass
class Outcome:
    crossing: Crossing
    aborted: datetime  # abortReason.time: the moment of the run that aborted
    seen: datetime  # the abort committed before this
    reason: dict[str, Any]
    creation: list[datetime]  # every child's creationTime, ascending
    start: datetime
    post_seconds: float  # the POST: validation, the targets' snapshot, commit
    drained: datetime  # no PENDING child was left before this

    @property
    def last(self) -> datetime:
        return self.creation[-1]

    def after(self, moment: datetime) -> int:
        return sum(1 for created in self.creation if created > moment)


def run(
    client: Any,
    url: str,
    worker: Process,
    body: dict[str, Any],
    succeed: int,
    timeout: float,
) -> Outcome:
    """POST `body`, finish its children with the fake agent (the first `succeed` SUCCESSFUL) until
    its abort criterion aborts it."""
    from bulkops.models import BulkOperation
    from devicecontrol.models import Operation

    (criterion,) = body["abortConfig"]["criteria"]
    posted = time.perf_counter()
    bulk_id = post_bulk(client, body)
    posted = time.perf_counter() - posted
    agent = FakeAgent(bulk_id, criterion, succeed)
    agent.start()
    try:
        seen = wait_ended(url, bulk_id, worker, agent, timeout)
    finally:
        agent.stop.set()
        agent.join(timeout=30)
    drained = wait_drained(url, bulk_id, timeout)
    bulk = BulkOperation.objects.get(pk=bulk_id)
    if agent.crossing is None or bulk.abort_reason is None:
        raise SystemExit(f"bulk operation {bulk_id} ended without a crossing: {bulk.abort_reason}")
    reason = bulk.abort_reason
    creation = sorted(
        Operation.objects.filter(bulk_operation_id=bulk_id).values_list("creation_time", flat=True)
    )
    aborted = datetime.fromisoformat(reason["time"].replace("Z", "+00:00"))
    # A rate's step restarts effectiveStart at the step's first child: a rollout's origin is its
    # startDate (set ahead of the POST's commit), a creationRamp's its effectiveStart.
    start = bulk.start_date if bulk.rollout_config else bulk.effective_start
    return Outcome(agent.crossing, aborted, seen, reason, creation, start, posted, drained)


def report_outcome(out: Report, name: str, outcome: Outcome, tick: float) -> float:
    """Print the crossing, the abort and when creation stopped; return that stop latency."""
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
        f" ms after the crossing commit (10 ms polls; the abort's stop transaction took at most "
        f"{(outcome.seen - outcome.aborted).total_seconds() * 1000:.0f}"
        f" ms); last child created at +{(outcome.last - s).total_seconds():.3f}"
        f" s ({stop_latency * 1000:.0f} ms after it); children created after the crossing: "
        f"{outcome.after(c.returned)} (after its call began: {outcome.after(c.started)}); "
        f"created in all: {len(outcome.creation):,}; PENDING children failed by the abort: "
        f"{outcome.reason['pendingFailed']:,}"
    )
    met = stop_latency <= tick
    pending = outcome.reason["pendingFailed"]
    took = (outcome.drained - outcome.aborted).total_seconds()
    out(
        f"every PENDING child failed (none left) +{(outcome.drained - s).total_seconds():.3f} s:"
        f" {(outcome.drained - c.returned).total_seconds() * 1000:.0f} ms after the crossing "
        f"commit, {(outcome.drained - outcome.seen).total_seconds() * 1000:.0f} ms after DELETED "
        "was visible"
    )
    out(
        f"ceiling: one ramp tick (BULK_RAMP_INTERVAL) = {tick * 1000:.0f} ms; goal creation stops "
        f"within one tick of the crossing: {'met' if met else 'NOT met'}; the abort's commit "
        f"(DELETED visible) {abort_latency / tick:.2f} ticks after it"
        + (
            f", {took / pending * 1000:.2f} ms per PENDING child failed (from the abort's moment)"
            if pending
            else ""
        )
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
    summary(
        out,
        f"{name} PENDING children all failed after crossing",
        (outcome.drained - c.returned).total_seconds(),
        "s",
    )
    summary(out, f"{name} children after crossing", outcome.after(c.returned), "children")
    return stop_latency


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
        f"the POST took {outcome.post_seconds:.2f} s; the schedule (effectiveStart) starts at "
        "its commit, once its targets are stored: the first slice shows no catch-up burst"
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


def exponential(
    args: argparse.Namespace, client: Any, url: str, worker: Process, group_id: int, out: Report
) -> int:
    """(c): the exponential rollout with abortConfig; how many children were created early on
    the configured curve (none should be)."""
    config = {
        "exponentialRate": {
            "baseRatePerMinute": args.exp_base,
            "incrementFactor": args.exp_factor,
            "rateIncreaseCriteria": {"numberOfNotifiedDevices": args.exp_every},
        },
        "maximumPerMinute": args.exp_max,
    }
    criterion = {
        "failureType": "FAILED",
        "thresholdPercentage": args.threshold,
        "minNumberOfExecuted": args.min_executed,
    }
    out(
        f"=== (c) exponential rollout over {args.devices:,} devices, rolloutConfig "
        f"{orjson.dumps(config).decode()}, abort {orjson.dumps(criterion).decode()}; the agent "
        f"fails every child after {args.exp_fault_after:,} ==="
    )
    lead = snapshot_lead(args.devices)
    start = datetime.now(UTC) + timedelta(seconds=lead)
    body = bulk_body(group_id, criterion, start, creationRamp=0, rolloutConfig=config)
    outcome = run(client, url, worker, body, args.exp_fault_after, args.timeout)
    out(f"the POST took {outcome.post_seconds:.2f} s (startDate {lead:.0f} s after it was sent)")
    # The ramp creates positions in order: the k-th child by creationTime holds position k.
    actual = [(created - outcome.start).total_seconds() for created in outcome.creation]
    due = configured_offsets(
        args.devices, args.exp_base, args.exp_factor, args.exp_every, args.exp_max
    )
    aborted_at = (outcome.aborted - outcome.start).total_seconds()
    crossed_at = (outcome.crossing.returned - outcome.start).total_seconds()
    out(
        f"children created per {args.curve_interval:g} s beside the configured curve, up to the "
        f"abort's moment (+{aborted_at:.1f} s):"
    )
    curve_table(out, actual, due, args.curve_interval, until=aborted_at)
    lateness = sorted(a - d for a, d in zip(actual, due, strict=False))
    early = sum(1 for late in lateness if late < -0.001)  # creationTime keeps whole ms
    level = (len(actual) - 1) // args.exp_every
    rate = min(args.exp_base * args.exp_factor**level, args.exp_max)
    recent = sum(1 for a in actual if crossed_at - args.curve_interval <= a < crossed_at)
    out(
        f"lateness on the configured curve: max {lateness[-1]:.3f} s, p99 "
        f"{percentile(lateness, 0.99):.3f} s, p50 {percentile(lateness, 0.5):.3f} s, early "
        f"{early}; at the crossing (+{crossed_at:.1f} s) the configured rate was {rate:,.0f}/min "
        f"({rate / 60:,.0f}/s), created in the {args.curve_interval:g} s before it: "
        f"{recent / args.curve_interval:,.0f}/s; the agent had finished "
        f"{outcome.crossing.finished:,} of {len(actual):,} children created by the abort"
    )
    summary(
        out,
        "exponential rollout lateness max",
        lateness[-1],
        "s",
        ceiling="ramp tick",
        ceiling_value=args.interval,
        goal="<= 1 tick, none early",
        met=lateness[-1] <= args.interval and early == 0,
    )
    report_outcome(out, "exponential rollout", outcome, args.interval)
    if len(actual) == args.devices and actual[-1] <= crossed_at:
        out(
            "NOTE: every child was created before the crossing (the agent fell behind the rate): "
            "this run says nothing about stopping creation; lower --exp-fault-after or --exp-max"
        )
    return early


def cancel_pending(
    args: argparse.Namespace, client: Any, url: str, worker: Process, group_id: int, out: Report
) -> None:
    """(d): DELETE ?cancelPending=true of a bulk operation whose children are all PENDING."""
    out(
        f"=== (d) creationRamp 0 over {args.devices:,} devices, no agent; once every child is "
        "PENDING: DELETE ?cancelPending=true ==="
    )
    # Two waves, the second of one device: the first is created at once and the gate then waits
    # for it (no agent), so the bulk operation is still IN_PROGRESS when it is cancelled.
    body = {
        "groupId": str(group_id),
        "startDate": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "creationRamp": 0,
        "operationPrototype": PROTOTYPE,
        "waves": [{"size": args.devices - 1}, {"percentage": 100}],
    }
    bulk_id = post_bulk(client, body)
    deadline = time.monotonic() + args.timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            state = conn.execute(
                "SELECT rollout_state FROM bulkops_bulkoperation WHERE id = %s", (bulk_id,)
            ).fetchone()[0]
            if state == "WAITING_FOR_WAVE":
                break
            if not worker.alive():
                raise SystemExit(f"worker died:\n{worker.log_tail(30)}")
            time.sleep(0.05)
    answered: list[float] = []
    from django.conf import settings

    def delete() -> None:
        from django.db import connection

        try:
            response = client.delete(f"/devicecontrol/bulkoperations/{bulk_id}?cancelPending=true")
            if response.status_code != 204:
                raise SystemExit(f"DELETE: {response.status_code} {response.content[:300]!r}")
            answered.append(time.perf_counter())
        finally:
            connection.close()

    with psycopg.connect(url, autocommit=True) as conn:
        pending = conn.execute(
            "SELECT count(*) FROM devicecontrol_operation WHERE bulk_operation_id = %s "
            "AND status = 'PENDING'",
            (bulk_id,),
        ).fetchone()[0]
        sent = time.perf_counter()
        thread = threading.Thread(target=delete, daemon=True)
        thread.start()
        deleted = None
        while deleted is None and time.perf_counter() - sent < args.timeout:
            status = conn.execute(
                "SELECT status FROM bulkops_bulkoperation WHERE id = %s", (bulk_id,)
            ).fetchone()[0]
            if status == "DELETED":
                deleted = time.perf_counter()
            else:
                time.sleep(0.01)
        drained = None
        while drained is None and time.perf_counter() - sent < args.timeout:
            left = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM devicecontrol_operation WHERE bulk_operation_id = %s"
                " AND status = 'PENDING')",
                (bulk_id,),
            ).fetchone()[0]
            if not left:
                drained = time.perf_counter()
            else:
                time.sleep(0.01)
        thread.join(timeout=args.timeout)
    if deleted is None or drained is None or not answered:
        raise SystemExit(f"bulk operation {bulk_id}: cancel not seen within {args.timeout:.0f} s")
    out(
        f"{pending:,} PENDING children; from the DELETE sent: DELETED visible after "
        f"{(deleted - sent) * 1000:.0f} ms, the answer (204) after {(answered[0] - sent) * 1000:.0f}"
        f" ms, no PENDING child left after {(drained - sent) * 1000:.0f} ms (10 ms polls); the"
        f" request fails them for up to BULK_PENDING_FAIL_INLINE_SECONDS ="
        f" {settings.BULK_PENDING_FAIL_INLINE_SECONDS:g} s, then hands the rest to the worker"
    )
    summary(
        out,
        "cancelPending DELETED visible after DELETE",
        deleted - sent,
        "s",
        ceiling="ramp tick",
        ceiling_value=args.interval,
    )
    summary(
        out,
        "cancelPending answer (204) after DELETE",
        answered[0] - sent,
        "s",
        ceiling="BULK_PENDING_FAIL_INLINE_SECONDS",
        ceiling_value=settings.BULK_PENDING_FAIL_INLINE_SECONDS,
    )
    summary(out, "cancelPending all PENDING failed after DELETE", drained - sent, "s")


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
    groups = seed(url, args.devices, args.agents, {"all": args.devices, "slow": args.slow_devices})
    out(
        f"seeded {args.agents} agents, {args.devices:,} devices in {time.perf_counter() - t0:.1f} s"
    )
    setup_django(env)
    from django.test import Client

    client = Client(HTTP_AUTHORIZATION=basic_auth(), HTTP_HOST="127.0.0.1")
    log_dir = Path(tempfile.mkdtemp(prefix="dp-bench-abort-"))
    out(f"process logs: {log_dir}")
    worker, beat = ramp_processes("abort", env, log_dir)
    fast = {
        "failureType": "FAILED",
        "thresholdPercentage": args.threshold,
        "minNumberOfExecuted": args.min_executed,
    }
    early = 0
    try:
        if "a" in args.parts:
            out()
            out(
                f"=== (a) creationRamp {args.ramp:g} s over {args.devices:,} devices, abort "
                f"{orjson.dumps(fast).decode()}; the agent fails every child after "
                f"{args.fault_after:,} ==="
            )
            body = bulk_body(groups["all"], fast, creationRamp=args.ramp)
            a = run(client, url, worker, body, args.fault_after, args.timeout)
            rate_curve(out, a, args.ramp, args.bins)
            report_outcome(out, "fast ramp", a, args.interval)

        if "b" in args.parts:
            out()
            slow = {"failureType": "ANY", "thresholdPercentage": 50, "minNumberOfExecuted": 3}
            out(
                f"=== (b) creationRamp {args.slow_ramp:g} s over {args.slow_devices} devices, "
                f"abort {orjson.dumps(slow).decode()}; the agent fails every child ==="
            )
            body = bulk_body(groups["slow"], slow, creationRamp=args.slow_ramp)
            b = run(client, url, worker, body, 0, args.timeout)
            report_outcome(out, "slow ramp", b, args.interval)
            due = b.start + timedelta(seconds=args.slow_ramp * len(b.creation))
            out(
                f"the next child was due at +{(due - b.start).total_seconds():.3f} s: the abort "
                f"came {(due - b.aborted).total_seconds():.3f} s before it (beat's run, not the "
                "ramp)"
            )

        if "c" in args.parts:
            out()
            early = exponential(args, client, url, worker, groups["all"], out)

        if "d" in args.parts:
            out()
            cancel_pending(args, client, url, worker, groups["all"], out)
    finally:
        beat.stop()
        worker.stop()
        flush_redis(redis_url)
    if early:
        out(f"FAIL: {early} children created before their due time on the configured curve")
    return 1 if early else 0


if __name__ == "__main__":
    run_main(main)
