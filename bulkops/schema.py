"""OpenAPI description of bulk operations (deviceplatform/schema.py explains how the document is
built; docs/api/bulkoperations.md is the prose)."""

from __future__ import annotations

from functools import cache
from typing import Any

from drf_spectacular.utils import extend_schema_view

from bulkops import views
from bulkops.models import COUNTERS, BulkStatus, RolloutState
from bulkops.rollout import RATE_CRITERIA, WAVE_THEN
from bulkops.serializers import GENERAL_STATUSES
from devicecontrol.schema import RETRY_CONFIG
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
PERCENT = {"type": "number", "minimum": 0, "maximum": 100}
ROLLOUT_CONFIG = obj(
    {
        "maximumPerMinute": {"type": "number", "exclusiveMinimum": 0},
        "exponentialRate": obj(
            {
                "baseRatePerMinute": {"type": "number", "exclusiveMinimum": 0},
                "incrementFactor": {"type": "number"},
                "rateIncreaseCriteria": obj(
                    {key: {"type": "integer", "minimum": 1} for key in RATE_CRITERIA},
                    description="Exactly one of the two",
                    additional=False,
                ),
            },
            ["baseRatePerMinute", "incrementFactor", "rateIncreaseCriteria"],
            additional=False,
        ),
    },
    additional=False,
    description=(
        "Extension: a rate instead of creationRamp (constant maximumPerMinute, or exponential "
        'capped by it), README "Rollout rates, waves, pause and resume"'
    ),
)
WAVES = {
    "type": "array",
    "minItems": 1,
    "maxItems": 100,
    "items": obj(
        {
            "size": {"type": "integer", "minimum": 1},
            "percentage": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
            "successThreshold": {**PERCENT, "default": 100},
            "then": {"type": "string", "enum": list(WAVE_THEN), "default": "CONTINUE"},
        },
        additional=False,
        description="Exactly one of size and percentage",
    ),
    "description": "Extension: waves, each gated on its children's success rate",
}
ABORT_CONFIG = obj(
    {
        "criteria": {
            "type": "array",
            "items": obj(
                {
                    "failureType": {"type": "string", "enum": ["FAILED", "TIMED_OUT", "ANY"]},
                    "thresholdPercentage": PERCENT,
                    "minNumberOfExecuted": {"type": "integer", "minimum": 0},
                },
                ["failureType", "thresholdPercentage"],
                additional=False,
            ),
        }
    },
    ["criteria"],
    additional=False,
    description='Extension: abort thresholds (README "Abort thresholds")',
)
INPUT = {
    **SELECTOR,
    "rolloutConfig": ROLLOUT_CONFIG,
    "waves": WAVES,
    "abortConfig": {"oneOf": [ABORT_CONFIG, {"type": "null"}]},
    "retryConfig": {"oneOf": [RETRY_CONFIG, {"type": "null"}]},
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
            "rolloutConfig": ROLLOUT_CONFIG,
            "waves": WAVES,
            "rollout": obj(
                {
                    "state": {
                        "type": "string",
                        "enum": [*(state.value for state in RolloutState), "ABORTED", "DONE"],
                    },
                    "wave": {"type": "integer", "minimum": 1},
                    "currentRatePerMinute": {"type": "number", "minimum": 0},
                    "reason": {"type": "string"},
                },
                ["state"],
                description="Extension, read only: where the rollout stands",
            ),
            "abortConfig": ABORT_CONFIG,
            "abortReason": obj(
                {
                    "criterion": {"type": "object"},
                    "failed": {"type": "integer"},
                    "finished": {"type": "integer"},
                    "percentage": {"type": "number"},
                    "pendingFailed": {"type": "integer"},
                    "createdChildren": {"type": "integer"},
                    "time": DATE_TIME,
                    "message": {"type": "string"},
                },
                description="Extension: why an abort threshold ended it",
            ),
            "retryConfig": RETRY_CONFIG,
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
        description=(
            f"One operation for many devices, created at a ramp (bulkoperations.md). {OTHER_KEYS}"
        ),
    ),
    "BulkOperationInput": obj(
        INPUT,
        ["startDate", "operationPrototype"],
        description=(
            f"Exactly one of groupId and failedParentId; creationRamp unless rolloutConfig gives "
            f"a rate. {OTHER_KEYS}"
        ),
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
            description=(
                "No body is read; one that is there must be a JSON object (malformed 400, another "
                "media type 415, not an object 422). cancelPending is exactly true or false."
            ),
            errors={400: "Malformed JSON body", 415: "A body of another media type"},
            parameters=[
                BULK_ID,
                IF_MATCH,
                query("cancelPending", bool, "Extension: also fail its PENDING children"),
            ],
        ),
    )(views.BulkOperationDetailView)
    extend_schema_view(
        post=c8y_operation(
            "Pause or resume a rollout (extension)",
            description=(
                "pause: no more children are created until resume; resume restarts the schedule "
                "from now (at a wave's end: starts the next wave). No body is read."
            ),
            response=ref("BulkOperation"),
            media_type=bulk,
            parameters=[BULK_ID, ETAG],
        )
    )(views.BulkOperationRolloutView)


def attach(endpoints: list[Any], **kwargs: Any) -> list[Any]:
    """Preprocessing hook: the descriptions above onto the views (once per process)."""
    _attach()
    return endpoints


def postprocess(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    result.setdefault("components", {}).setdefault("schemas", {}).update(SCHEMAS)
    return result
