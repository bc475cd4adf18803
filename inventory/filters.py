"""Query parameters of `GET /inventory/managedObjects` (spec inventory.md §4) as a FilterSet."""

from __future__ import annotations

from typing import Any

import django_filters
from django.db.models import QuerySet

from deviceplatform.api.filters import CumulocityFilterSet, IdFilter, StrictBooleanFilter
from inventory.models import ManagedObject, Relation
from inventory.selectors import is_child_of_q, only_roots_q, text_search_q

FLAG_COLUMNS = {
    "c8y_IsDevice": "is_device",
    "com_cumulocity_model_Agent": "is_agent",
    "c8y_IsDeviceGroup": "is_group",
}


class ManagedObjectFilter(CumulocityFilterSet):
    type = django_filters.CharFilter(field_name="type")
    owner = django_filters.CharFilter(field_name="owner")
    fragmentType = django_filters.CharFilter(method="filter_fragment_type")  # noqa: N815
    text = django_filters.CharFilter(method="filter_text")
    onlyRoots = StrictBooleanFilter(method="filter_only_roots")  # noqa: N815
    childDeviceId = IdFilter(method="filter_child_device")  # noqa: N815
    childAssetId = IdFilter(method="filter_child_asset")  # noqa: N815
    childAdditionId = IdFilter(method="filter_child_addition")  # noqa: N815

    class Meta:
        model = ManagedObject
        fields: list[str] = []

    def filter_fragment_type(self, queryset: QuerySet[Any], name: str, value: str) -> QuerySet[Any]:
        flag = FLAG_COLUMNS.get(value)
        if flag:  # the hot fragments are indexed columns: no JSON scan for "all devices"
            return queryset.filter(**{flag: True})
        return queryset.filter(fragments__has_key=value)

    def filter_text(self, queryset: QuerySet[Any], name: str, value: str) -> QuerySet[Any]:
        return queryset.filter(text_search_q(value))

    def filter_only_roots(self, queryset: QuerySet[Any], name: str, value: bool) -> QuerySet[Any]:
        return queryset.filter(only_roots_q()) if value else queryset

    def filter_child_device(self, queryset: QuerySet[Any], name: str, value: int) -> QuerySet[Any]:
        return queryset.filter(is_child_of_q(Relation.DEVICE, value))

    def filter_child_asset(self, queryset: QuerySet[Any], name: str, value: int) -> QuerySet[Any]:
        return queryset.filter(is_child_of_q(Relation.ASSET, value))

    def filter_child_addition(
        self, queryset: QuerySet[Any], name: str, value: int
    ) -> QuerySet[Any]:
        return queryset.filter(is_child_of_q(Relation.ADDITION, value))
