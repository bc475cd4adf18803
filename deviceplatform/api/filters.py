"""django-filter building blocks that follow Cumulocity's query rules: bad values are 422."""

from __future__ import annotations

from typing import Any

import django_filters
from django import forms

from deviceplatform.api.dates import parse_datetime
from deviceplatform.api.exceptions import InvalidQuery
from deviceplatform.api.params import MAX_ID, get_bool, parse_id


class _StrictBooleanField(forms.Field):
    """`true`/`false` in any case; anything else is invalid (django-filter would ignore it)."""

    def to_python(self, value: Any) -> bool | None:
        if value in (None, ""):
            return None
        return get_bool({"value": value}, "value")


class _IdField(forms.Field):
    def to_python(self, value: Any) -> int | None:
        if value in (None, ""):
            return None
        return parse_id(value)


class _DateTimeField(forms.Field):
    def to_python(self, value: Any) -> Any:
        if value in (None, ""):
            return None
        return parse_datetime(value)


class DateTimeFilter(django_filters.Filter):
    """ISO 8601 as spec README §4 reads it (offsets, a space for `+`, plain dates); bad: 422."""

    field_class = _DateTimeField


class StrictBooleanFilter(django_filters.Filter):
    field_class = _StrictBooleanField


class IdFilter(django_filters.Filter):
    field_class = _IdField


class CumulocityFilterSet(django_filters.FilterSet):
    """A FilterSet whose invalid parameters raise a 422 instead of being dropped silently."""

    @property
    def qs(self) -> Any:
        if self.is_bound and not self.form.is_valid():
            problems = "; ".join(
                f"{field}: {' '.join(str(error) for error in errors)}"
                for field, errors in self.form.errors.items()
            )
            raise InvalidQuery(problems)
        return super().qs

    def filter_queryset(self, queryset: Any) -> Any:
        # Filters are ANDed: an ID beyond the bigint range (MAX_ID) matches nothing at all.
        for name, value in self.form.cleaned_data.items():
            if isinstance(self.filters[name], IdFilter) and value is not None and value > MAX_ID:
                return queryset.none()
        return super().filter_queryset(queryset)
