"""Every operation write: validate, lock, save, then register the realtime event on commit; and the
device registration requests with the credentials polls of Cumulocity's bootstrap flow (at the end).

State changes lock the row (`select_for_update`), so concurrent agents never lose an update; sweepers
claim their rows with `FOR UPDATE SKIP LOCKED` in batches (shared/PERFORMANCE.md §4)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from django.conf import settings
from django.db import IntegrityError, NotSupportedError, transaction
from django.db.models import DurationField, F, Func, QuerySet
from django.utils import timezone

from devicecontrol.delivery import deliver_by_sms, is_sms
from devicecontrol.models import (
    FINAL_STATUSES,
    NewDeviceRequest,
    NewDeviceRequestStatus,
    Operation,
    OperationStatus,
)
from devicecontrol.realtime import OperationEvent
from devicecontrol.serializers import (
    EXTENSION_KEYS,
    READ_ONLY_KEYS,
    BulkDeviceRow,
    operation_json,
)
from deviceplatform import metrics
from deviceplatform.api.dates import format_datetime
from deviceplatform.api.exceptions import (
    ApiError,
    Conflict,
    MissingFields,
    NotFound,
    ValidationFailed,
)
from deviceplatform.realtime.events import publish_on_commit
from deviceplatform.services import (
    device_user_provision,
    device_username,
    non_device_account,
    validate_device_id,
)
from inventory import services as inventory_services
from inventory.models import ExternalId, ManagedObject, Relation
from inventory.selectors import device_agent_id, devices_agent_ids, has_parent_q

logger = logging.getLogger(__name__)

FORBIDDEN_NAME_CHARS = frozenset(".$ \t\r\n")
MAX_TIMEOUT_SECONDS = 2**31 - 1  # Operation.execution_timeout is a PostgreSQL integer
EXPIRED_REASON = "Operation expired: it was still PENDING after {seconds} seconds"
TIMED_OUT_REASON = "Operation timed out: it was EXECUTING for more than {seconds} seconds"
# Cancel (README "Cancel that reaches the device"): a PENDING operation fails at once with this
# reason; an EXECUTING one gets the request fragment and its agent decides.
CANCELLED_REASON = "Cancelled by {by}"
CANCEL_REQUESTED = "c8y_CancelRequested"
# Automatic retries (README "Automatic retries"): `retryConfig` on an operation, or top-level on
# a bulk operation for its children.
RETRY_CONFIG = "retryConfig"
RETRY_FAILURE_TYPES = ("FAILED", "TIMED_OUT")
RETRY_CONFIG_KEYS = frozenset({"criteria", "backoffSeconds", "backoffFactor"})
MAX_RETRIES = 100
MAX_BACKOFF_SECONDS = 7 * 24 * 3600  # the first back-off, and the cap of every later one
MAX_BACKOFF_FACTOR = 10
DEFAULT_BACKOFF_SECONDS = 60
DEFAULT_BACKOFF_FACTOR = 2


@dataclass(frozen=True)
class StatusChange:
    """One operation of a bulk operation entering (`old` None), leaving (`new` None) or changing
    status. Bulk operations keep their progress counters from these (bulkops registers a hook).
    Only a device's latest attempt counts: a superseded one (retried) sends none."""

    bulk_operation_id: int
    old: str | None
    new: str | None


# Called inside the changing transaction, so counters commit (or roll back) with the change. Apps
# above devicecontrol register here; devicecontrol never imports them (STYLE.md §1).
STATUS_CHANGE_HOOKS: list[Callable[[list[StatusChange]], None]] = []
# The retry policy of operations without their own `retryConfig`, by bulk operation ID: bulkops
# registers one that gives each running or completed bulk operation's top-level `retryConfig`
# (bulkops/retries.py). Asked when an attempt fails and again when its retry is due.
BULK_RETRY_CONFIGS: list[Callable[[set[int]], dict[int, dict[str, Any]]]] = []
# The bulk operations whose children's due automatic retries wait: bulkops registers one that
# gives the paused ones (a paused rollout creates nothing until resumed; README "Automatic
# retries"). Their retries stay booked and are created by the first sweep after the resume.
BULK_RETRIES_HELD: list[Callable[[], set[int]]] = []


def _counted(operation: Operation) -> int | None:
    """The bulk operation whose progress counts `operation`: none once a retry superseded it."""
    return None if operation.superseded else operation.bulk_operation_id


def _status_changed(changes: Iterable[tuple[int | None, str | None, str | None]]) -> None:
    relevant = [
        StatusChange(bulk_id, old, new)
        for bulk_id, old, new in changes
        if bulk_id is not None and old != new
    ]
    if relevant:
        for hook in STATUS_CHANGE_HOOKS:
            hook(relevant)


def operation_not_found(pk: object) -> NotFound:
    return NotFound(
        f"Finding device data from database failed : No operation for gid '{pk}'!",
        error="devicecontrol/Not Found",
    )


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def retry_config_validate(value: object, *, field: str = RETRY_CONFIG) -> dict[str, Any]:
    """A `retryConfig` as given (422 naming what is wrong): `criteria`, a non-empty list of
    `{"failureType": "FAILED" | "TIMED_OUT", "numberOfRetries": 0..100}` (each type once);
    optional `backoffSeconds` (0 .. 7 days, default 60) and `backoffFactor` (1 .. 10, default
    2). No other keys."""

    def refuse(message: str) -> ValidationFailed:
        return ValidationFailed(f"{field}: {message}", error="devicecontrol/Invalid Data")

    if not isinstance(value, dict):
        raise refuse("must be a JSON object")
    unknown = sorted(set(value) - RETRY_CONFIG_KEYS)
    if unknown:
        raise refuse(
            f"unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(RETRY_CONFIG_KEYS))}"
        )
    criteria = value.get("criteria")
    if not isinstance(criteria, list) or not criteria:
        raise refuse("criteria must be a non-empty list")
    seen: set[str] = set()
    for criterion in criteria:
        if not isinstance(criterion, dict) or set(criterion) != {
            "failureType",
            "numberOfRetries",
        }:
            raise refuse('each criterion is {"failureType": ..., "numberOfRetries": ...}')
        failure_type = criterion["failureType"]
        if failure_type not in RETRY_FAILURE_TYPES:
            raise refuse(
                f"failureType {failure_type!r} is not one of {', '.join(RETRY_FAILURE_TYPES)}"
            )
        if failure_type in seen:
            raise refuse(f"failureType {failure_type} is given twice")
        seen.add(failure_type)
        retries = criterion["numberOfRetries"]
        if (
            not isinstance(retries, int)
            or isinstance(retries, bool)
            or not 0 <= retries <= MAX_RETRIES
        ):
            raise refuse(f"numberOfRetries must be a whole number from 0 to {MAX_RETRIES}")
    seconds = value.get("backoffSeconds", DEFAULT_BACKOFF_SECONDS)
    if not _number(seconds) or not 0 <= seconds <= MAX_BACKOFF_SECONDS:
        raise refuse(f"backoffSeconds must be a number from 0 to {MAX_BACKOFF_SECONDS}")
    factor = value.get("backoffFactor", DEFAULT_BACKOFF_FACTOR)
    if not _number(factor) or not 1 <= factor <= MAX_BACKOFF_FACTOR:
        raise refuse(f"backoffFactor must be a number from 1 to {MAX_BACKOFF_FACTOR}")
    return value


def _fragments(data: dict[str, Any]) -> dict[str, Any]:
    fragments: dict[str, Any] = {}
    for key, value in data.items():
        if key in READ_ONLY_KEYS:
            continue
        if not key or FORBIDDEN_NAME_CHARS & set(key):
            raise ValidationFailed(
                f"Invalid fragment name {key!r}: names may not contain '.', '$' or whitespace"
            )
        if key in EXTENSION_KEYS and value is not None and not _is_positive_int(value):
            raise ValidationFailed(f"{key} must be a whole number of seconds, at least 1")
        if key in EXTENSION_KEYS and value is not None and value > MAX_TIMEOUT_SECONDS:
            raise ValidationFailed(f"{key} must be at most {MAX_TIMEOUT_SECONDS} seconds")
        if key == RETRY_CONFIG and value is not None:
            retry_config_validate(value)
        fragments[key] = value
    return fragments


def operation_prototype_validate(data: dict[str, Any]) -> dict[str, Any]:
    """The fragments an operation created from `data` would get (bulk prototypes are checked when
    the bulk operation is stored, not once per child)."""
    return _fragments(data)


def _status(value: object) -> OperationStatus:
    if not isinstance(value, str) or value not in OperationStatus.values:
        raise ValidationFailed(
            f"Invalid status {value!r}; expected one of {', '.join(OperationStatus.values)}",
            error="devicecontrol/Invalid Data",
        )
    return OperationStatus(value)


def _event(action: str, operation: Operation, *, to_agent: bool = False) -> OperationEvent:
    data: dict[str, Any] | str = (
        str(operation.pk) if action == "DELETE" else operation_json(operation, base="")
    )
    return OperationEvent(
        action=action,  # type: ignore[arg-type]
        operation_id=operation.pk,
        device_id=operation.device_id,
        agent_id=operation.agent_id,
        data=data,
        to_agent=to_agent,
    )


def _retry_configs(operations: Sequence[Operation]) -> dict[int, dict[str, Any]]:
    """The retry policy of each operation that has one, by operation ID: its own `retryConfig`,
    else its bulk operation's (BULK_RETRY_CONFIGS). A stored policy that no longer validates
    counts as none."""
    configs: dict[int, dict[str, Any]] = {}
    bulk_ids: set[int] = set()
    for operation in operations:
        own = operation.fragments.get(RETRY_CONFIG)
        if own is not None:
            configs[operation.pk] = own
        elif operation.bulk_operation_id is not None:
            bulk_ids.add(operation.bulk_operation_id)
    if bulk_ids:
        by_bulk: dict[int, dict[str, Any]] = {}
        for source in BULK_RETRY_CONFIGS:
            by_bulk.update(source(bulk_ids))
        for operation in operations:
            if operation.pk not in configs and operation.bulk_operation_id in by_bulk:
                configs[operation.pk] = by_bulk[operation.bulk_operation_id]
    valid = {}
    for pk, config in configs.items():
        try:
            valid[pk] = retry_config_validate(config)
        except ValidationFailed:
            continue
    return valid


def retry_due_at(
    config: dict[str, Any], *, failure_type: str, attempt: int, now: datetime
) -> datetime | None:
    """When attempt number `attempt`, failed with `failure_type`, is retried under `config`:
    `now + backoffSeconds * backoffFactor ** (attempt - 1)` (at most 7 days), or None once the
    criterion of that type allows no more (`numberOfRetries` counts every retry of the device's
    operation, whatever failed before)."""
    allowed = next(
        (
            criterion["numberOfRetries"]
            for criterion in config["criteria"]
            if criterion["failureType"] == failure_type
        ),
        0,
    )
    if attempt > allowed:
        return None
    seconds = config.get("backoffSeconds", DEFAULT_BACKOFF_SECONDS) * config.get(
        "backoffFactor", DEFAULT_BACKOFF_FACTOR
    ) ** (attempt - 1)
    return now + timedelta(seconds=min(seconds, MAX_BACKOFF_SECONDS))


def _book_retries(operations: Sequence[Operation], failure_type: str, now: datetime) -> None:
    """Set `retry_at` (in memory; the caller saves) on each of `operations`, which just became
    FAILED with `failure_type`, whose retry policy allows another attempt. Never for a superseded
    attempt or one whose cancel was requested (a cancel is never retried)."""
    candidates = [
        operation
        for operation in operations
        if not operation.superseded and CANCEL_REQUESTED not in operation.fragments
    ]
    configs = _retry_configs(candidates)
    for operation in candidates:
        config = configs.get(operation.pk)
        operation.retry_at = (
            None
            if config is None
            else retry_due_at(config, failure_type=failure_type, attempt=operation.attempt, now=now)
        )


def _pending_deadline(fragments: dict[str, Any], now: datetime) -> datetime | None:
    seconds = fragments.get("pendingTimeout") or settings.OPERATION_PENDING_TIMEOUT
    return now + timedelta(seconds=seconds) if seconds else None


@transaction.atomic
def operation_create(
    *,
    device: ManagedObject,
    data: dict[str, Any],
    bulk_operation_id: int | None = None,
    retry_of: Operation | None = None,
    notify: bool = True,
    now: datetime | None = None,
    agent_id: int | None = None,
    attempt: int = 1,
) -> Operation:
    """Create a PENDING operation for `device`, routed to the agent above it (devicecontrol.md §4,
    §6): 422 when no agent is found. `status` and other read-only keys in `data` are ignored.
    `agent_id`: that agent when the caller read it with the device already
    (`inventory.selectors.managed_object_with_agent`); None: resolved here."""
    fragments = _fragments(data)
    if agent_id is None:
        agent_id = device_agent_id(device=device)
    if agent_id is None:
        raise ValidationFailed(
            f"Device {device.pk} is not in the childDevices hierarchy of any agent "
            "(com_cumulocity_model_Agent)",
            error="devicecontrol/Invalid Data",
        )
    now = now or timezone.now()
    fragments = {key: value for key, value in fragments.items() if value is not None}
    sms = is_sms(fragments=fragments, device_fragments=device.fragments)
    if sms:
        fragments.setdefault("deliveryType", "SMS")
    operation = Operation(
        device=device,
        agent_id=agent_id,
        status=OperationStatus.PENDING,
        creation_time=now,
        status_changed_at=now,
        fragments=fragments,
        bulk_operation_id=bulk_operation_id,
        retry_of=retry_of,
        attempt=attempt,
        expires_at=_pending_deadline(fragments, now),
        execution_timeout=fragments.get("executionTimeout"),
    )
    operation.save(force_insert=True)
    _status_changed([(bulk_operation_id, None, operation.status)])
    metrics.operations_created({operation.status: 1})
    if notify:
        publish_on_commit([_event("CREATE", operation)])
    if sms:
        payload = operation_json(operation, base="")
        transaction.on_commit(lambda: deliver_by_sms(payload))
    return operation


@transaction.atomic
def operation_update(
    *,
    operation_id: int,
    data: dict[str, Any],
    notify: bool = True,
    now: datetime | None = None,
    precondition: Callable[[Operation], None] | None = None,
) -> Operation:
    """Apply a PUT body (devicecontrol.md §7) under a row lock: `status` required, `failureReason`
    only with FAILED and dropped when leaving FAILED, fragments replaced per key (`null` removes).
    `precondition` (the request's `If-Match`) is checked against the locked row."""
    if "status" not in data:
        raise MissingFields(["status"])
    status = _status(data["status"])
    reason = data.get("failureReason")
    if "failureReason" in data and reason is not None:
        if status != OperationStatus.FAILED:
            raise ValidationFailed(
                "failureReason is only allowed when the status is FAILED",
                error="devicecontrol/Invalid Data",
            )
        if not isinstance(reason, str):
            raise ValidationFailed("failureReason must be a string")
    fragments = _fragments(data)
    now = now or timezone.now()
    operation = Operation.objects.select_for_update().filter(pk=operation_id).first()
    if operation is None:
        raise operation_not_found(operation_id)
    if precondition is not None:
        precondition(operation)
    _status_changed([(_counted(operation), operation.status, status)])
    was_failed = operation.status == OperationStatus.FAILED
    metrics.operation_status_changed({status: 1} if status != operation.status else {})
    _apply_status(operation, status, now)
    if status == OperationStatus.FAILED:
        if reason is not None:
            operation.failure_reason = reason
    else:
        operation.failure_reason = None
    merged = dict(operation.fragments)
    for key, value in fragments.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    operation.fragments = merged
    if "executionTimeout" in fragments:
        operation.execution_timeout = fragments["executionTimeout"]
    if "pendingTimeout" in fragments and operation.status == OperationStatus.PENDING:
        # Counted from when the operation (last) became PENDING, not from its creation.
        operation.expires_at = _pending_deadline(merged, operation.status_changed_at)
    if status != OperationStatus.FAILED:
        operation.retry_at = None  # leaving FAILED: no retry of it any more
    elif not was_failed:
        _book_retries([operation], "FAILED", now)
    operation.save()
    if notify:
        publish_on_commit([_event("UPDATE", operation)])
    return operation


def _apply_status(operation: Operation, status: OperationStatus, now: datetime) -> None:
    """Set the status and the timestamps the sweepers read. Any transition is allowed (§7)."""
    if status != operation.status:
        operation.status_changed_at = now
        if status == OperationStatus.EXECUTING:
            operation.executing_since = now
    # Entering PENDING (again, e.g. FAILED -> PENDING) starts a fresh deadline from the change; a
    # PENDING -> PENDING update keeps the running one.
    if status == OperationStatus.PENDING and (
        status != operation.status or operation.expires_at is None
    ):
        operation.expires_at = _pending_deadline(operation.fragments, now)
    operation.status = status


def _restore_latest_attempts(pairs: set[tuple[int, int]]) -> None:
    """The latest attempts of these (bulk operation, device) pairs were just deleted: the attempt
    before each (the highest remaining ID), if any, is the latest again and counts again."""
    if not pairs:
        return
    candidates = (
        Operation.objects.select_for_update()
        .filter(
            bulk_operation_id__in={bulk_id for bulk_id, _ in pairs},
            device_id__in={device_id for _, device_id in pairs},
            superseded=True,
        )
        .order_by("pk")
        .values_list("pk", "bulk_operation_id", "device_id", "status")
    )
    latest = {
        (bulk_id, device_id): (pk, status)
        for pk, bulk_id, device_id, status in candidates
        if (bulk_id, device_id) in pairs
    }
    if latest:
        Operation.objects.filter(pk__in=[pk for pk, _ in latest.values()]).update(superseded=False)
        _status_changed((bulk_id, None, status) for (bulk_id, _), (_, status) in latest.items())


def operations_delete(*, queryset: QuerySet[Operation], notify: bool = True) -> int:
    """Delete the matching operations; one DELETE event per operation after commit (§8), all
    handed to the store at once."""
    with transaction.atomic():
        # Locked, so a concurrent PUT either finishes first (and may make a row no longer match)
        # or waits and then finds the row gone. In ID order: concurrent deletes lock alike (no
        # deadlock) and the DELETE events come in creation order.
        rows = list(
            queryset.select_for_update()
            .order_by("pk")
            .values_list("pk", "device_id", "agent_id", "bulk_operation_id", "status", "superseded")
        )
        if not rows:
            return 0
        Operation.objects.filter(pk__in=[row[0] for row in rows]).delete()
        _status_changed(
            (None if superseded else bulk_id, status, None)
            for _, _, _, bulk_id, status, superseded in rows
        )
        _restore_latest_attempts(
            {
                (bulk_id, device_id)
                for _, device_id, _, bulk_id, _, superseded in rows
                if bulk_id is not None and not superseded
            }
        )
        doomed = [(pk, device_id, agent_id) for pk, device_id, agent_id, *_ in rows]
        if notify:
            publish_on_commit(
                [
                    OperationEvent(
                        action="DELETE",
                        operation_id=pk,
                        device_id=device_id,
                        agent_id=agent_id,
                        data=str(pk),
                    )
                    for pk, device_id, agent_id in doomed
                ]
            )
    return len(doomed)


@transaction.atomic
def operations_create_many(
    *,
    devices: list[ManagedObject],
    data: dict[str, Any],
    bulk_operation_id: int,
    no_agent_reason: str,
    now: datetime | None = None,
) -> list[Operation]:
    """Create one operation per device in one INSERT: the bulk ramp's batch form of
    `operation_create`, with the same validation, fragments, agent routing, SMS hand-off and
    CREATE events. A device without an agent gets a FAILED operation with `no_agent_reason`
    instead of a 422, so that a later `failedParentId` run can retry it (bulkoperations.md §4)."""
    fragments = {key: value for key, value in _fragments(data).items() if value is not None}
    now = now or timezone.now()
    agents = devices_agent_ids(devices=devices)
    operations = []
    for device in devices:
        own = dict(fragments)
        if is_sms(fragments=own, device_fragments=device.fragments):
            own.setdefault("deliveryType", "SMS")
        agent_id = agents.get(device.pk)
        failed = agent_id is None
        operations.append(
            Operation(
                device=device,
                agent_id=agent_id,
                status=OperationStatus.FAILED if failed else OperationStatus.PENDING,
                failure_reason=no_agent_reason if failed else None,
                creation_time=now,
                status_changed_at=now,
                fragments=own,
                bulk_operation_id=bulk_operation_id,
                expires_at=None if failed else _pending_deadline(own, now),
                execution_timeout=own.get("executionTimeout"),
            )
        )
    Operation.objects.bulk_create(operations)
    _status_changed((bulk_operation_id, None, op.status) for op in operations)
    metrics.operations_created(Counter(op.status for op in operations))
    publish_on_commit([_event("CREATE", op) for op in operations])
    for operation in operations:
        if operation.fragments.get("deliveryType") == "SMS" and operation.agent_id is not None:
            payload = operation_json(operation, base="")
            transaction.on_commit(lambda payload=payload: deliver_by_sms(payload))
    return operations


@transaction.atomic
def operation_retry(
    *, operation: Operation, notify: bool = True, now: datetime | None = None
) -> Operation:
    """Re-issue a FAILED operation as a new PENDING one with the same fragments, linked to it.

    The operation is locked and re-read, so two concurrent retries cannot both pass. The retry of
    a bulk child supersedes it: the retry is now the device's attempt in that bulk operation, the
    only one its progress counts (the original leaves the counters, the retry enters them) and
    the only one that can be retried again (422 for a superseded one)."""
    locked = Operation.objects.select_for_update().filter(pk=operation.pk).first()
    if locked is None:
        raise operation_not_found(operation.pk)
    operation = locked
    if operation.status != OperationStatus.FAILED:
        raise ValidationFailed(
            f"Only FAILED operations can be retried; operation {operation.pk} is {operation.status}",
            error="devicecontrol/Invalid Data",
        )
    if operation.superseded:
        raise ValidationFailed(
            f"Operation {operation.pk} was already retried; only the latest attempt of device "
            f"{operation.device_id} in bulk operation {operation.bulk_operation_id} can be retried",
            error="devicecontrol/Invalid Data",
        )
    # Once only, as for a bulk child: a second retry of the same attempt (a double click, a client
    # resending after a timeout) would run the operation twice on the device and multiply its
    # automatic retries. The row lock above makes a concurrent second retry wait for the first
    # one's commit, and this check then sees it.
    later = Operation.objects.filter(retry_of_id=operation.pk).order_by("pk").first()
    if later is not None:
        raise ValidationFailed(
            f"Operation {operation.pk} was already retried (operation {later.pk}); only the latest "
            "attempt can be retried",
            error="devicecontrol/Invalid Data",
        )
    device = ManagedObject.objects.get(pk=operation.device_id)
    if operation.bulk_operation_id is not None:
        Operation.objects.filter(pk=operation.pk).update(superseded=True, retry_at=None)
        _status_changed([(operation.bulk_operation_id, operation.status, None)])
        operation.superseded = True
    elif operation.retry_at is not None:
        Operation.objects.filter(pk=operation.pk).update(retry_at=None)
    operation.retry_at = None  # retried now: the booked automatic retry is this one
    data = {key: value for key, value in operation.fragments.items() if key != CANCEL_REQUESTED}
    return operation_create(
        device=device,
        data=data,
        bulk_operation_id=operation.bulk_operation_id,
        retry_of=operation,
        notify=notify,
        now=now,
        attempt=operation.attempt + 1,
    )


@transaction.atomic
def operation_cancel(
    *, operation: Operation, by: str, notify: bool = True, now: datetime | None = None
) -> Operation:
    """Cancel one operation under its row lock (a concurrent agent PUT runs wholly before or
    after, never lost). PENDING: FAILED at once with "Cancelled by <by>" and an UPDATE event.
    EXECUTING: the `c8y_CancelRequested` fragment ({time, by}) and an UPDATE event that also goes
    to the agent's channel; the status stays, the agent decides. A second cancel of an EXECUTING
    operation keeps the first request and changes nothing (no event). 422 once it is finished."""
    locked = Operation.objects.select_for_update().filter(pk=operation.pk).first()
    if locked is None:
        raise operation_not_found(operation.pk)
    now = now or timezone.now()
    if locked.status == OperationStatus.PENDING:
        _status_changed([(_counted(locked), locked.status, OperationStatus.FAILED)])
        metrics.operation_status_changed({OperationStatus.FAILED: 1})
        _apply_status(locked, OperationStatus.FAILED, now)
        locked.failure_reason = CANCELLED_REASON.format(by=by)
        locked.save(update_fields=["status", "status_changed_at", "failure_reason"])
        if notify:
            publish_on_commit([_event("UPDATE", locked)])
    elif locked.status == OperationStatus.EXECUTING:
        if CANCEL_REQUESTED in locked.fragments:
            return locked
        locked.fragments = {
            **locked.fragments,
            CANCEL_REQUESTED: {"time": format_datetime(now), "by": by},
        }
        locked.save(update_fields=["fragments"])
        if notify:
            publish_on_commit([_event("UPDATE", locked, to_agent=True)])
    else:
        raise ValidationFailed(
            f"Operation {locked.pk} is {locked.status}: only PENDING and EXECUTING operations "
            "can be cancelled",
            error="devicecontrol/Invalid Data",
        )
    return locked


def _fail_due(
    *,
    queryset: QuerySet[Operation],
    reason: Any,
    now: datetime,
    batch_size: int,
    failure_type: str | None = None,
) -> int:
    """Fail the operations of `queryset`, claimed `batch_size` at a time with SKIP LOCKED, each
    with an UPDATE event. Idempotent: a row that changed status meanwhile no longer matches.
    `failure_type` ("TIMED_OUT" for the sweepers): automatic retries are booked by it."""
    total = 0
    while True:
        # Durable: each batch commits (and releases its locks) before the next is claimed.
        with transaction.atomic(durable=True):
            batch = list(queryset.select_for_update(skip_locked=True).order_by("pk")[:batch_size])
            if not batch:
                return total
            _fail_rows(batch, reason, now, failure_type=failure_type)
        total += len(batch)


def _fail_rows(
    batch: list[Operation],
    reason: Callable[[Operation], str],
    now: datetime,
    *,
    failure_type: str | None = None,
    notify: bool = True,
) -> None:
    """Fail the locked operations of `batch`, each with an UPDATE event after commit (unless not
    `notify`). With `failure_type` ("FAILED", "TIMED_OUT"), automatic retries are booked by it."""
    _status_changed((_counted(op), op.status, OperationStatus.FAILED) for op in batch)
    for operation in batch:
        # The reason reads the timestamps of the state being left: compute it first.
        operation.failure_reason = reason(operation)
        operation.status = OperationStatus.FAILED
        operation.status_changed_at = now
    if failure_type is not None:
        _book_retries(batch, failure_type, now)
    groups: dict[tuple[str | None, datetime | None], list[int]] = defaultdict(list)
    for operation in batch:
        retry_at = operation.retry_at if failure_type is not None else None
        groups[(operation.failure_reason, retry_at)].append(operation.pk)
    # One UPDATE per distinct reason and retry time (a batch has one or a few): bulk_update's
    # CASE per row cost about 4 ms of CPU per row to build.
    for (text, retry_at), pks in groups.items():
        changes: dict[str, Any] = {
            "status": OperationStatus.FAILED,
            "status_changed_at": now,
            "failure_reason": text,
        }
        if failure_type is not None:
            changes["retry_at"] = retry_at
        Operation.objects.filter(pk__in=pks).update(**changes)
    metrics.operation_status_changed({OperationStatus.FAILED: len(batch)})
    if notify:
        publish_on_commit([_event("UPDATE", operation) for operation in batch])


def operations_fail(
    *,
    queryset: QuerySet[Operation],
    reason: str | Callable[[Operation], str],
    now: datetime,
    batch_size: int = 500,
    notify: bool = True,
) -> int:
    """Fail every not-FAILED operation of `queryset` with `reason`, each with an UPDATE event
    after commit (unless not `notify`), inside the caller's transaction (or one of its own): all of them commit
    together. Unlike the sweepers' SKIP LOCKED, a row another transaction holds is waited for,
    in ID order, and re-checked against `queryset` once locked (an agent that just moved it on
    keeps it). Returns the number failed."""
    explain = reason if callable(reason) else (lambda operation: reason)
    rows = queryset.exclude(status=OperationStatus.FAILED).order_by("pk")
    total, last = 0, 0
    with transaction.atomic():
        while True:
            batch = list(rows.filter(pk__gt=last).select_for_update()[:batch_size])
            if not batch:
                return total
            _fail_rows(batch, explain, now, notify=notify)
            total += len(batch)
            last = batch[-1].pk


def operations_expire(*, now: datetime, batch_size: int = 500) -> int:
    """PENDING operations past their deadline become FAILED with an 'expired' reason."""
    return _fail_due(
        queryset=Operation.objects.filter(status=OperationStatus.PENDING, expires_at__lte=now),
        reason=lambda op: EXPIRED_REASON.format(
            seconds=int((op.expires_at - op.status_changed_at).total_seconds())
        ),
        now=now,
        batch_size=batch_size,
        failure_type="TIMED_OUT",
    )


class Seconds(Func):
    """A whole number of seconds (an integer expression) as a duration, to add to a date-time.

    PostgreSQL: `n * interval '1 second'`. SQLite keeps durations as integer microseconds, which
    Django's date-time arithmetic there (`django_format_dtdelta`) adds; `n * interval` has no
    meaning there (Django refuses it: "Invalid arguments for operator *")."""

    arity = 1
    output_field = DurationField()

    def as_postgresql(self, compiler: Any, connection: Any, **extra_context: Any) -> Any:
        sql, params = compiler.compile(self.get_source_expressions()[0])
        return f"({sql} * %s)", (*params, timedelta(seconds=1))

    def as_sqlite(self, compiler: Any, connection: Any, **extra_context: Any) -> Any:
        sql, params = compiler.compile(self.get_source_expressions()[0])
        return f"({sql} * 1000000)", params

    def as_sql(self, compiler: Any, connection: Any, **extra_context: Any) -> Any:
        raise NotSupportedError(f"Seconds() has no SQL for {connection.vendor}")


def operations_time_out(*, now: datetime, batch_size: int = 500) -> int:
    """EXECUTING operations over their execution timeout become FAILED with a 'timed out' reason.

    Rows with their own timeout use it; the default setting applies to the others."""
    default = settings.OPERATION_EXECUTION_TIMEOUT
    executing = Operation.objects.filter(status=OperationStatus.EXECUTING)
    total = 0
    if default:
        total += _fail_due(
            queryset=executing.filter(
                execution_timeout__isnull=True,
                executing_since__lte=now - timedelta(seconds=default),
            ),
            reason=lambda op: TIMED_OUT_REASON.format(seconds=default),
            now=now,
            batch_size=batch_size,
            failure_type="TIMED_OUT",
        )
    # Per-row timeouts compared in SQL, so the claim re-checks the deadline on the locked rows.
    deadline = F("executing_since") + Seconds(F("execution_timeout"))
    total += _fail_due(
        queryset=executing.filter(execution_timeout__isnull=False)
        .alias(deadline=deadline)
        .filter(deadline__lte=now),
        reason=lambda op: TIMED_OUT_REASON.format(seconds=op.execution_timeout),
        now=now,
        batch_size=batch_size,
        failure_type="TIMED_OUT",
    )
    return total


def operations_retry_due(*, now: datetime, batch_size: int = 100) -> int:
    """Create the automatic retries that are due: each FAILED operation whose `retry_at` passed
    is retried as `operation_retry` does (a new PENDING operation, `retryOf`, `attempt` + 1; a
    bulk child is superseded by it), claimed `batch_size` at a time with SKIP LOCKED, and its
    `retry_at` cleared. The policy is asked again first: a bulk operation cancelled (or aborted)
    meanwhile, or a `retryConfig` removed, books none. A retry that cannot be created (the
    device lost its agent) is logged and dropped. The children of a paused bulk operation
    (BULK_RETRIES_HELD) keep their booking until it is resumed. Returns how many were created."""
    held: set[int] = set()
    for source in BULK_RETRIES_HELD:
        held |= source()
    due = Operation.objects.filter(retry_at__lte=now).exclude(bulk_operation_id__in=held)
    created = 0
    while True:
        with transaction.atomic(durable=True):
            batch = list(
                due.select_for_update(skip_locked=True).order_by("retry_at", "pk")[:batch_size]
            )
            if not batch:
                return created
            Operation.objects.filter(pk__in=[op.pk for op in batch]).update(retry_at=None)
            configs = _retry_configs(batch)
            for operation in batch:
                operation.retry_at = None
                if (
                    operation.status != OperationStatus.FAILED
                    or operation.superseded
                    or operation.pk not in configs
                ):
                    continue
                try:
                    with transaction.atomic():
                        operation_retry(operation=operation, now=now)
                except ApiError as exc:
                    logger.warning("automatic retry of operation %s dropped: %s", operation.pk, exc)
                else:
                    created += 1


def operations_retries_drop(*, queryset: QuerySet[Operation]) -> int:
    """Forget the booked automatic retries of `queryset` (a cancelled bulk operation's children:
    no further children). No notification: only the read-only `retryAt` goes."""
    return queryset.filter(retry_at__isnull=False).update(retry_at=None)


def operations_purge(*, now: datetime, batch_size: int = 1000) -> int:
    """Delete operations in a final state whose last status change is older than the retention."""
    days = settings.OPERATION_RETENTION_DAYS
    if not days:
        return 0
    cutoff = now - timedelta(days=days)
    total = 0
    expired = Operation.objects.filter(
        status__in=list(FINAL_STATUSES), status_changed_at__lt=cutoff
    )
    while True:
        ids = list(expired.order_by("pk").values_list("pk", flat=True)[:batch_size])
        if not ids:
            return total
        # The condition is re-checked on the locked rows: one a PUT just moved back to PENDING stays.
        total += operations_delete(queryset=expired.filter(pk__in=ids))


def operations_delete_for_devices(device_ids: list[int], *, notify: bool = True) -> None:
    """Inventory deletion hook: a deleted device takes its operations along, each with a realtime
    DELETE event unless the deletion is QUIESCENT (inventory.md §6, realtime.md §5.4)."""
    operations_delete(queryset=Operation.objects.filter(device_id__in=device_ids), notify=notify)


# --- device registration and device credentials (Cumulocity's bootstrap flow) -----------------
#
# An operator registers a device id (WAITING_FOR_CONNECTION); the device, logged in as the shared
# bootstrap user, polls `deviceCredentials` with its id: the first poll moves the request to
# PENDING_ACCEPTANCE; the operator accepts it (ACCEPTED); the next poll creates the device user
# and gets its password, once. Every poll locks the request's row, so two concurrent polls of an
# accepted request give one password and one "not found".

NON_UNIQUE = "devicecontrol/Non Unique Result"
INVALID_DATA = "devicecontrol/Invalid Data"


def new_device_request_not_found(device_id: object) -> NotFound:
    return NotFound(
        f"Finding new device request from database failed : No newDeviceRequest for id "
        f"'{device_id}'!",
        error="devicecontrol/Not Found",
    )


def security_token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _token_matches(request: NewDeviceRequest, token: str | None) -> bool:
    """Constant-time comparison of digests; a request without a token takes any poll."""
    if not request.security_token_digest:
        return True
    presented = security_token_digest(token) if token is not None else ""
    return hmac.compare_digest(presented.encode(), request.security_token_digest.encode())


def _check_device_username(device_id: str) -> None:
    """409 when `device_<id>` is an account that is not a device user: its credentials could
    never be issued (`device_user_provision` refuses to hand a person's account to a device)."""
    clash = non_device_account(device_id)
    if clash is not None:
        raise Conflict(
            f"The user {clash} exists and is not a device user: a device with id "
            f"'{device_id}' cannot be registered"
        )


@transaction.atomic
def new_device_request_create(
    *, device_id: object, owner: str, security_token: str | None = None, now: datetime | None = None
) -> NewDeviceRequest:
    """Register a device id (WAITING_FOR_CONNECTION). 422 for an id a device user's name cannot
    hold or one registered already (letter case aside); 409 when `device_<id>` is a person."""
    device_id = validate_device_id(device_id)
    _check_device_username(device_id)
    request = NewDeviceRequest(
        device_id=device_id,
        owner=owner,
        creation_time=now or timezone.now(),
        security_token_digest=security_token_digest(security_token) if security_token else "",
    )
    try:
        with transaction.atomic():
            request.save(force_insert=True)
    except IntegrityError:
        raise ValidationFailed(
            f"A new device request for id '{device_id}' exists already",
            error=NON_UNIQUE,
        ) from None
    return request


def _locked_request(device_id: str) -> NewDeviceRequest:
    request = NewDeviceRequest.objects.select_for_update().filter(device_id=device_id).first()
    if request is None:
        raise new_device_request_not_found(device_id)
    return request


@transaction.atomic
def new_device_request_accept(
    *,
    device_id: str,
    status: object,
    accepted_by: str,
    security_token: str | None = None,
    precondition: Callable[[NewDeviceRequest], None] | None = None,
    now: datetime | None = None,
) -> NewDeviceRequest:
    """The PUT of a request: only `ACCEPTED` may be set, and only once the device has polled
    (PENDING_ACCEPTANCE), as on Cumulocity. A `security_token` given here replaces the one given
    at registration. 404 for an unknown id, then `precondition` (If-Match), then 422."""
    request = _locked_request(device_id)
    if precondition is not None:
        precondition(request)
    if status != NewDeviceRequestStatus.ACCEPTED:
        raise ValidationFailed(
            f"Invalid status {status!r}: only ACCEPTED can be set; WAITING_FOR_CONNECTION and "
            "PENDING_ACCEPTANCE follow from the device's polls",
            error=INVALID_DATA,
        )
    if request.status == NewDeviceRequestStatus.WAITING_FOR_CONNECTION:
        raise ValidationFailed(
            f"The device '{device_id}' has not asked for credentials yet (status "
            "WAITING_FOR_CONNECTION): a request can be accepted once the device has polled "
            "and it is PENDING_ACCEPTANCE",
            error=INVALID_DATA,
        )
    if request.status == NewDeviceRequestStatus.ACCEPTED:
        raise ValidationFailed(
            f"The new device request for id '{device_id}' is ACCEPTED already",
            error=INVALID_DATA,
        )
    _check_device_username(request.device_id)
    request.status = NewDeviceRequestStatus.ACCEPTED
    request.accepted_by = accepted_by
    request.accepted_at = now or timezone.now()
    fields = ["status", "accepted_by", "accepted_at"]
    if security_token:
        request.security_token_digest = security_token_digest(security_token)
        fields.append("security_token_digest")
    request.save(update_fields=fields)
    return request


@transaction.atomic
def new_device_request_delete(
    *, device_id: str, precondition: Callable[[NewDeviceRequest], None] | None = None
) -> None:
    """Reject (remove) a request. A device user created from it stays: revoke that one."""
    request = _locked_request(device_id)
    if precondition is not None:
        precondition(request)
    request.delete()


class PollOutcome(StrEnum):
    """What a credentials poll found. Only ISSUED answers with credentials; every other outcome
    answers the same 404, and UNKNOWN and WRONG_TOKEN count as misses of the client address."""

    UNKNOWN = "unknown"
    WRONG_TOKEN = "wrong token"  # noqa: S105 - an outcome, not a password
    NOW_PENDING = "now pending"
    PENDING = "pending"
    ISSUED_BEFORE = "issued before"
    REFUSED = "refused"  # device_<id> became a non-device account after the accept
    ISSUED = "issued"

    @property
    def is_miss(self) -> bool:
        return self in {PollOutcome.UNKNOWN, PollOutcome.WRONG_TOKEN}


@dataclass(frozen=True)
class DeviceCredentials:
    device_id: str
    username: str
    password: str = field(repr=False)  # shown to the device once; never logged or stored


@transaction.atomic
def device_credentials_poll(
    *, device_id: str, security_token: str | None, now: datetime | None = None
) -> tuple[PollOutcome, DeviceCredentials | None]:
    """One poll of a device for its credentials, under the request's row lock (two concurrent
    polls of an accepted request: one gets the password). A poll for an accepted request whose
    credentials were not issued yet creates or re-keys the device user and returns its password;
    the request is marked issued in the same transaction."""
    request = NewDeviceRequest.objects.select_for_update().filter(device_id=device_id).first()
    if request is None:
        return PollOutcome.UNKNOWN, None
    if not _token_matches(request, security_token):
        return PollOutcome.WRONG_TOKEN, None
    now = now or timezone.now()
    request.last_polled_at = now
    fields = ["last_polled_at"]
    credentials = None
    if request.status == NewDeviceRequestStatus.WAITING_FOR_CONNECTION:
        request.status = NewDeviceRequestStatus.PENDING_ACCEPTANCE
        fields.append("status")
        outcome = PollOutcome.NOW_PENDING
    elif request.status == NewDeviceRequestStatus.PENDING_ACCEPTANCE:
        outcome = PollOutcome.PENDING
    elif request.credentials_issued_at is not None:
        outcome = PollOutcome.ISSUED_BEFORE
    else:
        try:
            user, password, _ = device_user_provision(request.device_id)
        except Conflict:
            logger.warning(
                "device credentials for '%s' not issued: %s is not a device user",
                request.device_id,
                device_username(request.device_id),
            )
            outcome = PollOutcome.REFUSED
        else:
            request.credentials_issued_at = now
            fields.append("credentials_issued_at")
            credentials = DeviceCredentials(request.device_id, user.username, password)
            outcome = PollOutcome.ISSUED
    request.save(update_fields=fields)
    return outcome, credentials


# --- bulk registration (a CSV of device ids and passwords) ---------------------------------------

MIN_DEVICE_PASSWORD_LENGTH = 8
SHELL_VALUES = {"": False, "0": False, "false": False, "1": True, "true": True}
GROUP_TYPE = "c8y_DeviceGroup"


def _group_path(names: list[str], *, owner: str) -> ManagedObject:
    """The group at the end of a PATH (`Region A/Site 7`): each name a device group under the one
    before it (childAssets; the first a group that is no group's child asset), created when
    missing, owned by `owner`."""
    parent: ManagedObject | None = None
    for name in names:
        candidates = ManagedObject.objects.filter(is_group=True, name=name)
        if parent is None:
            candidates = candidates.exclude(parent_refs__relation=Relation.ASSET)
        else:
            candidates = candidates.filter(has_parent_q(Relation.ASSET, parent.pk))
        group = candidates.order_by("pk").first()
        if group is None:
            data = {"name": name, "type": GROUP_TYPE, "c8y_IsDeviceGroup": {}}
            if parent is None:
                group = inventory_services.managed_object_create(owner=owner, data=data)
            else:
                group = inventory_services.managed_object_create_child(
                    parent=parent, relation=Relation.ASSET, owner=owner, data=data
                )
        parent = group
    assert parent is not None
    return parent


@transaction.atomic
def device_bulk_register(*, row: BulkDeviceRow, owner: str) -> str:
    """One row of a bulk registration, all or nothing: the device user `device_<ID>` created (or
    re-keyed) with the row's password; with TYPE and NAME also its device (owned by the device
    user, `c8y_IsDevice`, `c8y_Mobile.iccid` from ICCID, `c8y_SupportedOperations` with
    `c8y_Command` when SHELL is 1) bound to the external ID (IDTYPE, default c8y_Serial; a device
    bound already is kept as it is) and put into the PATH group. Returns CREATED or
    CREDENTIAL_UPDATED (the device user existed); an ApiError says why the row failed."""
    if row.problem:
        raise ValidationFailed(row.problem)
    device_id = validate_device_id(row.get("ID"), name="ID")
    password = row.fields.get("CREDENTIALS", "")
    if len(password) < MIN_DEVICE_PASSWORD_LENGTH:
        raise ValidationFailed(
            f"Invalid value for CREDENTIALS: at least {MIN_DEVICE_PASSWORD_LENGTH} characters "
            "are required"
        )
    device_type, name = row.get("TYPE"), row.get("NAME")
    if bool(device_type) != bool(name):
        raise ValidationFailed("TYPE and NAME go together: both (to create the device) or neither")
    shell = SHELL_VALUES.get(row.get("SHELL").lower())
    if shell is None:
        raise ValidationFailed(f"Invalid value for SHELL: 1 or 0, not {row.get('SHELL')!r}")
    path = [segment.strip() for segment in row.get("PATH").split("/") if segment.strip()]
    if not name and (path or row.get("ICCID") or shell):
        raise ValidationFailed("PATH, ICCID and SHELL describe the device: give TYPE and NAME too")
    user, _, created = device_user_provision(device_id, password)
    if name:
        id_type = row.get("IDTYPE") or "c8y_Serial"
        bound = ExternalId.objects.filter(type=id_type, external_id=device_id).first()
        if bound is not None:
            device = bound.managed_object
        else:
            data: dict[str, Any] = {"name": name, "type": device_type, "c8y_IsDevice": {}}
            if row.get("ICCID"):
                data["c8y_Mobile"] = {"iccid": row.get("ICCID")}
            if shell:
                data["c8y_SupportedOperations"] = ["c8y_Command"]
            device = inventory_services.managed_object_create(owner=user.username, data=data)
            inventory_services.external_id_create(
                managed_object=device, type=id_type, external_id=device_id
            )
        if path:
            inventory_services.managed_object_add_children(
                parent=_group_path(path, owner=owner), relation=Relation.ASSET, children=[device]
            )
    return "CREATED" if created else "CREDENTIAL_UPDATED"
