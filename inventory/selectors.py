"""Inventory reads with rules: visibility by role and owner, lookups that 404, batched references."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from functools import cache
from typing import Any, TypeVar

from django.db import connections
from django.db.models import CharField, Exists, Model, OuterRef, Q, QuerySet
from django.db.models.functions import Cast
from django.db.models.lookups import StartsWith

from deviceplatform.api.exceptions import NotFound
from deviceplatform.api.params import MAX_ID, parse_path_id
from deviceplatform.api.permissions import has_any_role
from deviceplatform.roles import Role
from inventory.models import ExternalId, ManagedObject, ManagedObjectReference, Relation
from inventory.services import managed_object_not_found

M = TypeVar("M", bound=Model)


@cache
def _select(
    model: type[Model], alias: str
) -> tuple[str, list[str], list[tuple[int, Any, list[Any]]]]:
    """(`SELECT <every column> FROM <table>`, attribute names, converters per column index) of a
    model, as the ORM's compiler would read its rows."""
    connection = connections[alias]
    quote = connection.ops.quote_name
    fields = model._meta.concrete_fields
    table = model._meta.db_table
    converters = []
    for index, field in enumerate(fields):
        column = field.get_col(table)
        found = connection.ops.get_db_converters(column) + field.get_db_converters(connection)
        if found:
            converters.append((index, column, found))
    columns = ", ".join(quote(field.column) for field in fields)
    return f"SELECT {columns} FROM {quote(table)}", [f.attname for f in fields], converters  # noqa: S608


def instances_where(model: type[M], where: str, params: list[Any]) -> list[M]:
    """Instances of `model` whose rows match the SQL condition `where` (column names of its own
    table, `%s` placeholders), built as the ORM builds them (converters, `from_db`) but without
    compiling a queryset: for the few lookups every request makes, where the query compiler cost
    more CPU than the database (bench/README.md, operations.py)."""
    alias = model._default_manager.db
    connection = connections[alias]
    select, names, converters = _select(model, alias)
    with connection.cursor() as cursor:
        cursor.execute(f"{select} WHERE {where}", params)
        rows = cursor.fetchall()
    found = []
    for row in rows:
        values = list(row)
        for index, column, functions in converters:
            for function in functions:
                values[index] = function(values[index], column, connection)
        found.append(model.from_db(alias, names, values))
    return found


def managed_object_by_id(object_id: int) -> ManagedObject | None:
    """The object with this ID or None (one statement, no queryset). An ID beyond the bigint
    range names nothing (as the ORM's lookup says; the database would refuse it)."""
    if not 0 <= object_id <= MAX_ID:
        return None
    found = instances_where(ManagedObject, '"id" = %s', [object_id])
    return found[0] if found else None


def managed_object_with_agent(object_id: int) -> tuple[ManagedObject, int | None] | None:
    """The object with this ID and, in the same statement, the agent an operation for it goes to
    when that is the object itself or its nearest `childDevices` parent (the smallest ID among
    them); None as the agent when neither: `device_agent_id` then walks further up. None when no
    object has this ID. (An operation create reads both: one statement instead of two.)"""
    if not 0 <= object_id <= MAX_ID:
        return None
    alias = ManagedObject.objects.db
    connection = connections[alias]
    select, names, converters = _select(ManagedObject, alias)
    table = connection.ops.quote_name(ManagedObject._meta.db_table)
    parent_agent = (
        "(SELECT MIN(r.parent_id) FROM inventory_managedobjectreference r"  # noqa: S608
        " JOIN inventory_managedobject p ON p.id = r.parent_id"
        f" WHERE r.child_id = {table}.id AND r.relation = %s AND p.is_agent)"
    )
    columns, _, source = select.partition(" FROM ")
    with connection.cursor() as cursor:
        cursor.execute(
            f"{columns}, {parent_agent} FROM {source} WHERE {table}.id = %s",  # noqa: S608
            [Relation.DEVICE.value, object_id],
        )
        row = cursor.fetchone()
    if row is None:
        return None
    values = list(row[:-1])
    for index, column, functions in converters:
        for function in functions:
            values[index] = function(values[index], column, connection)
    managed_object = ManagedObject.from_db(alias, names, values)
    agent = managed_object.pk if managed_object.is_agent else row[-1]
    return managed_object, agent


def managed_object_get(*, pk: object) -> ManagedObject:
    """The object with this ID (a path segment or body value), or 404 `inventory/Not Found`."""
    try:
        object_id = parse_path_id(pk)
    except Exception:
        raise managed_object_not_found(pk) from None
    managed_object = managed_object_by_id(object_id)
    if managed_object is None:
        raise managed_object_not_found(pk)
    return managed_object


def managed_objects_visible_to(user: Any) -> QuerySet[ManagedObject]:
    """All objects for ROLE_INVENTORY_READ, otherwise the user's own (auth.md §5)."""
    queryset = ManagedObject.objects.all()
    if has_any_role(user, {Role.INVENTORY_READ}):
        return queryset
    return queryset.filter(owner__iexact=user.username)


def text_search_q(value: str) -> Q:
    """Case-insensitive prefix match on id, name, type, owner and external-ID values (§4 `text`)."""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == "'":
        value = value[1:-1].replace("''", "'")
    condition = (
        Q(name__istartswith=value)
        | Q(type__istartswith=value)
        | Q(owner__istartswith=value)
        | Exists(
            ExternalId.objects.filter(managed_object=OuterRef("pk"), external_id__istartswith=value)
        )
    )
    if value.isdigit():  # a prefix of the id too, like every other field (§4)
        condition |= Q(StartsWith(Cast("pk", output_field=CharField()), value))
    return condition


def has_parent_q(relation: Relation, parent_id: int) -> Q:
    return Q(
        Exists(
            ManagedObjectReference.objects.filter(
                parent_id=parent_id, relation=relation, child=OuterRef("pk")
            )
        )
    )


def is_child_of_q(relation: Relation, child_id: int) -> Q:
    """Objects that have `child_id` among their children in `relation` (its parents)."""
    return Q(
        Exists(
            ManagedObjectReference.objects.filter(
                parent=OuterRef("pk"), relation=relation, child_id=child_id
            )
        )
    )


def only_roots_q() -> Q:
    return ~Q(Exists(ManagedObjectReference.objects.filter(child=OuterRef("pk"))))


def children_of(*, parent: ManagedObject, relation: Relation) -> QuerySet[ManagedObject]:
    """The children of `parent` in `relation`, in order of assignment (inventory.md §7.1)."""
    return ManagedObject.objects.filter(
        parent_refs__parent=parent, parent_refs__relation=relation
    ).order_by("parent_refs__id")


def parents_of(*, child: ManagedObject, relation: Relation) -> QuerySet[ManagedObject]:
    return ManagedObject.objects.filter(
        child_refs__child=child, child_refs__relation=relation
    ).order_by("child_refs__id")


def reference_get(*, parent: ManagedObject, relation: Relation, child_pk: object) -> ManagedObject:
    """The child of one edge, or 404 when the edge does not exist."""
    try:
        child_id = parse_path_id(child_pk)
    except Exception:
        raise managed_object_not_found(child_pk) from None
    child = children_of(parent=parent, relation=relation).filter(pk=child_id).first()
    if child is None:
        raise NotFound(
            f"Managed object {child_pk} is not a {relation.children_segment} child of {parent.pk}",
            error="inventory/Not Found",
        )
    return child


def references_for(
    ids: Iterable[int], *, children: bool = True, parents: bool = False
) -> dict[int, dict[str, list[tuple[int, str | None]]]]:
    """For each object ID: its child (and/or parent) references as (id, name) per collection key
    (`childDevices`, ..., `deviceParents`, ...), in assignment order. One query per direction."""
    ids = list(ids)
    result: dict[int, dict[str, list[tuple[int, str | None]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    if not ids:
        return result
    # Fixed statements: the queryset's compiler cost more CPU than the query (a third of a
    # managed object GET here, bench/README.md "inventory_http.py").
    placeholders = ", ".join(["%s"] * len(ids))
    # (own side, other side, collection key) per wanted direction.
    directions = [
        ("parent_id", "child_id", "children_segment"),
        ("child_id", "parent_id", "parents_segment"),
    ]
    wanted = [d for d, on in zip(directions, (children, parents), strict=True) if on]
    with connections[ManagedObjectReference.objects.db].cursor() as cursor:
        for own, other, segment in wanted:
            cursor.execute(
                f"SELECT r.{own}, r.relation, r.{other}, o.name"  # noqa: S608 - fixed names
                " FROM inventory_managedobjectreference r"
                f" JOIN inventory_managedobject o ON o.id = r.{other}"
                f" WHERE r.{own} IN ({placeholders}) ORDER BY r.id",
                ids,
            )
            for own_id, relation, other_id, other_name in cursor.fetchall():
                result[own_id][getattr(Relation(relation), segment)].append((other_id, other_name))
    return result


def external_id_get(*, type: str, external_id: str) -> ExternalId:
    found = (
        ExternalId.objects.select_related("managed_object")
        .filter(type=type, external_id=external_id)
        .first()
    )
    if found is None:
        raise NotFound(
            f"External id not found; external id = ID [type={type}, value={external_id}]",
            error="identity/Not Found",
        )
    return found


def external_ids_of(*, managed_object: ManagedObject) -> QuerySet[ExternalId]:
    return ExternalId.objects.filter(managed_object=managed_object).order_by("id")


def device_agent_id(*, device: ManagedObject) -> int | None:
    """The agent that receives operations for `device` (devicecontrol.md §4): the device itself if
    it is an agent, else the nearest level of `childDevices` ancestors that holds an agent, the
    smallest ID winning a tie. Only device edges count. One query per level walked."""
    if device.is_agent:
        return device.pk
    seen = {device.pk}
    frontier = {device.pk}
    connection = connections[ManagedObjectReference.objects.db]
    while frontier:
        # One fixed statement per level (the ORM's compiler cost more than the query).
        with connection.cursor() as cursor:
            placeholders = ", ".join(["%s"] * len(frontier))
            sql = (
                "SELECT r.parent_id, p.is_agent FROM inventory_managedobjectreference r"  # noqa: S608
                " JOIN inventory_managedobject p ON p.id = r.parent_id"
                f" WHERE r.relation = %s AND r.child_id IN ({placeholders})"
            )
            cursor.execute(sql, [Relation.DEVICE.value, *sorted(frontier)])
            rows = cursor.fetchall()
        agents = [parent_id for parent_id, is_agent in rows if is_agent]
        if agents:
            return min(agents)
        frontier = {parent_id for parent_id, _ in rows} - seen
        seen |= frontier
    return None


def devices_agent_ids(*, devices: list[ManagedObject]) -> dict[int, int | None]:
    """`device_agent_id` for many devices at once: one query per hierarchy level for all of them
    (a bulk ramp resolves thousands of devices per batch)."""
    result: dict[int, int | None] = {}
    # device id -> (IDs seen on its walk, current frontier)
    walks: dict[int, tuple[set[int], set[int]]] = {}
    for device in devices:
        if device.is_agent:
            result[device.pk] = device.pk
        else:
            walks[device.pk] = ({device.pk}, {device.pk})
    while walks:
        frontier = set().union(*(walk[1] for walk in walks.values()))
        parents: dict[int, list[tuple[int, bool]]] = defaultdict(list)
        for child_id, parent_id, is_agent in ManagedObjectReference.objects.filter(
            child_id__in=frontier, relation=Relation.DEVICE
        ).values_list("child_id", "parent_id", "parent__is_agent"):
            parents[child_id].append((parent_id, is_agent))
        for device_id, (seen, current) in list(walks.items()):
            level = [edge for node in current for edge in parents.get(node, [])]
            agents = [parent_id for parent_id, is_agent in level if is_agent]
            following = {parent_id for parent_id, _ in level} - seen
            if agents or not following:
                result[device_id] = min(agents) if agents else None
                del walks[device_id]
            else:
                seen |= following
                walks[device_id] = (seen, following)
    return result
