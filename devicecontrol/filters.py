"""Query parameters of `GET/DELETE /devicecontrol/operations` (devicecontrol.md §5, §8)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import django_filters
from django import forms
from django.db.models import QuerySet

from devicecontrol.models import Operation, OperationStatus
from deviceplatform.api.filters import (
    CumulocityFilterSet,
    DateTimeFilter,
    IdFilter,
    StrictBooleanFilter,
)
from deviceplatform.api.params import MAX_ID, parse_id


class _StatusField(forms.Field):
    def to_python(self, value: Any) -> Any:
        if value in (None, ""):
            return None
        if value not in OperationStatus.values:
            raise forms.ValidationError(
                f"{value!r} is not one of {', '.join(OperationStatus.values)}"
            )
        return value


class StatusFilter(django_filters.Filter):
    field_class = _StatusField


class OperationFilter(CumulocityFilterSet):
    status = StatusFilter(field_name="status")
    deviceId = IdFilter(field_name="device_id")  # noqa: N815
    agentId = IdFilter(field_name="agent_id")  # noqa: N815
    bulkOperationId = IdFilter(field_name="bulk_operation_id")  # noqa: N815
    fragmentType = django_filters.CharFilter(method="filter_fragment_type")  # noqa: N815
    dateFrom = DateTimeFilter(field_name="creation_time", lookup_expr="gte")  # noqa: N815
    dateTo = DateTimeFilter(method="filter_date_to")  # noqa: N815
    revert = StrictBooleanFilter(method="filter_noop")

    class Meta:
        model = Operation
        fields: list[str] = []

    def filter_fragment_type(self, queryset: QuerySet[Any], name: str, value: str) -> QuerySet[Any]:
        return queryset.filter(fragments__has_key=value)

    def filter_date_to(self, queryset: QuerySet[Any], name: str, value: Any) -> QuerySet[Any]:
        """Inclusive at the precision `creationTime` is emitted in (milliseconds, README §4): an
        operation is found by `dateTo` set to its own creationTime even though the column holds
        microseconds."""
        try:
            end = value.replace(microsecond=value.microsecond // 1000 * 1000)
            end += timedelta(milliseconds=1)
        except OverflowError:  # the last representable millisecond: no upper bound left
            return queryset
        return queryset.filter(creation_time__lt=end)

    def filter_noop(self, queryset: QuerySet[Any], name: str, value: Any) -> QuerySet[Any]:
        return queryset  # ordering is the view's job; the value is still validated

    def ordering(self) -> tuple[str, ...]:
        """FIFO; `revert=true` gives newest first only together with a date filter (§5)."""
        data = self.form.cleaned_data
        has_dates = data.get("dateFrom") is not None or data.get("dateTo") is not None
        return ("-id",) if data.get("revert") and has_dates else ("id",)


# What the agent's poll and a device's history page send: IDs, a status and paging, nothing else.
SIMPLE_PARAMS = frozenset(
    {
        "status",
        "deviceId",
        "agentId",
        "pageSize",
        "currentPage",
        "withTotalPages",
        "withTotalElements",
    }
)
# The filters among them, in OperationFilter's declaration order (the order of the SQL conditions).
SIMPLE_FILTERS = (("status", "status"), ("deviceId", "device_id"), ("agentId", "agent_id"))


def simple_conditions(params: Any) -> list[tuple[str, Any]] | None:
    """The (column, value) conditions of a query that uses only SIMPLE_PARAMS with valid values
    and IDs within bigint, in OperationFilter's order; None for anything else (invalid values, an
    ID beyond bigint, any other parameter)."""
    if not params.keys() <= SIMPLE_PARAMS:
        return None
    conditions: list[tuple[str, Any]] = []
    for name, column in SIMPLE_FILTERS:
        value = params.get(name)
        if value in (None, ""):
            continue
        if name == "status":
            if value not in OperationStatus.values:
                return None
        else:
            try:
                value = parse_id(value)
            except Exception:
                return None
            if value > MAX_ID:
                return None
        conditions.append((column, value))
    return conditions


def simple_operations(
    params: Any, queryset: QuerySet[Operation]
) -> tuple[QuerySet[Operation], tuple[str, ...]] | None:
    """(filtered queryset, ordering) for a query that uses only SIMPLE_PARAMS with valid values,
    the same queryset OperationFilter builds, without building a filter set and its form per
    request (a third of a history page's CPU here, bench/README.md "operations.py"). None for
    anything else, invalid values included: OperationFilter then answers, with its own errors."""
    conditions = simple_conditions(params)
    if conditions is None:
        if params.keys() <= SIMPLE_PARAMS and _id_beyond_bigint(params):
            # as CumulocityFilterSet: an ID beyond bigint matches nothing
            return queryset.none(), ("id",)
        return None
    queryset = queryset.all()
    for column, value in conditions:
        queryset = queryset.filter(**{f"{column}__exact": value})
    return queryset, ("id",)


def _id_beyond_bigint(params: Any) -> bool:
    """Whether a query of SIMPLE_PARAMS reaches, checked in SIMPLE_FILTERS order, an ID beyond
    bigint before any invalid value."""
    for name, _ in SIMPLE_FILTERS:
        value = params.get(name)
        if value in (None, ""):
            continue
        if name == "status":
            if value not in OperationStatus.values:
                return False
            continue
        try:
            value = parse_id(value)
        except Exception:
            return False
        if value > MAX_ID:
            return True
    return False


# The history page newest first (c8y-api's `get_last`): the simple shape with dates and `revert`.
DATED_PARAMS = SIMPLE_PARAMS | {"dateFrom", "dateTo", "revert"}


def page_query(params: Any) -> tuple[list[tuple[str, str, Any]], bool] | None:
    """((column, operator, value) conditions, newest first) of a query that uses only
    DATED_PARAMS with valid values and IDs within bigint: OperationFilter's conditions and
    ordering, read without a filter set (selectors.OperationPage). None for anything else: the
    queryset path then answers, with its own errors."""
    if not params.keys() <= DATED_PARAMS:
        return None
    conditions = simple_conditions({k: v for k, v in params.items() if k in SIMPLE_PARAMS})
    if conditions is None:
        return None
    where = [(column, "=", value) for column, value in conditions]
    try:
        date_from = DateTimeFilter.field_class(required=False).clean(params.get("dateFrom"))
        date_to = DateTimeFilter.field_class(required=False).clean(params.get("dateTo"))
        revert = StrictBooleanFilter.field_class(required=False).clean(params.get("revert"))
    except Exception:
        return None
    if date_from is not None:
        where.append(("creation_time", ">=", date_from))
    if date_to is not None:
        try:  # as OperationFilter.filter_date_to
            end = date_to.replace(microsecond=date_to.microsecond // 1000 * 1000)
            end += timedelta(milliseconds=1)
        except OverflowError:
            pass
        else:
            where.append(("creation_time", "<", end))
    has_dates = date_from is not None or date_to is not None
    return where, bool(revert and has_dates)
