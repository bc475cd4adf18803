"""OpenAPI description of the inventory and identity resources (deviceplatform/schema.py explains
how the document is built; docs/api/inventory.md and identity.md are the prose)."""

from __future__ import annotations

from functools import cache
from typing import Any

from drf_spectacular.utils import extend_schema_view

from deviceplatform.api.media_types import MediaType
from deviceplatform.schema import (
    DATE_TIME,
    ETAG,
    ID,
    IF_MATCH,
    PAGING,
    c8y_operation,
    collection,
    filter_parameters,
    obj,
    path,
    query,
    ref,
    url,
)
from inventory import identity_views, views
from inventory.filters import ManagedObjectFilter

FRAGMENT_NOTE = "Any other key is a fragment, stored and returned as sent."

MO_ID = path("id", "The managed object's ID (digits; anything else: 404)")
CHILD_ID = path("childId", "The child's ID")

RENDERING = [
    query("withChildren", bool, "false leaves out childDevices, childAssets, childAdditions"),
    query("skipChildrenNames", bool, "true leaves `name` out of child references"),
    query("withChildrenCount", bool, "true adds `count` to each child collection"),
    query("withParents", bool, "true fills the parent collections' references"),
    query("withGroups", bool, "same as withParents"),
    query("withLatestValues", bool, "validated, no effect"),
]
QUERY_LANGUAGE = [
    query("query", description="Query language (docs/api/query-language.md); replaces the filters"),
    query("q", description="Query language over devices only"),
    query("ids", description="Comma-separated managed object IDs"),
]
LIST_FILTERS = [
    *filter_parameters(
        ManagedObjectFilter,
        {
            "type": "Exact type",
            "owner": "Exact owner",
            "fragmentType": "Objects that have this fragment",
            "text": "Substring of name, type or owner",
            "onlyRoots": "Only objects that are nobody's child",
            "childDeviceId": "Parents of this child device",
            "childAssetId": "Parents of this child asset",
            "childAdditionId": "Parents of this child addition",
        },
    ),
    *QUERY_LANGUAGE,
]

REFERENCE_TARGET = obj({"id": ID, "self": url(), "name": {"type": "string"}}, ["id", "self"])
REFERENCE_COLLECTION_IN_MO = obj(
    {
        "self": url(),
        "references": {
            "type": "array",
            "items": obj({"self": url(), "managedObject": REFERENCE_TARGET}, ["managedObject"]),
        },
        "count": {"type": "integer", "description": "withChildrenCount=true only"},
    },
    ["references"],
)

TARGET_INPUT = obj({"id": {"type": ["string", "integer"]}, "self": url()})
REFERENCE_INPUT = obj({"managedObject": TARGET_INPUT}, ["managedObject"])

SCHEMAS: dict[str, dict[str, Any]] = {
    "ManagedObject": obj(
        {
            "id": ID,
            "self": url(),
            "type": {"type": "string"},
            "name": {"type": "string"},
            "owner": {"type": "string"},
            "creationTime": DATE_TIME,
            "lastUpdated": DATE_TIME,
            **{
                key: REFERENCE_COLLECTION_IN_MO
                for key in (
                    "childDevices",
                    "childAssets",
                    "childAdditions",
                    "deviceParents",
                    "assetParents",
                    "additionParents",
                )
            },
        },
        ["id", "self", "owner", "creationTime", "lastUpdated"],
        description=f"A device, group or any other object (inventory.md). {FRAGMENT_NOTE}",
    ),
    "ManagedObjectInput": obj(
        {
            "type": {"type": ["string", "null"], "description": "null in a PUT removes it"},
            "name": {"type": ["string", "null"], "description": "null in a PUT removes it"},
            "owner": {"type": "string", "description": "Honoured from ROLE_INVENTORY_ADMIN"},
        },
        description=(
            f"id, self, creationTime, lastUpdated and the references are ignored. {FRAGMENT_NOTE}"
        ),
    ),
    "ManagedObjectCollection": collection("managedObjects", ref("ManagedObject")),
    "ManagedObjectReference": obj(
        {"self": url(), "managedObject": ref("ManagedObject")},
        ["self", "managedObject"],
    ),
    "ManagedObjectReferenceCollection": collection("references", ref("ManagedObjectReference")),
    "ManagedObjectReferenceInput": obj(
        {
            "managedObject": TARGET_INPUT,
            "references": {"type": "array", "items": REFERENCE_INPUT},
        },
        description=(
            "`managedObject` (one existing child by id or self), `references` (several), or any "
            "other object: a new managed object created as the child."
        ),
    ),
    "InventoryApi": obj(
        {
            "self": url(),
            "managedObjects": ref("Link"),
            "managedObjectsForType": {"type": "string"},
            "managedObjectsForFragmentType": {"type": "string"},
            "managedObjectsForListOfIds": {"type": "string"},
        },
        ["self", "managedObjects"],
    ),
    "IdentityApi": obj(
        {
            "self": url(),
            "externalId": {"type": "string", "description": "URI template"},
            "externalIdsOfGlobalId": {"type": "string", "description": "URI template"},
        },
        ["self"],
    ),
    "ExternalId": obj(
        {
            "self": url(),
            "externalId": {"type": "string"},
            "type": {"type": "string"},
            "managedObject": obj({"id": ID, "self": url()}, ["id", "self"]),
        },
        ["self", "externalId", "type", "managedObject"],
        description="An external ID bound to one managed object (identity.md)",
    ),
    "ExternalIdInput": obj(
        {
            "externalId": {"type": "string", "minLength": 1},
            "type": {"type": "string", "minLength": 1},
        },
        ["externalId", "type"],
    ),
    "ExternalIdCollection": obj(
        {
            "self": url(),
            "externalIds": {"type": "array", "items": ref("ExternalId")},
            "statistics": ref("PageStatistics"),
            "prev": url(),
            "next": url(),
        },
        ["self", "externalIds"],
    ),
}


@cache
def _attach() -> None:
    mo_json = MediaType.MANAGED_OBJECT
    extend_schema_view(
        get=c8y_operation(
            "The inventory API resource",
            response=ref("InventoryApi"),
            media_type=MediaType.INVENTORY_API,
        )
    )(views.InventoryApiView)
    extend_schema_view(
        get=c8y_operation(
            "List managed objects",
            description="Only the objects the caller may see; paged, filtered, in ID order.",
            response=ref("ManagedObjectCollection"),
            media_type=MediaType.MANAGED_OBJECT_COLLECTION,
            parameters=[*LIST_FILTERS, *RENDERING, *PAGING],
        ),
        post=c8y_operation(
            "Create a managed object",
            request=ref("ManagedObjectInput"),
            response=ref("ManagedObject"),
            media_type=mo_json,
            status=201,
            parameters=[ETAG],
        ),
    )(views.ManagedObjectCollectionView)
    extend_schema_view(
        get=c8y_operation(
            "Count managed objects",
            description="How many objects the list would hold for the same filters; a bare number.",
            response={"type": "integer", "minimum": 0},
            parameters=LIST_FILTERS,
        )
    )(views.ManagedObjectCountView)
    extend_schema_view(
        get=c8y_operation(
            "Get a managed object",
            owner="managed object",
            response=ref("ManagedObject"),
            media_type=mo_json,
            parameters=[MO_ID, *RENDERING, ETAG],
        ),
        put=c8y_operation(
            "Update a managed object",
            owner="managed object",
            description="Fragments sent replace the stored ones; others are kept.",
            request=ref("ManagedObjectInput"),
            response=ref("ManagedObject"),
            media_type=mo_json,
            parameters=[MO_ID, IF_MATCH, ETAG],
        ),
        delete=c8y_operation(
            "Delete a managed object",
            owner="managed object",
            status=204,
            parameters=[
                MO_ID,
                IF_MATCH,
                query("cascade", bool, "Also delete the children (devices and assets)"),
                query("forceCascade", bool, "Also delete children that have other parents"),
                query("withDeviceUser", bool, "Accepted, no effect"),
            ],
        ),
    )(views.ManagedObjectDetailView)
    reference_collection = MediaType.MANAGED_OBJECT_REFERENCE_COLLECTION
    extend_schema_view(
        get=c8y_operation(
            "List the children",
            owner="managed object",
            response=ref("ManagedObjectReferenceCollection"),
            media_type=reference_collection,
            parameters=[
                MO_ID,
                query("query", description="Query language filter"),
                *RENDERING,
                *PAGING,
            ],
        ),
        post=c8y_operation(
            "Add children, or create a child",
            owner="managed object",
            description=(
                "One reference answers a `managedObjectReference`, `references` a collection; a new "
                "object needs ROLE_INVENTORY_CREATE."
            ),
            request=ref("ManagedObjectReferenceInput"),
            response={
                "oneOf": [ref("ManagedObjectReference"), ref("ManagedObjectReferenceCollection")]
            },
            media_type=MediaType.MANAGED_OBJECT_REFERENCE,
            status=201,
            parameters=[MO_ID],
        ),
        delete=c8y_operation(
            "Remove several children",
            owner="managed object",
            request=obj(
                {"references": {"type": "array", "items": REFERENCE_INPUT}},
                ["references"],
            ),
            status=204,
            parameters=[MO_ID],
        ),
    )(views.ReferenceCollectionView)
    extend_schema_view(
        get=c8y_operation(
            "Get one child reference",
            response=ref("ManagedObjectReference"),
            media_type=MediaType.MANAGED_OBJECT_REFERENCE,
            parameters=[MO_ID, CHILD_ID, *RENDERING],
        ),
        delete=c8y_operation("Remove one child", status=204, parameters=[MO_ID, CHILD_ID]),
    )(views.ReferenceDetailView)
    extend_schema_view(
        get=c8y_operation(
            "List the parents",
            owner="managed object",
            response=ref("ManagedObjectReferenceCollection"),
            media_type=reference_collection,
            parameters=[MO_ID, *RENDERING, *PAGING],
        )
    )(views.ParentCollectionView)
    extend_schema_view(
        get=c8y_operation(
            "The identity API resource",
            response=ref("IdentityApi"),
            media_type=MediaType.IDENTITY_API,
        )
    )(identity_views.IdentityApiView)
    extend_schema_view(
        get=c8y_operation(
            "List a managed object's external IDs",
            owner="managed object",
            response=ref("ExternalIdCollection"),
            media_type=MediaType.EXTERNAL_ID_COLLECTION,
            parameters=[MO_ID, *PAGING],
        ),
        post=c8y_operation(
            "Bind an external ID",
            owner="managed object",
            request=ref("ExternalIdInput"),
            response=ref("ExternalId"),
            media_type=MediaType.EXTERNAL_ID,
            status=201,
            parameters=[MO_ID, ETAG],
            errors={409: "The external ID is bound to another managed object"},
        ),
    )(identity_views.ExternalIdCollectionView)
    pair = [
        path("type", "The external ID's type"),
        path("externalId", "The external ID (may hold /)"),
    ]
    extend_schema_view(
        get=c8y_operation(
            "Get an external ID",
            owner="managed object",
            response=ref("ExternalId"),
            media_type=MediaType.EXTERNAL_ID,
            parameters=[*pair, ETAG],
        ),
        delete=c8y_operation(
            "Delete an external ID",
            status=204,
            parameters=[*pair, IF_MATCH],
            owner="managed object",
        ),
    )(identity_views.ExternalIdDetailView)


def attach(endpoints: list[Any], **kwargs: Any) -> list[Any]:
    """Preprocessing hook: the descriptions above onto the views (once per process)."""
    _attach()
    return endpoints


def postprocess(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    result.setdefault("components", {}).setdefault("schemas", {}).update(SCHEMAS)
    return result
