"""Domain errors and the one handler that renders every error in the Cumulocity shape (spec README §6)."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponse
from django.views import defaults
from rest_framework import exceptions as drf
from rest_framework.response import Response

from deviceplatform.api.media_types import ERROR_CONTENT_TYPE
from deviceplatform.api.renderers import dumps
from deviceplatform.logs import current_request_id

logger = logging.getLogger(__name__)

INFO_URL = "https://cumulocity.com/guides/reference/rest-implementation/#error_reporting"


class ApiError(Exception):
    """Base of our domain errors: an HTTP status, a Cumulocity `<area>/<name>` and a message."""

    status_code = 500
    error = "general/internalError"
    default_message = "Internal server error"

    def __init__(self, message: str | None = None, *, error: str | None = None) -> None:
        self.message = message or self.default_message
        if error:
            self.error = error
        super().__init__(self.message)


class BadRequest(ApiError):
    status_code = 400
    error = "general/badRequest"
    default_message = "Bad request"


class NotFound(ApiError):
    status_code = 404
    error = "general/Not Found"
    default_message = "Not found"


class Conflict(ApiError):
    status_code = 409
    error = "general/Conflict"
    default_message = "Conflict"


class ValidationFailed(ApiError):
    """422: a body or query value that is well-formed JSON but not acceptable."""

    status_code = 422
    error = "undefined/validationError"
    default_message = "Invalid data"


class MissingFields(ValidationFailed):
    def __init__(self, fields: list[str]) -> None:
        super().__init__(
            "Following mandatory fields should be included: " + ",".join(sorted(fields))
        )


class InvalidQuery(ValidationFailed):
    def __init__(self, message: str) -> None:
        super().__init__(f"Invalid data! A query could not be understood: {message}")


class PreconditionFailed(ApiError):
    """412: `If-Match` named a version of the resource that is no longer the current one."""

    status_code = 412
    error = "general/preconditionFailed"
    default_message = "The resource changed since the version named in If-Match"


class PayloadTooLarge(ApiError):
    status_code = 413
    error = "general/requestEntityTooLarge"
    default_message = "Request body is larger than the configured limit"


def error_body(status: int, error: str, message: str) -> dict[str, str]:
    """The three Cumulocity keys, `info` the constant documentation URL clients may show as a
    link, plus `requestId` (the `X-Request-ID` of the request, which its log lines carry) when a
    request is being handled: an extra key, as the JSON clients that read these bodies (c8y-api,
    @c8y/client, Cumulocity's generated clients) ignore unknown keys; `info` stays a URL."""
    body = {"error": error, "message": message, "info": INFO_URL}
    request_id = current_request_id()
    if request_id is not None:
        body["requestId"] = request_id
    return body


BASIC_CHALLENGE = 'Basic realm="Cumulocity"'


def error_response(status: int, error: str, message: str, headers: dict[str, str] | None = None):
    """A plain Django response in the error shape: for middleware and Django's own error handlers."""
    response = HttpResponse(
        dumps(error_body(status, error, message)), status=status, content_type=ERROR_CONTENT_TYPE
    )
    for key, value in (headers or {}).items():
        response[key] = value
    return response


def unauthorized_response(message: str) -> HttpResponse:
    """401 with the Basic challenge, for async views outside DRF."""
    return error_response(
        401, "security/Unauthorized", message, headers={"WWW-Authenticate": BASIC_CHALLENGE}
    )


def throttled_response(exc: drf.Throttled) -> HttpResponse:
    """429 with `Retry-After` (too many failed authentications), for async views outside DRF."""
    return error_response(
        429,
        "security/tooManyRequests",
        str(exc.detail),
        headers={"Retry-After": str(int(exc.wait or 1))},
    )


def method_not_allowed_response(method: str | None, allowed: str) -> HttpResponse:
    """405 with `Allow`, for async views outside DRF."""
    return error_response(
        405,
        "general/methodNotAllowed",
        f'Method "{method}" not allowed.',
        headers={"Allow": allowed},
    )


# DRF's own exceptions mapped onto Cumulocity names.
_DRF_ERRORS: list[tuple[type[Exception], str, str | None]] = [
    (drf.NotAuthenticated, "security/Unauthorized", "Invalid credentials! : Bad credentials"),
    (drf.AuthenticationFailed, "security/Unauthorized", None),
    (drf.PermissionDenied, "security/Forbidden", "Access is denied"),
    (drf.NotFound, "general/Not Found", None),
    (drf.MethodNotAllowed, "general/methodNotAllowed", None),
    (drf.UnsupportedMediaType, "general/unsupportedMediaType", None),
    (drf.ParseError, "general/badRequest", None),
    (drf.NotAcceptable, "general/notAcceptable", None),
    (drf.ValidationError, "undefined/validationError", None),
    (drf.Throttled, "security/tooManyRequests", None),
]


def _flatten_detail(detail: Any) -> str:
    if isinstance(detail, dict):
        return "; ".join(f"{key}: {_flatten_detail(value)}" for key, value in detail.items())
    if isinstance(detail, list):
        return "; ".join(_flatten_detail(item) for item in detail)
    return str(detail)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's EXCEPTION_HANDLER: every failure leaves in the Cumulocity error shape."""
    headers: dict[str, str] = {}
    if isinstance(exc, ApiError):
        status, error, message = exc.status_code, exc.error, exc.message
    elif isinstance(exc, RequestDataTooBig):
        status, error, message = 413, PayloadTooLarge.error, PayloadTooLarge.default_message
    elif isinstance(exc, Http404):
        status, error, message = 404, "general/Not Found", str(exc) or "Not found"
    elif isinstance(exc, DjangoPermissionDenied):
        status, error, message = 403, "security/Forbidden", "Access is denied"
    elif isinstance(exc, drf.APIException):
        status = exc.status_code
        error, message = "general/error", _flatten_detail(exc.detail)
        for exc_class, name, fixed_message in _DRF_ERRORS:
            if isinstance(exc, exc_class):
                error, message = name, fixed_message or message
                break
        if isinstance(exc, drf.ValidationError):
            status = 422
        if isinstance(exc, drf.NotAuthenticated | drf.AuthenticationFailed):
            status = 401
            headers["WWW-Authenticate"] = BASIC_CHALLENGE
        if isinstance(exc, drf.Throttled) and exc.wait:
            headers["Retry-After"] = str(int(exc.wait))
        if isinstance(exc, drf.MethodNotAllowed):
            view = context.get("view")
            if view is not None:
                headers["Allow"] = ", ".join(view.allowed_methods)
    else:
        return None  # a bug: Django's handler500 renders it (and it is logged there)
    return Response(
        error_body(status, error, message),
        status=status,
        headers=headers,
        content_type=ERROR_CONTENT_TYPE,
    )


# Django's own error views (urls.py handler400/403/404/500), for paths DRF never sees.
def handler400(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if isinstance(exception, RequestDataTooBig):
        return error_response(413, PayloadTooLarge.error, PayloadTooLarge.default_message)
    return error_response(400, "general/badRequest", "Bad request")


def handler403(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return error_response(403, "security/Forbidden", "Access is denied")


def handler404(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if request.path.startswith("/admin/"):
        return defaults.page_not_found(request, exception or Http404())
    return error_response(404, "general/Not Found", f"No resource at {request.path}")


def handler500(request: HttpRequest) -> HttpResponse:
    return error_response(500, "general/internalError", "Internal server error")
