"""Request-level Cumulocity conventions that precede any view (spec README §1 and §2)."""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse

from deviceplatform.api.exceptions import PayloadTooLarge, error_response

PROCESSING_MODES = frozenset({"PERSISTENT", "TRANSIENT", "QUIESCENT", "CEP"})
OVERRIDABLE_METHODS = frozenset({"PUT", "DELETE", "GET"})


class CumulocityRequestMiddleware:
    """- `POST` with `X-HTTP-METHOD: PUT|DELETE|GET` is handled as that method.
    - `X-Cumulocity-Processing-Mode` must be a known value (422); it is kept on the request.
    - A declared body larger than the limit is refused with 413 before it is read.
    - Every non-streaming response carries Content-Length (pyc8y decides "empty" by it)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self._check(request) or self.get_response(request)
        if not response.streaming and not response.has_header("Content-Length"):
            response["Content-Length"] = str(len(response.content))
        return response

    def _check(self, request: HttpRequest) -> HttpResponse | None:
        override = request.META.get("HTTP_X_HTTP_METHOD", "").strip().upper()
        if request.method == "POST" and override in OVERRIDABLE_METHODS:
            request.method = override
        mode = request.META.get("HTTP_X_CUMULOCITY_PROCESSING_MODE", "PERSISTENT").strip().upper()
        if mode not in PROCESSING_MODES:
            return error_response(
                422,
                "undefined/validationError",
                f"Unknown X-Cumulocity-Processing-Mode {mode!r}; "
                f"expected one of {', '.join(sorted(PROCESSING_MODES))}",
            )
        request.processing_mode = mode  # type: ignore[attr-defined]
        try:
            declared = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            declared = 0
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is not None and declared > limit:
            return error_response(413, PayloadTooLarge.error, PayloadTooLarge.default_message)
        return None
