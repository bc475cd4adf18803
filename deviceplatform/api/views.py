"""The base view every REST resource uses: validate, call, render with the right media type."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from rest_framework.generics import GenericAPIView
from rest_framework.request import Request
from rest_framework.response import Response

from deviceplatform.api.etags import Precondition, etag_of, precondition
from deviceplatform.api.exceptions import ValidationFailed
from deviceplatform.api.media_types import MediaType, response_content_type
from deviceplatform.roles import Role

T = TypeVar("T")


def base_url(request: Any) -> str:
    """Absolute root URL (scheme and host of the request, X-Forwarded-* when configured)."""
    return request.build_absolute_uri("/").rstrip("/")


PROCESSING_MODES = frozenset({"PERSISTENT", "TRANSIENT", "QUIESCENT", "CEP"})


class CumulocityView(GenericAPIView):
    """One Cumulocity resource. Subclasses set `required_roles` and implement get/post/put/delete."""

    required_roles: ClassVar[dict[str, frozenset[Role]]] = {}
    owner_rule_methods: ClassVar[frozenset[str]] = frozenset()
    metadata_class = None  # OPTIONS is no Cumulocity method: 405 (DRF's metadata would be a 500)

    def owner_of(self, obj: Any) -> str | None:
        return getattr(obj, "owner", None)

    def respond(
        self,
        data: Any,
        media_type: MediaType,
        *,
        status: int = 200,
        location: str | None = None,
        etag: bool = False,
    ) -> Response:
        """Render `data` (a dict, or a callable producing it) with the resource's media type;
        `etag`: a single object, whose answer carries its entity tag (`deviceplatform.api.etags`).

        The empty-body rule (spec README §2): a POST or PUT without any Accept header gets no body."""
        request: Request = self.request
        accept = request.META.get("HTTP_ACCEPT")
        headers = {"Location": location} if location else {}
        empty = request.method in ("POST", "PUT") and accept is None
        if empty and not etag:
            return Response(None, status=status, headers=headers, content_type=None)
        body = data() if callable(data) else data
        if etag:
            headers["ETag"] = etag_of(body)
        if empty:
            return Response(None, status=status, headers=headers, content_type=None)
        return Response(
            body,
            status=status,
            headers=headers,
            content_type=response_content_type(accept, media_type),
        )

    def if_match(self, render: Callable[[T], Any]) -> Precondition[T] | None:
        """The request's `If-Match` as a check for the service to run under its row lock;
        `render(row)` renders the row as this view's GET does by default."""
        return precondition(self.request.META.get("HTTP_IF_MATCH"), render)

    def no_content(self) -> Response:
        return Response(None, status=204)

    @property
    def processing_mode(self) -> str:
        """`X-Cumulocity-Processing-Mode` (spec README §1); validated in `initial`."""
        return self.request.META.get("HTTP_X_CUMULOCITY_PROCESSING_MODE", "PERSISTENT").upper()

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(
            request, *args, **kwargs
        )  # authentication and roles come first (auth.md §6)
        if self.processing_mode.strip() not in PROCESSING_MODES:
            raise ValidationFailed(
                f"Unknown X-Cumulocity-Processing-Mode {self.processing_mode!r}; "
                f"expected one of {', '.join(sorted(PROCESSING_MODES))}"
            )

    @property
    def notify(self) -> bool:
        """QUIESCENT processing suppresses realtime notifications for the change."""
        return self.processing_mode.strip() != "QUIESCENT"

    def request_object(self) -> dict[str, Any]:
        """The request body, which must be a JSON object (missing or another JSON value: 422)."""
        data = self.request.data
        if data is None or self.request.stream is None:
            raise ValidationFailed("The request body is missing; a JSON object is expected")
        if not isinstance(data, dict):
            raise ValidationFailed("The request body must be a JSON object")
        return data

    def no_body(self) -> None:
        """An action that reads no body (pause, resume, cancel, retry) still refuses a bad one
        before changing anything: malformed JSON 400, another media type 415, a JSON value that
        is not an object 422. No body, or any JSON object, is accepted (and ignored)."""
        if self.request.stream is None:
            return
        data = self.request.data
        if data is not None and not isinstance(data, dict):
            raise ValidationFailed("The request body must be empty or a JSON object")

    @property
    def base(self) -> str:
        """The absolute root URL of this request, without trailing slash, for `self` links."""
        return base_url(self.request)
