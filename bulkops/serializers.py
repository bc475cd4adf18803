"""Wire format of bulk operations (spec bulkoperations.md §1) and the derived generalStatus."""

from __future__ import annotations

from typing import Any

from django.db.models import F, Q

from bulkops.models import BulkOperation, BulkStatus
from deviceplatform.api.dates import format_datetime

GENERAL_STATUSES = (
    "SCHEDULED",
    "EXECUTING",
    "EXECUTING_WITH_ERRORS",
    "SUCCESSFUL",
    "FAILED",
    "CANCELED",
)


def general_status(bulk: BulkOperation) -> str:
    """bulkoperations.md §6, in its order."""
    if bulk.status == BulkStatus.DELETED:
        return "CANCELED"
    if bulk.status == BulkStatus.ACTIVE:
        return "SCHEDULED"
    if bulk.remaining > 0 or bulk.pending + bulk.executing > 0:
        return "EXECUTING_WITH_ERRORS" if bulk.failed > 0 else "EXECUTING"
    return "FAILED" if bulk.failed > 0 else "SUCCESSFUL"


def general_status_q(value: str) -> Q:
    """The same derivation as a filter, so `?generalStatus=` pages and counts in SQL."""
    started = Q(status__in=[BulkStatus.IN_PROGRESS, BulkStatus.COMPLETED])
    unfinished = Q(next_index__lt=F("target_count")) | Q(pending__gt=0) | Q(executing__gt=0)
    return {
        "CANCELED": Q(status=BulkStatus.DELETED),
        "SCHEDULED": Q(status=BulkStatus.ACTIVE),
        "EXECUTING": started & unfinished & Q(failed=0),
        "EXECUTING_WITH_ERRORS": started & unfinished & Q(failed__gt=0),
        "SUCCESSFUL": started & ~unfinished & Q(failed=0),
        "FAILED": started & ~unfinished & Q(failed__gt=0),
    }[value]


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
    body["generalStatus"] = general_status(bulk)
    created = bulk.pending + bulk.executing + bulk.successful + bulk.failed
    body["progress"] = {
        "pending": bulk.pending,
        "failed": bulk.failed,
        "executing": bulk.executing,
        "successful": bulk.successful,
        "all": created + bulk.remaining,
    }
    body.update(bulk.fragments)
    return body
