"""Cumulocity paging: pageSize/currentPage, statistics, self/next/prev keeping every filter (README §5)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from django.db.models import QuerySet

from deviceplatform.api.exceptions import InvalidQuery
from deviceplatform.api.params import get_bool, get_int

DEFAULT_PAGE_SIZE = 5
MAX_PAGE_SIZE = 2000
MAX_ROW_NUMBER = 2**63 - 1  # the last row a page may reach (OFFSET + LIMIT, a bigint)


@dataclass(frozen=True)
class PageRequest:
    page_size: int
    current_page: int
    with_total_pages: bool
    with_total_elements: bool

    @property
    def offset(self) -> int:
        return (self.current_page - 1) * self.page_size

    @classmethod
    def from_params(cls, params: Any) -> PageRequest:
        page_size = min(get_int(params, "pageSize", DEFAULT_PAGE_SIZE), MAX_PAGE_SIZE)
        current_page = get_int(params, "currentPage", 1)
        # The database takes OFFSET and LIMIT as 64-bit integers (PostgreSQL: an error, SQLite's
        # driver: an OverflowError); a page that ends beyond them is a 422, not a 500.
        if current_page * page_size > MAX_ROW_NUMBER:
            raise InvalidQuery(
                f"currentPage must be at most {MAX_ROW_NUMBER // page_size} "
                f"with pageSize {page_size}, not {current_page}"
            )
        return cls(
            page_size=page_size,
            current_page=current_page,
            with_total_pages=get_bool(params, "withTotalPages"),
            with_total_elements=get_bool(params, "withTotalElements"),
        )

    @property
    def wants_total(self) -> bool:
        return self.with_total_pages or self.with_total_elements


def page_link(request: Any, path: str | None, page_size: int, page: int) -> str:
    """Absolute URL of `path` with the request's query string, pageSize and currentPage replaced."""
    items = [
        (key, value)
        for key, values in request.GET.lists()
        if key not in ("pageSize", "currentPage")
        for value in values
    ]
    items += [("pageSize", str(page_size)), ("currentPage", str(page))]
    return request.build_absolute_uri(path or request.path) + "?" + urlencode(items)


def paginated(
    request: Any,
    queryset: QuerySet[Any] | Sequence[Any],
    *,
    key: str,
    render: Callable[[list[Any]], list[Any]],
    path: str | None = None,
    page: PageRequest | None = None,
    count: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """The collection envelope for one page. `render` turns the page's rows into JSON items in one go,
    so it can batch its own lookups (no N+1). `count` overrides how totals are computed."""
    page = page or PageRequest.from_params(request.GET)
    rows = list(queryset[page.offset : page.offset + page.page_size])
    statistics: dict[str, int] = {"pageSize": page.page_size, "currentPage": page.current_page}
    if page.wants_total:
        total = count() if count else _count(queryset)
        if page.with_total_pages:
            statistics["totalPages"] = math.ceil(total / page.page_size)
        if page.with_total_elements:
            statistics["totalElements"] = total
    body: dict[str, Any] = {
        "self": page_link(request, path, page.page_size, page.current_page),
        key: render(rows),
        "statistics": statistics,
    }
    if page.current_page > 1:
        body["prev"] = page_link(request, path, page.page_size, page.current_page - 1)
    body["next"] = page_link(request, path, page.page_size, page.current_page + 1)
    return body


def _count(queryset: QuerySet[Any] | Sequence[Any]) -> int:
    if isinstance(queryset, QuerySet):
        return queryset.order_by().count()
    return len(queryset)
