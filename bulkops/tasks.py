"""The ramp's task: creates every due child operation, folds progress, and books its next run.

On time without a fine beat: when a run ends it books the next one for the moment the next child
is due (`ramp_wake`): a Celery task with that ETA when there is a broker, the in-process
scheduler's ramp entry otherwise. Creating or rescheduling a bulk operation books a run for its
start the same way. Beat (every BULK_RAMP_INTERVAL) stays the safety net: a booked run that is
lost (a worker killed, a broker restart) is caught up by the next tick, which books again."""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from celery import current_task, shared_task
from celery.signals import worker_process_shutdown, worker_shutdown
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from bulkops import abort, live, services
from bulkops.models import BulkOperation

logger = logging.getLogger(__name__)

RAMP_TASK = "bulkops.tasks.advance_bulk_operations"
# Runs further ahead than this are left to beat, which books them once they are this close: an
# ETA task sits unacknowledged in a worker meanwhile, and the Redis transport redelivers those
# after its visibility timeout (one hour).
ETA_HORIZON = timedelta(minutes=5)
# The booked run's due time in ms, per queue (the broker's Redis): a run is booked only when none
# is booked for that moment or earlier. Whichever run starts after it re-books.
_BOOKED_KEY = "bulkops:ramp:booked:{queue}"
# KEYS[1] booked key; ARGV: due ms, now ms, ttl ms. Returns 1 if the caller must send the task.
_BOOK_LUA = """
local booked = tonumber(redis.call('GET', KEYS[1]) or '')
local due, now = tonumber(ARGV[1]), tonumber(ARGV[2])
if booked and booked <= due and booked >= now then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""
# KEYS[1] booked key; ARGV[1] the starting run's booking: it is no longer ahead.
_UNBOOK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""
# Runs a booked run sends at most for other bulk operations due at the same time (`_fan_out`).
MAX_FAN_OUT = 7
# A booked run the worker's timer starts a little early waits for its moment up to this long.
EARLY_WAIT_SECONDS = 0.25


@shared_task(acks_late=True, bind=True)
def advance_bulk_operations(
    self: Any, batch_size: int = services.RAMP_BATCH_SIZE, booked_ms: int | None = None
) -> int:
    """Idempotent: the claimed bulk operation's `next_index` moves in the same transaction as its
    children are created, so a rerun after a crash continues where the last commit left off.
    `batch_size` is the number of children per transaction. Then the progress deltas of the
    children's status changes are folded into their bulk operations' rows (also idempotent: a
    delta is deleted in the transaction that adds it to its row; beat's runs only), and the next
    run is booked for the next due child. Beat's runs also abort the bulk operations whose abort
    thresholds were crossed (bulkops.abort). `booked_ms`: this is the run booked for that moment (ms
    since the epoch)."""
    # The next run goes where this one came from (a worker consuming its own queue keeps it).
    queue = (self.request.delivery_info or {}).get("routing_key")
    if booked_ms is not None:
        _unbook(booked_ms, queue)
        _fan_out(queue)
    else:
        # Beat's runs decide the gates of bulk operations waiting at the end of a wave (those
        # have no due time, so no booked run is ever made for them) and apply rate increases
        # earned by successes; a passed gate's next wave starts in this very run.
        services.bulk_rollout_gates_check()
        services.bulk_rollout_rates_check()
    created = services.bulk_operations_advance(batch_size=batch_size)
    if booked_ms is None:
        # Beat's runs fold; booked runs, many a second on a fine ramp, leave it to them (reads
        # add the deltas not folded yet: progress is exact either way).
        services.bulk_progress_fold()
        # Abort thresholds crossed since the last tick, also of bulk operations not due (the
        # ramp checks those it advances itself, before each batch).
        abort.bulk_operations_abort_sweep()
        # PENDING children of an aborted or cancelPending'ed bulk operation whose finisher died
        # between its batches (its lease expired).
        abort.bulk_pending_fail_sweep()
    ramp_wake(services.bulk_operations_next_due(), queue=queue)
    return created


@shared_task(acks_late=True)
def fail_pending_children(bulk_operation_id: int, lease_at: str | None = None) -> int:
    """The PENDING children of a stopped bulk operation (an abort, `?cancelPending=true`), handed
    off by whoever committed the stop (bulkops.abort `bulk_pending_fail_after_stop`): failed in
    batches, each its own transaction renewing the lease it was handed (`lease_at`, the marker's
    `at` when it was sent). A task that waited in its queue until another finisher took the
    lease (beat's sweep, once it expired; a cancel that joined) does nothing; one that runs
    beside another finisher anyway fails each child once. A task that is lost (never sent, its
    worker killed: with acks_late the message is acknowledged or redelivered only much later)
    leaves the lease to expire; beat's `bulk_pending_fail_sweep` then finishes."""
    return abort.bulk_pending_fail(
        bulk_operation_id=bulk_operation_id, leased=lease_at is None, lease_at=lease_at
    )


def fail_pending_children_send(bulk_operation_id: int, *, queue: str | None) -> None:
    """Send `fail_pending_children` to `queue` (None: the default queue) once the current
    transaction commits (at once outside one): never before the stop it finishes, with the lease
    as it stands then (the marker's `at`; the caller holds it). A send that fails is logged, not
    raised: beat's sweep finishes once the lease expired."""

    def send() -> None:
        try:
            marker = (
                BulkOperation.objects.filter(pk=bulk_operation_id)
                .values_list("pending_fail", flat=True)
                .first()
            )
            if not marker:
                return  # finished meanwhile (a joined finisher), or the bulk operation is gone
            fail_pending_children.apply_async(
                args=(bulk_operation_id,), kwargs={"lease_at": marker["at"]}, queue=queue
            )
        except Exception:
            logger.warning(
                "Bulk operation %s: could not hand its PENDING children to a task; beat's sweep "
                "fails them once the lease expired",
                bulk_operation_id,
                exc_info=True,
            )

    transaction.on_commit(send)


def in_worker_task() -> bool:
    """Whether this code runs in a task a Celery worker took from its broker: the only place
    where handing work to another task lets this one go on (a worker will take it). Not for a
    task called directly or run eagerly (`apply()`, no broker), nor outside any task (a request,
    tests, the shell, management commands): those have no worker to hand it to, or are the
    caller's own business."""
    task = current_task
    if not task or app_is_eager():
        return False
    request = task.request
    return not request.called_directly and not request.is_eager


def current_queue() -> str | None:
    """The queue of the task this code runs in (its routing key), None outside one."""
    task = current_task
    if not task:
        return None
    return (task.request.delivery_info or {}).get("routing_key")


@worker_shutdown.connect
@worker_process_shutdown.connect
def publish_live_changes(**_: Any) -> None:
    """A worker stopping gracefully first publishes the bulk operations it changed whose last
    message was still waiting for its interval (bulkops/live.py: the trailing edge)."""
    live.throttle().flush()


@cache
def _scripts(redis_url: str) -> tuple[Any, Any]:
    """The booking scripts on `redis_url`'s client (one per URL: REDIS_URL may change in tests)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    return client.register_script(_BOOK_LUA), client.register_script(_UNBOOK_LUA)


def _booked_key(queue: str | None) -> str:
    """The booking of `queue`; None is the default queue, which a run sent there sees by name
    (its routing key): both book under one key."""
    if not queue:
        from deviceplatform.celery import app

        queue = app.conf.task_default_queue
    return _BOOKED_KEY.format(queue=queue)


def _unbook(booked_ms: int, queue: str | None) -> None:
    """The booked run starts: wait for its moment if the timer fired early (a child is never
    created early anyway: this spares a run that would find nothing due), and clear the booking
    so that the next one is booked however soon it is due."""
    early = booked_ms / 1000 - time.time()
    if 0 < early <= EARLY_WAIT_SECONDS:
        time.sleep(early)
    try:
        _scripts(settings.REDIS_URL)[1](keys=[_booked_key(queue)], args=[booked_ms])
    except Exception:
        logger.warning("Bulk ramp: could not clear the booking of %s ms", booked_ms, exc_info=True)


def _fan_out(queue: str | None) -> None:
    """A booked run that finds several bulk operations due sends a run for each other one (at
    most MAX_FAN_OUT), so that idle workers take them in parallel: each claims a different one
    (SKIP LOCKED). Those runs book the next run when they end but fan out no further."""
    if app_is_eager():
        return
    due = services.bulk_operations_due_count(limit=MAX_FAN_OUT + 1)
    for _ in range(due - 1):
        advance_bulk_operations.apply_async(queue=queue)


def app_is_eager() -> bool:
    from deviceplatform.celery import app

    return bool(app.conf.task_always_eager) or not settings.REDIS_URL


def ramp_wake(
    due: datetime | None, *, queue: str | None = None, now: datetime | None = None
) -> None:
    """Make sure a ramp run starts at `due` (at once when it is past; nothing for None), sent to
    `queue` (None: the default queue). Never raises: beat catches up whatever this could not
    book. Nothing with BULK_RAMP_BOOKING off. `now`: the current time (tests pass their own)."""
    if due is None or not settings.BULK_RAMP_BOOKING:
        return
    try:
        _book(due, queue, now or timezone.now())
    except Exception:
        logger.warning("Bulk ramp: could not book a run for %s", due.isoformat(), exc_info=True)


def _book(due: datetime, queue: str | None, now: datetime) -> None:
    from deviceplatform.scheduler import wake_entry

    if app_is_eager():
        # No broker: the in-process scheduler (if this process runs one) runs the ramp entry then.
        wake_entry(RAMP_TASK, due, now=now)
        return
    if due - now > ETA_HORIZON:
        return
    due_ms, now_ms = math.ceil(due.timestamp() * 1000), int(now.timestamp() * 1000)
    ttl_ms = max(due_ms - now_ms, 0) + 60_000
    if _scripts(settings.REDIS_URL)[0](keys=[_booked_key(queue)], args=[due_ms, now_ms, ttl_ms]):
        advance_bulk_operations.apply_async(
            kwargs={"booked_ms": due_ms}, eta=due if due > now else None, queue=queue
        )
