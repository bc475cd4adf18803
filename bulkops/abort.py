"""Abort thresholds of a bulk operation ("abortConfig", README "Abort thresholds"): validation,
the one count of finished and failed children, the evaluation, and the abort itself.

A criterion fires once at least `minNumberOfExecuted` children have finished (SUCCESSFUL or
FAILED, each device counted by its latest attempt) and the failed ones, of its `failureType`,
reach `thresholdPercentage` of them. Then, in one transaction under the bulk operation's row
lock, the bulk operation ends DELETED (generalStatus CANCELED) with `abortReason`, and every
PENDING child fails with "Rollout aborted: ...".

When it is evaluated (only for bulk operations with an `abort_config`; the others pay nothing):
- by the ramp, under the row lock it holds anyway, before each batch of children
  (`bulk_operation_abort_check`): no batch is created once the threshold is crossed;
- by the beat task, after it folds the progress deltas (`bulk_operations_abort_sweep`, every
  BULK_RAMP_INTERVAL), for bulk operations that are not due and for COMPLETED ones whose children
  are still running: they stop within one tick, and their PENDING children are then failed by a
  task of their own (`bulk_pending_fail_after_stop`).
Both first compare the progress counters (exact and cheap: the folded columns plus the unfolded
deltas), an upper bound of the failures any criterion counts, and count the children only when
that bound could fire."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Exists, Max, OuterRef, Q
from django.utils import timezone

from bulkops.live import bulk_changed
from bulkops.models import RUNNING_STATUSES, BulkOperation, BulkProgressDelta, BulkStatus
from bulkops.selectors import CURRENT, bulk_operation_progress, bulk_operations_with_progress
from devicecontrol.models import Operation, OperationStatus
from devicecontrol.services import (
    CANCEL_REQUESTED,
    CANCELLED_REASON,
    EXPIRED_REASON,
    TIMED_OUT_REASON,
    operations_fail,
    operations_retries_drop,
)
from deviceplatform.api.dates import format_datetime, parse_datetime
from deviceplatform.api.exceptions import ValidationFailed

logger = logging.getLogger(__name__)

INVALID = "devicecontrol/Invalid Data"
FAILURE_TYPES = ("FAILED", "TIMED_OUT", "ANY")
CRITERION_KEYS = frozenset({"failureType", "thresholdPercentage", "minNumberOfExecuted"})
DEFAULT_MIN_EXECUTED = 1
MAX_CRITERIA = 10
MAX_MIN_EXECUTED = 10**9
ABORTED_PREFIX = "Rollout aborted: "
# What the expiry and execution-timeout sweepers write (devicecontrol `_fail_due`): the text
# before the first placeholder of their reasons. An agent can only fail an operation with one
# of these by copying the sweepers' words.
TIMEOUT_PREFIXES = tuple(reason.split("{", 1)[0] for reason in (EXPIRED_REASON, TIMED_OUT_REASON))
# Abortable: running, or COMPLETED (every child created) with children still PENDING/EXECUTING.
WATCHED_STATUSES = (*RUNNING_STATUSES, BulkStatus.COMPLETED)


# --- validation --------------------------------------------------------------------------------


def _invalid(message: str) -> ValidationFailed:
    return ValidationFailed(message, error=INVALID)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _criterion(value: Any, index: int) -> dict[str, Any]:
    where = f"abortConfig.criteria[{index}]"
    if not isinstance(value, dict):
        raise _invalid(f"{where} must be a JSON object")
    unknown = sorted(set(value) - CRITERION_KEYS)
    if unknown:
        raise _invalid(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: "
            + ", ".join(sorted(CRITERION_KEYS))
        )
    failure_type = value.get("failureType")
    if failure_type not in FAILURE_TYPES:
        raise _invalid(
            f"{where}.failureType must be one of {', '.join(FAILURE_TYPES)}, not {failure_type!r}"
        )
    threshold = value.get("thresholdPercentage")
    if not _number(threshold) or not math.isfinite(threshold) or not 0 < threshold <= 100:
        raise _invalid(
            f"{where}.thresholdPercentage must be a number above 0 and at most 100, "
            f"not {threshold!r}"
        )
    minimum = value.get("minNumberOfExecuted", DEFAULT_MIN_EXECUTED)
    if (
        not isinstance(minimum, int)
        or isinstance(minimum, bool)
        or not 1 <= minimum <= MAX_MIN_EXECUTED
    ):
        raise _invalid(
            f"{where}.minNumberOfExecuted must be a whole number from 1 to {MAX_MIN_EXECUTED}, "
            f"not {minimum!r}"
        )
    return {
        "failureType": failure_type,
        "thresholdPercentage": int(threshold) if float(threshold).is_integer() else threshold,
        "minNumberOfExecuted": minimum,
    }


def abort_config_validate(value: Any) -> dict[str, Any] | None:
    """The stored form of an "abortConfig" value (None: no thresholds); 422 for a bad one."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid("abortConfig must be a JSON object with a criteria list")
    unknown = sorted(set(value) - {"criteria"})
    if unknown:
        raise _invalid(f"abortConfig: unknown key(s) {', '.join(unknown)}; allowed: criteria")
    criteria = value.get("criteria")
    if not isinstance(criteria, list) or not criteria:
        raise _invalid("abortConfig.criteria must be a non-empty list")
    if len(criteria) > MAX_CRITERIA:
        raise _invalid(f"abortConfig.criteria may hold at most {MAX_CRITERIA} criteria")
    return {"criteria": [_criterion(item, index) for index, item in enumerate(criteria)]}


def abort_config_input(data: dict[str, Any]) -> dict[str, Any] | None:
    """The validated "abortConfig" of a create or PUT body (None when absent or null)."""
    return abort_config_validate(data.get("abortConfig"))


# --- the count ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AbortCounts:
    """The children that count for abort criteria, each device by its latest attempt: `finished`
    (SUCCESSFUL or FAILED), `failed` (FAILED, any cause) and, of those, `timed_out` (failed by
    the expiry or execution-timeout sweeper)."""

    finished: int
    failed: int
    timed_out: int

    def failures(self, failure_type: str) -> int:
        if failure_type == "TIMED_OUT":
            return self.timed_out
        if failure_type == "FAILED":
            return self.failed - self.timed_out
        return self.failed


def cancelled_q() -> Q:
    """Failures an operator caused (README "Cancel that reaches the device"): a PENDING child
    cancelled ("Cancelled by <user>") or one whose cancel was requested while EXECUTING. They say
    nothing about the rollout's health, so abort criteria leave them out (of finished too), and so
    do wave gates (bulkops.rollout `wave_count`). Combine it with FAILED: an EXECUTING child with
    a cancel request is still running."""
    return Q(failure_reason__startswith=CANCELLED_REASON.split("{", 1)[0]) | Q(
        fragments__has_key=CANCEL_REQUESTED
    )


def _timed_out_q() -> Q:
    q = Q()
    for prefix in TIMEOUT_PREFIXES:
        q |= Q(failure_reason__startswith=prefix)
    return q


def abort_counts(*, bulk_operation_id: int) -> AbortCounts:
    """THE count abort criteria use (one statement over the bulk operation's latest attempts).

    Keep `bulk_progress_bound` an upper bound of it: a failure not counted here must either stay
    out of `finished` too or not be counted in `failed` (the bound then still holds, since
    (f - r) / (n - r) <= f / n). A FAILED attempt with a booked automatic retry (`retry_at`) is
    not finished yet: its device fails for good only once its retries are spent, so it is left out
    of both counts. So is a child an operator cancelled (`cancelled_q`)."""
    final = [OperationStatus.SUCCESSFUL, OperationStatus.FAILED]
    failed = Q(status=OperationStatus.FAILED)
    row = (
        Operation.objects.filter(
            bulk_operation_id=bulk_operation_id,
            superseded=False,
            status__in=final,
            retry_at__isnull=True,
        )
        .exclude(failed & cancelled_q())
        .aggregate(
            finished=Count("pk"),
            failed=Count("pk", filter=failed),
            timed_out=Count("pk", filter=failed & _timed_out_q()),
        )
    )
    return AbortCounts(finished=row["finished"], failed=row["failed"], timed_out=row["timed_out"])


def bulk_progress_bound(counts: dict[str, int]) -> AbortCounts:
    """The progress counters (`bulk_operation_progress`) as an upper bound of `abort_counts`."""
    return AbortCounts(
        finished=counts["successful"] + counts["failed"], failed=counts["failed"], timed_out=0
    )


def criterion_fires(criterion: dict[str, Any], counts: AbortCounts) -> bool:
    failures = counts.failures(criterion["failureType"])
    return (
        counts.finished >= criterion["minNumberOfExecuted"]
        and counts.finished > 0
        and failures * 100 >= criterion["thresholdPercentage"] * counts.finished
    )


def _could_fire(config: dict[str, Any], bound: AbortCounts) -> bool:
    """Whether any criterion could fire given the counters: every failure type counts at most
    all failures."""
    return any(
        criterion_fires({**criterion, "failureType": "ANY"}, bound)
        for criterion in config["criteria"]
    )


def fired_criterion(config: dict[str, Any], counts: AbortCounts) -> dict[str, Any] | None:
    """The first criterion (in the given order) that fires on `counts`, None if none does."""
    return next((c for c in config["criteria"] if criterion_fires(c, counts)), None)


# --- the abort ---------------------------------------------------------------------------------


def criterion_summary(criterion: dict[str, Any]) -> str:
    return (
        f"{criterion['failureType']} failures reached {criterion['thresholdPercentage']}% "
        f"(minNumberOfExecuted {criterion['minNumberOfExecuted']})"
    )


def _percentage(failures: int, finished: int) -> float:
    return round(failures * 100 / finished, 2) if finished else 0.0


def _abort(
    bulk: BulkOperation, criterion: dict[str, Any], counts: AbortCounts, now: datetime
) -> None:
    """The stop (row-locked by the caller's transaction, kept short): no further child, booked
    retries dropped, DELETED with `abort_reason`, and `pending_fail` marked. The PENDING children
    are failed after the commit, in batches of their own (`bulk_pending_fail_after_stop`, which
    the caller runs once its transaction is over: `bulk_operation_abort_check` returned True)."""
    failures = counts.failures(criterion["failureType"])
    percentage = _percentage(failures, counts.finished)
    summary = criterion_summary(criterion)
    message = f"{ABORTED_PREFIX}{summary}: {failures} of {counts.finished} finished failed"
    # No further attempts either: booked automatic retries of its children go, as on a cancel.
    # This waits for a child the retry sweep holds; a retry it just created is then PENDING for
    # the batches that follow the commit.
    operations_retries_drop(queryset=Operation.objects.filter(bulk_operation_id=bulk.pk))
    bulk.status = BulkStatus.DELETED
    bulk.next_due_at = None
    bulk.last_updated = now
    bulk.abort_reason = {
        "criterion": dict(criterion),
        "failed": failures,
        "finished": counts.finished,
        "percentage": int(percentage) if percentage.is_integer() else percentage,
        "pendingFailed": 0,  # counted up by each batch of `bulk_pending_fail`
        "createdChildren": bulk.next_index - bulk.dropped,
        "time": format_datetime(now),
        "message": message,
    }
    pending_fail_mark(bulk, reason=f"{ABORTED_PREFIX}{summary}", notify=True, now=now)
    bulk.save(
        update_fields=["status", "next_due_at", "last_updated", "abort_reason", "pending_fail"]
    )
    bulk_changed(bulk.pk)
    transaction.on_commit(lambda: logger.warning("Bulk operation %s aborted: %s", bulk.pk, message))


# --- failing the PENDING children of a stopped bulk operation -------------------------------------

# How long a `pending_fail` lease lasts without a batch renewing it: a process that died between
# batches leaves it to beat's sweep (`bulk_pending_fail_sweep`) this long after its last batch.
PENDING_FAIL_LEASE = timedelta(seconds=30)


def pending_fail_mark(bulk: BulkOperation, *, reason: str, notify: bool, now: datetime) -> None:
    """Mark `bulk` (row-locked, saved by the caller with "pending_fail") as having PENDING
    children to fail with `reason`, leased to the caller from `now`: it runs
    `bulk_pending_fail_after_stop` once its transaction is over.

    Only the children that exist now are the stop's (`upTo`, the highest child ID at the stop;
    call this after the booked retries were dropped, which waits for a retry the sweep is
    creating): an attempt created after the stop (a retry by hand) is someone's later, explicit
    request, and the batches leave it PENDING.

    A cancel (`?cancelPending=true`) arriving while an abort's batches still run joins the abort
    (`pending_fail_join`) instead of calling this: see there."""
    top = Operation.objects.filter(bulk_operation_id=bulk.pk).aggregate(top=Max("pk"))["top"]
    bulk.pending_fail = {
        "reason": reason,
        "notify": notify,
        "at": format_datetime(now),
        "upTo": top or 0,
    }


def pending_fail_join(bulk: BulkOperation, *, now: datetime) -> bool:
    """A cancel's stop on `bulk` (row-locked) whose abort is still failing its PENDING children:
    keep the abort's marker, reason and `abortReason.pendingFailed` count, widen it to the children
    that exist now, and lease it to the caller too (it runs `bulk_pending_fail_after_stop`
    beside the abort's finisher; each child is failed once, each batch counts what it failed).
    False when there is no abort marker to join."""
    current = bulk.pending_fail
    if current is None or not current.get("reason", "").startswith(ABORTED_PREFIX):
        return False
    pending_fail_mark(bulk, reason=current["reason"], notify=current.get("notify", True), now=now)
    return True


def _lease_expired(marker: dict[str, Any], now: datetime) -> bool:
    at = marker.get("at")
    return at is None or parse_datetime(at, field="at") + PENDING_FAIL_LEASE <= now


def _renew(
    bulk_operation_id: int, marker: dict[str, Any], failed: int, now: datetime
) -> dict[str, Any] | None:
    """In the batch's transaction, after its children: renew the lease and count the batch in
    `abortReason.pendingFailed` (an abort's marker). Returns the marker as it stands now (a
    cancel that joined an abort may have widened its `upTo`); None when it changed its reason or
    went (another cancel replaced it, or another finisher of it is done): this finisher stops."""
    bulk = (
        BulkOperation.objects.select_for_update()
        .filter(pk=bulk_operation_id)
        .only("pk", "pending_fail", "abort_reason")
        .first()
    )
    current = bulk.pending_fail if bulk is not None else None
    if current is None or current.get("reason") != marker["reason"]:
        return None
    assert bulk is not None
    bulk.pending_fail = {**current, "at": format_datetime(now)}
    fields = ["pending_fail"]
    if failed and bulk.abort_reason is not None and marker["reason"].startswith(ABORTED_PREFIX):
        bulk.abort_reason = {
            **bulk.abort_reason,
            "pendingFailed": bulk.abort_reason.get("pendingFailed", 0) + failed,
        }
        fields.append("abort_reason")
        bulk_changed(bulk.pk)
    bulk.save(update_fields=fields)
    return bulk.pending_fail


def bulk_pending_fail(
    *,
    bulk_operation_id: int,
    now: datetime | None = None,
    batch_size: int | None = None,
    leased: bool = False,
    lease_at: str | None = None,
) -> int:
    """Fail the PENDING children (latest attempts, up to the marker's `upTo`: those that existed
    at the stop) of a bulk operation marked `pending_fail`, `batch_size` (default
    BULK_PENDING_FAIL_BATCH_SIZE) per transaction; each batch commits on its own when this runs
    outside any transaction (inside one, they are savepoints of it). Idempotent: a row is locked
    (waiting for an agent's transaction that holds it) and re-checked, so a child an agent took
    meanwhile keeps its status. The lease: `leased` (the caller marked it in the stop it just
    committed, or was handed it: `bulkops.tasks.fail_pending_children`), or taken here once it
    expired (a finisher died between batches); otherwise someone else is at it and this returns
    0. `lease_at`: the lease was handed over as it stood then (the marker's `at`, by a task's
    sender): still the caller's only while `at` is unchanged, since another finisher that took
    it since (beat's sweep, after the task waited in its queue past the lease; a cancel that
    joined) renews it. The marker goes once no PENDING child is left. Returns the children
    failed."""
    return _fail_batches(
        bulk_operation_id, now, batch_size, leased=leased, deadline=None, lease_at=lease_at
    )[0]


def _lease(
    bulk_operation_id: int, now: datetime | None, *, leased: bool, lease_at: str | None = None
) -> dict[str, Any] | None:
    """The marker of `bulk_operation_id` for a finisher: `leased` (the caller just committed the
    stop), handed to it (`lease_at` is still the marker's `at`), or taken here once expired (its
    `at` renewed, under the row lock). None: no marker, or someone else's lease still runs."""
    with transaction.atomic():
        bulk = (
            BulkOperation.objects.select_for_update()
            .filter(pk=bulk_operation_id)
            .only("pk", "pending_fail")
            .first()
        )
        marker = bulk.pending_fail if bulk is not None else None
        if marker is None or leased:
            return marker
        if lease_at is not None and marker.get("at") == lease_at:
            return marker
        moment = now or timezone.now()
        if not _lease_expired(marker, moment):
            return None
        assert bulk is not None
        bulk.pending_fail = {**marker, "at": format_datetime(moment)}
        bulk.save(update_fields=["pending_fail"])
        return bulk.pending_fail


def _fail_batches(
    bulk_operation_id: int,
    now: datetime | None,
    batch_size: int | None,
    *,
    leased: bool,
    deadline: float | None,
    lease_at: str | None = None,
) -> tuple[int, bool]:
    """`bulk_pending_fail`, stopping before a batch once `time.monotonic()` reached `deadline`
    (None: never). Returns the children failed and whether this finisher is done (no marker left,
    or another one took over); False: stopped by the deadline, the marker still leased to it."""
    batch_size = batch_size or settings.BULK_PENDING_FAIL_BATCH_SIZE
    marker = _lease(bulk_operation_id, now, leased=leased, lease_at=lease_at)
    if marker is None:
        return 0, True
    pending = Operation.objects.filter(
        bulk_operation_id=bulk_operation_id, superseded=False, status=OperationStatus.PENDING
    )
    total, last = 0, 0
    while True:
        if deadline is not None and time.monotonic() >= deadline:
            logger.info(
                "Bulk operation %s: %d PENDING children failed (%s); time budget spent",
                bulk_operation_id,
                total,
                marker["reason"],
            )
            return total, False
        with transaction.atomic():
            moment = now or timezone.now()
            # Only the children that existed at the stop (none created later: a retry by hand).
            up_to = marker.get("upTo")
            # The batch: a range of IDs (its upper bound read from the index; None: the rest).
            rows = pending.filter(pk__gt=last)
            if up_to is not None:  # a marker stored before `upTo` existed: every child
                rows = rows.filter(pk__lte=up_to)
            bound = list(rows.order_by("pk").values_list("pk", flat=True)[batch_size - 1 :][:1])
            if bound:
                rows = rows.filter(pk__lte=bound[0])
            # Locked in ID order and re-checked once locked: PENDING still, or left alone.
            failed = operations_fail(
                queryset=rows,
                reason=marker["reason"],
                now=moment,
                batch_size=batch_size,
                notify=marker.get("notify", True),
            )
            current = _renew(bulk_operation_id, marker, failed, moment)
            if current is None:
                return total + failed, True
            total += failed
            if not bound and current.get("upTo") == up_to:
                # None left: the marker goes (in the transaction that failed the last ones).
                BulkOperation.objects.filter(pk=bulk_operation_id).update(pending_fail=None)
                break
            # A cancel that joined widened `upTo`: go on to the children it added.
            marker = current
            if bound:
                last = bound[0]
    logger.info(
        "Bulk operation %s: %d PENDING children failed (%s)",
        bulk_operation_id,
        total,
        marker["reason"],
    )
    return total, True


def bulk_pending_fail_after_stop(
    *,
    bulk_operation_id: int,
    now: datetime | None = None,
    inline_seconds: float | None = None,
) -> bool:
    """Fail the PENDING children of a stop the caller just committed (its `pending_fail` marker
    leased to the caller; call this outside any transaction), here or in a task of their own.
    Returns True when every batch ran here, False when the rest was handed off.

    Where the batches run:
    - in a task a Celery worker took from its broker (the ramp's run, beat's abort sweep;
      `bulkops.tasks.in_worker_task`): none here. The backlog goes at once to the task
      `bulkops.tasks.fail_pending_children`, on the queue of the running task, so that the run
      goes on (other bulk operations' children, the rest of the tick) while it is failed;
    - with `inline_seconds` (a request: BULK_PENDING_FAIL_INLINE_SECONDS) and a broker: here until
      done or the budget is spent, then the rest goes to that task (on the default queue);
    - otherwise every batch here: no broker (eager, the embedded scheduler), or a caller that is
      not in a worker's task and has no budget (tests, the shell, management code).
    A task that is lost (never sent, its worker killed) leaves the marker's lease to expire: beat's
    `bulk_pending_fail_sweep` then takes over (in a worker: by sending the task again)."""
    from bulkops import tasks  # the tasks module imports this one

    if not tasks.app_is_eager():
        if tasks.in_worker_task():
            tasks.fail_pending_children_send(bulk_operation_id, queue=tasks.current_queue())
            return False
        if inline_seconds is not None:
            deadline = time.monotonic() + inline_seconds
            _, done = _fail_batches(bulk_operation_id, now, None, leased=True, deadline=deadline)
            if not done:
                tasks.fail_pending_children_send(bulk_operation_id, queue=None)
            return done
    _fail_batches(bulk_operation_id, now, None, leased=True, deadline=None)
    return True


def bulk_pending_fail_sweep(*, now: datetime | None = None) -> int:
    """Finish the PENDING children of stopped bulk operations whose finisher died between
    batches, or whose task was lost (its lease expired): beat runs this every tick. In a worker's
    task (`bulkops.tasks.in_worker_task`) each one's lease is taken here and its children go to
    `fail_pending_children`, as after a stop, so that the tick is not held up; elsewhere they are
    failed here. Returns the children failed here."""
    from bulkops import tasks  # the tasks module imports this one

    hand_off = tasks.in_worker_task()  # never with an eager app
    marked = BulkOperation.objects.filter(pending_fail__isnull=False)
    total = 0
    for pk, marker in list(marked.order_by("pk").values_list("pk", "pending_fail")):
        if not _lease_expired(marker, now or timezone.now()):
            continue
        try:
            if not hand_off:
                total += bulk_pending_fail(bulk_operation_id=pk, now=now)
            elif _lease(pk, now, leased=False) is not None:
                logger.warning(
                    "Bulk operation %s: the finisher of its PENDING children stopped; "
                    "handing them to a task again",
                    pk,
                )
                tasks.fail_pending_children_send(pk, queue=tasks.current_queue())
        except Exception:  # one bulk operation's failure never stops the others, nor the tick
            logger.exception("Failing PENDING children of bulk operation %s failed", pk)
    return total


def bulk_operation_abort_check(*, bulk: BulkOperation, now: datetime) -> bool:
    """Evaluate `bulk`'s abort criteria and abort it if one fires; True when it did. The caller
    holds the bulk operation's row lock in its transaction (the ramp, before each batch)."""
    config = bulk.abort_config
    if not config or bulk.abort_reason is not None or bulk.status not in WATCHED_STATUSES:
        return False
    if bulk.pending_fail is not None:
        # A cancel's batches (`?cancelPending=true` on a COMPLETED one) are failing its PENDING
        # children: the first stop wins; the criteria are checked again once they are done.
        return False
    progress = bulk_operation_progress(bulk)
    if bulk.status == BulkStatus.COMPLETED and not progress["pending"] + progress["executing"]:
        return False  # every child created and finished: the rollout is over, nothing to stop
    if not _could_fire(config, bulk_progress_bound(progress)):
        return False
    counts = abort_counts(bulk_operation_id=bulk.pk)
    criterion = fired_criterion(config, counts)
    if criterion is None:
        return False
    _abort(bulk, criterion, counts, now)
    return True


def _unfinished_q() -> Q:
    """Still a rollout: children left to create, or created ones not finished."""
    return (
        Q(status__in=RUNNING_STATUSES)
        | Q(**{f"{CURRENT['pending']}__gt": 0})
        | Q(**{f"{CURRENT['executing']}__gt": 0})
    )


def bulk_operations_abort_sweep(*, now: datetime | None = None) -> list[int]:
    """Evaluate every bulk operation with abort criteria that is still rolling out (beat runs
    this after folding the deltas) and abort those where one fires, each in a transaction of
    its own; one whose row is locked (the ramp holds it, and checks itself) is left for the next
    run. Returns the IDs of the bulk operations aborted."""
    # First by the columns (and whether deltas wait to be folded), so that the many COMPLETED
    # bulk operations whose children all finished long ago cost an index probe each, not the
    # exact progress's four sums.
    maybe_unfinished = (
        Q(status__in=RUNNING_STATUSES)
        | Q(pending__gt=0)
        | Q(executing__gt=0)
        | Exists(BulkProgressDelta.objects.filter(bulk_operation_id=OuterRef("pk")))
    )
    watched = bulk_operations_with_progress(
        BulkOperation.objects.filter(
            maybe_unfinished,
            abort_config__isnull=False,
            abort_reason__isnull=True,
            status__in=WATCHED_STATUSES,
        )
    ).filter(_unfinished_q())
    aborted = []
    for row in list(watched.only("pk", "status", "abort_config")):
        pk = row.pk
        try:
            if not _could_fire(row.abort_config, bulk_progress_bound(bulk_operation_progress(row))):
                continue
            with transaction.atomic():
                bulk = (
                    BulkOperation.objects.select_for_update(skip_locked=True).filter(pk=pk).first()
                )
                # The moment once the lock is held: after every batch the ramp committed.
                moment = now or timezone.now()
                stopped = bulk is not None and bulk_operation_abort_check(bulk=bulk, now=moment)
            if stopped:
                aborted.append(pk)
                # In beat's run: handed to a task of its own (`bulk_pending_fail_after_stop`).
                bulk_pending_fail_after_stop(bulk_operation_id=pk, now=now)
        except Exception:  # one bulk operation's failure never stops the others, nor the tick
            logger.exception("Abort check of bulk operation %s failed; next tick retries", pk)
    return aborted
