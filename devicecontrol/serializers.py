"""Wire format of device control (spec devicecontrol.md): operations, device registration requests
and device credentials."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from django.conf import settings

from devicecontrol.models import NewDeviceRequest, Operation, OperationStatus
from deviceplatform.api.dates import format_datetime
from deviceplatform.api.exceptions import MissingFields, ValidationFailed

INVALID_DATA = "devicecontrol/Invalid Data"


def devicecontrol_api_json(base: str) -> dict[str, Any]:
    """`GET /devicecontrol` (devicecontrol.md §2); the Java SDK reads `operations.self`."""
    operations = f"{base}/devicecontrol/operations"
    return {
        "self": f"{base}/devicecontrol",
        "operations": {"self": operations},
        "operationsByStatus": f"{operations}?status={{status}}",
        "operationsByAgentId": f"{operations}?agentId={{agentId}}",
        "operationsByAgentIdAndStatus": f"{operations}?agentId={{agentId}}&status={{status}}",
        "operationsByDeviceId": f"{operations}?deviceId={{deviceId}}",
        "operationsByDeviceIdAndStatus": f"{operations}?deviceId={{deviceId}}&status={{status}}",
    }


# --- operations ------------------------------------------------------------------------------------

# Keys of an operation body that are never fragments (devicecontrol.md §3, §6, §7). `deviceId` and
# `status` are read by the services; the rest are read-only and ignored on input.
READ_ONLY_KEYS = frozenset(
    {
        "id",
        "self",
        "deviceId",
        "status",
        "creationTime",
        "failureReason",
        "bulkOperationId",
        "deviceName",
        "deviceExternalIDs",
        "agentId",
        "delivery",
        "retryOf",
    }
)
# Extension keys beyond Cumulocity (README "Beyond Cumulocity"): seconds, validated by the services.
EXTENSION_KEYS = frozenset({"pendingTimeout", "executionTimeout"})


def operation_url(base: str, pk: int) -> str:
    return f"{base}/devicecontrol/operations/{pk}"


def operation_json(
    operation: Operation,
    *,
    base: str,
    device_name: str | None = None,
    external_ids: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One operation. `device_name` and `external_ids` are given only for collection responses
    (`deviceName` when the device has a name; `deviceExternalIDs` when listing by agentId)."""
    body: dict[str, Any] = {
        "id": str(operation.pk),
        "self": operation_url(base, operation.pk),
        "deviceId": str(operation.device_id),
    }
    if device_name is not None:
        body["deviceName"] = device_name
    body["status"] = operation.status
    body["creationTime"] = format_datetime(operation.creation_time)
    if operation.status == OperationStatus.FAILED and operation.failure_reason is not None:
        body["failureReason"] = operation.failure_reason
    if operation.bulk_operation_id is not None:
        body["bulkOperationId"] = str(operation.bulk_operation_id)
    if operation.retry_of_id is not None:
        body["retryOf"] = str(operation.retry_of_id)
    body.update(operation.fragments)
    if external_ids is not None:
        body["deviceExternalIDs"] = {
            "self": f"{base}/identity/globalIds/{operation.device_id}/externalIds",
            "externalIds": external_ids,
        }
    return body


# --- device registration (newDeviceRequests) and device credentials ----------------------------

# Keys of a newDeviceRequest the server owns: ignored in a request body (docs/api/conventions.md).
NEW_DEVICE_REQUEST_OWNED_KEYS = frozenset(
    {
        "self",
        "owner",
        "tenantId",
        "creationTime",
        "acceptedBy",
        "acceptanceTime",
        "credentialsIssuedTime",
        "securityTokenSet",
    }
)


def _body_keys(data: dict[str, Any], allowed: frozenset[str]) -> None:
    """422 naming the keys that are neither `allowed` nor owned by the server: a request stores
    no fragments, so a key it would silently drop (a `groupId`, say) is refused instead."""
    unknown = sorted(set(data) - allowed - NEW_DEVICE_REQUEST_OWNED_KEYS)
    if unknown:
        raise ValidationFailed(
            f"Unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
            "a newDeviceRequest takes id, status (PUT) and securityToken",
            error=INVALID_DATA,
        )


def new_device_request_create_input(data: dict[str, Any]) -> tuple[object, str | None]:
    """(id, securityToken) of a POST body; `status` is ignored (a request starts waiting)."""
    _body_keys(data, frozenset({"id", "securityToken", "status"}))
    if data.get("id") in (None, ""):
        raise MissingFields(["id"])
    return data["id"], security_token_input(data.get("securityToken"))


def new_device_request_update_input(data: dict[str, Any]) -> tuple[object, str | None]:
    """(status, securityToken) of a PUT body; `id` is ignored (the path names the request)."""
    _body_keys(data, frozenset({"id", "securityToken", "status"}))
    if data.get("status") in (None, ""):
        raise MissingFields(["status"])
    return data["status"], security_token_input(data.get("securityToken"))


MAX_SECURITY_TOKEN_LENGTH = 1024


def security_token_input(value: object) -> str | None:
    """A security token: a non-empty string (absent or null: none)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValidationFailed(
            "Invalid value for securityToken: a non-empty string is expected", error=INVALID_DATA
        )
    if len(value) > MAX_SECURITY_TOKEN_LENGTH:
        raise ValidationFailed(
            f"Invalid value for securityToken: at most {MAX_SECURITY_TOKEN_LENGTH} characters "
            f"are allowed, not {len(value)}",
            error=INVALID_DATA,
        )
    return value


def new_device_request_url(base: str, device_id: str) -> str:
    return f"{base}/devicecontrol/newDeviceRequests/{quote(device_id, safe='')}"


def new_device_request_json(request: NewDeviceRequest, *, base: str) -> dict[str, Any]:
    """One request. The security token is never shown, only whether one is set; when the device
    last polled is left out (it changes every second while a device waits, and would change the
    ETag with it); the admin shows it."""
    body: dict[str, Any] = {
        "id": request.device_id,
        "self": new_device_request_url(base, request.device_id),
        "status": request.status,
        "owner": request.owner,
        "tenantId": settings.C8Y_TENANT_ID,
        "creationTime": format_datetime(request.creation_time),
    }
    if request.has_security_token:
        body["securityTokenSet"] = True
    if request.accepted_at is not None:
        body["acceptedBy"] = request.accepted_by
        body["acceptanceTime"] = format_datetime(request.accepted_at)
    if request.credentials_issued_at is not None:
        body["credentialsIssuedTime"] = format_datetime(request.credentials_issued_at)
    return body


def device_credentials_json(
    *, device_id: str, username: str, password: str, base: str
) -> dict[str, Any]:
    """The one answer that carries a device's password (shown once, never stored or logged)."""
    return {
        "id": device_id,
        "self": f"{base}/devicecontrol/deviceCredentials/{quote(device_id, safe='')}",
        "tenantId": settings.C8Y_TENANT_ID,
        "username": username,
        "password": password,
    }
