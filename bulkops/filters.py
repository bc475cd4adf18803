"""Query parameters of `GET /devicecontrol/bulkoperations` (spec bulkoperations.md §7)."""

from __future__ import annotations

from typing import Any

from django.db.models import Q, QuerySet

from bulkops.models import BulkOperation, BulkStatus
from bulkops.serializers import GENERAL_STATUSES, general_status_q
from deviceplatform.api.exceptions import InvalidQuery
from deviceplatform.api.params import get_bool, get_datetime

# c8y-api 3.7.3 sends PENDING for its SCHEDULED constant (bulkoperations.md §7).
SYNONYMS = {"PENDING": "SCHEDULED"}


def bulk_operations_filter(queryset: QuerySet[BulkOperation], params: Any) -> QuerySet[Any]:
    if not get_bool(params, "withDeleted"):
        queryset = queryset.exclude(status=BulkStatus.DELETED)
    wanted = [
        SYNONYMS.get(item.strip(), item.strip())
        for value in params.getlist("generalStatus")
        for item in value.split(",")
        if item.strip()
    ]
    unknown = sorted(set(wanted) - set(GENERAL_STATUSES))
    if unknown:
        raise InvalidQuery(
            f"generalStatus {', '.join(unknown)} is not one of {', '.join(GENERAL_STATUSES)}"
        )
    if wanted:
        condition = Q()
        for value in dict.fromkeys(wanted):
            condition |= general_status_q(value)
        queryset = queryset.filter(condition)
    date_from, date_to = get_datetime(params, "dateFrom"), get_datetime(params, "dateTo")
    if date_from is not None:
        queryset = queryset.filter(start_date__gte=date_from)
    if date_to is not None:
        queryset = queryset.filter(start_date__lte=date_to)
    return queryset.order_by("id")
