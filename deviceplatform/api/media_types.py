"""Cumulocity vendor media types and the content negotiation rules of spec README §2."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any

from rest_framework.negotiation import BaseContentNegotiation

if TYPE_CHECKING:
    from rest_framework.request import Request

VENDOR_PREFIX = "application/vnd.com.nsn.cumulocity."
VENDOR_PARAMS = ";charset=UTF-8;ver=0.9"
PLAIN_JSON = "application/json;charset=UTF-8"
MULTIPART = "multipart/form-data"


class MediaType(StrEnum):
    """Canonical lowercase `<type>` names as we emit them."""

    PLATFORM_API = "platformapi"
    INVENTORY_API = "inventoryapi"
    MANAGED_OBJECT = "managedobject"
    MANAGED_OBJECT_COLLECTION = "managedobjectcollection"
    MANAGED_OBJECT_REFERENCE = "managedobjectreference"
    MANAGED_OBJECT_REFERENCE_COLLECTION = "managedobjectreferencecollection"
    IDENTITY_API = "identityapi"
    EXTERNAL_ID = "externalid"
    EXTERNAL_ID_COLLECTION = "externalidcollection"
    DEVICE_CONTROL_API = "devicecontrolapi"
    OPERATION = "operation"
    OPERATION_COLLECTION = "operationcollection"
    BULK_OPERATION = "bulkoperation"
    BULK_OPERATION_COLLECTION = "bulkoperationcollection"
    NEW_DEVICE_REQUEST = "newdevicerequest"
    NEW_DEVICE_REQUEST_COLLECTION = "newdevicerequestcollection"
    DEVICE_CREDENTIALS = "devicecredentials"
    BULK_NEW_DEVICE_REQUEST = "bulknewdevicerequest"
    CURRENT_TENANT = "currenttenant"
    CURRENT_USER = "currentuser"
    LOGIN_OPTION_COLLECTION = "loginoptioncollection"
    ERROR = "error"

    @property
    def content_type(self) -> str:
        return f"{VENDOR_PREFIX}{self.value}+json{VENDOR_PARAMS}"


ERROR_CONTENT_TYPE = MediaType.ERROR.content_type


def _essence(media_range: str) -> str:
    """`type/subtype` of one media range, lowercased, without parameters."""
    return media_range.split(";", 1)[0].strip().lower()


def accepted_types(accept_header: str) -> set[str]:
    """The media types named in an Accept header (q-values ignored, as the spec says)."""
    return {_essence(part) for part in accept_header.split(",") if part.strip()}


def response_content_type(accept_header: str | None, media_type: MediaType) -> str:
    """The vendor type when the client named it in Accept (any case), plain JSON otherwise. Never 406."""
    if accept_header and f"{VENDOR_PREFIX}{media_type.value}+json" in accepted_types(accept_header):
        return media_type.content_type
    return PLAIN_JSON


def is_json_content_type(content_type: str) -> bool:
    """`application/json` or any `application/vnd.com.nsn.cumulocity.*+json`, any case and parameters."""
    essence = _essence(content_type)
    return essence == "application/json" or (
        essence.startswith(VENDOR_PREFIX) and essence.endswith("+json")
    )


class CumulocityContentNegotiation(BaseContentNegotiation):
    """Always our one JSON renderer and parser: the spec never answers 406, and the response's
    Content-Type is chosen per resource by `response_content_type`."""

    def select_parser(self, request: Request, parsers: list[Any]) -> Any:
        """JSON bodies go to the view's JSON parser; `multipart/form-data` only to a view that
        lists a multipart parser (the CSV upload of `bulkNewDeviceRequests`); anything else 415."""
        content_type = request.content_type or "application/json"
        if is_json_content_type(content_type):
            wanted = "application/json"
        elif _essence(content_type) == MULTIPART:
            wanted = MULTIPART
        else:
            return None
        return next((parser for parser in parsers if parser.media_type == wanted), None)

    def select_renderer(
        self, request: Request, renderers: list[Any], format_suffix: str | None = None
    ) -> tuple[Any, str]:
        renderer = renderers[0]
        return renderer, renderer.media_type
