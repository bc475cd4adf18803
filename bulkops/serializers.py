"""Wire format of bulk operations (spec bulkoperations.md §1) and the derived generalStatus."""

from __future__ import annotations

from typing import Any

from django.db.models import F, Q

from bulkops.models import BulkOperation, BulkStatus
from bulkops.rollout import rollout_json
from bulkops.selectors import CURRENT, bulk_operation_progress
from deviceplatform.api.dates import format_datetime

GENERAL_STATUSES = (
    "SCHEDULED",
    "EXECUTING",
    "EXECUTING_WITH_ERRORS",
    "SUCCESSFUL",
    "FAILED",
    "CANCELED",
)


def general_status(bulk: BulkOperation, counts: dict[str, int] | None = None) -> str:
    """bulkoperations.md §6, in its order; `counts` from `bulk_operation_progress`."""
    if bulk.status == BulkStatus.DELETED:
        return "CANCELED"
    if bulk.status == BulkStatus.ACTIVE:
        return "SCHEDULED"
    counts = counts if counts is not None else bulk_operation_progress(bulk)
    if bulk.remaining > 0 or counts["pending"] + counts["executing"] > 0:
        return "EXECUTING_WITH_ERRORS" if counts["failed"] > 0 else "EXECUTING"
    return "FAILED" if counts["failed"] > 0 else "SUCCESSFUL"


def general_status_q(value: str) -> Q:
    """The same derivation as a filter, so `?generalStatus=` pages and counts in SQL. Filters a
    queryset from `bulkops.selectors.bulk_operations_with_progress` (its exact counters)."""
    pending, executing, failed = CURRENT["pending"], CURRENT["executing"], CURRENT["failed"]
    started = Q(status__in=[BulkStatus.IN_PROGRESS, BulkStatus.COMPLETED])
    unfinished = (
        Q(next_index__lt=F("target_count"))
        | Q(**{f"{pending}__gt": 0})
        | Q(**{f"{executing}__gt": 0})
    )
    no_failure, some_failure = Q(**{failed: 0}), Q(**{f"{failed}__gt": 0})
    return {
        "CANCELED": Q(status=BulkStatus.DELETED),
        "SCHEDULED": Q(status=BulkStatus.ACTIVE),
        "EXECUTING": started & unfinished & no_failure,
        "EXECUTING_WITH_ERRORS": started & unfinished & some_failure,
        "SUCCESSFUL": started & ~unfinished & no_failure,
        "FAILED": started & ~unfinished & some_failure,
    }[value]


def progress_json(bulk: BulkOperation, counts: dict[str, int]) -> dict[str, int]:
    """The `progress` object (bulkoperations.md §5): each target device counted once, by the
    status of its latest child operation, plus `all` (those and the targets not processed yet)."""
    return {**counts, "all": sum(counts.values()) + bulk.remaining}


def ramp_error_json(bulk: BulkOperation) -> dict[str, Any] | None:
    """`c8y_RampError`: why the ramp last failed to advance, when, and how many times in a row."""
    if not bulk.ramp_error_count:
        return None
    return {
        "reason": bulk.ramp_error or "",
        "time": format_datetime(bulk.ramp_error_at) if bulk.ramp_error_at else None,
        "attempts": bulk.ramp_error_count,
    }


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def bulk_operation_url(base: str, pk: int) -> str:
    return f"{base}/devicecontrol/bulkoperations/{pk}"


def bulk_operation_json(bulk: BulkOperation, *, base: str) -> dict[str, Any]:
    body: dict[str, Any] = {"id": str(bulk.pk), "self": bulk_operation_url(base, bulk.pk)}
    if bulk.group_id is not None:
        body["groupId"] = str(bulk.group_id)
    if bulk.failed_parent_id is not None:
        body["failedParentId"] = str(bulk.failed_parent_id)
    body["startDate"] = format_datetime(bulk.start_date)
    body["creationRamp"] = _number(bulk.creation_ramp)
    body["operationPrototype"] = bulk.operation_prototype
    body["status"] = bulk.status
    counts = bulk_operation_progress(bulk)
    body["generalStatus"] = general_status(bulk, counts)
    body["progress"] = progress_json(bulk, counts)
    body.update(bulk.fragments)
    if body.get("retryConfig", {}) is None:  # stored by a PUT before `null` meant "remove"
        del body["retryConfig"]
    if bulk.abort_config is not None:
        body["abortConfig"] = bulk.abort_config
    if bulk.abort_reason is not None:
        body["abortReason"] = bulk.abort_reason
    body.update(rollout_json(bulk))
    ramp_error = ramp_error_json(bulk)
    if ramp_error is not None:
        body["c8y_RampError"] = ramp_error
    return body
