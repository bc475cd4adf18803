"""OpenAPI description of operations and device onboarding (deviceplatform/schema.py explains how
the document is built; docs/api/devicecontrol.md and onboarding.md are the prose)."""

from __future__ import annotations

from functools import cache
from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema_view

from devicecontrol import views
from devicecontrol.filters import OperationFilter
from devicecontrol.models import NewDeviceRequestStatus, OperationStatus
from deviceplatform.api.media_types import MediaType
from deviceplatform.schema import (
    DATE_TIME,
    ETAG,
    ID,
    IF_MATCH,
    JSON,
    PAGING,
    c8y_operation,
    collection,
    filter_parameters,
    obj,
    path,
    ref,
    url,
    vendor,
)

OPERATION_ID = path("id", "The operation's ID")
STATUS = {"type": "string", "enum": [status.value for status in OperationStatus]}
FRAGMENTS = "Any other key is a fragment (null values are dropped on create, remove on update)."
RETRY_CONFIG = obj(
    {
        "criteria": {
            "type": "array",
            "minItems": 1,
            "items": obj(
                {
                    "failureType": {"type": "string", "enum": ["FAILED", "TIMED_OUT"]},
                    "numberOfRetries": {"type": "integer", "minimum": 0, "maximum": 100},
                },
                ["failureType", "numberOfRetries"],
                additional=False,
            ),
        },
        "backoffSeconds": {"type": "number", "minimum": 0, "default": 60},
        "backoffFactor": {"type": "number", "minimum": 1, "maximum": 10, "default": 2},
    },
    ["criteria"],
    additional=False,
    description='Extension: automatic retries (README "Automatic retries")',
)

SCHEMAS: dict[str, dict[str, Any]] = {
    "Operation": obj(
        {
            "id": ID,
            "self": url(),
            "deviceId": ID,
            "deviceName": {
                "type": "string",
                "description": "In collections, when the device has a name",
            },
            "status": STATUS,
            "creationTime": DATE_TIME,
            "failureReason": {"type": "string"},
            "bulkOperationId": ID,
            "retryOf": {**ID, "description": "Extension: the operation this one retries"},
            "attempt": {
                "type": "integer",
                "minimum": 1,
                "description": "Extension: automatic retries",
            },
            "retryAt": {**DATE_TIME, "description": "Extension: when the booked retry is created"},
            "retryConfig": RETRY_CONFIG,
            "c8y_CancelRequested": obj(
                {"time": DATE_TIME, "by": {"type": "string"}},
                description=(
                    "Extension: a cancel asked of the agent while EXECUTING (sent on the agent "
                    "channel to subscriptions that opted in to cancelRequests)"
                ),
            ),
            "deviceExternalIDs": obj(
                {"self": url(), "externalIds": {"type": "array", "items": ref("ExternalId")}},
                description="When listing by agentId",
            ),
        },
        ["id", "self", "deviceId", "status", "creationTime"],
        description=f"A command for one device (devicecontrol.md). {FRAGMENTS}",
    ),
    "OperationInput": obj(
        {
            "deviceId": {"type": ["string", "integer"]},
            "description": {"type": "string"},
            "pendingTimeout": {
                "type": "integer",
                "minimum": 0,
                "description": "Extension: seconds",
            },
            "executionTimeout": {
                "type": "integer",
                "minimum": 0,
                "description": "Extension: seconds",
            },
            "retryConfig": RETRY_CONFIG,
        },
        ["deviceId"],
        description=FRAGMENTS,
    ),
    "OperationUpdate": obj(
        {"status": STATUS, "failureReason": {"type": ["string", "null"]}},
        ["status"],
        description="failureReason only with FAILED. " + FRAGMENTS,
    ),
    "OperationCollection": collection("operations", ref("Operation")),
    "DeviceControlApi": obj(
        {
            "self": url(),
            "operations": ref("Link"),
            "operationsByStatus": {"type": "string"},
            "operationsByAgentId": {"type": "string"},
            "operationsByAgentIdAndStatus": {"type": "string"},
            "operationsByDeviceId": {"type": "string"},
            "operationsByDeviceIdAndStatus": {"type": "string"},
        },
        ["self", "operations"],
    ),
    "NewDeviceRequest": obj(
        {
            "id": {"type": "string", "description": "The device's own ID (e.g. its serial number)"},
            "self": url(),
            "status": {"type": "string", "enum": [s.value for s in NewDeviceRequestStatus]},
            "owner": {"type": "string"},
            "tenantId": {"type": "string"},
            "creationTime": DATE_TIME,
            "securityTokenSet": {"type": "boolean"},
            "acceptedBy": {"type": "string"},
            "acceptanceTime": DATE_TIME,
            "credentialsIssuedTime": DATE_TIME,
        },
        ["id", "self", "status"],
        description="A device registration (onboarding.md)",
    ),
    "NewDeviceRequestInput": obj(
        {"id": {"type": "string", "minLength": 1}, "securityToken": {"type": "string"}}, ["id"]
    ),
    "NewDeviceRequestUpdate": obj(
        {"status": {"type": "string", "const": "ACCEPTED"}, "securityToken": {"type": "string"}},
        ["status"],
    ),
    "NewDeviceRequestCollection": collection("newDeviceRequests", ref("NewDeviceRequest")),
    "DeviceCredentials": obj(
        {
            "id": {"type": "string"},
            "self": url(),
            "tenantId": {"type": "string"},
            "username": {"type": "string"},
            "password": {"type": "string", "description": "Shown once"},
        },
        ["id", "tenantId", "username", "password"],
    ),
    "BulkNewDeviceRequestResult": obj(
        {
            "numberOfAll": {"type": "integer"},
            "numberOfCreated": {"type": "integer"},
            "numberOfFailed": {"type": "integer"},
            "numberOfSuccessful": {"type": "integer"},
            "credentialUpdatedList": {"type": "array", "items": {"type": "object"}},
        },
        ["numberOfAll", "numberOfCreated", "numberOfFailed", "numberOfSuccessful"],
    ),
}


@cache
def _attach() -> None:
    operation = MediaType.OPERATION
    extend_schema_view(
        get=c8y_operation(
            "The device control API resource",
            response=ref("DeviceControlApi"),
            media_type=MediaType.DEVICE_CONTROL_API,
        )
    )(views.DeviceControlApiView)
    filters = filter_parameters(
        OperationFilter,
        {
            "status": "PENDING, EXECUTING, SUCCESSFUL or FAILED",
            "deviceId": "Operations of this device",
            "agentId": "Operations routed to this agent (adds deviceExternalIDs)",
            "bulkOperationId": "Children of this bulk operation",
            "fragmentType": "Operations that have this fragment",
            "dateFrom": "Created at or after",
            "dateTo": "Created at or before",
            "revert": "true: newest first",
        },
    )
    extend_schema_view(
        get=c8y_operation(
            "List operations",
            description="Visible to the caller; paged; oldest first unless revert=true.",
            response=ref("OperationCollection"),
            media_type=MediaType.OPERATION_COLLECTION,
            parameters=[*filters, *PAGING],
        ),
        post=c8y_operation(
            "Create an operation",
            owner="device",
            description="Routed to the device's agent; PENDING.",
            request=ref("OperationInput"),
            response=ref("Operation"),
            media_type=operation,
            status=201,
            parameters=[ETAG],
        ),
        delete=c8y_operation(
            "Delete the operations matching the filters", status=204, parameters=filters
        ),
    )(views.OperationCollectionView)
    extend_schema_view(
        get=c8y_operation(
            "Get an operation",
            owner="device",
            response=ref("Operation"),
            media_type=operation,
            parameters=[OPERATION_ID, ETAG],
        ),
        put=c8y_operation(
            "Update an operation (agents report progress)",
            owner="device",
            request=ref("OperationUpdate"),
            response=ref("Operation"),
            media_type=operation,
            parameters=[OPERATION_ID, IF_MATCH, ETAG],
        ),
    )(views.OperationDetailView)
    extend_schema_view(
        post=c8y_operation(
            "Retry a FAILED operation (extension)",
            owner="device",
            description="Creates a new PENDING operation with the same fragments and `retryOf`.",
            response=ref("Operation"),
            media_type=operation,
            status=201,
            parameters=[OPERATION_ID, ETAG],
        )
    )(views.OperationRetryView)
    extend_schema_view(
        post=c8y_operation(
            "Cancel an operation (extension)",
            owner="device",
            description=(
                "PENDING: FAILED at once. EXECUTING: `c8y_CancelRequested` is set; the UPDATE goes "
                "to `/operations/{deviceId}`, and to the agent channel `/{agentId}` only for "
                'subscriptions made with `"ext": {"com.deviceplatform": '
                '{"cancelRequests": true}}`. Final statuses: 422.'
            ),
            response=ref("Operation"),
            media_type=operation,
            parameters=[OPERATION_ID, ETAG],
        )
    )(views.OperationCancelView)
    request_json = MediaType.NEW_DEVICE_REQUEST
    extend_schema_view(
        get=c8y_operation(
            "List device registrations",
            response=ref("NewDeviceRequestCollection"),
            media_type=MediaType.NEW_DEVICE_REQUEST_COLLECTION,
            parameters=PAGING,
        ),
        post=c8y_operation(
            "Register a device",
            request=ref("NewDeviceRequestInput"),
            response=ref("NewDeviceRequest"),
            media_type=request_json,
            status=201,
            parameters=[ETAG],
            errors={409: "A request for this ID exists already"},
        ),
    )(views.NewDeviceRequestCollectionView)
    device = path("id", "The device's ID as registered")
    extend_schema_view(
        get=c8y_operation(
            "Get a device registration",
            response=ref("NewDeviceRequest"),
            media_type=request_json,
            parameters=[device, ETAG],
        ),
        put=c8y_operation(
            "Accept a device registration",
            request=ref("NewDeviceRequestUpdate"),
            response=ref("NewDeviceRequest"),
            media_type=request_json,
            parameters=[device, IF_MATCH, ETAG],
        ),
        delete=c8y_operation(
            "Reject a device registration", status=204, parameters=[device, IF_MATCH]
        ),
    )(views.NewDeviceRequestDetailView)
    extend_schema_view(
        post=c8y_operation(
            "Poll for device credentials (the bootstrap login)",
            request=obj({"id": {"type": "string", "minLength": 1}}, ["id"]),
            response=ref("DeviceCredentials"),
            media_type=MediaType.DEVICE_CREDENTIALS,
            status=201,
        )
    )(views.DeviceCredentialsView)
    extend_schema_view(
        post=c8y_operation(
            "Register devices from a CSV file",
            description=f"At most {settings.BULK_NEW_DEVICE_MAX_ROWS} rows (onboarding.md).",
            request_content={
                "multipart/form-data": obj(
                    {"file": {"type": "string", "contentMediaType": "text/csv"}}, ["file"]
                )
            },
            response=ref("BulkNewDeviceRequestResult"),
            media_type=MediaType.BULK_NEW_DEVICE_REQUEST,
            status=201,
        )
    )(views.BulkNewDeviceRequestView)


def attach(endpoints: list[Any], **kwargs: Any) -> list[Any]:
    """Preprocessing hook: the descriptions above onto the views (once per process)."""
    _attach()
    return endpoints


def _wait_operation() -> dict[str, Any]:
    """`POST /devicecontrol/operations/wait` is a plain async view, which drf-spectacular does not
    enumerate: described here by hand."""
    body = {"schema": ref("OperationInput")}
    answer = {"schema": ref("Operation")}
    return {
        "post": {
            "operationId": "devicecontrol_operations_wait_create",
            "summary": "Create an operation and wait for its result (extension)",
            "description": (
                "Creates the operation as POST /devicecontrol/operations does, then holds the "
                "request until it is SUCCESSFUL or FAILED or `timeout` passes; always answers "
                'with a body (README "Beyond Cumulocity").\n\nRoles: any one of '
                "`ROLE_DEVICE_CONTROL_ADMIN`, or ownership of the device."
            ),
            "tags": ["devicecontrol"],
            "security": [{"basicAuth": []}],
            "parameters": [
                {
                    "in": "query",
                    "name": "timeout",
                    "required": True,
                    "schema": {
                        "type": "number",
                        "minimum": 0,
                        "maximum": settings.OPERATION_MAX_WAIT_SECONDS,
                    },
                    "description": "Seconds to wait at most",
                }
            ],
            "requestBody": {
                "required": True,
                "content": {JSON: body, vendor(MediaType.OPERATION): body},
            },
            "responses": {
                "200": {
                    "description": "The operation reached SUCCESSFUL or FAILED",
                    "content": {JSON: answer, vendor(MediaType.OPERATION): answer},
                },
                "202": {
                    "description": "Created; still PENDING or EXECUTING when the timeout passed",
                    "content": {JSON: answer, vendor(MediaType.OPERATION): answer},
                },
            },
        }
    }


def postprocess(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    result.setdefault("components", {}).setdefault("schemas", {}).update(SCHEMAS)
    result.setdefault("paths", {})["/devicecontrol/operations/wait"] = _wait_operation()
    return result
