"""Child references over HTTP: `/inventory/managedObjects/{id}/childDevices[/{childId}]` (also
childAssets, childAdditions) and the parent collections (inventory.md §7; auth.md §6, §7)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from rest_framework.test import APIClient

from deviceplatform.roles import Role
from inventory.models import ManagedObject, ManagedObjectReference, Relation
from tests.factories import (
    UNAUTHENTICATED,
    AgentFactory,
    Clients,
    DeviceFactory,
    GroupFactory,
    ManagedObjectFactory,
    link,
)
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db

BASE = "http://testserver"
VENDOR = "application/vnd.com.nsn.cumulocity."
REF_TYPE = f"{VENDOR}managedobjectreference+json"
REF_COLLECTION_TYPE = f"{VENDOR}managedobjectreferencecollection+json"
PLAIN_JSON = "application/json;charset=UTF-8"
CHILD_KEYS = ("childDevices", "childAssets", "childAdditions")
PARENT_KEYS = ("deviceParents", "assetParents", "additionParents")
OLD = datetime(2020, 1, 1, tzinfo=UTC)

RELATIONS = {relation.children_segment: relation for relation in Relation}
PARENTS_SEGMENT = {relation.children_segment: relation.parents_segment for relation in Relation}
segments = pytest.mark.parametrize("segment", list(RELATIONS))

USERS: dict[str, list[Role]] = {
    "admin": [Role.INVENTORY_ADMIN],
    "reader": [Role.INVENTORY_READ],
    "owner": [Role.INVENTORY_CREATE],
    "other": [Role.INVENTORY_CREATE],
    "plain": [],  # owns objects (set by an admin) but holds no role at all
    "nobody": [],
}


@pytest.fixture
def api(make_user: Callable[..., Any], client_for: Callable[..., APIClient]) -> Clients:
    return Clients(make_user, client_for, USERS, usernames={"admin": "inv_admin"})


def mo_path(pk: object) -> str:
    return f"/inventory/managedObjects/{pk}"


def mo_url(pk: object) -> str:
    return f"{BASE}{mo_path(pk)}"


def call(
    client: APIClient,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: str | None = None,
    accept: str | None = None,
    content_type: str = "application/json",
) -> Any:
    data = raw if raw is not None else ("" if body is None else json.dumps(body))
    extra = {"HTTP_ACCEPT": accept} if accept is not None else {}
    return client.generic(method, path, data, content_type=content_type, **extra)


def ok_json(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, (response.status_code, response.content[:500])
    return response.json()


def by_id(pk: object) -> dict[str, Any]:
    return {"managedObject": {"id": str(pk)}}


def edges() -> set[tuple[int, str, int]]:
    return set(ManagedObjectReference.objects.values_list("parent_id", "relation", "child_id"))


def children(parent: ManagedObject, segment: str) -> list[int]:
    return list(
        ManagedObjectReference.objects.filter(parent=parent, relation=RELATIONS[segment])
        .order_by("id")
        .values_list("child_id", flat=True)
    )


def ref_ids(body: dict[str, Any]) -> list[int]:
    return [int(item["managedObject"]["id"]) for item in body["references"]]


# --- POST: the body shapes ------------------------------------------------------------------------


@segments
@pytest.mark.parametrize(
    "shape",
    ["id-string", "id-number", "self-url", "self-url-trailing-slash", "references"],
)
def test_assign_existing_child(api: Clients, segment: str, shape: str) -> None:
    parent, child = AgentFactory(), DeviceFactory()
    body = {
        "id-string": {"managedObject": {"id": str(child.pk)}},
        "id-number": {"managedObject": {"id": child.pk}},
        "self-url": {"managedObject": {"self": f"https://elsewhere{mo_path(child.pk)}"}},
        "self-url-trailing-slash": {"managedObject": {"self": f"{mo_url(child.pk)}/"}},
        "references": {"references": [{"managedObject": {"id": child.pk}}]},
    }[shape]

    response = call(api["admin"], "POST", f"{mo_path(parent.pk)}/{segment}", body)

    assert response.status_code == 201
    assert response.content == b""
    assert response["Content-Length"] == "0"
    collection = f"{mo_url(parent.pk)}/{segment}"
    expected_location = collection if shape == "references" else f"{collection}/{child.pk}"
    assert response["Location"] == expected_location
    assert edges() == {(parent.pk, RELATIONS[segment].value, child.pk)}


@segments
@pytest.mark.parametrize(
    ("accept", "content_type"),
    [(REF_TYPE, f"{REF_TYPE};charset=UTF-8;ver=0.9"), ("application/json", PLAIN_JSON)],
)
def test_assign_by_id_returns_the_reference_with_accept(
    api: Clients, segment: str, accept: str, content_type: str
) -> None:
    parent, child = AgentFactory(), DeviceFactory(name="Child", c8y_Hardware={"model": "m"})
    grandchild = DeviceFactory()
    link(child, grandchild)

    response = call(
        api["admin"], "POST", f"{mo_path(parent.pk)}/{segment}", by_id(child.pk), accept=accept
    )

    body = ok_json(response, 201)
    assert response["Content-Type"] == content_type
    self_url = f"{mo_url(parent.pk)}/{segment}/{child.pk}"
    assert response["Location"] == self_url
    assert body["self"] == self_url
    embedded = body["managedObject"]
    assert embedded["id"] == str(child.pk)
    assert embedded["self"] == mo_url(child.pk)
    assert embedded["name"] == "Child"
    assert embedded["c8y_Hardware"] == {"model": "m"}
    assert ref_ids(embedded["childDevices"]) == [grandchild.pk]


@segments
def test_assign_references_list_returns_the_collection_with_accept(
    api: Clients, segment: str
) -> None:
    parent = GroupFactory()
    first, second = DeviceFactory(), DeviceFactory()

    response = call(
        api["admin"],
        "POST",
        f"{mo_path(parent.pk)}/{segment}",
        {"references": [by_id(second.pk), {"managedObject": {"id": first.pk}}]},
        accept=REF_COLLECTION_TYPE,
    )

    body = ok_json(response, 201)
    collection = f"{mo_url(parent.pk)}/{segment}"
    assert response["Content-Type"] == f"{REF_COLLECTION_TYPE};charset=UTF-8;ver=0.9"
    assert response["Location"] == collection
    assert body["self"] == collection
    assert [item["self"] for item in body["references"]] == [
        f"{collection}/{second.pk}",
        f"{collection}/{first.pk}",
    ]
    assert ref_ids(body) == [second.pk, first.pk]
    assert children(parent, segment) == [second.pk, first.pk]


@segments
@pytest.mark.parametrize("accept", [None, "application/json"])
def test_assign_new_object_body_creates_and_links_it(
    api: Clients, segment: str, accept: str | None
) -> None:
    parent = AgentFactory(owner="owner")

    response = call(
        api["owner"],
        "POST",
        f"{mo_path(parent.pk)}/{segment}",
        {"name": "New child", "c8y_IsDevice": {}, "owner": "someone-else", "c8y_Null": None},
        accept=accept,
    )

    assert response.status_code == 201, response.content
    new = ManagedObject.objects.exclude(pk=parent.pk).get()
    assert (new.name, new.owner, new.is_device) == ("New child", "owner", True)
    assert new.fragments == {"c8y_IsDevice": {}}
    assert response["Location"] == f"{mo_url(parent.pk)}/{segment}/{new.pk}"
    assert children(parent, segment) == [new.pk]
    if accept is None:
        assert response.content == b""
    else:
        body = response.json()
        assert body["self"] == response["Location"]
        assert body["managedObject"]["id"] == str(new.pk)
        assert body["managedObject"]["owner"] == "owner"
        assert body["managedObject"]["name"] == "New child"


def test_assign_new_empty_object(api: Clients) -> None:
    parent = GroupFactory(owner="owner")

    response = call(api["owner"], "POST", f"{mo_path(parent.pk)}/childAssets", {})

    assert response.status_code == 201
    new = ManagedObject.objects.exclude(pk=parent.pk).get()
    assert new.owner == "owner"
    assert children(parent, "childAssets") == [new.pk]


def test_assign_new_object_by_admin_may_set_owner(api: Clients) -> None:
    parent = GroupFactory()

    response = call(
        api["admin"], "POST", f"{mo_path(parent.pk)}/childAssets", {"owner": "bob"}, accept="*/*"
    )

    assert ok_json(response, 201)["managedObject"]["owner"] == "bob"


@segments
def test_readding_an_existing_edge_is_a_201_no_op(api: Clients, segment: str) -> None:
    parent = AgentFactory()
    first, second = DeviceFactory(), DeviceFactory()
    link(parent, first, second, relation=RELATIONS[segment])
    before = list(ManagedObjectReference.objects.values_list("pk", "parent_id", "child_id"))

    again = call(api["admin"], "POST", f"{mo_path(parent.pk)}/{segment}", by_id(first.pk))
    listed = call(
        api["admin"],
        "POST",
        f"{mo_path(parent.pk)}/{segment}",
        {"references": [by_id(second.pk), by_id(first.pk)]},
    )

    assert again.status_code == 201
    assert listed.status_code == 201
    assert list(ManagedObjectReference.objects.values_list("pk", "parent_id", "child_id")) == before
    assert children(parent, segment) == [first.pk, second.pk]


def test_duplicate_ids_in_one_references_list_add_one_edge(api: Clients) -> None:
    parent, child = GroupFactory(), DeviceFactory()

    response = call(
        api["admin"],
        "POST",
        f"{mo_path(parent.pk)}/childAssets",
        {"references": [by_id(child.pk), {"managedObject": {"id": child.pk}}]},
    )

    assert response.status_code == 201
    assert children(parent, "childAssets") == [child.pk]


def test_assignment_updates_the_parent_last_updated(api: Clients) -> None:
    parent, child = AgentFactory(), DeviceFactory()
    ManagedObject.objects.filter(pk__in=[parent.pk, child.pk]).update(
        last_updated=OLD, creation_time=OLD
    )

    call(api["admin"], "POST", f"{mo_path(parent.pk)}/childDevices", by_id(child.pk))

    parent.refresh_from_db()
    child.refresh_from_db()
    assert parent.last_updated > OLD
    assert parent.creation_time == OLD
    assert child.last_updated == OLD


def test_relations_are_independent(api: Clients) -> None:
    parent, child = AgentFactory(), DeviceFactory()

    for segment in RELATIONS:
        assert (
            call(api["admin"], "POST", f"{mo_path(parent.pk)}/{segment}", by_id(child.pk))
        ).status_code == 201

    body = ok_json(call(api["admin"], "GET", mo_path(parent.pk)))
    for key in CHILD_KEYS:
        assert ref_ids(body[key]) == [child.pk]
    call(api["admin"], "DELETE", f"{mo_path(parent.pk)}/childAssets/{child.pk}")
    body = ok_json(call(api["admin"], "GET", mo_path(parent.pk)))
    assert [ref_ids(body[key]) for key in CHILD_KEYS] == [[child.pk], [], [child.pk]]


# --- POST: refusals -------------------------------------------------------------------------------


@segments
@pytest.mark.parametrize("shape", ["id", "self", "references"])
def test_self_reference_is_422(
    api: Clients, row_counts: Callable[[], dict[str, int]], segment: str, shape: str
) -> None:
    mo = AgentFactory()
    api.prepare("admin")
    body = {
        "id": by_id(mo.pk),
        "self": {"managedObject": {"self": mo_url(mo.pk)}},
        "references": {"references": [by_id(mo.pk)]},
    }[shape]
    before = row_counts()

    response = call(api["admin"], "POST", f"{mo_path(mo.pk)}/{segment}", body)

    assert_error(response, 422)
    assert row_counts() == before


@pytest.mark.parametrize("shape", ["single", "references"])
def test_child_devices_cycle_is_422_and_writes_nothing(api: Clients, shape: str) -> None:
    a, b, c, d = (DeviceFactory() for _ in range(4))
    ManagedObject.objects.filter(pk=c.pk).update(last_updated=OLD)
    for parent, child in ((a, b), (b, c)):
        call(api["admin"], "POST", f"{mo_path(parent.pk)}/childDevices", by_id(child.pk))
    before = edges()
    body = (
        by_id(a.pk) if shape == "single" else {"references": [by_id(d.pk), by_id(a.pk)]}
    )  # d alone would be fine: nothing of the list may be written

    response = call(api["admin"], "POST", f"{mo_path(c.pk)}/childDevices", body)

    assert_error(response, 422)
    assert edges() == before
    c.refresh_from_db()
    assert c.last_updated == OLD


def test_two_node_device_cycle_is_422(api: Clients) -> None:
    a, b = DeviceFactory(), DeviceFactory()
    link(a, b)

    assert_error(call(api["admin"], "POST", f"{mo_path(b.pk)}/childDevices", by_id(a.pk)), 422)


@pytest.mark.parametrize("segment", ["childAssets", "childAdditions"])
def test_the_same_edge_in_other_relations_is_no_device_cycle(api: Clients, segment: str) -> None:
    a, b, c = (DeviceFactory() for _ in range(3))
    link(a, b)
    link(b, c)

    response = call(api["admin"], "POST", f"{mo_path(c.pk)}/{segment}", by_id(a.pk))

    assert response.status_code == 201
    assert (c.pk, RELATIONS[segment].value, a.pk) in edges()


def test_device_cycle_ignores_asset_edges_on_the_path(api: Clients) -> None:
    a, b, c = (DeviceFactory() for _ in range(3))
    link(a, b, relation=Relation.ASSET)
    link(b, c)

    response = call(api["admin"], "POST", f"{mo_path(c.pk)}/childDevices", by_id(a.pk))

    assert response.status_code == 201


@segments
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_parent_missing_is_404(
    api: Clients, row_counts: Callable[[], dict[str, int]], segment: str, method: str
) -> None:
    child = DeviceFactory()
    api.prepare("admin", "owner")
    before = row_counts()
    body = {"references": [by_id(child.pk)]} if method == "DELETE" else by_id(child.pk)

    for who in ("admin", "owner"):
        for parent in ("999999999", "abc"):
            response = call(api[who], method, f"{mo_path(parent)}/{segment}", body)
            assert_error(response, 404, "inventory/Not Found")
            detail = f"{mo_path(parent)}/{segment}/{child.pk}"
            if method != "POST":
                assert_error(call(api[who], method, detail), 404, "inventory/Not Found")

    assert row_counts() == before


@segments
@pytest.mark.parametrize(
    "body_for",
    [
        lambda ok, missing: {"managedObject": {"id": str(missing)}},
        lambda ok, missing: {"managedObject": {"id": missing}},
        lambda ok, missing: {"managedObject": {"self": mo_url(missing)}},
        lambda ok, missing: {"references": [by_id(ok), by_id(missing)]},
    ],
    ids=["id", "id-number", "self", "references-with-one-missing"],
)
def test_child_missing_is_404_and_writes_nothing(
    api: Clients,
    row_counts: Callable[[], dict[str, int]],
    segment: str,
    body_for: Callable[[int, int], dict[str, Any]],
) -> None:
    parent, ok = AgentFactory(), DeviceFactory()
    ManagedObject.objects.filter(pk=parent.pk).update(last_updated=OLD)
    missing = ok.pk + 100_000
    api.prepare("admin")
    before = row_counts()

    response = call(
        api["admin"], "POST", f"{mo_path(parent.pk)}/{segment}", body_for(ok.pk, missing)
    )

    body = assert_error(response, 404, "inventory/Not Found")
    assert str(missing) in body["message"]
    assert row_counts() == before
    parent.refresh_from_db()
    assert parent.last_updated == OLD


@segments
@pytest.mark.parametrize("many", [False, True], ids=["managedObject", "references"])
def test_child_id_beyond_bigint_is_404_and_writes_nothing(
    api: Clients, row_counts: Callable[[], dict[str, int]], segment: str, many: bool
) -> None:
    """Well-formed but beyond the bigint range: names no object, like any missing one (and never
    reaches the database, where SQLite could not even bind it)."""
    parent, ok = AgentFactory(), DeviceFactory()
    huge = "99999999999999999999"
    body = {"references": [by_id(ok.pk), by_id(huge)]} if many else by_id(huge)
    api.prepare("admin")
    before = row_counts()

    response = call(api["admin"], "POST", f"{mo_path(parent.pk)}/{segment}", body)

    assert huge in assert_error(response, 404, "inventory/Not Found")["message"]
    assert row_counts() == before


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"raw": "{"}, 400),
        ({"raw": "{}", "content_type": "text/plain"}, 415),
        ({"body": []}, 422),
        ({"body": "x"}, 422),
        ({"body": {"managedObject": "x"}}, 422),
        ({"body": {"managedObject": {}}}, 422),
        ({"body": {"managedObject": {"name": "no id"}}}, 422),
        ({"body": {"managedObject": {"id": "abc"}}}, 422),
        ({"body": {"managedObject": {"id": True}}}, 422),
        ({"body": {"managedObject": {"id": None}}}, 422),
        ({"body": {"managedObject": {"self": "https://h/inventory/managedObjects/"}}}, 422),
        ({"body": {"references": "x"}}, 422),
        ({"body": {"references": [{"id": "1"}]}}, 422),
        ({"body": {"references": [{"managedObject": {"id": "x"}}]}}, 422),
        ({"body": {"name": 5}}, 422),
        ({"body": {"c8y.Bad": {}}}, 422),
    ],
    ids=lambda value: json.dumps(value) if isinstance(value, dict) else str(value),
)
def test_post_bad_bodies(
    api: Clients, row_counts: Callable[[], dict[str, int]], kwargs: dict[str, Any], status: int
) -> None:
    parent = AgentFactory()
    api.prepare("admin")
    before = row_counts()

    response = call(api["admin"], "POST", f"{mo_path(parent.pk)}/childDevices", **kwargs)

    assert_error(response, status)
    assert row_counts() == before


# --- permissions (auth.md §7) ---------------------------------------------------------------------


@segments
@pytest.mark.parametrize(
    ("who", "parent_owner", "child_owners", "status"),
    [
        ("admin", "other", ["other"], 201),
        ("admin", "x", ["y", "z"], 201),
        ("owner", "owner", ["owner"], 201),
        ("owner", "owner", ["owner", "owner"], 201),
        ("OWNER", "owner", ["Owner"], 201),  # owners match case-insensitively
        ("plain", "plain", ["plain"], 201),  # the owner rule needs no role
        ("owner", "owner", ["other"], 403),
        ("owner", "owner", ["owner", "other"], 403),
        ("owner", "other", ["owner"], 403),
        ("reader", "other", ["other"], 403),
        ("reader", "reader", ["other"], 403),
        ("nobody", "other", ["other"], 403),
    ],
)
def test_post_permissions(
    api: Clients,
    row_counts: Callable[[], dict[str, int]],
    segment: str,
    who: str,
    parent_owner: str,
    child_owners: list[str],
    status: int,
) -> None:
    parent = ManagedObjectFactory(owner=parent_owner)
    kids = [DeviceFactory(owner=owner) for owner in child_owners]
    client = api[who.lower()]
    if who == "OWNER":
        ManagedObject.objects.filter(pk=parent.pk).update(owner="OWNER")
    before = row_counts()
    body = by_id(kids[0].pk) if len(kids) == 1 else {"references": [by_id(k.pk) for k in kids]}

    response = call(client, "POST", f"{mo_path(parent.pk)}/{segment}", body)

    if status == 201:
        assert response.status_code == 201, response.content
        assert children(parent, segment) == [k.pk for k in kids]
    else:
        assert_error(response, 403, "security/Forbidden")
        assert row_counts() == before


@segments
@pytest.mark.parametrize(("who", "status"), [("owner", 201), ("admin", 201), ("plain", 403)])
def test_post_new_object_needs_the_create_role(
    api: Clients,
    row_counts: Callable[[], dict[str, int]],
    segment: str,
    who: str,
    status: int,
) -> None:
    parent = ManagedObjectFactory(owner=who if who != "admin" else "other")
    api.prepare(who)
    before = row_counts()

    response = call(api[who], "POST", f"{mo_path(parent.pk)}/{segment}", {"name": "new"})

    if status == 201:
        assert response.status_code == 201
        (child_id,) = children(parent, segment)
        assert ManagedObject.objects.get(pk=child_id).owner == api.user(who).username
    else:
        assert_error(response, 403, "security/Forbidden")
        assert row_counts() == before


@pytest.mark.parametrize("who", UNAUTHENTICATED)
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_references_unauthenticated(
    api: Clients, row_counts: Callable[[], dict[str, int]], who: str, method: str
) -> None:
    parent, child = AgentFactory(), DeviceFactory()
    link(parent, child)
    api.prepare(who)
    before = row_counts()
    body = {"references": [by_id(child.pk)]} if method == "DELETE" else by_id(child.pk)

    for path in (
        f"{mo_path(parent.pk)}/childDevices",
        f"{mo_path(parent.pk)}/childDevices/{child.pk}",
    ):
        assert_error(call(api[who], method, path, body), 401, "security/Unauthorized")
    assert_error(call(api[who], "GET", f"{mo_path(child.pk)}/deviceParents"), 401)
    assert row_counts() == before


@segments
@pytest.mark.parametrize(
    ("who", "status"),
    [
        ("admin", 200),
        ("reader", 200),
        ("owner", 200),  # owns the parent
        ("other", 403),  # owns the child only
        ("nobody", 403),
    ],
)
def test_get_permissions(api: Clients, segment: str, who: str, status: int) -> None:
    parent = ManagedObjectFactory(owner="owner")
    child = DeviceFactory(owner="other")
    link(parent, child, relation=RELATIONS[segment])
    collection = f"{mo_path(parent.pk)}/{segment}"

    for path in (collection, f"{collection}/{child.pk}"):
        response = call(api[who], "GET", path)
        if status == 200:
            assert response.status_code == 200
        else:
            assert_error(response, 403, "security/Forbidden")


@segments
@pytest.mark.parametrize(
    ("who", "status"),
    [
        ("admin", 204),
        ("owner", 204),  # owner of the parent, child foreign
        ("other", 204),  # owner of the child, parent foreign
        ("reader", 403),
        ("nobody", 403),
    ],
)
@pytest.mark.parametrize("form", ["single", "body"])
def test_delete_permissions(
    api: Clients,
    row_counts: Callable[[], dict[str, int]],
    segment: str,
    who: str,
    status: int,
    form: str,
) -> None:
    parent = ManagedObjectFactory(owner="owner")
    child = DeviceFactory(owner="other")
    link(parent, child, relation=RELATIONS[segment])
    api.prepare(who)
    before = row_counts()
    collection = f"{mo_path(parent.pk)}/{segment}"

    if form == "single":
        response = call(api[who], "DELETE", f"{collection}/{child.pk}")
    else:
        response = call(api[who], "DELETE", collection, {"references": [by_id(child.pk)]})

    if status == 204:
        assert response.status_code == 204
        assert response.content == b""
        assert children(parent, segment) == []
        assert ManagedObject.objects.filter(pk=child.pk).exists()
    else:
        assert_error(response, 403, "security/Forbidden")
        assert row_counts() == before


def test_delete_by_body_of_foreign_parent_without_own_children_is_403(
    api: Clients, row_counts: Callable[[], dict[str, int]]
) -> None:
    """Neither ADMIN, nor owner of the parent, nor owner of any listed child: no right at all,
    even when the listed edges do not exist."""
    parent = ManagedObjectFactory(owner="owner")
    stranger_child = DeviceFactory(owner="owner")
    api.prepare("nobody")
    before = row_counts()

    for listed in ([999_999_999], [stranger_child.pk, 999_999_999]):
        response = call(
            api["nobody"],
            "DELETE",
            f"{mo_path(parent.pk)}/childDevices",
            {"references": [by_id(pk) for pk in listed]},
        )
        assert_error(response, 403, "security/Forbidden")

    assert row_counts() == before


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "{parent}/childDevices"),
        ("PATCH", "{parent}/childAssets"),
        ("PUT", "{parent}/childAdditions/{child}"),
        ("POST", "{parent}/childDevices/{child}"),
        ("POST", "{child}/deviceParents"),
        ("DELETE", "{child}/assetParents"),
        ("PUT", "{child}/additionParents"),
    ],
)
def test_unsupported_methods_are_405(
    api: Clients, row_counts: Callable[[], dict[str, int]], method: str, path: str
) -> None:
    parent, child = AgentFactory(), DeviceFactory()
    for relation in Relation:
        link(parent, child, relation=relation)
    api.prepare("admin", "nobody")
    before = row_counts()
    url = "/inventory/managedObjects/" + path.format(parent=parent.pk, child=child.pk)

    for who in ("admin", "nobody"):
        assert_error(call(api[who], method, url, by_id(child.pk)), 405, "general/methodNotAllowed")
    assert row_counts() == before


# --- GET the children ------------------------------------------------------------------------------


@segments
def test_get_children_in_order_of_assignment_with_paging(api: Clients, segment: str) -> None:
    parent = GroupFactory()
    kids = [DeviceFactory(name=f"Kid {i}") for i in range(5)]
    order = [kids[3], kids[0], kids[4], kids[1], kids[2]]
    for kid in order:
        call(api["admin"], "POST", f"{mo_path(parent.pk)}/{segment}", by_id(kid.pk))
    collection = f"{mo_path(parent.pk)}/{segment}"

    response = call(api["reader"], "GET", collection, accept=REF_COLLECTION_TYPE)
    assert response["Content-Type"] == f"{REF_COLLECTION_TYPE};charset=UTF-8;ver=0.9"
    body = ok_json(response)
    assert ref_ids(body) == [kid.pk for kid in order]
    assert body["statistics"] == {"pageSize": 5, "currentPage": 1}
    assert body["self"].startswith(f"{BASE}{collection}?")
    first = body["references"][0]
    assert first["self"] == f"{mo_url(parent.pk)}/{segment}/{order[0].pk}"
    assert first["managedObject"]["name"] == order[0].name
    assert first["managedObject"]["c8y_IsDevice"] == {}
    assert set(CHILD_KEYS + PARENT_KEYS) <= set(first["managedObject"])

    page2 = ok_json(
        call(api["reader"], "GET", f"{collection}?pageSize=2&currentPage=2&withTotalPages=true")
    )
    assert ref_ids(page2) == [order[2].pk, order[3].pk]
    assert page2["statistics"] == {"pageSize": 2, "currentPage": 2, "totalPages": 3}
    assert "currentPage=1" in page2["prev"]
    assert "currentPage=3" in page2["next"]
    past = ok_json(call(api["reader"], "GET", f"{collection}?pageSize=2&currentPage=9"))
    assert past["references"] == []
    assert "next" in past


def test_get_children_of_a_leaf_is_an_empty_page(api: Clients) -> None:
    leaf = DeviceFactory()

    for segment in RELATIONS:
        body = ok_json(call(api["reader"], "GET", f"{mo_path(leaf.pk)}/{segment}/"))
        assert body["references"] == []


def test_get_children_with_query(api: Clients) -> None:
    parent = GroupFactory()
    alpha = DeviceFactory(name="alpha", type="c8y_Linux")
    beta = DeviceFactory(name="beta", type="c8y_Linux")
    gamma = ManagedObjectFactory(name="gamma", type="c8y_Linux")
    outsider = DeviceFactory(name="alpha", type="c8y_Linux")  # matches, but no child
    link(parent, gamma, beta, alpha, relation=Relation.ASSET)
    collection = f"{mo_path(parent.pk)}/childAssets"

    def queried(query: str) -> list[int]:
        return ref_ids(ok_json(api["reader"].get(collection, {"query": query, "pageSize": 100})))

    assert queried("name eq 'alpha'") == [alpha.pk]
    assert queried("has(c8y_IsDevice)") == [beta.pk, alpha.pk]
    assert queried("$filter=type eq 'c8y_Linux' $orderby=name desc") == [
        gamma.pk,
        beta.pk,
        alpha.pk,
    ]
    assert queried("$orderby=name") == [alpha.pk, beta.pk, gamma.pk]
    assert outsider.pk not in queried("name eq '*'")
    assert_error(call(api["reader"], "GET", f"{collection}?query=name eq"), 422)


def test_get_children_rendering_options(api: Clients) -> None:
    parent, child, grandchild = AgentFactory(), DeviceFactory(), DeviceFactory()
    link(parent, child)
    link(child, grandchild)
    collection = f"{mo_path(parent.pk)}/childDevices"

    plain = ok_json(call(api["reader"], "GET", collection))["references"][0]["managedObject"]
    assert ref_ids(plain["childDevices"]) == [grandchild.pk]
    without = ok_json(call(api["reader"], "GET", f"{collection}?withChildren=false"))
    assert "childDevices" not in without["references"][0]["managedObject"]
    counted = ok_json(call(api["reader"], "GET", f"{collection}?withChildrenCount=true"))
    assert counted["references"][0]["managedObject"]["childDevices"]["count"] == 1
    assert_error(call(api["reader"], "GET", f"{collection}?withChildren=maybe"), 422)


@segments
def test_get_single_reference(api: Clients, segment: str) -> None:
    parent, child = AgentFactory(), DeviceFactory(name="the child")
    link(parent, child, relation=RELATIONS[segment])
    path = f"{mo_path(parent.pk)}/{segment}/{child.pk}"

    response = call(api["reader"], "GET", path, accept=REF_TYPE)

    assert response["Content-Type"] == f"{REF_TYPE};charset=UTF-8;ver=0.9"
    body = ok_json(response)
    assert body["self"] == f"{BASE}{path}"
    assert body["managedObject"]["id"] == str(child.pk)
    assert body["managedObject"]["name"] == "the child"
    assert body["managedObject"]["self"] == mo_url(child.pk)
    assert ok_json(call(api["reader"], "GET", f"{path}/"))["self"] == f"{BASE}{path}"


@segments
def test_get_single_reference_404_when_not_a_child(api: Clients, segment: str) -> None:
    parent, child, stranger = AgentFactory(), DeviceFactory(), DeviceFactory()
    for relation in Relation:
        if relation != RELATIONS[segment]:
            link(parent, child, relation=relation)
    link(stranger, parent, relation=RELATIONS[segment])  # reversed edge does not count

    for target in (child.pk, stranger.pk, 999_999_999, "abc"):
        response = call(api["reader"], "GET", f"{mo_path(parent.pk)}/{segment}/{target}")
        assert_error(response, 404, "inventory/Not Found")


# --- DELETE -----------------------------------------------------------------------------------------


@segments
def test_delete_single_reference_then_404(api: Clients, segment: str) -> None:
    parent, child, sibling = AgentFactory(), DeviceFactory(), DeviceFactory()
    link(parent, child, sibling, relation=RELATIONS[segment])
    ManagedObject.objects.filter(pk=parent.pk).update(last_updated=OLD)
    path = f"{mo_path(parent.pk)}/{segment}/{child.pk}"

    first = call(api["admin"], "DELETE", path)
    second = call(api["admin"], "DELETE", path)

    assert first.status_code == 204
    assert first.content == b""
    assert_error(second, 404, "inventory/Not Found")
    assert children(parent, segment) == [sibling.pk]
    assert ManagedObject.objects.filter(pk=child.pk).exists()
    parent.refresh_from_db()
    assert parent.last_updated > OLD
    assert_error(call(api["admin"], "GET", path), 404)


def test_delete_single_reference_only_in_its_relation(api: Clients) -> None:
    parent, child = AgentFactory(), DeviceFactory()
    link(parent, child, relation=Relation.ASSET)

    response = call(api["admin"], "DELETE", f"{mo_path(parent.pk)}/childDevices/{child.pk}")

    assert_error(response, 404, "inventory/Not Found")
    assert children(parent, "childAssets") == [child.pk]


@segments
def test_delete_by_body_removes_listed_edges_and_skips_missing(api: Clients, segment: str) -> None:
    parent = GroupFactory()
    a, b, c, not_a_child = (DeviceFactory() for _ in range(4))
    link(parent, a, b, c, relation=RELATIONS[segment])
    other = next(r for r in Relation if r != RELATIONS[segment])
    link(parent, a, relation=other)

    response = call(
        api["admin"],
        "DELETE",
        f"{mo_path(parent.pk)}/{segment}",
        {
            "references": [
                by_id(a.pk),
                {"managedObject": {"id": c.pk}},
                {"managedObject": {"self": mo_url(not_a_child.pk)}},
                by_id(999_999_999),
            ]
        },
    )

    assert response.status_code == 204
    assert response.content == b""
    assert children(parent, segment) == [b.pk]
    assert children(parent, other.children_segment) == [a.pk]
    assert ManagedObject.objects.filter(pk__in=[a.pk, c.pk]).count() == 2


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({}, 422),  # no body at all
        ({"body": {}}, 422),
        ({"body": []}, 422),
        ({"body": {"references": []}}, 422),
        ({"body": {"references": "x"}}, 422),
        ({"body": {"references": [{"id": "1"}]}}, 422),
        ({"body": {"references": [{"managedObject": {"id": "x"}}]}}, 422),
        ({"body": {"managedObject": {"id": "1"}}}, 422),
        ({"raw": "{"}, 400),
        ({"raw": "{}", "content_type": "text/plain"}, 415),
    ],
    ids=str,
)
def test_delete_by_body_bad_bodies(
    api: Clients, row_counts: Callable[[], dict[str, int]], kwargs: dict[str, Any], status: int
) -> None:
    parent, child = GroupFactory(), DeviceFactory()
    link(parent, child, relation=Relation.ASSET)
    api.prepare("admin")
    before = row_counts()

    response = call(api["admin"], "DELETE", f"{mo_path(parent.pk)}/childAssets", **kwargs)

    assert_error(response, status)
    assert row_counts() == before


# --- parents ----------------------------------------------------------------------------------------


@segments
def test_parent_collections(api: Clients, segment: str) -> None:
    child = DeviceFactory()
    second, first, unrelated = AgentFactory(name="P2"), AgentFactory(name="P1"), AgentFactory()
    link(second, child, relation=RELATIONS[segment])
    link(first, child, relation=RELATIONS[segment])
    other = next(r for r in Relation if r != RELATIONS[segment])
    link(unrelated, child, relation=other)
    parents_key = PARENTS_SEGMENT[segment]
    path = f"{mo_path(child.pk)}/{parents_key}"

    response = call(api["reader"], "GET", path, accept=REF_COLLECTION_TYPE)

    assert response["Content-Type"] == f"{REF_COLLECTION_TYPE};charset=UTF-8;ver=0.9"
    body = ok_json(response)
    assert ref_ids(body) == [second.pk, first.pk]
    assert [item["self"] for item in body["references"]] == [
        f"{mo_url(child.pk)}/{parents_key}/{second.pk}",
        f"{mo_url(child.pk)}/{parents_key}/{first.pk}",
    ]
    assert body["references"][0]["managedObject"]["name"] == "P2"
    paged = ok_json(call(api["reader"], "GET", f"{path}/?pageSize=1&currentPage=2"))
    assert ref_ids(paged) == [first.pk]

    mo = ok_json(call(api["reader"], "GET", f"{mo_path(child.pk)}?withParents=true"))
    assert ref_ids(mo[parents_key]) == [second.pk, first.pk]
    assert ref_ids(mo[other.parents_segment]) == [unrelated.pk]
    assert mo[parents_key]["self"] == f"{mo_url(child.pk)}/{parents_key}"
    without = ok_json(call(api["reader"], "GET", mo_path(child.pk)))
    assert all(without[key]["references"] == [] for key in PARENT_KEYS)


@pytest.mark.parametrize(
    ("who", "status"),
    [("reader", 200), ("admin", 200), ("owner", 200), ("other", 403), ("nobody", 403)],
)
def test_parent_collection_permissions(api: Clients, who: str, status: int) -> None:
    parent = AgentFactory(owner="other")
    child = DeviceFactory(owner="owner")
    link(parent, child)

    response = call(api[who], "GET", f"{mo_path(child.pk)}/deviceParents")

    if status == 200:
        assert ref_ids(ok_json(response)) == [parent.pk]
    else:
        assert_error(response, 403, "security/Forbidden")
    assert_error(call(api[who], "GET", f"{mo_path(999_999_999)}/deviceParents"), 404)


def test_deleting_a_parent_removes_the_references(api: Clients) -> None:
    parent, child = AgentFactory(), DeviceFactory()
    link(parent, child)

    call(api["admin"], "DELETE", mo_path(parent.pk))

    assert (
        ok_json(call(api["admin"], "GET", f"{mo_path(child.pk)}/deviceParents"))["references"] == []
    )
