"""OpenAPI description of bulk operations (deviceplatform/schema.py explains how the document is
built; docs/api/bulkoperations.md is the prose)."""

from __future__ import annotations

from functools import cache
from typing import Any

from drf_spectacular.utils import extend_schema_view

from bulkops import views
from bulkops.models import COUNTERS, BulkStatus
from bulkops.serializers import GENERAL_STATUSES
from deviceplatform.api.media_types import MediaType
from deviceplatform.schema import (
    DATE_TIME,
    ETAG,
    ID,
    IF_MATCH,
    PAGING,
    c8y_operation,
    collection,
    obj,
    path,
    query,
    ref,
    url,
)

BULK_ID = path("id", "The bulk operation's ID")
OTHER_KEYS = "Any other key is stored and returned as sent."
SELECTOR = {
    "groupId": {"type": ["string", "integer"], "description": "A static or smart group"},
    "failedParentId": {
        "type": ["string", "integer"],
        "description": "The failed children of another bulk operation",
    },
    "failedBulkOperationId": {"type": ["string", "integer"], "description": "= failedParentId"},
}
INPUT = {
    **SELECTOR,
    "startDate": DATE_TIME,
    "creationRamp": {
        "type": ["number", "string"],
        "description": "Seconds between two children, 0 to 10,000,000",
    },
    "operationPrototype": {"type": "object", "description": "The body of every child"},
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "BulkOperation": obj(
        {
            "id": ID,
            "self": url(),
            "groupId": ID,
            "failedParentId": ID,
            "startDate": DATE_TIME,
            "creationRamp": {"type": "number", "minimum": 0},
            "operationPrototype": {"type": "object"},
            "status": {"type": "string", "enum": [status.value for status in BulkStatus]},
            "generalStatus": {"type": "string", "enum": list(GENERAL_STATUSES)},
            "progress": obj(
                {key: {"type": "integer", "minimum": 0} for key in (*COUNTERS, "all")},
                [*COUNTERS, "all"],
            ),
            "c8y_RampError": obj(
                {
                    "reason": {"type": "string"},
                    "time": {"type": ["string", "null"], "format": "date-time"},
                    "attempts": {"type": "integer"},
                },
                description="Only while the ramp is failing",
            ),
        },
        ["id", "self", "startDate", "creationRamp", "operationPrototype", "status", "progress"],
        description=f"One operation for many devices, created at a ramp (bulkoperations.md). {OTHER_KEYS}",
    ),
    "BulkOperationInput": obj(
        INPUT,
        ["startDate", "creationRamp", "operationPrototype"],
        description=f"Exactly one of groupId and failedParentId. {OTHER_KEYS}",
    ),
    "BulkOperationUpdate": obj(
        INPUT, description=f"The keys present replace the stored values. {OTHER_KEYS}"
    ),
    "BulkOperationCollection": collection("bulkOperations", ref("BulkOperation")),
}


@cache
def _attach() -> None:
    bulk = MediaType.BULK_OPERATION
    extend_schema_view(
        get=c8y_operation(
            "List bulk operations",
            response=ref("BulkOperationCollection"),
            media_type=MediaType.BULK_OPERATION_COLLECTION,
            parameters=[
                query("withDeleted", bool, "Include cancelled (DELETED) ones"),
                query(
                    "generalStatus",
                    {"type": "string", "enum": list(GENERAL_STATUSES)},
                    "Repeatable",
                ),
                *PAGING,
            ],
        ),
        post=c8y_operation(
            "Create a bulk operation",
            request=ref("BulkOperationInput"),
            response=ref("BulkOperation"),
            media_type=bulk,
            status=201,
            parameters=[ETAG],
        ),
    )(views.BulkOperationCollectionView)
    extend_schema_view(
        get=c8y_operation(
            "Get a bulk operation",
            response=ref("BulkOperation"),
            media_type=bulk,
            parameters=[BULK_ID, ETAG],
        ),
        put=c8y_operation(
            "Change a running bulk operation",
            request=ref("BulkOperationUpdate"),
            response=ref("BulkOperation"),
            media_type=bulk,
            parameters=[BULK_ID, IF_MATCH, ETAG],
        ),
        delete=c8y_operation(
            "Cancel a bulk operation",
            status=204,
            parameters=[
                BULK_ID,
                IF_MATCH,
                query("cancelPending", bool, "Extension: also fail its PENDING children"),
            ],
        ),
    )(views.BulkOperationDetailView)


def attach(endpoints: list[Any], **kwargs: Any) -> list[Any]:
    """Preprocessing hook: the descriptions above onto the views (once per process)."""
    _attach()
    return endpoints


def postprocess(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    result.setdefault("components", {}).setdefault("schemas", {}).update(SCHEMAS)
    return result
