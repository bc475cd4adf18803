"""Wire format of device control (spec devicecontrol.md); operations arrive with their own issue."""

from __future__ import annotations

from typing import Any

from devicecontrol.models import Operation, OperationStatus
from deviceplatform.api.dates import format_datetime


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
