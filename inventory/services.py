"""Every inventory and identity write: validate, save, then register side effects on commit."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from deviceplatform.api.exceptions import Conflict, MissingFields, NotFound, ValidationFailed
from deviceplatform.api.lengths import check_length
from deviceplatform.realtime.events import publish_on_commit
from deviceplatform.realtime.rights import ownership_changed
from inventory import realtime
from inventory.models import ExternalId, ManagedObject, ManagedObjectReference, Relation

# Keys of a managed object body that are not fragments (spec inventory.md §1). Read-only ones are
# ignored on input; `type`, `name` and `owner` are columns.
COLUMN_KEYS = frozenset({"type", "name", "owner"})
READ_ONLY_KEYS = frozenset(
    {
        "id",
        "self",
        "creationTime",
        "lastUpdated",
        "childDevices",
        "childAssets",
        "childAdditions",
        "deviceParents",
        "assetParents",
        "additionParents",
    }
)
FORBIDDEN_NAME_CHARS = frozenset(".$ \t\r\n")

INVENTORY_NOT_FOUND = "inventory/Not Found"

# Called inside the deleting transaction with the IDs about to go, before they go. Apps that hang
# data on managed objects register here (devicecontrol deletes the operations with their realtime
# DELETE events), so inventory never imports them (STYLE.md §1: imports flow towards inventory).
BEFORE_DELETE_HOOKS: list[Callable[..., None]] = []  # hook(ids, notify=...)


def managed_object_not_found(pk: object) -> NotFound:
    return NotFound(
        f"Finding device data from database failed : No managedObject for id '{pk}'!",
        error=INVENTORY_NOT_FOUND,
    )


def _check_string(data: dict[str, Any], key: str) -> None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ValidationFailed(f"Invalid value for {key}: a string is expected")
    check_length(value, ManagedObject, key)


def _split_body(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(columns, fragments) of a managed object body; read-only keys dropped, names checked."""
    for key in COLUMN_KEYS:
        _check_string(data, key)
    columns = {key: data[key] for key in COLUMN_KEYS if key in data}
    fragments: dict[str, Any] = {}
    for key, value in data.items():
        if key in COLUMN_KEYS or key in READ_ONLY_KEYS:
            continue
        if not key or FORBIDDEN_NAME_CHARS & set(key):
            raise ValidationFailed(
                f"Invalid fragment name {key!r}: names may not contain '.', '$' or whitespace"
            )
        fragments[key] = value
    return columns, fragments


@transaction.atomic
def managed_object_create(
    *,
    owner: str,
    data: dict[str, Any],
    allow_owner: bool = False,
    notify: bool = True,
    now: datetime | None = None,
) -> ManagedObject:
    """Create a managed object from a body. `owner` is the caller unless `allow_owner` (ADMIN) and
    the body names one. `null` values are not stored (inventory.md §1). `notify`: realtime `CREATE`
    after commit (False for QUIESCENT requests)."""
    columns, fragments = _split_body(data)
    now = now or timezone.now()
    chosen_owner = columns.get("owner") if allow_owner and columns.get("owner") else owner
    managed_object = ManagedObject(
        type=columns.get("type"),
        name=columns.get("name"),
        owner=chosen_owner,
        creation_time=now,
        last_updated=now,
        fragments={key: value for key, value in fragments.items() if value is not None},
    )
    managed_object.refresh_flags()
    managed_object.save(force_insert=True)
    if notify:
        publish_on_commit(realtime.created_events(managed_object))
    return managed_object


def managed_object_lock(managed_object_id: int) -> ManagedObject:
    """The managed object, re-read under a row lock held until the transaction ends; 404 if gone.

    Every read-modify-write of a managed object goes through here, so two writers never merge
    into copies read before the other's commit (a lost update). FOR NO KEY UPDATE: it serialises
    writers just as well, but does not block the FOR KEY SHARE that PostgreSQL's foreign-key checks
    take on the object (an operation or reference inserted for it at the same time); FOR UPDATE did,
    and with the event-order row lock it made a deadlock at COMMIT (operation create vs device PUT)."""
    managed_object = (
        ManagedObject.objects.select_for_update(no_key=True).filter(pk=managed_object_id).first()
    )
    if managed_object is None:
        raise managed_object_not_found(managed_object_id)
    return managed_object


@transaction.atomic
def managed_object_update(
    *,
    managed_object_id: int,
    data: dict[str, Any],
    allow_owner: bool = False,
    notify: bool = True,
    now: datetime | None = None,
    precondition: Callable[[ManagedObject], None] | None = None,
) -> ManagedObject:
    """Partial update: each key replaces its value wholesale, `null` removes it (inventory.md §6).
    The row is locked and re-read first, and `precondition` (the request's `If-Match`) checked
    against it. `notify`: realtime `UPDATE` after commit, even when nothing changed."""
    columns, fragments = _split_body(data)
    managed_object = managed_object_lock(managed_object_id)
    if precondition is not None:
        precondition(managed_object)
    for key in ("type", "name"):
        if key in columns:
            setattr(managed_object, key, columns[key])
    if allow_owner and columns.get("owner"):
        if columns["owner"] != managed_object.owner:
            # Before the events' own callback: the old owner's subscriptions end with this commit.
            transaction.on_commit(ownership_changed)
        managed_object.owner = columns["owner"]
    merged = dict(managed_object.fragments)
    for key, value in fragments.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    managed_object.fragments = merged
    managed_object.refresh_flags()
    managed_object.last_updated = now or timezone.now()
    managed_object.save()
    if notify:
        publish_on_commit(realtime.updated_events([managed_object]))
    return managed_object


def _descendants(roots: Iterable[int], relations: Iterable[str], only_groups: bool) -> set[int]:
    """IDs reachable from `roots` over the given relations (roots excluded unless reached)."""
    seen: set[int] = set()
    frontier = set(roots)
    relations = list(relations)
    while frontier:
        refs = ManagedObjectReference.objects.filter(parent_id__in=frontier, relation__in=relations)
        if only_groups:
            refs = refs.filter(child__is_group=True)
        children = set(refs.values_list("child_id", flat=True)) - seen
        seen |= children
        frontier = children
    return seen


@transaction.atomic
def managed_object_delete(
    *,
    managed_object: ManagedObject,
    cascade: bool = False,
    force_cascade: bool = False,
    notify: bool = True,
    precondition: Callable[[ManagedObject], None] | None = None,
) -> list[int]:
    """Delete the object and, per inventory.md §6, its group subgroups, its cascade hierarchy or the
    whole forced hierarchy. External IDs and references go with it (database cascade). Returns the
    deleted IDs. `precondition` (`If-Match`) is checked on the locked row. `notify`: realtime
    `DELETE` for each, `UPDATE` for their surviving parents."""
    managed_object = managed_object_lock(managed_object.pk)
    if precondition is not None:
        precondition(managed_object)
    root = managed_object.pk
    if force_cascade:
        doomed = _descendants([root], [r.value for r in Relation], only_groups=False)
    elif cascade:
        doomed = _descendants([root], [Relation.DEVICE, Relation.ASSET], only_groups=False)
    elif managed_object.is_group:
        doomed = _descendants([root], [Relation.ASSET], only_groups=True)
    else:
        doomed = set()
    doomed.add(root)
    deleted = sorted(doomed)
    for hook in BEFORE_DELETE_HOOKS:
        hook(deleted, notify=notify)
    parents = realtime.surviving_parent_ids(deleted) if notify else []
    ManagedObject.objects.filter(pk__in=deleted).delete()
    if notify:
        publish_on_commit(
            realtime.deleted_events(deleted) + realtime.objects_updated_events(parents)
        )
    return deleted


def _would_cycle(parent_id: int, child_id: int) -> bool:
    """A device edge parent -> child closes a cycle if parent is reachable from child."""
    return parent_id in _descendants([child_id], [Relation.DEVICE], only_groups=False)


# Any two childDevices additions can close a cycle together (A -> B and B -> A, or longer rings
# through existing edges), whichever parents they touch: the check and the insert of every device
# edge are serialised by one transaction-scoped advisory lock. SQLite needs none: its transactions
# take the database write lock when they begin (settings: transaction_mode IMMEDIATE).
DEVICE_EDGE_LOCK = 0x6465766963656564  # "devicee" + "d"


def _serialise_device_edges() -> None:
    connection = transaction.get_connection()
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [DEVICE_EDGE_LOCK])


def managed_object_add_children(
    *,
    parent: ManagedObject,
    relation: Relation,
    children: list[ManagedObject],
    notify: bool = True,
    now: datetime | None = None,
) -> list[ManagedObjectReference]:
    """Add each child under `parent` in `relation`, atomically. Existing edges are kept (no-op).
    Self-references and childDevices cycles are refused with 422 and nothing is changed. The
    parent is locked and re-read (its `lastUpdated` moves, and its UPDATE event shows it as
    committed). `notify`: realtime `UPDATE` for the parent."""
    with transaction.atomic():
        if relation == Relation.DEVICE and children:
            _serialise_device_edges()
        # The parent and the children locked in one statement, in ID order (no deadlock between
        # two requests that add each other's objects): a child deleted meanwhile is a 404 here,
        # not a foreign-key error at the INSERT.
        locked = {
            mo.pk: mo
            for mo in ManagedObject.objects.select_for_update(no_key=True)
            .filter(pk__in=[parent.pk, *(child.pk for child in children)])
            .order_by("pk")
        }
        if parent.pk not in locked:
            raise managed_object_not_found(parent.pk)
        parent = locked[parent.pk]
        references = []
        for child in children:
            if child.pk not in locked:  # deleted since the caller read it
                raise managed_object_not_found(child.pk)
            if child.pk == parent.pk:
                raise ValidationFailed(f"Managed object {parent.pk} cannot be its own child")
            if relation == Relation.DEVICE and _would_cycle(parent.pk, child.pk):
                raise ValidationFailed(
                    f"Adding {child.pk} as a child device of {parent.pk} would create a cycle"
                )
            reference, _ = ManagedObjectReference.objects.get_or_create(
                parent=parent, child=child, relation=relation
            )
            reference.child = child
            references.append(reference)
        parent.last_updated = now or timezone.now()
        parent.save(update_fields=["last_updated"])
        events = realtime.updated_events([parent]) if notify else []
    # Registered after the savepoint is released, so it joins the batch of an enclosing
    # transaction (a child created in the same request: one batch, one store round trip).
    publish_on_commit(events)
    return references


@transaction.atomic
def managed_object_create_child(
    *,
    parent: ManagedObject,
    relation: Relation,
    owner: str,
    data: dict[str, Any],
    allow_owner: bool = False,
    notify: bool = True,
) -> ManagedObject:
    """Create a managed object from `data` and add it under `parent` (inventory.md §7.2), in one
    transaction: no orphan is left behind when the addition fails."""
    child = managed_object_create(owner=owner, data=data, allow_owner=allow_owner, notify=notify)
    managed_object_add_children(parent=parent, relation=relation, children=[child], notify=notify)
    return child


@transaction.atomic
def managed_object_remove_children(
    *,
    parent: ManagedObject,
    relation: Relation,
    child_ids: Iterable[int],
    strict: bool = False,
    notify: bool = True,
) -> int:
    """Remove the edges parent -> child; with `strict`, a missing edge is a 404 (single unassign).
    `notify`: realtime `UPDATE` for the parent when an edge was removed."""
    child_ids = list(child_ids)
    parent = managed_object_lock(parent.pk)
    removed, _ = ManagedObjectReference.objects.filter(
        parent=parent, relation=relation, child_id__in=child_ids
    ).delete()
    if strict and removed == 0:
        raise NotFound(
            f"Managed object {child_ids[0] if child_ids else ''} is not a "
            f"{Relation(relation).children_segment} child of {parent.pk}",
            error=INVENTORY_NOT_FOUND,
        )
    if removed:
        parent.last_updated = timezone.now()
        parent.save(update_fields=["last_updated"])
        if notify:
            publish_on_commit(realtime.updated_events([parent]))
    return removed


@transaction.atomic
def external_id_create(
    *, managed_object: ManagedObject, type: str, external_id: str
) -> tuple[ExternalId, bool]:
    """Bind (type, external_id) to the object. Already bound here: returned unchanged (created is
    False). Bound to another object: 409 (identity.md §3)."""
    missing = [
        name
        for name, value in (("type", type), ("externalId", external_id))
        if not isinstance(value, str) or not value
    ]
    if missing:
        raise MissingFields(missing)
    if "/" in type:
        raise ValidationFailed("An external ID type may not contain '/'")
    check_length(type, ExternalId, "type")
    check_length(external_id, ExternalId, "external_id", name="externalId")
    existing = ExternalId.objects.filter(type=type, external_id=external_id).first()
    if existing is None:
        try:
            with transaction.atomic():
                return (
                    ExternalId.objects.create(
                        type=type, external_id=external_id, managed_object=managed_object
                    ),
                    True,
                )
        except IntegrityError:  # a concurrent create won the race
            existing = ExternalId.objects.filter(type=type, external_id=external_id).first()
            if existing is None:
                raise
    if existing.managed_object_id != managed_object.pk:
        raise ExternalIdTaken(existing)
    return existing, False


class ExternalIdTaken(Conflict):
    """409: the pair is bound to another object. The message names that object only through
    `naming_the_object()`, for a caller allowed to read the binding (issue 10: it told anyone)."""

    def __init__(self, bound: ExternalId, *, name_the_object: bool = False) -> None:
        self.bound = bound
        message = (
            "Identity already bound to a different Global ID: "
            f"ID [type={bound.type}, value={bound.external_id}]"
        )
        if name_the_object:
            message += f" belongs to {bound.managed_object_id}"
        super().__init__(message, error="identity/Conflict")

    def naming_the_object(self) -> ExternalIdTaken:
        return ExternalIdTaken(self.bound, name_the_object=True)


@transaction.atomic
def external_id_delete(
    *, external_id: ExternalId, precondition: Callable[[ExternalId], None] | None = None
) -> None:
    """Unbind the external ID; `precondition` (`If-Match`) is checked on the locked row (404 when
    another request unbound it first)."""
    locked = ExternalId.objects.select_for_update().filter(pk=external_id.pk).first()
    if locked is None:
        raise NotFound(
            f"External id not found; external id = ID [type={external_id.type}, "
            f"value={external_id.external_id}]",
            error="identity/Not Found",
        )
    if precondition is not None:
        precondition(locked)
    locked.delete()
