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

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from bulkops.models import (
    RUNNING_STATUSES,
    BulkOperation,
    BulkOperationTarget,
    BulkProgressDelta,
    BulkStatus,
)
from devicecontrol.models import Operation, OperationStatus
from devicecontrol.services import (
    StatusChange,
    operation_prototype_validate,
    operations_create_many,
)
from deviceplatform.api.dates import parse_datetime
from deviceplatform.api.exceptions import ApiError, MissingFields, NotFound, ValidationFailed
from deviceplatform.api.params import parse_id
from inventory.models import ManagedObject
from inventory.query import parse_query
from inventory.selectors import has_parent_q

logger = logging.getLogger(__name__)

NO_AGENT_REASON = "Device is not in the childDevices hierarchy of any agent"
INVALID = "devicecontrol/Invalid Data"
RAMP_ERROR_KEY = "c8y_RampError"
READ_ONLY_KEYS = frozenset({"id", "self", "status", "generalStatus", "progress", RAMP_ERROR_KEY})
# A bulk operation whose ramp failed is tried again after 5 s, then 10, 20, ... at most 10 min.
RAMP_RETRY_FIRST_SECONDS = 5
RAMP_RETRY_MAX_SECONDS = 600
RAMP_ERROR_MAX_CHARS = 1000
SELECTOR_KEYS = ("groupId", "failedParentId", "failedBulkOperationId")
KNOWN_KEYS = frozenset(
    {*READ_ONLY_KEYS, *SELECTOR_KEYS, "startDate", "creationRamp", "operationPrototype"}
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


# --- schedule ----------------------------------------------------------------------------------


MICROSECOND = timedelta(microseconds=1)
# Where a schedule runs past what a date-time can hold (creationRamp up to 10^7 s times many
# targets): those positions are never due.
NEVER = datetime(9999, 12, 31, tzinfo=UTC)


def _due_offset(bulk: BulkOperation, position: int) -> int:
    """Microseconds from `effective_start` to the due time of `position`: the one schedule, in
    integers, that both the due time (`_due_at`) and the due count (`_due_end`) come from. The ramp
    is rounded to whole microseconds once, so position k is due exactly k ramps after the start."""
    return (position - bulk.first_index) * round(bulk.creation_ramp * 1_000_000)


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
    missing = [
        key for key in ("startDate", "creationRamp", "operationPrototype") if key not in data
    ]
    selector = _selector(data)
    if selector is None:
        missing.append("groupId")
    if missing:
        raise MissingFields(missing)
    start, ramp, prototype = (
        _start(data["startDate"]),
        _ramp(data["creationRamp"]),
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
    now = now or timezone.now()
    return BulkPreview(
        target_count=len(_targets(selector)), start=max(start, now), creation_ramp=ramp
    )


@transaction.atomic
def bulk_operation_create(*, data: dict[str, Any], now: datetime | None = None) -> BulkOperation:
    """Validate, snapshot the targets, store ACTIVE/SCHEDULED (bulkoperations.md §2)."""
    selector, start, ramp, prototype = _create_input(data)
    device_ids = _targets(selector)
    now = now or timezone.now()
    bulk = BulkOperation(
        start_date=start,
        creation_ramp=ramp,
        operation_prototype=prototype,
        fragments=_extra_fragments(data),
        creation_time=now,
        last_updated=now,
        effective_start=max(start, now),
    )
    _store_selector(bulk, selector)
    _schedule(bulk, now)
    bulk.save(force_insert=True)
    _replace_targets(bulk, device_ids, skip=set())
    bulk.save(update_fields=["target_count"])
    return bulk


def _lock_running(
    bulk_operation_id: int,
    verb: str,
    precondition: Callable[[BulkOperation], None] | None = None,
) -> BulkOperation:
    """The bulk operation, row-locked; 404 if unknown, then `precondition` (`If-Match`), then
    422 unless ACTIVE or IN_PROGRESS."""
    bulk = BulkOperation.objects.select_for_update().filter(pk=bulk_operation_id).first()
    if bulk is None:
        raise bulk_operation_not_found(bulk_operation_id)
    if precondition is not None:
        precondition(bulk)
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
    now = now or timezone.now()
    with transaction.atomic():
        bulk = _lock_running(bulk_operation_id, "changed", precondition)
        if start is not None:
            bulk.start_date = start
        if ramp is not None:
            bulk.creation_ramp = ramp
        if prototype is not None:
            bulk.operation_prototype = prototype
        bulk.fragments = {**bulk.fragments, **_extra_fragments(data)}
        if selector is not None:
            processed = set(
                BulkOperationTarget.objects.filter(
                    bulk_operation=bulk, position__lt=bulk.next_index
                ).values_list("device_id", flat=True)
            )
            _store_selector(bulk, selector)
            _replace_targets(bulk, _targets(selector), skip=processed)
        _schedule(bulk, now)
        bulk.last_updated = now
        bulk.save()
    return bulk


def bulk_operation_cancel(
    *,
    bulk_operation_id: int,
    now: datetime | None = None,
    precondition: Callable[[BulkOperation], None] | None = None,
) -> BulkOperation:
    """DELETE (bulkoperations.md §10): no further children; existing ones keep their status."""
    with transaction.atomic():
        bulk = _lock_running(bulk_operation_id, "cancelled", precondition)
        bulk.status = BulkStatus.DELETED
        bulk.next_due_at = None
        bulk.last_updated = now or timezone.now()
        bulk.save(update_fields=["status", "next_due_at", "last_updated"])
    return bulk


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


def _advance_one(bulk: BulkOperation, now: datetime, batch_size: int) -> int:
    end = min(_due_end(bulk, now), bulk.next_index + batch_size)
    device_ids = list(
        BulkOperationTarget.objects.filter(
            bulk_operation=bulk, position__gte=bulk.next_index, position__lt=end
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
    bulk.next_index = end
    if bulk.next_index >= bulk.target_count:
        bulk.status = BulkStatus.COMPLETED
        bulk.next_due_at = None
    else:
        bulk.status = BulkStatus.IN_PROGRESS
        bulk.next_due_at = _due_at(bulk, bulk.next_index)
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
        ]
    )
    return len(device_ids)


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
            pk=bulk_id, status__in=RUNNING_STATUSES
        )
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
    return delay


def bulk_operations_advance(*, now: datetime | None = None, batch_size: int = 500) -> int:
    """Create every child operation due at `now`, `batch_size` per transaction. Returns the number
    of targets processed. Safe to run in several workers at once (SKIP LOCKED).

    Each batch is a transaction of its own. One that fails, for any reason (a stored prototype
    that today's validation refuses, a device deleted while its child was being inserted, ...),
    is rolled back and recorded on its bulk operation (`c8y_RampError`), which is then left alone
    for `ramp_retry_delay` and skipped for the rest of this run: it never stops the others."""
    processed: Counter[int] = Counter()  # targets processed per bulk operation in this run
    latest: dict[int, BulkOperation] = {}
    failed: set[int] = set()
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
                    break
                bulk = BulkOperation.objects.get(pk=claimed)  # locked by the claim
                tried_index = bulk.next_index
                count = _advance_one(bulk, moment, batch_size)
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
