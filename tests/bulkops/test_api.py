"""The bulk-operation REST API (bulkoperations.md §1, §2, §6–§11, auth.md bulk roles)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from bulkops import services
from bulkops.models import BulkOperation
from devicecontrol.models import Operation
from deviceplatform.api.dates import format_datetime
from tests.bulkops.conftest import (
    BULK,
    PROTOTYPE,
    T0,
    Fleet,
    at,
    bulk_data,
    children,
    create_bulk,
    get_bulk,
    make_device,
    make_group,
    reload,
)
from tests.devicecontrol.conftest import call
from tests.factories import Clients, ManagedObjectFactory
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db

BULK_TYPE = "application/vnd.com.nsn.cumulocity.bulkoperation+json"
BULK_COLLECTION_TYPE = "application/vnd.com.nsn.cumulocity.bulkoperationcollection+json"
PAST = "2020-01-01T00:00:00.000Z"
PROGRESS_KEYS = {"pending", "failed", "executing", "successful", "all"}


def post(client: Any, body: Any, **kwargs: Any) -> Any:
    return call(client, "POST", BULK, body, **kwargs)


def create_via_api(bapi: Clients, body: dict[str, Any]) -> dict[str, Any]:
    response = post(bapi["bulk_admin"], body, accept=BULK_TYPE)
    assert response.status_code == 201, response.content[:500]
    return response.json()


def child_ops_via_api(bapi: Clients, pk: object) -> list[dict[str, Any]]:
    response = call(
        bapi["inv_admin"], "GET", f"/devicecontrol/operations?bulkOperationId={pk}&pageSize=100"
    )
    assert response.status_code == 200
    return response.json()["operations"]


def tick(bulk_id: object, seconds: float) -> None:
    """The beat task at effectiveStart + seconds."""
    start = BulkOperation.objects.get(pk=int(bulk_id)).effective_start
    services.bulk_operations_advance(now=start + timedelta(seconds=seconds))


def set_status(operation: Operation | dict[str, Any], status: str, bapi: Clients) -> None:
    pk = operation["id"] if isinstance(operation, dict) else operation.pk
    response = call(bapi["inv_admin"], "PUT", f"/devicecontrol/operations/{pk}", {"status": status})
    assert response.status_code == 200, response.content[:500]


# --- §11 checklist -----------------------------------------------------------------------------


def test_checklist_group_of_three_ramp_one_second(bapi: Clients, fleet: Fleet) -> None:
    body = create_via_api(bapi, bulk_data(fleet.group, startDate=PAST, creationRamp=1))
    assert (body["status"], body["generalStatus"]) == ("ACTIVE", "SCHEDULED")
    assert body["progress"] == {
        "pending": 0,
        "failed": 0,
        "executing": 0,
        "successful": 0,
        "all": 3,
    }
    pk = body["id"]
    assert child_ops_via_api(bapi, pk) == []
    tick(pk, -0.5)
    assert child_ops_via_api(bapi, pk) == []
    for k in range(3):
        tick(pk, k)
        ops = child_ops_via_api(bapi, pk)
        assert [op["deviceId"] for op in ops] == [str(pk_) for pk_ in fleet.device_ids[: k + 1]]
        state = get_bulk(bapi["bulk_reader"], pk)
        if k < 2:
            assert (state["status"], state["generalStatus"]) == ("IN_PROGRESS", "EXECUTING")
    assert all(op["bulkOperationId"] == pk for op in ops)
    assert all(op["status"] == "PENDING" for op in ops)
    assert all(op["c8y_Restart"] == {} for op in ops)
    start = BulkOperation.objects.get(pk=int(pk)).effective_start
    assert [op["creationTime"] for op in ops] == [
        format_datetime(start + timedelta(seconds=k)) for k in range(3)
    ]
    state = get_bulk(bapi["bulk_reader"], pk)
    assert (state["status"], state["generalStatus"]) == ("COMPLETED", "EXECUTING")
    assert state["progress"] == {
        "pending": 3,
        "failed": 0,
        "executing": 0,
        "successful": 0,
        "all": 3,
    }


def test_checklist_general_status_derivations(bapi: Clients, fleet: Fleet) -> None:
    pk = create_via_api(bapi, bulk_data(fleet.group, startDate=PAST, creationRamp=0))["id"]
    tick(pk, 0)
    first, second, third = child_ops_via_api(bapi, pk)

    def general() -> str:
        return get_bulk(bapi["bulk_reader"], pk)["generalStatus"]

    set_status(first, "EXECUTING", bapi)
    assert general() == "EXECUTING"
    set_status(first, "FAILED", bapi)
    assert general() == "EXECUTING_WITH_ERRORS"  # one failed, others pending
    set_status(second, "SUCCESSFUL", bapi)
    set_status(third, "SUCCESSFUL", bapi)
    assert general() == "FAILED"  # all done, one failure
    set_status(first, "SUCCESSFUL", bapi)
    assert general() == "SUCCESSFUL"
    state = get_bulk(bapi["bulk_reader"], pk)
    assert state["progress"] == {
        "pending": 0,
        "failed": 0,
        "executing": 0,
        "successful": 3,
        "all": 3,
    }


def test_checklist_ramp_in_progress_with_an_error(bapi: Clients, fleet: Fleet) -> None:
    pk = create_via_api(bapi, bulk_data(fleet.group, startDate=PAST, creationRamp=1))["id"]
    tick(pk, 0)
    set_status(child_ops_via_api(bapi, pk)[0], "SUCCESSFUL", bapi)
    assert get_bulk(bapi["bulk_reader"], pk)["generalStatus"] == "EXECUTING"  # targets waiting
    tick(pk, 1)
    set_status(child_ops_via_api(bapi, pk)[1], "FAILED", bapi)
    state = get_bulk(bapi["bulk_reader"], pk)
    assert (state["status"], state["generalStatus"]) == ("IN_PROGRESS", "EXECUTING_WITH_ERRORS")


def test_checklist_failed_parent_targets_only_the_failed_device(
    bapi: Clients, fleet: Fleet, row_counts: Callable[[], dict[str, int]]
) -> None:
    parent = create_via_api(bapi, bulk_data(fleet.group, startDate=PAST, creationRamp=0))["id"]
    tick(parent, 0)
    ops = child_ops_via_api(bapi, parent)
    set_status(ops[1], "FAILED", bapi)
    set_status(ops[0], "SUCCESSFUL", bapi)
    body = bulk_data(fleet.group, startDate=PAST, creationRamp=0)
    del body["groupId"]
    body["failedParentId"] = parent
    rerun = create_via_api(bapi, body)
    assert rerun["failedParentId"] == parent
    assert "groupId" not in rerun
    assert rerun["progress"]["all"] == 1
    tick(rerun["id"], 0)
    assert [op["deviceId"] for op in child_ops_via_api(bapi, rerun["id"])] == [
        str(fleet.device_ids[1])
    ]
    before = row_counts()
    response = post(bapi["bulk_admin"], {**body, "groupId": str(fleet.group.pk)})
    assert_error(response, 422)
    assert row_counts() == before


def test_checklist_delete_while_active(bapi: Clients, fleet: Fleet) -> None:
    pk = create_via_api(bapi, bulk_data(fleet.group, startDate=PAST, creationRamp=0))["id"]
    response = call(bapi["bulk_admin"], "DELETE", f"{BULK}/{pk}")
    assert response.status_code == 204
    assert response.content == b""
    tick(pk, 0)
    tick(pk, 3600)
    assert child_ops_via_api(bapi, pk) == []
    state = get_bulk(bapi["bulk_reader"], pk)
    assert (state["status"], state["generalStatus"]) == ("DELETED", "CANCELED")
    listed = call(bapi["bulk_reader"], "GET", BULK).json()["bulkOperations"]
    assert pk not in [item["id"] for item in listed]
    listed = call(bapi["bulk_reader"], "GET", f"{BULK}?withDeleted=true").json()["bulkOperations"]
    assert pk in [item["id"] for item in listed]
    assert_error(call(bapi["bulk_admin"], "DELETE", f"{BULK}/{pk}"), 422)


def test_checklist_delete_of_completed_is_422(
    bapi: Clients, fleet: Fleet, row_counts: Callable[[], dict[str, int]]
) -> None:
    pk = create_via_api(bapi, bulk_data(fleet.group, startDate=PAST, creationRamp=0))["id"]
    tick(pk, 0)
    bapi.prepare("bulk_admin")
    before = row_counts()
    assert_error(call(bapi["bulk_admin"], "DELETE", f"{BULK}/{pk}"), 422)
    assert row_counts() == before
    assert get_bulk(bapi["bulk_reader"], pk)["status"] == "COMPLETED"


def test_checklist_put_ramp_on_active_reschedules(bapi: Clients, fleet: Fleet) -> None:
    future = format_datetime(T0)
    pk = create_via_api(bapi, bulk_data(fleet.group, startDate=future, creationRamp=1))["id"]
    response = call(
        bapi["bulk_admin"], "PUT", f"{BULK}/{pk}", {"creationRamp": 60}, accept=BULK_TYPE
    )
    assert response.status_code == 200
    assert response.json()["creationRamp"] == 60
    assert response.json()["status"] == "ACTIVE"
    services.bulk_operations_advance(now=at(1))
    assert len(child_ops_via_api(bapi, pk)) == 1
    services.bulk_operations_advance(now=at(59))
    assert len(child_ops_via_api(bapi, pk)) == 1
    services.bulk_operations_advance(now=at(60))
    assert len(child_ops_via_api(bapi, pk)) == 2


def test_checklist_general_status_failed_and_pending_filters(bapi: Clients, fleet: Fleet) -> None:
    failed = create_bulk(fleet.group, creationRamp=0)
    services.bulk_operations_advance(now=T0)
    for operation in children(failed):
        set_status(operation, "FAILED", bapi)
    scheduled = create_bulk(fleet.group, startDate="2099-01-01T00:00:00Z")
    executing = create_bulk(fleet.group, creationRamp=0)
    services.bulk_operations_advance(now=T0)

    def ids(query: str) -> list[str]:
        response = call(bapi["bulk_reader"], "GET", f"{BULK}?{query}&pageSize=100")
        assert response.status_code == 200, response.content[:500]
        return [item["id"] for item in response.json()["bulkOperations"]]

    assert ids("generalStatus=FAILED") == [str(failed.pk)]
    assert ids("generalStatus=PENDING") == [str(scheduled.pk)]
    assert ids("generalStatus=SCHEDULED") == [str(scheduled.pk)]
    assert ids("generalStatus=EXECUTING") == [str(executing.pk)]
    assert ids("generalStatus=FAILED&generalStatus=PENDING") == [
        str(failed.pk),
        str(scheduled.pk),
    ]
    assert ids("generalStatus=FAILED,EXECUTING") == [str(failed.pk), str(executing.pk)]
    assert ids("generalStatus=SUCCESSFUL") == []
    assert_error(call(bapi["bulk_reader"], "GET", f"{BULK}?generalStatus=BOGUS"), 422)
    assert_error(call(bapi["bulk_reader"], "GET", f"{BULK}?generalStatus=FAILED,nope"), 422)
    services.bulk_operation_cancel(bulk_operation_id=scheduled.pk)
    assert ids("generalStatus=CANCELED") == []
    assert ids("generalStatus=CANCELED&withDeleted=true") == [str(scheduled.pk)]


# --- shapes ------------------------------------------------------------------------------------


def test_post_answers_201_with_location_and_empty_body_without_accept(
    bapi: Clients, fleet: Fleet
) -> None:
    response = post(bapi["bulk_admin"], bulk_data(fleet.group, creationRamp=1.5))
    assert response.status_code == 201
    assert response.content == b""
    bulk = BulkOperation.objects.get()
    assert response["Location"] == f"http://testserver{BULK}/{bulk.pk}"
    body = get_bulk(bapi["bulk_reader"], bulk.pk)
    assert body == {
        "id": str(bulk.pk),
        "self": f"http://testserver{BULK}/{bulk.pk}",
        "groupId": str(fleet.group.pk),
        "startDate": "2031-03-01T12:00:00.000Z",
        "creationRamp": 1.5,
        "operationPrototype": PROTOTYPE,
        "status": "ACTIVE",
        "generalStatus": "SCHEDULED",
        "progress": {"pending": 0, "failed": 0, "executing": 0, "successful": 0, "all": 3},
    }
    assert isinstance(body["creationRamp"], float)


def test_post_with_accept_returns_the_representation(bapi: Clients, fleet: Fleet) -> None:
    response = post(
        bapi["bulk_admin"],
        {**bulk_data(fleet.group, creationRamp=15.0), "id": "1", "status": "COMPLETED"},
        accept=BULK_TYPE,
    )
    assert response.status_code == 201
    assert response["Content-Type"].startswith(BULK_TYPE)
    body = response.json()
    assert response["Location"] == body["self"]
    assert body["id"] != "1"
    assert isinstance(body["id"], str)
    assert body["creationRamp"] == 15
    assert type(body["creationRamp"]) is int
    assert isinstance(body["groupId"], str)
    assert body["status"] == "ACTIVE"
    assert set(body["progress"]) == PROGRESS_KEYS
    assert all(type(value) is int for value in body["progress"].values())


def test_get_list_and_detail_media_types(bapi: Clients, fleet: Fleet) -> None:
    bulk = create_bulk(fleet.group)
    response = call(bapi["bulk_reader"], "GET", f"{BULK}/{bulk.pk}", accept=BULK_TYPE)
    assert response.status_code == 200
    assert response["Content-Type"].startswith(BULK_TYPE)
    response = call(bapi["bulk_reader"], "GET", BULK, accept=BULK_COLLECTION_TYPE)
    assert response.status_code == 200
    assert response["Content-Type"].startswith(BULK_COLLECTION_TYPE)
    assert [item["id"] for item in response.json()["bulkOperations"]] == [str(bulk.pk)]


def test_put_shapes(bapi: Clients, fleet: Fleet) -> None:
    bulk = create_bulk(fleet.group)
    response = call(bapi["bulk_admin"], "PUT", f"{BULK}/{bulk.pk}", {"creationRamp": 2.5})
    assert response.status_code == 200
    assert response.content == b""
    response = call(
        bapi["bulk_admin"],
        "PUT",
        f"{BULK}/{bulk.pk}",
        {
            "operationPrototype": {"c8y_Firmware": {"version": "3"}},
            "startDate": "2031-04-01T00:00:00",
            "progress": {"all": 99},
            "status": "COMPLETED",
        },
        accept=BULK_TYPE,
    )
    assert response.status_code == 200
    body = response.json()
    assert body["operationPrototype"] == {"c8y_Firmware": {"version": "3"}}
    assert body["startDate"] == "2031-04-01T00:00:00.000Z"
    assert body["creationRamp"] == 2.5
    assert body["status"] == "ACTIVE"
    assert body["progress"]["all"] == 3
    assert body["id"] == str(bulk.pk)


def test_put_on_in_progress_via_api_keeps_the_id(bapi: Clients, fleet: Fleet) -> None:
    bulk = create_bulk(fleet.group, creationRamp=1)
    services.bulk_operations_advance(now=T0)
    response = call(
        bapi["bulk_admin"], "PUT", f"{BULK}/{bulk.pk}", {"creationRamp": 0}, accept=BULK_TYPE
    )
    body = response.json()
    assert (body["id"], body["status"], body["creationRamp"]) == (str(bulk.pk), "IN_PROGRESS", 0)
    services.bulk_operations_advance(now=reload(bulk).effective_start)
    assert len(children(bulk)) == 3
    assert get_bulk(bapi["bulk_reader"], bulk.pk)["status"] == "COMPLETED"


@pytest.mark.parametrize("status", ["COMPLETED", "DELETED"])
def test_put_on_finished_is_422_and_writes_nothing(
    bapi: Clients, fleet: Fleet, row_counts: Callable[[], dict[str, int]], status: str
) -> None:
    bulk = create_bulk(fleet.group, creationRamp=0)
    if status == "COMPLETED":
        services.bulk_operations_advance(now=T0)
    else:
        services.bulk_operation_cancel(bulk_operation_id=bulk.pk)
    bapi.prepare("bulk_admin")
    before, row = row_counts(), reload(bulk)
    response = call(bapi["bulk_admin"], "PUT", f"{BULK}/{bulk.pk}", {"creationRamp": 5})
    assert_error(response, 422)
    assert row_counts() == before
    after = reload(bulk)
    assert (after.status, after.creation_ramp, after.last_updated) == (
        status,
        row.creation_ramp,
        row.last_updated,
    )


def test_extra_fragments_are_stored_and_returned(bapi: Clients, fleet: Fleet) -> None:
    body = create_via_api(bapi, {**bulk_data(fleet.group), "note": {"by": "ops"}})
    assert body["note"] == {"by": "ops"}
    assert get_bulk(bapi["bulk_reader"], body["id"])["note"] == {"by": "ops"}


# --- list ----------------------------------------------------------------------------------------


def test_list_paging_totals_and_order(bapi: Clients, fleet: Fleet) -> None:
    made = [create_bulk(fleet.group) for _ in range(7)]
    services.bulk_operation_cancel(bulk_operation_id=made[3].pk)
    expected = [str(b.pk) for b in made if b.pk != made[3].pk]
    client = bapi["bulk_reader"]
    response = call(client, "GET", f"{BULK}?pageSize=4&withTotalPages=true&withTotalElements=true")
    page = response.json()
    assert [item["id"] for item in page["bulkOperations"]] == expected[:4]
    assert page["statistics"] == {
        "pageSize": 4,
        "currentPage": 1,
        "totalPages": 2,
        "totalElements": 6,
    }
    assert "prev" not in page
    assert "currentPage=2" in page["next"]
    page = call(client, "GET", f"{BULK}?pageSize=4&currentPage=2").json()
    assert [item["id"] for item in page["bulkOperations"]] == expected[4:]
    assert "totalPages" not in page["statistics"]
    assert "currentPage=1" in page["prev"]
    page = call(client, "GET", f"{BULK}?pageSize=4&currentPage=3").json()
    assert page["bulkOperations"] == []
    page = call(client, "GET", f"{BULK}?withDeleted=true&pageSize=1&withTotalPages=true").json()
    assert page["statistics"]["totalPages"] == 7
    page = call(client, "GET", BULK).json()
    assert page["statistics"]["pageSize"] == 5
    assert_error(call(client, "GET", f"{BULK}?pageSize=0"), 422)
    assert_error(call(client, "GET", f"{BULK}?withDeleted=maybe"), 422)


def test_list_date_filters_on_start_date(bapi: Clients, fleet: Fleet) -> None:
    early = create_bulk(fleet.group, startDate="2031-05-01T00:00:00Z")
    middle = create_bulk(fleet.group, startDate="2031-06-01T00:00:00Z")
    late = create_bulk(fleet.group, startDate="2031-07-01T00:00:00Z")

    def ids(query: str) -> list[str]:
        response = call(bapi["bulk_reader"], "GET", f"{BULK}?{query}")
        assert response.status_code == 200, response.content[:500]
        return [item["id"] for item in response.json()["bulkOperations"]]

    assert ids("dateFrom=2031-06-01T00:00:00Z") == [str(middle.pk), str(late.pk)]
    assert ids("dateTo=2031-06-01T00:00:00Z") == [str(early.pk), str(middle.pk)]
    assert ids("dateFrom=2031-05-02T00:00:00Z&dateTo=2031-06-30T00:00:00Z") == [str(middle.pk)]
    assert_error(call(bapi["bulk_reader"], "GET", f"{BULK}?dateFrom=yesterday"), 422)


# --- roles ---------------------------------------------------------------------------------------

ENDPOINTS = [
    ("GET", "list"),
    ("POST", "list"),
    ("GET", "item"),
    ("PUT", "item"),
    ("DELETE", "item"),
]
EXPECTED = {
    "bulk_admin": {"GET": 200, "POST": 201, "PUT": 200, "DELETE": 204},
    "bulk_reader": {"GET": 200, "POST": 403, "PUT": 403, "DELETE": 403},
    "alice": {"GET": 403, "POST": 403, "PUT": 403, "DELETE": 403},  # owns the group
    "inv_admin": {"GET": 403, "POST": 403, "PUT": 403, "DELETE": 403},
    "nobody": {"GET": 403, "POST": 403, "PUT": 403, "DELETE": 403},
}


@pytest.mark.parametrize(("method", "target"), ENDPOINTS)
@pytest.mark.parametrize("who", [*EXPECTED, "anon", "bad_password", "foreign_tenant"])
def test_role_matrix(
    bapi: Clients,
    fleet: Fleet,
    row_counts: Callable[[], dict[str, int]],
    method: str,
    target: str,
    who: str,
) -> None:
    assert fleet.group.owner == "alice"
    bulk = create_bulk(fleet.group)
    path = BULK if target == "list" else f"{BULK}/{bulk.pk}"
    body = bulk_data(fleet.group) if method == "POST" else {"creationRamp": 3}
    client = bapi[who]
    if who in EXPECTED:
        bapi.prepare(who)
    before = row_counts()
    response = call(client, method, path, None if method in ("GET", "DELETE") else body)
    expected = EXPECTED.get(who, {}).get(method, 401)
    if expected >= 400:
        assert_error(
            response, expected, "security/Forbidden" if expected == 403 else "security/Unauthorized"
        )
        assert row_counts() == before
        assert reload(bulk).creation_ramp == 1
    else:
        assert response.status_code == expected, response.content[:500]


@pytest.mark.parametrize(
    ("method", "who"),
    [("GET", "bulk_reader"), ("PUT", "bulk_admin"), ("DELETE", "bulk_admin")],
)
@pytest.mark.parametrize("pk", ["987654321", "abc"])
def test_unknown_id_is_404(
    bapi: Clients, row_counts: Callable[[], dict[str, int]], method: str, who: str, pk: str
) -> None:
    client = bapi[who]
    before = row_counts()
    response = call(
        client, method, f"{BULK}/{pk}", {"creationRamp": 1} if method == "PUT" else None
    )
    body = assert_error(response, 404, "devicecontrol/Not Found")
    assert "Finding bulk operation from database failed" in body["message"]
    assert row_counts() == before


# --- bad input -----------------------------------------------------------------------------------


def _without(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key not in keys}


BAD_BODIES: dict[str, Callable[[dict[str, Any], dict[str, int]], Any]] = {
    "both selectors": lambda d, ids: {**d, "failedParentId": str(ids["bulk"])},
    "both selectors via alias": lambda d, ids: {**d, "failedBulkOperationId": str(ids["bulk"])},
    "neither selector": lambda d, ids: _without(d, "groupId"),
    "unknown group": lambda d, ids: {**d, "groupId": "987654321"},
    "non-numeric group": lambda d, ids: {**d, "groupId": "abc"},
    "device as group": lambda d, ids: {**d, "groupId": str(ids["device"])},
    "plain object as group": lambda d, ids: {**d, "groupId": str(ids["plain"])},
    "unknown failedParentId": lambda d, ids: {
        **_without(d, "groupId"),
        "failedParentId": "987654321",
    },
    "group id as failedParentId": lambda d, ids: {
        **_without(d, "groupId"),
        "failedParentId": str(ids["group"]),
    },
    "negative ramp": lambda d, ids: {**d, "creationRamp": -1},
    "non-numeric ramp": lambda d, ids: {**d, "creationRamp": "fast"},
    "bool ramp": lambda d, ids: {**d, "creationRamp": True},
    "null ramp": lambda d, ids: {**d, "creationRamp": None},
    "object ramp": lambda d, ids: {**d, "creationRamp": {}},
    "nan ramp": lambda d, ids: {**d, "creationRamp": "NaN"},
    "missing ramp": lambda d, ids: _without(d, "creationRamp"),
    "bad startDate": lambda d, ids: {**d, "startDate": "tomorrow"},
    "numeric startDate": lambda d, ids: {**d, "startDate": 1714000000},
    "missing startDate": lambda d, ids: _without(d, "startDate"),
    "missing prototype": lambda d, ids: _without(d, "operationPrototype"),
    "null prototype": lambda d, ids: {**d, "operationPrototype": None},
    "list prototype": lambda d, ids: {**d, "operationPrototype": [{"c8y_Restart": {}}]},
    "string prototype": lambda d, ids: {**d, "operationPrototype": "c8y_Restart"},
    "bad fragment name": lambda d, ids: {**d, "operationPrototype": {"c8y.Restart": {}}},
    "bad fragment name $": lambda d, ids: {**d, "operationPrototype": {"$where": {}}},
    "bad executionTimeout": lambda d, ids: {
        **d,
        "operationPrototype": {"c8y_Restart": {}, "executionTimeout": -5},
    },
}


@pytest.fixture
def bad_ids(bapi: Clients, fleet: Fleet) -> dict[str, int]:
    plain = ManagedObjectFactory(owner="alice", name="Plain")
    bulk = create_bulk(fleet.group)
    bapi.prepare("bulk_admin")
    return {
        "group": fleet.group.pk,
        "device": fleet.devices[0].pk,
        "plain": plain.pk,
        "bulk": bulk.pk,
    }


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_post_bad_input_is_422_and_writes_nothing(
    bapi: Clients,
    fleet: Fleet,
    bad_ids: dict[str, int],
    row_counts: Callable[[], dict[str, int]],
    case: str,
) -> None:
    body = BAD_BODIES[case](bulk_data(fleet.group), bad_ids)
    before = row_counts()
    assert_error(post(bapi["bulk_admin"], body, accept=BULK_TYPE), 422)
    assert row_counts() == before


@pytest.mark.parametrize(
    "case", [c for c in BAD_BODIES if not c.startswith(("missing", "neither"))]
)
def test_put_bad_input_is_422_and_changes_nothing(
    bapi: Clients,
    fleet: Fleet,
    bad_ids: dict[str, int],
    row_counts: Callable[[], dict[str, int]],
    case: str,
) -> None:
    bulk = BulkOperation.objects.get(pk=bad_ids["bulk"])
    body = BAD_BODIES[case](bulk_data(fleet.group), bad_ids)
    before, row = row_counts(), reload(bulk)
    assert_error(call(bapi["bulk_admin"], "PUT", f"{BULK}/{bulk.pk}", body), 422)
    assert row_counts() == before
    after = reload(bulk)
    assert (after.group_id, after.creation_ramp, after.start_date, after.last_updated) == (
        row.group_id,
        row.creation_ramp,
        row.start_date,
        row.last_updated,
    )


def test_missing_fields_name_them(bapi: Clients, fleet: Fleet) -> None:
    bapi.prepare("bulk_admin")
    body = assert_error(post(bapi["bulk_admin"], {}), 422, "undefined/validationError")
    for key in ("startDate", "creationRamp", "operationPrototype", "groupId"):
        assert key in body["message"]


@pytest.mark.parametrize(
    ("raw", "content_type", "status"),
    [
        ("{not json", "application/json", 400),
        (json.dumps({"creationRamp": 1}), "text/plain", 415),
        ("[]", "application/json", 422),
        ('"text"', "application/json", 422),
        ("null", "application/json", 422),
        ("", "application/json", 422),
    ],
)
@pytest.mark.parametrize("method", ["POST", "PUT"])
def test_malformed_bodies(
    bapi: Clients,
    fleet: Fleet,
    row_counts: Callable[[], dict[str, int]],
    raw: str,
    content_type: str,
    status: int,
    method: str,
) -> None:
    bulk = create_bulk(fleet.group)
    bapi.prepare("bulk_admin")
    path = BULK if method == "POST" else f"{BULK}/{bulk.pk}"
    before = row_counts()
    response = call(bapi["bulk_admin"], method, path, raw=raw, content_type=content_type)
    assert_error(response, status)
    assert row_counts() == before


def test_numeric_string_ramp_and_alias_and_offsetless_start_are_accepted(
    bapi: Clients, fleet: Fleet
) -> None:
    body = create_via_api(bapi, bulk_data(fleet.group, creationRamp="2.5"))
    assert body["creationRamp"] == 2.5
    body = create_via_api(bapi, bulk_data(fleet.group, creationRamp="3"))
    assert body["creationRamp"] == 3
    assert type(body["creationRamp"]) is int
    body = create_via_api(bapi, bulk_data(fleet.group, startDate="2031-05-01T22:21:22"))
    assert body["startDate"] == "2031-05-01T22:21:22.000Z"
    alias = _without(bulk_data(fleet.group), "groupId")
    alias["failedBulkOperationId"] = body["id"]
    body = create_via_api(bapi, alias)
    assert body["failedParentId"] == alias["failedBulkOperationId"]
    assert "failedBulkOperationId" not in body
    assert body["progress"]["all"] == 0


def test_prototype_read_only_keys_are_stripped_from_children(bapi: Clients, fleet: Fleet) -> None:
    prototype = {
        "c8y_Restart": {},
        "deviceId": "1",
        "status": "SUCCESSFUL",
        "id": "5",
        "creationTime": "2020-01-01T00:00:00Z",
    }
    bulk = create_bulk(fleet.group, creationRamp=0, operationPrototype=prototype)
    services.bulk_operations_advance(now=T0)
    ops = child_ops_via_api(bapi, bulk.pk)
    assert [op["deviceId"] for op in ops] == [str(pk) for pk in fleet.device_ids]
    assert {op["status"] for op in ops} == {"PENDING"}
    assert all(op["creationTime"] == format_datetime(T0) for op in ops)
    assert all(op["id"] != "5" for op in ops)


def test_group_not_a_group_smart_without_query(bapi: Clients, fleet: Fleet) -> None:
    smart = ManagedObjectFactory(owner="alice", fragments={"c8y_IsDynamicGroup": {}})
    bapi.prepare("bulk_admin")
    assert_error(post(bapi["bulk_admin"], bulk_data(smart)), 422)
    other_agent_device = make_device("Elsewhere")
    group = make_group(other_agent_device)
    body = create_via_api(bapi, bulk_data(group))
    assert body["progress"]["all"] == 1


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
@pytest.mark.parametrize("who", ["nobody", "alice", "inv_admin"])
def test_unknown_id_without_bulk_role_is_404_before_403(
    bapi: Clients, row_counts: Callable[[], dict[str, int]], method: str, who: str
) -> None:
    client = bapi[who]
    before = row_counts()
    body = {"creationRamp": 1} if method == "PUT" else None
    assert_error(call(client, method, f"{BULK}/987654321", body), 404, "devicecontrol/Not Found")
    assert row_counts() == before


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [("{not json", "application/json"), ("[]", "application/json"), ("<a/>", "text/plain")],
)
@pytest.mark.parametrize("who", ["nobody", "bulk_reader"])
def test_bad_body_without_admin_role_is_403(
    bapi: Clients,
    fleet: Fleet,
    row_counts: Callable[[], dict[str, int]],
    raw: str,
    content_type: str,
    who: str,
) -> None:
    bulk = create_bulk(fleet.group)
    client = bapi[who]
    before = row_counts()
    for method, path in [("POST", BULK), ("PUT", f"{BULK}/{bulk.pk}")]:
        response = call(client, method, path, raw=raw, content_type=content_type)
        assert_error(response, 403, "security/Forbidden")
    assert row_counts() == before
