"""Hostile input at the API's edge (issue 10, fault-campaign findings 1, 2, 4 and 5): numbers and
nesting the renderer cannot write back, date-times outside years 1-9999 in UTC, pages beyond the
database's 64-bit offsets and strings longer than their columns are each a fast 422 in the error
shape with nothing written; rows stored before (or around) these checks still read back.

Query-language limits are in tests/inventory/test_query_limits.py."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from rest_framework.test import APIClient

from bulkops import services as bulk_services
from bulkops.models import BulkOperation
from devicecontrol import services as operation_services
from devicecontrol.models import Operation
from deviceplatform.api.exceptions import ValidationFailed
from deviceplatform.api.pagination import MAX_PAGE_SIZE, MAX_ROW_NUMBER
from deviceplatform.api.parsers import MAX_JSON_DEPTH
from deviceplatform.services import user_upsert
from inventory import services as inventory_services
from inventory.models import ExternalId, ManagedObject, Relation
from tests.conftest import Subscribe
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db

MOS = "/inventory/managedObjects"
OPERATIONS = "/devicecontrol/operations"
BULK = "/devicecontrol/bulkoperations"
START = "2031-03-01T12:00:00.000Z"
HOLE = "@V@"  # where a raw JSON value is put into a body


@dataclass(frozen=True)
class World:
    """An agent with one child device (with an external ID), a group holding the device, a
    PENDING operation for it and a SCHEDULED bulk operation on the group; all owned by `admin`."""

    agent: ManagedObject
    device: ManagedObject
    group: ManagedObject
    operation: Operation
    bulk: BulkOperation


@pytest.fixture
def world(admin_api: APIClient) -> World:
    agent = inventory_services.managed_object_create(
        owner="admin",
        data={"name": "Agent", "c8y_IsDevice": {}, "com_cumulocity_model_Agent": {}},
    )
    device = inventory_services.managed_object_create(
        owner="admin", data={"name": "Device", "c8y_IsDevice": {}}
    )
    inventory_services.managed_object_add_children(
        parent=agent, relation=Relation.DEVICE, children=[device]
    )
    group = inventory_services.managed_object_create(
        owner="admin", data={"name": "Group", "c8y_IsDeviceGroup": {}}
    )
    inventory_services.managed_object_add_children(
        parent=group, relation=Relation.ASSET, children=[device]
    )
    inventory_services.external_id_create(
        managed_object=device, type="c8y_Serial", external_id="S-1"
    )
    operation = operation_services.operation_create(device=device, data={"c8y_Restart": {}})
    bulk = bulk_services.bulk_operation_create(
        data={
            "groupId": str(group.pk),
            "startDate": START,
            "creationRamp": 1,
            "operationPrototype": {"c8y_Restart": {}},
        }
    )
    return World(agent, device, group, operation, bulk)


def send(client: APIClient, method: str, path: str, body: Any, value: str | None = None) -> Any:
    """`body` as JSON, with the raw JSON text `value` in place of the string HOLE."""
    text = json.dumps(body)
    if value is not None:
        assert text.count(json.dumps(HOLE)) == 1
        text = text.replace(json.dumps(HOLE), value)
    return client.generic(
        method, path, text, content_type="application/json", HTTP_ACCEPT="application/json"
    )


def get(client: APIClient, path: str) -> Any:
    response = client.get(path, HTTP_ACCEPT="application/json")
    assert response.status_code == 200, (path, response.status_code, response.content[:300])
    return response.json()


def nested(depth: int) -> str:
    """A JSON value of `depth` nested objects, `{"a": {"a": ... 1}}`."""
    return '{"a":' * depth + "1" + "}" * depth


def stored(world: World) -> dict[str, Any]:
    """Everything a refused write could have changed, to compare before and after."""
    bulk = BulkOperation.objects.get(pk=world.bulk.pk)
    return {
        "objects": list(
            ManagedObject.objects.order_by("pk").values_list("pk", "name", "type", "owner")
        ),
        "fragments": list(ManagedObject.objects.order_by("pk").values_list("fragments")),
        "operations": list(Operation.objects.order_by("pk").values_list("pk", "status")),
        "operation": Operation.objects.get(pk=world.operation.pk).fragments,
        "bulk": (bulk.operation_prototype, bulk.fragments, bulk.start_date, bulk.status),
        "external": list(ExternalId.objects.order_by("pk").values_list("type", "external_id")),
    }


# --- 1. numbers and nesting the renderer cannot write ---------------------------------------------

# (name, method, path, body): each body carries HOLE where a fragment value goes.
Endpoint = tuple[str, Callable[[World], tuple[str, str, dict[str, Any]]]]


def _bulk_body(world: World, **extra: Any) -> dict[str, Any]:
    return {
        "groupId": str(world.group.pk),
        "startDate": START,
        "creationRamp": 1,
        "operationPrototype": {"c8y_Restart": {}},
        **extra,
    }


ENDPOINTS: list[Endpoint] = [
    ("managed object create", lambda w: ("POST", MOS, {"name": "x", "c8y_P": HOLE})),
    ("managed object update", lambda w: ("PUT", f"{MOS}/{w.device.pk}", {"c8y_P": HOLE})),
    (
        "child device create",
        lambda w: ("POST", f"{MOS}/{w.agent.pk}/childDevices", {"name": "x", "c8y_P": HOLE}),
    ),
    (
        "operation create",
        lambda w: ("POST", OPERATIONS, {"deviceId": str(w.device.pk), "c8y_P": HOLE}),
    ),
    (
        "operation update",
        lambda w: (
            "PUT",
            f"{OPERATIONS}/{w.operation.pk}",
            {"status": "EXECUTING", "c8y_P": {"x": [HOLE]}},
        ),
    ),
    (
        "bulk create, prototype",
        lambda w: ("POST", BULK, _bulk_body(w, operationPrototype={"c8y_P": HOLE})),
    ),
    ("bulk create, fragment", lambda w: ("POST", BULK, _bulk_body(w, c8y_P=HOLE))),
    (
        "bulk update, prototype",
        lambda w: ("PUT", f"{BULK}/{w.bulk.pk}", {"operationPrototype": {"c8y_P": HOLE}}),
    ),
    ("bulk update, fragment", lambda w: ("PUT", f"{BULK}/{w.bulk.pk}", {"c8y_P": HOLE})),
    (
        "external ID create",
        lambda w: (
            "POST",
            f"/identity/globalIds/{w.device.pk}/externalIds",
            {"type": "t", "externalId": "e", "c8y_P": HOLE},
        ),
    ),
]

UNSTORABLE = {
    "1e20": "1e20",
    "2**64": str(2**64),
    "-1e19": "-1e19",
    "-2**63-1": str(-(2**63) - 1),
    "1.5e300": "1.5e300",
    "-2**63 as a float": "-9.223372036854776e18",  # stored as its decimal: below -2**63
    "300 levels": nested(300),
}


@pytest.mark.parametrize("value", list(UNSTORABLE.values()), ids=list(UNSTORABLE))
@pytest.mark.parametrize(
    "endpoint", [build for _, build in ENDPOINTS], ids=[n for n, _ in ENDPOINTS]
)
def test_an_unstorable_value_is_422_and_nothing_is_written(
    admin_api: APIClient,
    world: World,
    row_counts: Callable[[], dict[str, int]],
    endpoint: Callable[[World], tuple[str, str, dict[str, Any]]],
    value: str,
) -> None:
    method, path, body = endpoint(world)
    counts, before = row_counts(), stored(world)

    response = send(admin_api, method, path, body, value)

    message = assert_error(response, 422, "undefined/validationError")["message"]
    assert "c8y_P" in message
    assert row_counts() == counts
    assert stored(world) == before


@pytest.mark.parametrize(
    "value",
    [str(2**64 - 1), str(-(2**63)), "9.2e18", "-9.2e18", "1.5", "1e-300", "0.0"],
)
def test_numbers_at_the_ends_of_the_range_are_stored_and_read_back(
    admin_api: APIClient, world: World, value: str
) -> None:
    expected = json.loads(value)

    created = send(admin_api, "POST", MOS, {"name": "edge", "c8y_P": HOLE}, value)
    operation = send(
        admin_api, "POST", OPERATIONS, {"deviceId": str(world.device.pk), "c8y_P": HOLE}, value
    )

    assert created.status_code == 201, created.content[:300]
    assert operation.status_code == 201, operation.content[:300]
    assert get(admin_api, f"{MOS}/{created.json()['id']}")["c8y_P"] == expected
    listed = get(admin_api, f"{OPERATIONS}?deviceId={world.device.pk}&pageSize=100")
    assert [op["c8y_P"] for op in listed["operations"] if "c8y_P" in op] == [expected]


def test_nesting_is_allowed_up_to_the_limit_with_the_body_as_level_one(
    admin_api: APIClient, world: World
) -> None:
    # The body is level 1 and c8y_P's own object level 2.
    deepest = nested(MAX_JSON_DEPTH - 1)
    too_deep = nested(MAX_JSON_DEPTH)

    accepted = send(admin_api, "POST", MOS, {"name": "deep", "c8y_P": HOLE}, deepest)
    refused = send(admin_api, "POST", MOS, {"name": "deeper", "c8y_P": HOLE}, too_deep)

    assert accepted.status_code == 201, accepted.content[:300]
    assert get(admin_api, f"{MOS}/{accepted.json()['id']}")["c8y_P"] == json.loads(deepest)
    message = assert_error(refused, 422)["message"]
    assert f"at most {MAX_JSON_DEPTH} levels" in message
    assert not ManagedObject.objects.filter(name="deeper").exists()


def test_arrays_count_as_levels_too(admin_api: APIClient) -> None:
    arrays = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH  # levels 2 to 101

    response = send(admin_api, "POST", MOS, {"name": "arrays", "c8y_P": HOLE}, arrays)

    assert f"at most {MAX_JSON_DEPTH} levels" in assert_error(response, 422)["message"]
    assert not ManagedObject.objects.filter(name="arrays").exists()


def test_a_nul_is_still_refused_with_its_place_named(admin_api: APIClient) -> None:
    response = send(admin_api, "POST", MOS, {"name": "x", "c8y_P": {"list": ["ok", "a\x00b"]}})

    message = assert_error(response, 422)["message"]
    assert "c8y_P.list[1]" in message
    assert "NUL" in message


def test_a_large_ordinary_body_is_accepted(admin_api: APIClient) -> None:
    """A body that the raw-byte tests cannot clear (many brackets, long digit runs), near the 1 MB
    limit, is walked and accepted (its cost is for a bench, not a timed test)."""
    values = [{"serial": 10**18 + n, "tags": ["a", "b"]} for n in range(12_000)]

    response = send(admin_api, "POST", MOS, {"name": "big", "c8y_Inventory": values})

    assert response.status_code == 201, response.content[:300]


# --- 1b. rows stored before (or around) the checks still read back --------------------------------

# Guards against the seconds-long answers these inputs caused, not benchmarks: loose enough for
# a loaded CI machine (a bench measures speed, bench/).
GUARD_SECONDS = 5.0

BIG = 10**20
DEEP_VALUE = json.loads(nested(300))  # deeper than orjson writes (254)


def _store_directly(world: World) -> None:
    """What the API stored before it checked: written with the ORM, bypassing every check."""
    fragments = {"c8y_IsDevice": {}, "c8y_Big": BIG, "c8y_Deep": DEEP_VALUE, "c8y_Neg": -(10**30)}
    ManagedObject.objects.filter(pk=world.device.pk).update(fragments=fragments)
    Operation.objects.filter(pk=world.operation.pk).update(fragments={"c8y_Big": BIG})
    BulkOperation.objects.filter(pk=world.bulk.pk).update(
        operation_prototype={"c8y_Big": BIG}, fragments={"c8y_Deep": DEEP_VALUE}
    )


def test_stored_big_integers_and_deep_documents_read_back_everywhere(
    admin_api: APIClient, world: World
) -> None:
    _store_directly(world)
    device, agent = world.device.pk, world.agent.pk

    one = get(admin_api, f"{MOS}/{device}")
    page = get(admin_api, f"{MOS}?pageSize=100")
    queried = get(admin_api, f"{MOS}?query=has(c8y_Big)")
    children = get(admin_api, f"{MOS}/{agent}/childDevices")
    assets = get(admin_api, f"{MOS}/{world.group.pk}/childAssets")
    operation = get(admin_api, f"{OPERATIONS}/{world.operation.pk}")
    poll = get(admin_api, f"{OPERATIONS}?agentId={agent}&status=PENDING")
    bulk = get(admin_api, f"{BULK}/{world.bulk.pk}")
    bulks = get(admin_api, BULK)

    assert (one["c8y_Big"], one["c8y_Neg"], one["c8y_Deep"]) == (BIG, -(10**30), DEEP_VALUE)
    assert [mo["c8y_Big"] for mo in page["managedObjects"] if mo["id"] == str(device)] == [BIG]
    assert [mo["id"] for mo in queried["managedObjects"]] == [str(device)]
    assert children["references"][0]["managedObject"]["c8y_Big"] == BIG
    assert assets["references"][0]["managedObject"]["c8y_Deep"] == DEEP_VALUE
    assert operation["c8y_Big"] == BIG
    assert [op["c8y_Big"] for op in poll["operations"]] == [BIG]
    assert (bulk["operationPrototype"], bulk["c8y_Deep"]) == ({"c8y_Big": BIG}, DEEP_VALUE)
    assert [b["operationPrototype"] for b in bulks["bulkOperations"]] == [{"c8y_Big": BIG}]


def test_an_update_of_a_stored_big_integer_row_answers_and_publishes_its_event(
    admin_api: APIClient,
    world: World,
    subscriber: Subscribe,
    django_capture_on_commit_callbacks: Callable[..., Any],
) -> None:
    _store_directly(world)
    watcher = subscriber(f"/managedobjects/{world.device.pk}")

    with django_capture_on_commit_callbacks(execute=True):
        response = send(admin_api, "PUT", f"{MOS}/{world.device.pk}", {"c8y_Other": 1})

    assert response.status_code == 200, response.content[:300]
    assert response.json()["c8y_Big"] == BIG
    (message,) = watcher.received()
    assert message["data"]["realtimeAction"] == "UPDATE"
    assert message["data"]["data"]["c8y_Big"] == BIG  # orjson reads it back as a float
    assert message["data"]["data"]["c8y_Deep"] == DEEP_VALUE


def test_a_document_deeper_than_pythons_json_reads_back(admin_api: APIClient, world: World) -> None:
    """Nested 1,010 levels: the API's parser (orjson, 1,024 levels) used to take it, but Django's
    JSONField reads with Python's json module, which stops near 1,000 (RecursionError)."""
    depth = 1010
    document = '{"c8y_IsDevice": {}, "c8y_Deep": ' + nested(depth) + "}"
    cast = "::jsonb" if connection.vendor == "postgresql" else ""
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {ManagedObject._meta.db_table} SET fragments = %s{cast} WHERE id = %s",  # noqa: S608
            [document, world.device.pk],
        )

    one = admin_api.get(f"{MOS}/{world.device.pk}")
    children = admin_api.get(f"{MOS}/{world.agent.pk}/childDevices")

    assert (one.status_code, children.status_code) == (200, 200)
    # Read with orjson: the test's own json module stops near 1,000 levels too.
    value, levels = orjson.loads(one.content)["c8y_Deep"], 0
    while isinstance(value, dict):
        value, levels = value["a"], levels + 1
    assert (levels, value) == (depth, 1)
    child = orjson.loads(children.content)["references"][0]["managedObject"]
    assert child["id"] == str(world.device.pk)


# --- 2. date-times outside years 1-9999 in UTC ------------------------------------------------------

OUT_OF_RANGE = ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-14:00"]


@pytest.mark.parametrize("start", OUT_OF_RANGE)
def test_a_bulk_start_outside_the_years_is_422_on_create_and_update(
    admin_api: APIClient, world: World, row_counts: Callable[[], dict[str, int]], start: str
) -> None:
    counts, before = row_counts(), stored(world)

    created = send(admin_api, "POST", BULK, _bulk_body(world, startDate=start))
    updated = send(admin_api, "PUT", f"{BULK}/{world.bulk.pk}", {"startDate": start})

    for response in (created, updated):
        message = assert_error(response, 422)["message"]
        assert "startDate" in message
        assert "years 1 to 9999" in message
    assert row_counts() == counts
    assert stored(world) == before
    get(admin_api, BULK)  # the list still reads
    bulk_services.bulk_operations_advance()  # and the ramp still runs


@pytest.mark.parametrize("start", ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999Z"])
def test_a_bulk_start_at_the_ends_of_the_years_is_stored_and_read_back(
    admin_api: APIClient, world: World, start: str
) -> None:
    response = send(admin_api, "POST", BULK, _bulk_body(world, startDate=start))

    assert response.status_code == 201, response.content[:300]
    assert get(admin_api, f"{BULK}/{response.json()['id']}")["startDate"] == start.replace(
        "00Z", "00.000Z"
    )
    bulk_services.bulk_operations_advance()
    assert len(get(admin_api, f"{BULK}?pageSize=10")["bulkOperations"]) == 2


@pytest.mark.parametrize("value", OUT_OF_RANGE)
@pytest.mark.parametrize(
    "path",
    [
        f"{OPERATIONS}?dateFrom={{}}",
        f"{OPERATIONS}?dateTo={{}}",
        f"{BULK}?dateFrom={{}}",
        f"{BULK}?dateTo={{}}",
        f"{MOS}?query=creationTime gt '{{}}'",
        f"{MOS}?query=lastUpdated.date le '{{}}'",
    ],
)
def test_a_date_parameter_outside_the_years_is_422(
    admin_api: APIClient, world: World, path: str, value: str
) -> None:
    response = admin_api.get(path.format(value.replace("+", "%2B")))

    assert "years 1 to 9999" in assert_error(response, 422)["message"]


def test_a_date_parameter_at_the_first_instant_is_accepted(
    admin_api: APIClient, world: World
) -> None:
    listed = get(admin_api, f"{OPERATIONS}?dateFrom=0001-01-01T00:00:00Z")

    assert [op["id"] for op in listed["operations"]] == [str(world.operation.pk)]


# --- 4. pages beyond the database's 64-bit offsets ------------------------------------------------

COLLECTIONS = [
    lambda w: MOS,
    lambda w: f"{MOS}?query=has(c8y_IsDevice)",
    lambda w: f"{MOS}/{w.agent.pk}/childDevices",
    lambda w: f"{MOS}/{w.group.pk}/childAssets",
    lambda w: f"{MOS}/{w.device.pk}/deviceParents",
    lambda w: f"/identity/globalIds/{w.device.pk}/externalIds",
    lambda w: OPERATIONS,
    lambda w: BULK,
]
COLLECTION_IDS = [
    "managedObjects",
    "query",
    "childDevices",
    "childAssets",
    "deviceParents",
    "externalIds",
    "operations",
    "bulkoperations",
]


def _with(path: str, params: str) -> str:
    return f"{path}{'&' if '?' in path else '?'}{params}"


@pytest.mark.parametrize(
    "params",
    [
        f"currentPage={2**63 - 1}",
        f"currentPage={2**63}",
        f"currentPage={10**30}",
        f"pageSize={MAX_PAGE_SIZE}&currentPage={MAX_ROW_NUMBER // MAX_PAGE_SIZE + 1}",
    ],
)
@pytest.mark.parametrize("collection", COLLECTIONS, ids=COLLECTION_IDS)
def test_a_page_beyond_64_bit_offsets_is_a_fast_422(
    admin_api: APIClient, world: World, collection: Callable[[World], str], params: str
) -> None:
    started = time.monotonic()

    response = admin_api.get(_with(collection(world), params))

    assert "currentPage" in assert_error(response, 422)["message"]
    assert time.monotonic() - started < GUARD_SECONDS


@pytest.mark.parametrize("collection", COLLECTIONS, ids=COLLECTION_IDS)
def test_the_last_page_within_64_bit_offsets_is_empty(
    admin_api: APIClient, world: World, collection: Callable[[World], str]
) -> None:
    page = MAX_ROW_NUMBER // MAX_PAGE_SIZE

    body = get(admin_api, _with(collection(world), f"pageSize={MAX_PAGE_SIZE}&currentPage={page}"))

    items = [value for key, value in body.items() if isinstance(value, list)]
    assert items == [[]]
    assert body["statistics"]["currentPage"] == page


# --- 5. strings longer than their columns ---------------------------------------------------------

LONG = "x" * 100_000


@pytest.mark.parametrize(("key", "limit"), [("name", 1024), ("type", 512), ("owner", 150)])
@pytest.mark.parametrize("how", ["create", "update", "child create"])
def test_an_over_long_managed_object_column_is_422_naming_field_and_limit(
    admin_api: APIClient,
    world: World,
    row_counts: Callable[[], dict[str, int]],
    how: str,
    key: str,
    limit: int,
) -> None:
    method, path = {
        "create": ("POST", MOS),
        "update": ("PUT", f"{MOS}/{world.device.pk}"),
        "child create": ("POST", f"{MOS}/{world.agent.pk}/childDevices"),
    }[how]
    counts, before = row_counts(), stored(world)

    response = send(admin_api, method, path, {"c8y_IsDevice": {}, key: LONG})

    message = assert_error(response, 422, "undefined/validationError")["message"]
    assert f"Invalid value for {key}: at most {limit} characters" in message
    assert row_counts() == counts
    assert stored(world) == before


@pytest.mark.parametrize(("key", "limit"), [("name", 1024), ("type", 512), ("owner", 150)])
def test_a_managed_object_column_at_its_limit_is_stored(
    admin_api: APIClient, key: str, limit: int
) -> None:
    value = "é" * limit  # characters, not bytes

    response = send(admin_api, "POST", MOS, {key: value})

    assert response.status_code == 201, response.content[:300]
    assert get(admin_api, f"{MOS}/{response.json()['id']}")[key] == value


@pytest.mark.parametrize(
    ("body", "field", "limit"),
    [
        ({"type": LONG, "externalId": "S-2"}, "type", 512),
        ({"type": "c8y_Serial", "externalId": LONG}, "externalId", 1024),
    ],
)
def test_an_over_long_external_id_is_422_naming_field_and_limit(
    admin_api: APIClient,
    world: World,
    row_counts: Callable[[], dict[str, int]],
    body: dict[str, str],
    field: str,
    limit: int,
) -> None:
    counts = row_counts()

    response = send(admin_api, "POST", f"/identity/globalIds/{world.device.pk}/externalIds", body)

    message = assert_error(response, 422)["message"]
    assert f"Invalid value for {field}: at most {limit} characters" in message
    assert row_counts() == counts


def test_an_external_id_at_its_limits_is_stored(admin_api: APIClient, world: World) -> None:
    body = {"type": "t" * 512, "externalId": "e" * 1024}

    response = send(admin_api, "POST", f"/identity/globalIds/{world.device.pk}/externalIds", body)

    assert response.status_code == 201, response.content[:300]
    assert ExternalId.objects.filter(type="t" * 512, external_id="e" * 1024).exists()


def test_a_long_operation_failure_reason_is_no_column_limit(
    admin_api: APIClient, world: World
) -> None:
    """failureReason is unbounded text: accepted whole (operations have no bounded input)."""
    response = send(
        admin_api,
        "PUT",
        f"{OPERATIONS}/{world.operation.pk}",
        {"status": "FAILED", "failureReason": LONG},
    )

    assert response.status_code == 200, response.content[:300]
    assert get(admin_api, f"{OPERATIONS}/{world.operation.pk}")["failureReason"] == LONG


def test_an_over_long_username_is_refused_by_the_service_and_createuser(
    row_counts: Callable[[], dict[str, int]],
) -> None:
    counts = row_counts()

    with pytest.raises(ValidationFailed, match="username: at most 150 characters"):
        user_upsert(username="u" * 151, password="pw")
    with pytest.raises(CommandError, match="username: at most 150 characters"):
        call_command("createuser", "u" * 151, "--password", "pw")

    assert row_counts() == counts
    assert user_upsert(username="u" * 150, password="pw").username == "u" * 150


# --- the admin stores nothing the API refuses -----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"c8y_P": 1e20}', "outside the range"),
        ('{"c8y_P": 100000000000000000000}', "outside the range"),
        ('{"c8y_P": -1e19}', "outside the range"),
        ('{"c8y_P": 1e400}', "outside the range"),  # Python's json reads it as infinity
        ('{"c8y_P": ' + nested(150) + "}", "levels deep"),
        ('{"c8y_P": ' + nested(1_100) + "}", "Enter valid JSON"),  # past Python's json recursion
    ],
    ids=["1e20", "10**20", "-1e19", "1e400", "150 levels", "1,100 levels"],
)
def test_the_admin_fragments_field_refuses_what_the_api_refuses(
    client: Any, row_counts: Callable[[], dict[str, int]], text: str, reason: str
) -> None:
    from tests.inventory.test_admin import change_url, form_data

    client.force_login(user_upsert(username="root", password="x", is_superuser=True))
    device = inventory_services.managed_object_create(
        owner="admin", data={"name": "Device", "c8y_IsDevice": {}}
    )
    data = form_data(client, change_url(device))
    data["fragments"] = text
    counts = row_counts()

    response = client.post(change_url(device), data)

    assert response.status_code == 200
    errors = " ".join(response.context["adminform"].form.errors["fragments"])
    assert reason in errors
    assert row_counts() == counts
    assert ManagedObject.objects.get(pk=device.pk).fragments == {"c8y_IsDevice": {}}
