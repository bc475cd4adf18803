"""Request-level Cumulocity conventions that precede any view (spec README §1 and §2)."""

from __future__ import annotations

import io
from collections.abc import Callable
from inspect import iscoroutinefunction

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.utils.decorators import sync_and_async_middleware

from deviceplatform.api.exceptions import PayloadTooLarge, error_response

OVERRIDABLE_METHODS = frozenset({"PUT", "DELETE", "GET"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@sync_and_async_middleware
def cumulocity_request_middleware(get_response: Callable[..., object]) -> Callable[..., object]:
    """- `POST` with `X-HTTP-METHOD: PUT|DELETE|GET` is handled as that method.
    - A declared body larger than the limit is refused with 413 before it is read; an undeclared
      (chunked) one is read up to the limit here.
    - Every non-streaming response carries Content-Length (pyc8y decides "empty" by it).
    - A path with a NUL (`%00`) names no resource: 404 before any view (PostgreSQL refuses NUL
      in a query, so an ID or external ID holding one could only end in a 500).

    Async-capable: under ASGI an async view (realtime long-polling, the operation wait) runs
    without a thread hop; a sync-only middleware would pin a thread for its whole hold."""
    if iscoroutinefunction(get_response):

        async def middleware_async(request: HttpRequest) -> HttpResponse:
            response = _check(request) or await get_response(request)  # type: ignore[misc]
            return _with_length(response)

        return middleware_async

    def middleware(request: HttpRequest) -> HttpResponse:
        return _with_length(_check(request) or get_response(request))  # type: ignore[arg-type]

    return middleware


def _with_length(response: HttpResponse) -> HttpResponse:
    if not response.streaming and not response.has_header("Content-Length"):
        response["Content-Length"] = str(len(response.content))
    return response


def _check(request: HttpRequest) -> HttpResponse | None:
    if "\x00" in request.path:
        return error_response(
            404, "general/Not Found", "No resource at a path with a NUL character"
        )
    override = request.META.get("HTTP_X_HTTP_METHOD", "").strip().upper()
    if request.method == "POST" and override in OVERRIDABLE_METHODS:
        request.method = override
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    if limit is not None and declared > limit:
        return error_response(413, PayloadTooLarge.error, PayloadTooLarge.default_message)
    if not request.META.get("CONTENT_LENGTH") and request.method in BODY_METHODS:
        return _read_undeclared_body(request, limit)
    return None


def _read_undeclared_body(request: HttpRequest, limit: int | None) -> HttpResponse | None:
    """A chunked body (ASGI) declares no length, and DRF ignores a body without one: read at most
    limit + 1 bytes, refuse more with 413, and declare the length of what was read. (Under ASGI the
    body is already spooled by Django's handler, so this read does not block.)"""
    body = request.read() if limit is None else request.read(limit + 1)
    if limit is not None and len(body) > limit:
        return error_response(413, PayloadTooLarge.error, PayloadTooLarge.default_message)
    request._body = body  # as HttpRequest.body caches it; DRF reads the body from there
    request._stream = io.BytesIO(body)
    request.META["CONTENT_LENGTH"] = str(len(body))
    return None
