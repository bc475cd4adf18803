"""inventory.services: managed object writes, references, deletion and external IDs (inventory.md,
identity.md), without HTTP."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection, transaction

from deviceplatform.api.exceptions import Conflict, MissingFields, NotFound, ValidationFailed
from inventory import services
from inventory.models import ExternalId, ManagedObject, ManagedObjectReference, Relation
from tests.factories import (
    AgentFactory,
    DeviceFactory,
    ExternalIdFactory,
    GroupFactory,
    ManagedObjectFactory,
    link,
)

pytestmark = pytest.mark.django_db

T0 = datetime(2024, 5, 14, 10, 18, 33, 477000, tzinfo=UTC)


def ids(objects: Any) -> set[int]:
    return {mo.pk for mo in objects}


def edges() -> set[tuple[int, str, int]]:
    return set(ManagedObjectReference.objects.values_list("parent_id", "relation", "child_id"))


# --- create ---------------------------------------------------------------------------------------


def test_create_empty_body_gives_an_object_with_owner_and_times() -> None:
    mo = services.managed_object_create(owner="alice", data={}, now=T0)

    mo.refresh_from_db()
    assert mo.owner == "alice"
    assert mo.name is None
    assert mo.type is None
    assert mo.fragments == {}
    assert mo.creation_time == T0
    assert mo.last_updated == T0
    assert (mo.is_device, mo.is_agent, mo.is_group) == (False, False, False)


def test_create_stores_fragments_verbatim_and_drops_nulls_and_read_only_keys() -> None:
    body = {
        "name": "Dev",
        "type": "c8y_Linux",
        "c8y_Hardware": {"model": "RaspPi", "nested": {"deep": [1, 2.5, None, True]}},
        "c8y_List": [1, "two", {"three": 3}],
        "c8y_Str": "text",
        "c8y_Int": 42,
        "c8y_Float": 1.5,
        "c8y_True": True,
        "c8y_False": False,
        "c8y_Empty": {},
        "c8y_Null": None,
        "id": "999999",
        "self": "https://elsewhere/inventory/managedObjects/1",
        "creationTime": "2000-01-01T00:00:00.000Z",
        "lastUpdated": "2000-01-01T00:00:00.000Z",
        "childDevices": {"references": [{"managedObject": {"id": "1"}}]},
        "childAssets": {"references": []},
        "childAdditions": {"references": []},
        "deviceParents": {"references": []},
        "assetParents": {"references": []},
        "additionParents": {"references": []},
    }

    mo = services.managed_object_create(owner="alice", data=body, now=T0)

    mo.refresh_from_db()
    assert mo.pk != 999999
    assert (mo.name, mo.type) == ("Dev", "c8y_Linux")
    assert mo.creation_time == T0
    assert mo.fragments == {
        "c8y_Hardware": {"model": "RaspPi", "nested": {"deep": [1, 2.5, None, True]}},
        "c8y_List": [1, "two", {"three": 3}],
        "c8y_Str": "text",
        "c8y_Int": 42,
        "c8y_Float": 1.5,
        "c8y_True": True,
        "c8y_False": False,
        "c8y_Empty": {},
    }
    assert not ManagedObjectReference.objects.exists()


def test_create_null_name_and_type_are_not_stored() -> None:
    mo = services.managed_object_create(owner="alice", data={"name": None, "type": None})

    assert (mo.name, mo.type) == (None, None)


@pytest.mark.parametrize(
    ("allow_owner", "expected"), [(False, "alice"), (True, "bob")], ids=["ignored", "admin"]
)
def test_create_owner_only_honoured_when_allowed(allow_owner: bool, expected: str) -> None:
    mo = services.managed_object_create(
        owner="alice", data={"owner": "bob"}, allow_owner=allow_owner
    )

    assert mo.owner == expected


def test_create_ids_increase() -> None:
    first = ManagedObjectFactory()
    second = ManagedObjectFactory()

    assert second.pk > first.pk


@pytest.mark.parametrize(
    "body",
    [
        {"name": 5},
        {"name": ["x"]},
        {"type": []},
        {"type": {}},
        {"owner": 7},
        {"a.b": {}},
        {"$x": 1},
        {"has space": 1},
        {"tab\tname": 1},
        {"": 1},
    ],
    ids=repr,
)
def test_create_invalid_body_is_refused_and_writes_nothing(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationFailed):
        services.managed_object_create(owner="alice", data=body)

    assert not ManagedObject.objects.exists()


# --- flags ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fragments", "flags"),
    [
        ({}, (False, False, False)),
        ({"c8y_IsDevice": {}}, (True, False, False)),
        ({"com_cumulocity_model_Agent": {}}, (False, True, False)),
        ({"c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}}, (True, True, False)),
        ({"c8y_IsDeviceGroup": {}}, (False, False, True)),
        ({"c8y_IsDevice": None}, (False, False, False)),
    ],
)
def test_create_sets_flags_from_fragments(
    fragments: dict[str, Any], flags: tuple[bool, bool, bool]
) -> None:
    mo = services.managed_object_create(owner="alice", data=fragments)

    mo.refresh_from_db()
    assert (mo.is_device, mo.is_agent, mo.is_group) == flags


def test_update_flags_follow_fragments() -> None:
    mo = ManagedObjectFactory()

    services.managed_object_update(
        managed_object_id=mo.pk, data={"c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}}
    )
    mo.refresh_from_db()
    assert (mo.is_device, mo.is_agent, mo.is_group) == (True, True, False)

    services.managed_object_update(
        managed_object_id=mo.pk,
        data={"com_cumulocity_model_Agent": None, "c8y_IsDevice": None, "c8y_IsDeviceGroup": {}},
    )
    mo.refresh_from_db()
    assert (mo.is_device, mo.is_agent, mo.is_group) == (False, False, True)


# --- update ---------------------------------------------------------------------------------------


def test_update_replaces_fragments_wholesale_and_null_removes() -> None:
    mo = ManagedObjectFactory(
        name="Dev",
        type="c8y_Linux",
        fragments={
            "c8y_Hardware": {"model": "A", "serialNumber": "1"},
            "c8y_X": {"a": 1},
            "c8y_Keep": [1, 2],
        },
    )

    services.managed_object_update(
        managed_object_id=mo.pk,
        data={"c8y_Hardware": {"model": "B"}, "c8y_X": None, "c8y_New": "v", "c8y_Absent": None},
    )

    mo.refresh_from_db()
    assert mo.fragments == {"c8y_Hardware": {"model": "B"}, "c8y_Keep": [1, 2], "c8y_New": "v"}
    assert (mo.name, mo.type) == ("Dev", "c8y_Linux")


def test_update_null_name_and_type_remove_them() -> None:
    mo = ManagedObjectFactory(name="Dev", type="c8y_Linux")

    services.managed_object_update(managed_object_id=mo.pk, data={"name": None, "type": None})

    mo.refresh_from_db()
    assert (mo.name, mo.type) == (None, None)


def test_update_sets_last_updated_and_keeps_creation_time() -> None:
    mo = services.managed_object_create(owner="alice", data={}, now=T0)
    later = T0 + timedelta(minutes=5)

    services.managed_object_update(managed_object_id=mo.pk, data={"name": "x"}, now=later)

    mo.refresh_from_db()
    assert mo.creation_time == T0
    assert mo.last_updated == later


def test_update_ignores_read_only_keys() -> None:
    mo = services.managed_object_create(owner="alice", data={"name": "a"}, now=T0)
    pk = mo.pk

    services.managed_object_update(
        managed_object_id=mo.pk,
        data={
            "id": "1",
            "self": "x",
            "creationTime": "2000-01-01T00:00:00Z",
            "lastUpdated": "2000-01-01T00:00:00Z",
            "childDevices": {"references": []},
            "assetParents": {"references": []},
        },
        now=T0 + timedelta(seconds=1),
    )

    mo.refresh_from_db()
    assert mo.pk == pk
    assert mo.creation_time == T0
    assert mo.last_updated == T0 + timedelta(seconds=1)
    assert mo.fragments == {}


@pytest.mark.parametrize(
    ("allow_owner", "expected"), [(False, "alice"), (True, "bob")], ids=["ignored", "admin"]
)
def test_update_owner_only_honoured_when_allowed(allow_owner: bool, expected: str) -> None:
    mo = ManagedObjectFactory(owner="alice")

    services.managed_object_update(
        managed_object_id=mo.pk, data={"owner": "bob"}, allow_owner=allow_owner
    )

    mo.refresh_from_db()
    assert mo.owner == expected


@pytest.mark.parametrize("body", [{"name": 5}, {"type": []}, {"x.y": 1}, {"$z": 1}], ids=repr)
def test_update_invalid_body_changes_nothing(body: dict[str, Any]) -> None:
    mo = services.managed_object_create(owner="alice", data={"name": "a", "c8y_A": 1}, now=T0)

    with pytest.raises(ValidationFailed):
        services.managed_object_update(managed_object_id=mo.pk, data=body)

    mo.refresh_from_db()
    assert (mo.name, mo.fragments, mo.last_updated) == ("a", {"c8y_A": 1}, T0)


# --- _descendants ---------------------------------------------------------------------------------


def test_descendants_follows_only_the_given_relations() -> None:
    root, device, sub_device, asset, addition = (ManagedObjectFactory() for _ in range(5))
    link(root, device, relation=Relation.DEVICE)
    link(device, sub_device, relation=Relation.DEVICE)
    link(root, asset, relation=Relation.ASSET)
    link(root, addition, relation=Relation.ADDITION)

    assert services._descendants([root.pk], [Relation.DEVICE], only_groups=False) == ids(
        [device, sub_device]
    )
    assert services._descendants(
        [root.pk], [Relation.DEVICE, Relation.ASSET], only_groups=False
    ) == ids([device, sub_device, asset])
    assert services._descendants([root.pk], list(Relation), only_groups=False) == ids(
        [device, sub_device, asset, addition]
    )
    assert services._descendants([sub_device.pk], list(Relation), only_groups=False) == set()


def test_descendants_only_groups_stops_at_non_groups() -> None:
    group = GroupFactory()
    subgroup = GroupFactory()
    device = DeviceFactory()
    group_below_device = GroupFactory()
    subsubgroup = GroupFactory()
    link(group, subgroup, device, relation=Relation.ASSET)
    link(device, group_below_device, relation=Relation.ASSET)
    link(subgroup, subsubgroup, relation=Relation.ASSET)

    assert services._descendants([group.pk], [Relation.ASSET], only_groups=True) == ids(
        [subgroup, subsubgroup]
    )


def test_descendants_terminates_on_asset_cycles() -> None:
    a, b, c = (GroupFactory() for _ in range(3))
    link(a, b, relation=Relation.ASSET)
    link(b, c, relation=Relation.ASSET)
    link(c, a, relation=Relation.ASSET)  # asset edges may form cycles

    assert services._descendants([a.pk], [Relation.ASSET], only_groups=False) == ids([a, b, c])


# --- references -----------------------------------------------------------------------------------


def test_add_children_creates_edges_in_order_and_is_idempotent() -> None:
    parent = AgentFactory()
    first, second = DeviceFactory(), DeviceFactory()

    refs = link(parent, second, first)
    again = link(parent, first)

    assert [ref.child_id for ref in refs] == [second.pk, first.pk]
    assert again[0].pk == refs[1].pk
    assert ManagedObjectReference.objects.count() == 2
    assert list(
        ManagedObjectReference.objects.filter(parent=parent).values_list("child_id", flat=True)
    ) == [second.pk, first.pk]


def test_add_children_updates_parent_last_updated() -> None:
    parent = services.managed_object_create(owner="alice", data={}, now=T0)
    child = ManagedObjectFactory()
    later = T0 + timedelta(hours=1)

    services.managed_object_add_children(
        parent=parent, relation=Relation.ASSET, children=[child], now=later
    )

    parent.refresh_from_db()
    assert parent.last_updated == later


@pytest.mark.parametrize("relation", list(Relation))
def test_add_children_refuses_self_reference(relation: Relation) -> None:
    mo = ManagedObjectFactory()

    with pytest.raises(ValidationFailed):
        link(mo, mo, relation=relation)

    assert not ManagedObjectReference.objects.exists()


def test_add_children_refuses_device_cycle_and_writes_nothing() -> None:
    a, b, c, d = (DeviceFactory() for _ in range(4))
    link(a, b)
    link(b, c)
    before = edges()

    assert services._would_cycle(c.pk, a.pk)
    assert not services._would_cycle(a.pk, c.pk)
    with pytest.raises(ValidationFailed):
        # d is fine, a closes the cycle: the whole call is atomic
        services.managed_object_add_children(parent=c, relation=Relation.DEVICE, children=[d, a])

    assert edges() == before


@pytest.mark.parametrize("relation", [Relation.ASSET, Relation.ADDITION])
def test_device_cycle_rule_ignores_other_relations(relation: Relation) -> None:
    a, b, c = (DeviceFactory() for _ in range(3))
    link(a, b)
    link(b, c)

    link(c, a, relation=relation)

    assert (c.pk, relation.value, a.pk) in edges()


def test_remove_children_removes_listed_edges_and_skips_missing() -> None:
    parent = GroupFactory()
    a, b, c = (DeviceFactory() for _ in range(3))
    link(parent, a, b, c, relation=Relation.ASSET)
    link(parent, a, relation=Relation.DEVICE)

    removed = services.managed_object_remove_children(
        parent=parent, relation=Relation.ASSET, child_ids=[a.pk, c.pk, 999_999_999]
    )

    assert removed == 2
    assert edges() == {(parent.pk, "asset", b.pk), (parent.pk, "device", a.pk)}
    assert ManagedObject.objects.filter(pk__in=[a.pk, c.pk]).count() == 2


def test_remove_children_strict_missing_edge_is_not_found() -> None:
    parent, child = ManagedObjectFactory(), ManagedObjectFactory()
    link(parent, child, relation=Relation.ASSET)

    with pytest.raises(NotFound) as caught:
        services.managed_object_remove_children(
            parent=parent, relation=Relation.DEVICE, child_ids=[child.pk], strict=True
        )

    assert caught.value.error == "inventory/Not Found"
    assert edges() == {(parent.pk, "asset", child.pk)}


# --- delete ---------------------------------------------------------------------------------------


def build_hierarchy() -> dict[str, ManagedObject]:
    """root (device) -dev-> child -dev-> grandchild; root -asset-> asset; root -addition-> addition;
    a second parent `other` also holds child."""
    objects = {
        "root": AgentFactory(),
        "child": DeviceFactory(),
        "grandchild": DeviceFactory(),
        "asset": ManagedObjectFactory(),
        "addition": ManagedObjectFactory(),
        "other": AgentFactory(),
    }
    link(objects["root"], objects["child"])
    link(objects["child"], objects["grandchild"])
    link(objects["other"], objects["child"])
    link(objects["root"], objects["asset"], relation=Relation.ASSET)
    link(objects["root"], objects["addition"], relation=Relation.ADDITION)
    return objects


@pytest.mark.parametrize(
    ("options", "gone"),
    [
        ({}, {"root"}),
        ({"cascade": True}, {"root", "child", "grandchild", "asset"}),
        ({"force_cascade": True}, {"root", "child", "grandchild", "asset", "addition"}),
        (
            {"cascade": True, "force_cascade": True},
            {"root", "child", "grandchild", "asset", "addition"},
        ),
    ],
    ids=["plain", "cascade", "forceCascade", "both"],
)
def test_delete_options(options: dict[str, bool], gone: set[str]) -> None:
    objects = build_hierarchy()
    ExternalIdFactory(managed_object=objects["root"])
    ExternalIdFactory(managed_object=objects["child"])

    deleted = services.managed_object_delete(managed_object=objects["root"], **options)

    assert set(deleted) == {objects[name].pk for name in gone}
    assert deleted == sorted(deleted)
    remaining = set(ManagedObject.objects.values_list("pk", flat=True))
    assert remaining == {mo.pk for name, mo in objects.items() if name not in gone}
    assert not ExternalId.objects.filter(managed_object_id__in=deleted).exists()
    # every reference to a deleted object is gone; survivors only lose that parent
    assert not ManagedObjectReference.objects.filter(parent_id__in=deleted).exists()
    assert not ManagedObjectReference.objects.filter(child_id__in=deleted).exists()


def test_delete_plain_device_keeps_children_which_lose_the_parent() -> None:
    objects = build_hierarchy()

    services.managed_object_delete(managed_object=objects["root"])

    assert edges() == {
        (objects["child"].pk, "device", objects["grandchild"].pk),
        (objects["other"].pk, "device", objects["child"].pk),
    }


def test_delete_group_deletes_subgroups_recursively_but_not_devices() -> None:
    group, subgroup, subsubgroup = GroupFactory(), GroupFactory(), GroupFactory()
    device, nested_device = DeviceFactory(), DeviceFactory()
    link(group, subgroup, device, relation=Relation.ASSET)
    link(subgroup, subsubgroup, nested_device, relation=Relation.ASSET)

    deleted = services.managed_object_delete(managed_object=group)

    assert set(deleted) == ids([group, subgroup, subsubgroup])
    assert set(ManagedObject.objects.values_list("pk", flat=True)) == ids([device, nested_device])
    assert not ManagedObjectReference.objects.exists()


def test_delete_handles_cycles() -> None:
    a, b = ManagedObjectFactory(), ManagedObjectFactory()
    link(a, b, relation=Relation.ASSET)
    link(b, a, relation=Relation.ASSET)

    deleted = services.managed_object_delete(managed_object=a, force_cascade=True)

    assert set(deleted) == ids([a, b])
    assert not ManagedObject.objects.exists()


# --- external IDs ---------------------------------------------------------------------------------


def test_external_id_create_binds_and_is_idempotent_for_the_same_object() -> None:
    device = DeviceFactory()

    first, created = services.external_id_create(
        managed_object=device, type="c8y_Serial", external_id="raspi-1"
    )
    second, created_again = services.external_id_create(
        managed_object=device, type="c8y_Serial", external_id="raspi-1"
    )

    assert created is True
    assert created_again is False
    assert second.pk == first.pk
    assert ExternalId.objects.count() == 1


def test_external_id_is_case_sensitive_and_an_object_may_have_many() -> None:
    device = DeviceFactory()
    for type_, value in [("c8y_Serial", "a"), ("c8y_Serial", "A"), ("c8y_Serial", "b"), ("x", "a")]:
        _, created = services.external_id_create(
            managed_object=device, type=type_, external_id=value
        )
        assert created

    assert device.external_ids.count() == 4


def test_external_id_bound_elsewhere_is_a_conflict() -> None:
    bound = ExternalIdFactory(type="c8y_Serial", external_id="raspi-1")
    other = DeviceFactory()

    with pytest.raises(Conflict) as caught:
        services.external_id_create(managed_object=other, type="c8y_Serial", external_id="raspi-1")

    assert caught.value.error == "identity/Conflict"
    assert list(ExternalId.objects.values_list("pk", "managed_object_id")) == [
        (bound.pk, bound.managed_object_id)
    ]


@pytest.mark.parametrize(
    ("type_", "value", "missing"),
    [
        (None, "x", "type"),
        ("c8y_Serial", None, "externalId"),
        (None, None, "externalId,type"),
        ("", "x", "type"),
        ("c8y_Serial", "", "externalId"),
        ("", "", "externalId,type"),
        (5, "x", "type"),
        ("c8y_Serial", ["x"], "externalId"),
    ],
)
def test_external_id_create_missing_fields(type_: Any, value: Any, missing: str) -> None:
    device = DeviceFactory()

    with pytest.raises(MissingFields) as caught:
        services.external_id_create(managed_object=device, type=type_, external_id=value)

    assert caught.value.message == f"Following mandatory fields should be included: {missing}"
    assert not ExternalId.objects.exists()


def test_external_id_type_with_slash_is_refused() -> None:
    with pytest.raises(ValidationFailed):
        services.external_id_create(managed_object=DeviceFactory(), type="a/b", external_id="x")

    assert not ExternalId.objects.exists()


def test_external_id_delete_keeps_the_object() -> None:
    external_id = ExternalIdFactory()

    services.external_id_delete(external_id=external_id)

    assert not ExternalId.objects.exists()
    assert ManagedObject.objects.filter(pk=external_id.managed_object_id).exists()


# --- external_id_create under a real race ---------------------------------------------------------
# The race runs on committed rows in threads with their own connections, and removes them again at
# the end: a test transaction would hide its rows from them (and on SQLite hold the one write lock).


def in_thread(function: Callable[[], Any]) -> threading.Thread:
    """Start `function` in a thread with its own database connection; its outcome goes to .outcome."""

    def target() -> None:
        try:
            thread.outcome = ("ok", function())  # type: ignore[attr-defined]
        except Exception as exc:
            thread.outcome = ("error", exc)  # type: ignore[attr-defined]
        finally:
            connection.close()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def run_in_thread(function: Callable[[], Any]) -> Any:
    thread = in_thread(function)
    thread.join(timeout=30)
    kind, value = thread.outcome  # type: ignore[attr-defined]
    if kind == "error":
        raise value
    return value


def hold_insert_until_someone_waits(
    managed_object_id: int, inserted: threading.Event, other_writing: threading.Event
) -> int:
    """Insert the pair, then commit only once the other create has passed its existence check and
    waits to write: on PostgreSQL it is blocked inside its INSERT on our row; SQLite has one writer
    at a time, so it waits to open its write transaction (`other_writing`, set as it does)."""
    with transaction.atomic():
        row = ExternalId.objects.create(
            type="c8y_Serial", external_id="raced", managed_object_id=managed_object_id
        )
        inserted.set()
        if connection.vendor == "sqlite":
            if other_writing.wait(timeout=10):
                return row.pk
            raise AssertionError("the concurrent create never started to write")
        deadline = time.monotonic() + 10
        with connection.cursor() as cursor:
            while time.monotonic() < deadline:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
                if cursor.fetchone()[0]:
                    return row.pk
    raise AssertionError("the concurrent create never waited for the first insert")


def signal_write_transaction(started: threading.Event) -> Callable[..., Any]:
    """A Django execute wrapper that sets `started` when its connection opens a write transaction
    (SQLite's `BEGIN IMMEDIATE`); the statement itself runs unchanged."""

    def wrapper(execute: Callable[..., Any], sql: str, *args: Any) -> Any:
        if sql.startswith("BEGIN"):
            started.set()
        return execute(sql, *args)

    return wrapper


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("same_object", [True, False], ids=["same-object", "other-object"])
def test_external_id_create_race(same_object: bool) -> None:
    """Two creates of one pair at once: the loser gets the winner's row (same object) or a 409."""
    target, elsewhere = run_in_thread(
        lambda: (
            services.managed_object_create(owner="race", data={"name": "race target"}),
            services.managed_object_create(owner="race", data={"name": "race other"}),
        )
    )
    try:
        inserted, loser_writing = threading.Event(), threading.Event()
        winner_object = target if same_object else elsewhere
        holder = in_thread(
            lambda: hold_insert_until_someone_waits(winner_object.pk, inserted, loser_writing)
        )
        assert inserted.wait(timeout=10)

        def lose() -> Any:
            with connection.execute_wrapper(signal_write_transaction(loser_writing)):
                return services.external_id_create(
                    managed_object=target, type="c8y_Serial", external_id="raced"
                )

        loser = in_thread(lose)
        holder.join(timeout=30)
        loser.join(timeout=30)

        holder_kind, winner_pk = holder.outcome  # type: ignore[attr-defined]
        assert holder_kind == "ok", winner_pk
        kind, value = loser.outcome  # type: ignore[attr-defined]
        if same_object:
            assert kind == "ok", value
            row, created = value
            assert (row.pk, created) == (winner_pk, False)
            assert row.managed_object_id == target.pk
        else:
            assert kind == "error"
            assert isinstance(value, Conflict)
        rows = run_in_thread(
            lambda: list(
                ExternalId.objects.filter(external_id="raced").values_list(
                    "pk", "managed_object_id"
                )
            )
        )
        assert rows == [(winner_pk, winner_object.pk)]
    finally:
        run_in_thread(
            lambda: ManagedObject.objects.filter(pk__in=[target.pk, elsewhere.pk]).delete()
        )
