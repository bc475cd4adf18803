"""External IDs over HTTP (identity.md; auth.md §4, §7; README §2, §5, §6)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from rest_framework.test import APIClient

from deviceplatform.roles import Role
from inventory.models import ExternalId, ManagedObject
from tests.factories import (
    UNAUTHENTICATED,
    Clients,
    DeviceFactory,
    ExternalIdFactory,
    ManagedObjectFactory,
)
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db

BASE = "http://testserver"
VENDOR = "application/vnd.com.nsn.cumulocity."
EXTERNAL_ID_TYPE = f"{VENDOR}externalid+json"
COLLECTION_TYPE = f"{VENDOR}externalidcollection+json"
PLAIN_JSON = "application/json;charset=UTF-8"
INFO = "https://cumulocity.com/guides/reference/rest-implementation/#error_reporting"

USERS: dict[str, list[Role]] = {
    "admin": [Role.IDENTITY_ADMIN],
    "reader": [Role.IDENTITY_READ],
    "owner": [Role.INVENTORY_CREATE],  # no identity role: relies on the owner rule
    "other": [Role.INVENTORY_CREATE],
    "inventory_admin": [Role.INVENTORY_ADMIN],  # an inventory role gives no identity rights
    "nobody": [],
}


@pytest.fixture
def api(make_user: Callable[..., Any], client_for: Callable[..., APIClient]) -> Clients:
    return Clients(make_user, client_for, USERS, usernames={"admin": "id_admin"})


def ids_path(pk: object) -> str:
    return f"/identity/globalIds/{pk}/externalIds"


def ext_path(type_: str, value: str) -> str:
    return f"/identity/externalIds/{quote(type_, safe='')}/{quote(value, safe='')}"


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


def representation(type_: str, value: str, managed_object: ManagedObject) -> dict[str, Any]:
    return {
        "self": f"{BASE}{ext_path(type_, value)}",
        "externalId": value,
        "type": type_,
        "managedObject": {
            "id": str(managed_object.pk),
            "self": f"{BASE}/inventory/managedObjects/{managed_object.pk}",
        },
    }


def bindings() -> list[tuple[str, str, int]]:
    return list(ExternalId.objects.values_list("type", "external_id", "managed_object_id"))


# --- GET /identity ----------------------------------------------------------------------------------


def test_identity_api_templates(api: Clients) -> None:
    response = call(api["reader"], "GET", "/identity", accept=f"{VENDOR}identityapi+json")

    assert response["Content-Type"] == f"{VENDOR}identityapi+json;charset=UTF-8;ver=0.9"
    body = ok_json(response)
    assert body == {
        "self": f"{BASE}/identity",
        "externalId": f"{BASE}/identity/externalIds/{{type}}/{{externaId}}",
        "externalIdsOfGlobalId": f"{BASE}/identity/globalIds/{{globalId}}/externalIds",
    }
    assert "{externaId}" in body["externalId"]
    assert "{globalId}" in body["externalIdsOfGlobalId"]


@pytest.mark.parametrize(
    ("method", "who", "status"),
    [
        ("GET", "admin", 200),
        ("GET", "reader", 200),
        ("GET", "owner", 403),
        ("GET", "inventory_admin", 403),
        ("GET", "nobody", 403),
        *[(method, "admin", 405) for method in ("POST", "PUT", "DELETE")],
        *[("GET", who, 401) for who in UNAUTHENTICATED],
    ],
)
def test_identity_api_matrix(api: Clients, method: str, who: str, status: int) -> None:
    response = call(api[who], method, "/identity/", {} if method != "GET" else None)

    if status == 200:
        assert ok_json(response)["self"] == f"{BASE}/identity"
    else:
        assert_error(response, status)


# --- the checklist round trip ---------------------------------------------------------------------


def test_create_get_list_delete_round_trip(api: Clients) -> None:
    device = DeviceFactory()

    created = call(
        api["admin"],
        "POST",
        ids_path(device.pk),
        {"type": "c8y_Serial", "externalId": "raspi-1"},
        accept=EXTERNAL_ID_TYPE,
    )
    expected = representation("c8y_Serial", "raspi-1", device)
    assert ok_json(created, 201) == expected
    assert created["Content-Type"] == f"{EXTERNAL_ID_TYPE};charset=UTF-8;ver=0.9"
    assert created["Location"] == expected["self"]

    fetched = call(api["reader"], "GET", ext_path("c8y_Serial", "raspi-1"), accept=EXTERNAL_ID_TYPE)
    assert fetched["Content-Type"] == f"{EXTERNAL_ID_TYPE};charset=UTF-8;ver=0.9"
    assert ok_json(fetched) == expected

    listed = call(api["reader"], "GET", ids_path(device.pk), accept=COLLECTION_TYPE)
    assert listed["Content-Type"] == f"{COLLECTION_TYPE};charset=UTF-8;ver=0.9"
    body = ok_json(listed)
    assert body["externalIds"] == [expected]
    assert body["self"].startswith(f"{BASE}{ids_path(device.pk)}?")
    assert body["statistics"] == {"pageSize": 5, "currentPage": 1}
    assert "next" in body

    deleted = call(api["admin"], "DELETE", ext_path("c8y_Serial", "raspi-1"))
    assert deleted.status_code == 204
    assert deleted.content == b""

    gone = call(api["reader"], "GET", ext_path("c8y_Serial", "raspi-1"))
    assert gone.status_code == 404
    assert gone["Content-Type"] == f"{VENDOR}error+json;charset=UTF-8;ver=0.9"
    assert gone.json() == {
        "error": "identity/Not Found",
        "message": "External id not found; external id = ID [type=c8y_Serial, value=raspi-1]",
        "info": INFO,
        "requestId": gone["X-Request-ID"],
    }
    assert_error(call(api["admin"], "DELETE", ext_path("c8y_Serial", "raspi-1")), 404)
    assert ManagedObject.objects.filter(pk=device.pk).exists()
    assert ok_json(call(api["reader"], "GET", ids_path(device.pk)))["externalIds"] == []


def test_create_without_accept_is_201_with_location_and_empty_body(api: Clients) -> None:
    device = DeviceFactory()

    response = call(
        api["admin"], "POST", ids_path(device.pk), {"type": "c8y_Serial", "externalId": "a b/c"}
    )

    assert response.status_code == 201
    assert response.content == b""
    assert response["Content-Length"] == "0"
    assert response["Location"] == f"{BASE}/identity/externalIds/c8y_Serial/a%20b%2Fc"
    assert bindings() == [("c8y_Serial", "a b/c", device.pk)]


@pytest.mark.parametrize("accept", [None, "application/json"])
def test_recreate_on_the_same_object_is_idempotent(api: Clients, accept: str | None) -> None:
    device = DeviceFactory()
    existing = ExternalIdFactory(managed_object=device, type="c8y_Serial", external_id="raspi-1")

    response = call(
        api["admin"],
        "POST",
        ids_path(device.pk),
        {"type": "c8y_Serial", "externalId": "raspi-1"},
        accept=accept,
    )

    assert response.status_code == 201
    assert response["Location"] == f"{BASE}{ext_path('c8y_Serial', 'raspi-1')}"
    if accept:
        assert response.json() == representation("c8y_Serial", "raspi-1", device)
    assert list(ExternalId.objects.values_list("pk", flat=True)) == [existing.pk]


def test_bound_elsewhere_is_409_and_writes_nothing(
    api: Clients, row_counts: Callable[[], dict[str, int]]
) -> None:
    first, second = DeviceFactory(), DeviceFactory()
    ExternalIdFactory(managed_object=first, type="c8y_Serial", external_id="raspi-1")
    api.prepare("admin")
    before = row_counts()

    response = call(
        api["admin"],
        "POST",
        ids_path(second.pk),
        {"type": "c8y_Serial", "externalId": "raspi-1"},
        accept="application/json",
    )

    assert_error(response, 409, "identity/Conflict")
    assert "Location" not in response
    assert row_counts() == before
    assert bindings() == [("c8y_Serial", "raspi-1", first.pk)]


def test_pairs_are_case_sensitive_and_an_object_may_have_many(api: Clients) -> None:
    first, second = DeviceFactory(), DeviceFactory()
    pairs = [
        (first, "c8y_Serial", "abc"),
        (second, "c8y_Serial", "ABC"),
        (second, "C8Y_SERIAL", "abc"),
        (first, "c8y_Serial", "def"),
        (first, "c8y_MAC", "abc-mac"),
    ]

    for mo, type_, value in pairs:
        response = call(api["admin"], "POST", ids_path(mo.pk), {"type": type_, "externalId": value})
        assert response.status_code == 201, (type_, value, response.content)

    body = ok_json(call(api["reader"], "GET", f"{ids_path(first.pk)}?pageSize=10"))
    assert [(item["type"], item["externalId"]) for item in body["externalIds"]] == [
        ("c8y_Serial", "abc"),
        ("c8y_Serial", "def"),
        ("c8y_MAC", "abc-mac"),
    ]
    assert_error(call(api["reader"], "GET", ext_path("c8y_serial", "abc")), 404)


@pytest.mark.parametrize(
    ("body", "missing"),
    [
        ({"externalId": "x"}, "type"),
        ({"type": "c8y_Serial"}, "externalId"),
        ({}, "externalId,type"),
        ({"type": "", "externalId": "x"}, "type"),
        ({"type": "c8y_Serial", "externalId": ""}, "externalId"),
        ({"type": "", "externalId": ""}, "externalId,type"),
        ({"type": None, "externalId": "x"}, "type"),
        ({"type": 5, "externalId": "x"}, "type"),
        ({"type": "c8y_Serial", "externalId": 12345}, "externalId"),
        ({"type": ["c8y_Serial"], "externalId": {"v": 1}}, "externalId,type"),
        ({"type": True, "externalId": "x"}, "type"),
    ],
    ids=json.dumps,
)
def test_create_missing_or_invalid_fields_is_422(
    api: Clients, row_counts: Callable[[], dict[str, int]], body: dict[str, Any], missing: str
) -> None:
    device = DeviceFactory()
    api.prepare("admin")
    before = row_counts()

    response = call(api["admin"], "POST", ids_path(device.pk), body, accept="application/json")

    error = assert_error(response, 422)
    assert error["message"] == f"Following mandatory fields should be included: {missing}"
    assert row_counts() == before


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"raw": "{"}, 400),
        ({"raw": '{"type": "c8y_Serial", "externalId": "x"}', "content_type": "text/plain"}, 415),
        ({"raw": "<x/>", "content_type": "application/xml"}, 415),
        ({"body": []}, 422),
        ({"body": "c8y_Serial"}, 422),
        ({"body": {"type": "a/b", "externalId": "x"}}, 422),  # a type cannot contain '/'
    ],
    ids=str,
)
def test_create_bad_bodies(
    api: Clients, row_counts: Callable[[], dict[str, int]], kwargs: dict[str, Any], status: int
) -> None:
    device = DeviceFactory()
    api.prepare("admin")
    before = row_counts()

    response = call(api["admin"], "POST", ids_path(device.pk), **kwargs)

    assert_error(response, status)
    assert row_counts() == before


@pytest.mark.parametrize(
    "content_type",
    [f"{VENDOR}externalId+json;charset=UTF-8;ver=0.9", "application/json; charset=utf-8"],
)
def test_create_accepts_json_content_types(api: Clients, content_type: str) -> None:
    device = DeviceFactory()

    response = call(
        api["admin"],
        "POST",
        ids_path(device.pk),
        {"type": "c8y_Serial", "externalId": "x"},
        content_type=content_type,
    )

    assert response.status_code == 201


def test_body_managed_object_and_self_are_ignored(api: Clients) -> None:
    target, decoy = DeviceFactory(), DeviceFactory()

    response = call(
        api["admin"],
        "POST",
        ids_path(target.pk),
        {
            "type": "c8y_Serial",
            "externalId": "raspi-1",
            "managedObject": {"id": str(decoy.pk), "self": f"{BASE}/inventory/managedObjects/x"},
            "self": f"{BASE}/identity/externalIds/other/thing",
        },
        accept="*/*",
    )

    assert ok_json(response, 201) == representation("c8y_Serial", "raspi-1", target)
    assert bindings() == [("c8y_Serial", "raspi-1", target.pk)]


@pytest.mark.parametrize("pk", ["999999999", "abc", "-3"])
@pytest.mark.parametrize("who", ["admin", "reader", "owner", "nobody"])
def test_unknown_global_id_is_404(
    api: Clients, row_counts: Callable[[], dict[str, int]], pk: str, who: str
) -> None:
    DeviceFactory(owner="owner")
    api.prepare(who)
    before = row_counts()

    listed = call(api[who], "GET", ids_path(pk))
    created = call(api[who], "POST", ids_path(pk), {"type": "c8y_Serial", "externalId": "x"})

    assert_error(listed, 404, "inventory/Not Found")
    assert_error(created, 404, "inventory/Not Found")
    assert row_counts() == before


def test_unknown_external_id_is_404_before_403(api: Clients) -> None:
    for who in ("nobody", "reader", "admin"):
        response = call(api[who], "GET", ext_path("c8y_Serial", "nope"))
        body = assert_error(response, 404, "identity/Not Found")
        assert body["message"] == (
            "External id not found; external id = ID [type=c8y_Serial, value=nope]"
        )
        assert_error(call(api[who], "DELETE", ext_path("c8y_Serial", "nope")), 404)


# --- path encoding (identity.md §7) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "with space",
        "a/b",
        "/leading/inner",
        "a//b",
        "mac:00:11:22",
        "user@host",
        "plus+sign",
        "ünïcödé-Σ-設備",
        "percent%20literal",
        "semi;colon,comma=eq&amp",
        "'quote\"",
    ],
)
def test_special_characters_round_trip(api: Clients, value: str) -> None:
    device = DeviceFactory()

    created = call(
        api["admin"],
        "POST",
        ids_path(device.pk),
        {"type": "c8y_Serial", "externalId": value},
        accept="*/*",
    )

    body = ok_json(created, 201)
    path = ext_path("c8y_Serial", value)
    assert body["externalId"] == value
    assert body["self"] == created["Location"] == f"{BASE}{path}"
    assert ok_json(call(api["reader"], "GET", path)) == body
    assert ok_json(call(api["reader"], "GET", urlsplit(body["self"]).path)) == body
    listed = ok_json(call(api["reader"], "GET", ids_path(device.pk)))
    assert listed["externalIds"] == [body]
    assert call(api["admin"], "DELETE", path).status_code == 204
    assert not ExternalId.objects.exists()


def test_unencoded_characters_in_the_path(api: Clients) -> None:
    """c8y-api does not percent-encode: `:` `@` and a literal `+` arrive as they are."""
    device = DeviceFactory()
    ExternalIdFactory(managed_object=device, type="c8y_Serial", external_id="mac:00@x+y")

    body = ok_json(call(api["reader"], "GET", "/identity/externalIds/c8y_Serial/mac:00@x+y"))

    assert body["externalId"] == "mac:00@x+y"
    assert body["self"] == f"{BASE}/identity/externalIds/c8y_Serial/mac%3A00%40x%2By"


def test_trailing_slash_is_not_part_of_the_external_id(api: Clients) -> None:
    device = DeviceFactory()
    ExternalIdFactory(managed_object=device, type="c8y_Serial", external_id="raspi-1")

    body = ok_json(call(api["reader"], "GET", "/identity/externalIds/c8y_Serial/raspi-1/"))

    assert body["externalId"] == "raspi-1"
    assert (
        call(api["admin"], "DELETE", "/identity/externalIds/c8y_Serial/raspi-1/").status_code == 204
    )


def test_type_with_special_characters(api: Clients) -> None:
    device = DeviceFactory()

    created = call(
        api["admin"],
        "POST",
        ids_path(device.pk),
        {"type": "my type:ü", "externalId": "v"},
        accept="*/*",
    )

    body = ok_json(created, 201)
    assert body["self"] == f"{BASE}/identity/externalIds/my%20type%3A%C3%BC/v"
    assert ok_json(call(api["reader"], "GET", urlsplit(body["self"]).path)) == body


# --- paging ---------------------------------------------------------------------------------------


def test_list_in_creation_order_with_paging(api: Clients) -> None:
    device = DeviceFactory()
    values = ["z", "a", "m", "b", "y", "c", "x"]
    for value in values:
        ExternalIdFactory(managed_object=device, type="c8y_Serial", external_id=value)
    ExternalIdFactory(managed_object=DeviceFactory(), type="c8y_Serial", external_id="foreign")

    def page(query: str) -> dict[str, Any]:
        return ok_json(call(api["reader"], "GET", f"{ids_path(device.pk)}?{query}"))

    first = page("")
    assert [item["externalId"] for item in first["externalIds"]] == values[:5]
    assert "prev" not in first
    third = page("pageSize=3&currentPage=3&withTotalPages=true&withTotalElements=true")
    assert [item["externalId"] for item in third["externalIds"]] == values[6:]
    assert third["statistics"] == {
        "pageSize": 3,
        "currentPage": 3,
        "totalPages": 3,
        "totalElements": 7,
    }
    assert "currentPage=2" in third["prev"]
    assert "currentPage=4" in third["next"]
    past = page("pageSize=3&currentPage=4")
    assert past["externalIds"] == []
    assert "next" in past
    assert_error(call(api["reader"], "GET", f"{ids_path(device.pk)}?pageSize=0"), 422)
    assert_error(call(api["reader"], "GET", f"{ids_path(device.pk)}?currentPage=x"), 422)


def test_deleting_the_managed_object_removes_its_external_ids(api: Clients) -> None:
    device, other = DeviceFactory(), DeviceFactory()
    for value in ("one", "two"):
        call(api["admin"], "POST", ids_path(device.pk), {"type": "c8y_Serial", "externalId": value})
    ExternalIdFactory(managed_object=other, type="c8y_Serial", external_id="kept")

    assert (
        call(api["inventory_admin"], "DELETE", f"/inventory/managedObjects/{device.pk}").status_code
        == 204
    )

    for value in ("one", "two"):
        assert_error(
            call(api["reader"], "GET", ext_path("c8y_Serial", value)), 404, "identity/Not Found"
        )
    assert_error(call(api["reader"], "GET", ids_path(device.pk)), 404)
    assert bindings() == [("c8y_Serial", "kept", other.pk)]


# --- permissions: roles and the owner rule (auth.md §4, §7) ---------------------------------------


@pytest.mark.parametrize(
    ("who", "read", "write"),
    [
        ("admin", True, True),
        ("reader", True, False),
        ("owner", True, True),  # owner of the managed object, no identity role
        ("other", False, False),
        ("inventory_admin", False, False),
        ("nobody", False, False),
    ],
)
def test_permission_matrix(
    api: Clients, row_counts: Callable[[], dict[str, int]], who: str, read: bool, write: bool
) -> None:
    device = DeviceFactory(owner="owner")
    ExternalIdFactory(managed_object=device, type="c8y_Serial", external_id="existing")
    client = api[who]

    before = row_counts()
    created = call(client, "POST", ids_path(device.pk), {"type": "c8y_Serial", "externalId": "new"})
    if write:
        assert created.status_code == 201
    else:
        assert_error(created, 403, "security/Forbidden")
        assert row_counts() == before

    listed = call(client, "GET", ids_path(device.pk))
    fetched = call(client, "GET", ext_path("c8y_Serial", "existing"))
    if read:
        assert "existing" in [item["externalId"] for item in ok_json(listed)["externalIds"]]
        assert ok_json(fetched)["externalId"] == "existing"
    else:
        assert_error(listed, 403, "security/Forbidden")
        assert_error(fetched, 403, "security/Forbidden")

    before = row_counts()
    deleted = call(client, "DELETE", ext_path("c8y_Serial", "existing"))
    if write:
        assert deleted.status_code == 204
        assert not ExternalId.objects.filter(external_id="existing").exists()
    else:
        assert_error(deleted, 403, "security/Forbidden")
        assert row_counts() == before


def test_owner_rule_follows_the_bound_object(api: Clients) -> None:
    """The owner of one object cannot read or delete another user's external IDs."""
    mine = DeviceFactory(owner="owner")
    theirs = DeviceFactory(owner="other")
    ExternalIdFactory(managed_object=mine, type="t", external_id="mine")
    ExternalIdFactory(managed_object=theirs, type="t", external_id="theirs")

    assert ok_json(call(api["owner"], "GET", ext_path("t", "mine")))["externalId"] == "mine"
    assert_error(call(api["owner"], "GET", ext_path("t", "theirs")), 403)
    assert_error(call(api["owner"], "DELETE", ext_path("t", "theirs")), 403)
    assert_error(
        call(api["owner"], "POST", ids_path(theirs.pk), {"type": "t", "externalId": "x"}), 403
    )
    assert bindings() == [("t", "mine", mine.pk), ("t", "theirs", theirs.pk)]


def test_forbidden_is_decided_before_the_body_is_validated(
    api: Clients, row_counts: Callable[[], dict[str, int]]
) -> None:
    device = DeviceFactory(owner="owner")
    api.prepare("other")
    before = row_counts()

    for kwargs in ({"raw": "{"}, {"body": {}}, {"raw": "x", "content_type": "text/plain"}):
        assert_error(call(api["other"], "POST", ids_path(device.pk), **kwargs), 403)

    assert row_counts() == before


def test_creator_registers_its_device(api: Clients) -> None:
    """auth.md §8: a ROLE_INVENTORY_CREATE-only user creates a device and an external ID for it."""
    device = ok_json(
        call(
            api["owner"],
            "POST",
            "/inventory/managedObjects",
            {"name": "mine", "c8y_IsDevice": {}},
            accept="*/*",
        ),
        201,
    )

    response = call(
        api["owner"], "POST", ids_path(device["id"]), {"type": "c8y_Serial", "externalId": "s-1"}
    )

    assert response.status_code == 201
    assert bindings() == [("c8y_Serial", "s-1", int(device["id"]))]


@pytest.mark.parametrize("who", UNAUTHENTICATED)
def test_unauthenticated_is_401(
    api: Clients, row_counts: Callable[[], dict[str, int]], who: str
) -> None:
    device = DeviceFactory()
    ExternalIdFactory(managed_object=device, type="c8y_Serial", external_id="x")
    api.prepare(who)
    before = row_counts()

    for method, path in (
        ("GET", ids_path(device.pk)),
        ("POST", ids_path(device.pk)),
        ("GET", ext_path("c8y_Serial", "x")),
        ("DELETE", ext_path("c8y_Serial", "x")),
        ("GET", ids_path(999_999_999)),
        ("GET", ext_path("c8y_Serial", "missing")),
    ):
        response = call(api[who], method, path, {"type": "c8y_Serial", "externalId": "y"})
        assert_error(response, 401, "security/Unauthorized")

    assert row_counts() == before


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/identity/globalIds/{pk}/externalIds"),
        ("DELETE", "/identity/globalIds/{pk}/externalIds"),
        ("PUT", "/identity/externalIds/c8y_Serial/x"),
        ("POST", "/identity/externalIds/c8y_Serial/x"),
        ("PATCH", "/identity/externalIds/c8y_Serial/x"),
    ],
)
def test_unsupported_methods_are_405(
    api: Clients, row_counts: Callable[[], dict[str, int]], method: str, path: str
) -> None:
    device = DeviceFactory()
    ExternalIdFactory(managed_object=device, type="c8y_Serial", external_id="x")
    api.prepare("admin", "nobody")
    before = row_counts()

    for who in ("admin", "nobody"):
        response = call(
            api[who], method, path.format(pk=device.pk), {"type": "c8y_Serial", "externalId": "y"}
        )
        assert_error(response, 405, "general/methodNotAllowed")

    assert row_counts() == before


def test_external_ids_do_not_change_the_managed_object(api: Clients) -> None:
    device = ManagedObjectFactory(owner="owner", name="Dev")
    before = ManagedObject.objects.values().get(pk=device.pk)

    call(api["owner"], "POST", ids_path(device.pk), {"type": "t", "externalId": "v"})
    call(api["owner"], "DELETE", ext_path("t", "v"))

    assert ManagedObject.objects.values().get(pk=device.pk) == before
