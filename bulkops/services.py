"""Every bulk-operation write, and the ramp that turns a bulk operation into child operations.

The ramp (`bulk_operations_advance`) claims one due bulk operation at a time with
`FOR UPDATE SKIP LOCKED`, creates its due children through devicecontrol's batched create in the
same transaction that moves `next_index`, and commits. A worker killed mid-batch rolls the whole
batch back; two workers never hold the same bulk operation; and a unique constraint on
(bulk operation, device) makes a second child for a device impossible even if all that failed."""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from bulkops.models import RUNNING_STATUSES, BulkOperation, BulkOperationTarget, BulkStatus
from devicecontrol.models import Operation, OperationStatus
from devicecontrol.services import (
    StatusChange,
    operation_prototype_validate,
    operations_create_many,
)
from deviceplatform.api.dates import parse_datetime
from deviceplatform.api.exceptions import MissingFields, NotFound, ValidationFailed
from deviceplatform.api.params import parse_id
from inventory.models import ManagedObject
from inventory.query import parse_query
from inventory.selectors import has_parent_q

logger = logging.getLogger(__name__)

NO_AGENT_REASON = "Device is not in the childDevices hierarchy of any agent"
INVALID = "devicecontrol/Invalid Data"
READ_ONLY_KEYS = frozenset({"id", "self", "status", "generalStatus", "progress"})
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
    return list(
        Operation.objects.filter(bulk_operation_id=target_id, status=OperationStatus.FAILED)
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


def _due_at(bulk: BulkOperation, position: int) -> datetime:
    return bulk.effective_start + timedelta(
        seconds=(position - bulk.first_index) * bulk.creation_ramp
    )


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


@transaction.atomic
def bulk_operation_create(*, data: dict[str, Any], now: datetime | None = None) -> BulkOperation:
    """Validate, snapshot the targets, store ACTIVE/SCHEDULED (bulkoperations.md §2)."""
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
    """One past the last position due at `now`."""
    if now < bulk.effective_start:
        return bulk.next_index
    if bulk.creation_ramp == 0:
        return bulk.target_count
    elapsed = (now - bulk.effective_start).total_seconds()
    due = bulk.first_index + math.floor(elapsed / bulk.creation_ramp + 1e-9) + 1
    return min(bulk.target_count, due)


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
    bulk.save(update_fields=["next_index", "status", "next_due_at", "dropped"])
    return len(device_ids)


def bulk_operations_advance(*, now: datetime | None = None, batch_size: int = 500) -> int:
    """Create every child operation due at `now`, `batch_size` per transaction. Returns the number
    of targets processed. Safe to run in several workers at once (SKIP LOCKED)."""
    processed: Counter[int] = Counter()  # targets processed per bulk operation in this run
    latest: dict[int, BulkOperation] = {}
    while True:
        moment = now or timezone.now()
        with transaction.atomic():
            bulk = (
                BulkOperation.objects.select_for_update(skip_locked=True)
                .filter(status__in=RUNNING_STATUSES, next_due_at__lte=moment)
                .order_by("next_due_at", "pk")
                .first()
            )
            if bulk is None:
                break
            processed[bulk.pk] += _advance_one(bulk, moment, batch_size)
            latest[bulk.pk] = bulk
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
    """devicecontrol STATUS_CHANGE_HOOKS: move the counters in the changing transaction."""
    deltas: dict[int, Counter[str]] = defaultdict(Counter)
    for change in changes:
        if change.old is not None:
            deltas[change.bulk_operation_id][COUNTER_FIELDS[change.old]] -= 1
        if change.new is not None:
            deltas[change.bulk_operation_id][COUNTER_FIELDS[change.new]] += 1
    for bulk_id, delta in sorted(deltas.items()):
        updates = {field: F(field) + value for field, value in delta.items() if value}
        if updates:
            BulkOperation.objects.filter(pk=bulk_id).update(**updates)
