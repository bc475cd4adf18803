"""Wire format of managed objects, references and external IDs (spec inventory.md §1, identity.md §1).

Output is built as plain dicts rendered by orjson (shared/PERFORMANCE.md §5): the reference lookups
for a whole page are batched by `inventory.selectors.references_for`, so rendering never queries."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from deviceplatform.api.dates import format_datetime
from deviceplatform.api.exceptions import ValidationFailed
from deviceplatform.api.params import MAX_ID, get_bool, parse_id
from inventory.models import ExternalId, ManagedObject, Relation

CHILD_KEYS = tuple(relation.children_segment for relation in Relation)
PARENT_KEYS = tuple(relation.parents_segment for relation in Relation)

RefMap = Mapping[int, Mapping[str, list[tuple[int, str | None]]]]


@dataclass(frozen=True)
class RenderOptions:
    """The rendering query parameters of inventory.md §4."""

    with_children: bool = True
    skip_children_names: bool = False
    with_children_count: bool = False
    with_parents: bool = False

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> RenderOptions:
        get_bool(params, "withLatestValues")  # accepted and ignored, but still a boolean
        return cls(
            with_children=get_bool(params, "withChildren", True),
            skip_children_names=get_bool(params, "skipChildrenNames"),
            with_children_count=get_bool(params, "withChildrenCount"),
            with_parents=get_bool(params, "withParents") or get_bool(params, "withGroups"),
        )


def inventory_api_json(base: str) -> dict[str, Any]:
    """`GET /inventory` (inventory.md §2); also embedded in `GET /platform`."""
    return {
        "self": f"{base}/inventory",
        "managedObjects": {"self": f"{base}/inventory/managedObjects", "references": []},
        "managedObjectsForType": f"{base}/inventory/managedObjects?type={{type}}",
        "managedObjectsForFragmentType": (
            f"{base}/inventory/managedObjects?fragmentType={{fragmentType}}"
        ),
        "managedObjectsForListOfIds": f"{base}/inventory/managedObjects?ids={{ids}}",
    }


def identity_api_json(base: str) -> dict[str, Any]:
    """`GET /identity` (identity.md §2). Placeholder names exactly as the Java SDK fills them,
    `{externaId}` sic."""
    return {
        "self": f"{base}/identity",
        "externalId": f"{base}/identity/externalIds/{{type}}/{{externaId}}",
        "externalIdsOfGlobalId": f"{base}/identity/globalIds/{{globalId}}/externalIds",
    }


def managed_object_url(base: str, pk: int) -> str:
    return f"{base}/inventory/managedObjects/{pk}"


def _reference_collection(
    base: str,
    owner_url: str,
    key: str,
    refs: list[tuple[int, str | None]],
    *,
    names: bool,
    count: bool,
) -> dict[str, Any]:
    references = []
    for ref_id, ref_name in refs:
        target: dict[str, Any] = {"id": str(ref_id), "self": managed_object_url(base, ref_id)}
        if names and ref_name is not None:
            target["name"] = ref_name
        references.append({"self": f"{owner_url}/{key}/{ref_id}", "managedObject": target})
    collection: dict[str, Any] = {"self": f"{owner_url}/{key}", "references": references}
    if count:
        collection["count"] = len(references)
    return collection


def managed_object_json(
    managed_object: ManagedObject,
    *,
    base: str,
    refs: RefMap | None = None,
    options: RenderOptions = RenderOptions(),  # noqa: B008 (frozen dataclass, immutable default)
) -> dict[str, Any]:
    """One managed object. `base` is the absolute root URL without trailing slash; `refs` comes from
    `references_for` (None means: no references known, render empty collections)."""
    pk = managed_object.pk
    url = managed_object_url(base, pk)
    body: dict[str, Any] = {"id": str(pk), "self": url}
    if managed_object.type is not None:
        body["type"] = managed_object.type
    if managed_object.name is not None:
        body["name"] = managed_object.name
    body["owner"] = managed_object.owner
    body["creationTime"] = format_datetime(managed_object.creation_time)
    body["lastUpdated"] = format_datetime(managed_object.last_updated)
    body.update(managed_object.fragments)
    own_refs: Mapping[str, list[tuple[int, str | None]]] = (refs or {}).get(pk, {})
    if options.with_children:
        for key in CHILD_KEYS:
            body[key] = _reference_collection(
                base,
                url,
                key,
                own_refs.get(key, []),
                names=not options.skip_children_names,
                count=options.with_children_count,
            )
    for key in PARENT_KEYS:
        body[key] = _reference_collection(
            base,
            url,
            key,
            own_refs.get(key, []) if options.with_parents else [],
            names=True,
            count=False,
        )
    return body


def reference_json(parent_url: str, segment: str, child_json: dict[str, Any]) -> dict[str, Any]:
    return {"self": f"{parent_url}/{segment}/{child_json['id']}", "managedObject": child_json}


def external_id_url(base: str, type: str, external_id: str) -> str:
    return f"{base}/identity/externalIds/{quote(type, safe='')}/{quote(external_id, safe='')}"


def external_id_json(external_id: ExternalId, *, base: str) -> dict[str, Any]:
    return {
        "self": external_id_url(base, external_id.type, external_id.external_id),
        "externalId": external_id.external_id,
        "type": external_id.type,
        "managedObject": {
            "id": str(external_id.managed_object_id),
            "self": managed_object_url(base, external_id.managed_object_id),
        },
    }


# --- input -----------------------------------------------------------------------------------------


def reference_target_id(item: Any, *, where: str = "managedObject") -> int:
    """The child ID of a reference body item `{"managedObject": {"id": X}}` or `{... "self": URL}`."""
    if not isinstance(item, dict) or not isinstance(item.get("managedObject"), dict):
        raise ValidationFailed(f"{where}: a reference needs a managedObject object")
    target = item["managedObject"]
    if "id" in target:
        return parse_id(target["id"], field="managedObject.id")
    if isinstance(target.get("self"), str) and target["self"].rstrip("/"):
        last_segment = target["self"].rstrip("/").rsplit("/", 1)[-1]
        return parse_id(last_segment, field="managedObject.self")
    raise ValidationFailed(f"{where}: a reference needs managedObject.id or managedObject.self")


def references_list_ids(body: dict[str, Any]) -> list[int]:
    references = body.get("references")
    if not isinstance(references, list) or not references:
        raise ValidationFailed("references must be a non-empty list of managed object references")
    return [
        reference_target_id(item, where=f"references[{i}]") for i, item in enumerate(references)
    ]


def ids_param(value: str) -> list[int]:
    """`ids=1,2,3` (blank items ignored; an ID beyond MAX_ID names no object and is dropped)."""
    ids = [parse_id(part, field="ids") for part in value.split(",") if part.strip()]
    return [object_id for object_id in ids if object_id <= MAX_ID]


def unique(ids: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(ids))
