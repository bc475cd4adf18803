"""Managed object change events (realtime.md §5.3): who may watch, what is sent, and when.

Channel `/managedobjects/{id}` on the realtime family, envelope `{"realtimeAction", "data"}` as for
operations: `CREATE` and `UPDATE` carry the object as `GET /inventory/managedObjects/{id}` renders
it (URLs written against `BASE_URL`, so every subscriber sees its own host), `DELETE` the ID string.

Which changes send what (the services call `publish_on_commit` unless the request was QUIESCENT):

* create: `CREATE` for the new object;
* update (PUT): `UPDATE` for the object, even when nothing changed;
* delete: `DELETE` for every deleted object (cascades included), then `UPDATE` for each surviving
  direct parent, whose `childDevices`/`childAssets`/`childAdditions` lost the deleted child;
* adding children: `UPDATE` for the parent (its child collections and `lastUpdated` changed);
* removing children: `UPDATE` for the parent when an edge was removed.

A child's own default JSON shows no parents, so reference changes send nothing for the child; a
renamed object does not send `UPDATE` for its parents, although their child references show its
name (kept simple).

Events go out through `deviceplatform.realtime.events.publish_on_commit`, with every app's: one
batch per transaction, each object's events in the order of the transactions that changed it (the
object is each event's `key`). Tests that capture on-commit callbacks should capture the whole
transaction."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Literal

from deviceplatform.api.permissions import has_any_role, is_owner
from deviceplatform.realtime.events import BASE_URL, RealtimeEvent
from deviceplatform.realtime.subscriptions import Family, register
from deviceplatform.roles import Role
from inventory.models import ManagedObject, ManagedObjectReference
from inventory.serializers import RefMap, managed_object_json

Action = Literal["CREATE", "UPDATE", "DELETE"]


def object_channel(pk: int) -> str:
    return f"/managedobjects/{pk}"


def object_event(action: Action, pk: int, data: dict[str, Any] | str) -> RealtimeEvent:
    return RealtimeEvent(object_channel(pk), {"realtimeAction": action, "data": data}, key=pk)


# --- event payloads --------------------------------------------------------------------------------


def created_events(managed_object: ManagedObject) -> list[RealtimeEvent]:
    """`CREATE` for a new object: it has no references yet, rendering needs no query."""
    return [
        object_event(
            "CREATE", managed_object.pk, managed_object_json(managed_object, base=BASE_URL)
        )
    ]


def updated_events(objects: Iterable[ManagedObject]) -> list[RealtimeEvent]:
    """`UPDATE` for each object as it is now in this transaction (one query for the references)."""
    objects = list(objects)
    if not objects:
        return []
    from inventory.selectors import references_for  # selectors imports services, which import us

    refs: RefMap = references_for([mo.pk for mo in objects])
    return [
        object_event("UPDATE", mo.pk, managed_object_json(mo, base=BASE_URL, refs=refs))
        for mo in objects
    ]


def deleted_events(ids: Iterable[int]) -> list[RealtimeEvent]:
    return [object_event("DELETE", pk, str(pk)) for pk in ids]


def surviving_parent_ids(deleted: list[int]) -> list[int]:
    """Parents of the objects about to be deleted that are not deleted themselves (ask before the
    references go with the objects)."""
    return sorted(
        set(
            ManagedObjectReference.objects.filter(child_id__in=deleted)
            .exclude(parent_id__in=deleted)
            .values_list("parent_id", flat=True)
        )
    )


def objects_updated_events(ids: list[int]) -> list[RealtimeEvent]:
    """`UPDATE` for the objects with these IDs (those still there)."""
    if not ids:
        return []
    return updated_events(ManagedObject.objects.filter(pk__in=ids).order_by("pk"))


# --- subscriptions (auth.md §7) ------------------------------------------------------------------


def _may_watch(user: Any, match: re.Match[str]) -> bool:
    """ROLE_INVENTORY_READ, or owner of the object: one that does not exist has no owner, so only
    the role may watch it."""
    if has_any_role(user, {Role.INVENTORY_READ}):
        return True
    owner = ManagedObject.objects.filter(pk=int(match[1])).values_list("owner", flat=True).first()
    return is_owner(user, owner)


def _may_watch_all(user: Any, match: re.Match[str]) -> bool:
    return has_any_role(user, {Role.INVENTORY_READ})


def register_channels() -> None:
    register(Family.REALTIME, r"/managedobjects/\*", _may_watch_all)
    register(Family.REALTIME, r"/managedobjects/([1-9][0-9]{0,18})", _may_watch)
