"""Admin list pages that stay fast at fleet scale (100,000 devices, 1,000,000 operations).

Django's admin counts every list with `COUNT(*)` on each load, twice when a filter is applied
(the filtered count and the unfiltered total). On PostgreSQL that reads the whole table or index:
hundreds of milliseconds for a million operations. Here a list counts exactly only up to
`EXACT_COUNT_LIMIT` rows (`SELECT COUNT(*) FROM (SELECT ... LIMIT n)`, which stops early); past
that it shows the planner's estimate ("about 1,000,000"), and the page links go on past an
estimate that was too low. A list adopts this with one line: `FleetListMixin` as a base class of
its ModelAdmin."""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.views.main import PAGE_VAR
from django.core.paginator import EmptyPage, Page, PageNotAnInteger, Paginator
from django.db import connections
from django.db.models import QuerySet
from django.http import QueryDict

from deviceplatform.api.params import MAX_ID

EXACT_COUNT_LIMIT = 10_000


class EstimatedCount(int):
    """A row count that is the database's estimate: compares as a number, prints as "about N"."""

    estimated = True

    def __str__(self) -> str:
        return f"about {int(self):,}"


def estimated_count(queryset: QuerySet[Any], limit: int = EXACT_COUNT_LIMIT) -> int:
    """The exact number of rows up to `limit`; above it PostgreSQL's planner estimate (never less
    than `limit` + 1) as an `EstimatedCount`. Two cheap queries at most, whatever the table size.
    Other databases (SQLite, development only) count exactly."""
    # Only the primary key: a list's annotations (per-row subqueries) cost nothing to count.
    queryset = queryset.order_by().values("pk")
    bounded = queryset[: limit + 1].count()
    if bounded <= limit:
        return bounded
    if connections[queryset.db].vendor != "postgresql":
        return queryset.count()
    plan = json.loads(queryset.explain(format="json"))
    rows = int(plan[0]["Plan"]["Plan Rows"])
    return EstimatedCount(max(rows, limit + 1))


class EstimatedCountPaginator(Paginator):
    """A paginator whose count is `estimated_count`. While the count is an estimate, any page
    number is valid: a page past the real end is empty, never an error."""

    @cached_property
    def count(self) -> int:
        return estimated_count(self.object_list)

    @property
    def estimated(self) -> bool:
        return isinstance(self.count, EstimatedCount)

    def validate_number(self, number: Any) -> int:
        if not self.estimated:
            return super().validate_number(number)
        try:
            number = int(number)
        except (TypeError, ValueError):
            raise PageNotAnInteger(self.error_messages["invalid_page"]) from None
        if number < 1:
            raise EmptyPage(self.error_messages["min_page"])
        return number

    def page(self, number: Any) -> Page:
        if not self.estimated:
            return super().page(number)
        number = self.validate_number(number)
        bottom = (number - 1) * self.per_page
        return self._get_page(self.object_list[bottom : bottom + self.per_page], number, self)


class FleetListMixin(admin.ModelAdmin):
    """Mix into a ModelAdmin (before `admin.ModelAdmin`): bounded counts, no second, unfiltered
    count on filtered pages, no facet counts, 50 rows a page."""

    paginator = EstimatedCountPaginator
    show_full_result_count = False
    list_per_page = 50  # each row costs rendering time; 50 is what an operator scans
    # Facet counts run one COUNT per filter choice over the whole table: never offered.
    show_facets = admin.ShowFacets.NEVER


class IdInputFilter(admin.SimpleListFilter):
    """A list filter that takes an ID typed into a box instead of listing every choice (a fleet
    has thousands of agents). Subclasses set `title` and `parameter_name` and implement
    `filter(queryset, pk)`; `label(pk)` names the chosen object."""

    template = "admin/deviceplatform/id_input_filter.html"

    def lookups(self, request: Any, model_admin: Any) -> list[tuple[str, str]]:
        return []

    def has_output(self) -> bool:
        return True

    def label(self, pk: int) -> str:
        return f"#{pk}"

    def filter(self, queryset: QuerySet[Any], pk: int) -> QuerySet[Any]:
        raise NotImplementedError

    def chosen_id(self) -> int | None:
        value = (self.value() or "").strip()
        if not value:
            return None
        if not value.isdigit() or not 0 < int(value) <= MAX_ID:
            raise IncorrectLookupParameters(f"{self.title}: {value!r} is not an ID")
        return int(value)

    def queryset(self, request: Any, queryset: QuerySet[Any]) -> QuerySet[Any]:
        pk = self.chosen_id()
        return queryset if pk is None else self.filter(queryset, pk)

    def choices(self, changelist: Any) -> Any:
        pk = self.chosen_id()
        keep = QueryDict(
            changelist.get_query_string(remove=[self.parameter_name, PAGE_VAR]).lstrip("?")
        )
        yield {
            "parameter_name": self.parameter_name,
            "value": "" if pk is None else str(pk),
            "chosen": None if pk is None else self.label(pk),
            "hidden": [(key, value) for key, values in keep.lists() for value in values],
            "clear_url": changelist.get_query_string(remove=[self.parameter_name, PAGE_VAR]),
            "selected": pk is not None,
            "display": self.title,
        }
