"""`/inventory` and `/inventory/managedObjects[/{id}]` over HTTP (inventory.md §1-§6, §9; auth.md §4,
§6, §7; README §2, §5, §6), with real Basic credentials."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from rest_framework.test import APIClient

from deviceplatform.roles import Role
from inventory.models import ExternalId, ManagedObject, ManagedObjectReference, Relation
from tests.factories import (
    UNAUTHENTICATED,
    AgentFactory,
    Clients,
    DeviceFactory,
    ExternalIdFactory,
    GroupFactory,
    ManagedObjectFactory,
    link,
)
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db

BASE = "http://testserver"
COLLECTION = "/inventory/managedObjects"
VENDOR = "application/vnd.com.nsn.cumulocity."
MO_TYPE = f"{VENDOR}managedobject+json"
MO_COLLECTION_TYPE = f"{VENDOR}managedobjectcollection+json"
PLAIN_JSON = "application/json;charset=UTF-8"
CHILD_KEYS = ("childDevices", "childAssets", "childAdditions")
PARENT_KEYS = ("deviceParents", "assetParents", "additionParents")
OLD = datetime(2020, 1, 1, tzinfo=UTC)


def mo_path(pk: object) -> str:
    return f"{COLLECTION}/{pk}"


def call(
    client: APIClient,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: str | bytes | None = None,
    accept: str | None = None,
    content_type: str | None = "application/json",
    **extra: Any,
) -> Any:
    """One request; `body` is JSON-encoded, `raw` is sent as is; no Accept header unless given."""
    data = raw if raw is not None else ("" if body is None else json.dumps(body))
    if accept is not None:
        extra["HTTP_ACCEPT"] = accept
    return client.generic(method, path, data, content_type=content_type, **extra)


def get(client: APIClient, path: str, **params: Any) -> Any:
    """GET with query parameters URL-encoded by the client (a `+` arrives as `+`)."""
    return client.get(path, params)


def ok_json(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, (response.status_code, response.content[:500])
    return response.json()


def listed_ids(response: Any) -> list[int]:
    body = ok_json(response)
    return [int(mo["id"]) for mo in body["managedObjects"]]


def pks(*objects: ManagedObject) -> list[int]:
    return [mo.pk for mo in objects]


USERS: dict[str, list[Role]] = {
    "admin": [Role.INVENTORY_ADMIN],
    "reader": [Role.INVENTORY_READ],
    "owner": [Role.INVENTORY_CREATE],
    "other": [Role.INVENTORY_CREATE],
    "nobody": [],
}


@pytest.fixture
def api(make_user: Callable[..., Any], client_for: Callable[..., APIClient]) -> Clients:
    return Clients(make_user, client_for, USERS, usernames={"admin": "inv_admin"})


# --- GET /inventory -------------------------------------------------------------------------------


def test_inventory_api_resource(api: Clients) -> None:
    response = call(api["reader"], "GET", "/inventory", accept=f"{VENDOR}inventoryapi+json")

    assert response["Content-Type"] == f"{VENDOR}inventoryapi+json;charset=UTF-8;ver=0.9"
    assert ok_json(response) == {
        "self": f"{BASE}/inventory",
        "managedObjects": {"self": f"{BASE}/inventory/managedObjects", "references": []},
        "managedObjectsForType": f"{BASE}/inventory/managedObjects?type={{type}}",
        "managedObjectsForFragmentType": (
            f"{BASE}/inventory/managedObjects?fragmentType={{fragmentType}}"
        ),
        "managedObjectsForListOfIds": f"{BASE}/inventory/managedObjects?ids={{ids}}",
    }


@pytest.mark.parametrize(
    ("method", "who", "status"),
    [
        ("GET", "admin", 200),
        ("GET", "reader", 200),
        ("GET", "owner", 403),
        ("GET", "nobody", 403),
        *[(method, "admin", 405) for method in ("POST", "PUT", "DELETE", "PATCH")],
        ("POST", "nobody", 405),
        *[(method, who, 401) for method in ("GET", "POST") for who in UNAUTHENTICATED],
    ],
)
def test_inventory_api_matrix(
    api: Clients,
    row_counts: Callable[[], dict[str, int]],
    method: str,
    who: str,
    status: int,
) -> None:
    api.prepare(who)
    before = row_counts()

    response = call(api[who], method, "/inventory", {} if method != "GET" else None)

    if status == 200:
        assert ok_json(response)["self"] == f"{BASE}/inventory"
    else:
        assert_error(response, status, ERROR_NAMES[status])
        assert row_counts() == before


ERROR_NAMES = {
    400: "general/badRequest",
    401: "security/Unauthorized",
    403: "security/Forbidden",
    404: "inventory/Not Found",
    405: "general/methodNotAllowed",
    415: "general/unsupportedMediaType",
    422: None,  # undefined/validationError or <area>/Invalid Data
}


# --- POST /inventory/managedObjects ---------------------------------------------------------------


def test_post_without_accept_is_201_with_location_and_empty_body(
    api: Clients,
) -> None:
    response = call(api["owner"], "POST", COLLECTION, {"name": "Dev", "c8y_IsDevice": {}})

    assert response.status_code == 201
    assert response.content == b""
    assert response["Content-Length"] == "0"
    created = ManagedObject.objects.get()
    assert response["Location"] == f"{BASE}{mo_path(created.pk)}"
    assert (created.name, created.owner, created.is_device) == ("Dev", "owner", True)


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        ("application/json", PLAIN_JSON),
        ("*/*", PLAIN_JSON),
        (MO_TYPE, f"{MO_TYPE};charset=UTF-8;ver=0.9"),
        (
            f"{VENDOR}error+json, {VENDOR}ManagedObject+json;ver=0.9",
            f"{MO_TYPE};charset=UTF-8;ver=0.9",
        ),
        ("text/html", PLAIN_JSON),
    ],
)
def test_post_with_accept_returns_the_representation(
    api: Clients, accept: str, content_type: str
) -> None:
    response = call(api["owner"], "POST", COLLECTION, {"name": "Dev"}, accept=accept)

    body = ok_json(response, 201)
    assert response["Content-Type"] == content_type
    assert response["Location"] == body["self"] == f"{BASE}{mo_path(body['id'])}"
    assert int(response["Content-Length"]) == len(response.content)
    assert body["name"] == "Dev"


def test_post_empty_object_creates_a_bare_object(api: Clients) -> None:
    response = call(api["owner"], "POST", COLLECTION, {}, accept="application/json")

    body = ok_json(response, 201)
    pk = body["id"]
    assert isinstance(pk, str)
    assert pk.isdigit()
    url = f"{BASE}{mo_path(pk)}"
    created = ManagedObject.objects.get(pk=int(pk))
    assert body == {
        "id": pk,
        "self": url,
        "owner": "owner",
        "creationTime": body["creationTime"],
        "lastUpdated": body["lastUpdated"],
        **{key: {"self": f"{url}/{key}", "references": []} for key in CHILD_KEYS + PARENT_KEYS},
    }
    assert body["creationTime"] == body["lastUpdated"]
    assert datetime.fromisoformat(body["creationTime"]) == created.creation_time.replace(
        microsecond=created.creation_time.microsecond // 1000 * 1000
    )
    assert body["creationTime"].endswith("Z")
    assert len(body["creationTime"]) == len("2024-05-14T10:18:33.477Z")


def test_post_ids_increase(api: Clients) -> None:
    first = ok_json(call(api["owner"], "POST", COLLECTION, {}, accept="*/*"), 201)
    second = ok_json(call(api["owner"], "POST", COLLECTION, {}, accept="*/*"), 201)

    assert int(second["id"]) > int(first["id"])


FRAGMENTS_OF_EVERY_TYPE = {
    "c8y_Object": {"a": {"b": [1, {"c": None}]}, "e": "f"},
    "c8y_EmptyObject": {},
    "c8y_Array": [1, "two", 3.5, False, None, {"x": []}],
    "c8y_EmptyArray": [],
    "c8y_String": "text with ünïcödé",
    "c8y_EmptyString": "",
    "c8y_Int": 42,
    "c8y_Negative": -7,
    "c8y_Big": 9007199254740993,
    "c8y_Float": 12.5,
    "c8y_True": True,
    "c8y_False": False,
    "c8y_SupportedOperations": ["c8y_Restart", "c8y_Command"],
    "childLike_fragment": {"allowed": True},
}


def test_post_fragments_of_every_json_type_round_trip(api: Clients) -> None:
    response = call(
        api["owner"],
        "POST",
        COLLECTION,
        {"name": "Dev", "type": "c8y_Linux", **FRAGMENTS_OF_EVERY_TYPE},
        accept="*/*",
    )

    created = ok_json(response, 201)
    fetched = ok_json(call(api["owner"], "GET", mo_path(created["id"])))
    for body in (created, fetched):
        assert body["name"] == "Dev"
        assert body["type"] == "c8y_Linux"
        for key, value in FRAGMENTS_OF_EVERY_TYPE.items():
            assert body[key] == value, key
            assert type(body[key]) is type(value), key


def test_post_nulls_are_not_stored(api: Clients) -> None:
    body = ok_json(
        call(
            api["owner"],
            "POST",
            COLLECTION,
            {"name": None, "type": None, "c8y_Gone": None, "c8y_Kept": {"inner": None}},
            accept="*/*",
        ),
        201,
    )

    assert "name" not in body
    assert "type" not in body
    assert "c8y_Gone" not in body
    assert body["c8y_Kept"] == {"inner": None}
    assert ManagedObject.objects.get().fragments == {"c8y_Kept": {"inner": None}}


def test_post_read_only_keys_are_ignored(api: Clients) -> None:
    other = ManagedObjectFactory()
    reference = {"references": [{"managedObject": {"id": str(other.pk)}}]}

    body = ok_json(
        call(
            api["owner"],
            "POST",
            COLLECTION,
            {
                "id": "1",
                "self": "https://evil/inventory/managedObjects/1",
                "creationTime": "2000-01-01T00:00:00.000Z",
                "lastUpdated": "2000-01-01T00:00:00.000Z",
                **{key: reference for key in CHILD_KEYS + PARENT_KEYS},
            },
            accept="*/*",
        ),
        201,
    )

    assert body["id"] != "1"
    assert body["self"] == f"{BASE}{mo_path(body['id'])}"
    assert not body["creationTime"].startswith("2000")
    assert not body["lastUpdated"].startswith("2000")
    for key in CHILD_KEYS + PARENT_KEYS:
        assert body[key]["references"] == []
    assert not ManagedObjectReference.objects.exists()
    assert ManagedObject.objects.get(pk=int(body["id"])).fragments == {}


@pytest.mark.parametrize(
    ("who", "owner"),
    [("owner", "owner"), ("admin", "somebody-else")],
    ids=["ignored-for-creator", "honoured-for-admin"],
)
def test_post_owner(api: Clients, who: str, owner: str) -> None:
    body = ok_json(
        call(api[who], "POST", COLLECTION, {"owner": "somebody-else"}, accept="*/*"), 201
    )

    assert body["owner"] == owner
    assert ManagedObject.objects.get().owner == owner


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/JSON; charset=utf-8",
        f"{VENDOR}managedObject+json;charset=UTF-8;ver=0.9",
        f"{VENDOR}MANAGEDOBJECT+JSON; ver=0.9; charset=UTF-8",
        f"{VENDOR}operation+json",
        "",
    ],
)
def test_post_accepts_json_content_types(api: Clients, content_type: str) -> None:
    response = call(api["owner"], "POST", COLLECTION, {"name": "x"}, content_type=content_type)

    assert response.status_code == 201, response.content
    assert ManagedObject.objects.get().name == "x"


def test_post_with_trailing_slash(api: Clients) -> None:
    response = call(api["owner"], "POST", f"{COLLECTION}/", {"name": "x"}, accept="*/*")

    assert ok_json(response, 201)["name"] == "x"


# Bodies refused with 400/415/422 on POST and PUT, each leaving the database unchanged.
BAD_BODIES = [
    pytest.param({"raw": '{"name": '}, 400, id="malformed-json"),
    pytest.param({"raw": "{'name': 'x'}"}, 400, id="single-quotes"),
    pytest.param({"raw": ""}, 422, id="missing-body"),
    pytest.param({"raw": '{"name": "x"}', "content_type": "text/plain"}, 415, id="text/plain"),
    pytest.param({"raw": "<mo/>", "content_type": "application/xml"}, 415, id="xml"),
    pytest.param(
        {"raw": "name=x", "content_type": "application/x-www-form-urlencoded"}, 415, id="form"
    ),
    pytest.param({"body": []}, 422, id="array"),
    pytest.param({"body": "x"}, 422, id="string"),
    pytest.param({"body": 5}, 422, id="number"),
    pytest.param({"raw": "null"}, 422, id="null"),
    pytest.param({"body": {"name": 5}}, 422, id="name-number"),
    pytest.param({"body": {"name": {"a": 1}}}, 422, id="name-object"),
    pytest.param({"body": {"type": []}}, 422, id="type-array"),
    pytest.param({"body": {"type": True}}, 422, id="type-bool"),
    pytest.param({"body": {"c8y.Dotted": {}}}, 422, id="fragment-dot"),
    pytest.param({"body": {"$where": {}}}, 422, id="fragment-dollar"),
    pytest.param({"body": {"c8y_Ok": {}, "bad name": 1}}, 422, id="fragment-space"),
]


def send_bad(client: APIClient, method: str, path: str, spec: dict[str, Any]) -> Any:
    return call(
        client,
        method,
        path,
        spec.get("body"),
        raw=spec.get("raw"),
        content_type=spec.get("content_type", "application/json"),
        accept="application/json",
    )


@pytest.mark.parametrize(("spec", "status"), BAD_BODIES)
def test_post_bad_bodies(
    api: Clients,
    row_counts: Callable[[], dict[str, int]],
    spec: dict[str, Any],
    status: int,
) -> None:
    api.prepare("admin")
    before = row_counts()

    response = send_bad(api["admin"], "POST", COLLECTION, spec)

    assert_error(response, status, ERROR_NAMES[status])
    assert "Location" not in response
    assert row_counts() == before


@pytest.mark.parametrize(
    ("who", "status"),
    [
        ("admin", 201),
        ("owner", 201),
        ("other", 201),
        ("reader", 403),
        ("nobody", 403),
        *[(who, 401) for who in UNAUTHENTICATED],
    ],
)
def test_post_matrix(
    api: Clients,
    row_counts: Callable[[], dict[str, int]],
    who: str,
    status: int,
) -> None:
    api.prepare(who)
    before = row_counts()

    response = call(api[who], "POST", COLLECTION, {"name": "x"})

    if status == 201:
        assert response.status_code == 201
        assert ManagedObject.objects.get().name == "x"
    else:
        body = assert_error(response, status, ERROR_NAMES[status])
        if status == 403:
            assert body["message"] == "Access is denied"
        if status == 401:
            assert response["WWW-Authenticate"].startswith("Basic")
        assert row_counts() == before


def test_forbidden_is_decided_before_the_body_is_validated(
    api: Clients, row_counts: Callable[[], dict[str, int]]
) -> None:
    api.prepare("reader")
    before = row_counts()

    for spec in ({"raw": "{"}, {"body": {"name": 5}}, {"body": []}):
        assert_error(send_bad(api["reader"], "POST", COLLECTION, spec), 403)

    assert row_counts() == before


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_collection_unsupported_methods(
    api: Clients, row_counts: Callable[[], dict[str, int]], method: str
) -> None:
    ManagedObjectFactory()
    api.prepare("anon", "admin", "nobody")
    before = row_counts()

    for who in ("admin", "nobody"):
        response = call(api[who], method, COLLECTION, {"name": "x"})
        assert_error(response, 405, "general/methodNotAllowed")

    assert_error(call(api["anon"], method, COLLECTION, {}), 401)
    assert row_counts() == before


# --- GET /inventory/managedObjects: paging, visibility, filters -----------------------------------


def test_list_paging_checklist(api: Clients) -> None:
    devices = [DeviceFactory() if i % 2 == 0 else ManagedObjectFactory() for i in range(14)]
    device_ids = [mo.pk for mo in devices if mo.is_device]
    assert len(device_ids) == 7
    query = "fragmentType=c8y_IsDevice&pageSize=2"

    page3 = call(api["reader"], "GET", f"{COLLECTION}?{query}&currentPage=3&withTotalPages=true")
    body = ok_json(page3)
    assert [int(mo["id"]) for mo in body["managedObjects"]] == device_ids[4:6]
    assert body["statistics"] == {"pageSize": 2, "currentPage": 3, "totalPages": 4}
    for link_name, page in (("self", 3), ("prev", 2), ("next", 4)):
        parts = urlsplit(body[link_name])
        assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{BASE}{COLLECTION}"
        assert parse_qs(parts.query) == {
            "fragmentType": ["c8y_IsDevice"],
            "pageSize": ["2"],
            "currentPage": [str(page)],
            "withTotalPages": ["true"],
        }

    last = ok_json(call(api["reader"], "GET", f"{COLLECTION}?{query}&currentPage=4"))
    assert [int(mo["id"]) for mo in last["managedObjects"]] == device_ids[6:]
    past = ok_json(call(api["reader"], "GET", f"{COLLECTION}?{query}&currentPage=5"))
    assert past["managedObjects"] == []
    assert "currentPage=6" in past["next"]
    assert "totalPages" not in past["statistics"]

    counted = ok_json(
        call(
            api["reader"],
            "GET",
            f"{COLLECTION}?fragmentType=c8y_IsDevice&pageSize=1&withTotalPages=true"
            "&withTotalElements=true",
        )
    )
    assert counted["statistics"]["totalPages"] == 7
    assert counted["statistics"]["totalElements"] == 7


def test_list_default_order_page_size_and_media_type(api: Clients) -> None:
    created = [ManagedObjectFactory() for _ in range(7)]

    response = call(api["reader"], "GET", COLLECTION, accept=MO_COLLECTION_TYPE)

    assert response["Content-Type"] == f"{MO_COLLECTION_TYPE};charset=UTF-8;ver=0.9"
    body = ok_json(response)
    assert [int(mo["id"]) for mo in body["managedObjects"]] == pks(*created)[:5]
    assert body["statistics"] == {"pageSize": 5, "currentPage": 1}
    assert "prev" not in body
    assert "next" in body


@pytest.mark.parametrize(
    "params",
    [
        "pageSize=0",
        "pageSize=-1",
        "pageSize=abc",
        "currentPage=0",
        "currentPage=x",
        "withTotalPages=yes",
        "withChildren=maybe",
        "withParents=1",
        "skipChildrenNames=nope",
        "withChildrenCount=2",
        "onlyRoots=maybe",
        "childDeviceId=abc",
        "childAssetId=1.5",
        "childAdditionId=-1",
        "ids=1,x",
        "ids=abc",
        "query=name eq",
        "query=$filter=(name eq 'x'",
        "q=has(name)",
    ],
)
def test_list_bad_parameters_are_422(api: Clients, params: str) -> None:
    ManagedObjectFactory()

    response = call(api["reader"], "GET", f"{COLLECTION}?{params}")

    assert_error(response, 422)


def test_list_page_size_above_2000_is_trimmed(api: Clients) -> None:
    body = ok_json(call(api["reader"], "GET", f"{COLLECTION}?pageSize=5000"))

    assert body["statistics"]["pageSize"] == 2000


def test_list_visibility_by_role_and_owner(api: Clients) -> None:
    own = [ManagedObjectFactory(owner="owner") for _ in range(3)]
    foreign = [ManagedObjectFactory(owner="other") for _ in range(2)]
    shouty = ManagedObjectFactory(owner="OWNER")  # owners match case-insensitively

    query = f"{COLLECTION}?pageSize=100&withTotalElements=true&withTotalPages=true"
    everything = pks(*own, *foreign, shouty)
    for who, expected in (
        ("reader", everything),
        ("admin", everything),
        ("owner", pks(*own, shouty)),
        ("other", pks(*foreign)),
        ("nobody", []),
    ):
        body = ok_json(call(api[who], "GET", query))
        assert [int(mo["id"]) for mo in body["managedObjects"]] == expected, who
        assert body["statistics"]["totalElements"] == len(expected), who
        assert body["statistics"]["totalPages"] == (1 if expected else 0), who


@pytest.mark.parametrize("who", UNAUTHENTICATED)
def test_list_unauthenticated(api: Clients, who: str) -> None:
    assert_error(call(api[who], "GET", COLLECTION), 401, "security/Unauthorized")


def test_filter_type_is_exact_and_case_sensitive(api: Clients) -> None:
    linux = ManagedObjectFactory(type="c8y_Linux")
    ManagedObjectFactory(type="c8y_linux")
    ManagedObjectFactory(type="c8y_Linux2")
    ManagedObjectFactory()

    assert listed_ids(call(api["reader"], "GET", f"{COLLECTION}?type=c8y_Linux")) == [linux.pk]


@pytest.mark.parametrize(
    "fragment", ["c8y_IsDevice", "com_cumulocity_model_Agent", "c8y_IsDeviceGroup", "c8y_Custom"]
)
def test_filter_fragment_type(api: Clients, fragment: str) -> None:
    matching = [
        ManagedObjectFactory(fragments={fragment: {}}),
        ManagedObjectFactory(fragments={fragment: "any value", "c8y_Other": 1}),
        ManagedObjectFactory(fragments={fragment: False}),
    ]
    ManagedObjectFactory(fragments={"c8y_Other": {fragment: {}}})
    ManagedObjectFactory(name=fragment)

    response = call(api["reader"], "GET", f"{COLLECTION}?fragmentType={fragment}")

    assert listed_ids(response) == pks(*matching)


def test_filter_owner(api: Clients) -> None:
    mine = ManagedObjectFactory(owner="alice")
    ManagedObjectFactory(owner="bob")
    ManagedObjectFactory(owner="alice2")

    assert listed_ids(call(api["reader"], "GET", f"{COLLECTION}?owner=alice")) == [mine.pk]


def test_filters_combine_with_and(api: Clients) -> None:
    hit = DeviceFactory(owner="alice", type="c8y_Linux")
    DeviceFactory(owner="bob", type="c8y_Linux")
    ManagedObjectFactory(owner="alice", type="c8y_Linux")
    DeviceFactory(owner="alice", type="c8y_Windows")

    response = call(
        api["reader"],
        "GET",
        f"{COLLECTION}?owner=alice&type=c8y_Linux&fragmentType=c8y_IsDevice&unknownParam=1",
    )

    assert listed_ids(response) == [hit.pk]


def test_filter_text(api: Clients) -> None:
    by_name = ManagedObjectFactory(name="Device Alpha", owner="zed")
    by_type = ManagedObjectFactory(name="n1", type="DEVICE_type", owner="zed")
    by_owner = ManagedObjectFactory(name="n2", owner="devops")
    by_external_id = ManagedObjectFactory(name="n3", owner="zed")
    ExternalIdFactory(managed_object=by_external_id, type="c8y_Serial", external_id="DEV-0001")
    ManagedObjectFactory(name="My device", owner="zed")  # "dev" is not a prefix
    other_ext = ManagedObjectFactory(name="n4", owner="zed")
    ExternalIdFactory(managed_object=other_ext, type="dev_type", external_id="x-1")  # type only

    response = call(api["reader"], "GET", f"{COLLECTION}?text=dev&pageSize=100")

    assert listed_ids(response) == pks(by_name, by_type, by_owner, by_external_id)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("'My Device'", ["My Device 1"]),
        ("my device", ["My Device 1"]),
        ("'O''Brien'", ["O'Brien's box"]),
        ("O'Brien", ["O'Brien's box"]),
        ("'", []),
        ("''", ["My Device 1", "O'Brien's box", "Other"]),
    ],
)
def test_filter_text_quotes(api: Clients, text: str, expected: list[str]) -> None:
    for name in ("My Device 1", "O'Brien's box", "Other"):
        ManagedObjectFactory(name=name, owner="zed")

    body = ok_json(get(api["reader"], COLLECTION, text=text, pageSize=100))

    assert [mo["name"] for mo in body["managedObjects"]] == expected


def test_filter_text_matches_the_id(api: Clients) -> None:
    objects = [ManagedObjectFactory(name="n", owner="zed") for _ in range(3)]
    target = objects[1]

    exact = get(api["reader"], COLLECTION, text=str(target.pk), pageSize=100)
    assert target.pk in listed_ids(exact)
    assert all(str(pk).startswith(str(target.pk)) for pk in listed_ids(exact))

    prefix = str(target.pk)[:-1]
    by_prefix = listed_ids(get(api["reader"], COLLECTION, text=prefix, pageSize=2000))
    assert target.pk in by_prefix  # inventory.md §4: prefix match against id too
    assert all(str(pk).startswith(prefix) for pk in by_prefix)


def test_filter_ids(api: Clients) -> None:
    a, b, c = (DeviceFactory(type="c8y_Linux") for _ in range(3))
    ManagedObjectFactory()
    missing = c.pk + 1000

    response = get(api["reader"], COLLECTION, ids=f"{c.pk},{missing}, {a.pk},,{a.pk}")
    assert listed_ids(response) == [a.pk, c.pk]
    # Beyond the bigint range: well-formed, names nothing (no database error on any engine).
    huge = "99999999999999999999"
    assert listed_ids(get(api["reader"], COLLECTION, ids=f"{huge},{a.pk}")) == [a.pk]
    assert listed_ids(get(api["reader"], COLLECTION, ids=huge)) == []

    # every other filter is ignored next to ids
    ignored = get(
        api["reader"],
        COLLECTION,
        ids=f"{b.pk},{c.pk}",
        type="nomatch",
        fragmentType="c8y_Nothing",
        owner="nobody",
        text="zzz",
        onlyRoots="true",
        childDeviceId=str(a.pk),
    )
    assert listed_ids(ignored) == [b.pk, c.pk]


def test_filter_ids_respects_visibility(api: Clients) -> None:
    own = ManagedObjectFactory(owner="owner")
    foreign = ManagedObjectFactory(owner="other")

    response = get(api["owner"], COLLECTION, ids=f"{own.pk},{foreign.pk}")

    assert listed_ids(response) == [own.pk]


def test_filter_only_roots(api: Clients) -> None:
    agent, group, lonely = AgentFactory(), GroupFactory(), ManagedObjectFactory()
    device, member, addition = DeviceFactory(), DeviceFactory(), ManagedObjectFactory()
    link(agent, device)
    link(group, member, relation=Relation.ASSET)
    link(device, addition, relation=Relation.ADDITION)

    roots = get(api["reader"], COLLECTION, onlyRoots="TRUE", pageSize=100)
    everything = get(api["reader"], COLLECTION, onlyRoots="false", pageSize=100)

    assert listed_ids(roots) == pks(agent, group, lonely)
    assert listed_ids(everything) == pks(agent, group, lonely, device, member, addition)


@pytest.mark.parametrize(
    ("param", "relation"),
    [
        ("childDeviceId", Relation.DEVICE),
        ("childAssetId", Relation.ASSET),
        ("childAdditionId", Relation.ADDITION),
    ],
)
def test_filter_child_id_gives_the_parents(api: Clients, param: str, relation: Relation) -> None:
    child = DeviceFactory()
    first, second = ManagedObjectFactory(), ManagedObjectFactory()
    other_relation_parent = ManagedObjectFactory()
    unrelated_parent = ManagedObjectFactory()
    link(second, child, relation=relation)
    link(first, child, relation=relation)
    other = next(r for r in Relation if r != relation)
    link(other_relation_parent, child, relation=other)
    link(unrelated_parent, DeviceFactory(), relation=relation)

    response = get(api["reader"], COLLECTION, **{param: str(child.pk)})

    assert listed_ids(response) == pks(first, second)
    assert listed_ids(get(api["reader"], COLLECTION, **{param: "999999999"})) == []
    assert listed_ids(get(api["reader"], COLLECTION, **{param: "99999999999999999999"})) == []


# --- query / q through the HTTP API (inventory.md §4, §9) ------------------------------------------


@pytest.fixture
def query_world() -> dict[str, ManagedObject]:
    return {
        "dev_b": DeviceFactory(name="Dev B", type="c8y_Linux"),
        "dev_a": DeviceFactory(name="Dev A", type="c8y_Linux"),
        "dev_c": DeviceFactory(name="Dev C", type="c8y_Windows"),
        "not_device": ManagedObjectFactory(name="Dev Z", type="c8y_Linux"),
        "other": DeviceFactory(name="Other", type="c8y_Linux"),
        "x_device": DeviceFactory(name="x", type="c8y_X"),
        "x_plain": ManagedObjectFactory(name="x", type="c8y_X"),
    }


def names(response: Any) -> list[str]:
    return [mo["name"] for mo in ok_json(response)["managedObjects"]]


@pytest.mark.parametrize("separator", ["+", " ", "  "])
def test_query_filter_and_orderby(
    api: Clients, query_world: dict[str, ManagedObject], separator: str
) -> None:
    query = f"$filter=(has(c8y_IsDevice) and name eq 'Dev*'){separator}$orderby=name desc"

    response = get(api["reader"], COLLECTION, query=query, pageSize=100)

    assert names(response) == ["Dev C", "Dev B", "Dev A"]


def test_query_with_literal_plus_in_the_url(
    api: Clients, query_world: dict[str, ManagedObject]
) -> None:
    # c8y-api formats the query into the URL unencoded: `+` then arrives as a space.
    url = f"{COLLECTION}?query=$filter=(has(c8y_IsDevice)+and+name+eq+'Dev*')+$orderby=name+desc"

    assert names(call(api["reader"], "GET", url)) == ["Dev C", "Dev B", "Dev A"]


def test_q_adds_has_is_device(api: Clients, query_world: dict[str, ManagedObject]) -> None:
    by_q = get(api["reader"], COLLECTION, q="$filter=(name eq 'x')")
    by_query = get(api["reader"], COLLECTION, query="$filter=(name eq 'x')")

    assert listed_ids(by_q) == [query_world["x_device"].pk]
    assert listed_ids(by_query) == pks(query_world["x_device"], query_world["x_plain"])


def test_query_bygroupid_gives_direct_child_assets(api: Clients) -> None:
    group, subgroup = GroupFactory(), GroupFactory(type="c8y_DeviceSubGroup")
    first, second, nested, outside = (DeviceFactory() for _ in range(4))
    link(group, second, subgroup, first, relation=Relation.ASSET)
    link(subgroup, nested, relation=Relation.ASSET)
    link(group, outside, relation=Relation.DEVICE)

    response = get(api["reader"], COLLECTION, query=f"bygroupid({group.pk})", pageSize=100)

    assert listed_ids(response) == sorted(pks(second, subgroup, first))


def test_query_replaces_every_other_filter(
    api: Clients, query_world: dict[str, ManagedObject]
) -> None:
    response = get(
        api["reader"],
        COLLECTION,
        query="name eq 'Other'",
        type="nomatch",
        fragmentType="c8y_Nothing",
        owner="nobody",
        text="zzz",
        ids="1",
        onlyRoots="true",
        childDeviceId="1",
    )

    assert listed_ids(response) == [query_world["other"].pk]


def test_query_respects_visibility(api: Clients) -> None:
    own = DeviceFactory(owner="owner", name="same")
    DeviceFactory(owner="other", name="same")

    response = get(api["owner"], COLLECTION, query="name eq 'same'")

    assert listed_ids(response) == [own.pk]


# --- rendering options ----------------------------------------------------------------------------


@pytest.fixture
def family() -> dict[str, ManagedObject]:
    """agent -dev-> device (also asset of group, addition of agent2); device -dev-> sub1, sub2;
    device -asset-> asset1; device -addition-> addition1."""
    objects = {
        "agent": AgentFactory(name="Agent"),
        "agent2": AgentFactory(name="Agent 2"),
        "group": GroupFactory(name="Group"),
        "device": DeviceFactory(name="Device"),
        "sub1": DeviceFactory(name="Sub 1"),
        "sub2": DeviceFactory(name=None),
        "asset1": ManagedObjectFactory(name="Asset 1"),
        "addition1": ManagedObjectFactory(name="Addition 1"),
    }
    link(objects["agent"], objects["device"])
    link(objects["group"], objects["device"], relation=Relation.ASSET)
    link(objects["agent2"], objects["device"], relation=Relation.ADDITION)
    link(objects["device"], objects["sub2"], objects["sub1"])
    link(objects["device"], objects["asset1"], relation=Relation.ASSET)
    link(objects["device"], objects["addition1"], relation=Relation.ADDITION)
    return objects


def ref(owner: ManagedObject, key: str, target: ManagedObject, *, name: bool = True) -> dict:
    managed_object: dict[str, Any] = {"id": str(target.pk), "self": f"{BASE}{mo_path(target.pk)}"}
    if name and target.name is not None:
        managed_object["name"] = target.name
    return {"self": f"{BASE}{mo_path(owner.pk)}/{key}/{target.pk}", "managedObject": managed_object}


def test_get_default_rendering(api: Clients, family: dict[str, ManagedObject]) -> None:
    device = family["device"]

    response = call(api["reader"], "GET", mo_path(device.pk), accept=MO_TYPE)

    assert response["Content-Type"] == f"{MO_TYPE};charset=UTF-8;ver=0.9"
    body = ok_json(response)
    url = f"{BASE}{mo_path(device.pk)}"
    assert body["childDevices"] == {
        "self": f"{url}/childDevices",
        "references": [
            ref(device, "childDevices", family["sub2"]),
            ref(device, "childDevices", family["sub1"]),
        ],
    }
    assert body["childAssets"]["references"] == [ref(device, "childAssets", family["asset1"])]
    assert body["childAdditions"]["references"] == [
        ref(device, "childAdditions", family["addition1"])
    ]
    for key in PARENT_KEYS:
        assert body[key] == {"self": f"{url}/{key}", "references": []}
    for key in CHILD_KEYS:
        assert "count" not in body[key]
    assert body["c8y_IsDevice"] == {}
    assert body["owner"] == "admin"


def test_get_with_children_false(api: Clients, family: dict[str, ManagedObject]) -> None:
    body = ok_json(get(api["reader"], mo_path(family["device"].pk), withChildren="FALSE"))

    for key in CHILD_KEYS:
        assert key not in body
    for key in PARENT_KEYS:
        assert body[key]["references"] == []


def test_get_skip_children_names(api: Clients, family: dict[str, ManagedObject]) -> None:
    device = family["device"]

    body = ok_json(get(api["reader"], mo_path(device.pk), skipChildrenNames="true"))

    assert body["childDevices"]["references"] == [
        ref(device, "childDevices", family["sub2"], name=False),
        ref(device, "childDevices", family["sub1"], name=False),
    ]
    for key in CHILD_KEYS:
        for item in body[key]["references"]:
            assert set(item["managedObject"]) == {"id", "self"}


def test_get_with_children_count(api: Clients, family: dict[str, ManagedObject]) -> None:
    body = ok_json(get(api["reader"], mo_path(family["device"].pk), withChildrenCount="true"))

    assert [body[key]["count"] for key in CHILD_KEYS] == [2, 1, 1]
    assert all(type(body[key]["count"]) is int for key in CHILD_KEYS)
    leaf = ok_json(get(api["reader"], mo_path(family["sub1"].pk), withChildrenCount="true"))
    assert [leaf[key]["count"] for key in CHILD_KEYS] == [0, 0, 0]


@pytest.mark.parametrize("param", ["withParents", "withGroups"])
def test_get_with_parents(api: Clients, family: dict[str, ManagedObject], param: str) -> None:
    device = family["device"]

    body = ok_json(get(api["reader"], mo_path(device.pk), **{param: "true"}))

    assert body["deviceParents"]["references"] == [ref(device, "deviceParents", family["agent"])]
    if param == "withParents":
        assert body["additionParents"]["references"] == [
            ref(device, "additionParents", family["agent2"])
        ]
    assert body["assetParents"]["references"] == [ref(device, "assetParents", family["group"])]


def test_list_rendering_options(api: Clients, family: dict[str, ManagedObject]) -> None:
    device = family["device"]
    query = f"ids={device.pk},{family['sub1'].pk}"

    plain = ok_json(call(api["reader"], "GET", f"{COLLECTION}?{query}"))["managedObjects"]
    assert [len(mo["childDevices"]["references"]) for mo in plain] == [2, 0]
    assert all(mo["deviceParents"]["references"] == [] for mo in plain)

    rendered = ok_json(
        call(
            api["reader"],
            "GET",
            f"{COLLECTION}?{query}&withChildren=false&withParents=true&withLatestValues=true",
        )
    )["managedObjects"]
    assert all(key not in mo for mo in rendered for key in CHILD_KEYS)
    assert rendered[0]["deviceParents"]["references"] == [
        ref(device, "deviceParents", family["agent"])
    ]
    assert rendered[1]["deviceParents"]["references"] == [
        ref(family["sub1"], "deviceParents", device)
    ]

    counted = ok_json(
        call(
            api["reader"],
            "GET",
            f"{COLLECTION}?{query}&withChildrenCount=true&skipChildrenNames=true",
        )
    )["managedObjects"]
    assert counted[0]["childDevices"]["count"] == 2
    assert set(counted[0]["childDevices"]["references"][0]["managedObject"]) == {"id", "self"}


@pytest.mark.parametrize(
    "param", ["withChildren=maybe", "skipChildrenNames=1", "withParents=yes", "withChildrenCount=x"]
)
def test_get_bad_rendering_option_is_422(
    api: Clients, family: dict[str, ManagedObject], param: str
) -> None:
    response = call(api["reader"], "GET", f"{mo_path(family['device'].pk)}?{param}")

    assert_error(response, 422)


def test_get_with_trailing_slash(api: Clients) -> None:
    mo = ManagedObjectFactory()

    assert ok_json(call(api["reader"], "GET", f"{mo_path(mo.pk)}/"))["id"] == str(mo.pk)
    assert ok_json(call(api["reader"], "GET", f"{COLLECTION}/"))["managedObjects"]


# --- PUT --------------------------------------------------------------------------------------------


def test_put_checklist(api: Clients) -> None:
    mo = DeviceFactory(
        owner="owner",
        c8y_X={"a": 1},
        c8y_Hardware={"model": "RaspPi", "serialNumber": "17b7", "revision": "000e"},
        c8y_Keep=[1, 2],
    )

    response = call(
        api["owner"],
        "PUT",
        mo_path(mo.pk),
        {"c8y_X": None, "c8y_Hardware": {"model": "RaspPi 4"}},
        accept="application/json",
    )

    body = ok_json(response)
    assert "c8y_X" not in body
    assert body["c8y_Hardware"] == {"model": "RaspPi 4"}
    assert body["c8y_Keep"] == [1, 2]
    assert body["name"] == mo.name
    assert body["type"] == "c8y_Linux"
    mo.refresh_from_db()
    assert mo.fragments == {
        "c8y_IsDevice": {},
        "c8y_Hardware": {"model": "RaspPi 4"},
        "c8y_Keep": [1, 2],
    }


def test_put_without_accept_has_empty_body(api: Clients) -> None:
    mo = ManagedObjectFactory(owner="owner")

    response = call(api["owner"], "PUT", mo_path(mo.pk), {"name": "renamed"})

    assert response.status_code == 200
    assert response.content == b""
    assert response["Content-Length"] == "0"
    mo.refresh_from_db()
    assert mo.name == "renamed"


def test_put_with_vendor_accept(api: Clients) -> None:
    mo = ManagedObjectFactory(owner="owner")

    response = call(api["owner"], "PUT", mo_path(mo.pk), {"name": "renamed"}, accept=MO_TYPE)

    assert response["Content-Type"] == f"{MO_TYPE};charset=UTF-8;ver=0.9"
    body = ok_json(response)
    assert body["name"] == "renamed"
    assert body["self"] == f"{BASE}{mo_path(mo.pk)}"


def test_put_null_removes_name_and_type(api: Clients) -> None:
    mo = ManagedObjectFactory(owner="owner", name="Dev", type="c8y_Linux")

    body = ok_json(
        call(api["owner"], "PUT", mo_path(mo.pk), {"name": None, "type": None}, accept="*/*")
    )

    assert "name" not in body
    assert "type" not in body
    mo.refresh_from_db()
    assert (mo.name, mo.type) == (None, None)


def test_put_moves_last_updated_but_not_creation_time(api: Clients) -> None:
    mo = ManagedObjectFactory(owner="owner")
    ManagedObject.objects.filter(pk=mo.pk).update(creation_time=OLD, last_updated=OLD)

    body = ok_json(call(api["owner"], "PUT", mo_path(mo.pk), {"c8y_A": 1}, accept="*/*"))

    assert body["creationTime"] == "2020-01-01T00:00:00.000Z"
    assert body["lastUpdated"] > "2020-01-01T00:00:00.000Z"
    mo.refresh_from_db()
    assert mo.creation_time == OLD
    assert mo.last_updated > OLD


def test_put_ignores_read_only_keys(api: Clients) -> None:
    mo = ManagedObjectFactory(owner="owner")
    child = ManagedObjectFactory()
    ManagedObject.objects.filter(pk=mo.pk).update(creation_time=OLD)
    reference = {"references": [{"managedObject": {"id": str(child.pk)}}]}

    body = ok_json(
        call(
            api["owner"],
            "PUT",
            mo_path(mo.pk),
            {
                "id": str(child.pk),
                "self": "https://evil/x",
                "creationTime": "1999-01-01T00:00:00.000Z",
                "lastUpdated": "1999-01-01T00:00:00.000Z",
                **{key: reference for key in CHILD_KEYS + PARENT_KEYS},
            },
            accept="*/*",
        )
    )

    assert body["id"] == str(mo.pk)
    assert body["self"] == f"{BASE}{mo_path(mo.pk)}"
    assert body["creationTime"] == "2020-01-01T00:00:00.000Z"
    assert not body["lastUpdated"].startswith("1999")
    assert not ManagedObjectReference.objects.exists()
    mo.refresh_from_db()
    assert mo.fragments == {}


@pytest.mark.parametrize(
    ("who", "owner"), [("owner", "owner"), ("admin", "new-owner")], ids=["ignored", "admin"]
)
def test_put_owner(api: Clients, who: str, owner: str) -> None:
    mo = ManagedObjectFactory(owner="owner")

    body = ok_json(call(api[who], "PUT", mo_path(mo.pk), {"owner": "new-owner"}, accept="*/*"))

    assert body["owner"] == owner
    mo.refresh_from_db()
    assert mo.owner == owner


def test_put_flags_follow_fragments(api: Clients) -> None:
    mo = ManagedObjectFactory(owner="owner")

    call(api["owner"], "PUT", mo_path(mo.pk), {"c8y_IsDevice": {}})
    assert listed_ids(get(api["reader"], COLLECTION, fragmentType="c8y_IsDevice")) == [mo.pk]

    call(api["owner"], "PUT", mo_path(mo.pk), {"c8y_IsDevice": None})
    assert listed_ids(get(api["reader"], COLLECTION, fragmentType="c8y_IsDevice")) == []


@pytest.mark.parametrize(("spec", "status"), BAD_BODIES)
def test_put_bad_bodies(
    api: Clients,
    row_counts: Callable[[], dict[str, int]],
    spec: dict[str, Any],
    status: int,
) -> None:
    mo = ManagedObjectFactory(owner="owner", c8y_A=1)
    ManagedObject.objects.filter(pk=mo.pk).update(last_updated=OLD)
    api.prepare("owner")
    before = row_counts()

    response = send_bad(api["owner"], "PUT", mo_path(mo.pk), spec)

    assert_error(response, status, ERROR_NAMES[status])
    assert row_counts() == before
    mo.refresh_from_db()
    assert (mo.name, mo.fragments, mo.last_updated) == (mo.name, {"c8y_A": 1}, OLD)


@pytest.mark.parametrize("override", ["PUT", "put"], ids=["upper", "lower"])
def test_post_with_x_http_method_put(api: Clients, override: str) -> None:
    mo = ManagedObjectFactory(owner="owner")

    response = call(
        api["owner"], "POST", mo_path(mo.pk), {"name": "via override"}, HTTP_X_HTTP_METHOD=override
    )

    assert response.status_code == 200
    mo.refresh_from_db()
    assert mo.name == "via override"


def test_unknown_processing_mode_is_422_and_writes_nothing(
    api: Clients, row_counts: Callable[[], dict[str, int]]
) -> None:
    api.prepare("owner")
    before = row_counts()

    response = call(
        api["owner"], "POST", COLLECTION, {"name": "x"}, HTTP_X_CUMULOCITY_PROCESSING_MODE="LOUD"
    )

    assert_error(response, 422)
    assert row_counts() == before
    quiet = call(
        api["owner"],
        "POST",
        COLLECTION,
        {"name": "x"},
        HTTP_X_CUMULOCITY_PROCESSING_MODE="QUIESCENT",
    )
    assert quiet.status_code == 201


# --- DELETE -----------------------------------------------------------------------------------------


def test_delete_plain_device_keeps_its_children(
    api: Clients, family: dict[str, ManagedObject]
) -> None:
    device = family["device"]

    response = call(api["admin"], "DELETE", mo_path(device.pk))

    assert response.status_code == 204
    assert response.content == b""
    assert_error(call(api["admin"], "GET", mo_path(device.pk)), 404, "inventory/Not Found")
    for name in ("sub1", "sub2", "asset1", "addition1", "agent", "group", "agent2"):
        mo = family[name]
        body = ok_json(get(api["admin"], mo_path(mo.pk), withParents="true"))
        for key in CHILD_KEYS + PARENT_KEYS:
            assert str(device.pk) not in {r["managedObject"]["id"] for r in body[key]["references"]}
    assert not ManagedObjectReference.objects.filter(parent=device.pk).exists()
    assert not ManagedObjectReference.objects.filter(child=device.pk).exists()


@pytest.mark.parametrize(
    ("query", "gone"),
    [
        ("", {"device"}),
        ("?cascade=true", {"device", "sub1", "sub2", "asset1"}),
        ("?cascade=false", {"device"}),
        ("?forceCascade=true", {"device", "sub1", "sub2", "asset1", "addition1"}),
        ("?cascade=true&forceCascade=true", {"device", "sub1", "sub2", "asset1", "addition1"}),
        ("?cascade=false&forceCascade=true", {"device", "sub1", "sub2", "asset1", "addition1"}),
        ("?withDeviceUser=true", {"device"}),
    ],
)
def test_delete_cascade_options(
    api: Clients, family: dict[str, ManagedObject], query: str, gone: set[str]
) -> None:
    response = call(api["admin"], "DELETE", f"{mo_path(family['device'].pk)}{query}")

    assert response.status_code == 204
    remaining = set(ManagedObject.objects.values_list("pk", flat=True))
    assert remaining == {mo.pk for name, mo in family.items() if name not in gone}


def test_delete_group_deletes_subgroups_but_not_devices(api: Clients) -> None:
    group = GroupFactory(owner="owner")
    subgroup = GroupFactory(type="c8y_DeviceSubGroup")
    subsubgroup = GroupFactory(type="c8y_DeviceSubGroup")
    device, nested_device = DeviceFactory(), DeviceFactory()
    link(group, subgroup, device, relation=Relation.ASSET)
    link(subgroup, subsubgroup, nested_device, relation=Relation.ASSET)

    assert call(api["owner"], "DELETE", mo_path(group.pk)).status_code == 204

    assert set(ManagedObject.objects.values_list("pk", flat=True)) == {device.pk, nested_device.pk}
    for mo in (device, nested_device):
        assert (
            ok_json(get(api["admin"], mo_path(mo.pk), withParents="true"))["assetParents"][
                "references"
            ]
            == []
        )


def test_delete_removes_external_ids(api: Clients) -> None:
    device = DeviceFactory(owner="owner")
    survivor = DeviceFactory()
    ExternalIdFactory(managed_object=device, type="c8y_Serial", external_id="gone-1")
    ExternalIdFactory(managed_object=device, type="c8y_MAC", external_id="gone-2")
    ExternalIdFactory(managed_object=survivor, type="c8y_Serial", external_id="kept")

    assert call(api["owner"], "DELETE", mo_path(device.pk)).status_code == 204

    for type_, value in (("c8y_Serial", "gone-1"), ("c8y_MAC", "gone-2")):
        assert_error(
            call(api["admin"], "GET", f"/identity/externalIds/{type_}/{value}"),
            404,
            "identity/Not Found",
        )
    assert list(ExternalId.objects.values_list("external_id", flat=True)) == ["kept"]


def test_delete_removes_the_device_operations(api: Clients) -> None:
    """inventory.md §6 side effect 2 and §9: deleting a device deletes its operations."""
    from devicecontrol.models import Operation
    from devicecontrol.services import operation_create

    agent = AgentFactory()
    device, sibling = DeviceFactory(owner="owner"), DeviceFactory()
    link(agent, device, sibling)
    for target in (device, device, sibling, agent):
        operation_create(device=target, data={"c8y_Restart": {}}, notify=False)

    assert call(api["owner"], "DELETE", mo_path(device.pk)).status_code == 204

    assert not Operation.objects.filter(device_id=device.pk).exists()
    assert sorted(Operation.objects.values_list("device_id", flat=True)) == sorted(
        [sibling.pk, agent.pk]
    )


@pytest.mark.parametrize("query", ["?cascade=maybe", "?forceCascade=1", "?withDeviceUser=yes"])
def test_delete_bad_parameter_is_422_and_deletes_nothing(
    api: Clients,
    row_counts: Callable[[], dict[str, int]],
    family: dict[str, ManagedObject],
    query: str,
) -> None:
    api.prepare("admin")
    before = row_counts()

    response = call(api["admin"], "DELETE", f"{mo_path(family['device'].pk)}{query}")

    assert_error(response, 422)
    assert row_counts() == before


# --- /inventory/managedObjects/{id}: the role and owner matrix ------------------------------------


DETAIL_MATRIX = [
    ("GET", "admin", 200),
    ("GET", "reader", 200),
    ("GET", "owner", 200),
    ("GET", "other", 403),
    ("GET", "nobody", 403),
    ("PUT", "admin", 200),
    ("PUT", "reader", 403),
    ("PUT", "owner", 200),
    ("PUT", "other", 403),
    ("PUT", "nobody", 403),
    ("DELETE", "admin", 204),
    ("DELETE", "reader", 403),
    ("DELETE", "owner", 204),
    ("DELETE", "other", 403),
    ("DELETE", "nobody", 403),
    *[("POST", who, 405) for who in ("admin", "owner", "nobody")],
    ("PATCH", "admin", 405),
    *[(method, who, 401) for method in ("GET", "PUT", "DELETE", "POST") for who in UNAUTHENTICATED],
]


@pytest.mark.parametrize(("method", "who", "status"), DETAIL_MATRIX)
def test_detail_matrix(
    api: Clients,
    row_counts: Callable[[], dict[str, int]],
    method: str,
    who: str,
    status: int,
) -> None:
    mo = DeviceFactory(owner="owner", c8y_Note="original")
    ExternalIdFactory(managed_object=mo)
    api.prepare(who)
    before = row_counts()

    response = call(api[who], method, mo_path(mo.pk), {"c8y_Note": "changed"}, accept="*/*")

    if status >= 400:
        body = assert_error(response, status, ERROR_NAMES[status])
        if status == 403:
            assert body["message"] == "Access is denied"
        if status == 405:
            assert "GET" in response["Allow"]
        assert row_counts() == before
        mo.refresh_from_db()
        assert mo.fragments["c8y_Note"] == "original"
    elif method == "GET":
        assert ok_json(response)["c8y_Note"] == "original"
    elif method == "PUT":
        assert ok_json(response)["c8y_Note"] == "changed"
    else:
        assert response.status_code == 204
        assert not ManagedObject.objects.filter(pk=mo.pk).exists()
        assert not ExternalId.objects.exists()


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
@pytest.mark.parametrize("who", ["admin", "reader", "owner", "nobody"])
@pytest.mark.parametrize("pk", ["999999999", "abc", "-1", "1.5"])
def test_detail_unknown_id_is_404_before_403(
    api: Clients,
    row_counts: Callable[[], dict[str, int]],
    method: str,
    who: str,
    pk: str,
) -> None:
    ManagedObjectFactory(owner="owner")
    api.prepare(who)
    before = row_counts()

    response = call(api[who], method, mo_path(pk), {"name": 5})

    body = assert_error(response, 404, "inventory/Not Found")
    if pk.isdigit():
        assert body["message"] == (
            f"Finding device data from database failed : No managedObject for id '{pk}'!"
        )
    assert row_counts() == before


def test_detail_unknown_id_with_unauthenticated_is_401(api: Clients) -> None:
    assert_error(call(api["anon"], "GET", mo_path(999999999)), 401, "security/Unauthorized")


def test_detail_non_owner_with_bad_body_is_403(
    api: Clients, row_counts: Callable[[], dict[str, int]]
) -> None:
    mo = ManagedObjectFactory(owner="owner")
    api.prepare("other")
    before = row_counts()

    for spec in ({"raw": "{"}, {"body": {"name": 5}}, {"raw": "x", "content_type": "text/plain"}):
        assert_error(send_bad(api["other"], "PUT", mo_path(mo.pk), spec), 403)

    assert row_counts() == before


def test_owner_match_is_case_insensitive(api: Clients) -> None:
    mo = ManagedObjectFactory(owner="OWNER")

    assert ok_json(call(api["owner"], "GET", mo_path(mo.pk)))["owner"] == "OWNER"
    assert call(api["owner"], "PUT", mo_path(mo.pk), {"name": "x"}).status_code == 200
    assert call(api["owner"], "DELETE", mo_path(mo.pk)).status_code == 204


def test_creator_can_manage_own_device_but_not_a_foreign_one(api: Clients) -> None:
    """auth.md §8: a ROLE_INVENTORY_CREATE-only user creates, reads, updates and deletes its device
    and gets 403 (not 404) on another user's device."""
    created = ok_json(
        call(api["owner"], "POST", COLLECTION, {"name": "mine", "c8y_IsDevice": {}}, accept="*/*"),
        201,
    )
    path = mo_path(created["id"])
    foreign = DeviceFactory(owner="other")

    assert ok_json(call(api["owner"], "GET", path))["owner"] == "owner"
    assert (
        ok_json(call(api["owner"], "PUT", path, {"name": "still mine"}, accept="*/*"))["name"]
        == "still mine"
    )
    assert_error(call(api["owner"], "GET", mo_path(foreign.pk)), 403, "security/Forbidden")
    assert call(api["owner"], "DELETE", path).status_code == 204
    assert_error(call(api["owner"], "GET", path), 404, "inventory/Not Found")
