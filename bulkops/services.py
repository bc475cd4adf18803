"""Every bulk-operation write, and the ramp that turns a bulk operation into child operations.

The ramp (`bulk_operations_advance`) claims one due bulk operation at a time with
`FOR UPDATE SKIP LOCKED`, creates its due children through devicecontrol's batched create in the
same transaction that moves `next_index`, and commits. A worker killed mid-batch rolls the whole
batch back; two workers never hold the same bulk operation; and a unique constraint on
(bulk operation, device) makes a second child for a device impossible even if all that failed.
A bulk operation whose batch fails (whatever the reason, at commit included) is set aside: the
failure is recorded on it (`c8y_RampError`), it is retried with back-off, and the others go on.

Progress: a child's status change inserts a `BulkProgressDelta` in its own transaction and never
touches the bulk operation's row; the beat task folds the deltas into the row
(`bulk_progress_fold`), and reads add the deltas not folded yet (`bulkops.selectors`)."""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import orjson
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from bulkops import rollout
from bulkops.abort import (
    abort_config_input,
    bulk_operation_abort_check,
    bulk_pending_fail_after_stop,
    pending_fail_join,
    pending_fail_mark,
)
from bulkops.live import bulk_changed
from bulkops.models import (
    RUNNING_STATUSES,
    BulkOperation,
    BulkOperationTarget,
    BulkProgressDelta,
    BulkStatus,
    RolloutState,
)
from bulkops.retries import bulk_retry_config_validate
from devicecontrol.delivery import deliver_by_sms
from devicecontrol.models import Operation, OperationStatus
from devicecontrol.realtime import OperationEvent
from devicecontrol.serializers import operation_json
from devicecontrol.services import (
    CANCELLED_REASON,
    RETRY_CONFIG,
    StatusChange,
    operation_prototype_validate,
    operations_create_many,
    operations_retries_drop,
)
from deviceplatform import metrics
from deviceplatform.api.dates import parse_datetime
from deviceplatform.api.exceptions import ApiError, MissingFields, NotFound, ValidationFailed
from deviceplatform.api.params import parse_id
from deviceplatform.realtime.events import EventBatch, publish
from deviceplatform.realtime.store import Order
from inventory.models import ManagedObject, ManagedObjectReference, Relation
from inventory.query import parse_query
from inventory.selectors import devices_agent_ids, has_parent_q

logger = logging.getLogger(__name__)

NO_AGENT_REASON = "Device is not in the childDevices hierarchy of any agent"
INVALID = "devicecontrol/Invalid Data"
RAMP_ERROR_KEY = "c8y_RampError"
READ_ONLY_KEYS = frozenset(
    {"id", "self", "status", "generalStatus", "progress", RAMP_ERROR_KEY, "abortReason"}
)
# A bulk operation whose ramp failed is tried again after 5 s, then 10, 20, ... at most 10 min.
RAMP_RETRY_FIRST_SECONDS = 5
RAMP_RETRY_MAX_SECONDS = 600
RAMP_ERROR_MAX_CHARS = 1000
# Children per ramp transaction: one INSERT, one event batch (see bench/README.md, bulk.py).
RAMP_BATCH_SIZE = 2000
SELECTOR_KEYS = ("groupId", "failedParentId", "failedBulkOperationId")
KNOWN_KEYS = frozenset(
    {
        *READ_ONLY_KEYS,
        *SELECTOR_KEYS,
        "startDate",
        "creationRamp",
        "operationPrototype",
        "abortConfig",
    }
    | {*rollout.INPUT_KEYS, rollout.READ_ONLY_KEY}
)


def bulk_operation_not_found(pk: object) -> NotFound:
    return NotFound(
        "Finding bulk operation from database failed : Cannot find document with ID "
        f"ID [type=com_cumulocity_model_idtype_GId, value={pk}]!",
        error="devicecontrol/Not Found",
    )


# --- validation --------------------------------------------------------------------------------


def _selector(data: dict[str, Any]) -> tuple[str, int] | None:
    """("group", id) or ("failed", id) from the body; None when it names neither."""
    given = [key for key in SELECTOR_KEYS if data.get(key) is not None]
    if "failedParentId" in given and "failedBulkOperationId" in given:
        given.remove("failedBulkOperationId")  # the alias names the same thing (decision D1)
    if len(given) > 1:
        raise ValidationFailed(
            "Exactly one of groupId and failedParentId may be given, not both", error=INVALID
        )
    if not given:
        return None
    key = given[0]
    try:
        target_id = parse_id(data[key], field=key)
    except ValidationFailed:
        raise ValidationFailed(f"{key} must be an ID, not {data[key]!r}", error=INVALID) from None
    return ("group" if key == "groupId" else "failed", target_id)


def _ramp(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationFailed("creationRamp must be a number of seconds", error=INVALID)
    if not math.isfinite(value) or value < 0 or value > 10**7:
        raise ValidationFailed("creationRamp must be from 0 to 10000000 seconds", error=INVALID)
    return float(value)


def _start(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValidationFailed("startDate must be an ISO 8601 date-time string", error=INVALID)
    return parse_datetime(value, field="startDate")


def _prototype(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValidationFailed("operationPrototype must be a JSON object", error=INVALID)
    operation_prototype_validate(value)
    return value


def _targets(selector: tuple[str, int]) -> list[int]:
    """The target device IDs, ascending and unique (bulkoperations.md §3); 422 for a bad selector."""
    kind, target_id = selector
    if kind == "group":
        group = ManagedObject.objects.filter(pk=target_id).first()
        if group is None or not (group.is_group or "c8y_IsDynamicGroup" in group.fragments):
            raise ValidationFailed(
                f"Managed object {target_id} is not a device group", error=INVALID
            )
        if group.is_group:
            members = ManagedObject.objects.filter(has_parent_q("asset", group.pk), is_device=True)
        else:
            query = group.fragments.get("c8y_DeviceQueryString")
            if not isinstance(query, str) or not query.strip():
                raise ValidationFailed(
                    f"Smart group {target_id} has no c8y_DeviceQueryString", error=INVALID
                )
            members = ManagedObject.objects.filter(parse_query(query).filter, is_device=True)
        return list(members.order_by("pk").values_list("pk", flat=True).distinct())
    if not BulkOperation.objects.filter(pk=target_id).exists():
        raise ValidationFailed(f"Bulk operation {target_id} does not exist", error=INVALID)
    # The devices whose latest attempt failed: a retry that succeeded superseded the failure.
    return list(
        Operation.objects.filter(
            bulk_operation_id=target_id, status=OperationStatus.FAILED, superseded=False
        )
        .order_by("device_id")
        .values_list("device_id", flat=True)
        .distinct()
    )


def _store_selector(bulk: BulkOperation, selector: tuple[str, int]) -> None:
    kind, target_id = selector
    bulk.group_id = target_id if kind == "group" else None
    bulk.failed_parent_id = target_id if kind == "failed" else None


def _extra_fragments(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key not in KNOWN_KEYS}


def _merged_fragments(stored: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The stored top-level fragments with a body's applied. A `retryConfig` of `null` removes
    the retry policy (as `null` removes `abortConfig`), so it is neither stored nor echoed;
    other fragments keep Cumulocity's behaviour (stored as given)."""
    merged = {**stored, **_extra_fragments(data)}
    if RETRY_CONFIG in data and data[RETRY_CONFIG] is None:
        del merged[RETRY_CONFIG]
    return merged


# --- schedule ----------------------------------------------------------------------------------


MICROSECOND = timedelta(microseconds=1)
# Where a schedule runs past what a date-time can hold (creationRamp up to 10^7 s times many
# targets): those positions are never due.
NEVER = datetime(9999, 12, 31, tzinfo=UTC)


def _due_offset(bulk: BulkOperation, position: int) -> int:
    """Microseconds from `effective_start` to the due time of `position`: the one schedule, in
    integers, that both the due time (`_due_at`) and the due count (`_due_end`) come from. The ramp
    is rounded to whole microseconds once, so position k is due exactly k ramps after the start."""
    return (position - bulk.first_index) * round(rollout.ramp_seconds(bulk) * 1_000_000)


def _later(moment: datetime, delta: timedelta) -> datetime:
    """`moment + delta`, or NEVER where that is past what a date-time can hold."""
    try:
        return min(moment + delta, NEVER)
    except OverflowError:
        return NEVER


def _due_at(bulk: BulkOperation, position: int) -> datetime:
    try:
        return _later(bulk.effective_start, _due_offset(bulk, position) * MICROSECOND)
    except OverflowError:  # beyond even a timedelta
        return NEVER


def _schedule(bulk: BulkOperation, now: datetime) -> None:
    """Restart the schedule at `next_index` from max(startDate, now) (bulkoperations.md §4, §9)."""
    bulk.effective_start = max(bulk.start_date, now)
    bulk.first_index = bulk.next_index
    bulk.next_due_at = bulk.effective_start


def _replace_targets(bulk: BulkOperation, device_ids: list[int], *, skip: set[int]) -> None:
    """Targets from `next_index` on become `device_ids` (minus `skip`, the processed ones)."""
    BulkOperationTarget.objects.filter(bulk_operation=bulk, position__gte=bulk.next_index).delete()
    fresh = [device_id for device_id in device_ids if device_id not in skip]
    BulkOperationTarget.objects.bulk_create(
        [
            BulkOperationTarget(bulk_operation=bulk, position=bulk.next_index + i, device_id=d)
            for i, d in enumerate(fresh)
        ],
        batch_size=5000,
    )
    bulk.target_count = bulk.next_index + len(fresh)


# --- writes ------------------------------------------------------------------------------------


def _create_input(
    data: dict[str, Any],
) -> tuple[tuple[str, int], datetime, float, dict[str, Any]]:
    """The selector, start, ramp and prototype of a create body; 422 for a missing or bad one."""
    required = ("startDate", "operationPrototype")
    if not rollout.replaces_ramp(data):  # a rolloutConfig's rate replaces creationRamp
        required = (*required, "creationRamp")
    missing = [key for key in required if key not in data]
    selector = _selector(data)
    if selector is None:
        missing.append("groupId")
    if missing:
        raise MissingFields(missing)
    start, ramp, prototype = (
        _start(data["startDate"]),
        _ramp(data["creationRamp"]) if "creationRamp" in data else 0.0,
        _prototype(data["operationPrototype"]),
    )
    assert selector is not None
    return selector, start, ramp, prototype


@dataclass(frozen=True)
class BulkPreview:
    """What `bulk_operation_create` would do with a body, now: how many devices it targets and
    when the ramp would create the first and the last child operation."""

    target_count: int
    start: datetime
    creation_ramp: float

    @property
    def duration(self) -> timedelta:
        """From the first child operation to the last (0 for one target or none)."""
        return timedelta(seconds=max(self.target_count - 1, 0) * self.creation_ramp)

    @property
    def end(self) -> datetime:
        return _later(self.start, self.duration)


def bulk_operation_preview(*, data: dict[str, Any], now: datetime | None = None) -> BulkPreview:
    """Validate a create body exactly as `bulk_operation_create` does and count its targets,
    writing nothing (the admin shows this before the operator confirms)."""
    selector, start, ramp, _ = _create_input(data)
    abort_config_input(data)
    extension = rollout.rollout_input(data, ramp=ramp)
    now = now or timezone.now()
    targets = len(_targets(selector))
    rollout.check_coverage(extension.waves, targets)
    return BulkPreview(target_count=targets, start=max(start, now), creation_ramp=ramp)


@transaction.atomic
def bulk_operation_create(*, data: dict[str, Any], now: datetime | None = None) -> BulkOperation:
    """Validate, snapshot the targets, store ACTIVE/SCHEDULED (bulkoperations.md §2).

    The schedule starts at the later of `startDate` and the moment the bulk operation becomes
    visible: the end of this transaction, once its targets are stored (100,000 of them take
    seconds), not the moment the request began, so the ramp is not late (and does not catch up
    in a burst) when its first run sees it. With `now` given (tests, replays), that moment is
    `now`."""
    given = now
    selector, start, ramp, prototype = _create_input(data)
    bulk_retry_config_validate(data)
    abort_config = abort_config_input(data)
    extension = rollout.rollout_input(data, ramp=ramp)
    device_ids = _targets(selector)
    rollout.check_coverage(extension.waves, len(device_ids))
    now = now or timezone.now()
    bulk = BulkOperation(
        abort_config=abort_config,
        start_date=start,
        creation_ramp=ramp,
        operation_prototype=prototype,
        fragments=_merged_fragments({}, data),
        creation_time=now,
        last_updated=now,
        effective_start=max(start, now),
    )
    _store_selector(bulk, selector)
    rollout.rollout_init(bulk, extension)
    _schedule(bulk, now)
    bulk.save(force_insert=True)
    _replace_targets(bulk, device_ids, skip=set())
    if given is None:
        _schedule(bulk, timezone.now())  # the last statement before the commit: visible now
    bulk.save(update_fields=["target_count", "effective_start", "first_index", "next_due_at"])
    _wake_ramp_on_commit(bulk)
    bulk_changed(bulk.pk, created=True)
    return bulk


def _wake_ramp_on_commit(bulk: BulkOperation) -> None:
    """Book a ramp run for the bulk operation's first due child once this commits, instead of
    waiting for the next beat tick (bulkops.tasks.ramp_wake)."""
    from bulkops.tasks import ramp_wake  # the tasks module imports this one

    if bulk.next_due_at is not None:
        due = bulk.next_due_at
        transaction.on_commit(lambda: ramp_wake(due))


def _locked(
    bulk_operation_id: int, precondition: Callable[[BulkOperation], None] | None = None
) -> BulkOperation:
    """The bulk operation, row-locked; 404 if unknown, then `precondition` (`If-Match`)."""
    bulk = BulkOperation.objects.select_for_update().filter(pk=bulk_operation_id).first()
    if bulk is None:
        raise bulk_operation_not_found(bulk_operation_id)
    if precondition is not None:
        precondition(bulk)
    return bulk


def _lock_running(
    bulk_operation_id: int,
    verb: str,
    precondition: Callable[[BulkOperation], None] | None = None,
) -> BulkOperation:
    """The bulk operation, row-locked; 404 if unknown, then `precondition` (`If-Match`), then
    422 unless ACTIVE or IN_PROGRESS."""
    bulk = _locked(bulk_operation_id, precondition)
    if bulk.status not in RUNNING_STATUSES:
        raise ValidationFailed(
            f"Only ACTIVE or IN_PROGRESS bulk operations can be {verb}; {bulk.pk} is {bulk.status}",
            error=INVALID,
        )
    return bulk


def bulk_operation_update(
    *,
    bulk_operation_id: int,
    data: dict[str, Any],
    now: datetime | None = None,
    precondition: Callable[[BulkOperation], None] | None = None,
) -> BulkOperation:
    """PUT (bulkoperations.md §9): validate the keys present; on ACTIVE or IN_PROGRESS apply them
    and reschedule what is left from a new effective start, keeping the ID; otherwise 422."""
    selector = _selector(data)
    start = _start(data["startDate"]) if "startDate" in data else None
    ramp = _ramp(data["creationRamp"]) if "creationRamp" in data else None
    prototype = _prototype(data["operationPrototype"]) if "operationPrototype" in data else None
    bulk_retry_config_validate(data)
    abort_config = abort_config_input(data)
    given, now = now, now or timezone.now()
    with transaction.atomic():
        bulk = _lock_running(bulk_operation_id, "changed", precondition)
        rollout.check_update(bulk, data, ramp=ramp)
        if start is not None:
            bulk.start_date = start
        if ramp is not None:
            bulk.creation_ramp = ramp
        if prototype is not None:
            bulk.operation_prototype = prototype
        if "abortConfig" in data:  # null removes the thresholds
            bulk.abort_config = abort_config
        bulk.fragments = _merged_fragments(bulk.fragments, data)
        if selector is not None:
            processed = set(
                BulkOperationTarget.objects.filter(
                    bulk_operation=bulk, position__lt=bulk.next_index
                ).values_list("device_id", flat=True)
            )
            _store_selector(bulk, selector)
            _replace_targets(bulk, _targets(selector), skip=processed)
        # From when the change becomes visible (new targets take a while to store), as on create.
        _schedule(bulk, now if given is not None else timezone.now())
        rollout.hold(bulk)  # a paused or wave-waiting one stays so
        bulk.last_updated = now
        bulk.save()
        _wake_ramp_on_commit(bulk)
        bulk_changed(bulk.pk)
    return bulk


def bulk_operation_cancel(
    *,
    bulk_operation_id: int,
    now: datetime | None = None,
    precondition: Callable[[BulkOperation], None] | None = None,
    cancel_pending: bool = False,
    by: str = "",
    notify: bool = True,
    inline_seconds: float | None = None,
) -> BulkOperation:
    """DELETE (bulkoperations.md §10): no further children; existing ones keep their status.
    `cancel_pending` (`?cancelPending=true`, README "Cancel that reaches the device"): its
    PENDING children (latest attempts) are also cancelled, "Cancelled by <by>"; and a bulk
    operation that is COMPLETED or DELETED already is not refused: its status stays, only its
    PENDING children are cancelled.

    First the stop, one short transaction (`bulk_operation_stop`); then the PENDING children are
    failed in batches of their own (bulkops.abort `bulk_pending_fail_after_stop`): here before
    this returns, or, with `inline_seconds` (a request's budget) and a broker, here until the
    budget is spent and the rest by the task `fail_pending_children`. Beat's sweep finishes them
    if the process failing them dies meanwhile. The returned `pending_fail` is None when every
    batch ran here."""
    bulk = bulk_operation_stop(
        bulk_operation_id=bulk_operation_id,
        now=now,
        precondition=precondition,
        cancel_pending=cancel_pending,
        by=by,
        notify=notify,
    )
    if cancel_pending and bulk_pending_fail_after_stop(
        bulk_operation_id=bulk.pk, now=now, inline_seconds=inline_seconds
    ):
        bulk.pending_fail = None
    return bulk


def bulk_operation_stop(
    *,
    bulk_operation_id: int,
    now: datetime | None = None,
    precondition: Callable[[BulkOperation], None] | None = None,
    cancel_pending: bool = False,
    by: str = "",
    notify: bool = True,
) -> BulkOperation:
    """The stop of `bulk_operation_cancel`, in one transaction under the row lock: 404, the
    `precondition` (`If-Match`, 412) and, without `cancel_pending`, 422 unless running are
    checked before anything is written; then DELETED (a running one), booked retries dropped
    and, with `cancel_pending`, the `pending_fail` mark leased to the caller, who then runs
    `bulk_pending_fail` (if it dies first, beat's sweep does once the lease expired)."""
    now = now or timezone.now()
    with transaction.atomic():
        if cancel_pending:
            bulk = _locked(bulk_operation_id, precondition)
        else:
            bulk = _lock_running(bulk_operation_id, "cancelled", precondition)
        fields = []
        if bulk.status in RUNNING_STATUSES:
            bulk.status = BulkStatus.DELETED
            bulk.next_due_at = None
            bulk.last_updated = now
            fields += ["status", "next_due_at", "last_updated"]
        # No further children: booked automatic retries of its children go too (before the
        # mark, which takes the children that exist once a retry being created is in).
        operations_retries_drop(queryset=Operation.objects.filter(bulk_operation_id=bulk.pk))
        # An abort still failing its PENDING children is joined, not replaced: they keep the
        # abort's reason and count in its `abortReason.pendingFailed`.
        if cancel_pending and not pending_fail_join(bulk, now=now):
            pending_fail_mark(bulk, reason=CANCELLED_REASON.format(by=by), notify=notify, now=now)
        if cancel_pending:
            fields.append("pending_fail")
        if fields:
            bulk.save(update_fields=fields)
        bulk_changed(bulk.pk)
    return bulk


def bulk_operation_pause(
    *, bulk_operation_id: int, by: str | None = None, now: datetime | None = None
) -> BulkOperation:
    """Pause (issue 14): no further children until resumed; status and progress keep their
    meanings. 404 if unknown; 422 unless ACTIVE or IN_PROGRESS, or if paused already."""
    with transaction.atomic():
        bulk = _lock_running(bulk_operation_id, "paused")
        rollout.pause(bulk, by=by)
        bulk.last_updated = now or timezone.now()
        bulk.save(update_fields=["rollout_state", "rollout_reason", "next_due_at", "last_updated"])
        bulk_changed(bulk.pk)
    return bulk


def bulk_operation_resume(
    *, bulk_operation_id: int, by: str | None = None, now: datetime | None = None
) -> BulkOperation:
    """Resume a paused bulk operation: its schedule restarts at the next target from now (at the
    end of a wave: the next wave starts). 404 if unknown; 422 unless paused and running."""
    now = now or timezone.now()
    with transaction.atomic():
        bulk = _lock_running(bulk_operation_id, "resumed")
        rollout.resume(bulk, now)
        bulk.last_updated = now
        bulk.save(update_fields=[*rollout.RAMP_FIELDS, "wave", "next_due_at", "last_updated"])
        _wake_ramp_on_commit(bulk)
        bulk_changed(bulk.pk)
    return bulk


def bulk_rollout_gates_check(*, now: datetime | None = None) -> int:
    """Decide the gate of every bulk operation waiting at the end of a wave (the beat task runs
    this before the ramp), each in a transaction of its own under its row lock (SKIP LOCKED: one
    held elsewhere waits for the next run). Returns how many changed state."""
    waiting = BulkOperation.objects.filter(
        rollout_state=RolloutState.WAITING_FOR_WAVE, status__in=RUNNING_STATUSES
    )
    changed = 0
    for pk in list(waiting.order_by("pk").values_list("pk", flat=True)):
        with transaction.atomic():
            bulk = waiting.select_for_update(skip_locked=True).filter(pk=pk).first()
            if bulk is None or not rollout.gate_check(bulk, now or timezone.now()):
                continue
            bulk.save(update_fields=[*rollout.RAMP_FIELDS, "wave", "next_due_at"])
            _wake_ramp_on_commit(bulk)
            bulk_changed(bulk.pk)
            changed += 1
    return changed


def bulk_rollout_rates_check(*, now: datetime | None = None) -> int:
    """Apply the rate increases earned by successes to every running bulk operation whose rate
    increases with them (the beat task runs this before the ramp), so a slow rate speeds up when
    the successes come, not only when its next child is due. Each under its row lock (SKIP
    LOCKED: one the ramp holds applies them itself). Returns how many changed rate."""
    running = BulkOperation.objects.filter(
        status__in=RUNNING_STATUSES,
        next_due_at__isnull=False,
        rollout_config__exponentialRate__rateIncreaseCriteria__has_key="numberOfSucceededDevices",
    )
    changed = 0
    for pk in list(running.order_by("pk").values_list("pk", flat=True)):
        with transaction.atomic():
            bulk = running.select_for_update(skip_locked=True).filter(pk=pk).first()
            if bulk is None or not rollout.success_increase(bulk, now or timezone.now()):
                continue
            bulk.save(update_fields=list(rollout.RAMP_FIELDS) + ["next_due_at"])
            _wake_ramp_on_commit(bulk)
            bulk_changed(bulk.pk)
            changed += 1
    return changed


# --- the ramp ----------------------------------------------------------------------------------


def _due_end(bulk: BulkOperation, now: datetime) -> int:
    """One past the last position due at `now`: every position p with `_due_offset(p)` at most
    the microseconds elapsed since the start (so `_due_at(p) <= now` exactly when p < the result)."""
    if now < bulk.effective_start:
        return bulk.next_index
    step = _due_offset(bulk, bulk.first_index + 1)
    if step == 0:
        return bulk.target_count
    elapsed = (now - bulk.effective_start) // MICROSECOND
    return min(bulk.target_count, bulk.first_index + elapsed // step + 1)


# --- the ramp's batch -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Child:
    """What `operation_json` reads of a child operation the ramp just inserted: the row as
    written, without a model instance per child."""

    pk: int
    device_id: int
    agent_id: int | None
    status: str
    failure_reason: str | None
    creation_time: datetime
    bulk_operation_id: int
    fragments: dict[str, Any]
    retry_of_id: None = None
    attempt: int = 1
    retry_at: None = None


class _Publisher:
    """Publishes the realtime events of the ramp's committed batches from a thread of its own, in
    commit order, while the ramp goes on with its next batch. At most `depth` batches wait, so a
    slow store slows the ramp down instead of piling events up in memory."""

    def __init__(self, depth: int = 2) -> None:
        self.queue: queue.Queue[tuple[list[Any], list[Order]] | None] = queue.Queue(depth)
        self.thread = threading.Thread(target=self._run, name="bulk-ramp-publisher", daemon=True)
        self.thread.start()

    def submit(self, events: list[Any], order: list[Order]) -> None:
        self.queue.put((events, order))

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            try:
                publish(*item)  # logs a store outage itself
            except Exception:  # never leave the ramp blocked on a full queue
                logger.exception("Bulk ramp: could not publish %d event(s)", len(item[0]))

    def close(self) -> None:
        """Return once every submitted batch is published."""
        self.queue.put(None)
        self.thread.join()


_local = threading.local()


@contextlib.contextmanager
def _background_publishing() -> Iterator[None]:
    """Within: the ramp's batches publish their events from a `_Publisher` (started by the first
    batch); all of them are out when the block ends (a run's events never outlive it)."""
    _local.active, _local.publisher = True, None
    try:
        yield
    finally:
        publisher, _local.active, _local.publisher = _local.publisher, False, None
        if publisher is not None:
            publisher.close()


@dataclass(eq=False)
class _RampEvents(EventBatch):
    """The on-commit callback of a ramp batch's CREATE events: numbered for commit order like any
    `EventBatch` (`take_order`), then handed to the background publisher when there is one."""

    def __call__(self) -> None:
        if not self.lead:
            return
        events = [*self.events, *(event for batch in self.joined for event in batch.events)]
        if not getattr(_local, "active", False):
            publish(events, self.order)
            return
        if _local.publisher is None:
            _local.publisher = _Publisher()
        _local.publisher.submit(events, self.order)


def _int_array(values: Sequence[int | None]) -> str:
    """A bigint[] literal (psycopg's own adaptation of a list costs ~3 µs per element)."""
    return "{" + ",".join("NULL" if v is None else str(int(v)) for v in values) + "}"


# The batch's targets in order, with what the children need of each device: whether it still
# exists, is an agent itself, wants SMS delivery (devicecontrol.delivery.is_sms), and the agent
# among its direct `device` parents (the lowest ID, as `device_agent_id`).
_TARGETS_SQL = """SELECT t.device_id, m.id IS NOT NULL, COALESCE(m.is_agent, false),
       COALESCE(jsonb_typeof(m.fragments -> 'c8y_CommunicationMode') = 'object'
                AND m.fragments -> 'c8y_CommunicationMode' ->> 'mode' = 'SMS', false),
       (SELECT min(r.parent_id) FROM {reference} r JOIN {mo} p ON p.id = r.parent_id
         WHERE r.child_id = t.device_id AND r.relation = %s AND p.is_agent)
  FROM {target} t LEFT JOIN {mo} m ON m.id = t.device_id
 WHERE t.bulk_operation_id = %s AND t.position >= %s AND t.position < %s
 ORDER BY t.position"""

# One INSERT for the batch; IDs are drawn in target order (FIFO per agent).
_INSERT_SQL = """INSERT INTO {operation} (device_id, agent_id, status, creation_time, status_changed_at,
                         failure_reason, fragments, bulk_operation_id, expires_at,
                         execution_timeout, superseded)
SELECT u.device_id, u.agent_id,
       CASE WHEN u.agent_id IS NULL THEN %s ELSE %s END, %s, %s,
       CASE WHEN u.agent_id IS NULL THEN %s END,
       CASE WHEN u.sms THEN %s::jsonb ELSE %s::jsonb END, %s,
       CASE WHEN u.agent_id IS NULL THEN NULL ELSE %s::timestamptz END, %s, false
  FROM unnest(%s::bigint[], %s::bigint[], %s::boolean[]) WITH ORDINALITY
       AS u(device_id, agent_id, sms, ord)
 ORDER BY u.ord
RETURNING id, device_id"""


def _table(model: Any) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def _create_children(bulk: BulkOperation, start: int, end: int, now: datetime) -> int:
    """PostgreSQL: the children of positions [start, end) in one INSERT, their progress added to
    the (locked) bulk operation's counters, their CREATE events and SMS hand-offs registered for
    the commit. The same rows, events and hand-offs as `operations_create_many`, without a
    model instance or an ORM-compiled value per child. Returns the targets processed."""
    sql = _TARGETS_SQL.format(
        reference=_table(ManagedObjectReference),
        mo=_table(ManagedObject),
        target=_table(BulkOperationTarget),
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [Relation.DEVICE.value, bulk.pk, start, end])
        rows = cursor.fetchall()
    found = [row for row in rows if row[1]]
    bulk.dropped += len(rows) - len(found)  # devices deleted since the snapshot
    if not found:
        return len(rows)
    agents: dict[int, int | None] = {}
    walk = []
    for device_id, _, is_agent, _, direct in found:
        if is_agent:
            agents[device_id] = device_id
        elif direct is not None:
            agents[device_id] = direct
        else:
            walk.append(ManagedObject(pk=device_id, is_agent=False))
    if walk:  # no agent right above: walk the hierarchy further up (rare)
        agents.update(devices_agent_ids(devices=walk))
    fragments = {
        key: value
        for key, value in operation_prototype_validate(bulk.operation_prototype).items()
        if value is not None
    }
    sms_fragments = {**fragments}
    sms_fragments.setdefault("deliveryType", "SMS")
    seconds = fragments.get("pendingTimeout") or settings.OPERATION_PENDING_TIMEOUT
    expires = now + timedelta(seconds=seconds) if seconds else None
    device_ids = [row[0] for row in found]
    agent_ids = [agents.get(device_id) for device_id in device_ids]
    sms = [bool(row[3]) or fragments.get("deliveryType") == "SMS" for row in found]
    with connection.cursor() as cursor:
        cursor.execute(
            _INSERT_SQL.format(operation=_table(Operation)),
            [
                OperationStatus.FAILED.value,
                OperationStatus.PENDING.value,
                now,
                now,
                NO_AGENT_REASON,
                orjson.dumps(sms_fragments).decode(),
                orjson.dumps(fragments).decode(),
                bulk.pk,
                expires,
                fragments.get("executionTimeout"),
                _int_array(device_ids),
                _int_array(agent_ids),
                "{" + ",".join("t" if flag else "f" for flag in sms) + "}",
            ],
        )
        ids = dict((device_id, pk) for pk, device_id in cursor.fetchall())
    events = []
    failed = 0
    for device_id, agent_id, flag in zip(device_ids, agent_ids, sms, strict=True):
        if agent_id is None:
            failed += 1
        child = _Child(
            pk=ids[device_id],
            device_id=device_id,
            agent_id=agent_id,
            status=OperationStatus.FAILED if agent_id is None else OperationStatus.PENDING,
            failure_reason=NO_AGENT_REASON if agent_id is None else None,
            creation_time=now,
            bulk_operation_id=bulk.pk,
            fragments=sms_fragments if flag else fragments,
        )
        data = operation_json(cast(Operation, child), base="")
        events.append(OperationEvent("CREATE", child.pk, device_id, agent_id, data))
        if child.fragments.get("deliveryType") == "SMS" and agent_id is not None:
            payload = operation_json(cast(Operation, child), base="")
            transaction.on_commit(lambda payload=payload: deliver_by_sms(payload))
    transaction.on_commit(_RampEvents(events))
    # One delta for the batch, as devicecontrol's hooks would record (bulk_progress_apply).
    _insert_delta(bulk.pk, {"pending": len(found) - failed, "failed": failed})
    metrics.operations_created({"PENDING": len(found) - failed, "FAILED": failed})
    return len(rows)


def _create_children_orm(bulk: BulkOperation, start: int, end: int, now: datetime) -> int:
    """Any other database (SQLite): the children through devicecontrol's batched create."""
    device_ids = list(
        BulkOperationTarget.objects.filter(
            bulk_operation=bulk, position__gte=start, position__lt=end
        )
        .order_by("position")
        .values_list("device_id", flat=True)
    )
    existing = ManagedObject.objects.in_bulk(device_ids)
    devices = [existing[device_id] for device_id in device_ids if device_id in existing]
    bulk.dropped += len(device_ids) - len(devices)  # devices deleted since the snapshot
    if devices:
        operations_create_many(
            devices=devices,
            data=bulk.operation_prototype,
            bulk_operation_id=bulk.pk,
            no_agent_reason=NO_AGENT_REASON,
            now=now,
        )
    return len(device_ids)


def _advance_one(bulk: BulkOperation, now: datetime, batch_size: int) -> int:
    if bulk.abort_config is not None and bulk_operation_abort_check(bulk=bulk, now=now):
        return 0  # aborted (bulkops.abort): no batch after the threshold is crossed
    rollout.before_advance(bulk, now)
    end = min(_due_end(bulk, now), bulk.next_index + batch_size, rollout.advance_limit(bulk))
    create = _create_children if connection.vendor == "postgresql" else _create_children_orm
    lag, count = now - bulk.next_due_at, create(bulk, bulk.next_index, end, now)
    metrics.bulk_ramp_advanced(lag_seconds=lag.total_seconds(), created=count)
    bulk.next_index = end
    if bulk.next_index >= bulk.target_count:
        bulk.status = BulkStatus.COMPLETED
        bulk.next_due_at = None
    else:
        bulk.status = BulkStatus.IN_PROGRESS
        bulk.next_due_at = _due_at(bulk, bulk.next_index)
        rollout.after_advance(bulk)  # a rate increase, the end of a wave
    # It advanced: an earlier failure is over.
    bulk.ramp_error, bulk.ramp_error_at, bulk.ramp_error_count = None, None, 0
    bulk.save(
        update_fields=[
            "next_index",
            "status",
            "next_due_at",
            "dropped",
            "ramp_error",
            "ramp_error_at",
            "ramp_error_count",
            *rollout.RAMP_FIELDS,
        ]
    )
    bulk_changed(bulk.pk)
    return count


def ramp_retry_delay(attempts: int) -> timedelta:
    """How long the ramp leaves a bulk operation alone after `attempts` failures in a row."""
    seconds = RAMP_RETRY_FIRST_SECONDS * 2 ** min(max(attempts - 1, 0), 20)
    return timedelta(seconds=min(seconds, RAMP_RETRY_MAX_SECONDS))


def _failure_reason(exc: BaseException) -> str:
    reason = exc.message if isinstance(exc, ApiError) else f"{type(exc).__name__}: {exc}"
    return reason[:RAMP_ERROR_MAX_CHARS]


def _record_ramp_error(
    bulk_id: int, exc: Exception, now: datetime, tried_index: int | None
) -> timedelta | None:
    """Store the failure on the bulk operation and push its next due time out by the back-off, in
    a transaction of its own (the failed one is rolled back). Nothing is recorded if the bulk
    operation moved on meanwhile (another worker advanced, or it was cancelled). Returns the delay."""
    with transaction.atomic():
        rows = BulkOperation.objects.select_for_update().filter(
            pk=bulk_id, status__in=RUNNING_STATUSES, next_due_at__isnull=False
        )  # not one paused meanwhile
        if tried_index is not None:
            rows = rows.filter(next_index=tried_index)
        # Only these columns: the row may hold values that cannot be read back (that may be
        # the very failure).
        attempts = rows.values_list("ramp_error_count", flat=True).first()
        if attempts is None:
            return None
        delay = ramp_retry_delay(attempts + 1)
        BulkOperation.objects.filter(pk=bulk_id).update(
            ramp_error=_failure_reason(exc),
            ramp_error_at=now,
            ramp_error_count=attempts + 1,
            next_due_at=_later(now, delay),
        )
        bulk_changed(bulk_id)  # c8y_RampError
    return delay


def _advance_all(
    now: datetime | None,
    batch_size: int,
    processed: Counter[int],
    latest: dict[int, BulkOperation],
    failed: set[int],
) -> None:
    while True:
        moment = now or timezone.now()
        claimed: int | None = None
        tried_index: int | None = None
        try:
            with transaction.atomic():
                # The ID alone first: a row that cannot even be loaded is still isolated.
                claimed = (
                    BulkOperation.objects.select_for_update(skip_locked=True)
                    .filter(status__in=RUNNING_STATUSES, next_due_at__lte=moment)
                    .exclude(pk__in=failed)
                    .order_by("next_due_at", "pk")
                    .values_list("pk", flat=True)
                    .first()
                )
                if claimed is None:
                    return
                bulk = BulkOperation.objects.get(pk=claimed)  # locked by the claim
                if now is None:
                    # The claim may have waited for the lock (SQLite locks the whole database):
                    # what is due, and an abort's time, are decided as of holding it.
                    moment = timezone.now()
                tried_index = bulk.next_index
                count = _advance_one(bulk, moment, batch_size)
            if bulk.status == BulkStatus.DELETED and bulk.pending_fail is not None:
                _fail_pending_after_abort(claimed, now)
        except Exception as exc:
            if claimed is None:
                raise  # the claim itself failed: nothing to set aside
            failed.add(claimed)
            delay = _record_ramp_error(claimed, exc, moment, tried_index)
            logger.warning(
                "Bulk ramp: bulk operation %s failed (%s); %s",
                claimed,
                _failure_reason(exc),
                f"retried in {delay.total_seconds():g} s" if delay else "it moved on meanwhile",
                exc_info=not isinstance(exc, ApiError),
            )
            continue
        processed[claimed] += count
        latest[claimed] = bulk


def _fail_pending_after_abort(bulk_id: int, now: datetime | None) -> None:
    """The ramp just committed an abort: its PENDING children are failed in batches of their own,
    by a task of their own when this runs in a worker (the ramp goes on with the other bulk
    operations meanwhile), here otherwise (bulkops.abort `bulk_pending_fail_after_stop`). A
    failure here is logged; beat's sweep finishes them once the lease expired."""
    try:
        bulk_pending_fail_after_stop(bulk_operation_id=bulk_id, now=now)
    except Exception:
        logger.exception("Bulk operation %s: failing its PENDING children failed", bulk_id)


def bulk_operations_advance(
    *, now: datetime | None = None, batch_size: int = RAMP_BATCH_SIZE
) -> int:
    """Create every child operation due at `now`, `batch_size` per transaction. Returns the number
    of targets processed. Safe to run in several workers at once (SKIP LOCKED).

    Each batch is a transaction of its own. One that fails, for any reason (a stored prototype
    that today's validation refuses, a device deleted while its child was being inserted, ...),
    is rolled back and recorded on its bulk operation (`c8y_RampError`), which is then left alone
    for `ramp_retry_delay` and skipped for the rest of this run: it never stops the others.
    A committed batch's events are published while the next batch is being written; all of them
    are out when this returns."""
    processed: Counter[int] = Counter()  # targets processed per bulk operation in this run
    latest: dict[int, BulkOperation] = {}
    failed: set[int] = set()
    with _background_publishing():
        _advance_all(now, batch_size, processed, latest, failed)
    total = processed.total()
    # One line per run that did something; an idle tick (every BULK_RAMP_INTERVAL) logs nothing.
    if latest:
        logger.info(
            "Bulk ramp: %d target(s) processed: %s",
            total,
            "; ".join(
                f"bulk operation {pk} +{processed[pk]}, {bulk.next_index} of "
                f"{bulk.target_count} ({bulk.status})"
                for pk, bulk in sorted(latest.items())
            ),
        )
    return total


def bulk_operations_due_count(*, now: datetime | None = None, limit: int = 100) -> int:
    """How many running bulk operations are due at `now`, counting up to `limit`."""
    due = BulkOperation.objects.filter(
        status__in=RUNNING_STATUSES, next_due_at__lte=now or timezone.now()
    )
    return len(due.values_list("pk", flat=True)[:limit])


def bulk_operations_next_due() -> datetime | None:
    """When the ramp next has something to do: the earliest due time of a running bulk operation
    (its partial index answers this), None when none is running."""
    return (
        BulkOperation.objects.filter(status__in=RUNNING_STATUSES, next_due_at__isnull=False)
        .order_by("next_due_at")
        .values_list("next_due_at", flat=True)
        .first()
    )


# --- progress ----------------------------------------------------------------------------------

COUNTER_FIELDS = {
    OperationStatus.PENDING: "pending",
    OperationStatus.EXECUTING: "executing",
    OperationStatus.SUCCESSFUL: "successful",
    OperationStatus.FAILED: "failed",
}


def bulk_progress_apply(changes: list[StatusChange]) -> None:
    """devicecontrol STATUS_CHANGE_HOOKS: record the counter changes in the changing transaction,
    as one `BulkProgressDelta` row per bulk operation. An INSERT only: the bulk operation's row is
    neither written nor locked, so agents changing children of one bulk operation at once do not
    wait for each other (nor for the ramp, which holds that row while it creates children)."""
    deltas: dict[int, Counter[str]] = defaultdict(Counter)
    for change in changes:
        if change.old is not None:
            deltas[change.bulk_operation_id][COUNTER_FIELDS[change.old]] -= 1
        if change.new is not None:
            deltas[change.bulk_operation_id][COUNTER_FIELDS[change.new]] += 1
    rows = [
        (bulk_id, *(delta[field] for field in COUNTER_FIELDS.values()))
        for bulk_id, delta in sorted(deltas.items())
        if any(delta.values())
    ]
    _insert_deltas(rows)
    for row in rows:
        bulk_changed(row[0])  # marks it dirty once this commits (bulkops.live)


def _insert_delta(bulk_id: int, delta: dict[str, int]) -> None:
    _insert_deltas([(bulk_id, *(delta.get(field, 0) for field in COUNTER_FIELDS.values()))])


def _insert_deltas(rows: list[tuple[int, ...]]) -> None:
    if rows:
        # A plain multi-row INSERT: this runs in every status change of a bulk child, and the
        # ORM's bulk_create cost about 1 ms of CPU more per change.
        table = BulkProgressDelta._meta.db_table
        columns = ", ".join(f'"{name}"' for name in ("bulk_operation_id", *COUNTER_FIELDS.values()))
        values = ", ".join(["(%s, %s, %s, %s, %s)"] * len(rows))
        sql = f'INSERT INTO "{table}" ({columns}) VALUES {values}'  # noqa: S608 (our names only)
        with connection.cursor() as cursor:
            cursor.execute(sql, [value for row in rows for value in row])


def _fold_one(bulk_id: int, batch_size: int) -> int | None:
    """Fold up to `batch_size` deltas of one bulk operation into its row, in one transaction
    under its row lock (SKIP LOCKED: None if someone holds it). Returns the deltas folded. A
    reader's single statement sees either the row before and the deltas, or the row after and
    not them: reads stay exact while this runs."""
    with transaction.atomic():
        locked = (
            BulkOperation.objects.select_for_update(skip_locked=True)
            .filter(pk=bulk_id)
            .values_list("pk", flat=True)
            .first()
        )
        if locked is None and BulkOperation.objects.filter(pk=bulk_id).exists():
            return None
        rows = list(
            BulkProgressDelta.objects.filter(bulk_operation_id=bulk_id)
            .order_by("pk")
            .values_list("pk", *COUNTER_FIELDS.values())[:batch_size]
        )
        if not rows:
            return 0
        if locked is not None:  # deltas of a bulk operation deleted meanwhile just go
            sums = dict.fromkeys(COUNTER_FIELDS.values(), 0)
            for row in rows:
                for field, value in zip(COUNTER_FIELDS.values(), row[1:], strict=True):
                    sums[field] += value
            updates = {field: F(field) + value for field, value in sums.items() if value}
            if updates:
                BulkOperation.objects.filter(pk=bulk_id).update(**updates)
        BulkProgressDelta.objects.filter(pk__in=[row[0] for row in rows]).delete()
    return len(rows)


def bulk_progress_fold(*, batch_size: int = 5000) -> int:
    """Fold every committed progress delta into its bulk operation's counters (the beat task runs
    this after the ramp). Each bulk operation in transactions of its own, `batch_size` deltas
    each; one locked by the ramp or another folder is left for the next run. Idempotent and safe
    in several workers at once. Returns the number of deltas folded."""
    bulk_ids = list(
        BulkProgressDelta.objects.order_by("bulk_operation_id")
        .values_list("bulk_operation_id", flat=True)
        .distinct()
    )
    total = 0
    for bulk_id in bulk_ids:
        while True:
            folded = _fold_one(bulk_id, batch_size)
            total += folded or 0
            if folded is None or folded < batch_size:
                break
    return total
