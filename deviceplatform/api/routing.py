"""URL patterns in Cumulocity's shapes: every path with and without a trailing slash, no redirects."""

from __future__ import annotations

from typing import Any

from django.urls import URLPattern, re_path


def c8y_path(
    route: str, view: Any, name: str | None = None, kwargs: dict[str, Any] | None = None
) -> URLPattern:
    """`route` is a regex without anchors or trailing slash, e.g. `inventory/managedObjects/(?P<pk>[^/]+)`."""
    return re_path(rf"^{route}/?$", view, kwargs=kwargs, name=name)
