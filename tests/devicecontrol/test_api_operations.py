"""`/devicecontrol` and `/devicecontrol/operations[/{id}]` over HTTP with real Basic credentials
(devicecontrol.md §2-§9 and its §12 checklist; auth.md §4, §5, §7, §8; README §2, §5, §6)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from devicecontrol.delivery import sms_backend
from devicecontrol.models import Operation, OperationStatus
from devicecontrol.services import operation_create, operation_update
from inventory import services as inventory_services
from inventory.models import ManagedObject, Relation
from tests.devicecontrol.conftest import (
    OPERATIONS,
    VENDOR,
    EventCapture,
    Hierarchy,
    add_child_devices,
    call,
    make_device,
    ok_json,
    operation_path,
)
from tests.factories import UNAUTHENTICATED, Clients
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db

BASE = "http://testserver"
OPERATION_TYPE = f"{VENDOR}operation+json"
COLLECTION_TYPE = f"{VENDOR}operationcollection+json"
PLAIN_JSON = "application/json;charset=UTF-8"
T0 = datetime(2024, 5, 14, 10, 0, tzinfo=UTC)
INVALID = "devicecontrol/Invalid Data"
VALIDATION = "undefined/validationError"
ERROR_NAMES = {
    400: "general/badRequest",
    401: "security/Unauthorized",
    403: "security/Forbidden",
    404: "devicecontrol/Not Found",
    405: "general/methodNotAllowed",
    413: "general/requestEntityTooLarge",
    415: "general/unsupportedMediaType",
}


def not_found_message(pk: object) -> str:
    return f"Finding device data from database failed : No operation for gid '{pk}'!"


def no_agent_message(pk: object) -> str:
    return (
        f"Device {pk} is not in the childDevices hierarchy of any agent "
        "(com_cumulocity_model_Agent)"
    )


def listed(client: Any, query: str = "") -> dict[str, Any]:
    response = client.get(f"{OPERATIONS}?{query}" if query else OPERATIONS)
    return ok_json(response)


def listed_ids(client: Any, query: str = "") -> list[int]:
    return [int(op["id"]) for op in listed(client, query)["operations"]]


def create(device: ManagedObject, **data: Any) -> Operation:
    return operation_create(device=device, data=data)


def pks(*operations: Operation) -> list[int]:
    return [op.pk for op in operations]


def snapshot() -> list[dict[str, Any]]:
    return list(Operation.objects.order_by("pk").values())


# --- GET /devicecontrol ----------------------------------------------------------------------------


def test_api_resource(api: Clients) -> None:
    response = api["reader"].get("/devicecontrol", HTTP_ACCEPT=f"{VENDOR}devicecontrolapi+json")

    assert response["Content-Type"] == f"{VENDOR}devicecontrolapi+json;charset=UTF-8;ver=0.9"
    operations = f"{BASE}/devicecontrol/operations"
    assert ok_json(response) == {
        "self": f"{BASE}/devicecontrol",
        "operations": {"self": operations},
        "operationsByStatus": f"{operations}?status={{status}}",
        "operationsByAgentId": f"{operations}?agentId={{agentId}}",
        "operationsByAgentIdAndStatus": f"{operations}?agentId={{agentId}}&status={{status}}",
        "operationsByDeviceId": f"{operations}?deviceId={{deviceId}}",
        "operationsByDeviceIdAndStatus": f"{operations}?deviceId={{deviceId}}&status={{status}}",
    }


@pytest.mark.parametrize(
    ("who", "status"),
    [
        ("admin", 200),
        ("reader", 200),
        ("alice", 403),
        ("nobody", 403),
        *[(who, 401) for who in UNAUTHENTICATED],
    ],
)
def test_api_resource_matrix(api: Clients, who: str, status: int) -> None:
    response = api[who].get("/devicecontrol")

    if status == 200:
        assert ok_json(response)["self"] == f"{BASE}/devicecontrol"
    else:
        assert_error(response, status, ERROR_NAMES[status])


# --- agent resolution (devicecontrol.md §4, §12) --------------------------------------------------


def test_operations_for_agent_child_and_grandchild_are_all_listed_by_agent_id(
    api: Clients, hierarchy: Hierarchy
) -> None:
    created = []
    for device in (hierarchy.agent, hierarchy.device, hierarchy.grandchild):
        response = call(api["admin"], "POST", OPERATIONS, {"deviceId": str(device.pk)})
        assert response.status_code == 201, response.content
        created.append(int(response["Location"].rsplit("/", 1)[1]))

    body = listed(api["admin"], f"agentId={hierarchy.agent.pk}")

    assert [int(op["id"]) for op in body["operations"]] == created
    assert [op["deviceId"] for op in body["operations"]] == [
        str(hierarchy.agent.pk),
        str(hierarchy.device.pk),
        str(hierarchy.grandchild.pk),
    ]
    assert all(op["deviceExternalIDs"]["externalIds"] == [] for op in body["operations"])
    assert listed_ids(api["admin"], f"agentId={hierarchy.device.pk}") == []


def test_device_without_agent_is_422(
    api: Clients,
    hierarchy: Hierarchy,
    row_counts: Callable[[], dict[str, int]],
    capture_events: EventCapture,
) -> None:
    lonely = make_device("Lonely")
    api.prepare("admin")
    before = row_counts()

    with capture_events() as events:
        response = call(api["admin"], "POST", OPERATIONS, {"deviceId": lonely.pk})

    body = assert_error(response, 422, INVALID)
    assert body["message"] == no_agent_message(lonely.pk)
    assert row_counts() == before
    assert events == []


def test_agent_under_an_agent_resolves_to_itself(api: Clients, hierarchy: Hierarchy) -> None:
    inner = make_device("Inner agent", agent=True)
    below = make_device("Below inner")
    add_child_devices(hierarchy.device, inner)
    add_child_devices(inner, below)

    for device in (inner, below):
        assert call(api["admin"], "POST", OPERATIONS, {"deviceId": device.pk}).status_code == 201

    on_inner = Operation.objects.filter(device__in=[inner, below]).order_by("pk")
    assert listed_ids(api["admin"], f"agentId={inner.pk}") == [op.pk for op in on_inner]
    assert listed_ids(api["admin"], f"agentId={hierarchy.agent.pk}") == []


def test_tie_on_one_level_goes_to_the_smallest_agent_id(api: Clients) -> None:
    small = make_device("Agent small", agent=True)
    large = make_device("Agent large", agent=True)
    device = make_device("Shared")
    add_child_devices(large, device)
    add_child_devices(small, device)

    response = call(api["admin"], "POST", OPERATIONS, {"deviceId": device.pk}, accept="*/*")

    operation_id = int(ok_json(response, 201)["id"])
    assert listed_ids(api["admin"], f"agentId={small.pk}") == [operation_id]
    assert listed_ids(api["admin"], f"agentId={large.pk}") == []


def test_the_nearest_agent_wins_over_a_smaller_id_further_up(api: Clients) -> None:
    far = make_device("Far agent", agent=True)
    middle = make_device("Middle")
    near = make_device("Near agent", agent=True)
    device = make_device("Target")
    add_child_devices(far, middle)
    add_child_devices(middle, device)
    add_child_devices(near, device)

    response = call(api["admin"], "POST", OPERATIONS, {"deviceId": device.pk}, accept="*/*")

    assert listed_ids(api["admin"], f"agentId={near.pk}") == [int(ok_json(response, 201)["id"])]


@pytest.mark.parametrize("relation", [Relation.ASSET, Relation.ADDITION])
def test_child_assets_and_additions_do_not_count(
    api: Clients, row_counts: Callable[[], dict[str, int]], relation: Relation
) -> None:
    agent = make_device("Agent", agent=True)
    device = make_device("Asset of agent")
    inventory_services.managed_object_add_children(
        parent=agent, relation=relation, children=[device]
    )
    api.prepare("admin")
    before = row_counts()

    response = call(api["admin"], "POST", OPERATIONS, {"deviceId": device.pk})

    assert assert_error(response, 422, INVALID)["message"] == no_agent_message(device.pk)
    assert row_counts() == before


# --- POST /devicecontrol/operations (§6) ----------------------------------------------------------


def test_post_without_accept_is_201_with_location_and_empty_body(
    api: Clients, hierarchy: Hierarchy
) -> None:
    response = call(
        api["admin"], "POST", OPERATIONS, {"deviceId": str(hierarchy.device.pk), "c8y_Restart": {}}
    )

    assert response.status_code == 201
    assert response.content == b""
    assert response["Content-Length"] == "0"
    operation = Operation.objects.get()
    assert response["Location"] == f"{BASE}/devicecontrol/operations/{operation.pk}"
    assert operation.status == OperationStatus.PENDING
    assert operation.fragments == {"c8y_Restart": {}}


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        (OPERATION_TYPE, f"{OPERATION_TYPE};charset=UTF-8;ver=0.9"),
        (f"{VENDOR}error+json, {VENDOR}Operation+json", f"{OPERATION_TYPE};charset=UTF-8;ver=0.9"),
        ("application/json", PLAIN_JSON),
        ("*/*", PLAIN_JSON),
    ],
)
def test_post_with_accept_returns_the_pending_operation(
    api: Clients, hierarchy: Hierarchy, accept: str, content_type: str
) -> None:
    before = datetime.now(UTC)

    response = call(
        api["admin"],
        "POST",
        OPERATIONS,
        {"deviceId": str(hierarchy.device.pk), "description": "Restart device", "c8y_Restart": {}},
        accept=accept,
    )

    body = ok_json(response, 201)
    assert response["Content-Type"] == content_type
    operation = Operation.objects.get()
    assert body == {
        "id": str(operation.pk),
        "self": f"{BASE}/devicecontrol/operations/{operation.pk}",
        "deviceId": str(hierarchy.device.pk),
        "status": "PENDING",
        "creationTime": body["creationTime"],
        "description": "Restart device",
        "c8y_Restart": {},
    }
    assert response["Location"] == body["self"]
    created = datetime.fromisoformat(body["creationTime"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= created <= datetime.now(UTC)


def test_post_accepts_the_device_id_as_a_number(api: Clients, hierarchy: Hierarchy) -> None:
    response = call(
        api["admin"], "POST", OPERATIONS, {"deviceId": hierarchy.grandchild.pk}, accept="*/*"
    )

    assert ok_json(response, 201)["deviceId"] == str(hierarchy.grandchild.pk)


def test_post_with_only_device_id_and_description(api: Clients, hierarchy: Hierarchy) -> None:
    response = call(
        api["admin"],
        "POST",
        f"{OPERATIONS}/",
        {"deviceId": hierarchy.device.pk, "description": "Just a note"},
        accept="*/*",
    )

    body = ok_json(response, 201)
    assert body["description"] == "Just a note"
    assert set(body) == {"id", "self", "deviceId", "status", "creationTime", "description"}


def test_post_ignores_read_only_keys(api: Clients, hierarchy: Hierarchy) -> None:
    other_agent = make_device("Other agent", agent=True)

    response = call(
        api["admin"],
        "POST",
        OPERATIONS,
        {
            "deviceId": hierarchy.device.pk,
            "id": "1",
            "self": "http://elsewhere/devicecontrol/operations/1",
            "status": "SUCCESSFUL",
            "creationTime": "2001-01-01T00:00:00.000Z",
            "failureReason": "not yet",
            "bulkOperationId": "12",
            "deviceName": "Other name",
            "deviceExternalIDs": {"externalIds": []},
            "agentId": str(other_agent.pk),
            "delivery": {"status": "SENT"},
            "c8y_Restart": {},
        },
        accept="application/json",
    )

    body = ok_json(response, 201)
    operation = Operation.objects.get()
    assert body["id"] == str(operation.pk) != "1"
    assert body["status"] == "PENDING"
    assert not body["creationTime"].startswith("2001")
    assert set(body) == {"id", "self", "deviceId", "status", "creationTime", "c8y_Restart"}
    assert operation.agent_id == hierarchy.agent.pk
    assert listed_ids(api["admin"], f"agentId={other_agent.pk}") == []
    assert listed_ids(api["admin"], f"agentId={hierarchy.agent.pk}") == [operation.pk]
    assert listed_ids(api["admin"], "bulkOperationId=12") == []


def test_post_missing_device_id_is_422_mandatory(
    api: Clients, hierarchy: Hierarchy, row_counts: Callable[[], dict[str, int]]
) -> None:
    api.prepare("admin")
    before = row_counts()

    for body in ({"c8y_Restart": {}}, {"deviceId": None}, {"deviceId": ""}):
        response = call(api["admin"], "POST", OPERATIONS, body)
        error = assert_error(response, 422, VALIDATION)
        assert error["message"] == "Following mandatory fields should be included: deviceId"

    assert row_counts() == before


# --- SMS delivery (§9) ----------------------------------------------------------------------------


class RecordingSmsBackend:
    """A stand-in for an external SMS gateway: records what it is handed."""

    sent: ClassVar[list[dict[str, Any]]] = []

    def send(self, operation: dict[str, Any]) -> None:
        self.sent.append(operation)


@pytest.fixture
def sms_outbox(settings: Any) -> Iterator[list[dict[str, Any]]]:
    settings.OPERATION_SMS_BACKEND = f"{__name__}.RecordingSmsBackend"
    sms_backend.cache_clear()
    RecordingSmsBackend.sent.clear()
    yield RecordingSmsBackend.sent
    RecordingSmsBackend.sent.clear()
    sms_backend.cache_clear()


def test_delivery_type_sms_is_recorded_and_handed_to_the_backend_after_commit(
    api: Clients,
    hierarchy: Hierarchy,
    sms_outbox: list[dict[str, Any]],
    capture_events: EventCapture,
) -> None:
    with capture_events(execute=True) as events:
        response = call(
            api["admin"],
            "POST",
            OPERATIONS,
            {"deviceId": hierarchy.device.pk, "deliveryType": "SMS", "c8y_Restart": {}},
            accept="*/*",
        )
        assert sms_outbox == []  # nothing leaves before the commit

    body = ok_json(response, 201)
    assert body["deliveryType"] == "SMS"
    assert sms_outbox == [{**body, "self": f"/devicecontrol/operations/{body['id']}"}]
    assert [e.action for e in events] == ["CREATE"]  # notifications are unchanged
    assert ok_json(api["admin"].get(operation_path(body["id"])))["deliveryType"] == "SMS"


def test_device_in_sms_mode_gets_its_operations_by_sms(
    api: Clients,
    hierarchy: Hierarchy,
    sms_outbox: list[dict[str, Any]],
    capture_events: EventCapture,
) -> None:
    sms_device = make_device("SMS device", c8y_CommunicationMode={"mode": "SMS"})
    add_child_devices(hierarchy.agent, sms_device)

    with capture_events(execute=True):
        response = call(api["admin"], "POST", OPERATIONS, {"deviceId": sms_device.pk}, accept="*/*")

    body = ok_json(response, 201)
    assert body["deliveryType"] == "SMS"
    assert [op["id"] for op in sms_outbox] == [body["id"]]
    assert sms_outbox[0]["deviceId"] == str(sms_device.pk)


def test_other_operations_are_not_sent_by_sms(
    api: Clients,
    hierarchy: Hierarchy,
    sms_outbox: list[dict[str, Any]],
    capture_events: EventCapture,
) -> None:
    normal = make_device("Normal device", c8y_CommunicationMode={"mode": "NORMAL"})
    add_child_devices(hierarchy.agent, normal)

    with capture_events(execute=True):
        for device in (normal, hierarchy.device):
            body = ok_json(
                call(api["admin"], "POST", OPERATIONS, {"deviceId": device.pk}, accept="*/*"), 201
            )
            assert "deliveryType" not in body

    assert sms_outbox == []


def test_a_refused_sms_operation_is_not_sent(
    api: Clients,
    sms_outbox: list[dict[str, Any]],
    capture_events: EventCapture,
) -> None:
    lonely = make_device("Lonely SMS device", c8y_CommunicationMode={"mode": "SMS"})

    with capture_events(execute=True):
        response = call(
            api["admin"], "POST", OPERATIONS, {"deviceId": lonely.pk, "deliveryType": "SMS"}
        )

    assert_error(response, 422, INVALID)
    assert sms_outbox == []


# --- GET /devicecontrol/operations (§5) -----------------------------------------------------------


def test_list_is_fifo_with_paging_and_exact_totals(api: Clients, hierarchy: Hierarchy) -> None:
    created = [
        create(device, c8y_Step=n)
        for n, device in enumerate([hierarchy.grandchild, hierarchy.device, hierarchy.agent] * 4)
    ]

    first = listed(api["admin"], "withTotalPages=true&withTotalElements=true")
    assert [int(op["id"]) for op in first["operations"]] == pks(*created[:5])
    assert first["statistics"] == {
        "pageSize": 5,
        "currentPage": 1,
        "totalPages": 3,
        "totalElements": 12,
    }
    assert "prev" not in first
    next_query = parse_qs(urlsplit(first["next"]).query)
    assert next_query["currentPage"] == ["2"]
    assert next_query["withTotalPages"] == ["true"]

    pages = [listed_ids(api["admin"], f"pageSize=5&currentPage={page}") for page in (2, 3, 4)]
    assert pages == [pks(*created[5:10]), pks(*created[10:]), []]
    everything = listed(api["admin"], "pageSize=2000")
    assert [int(op["id"]) for op in everything["operations"]] == pks(*created)
    assert [op["c8y_Step"] for op in everything["operations"]] == list(range(12))
    counted = listed(api["admin"], "pageSize=1&withTotalPages=true")
    assert counted["statistics"]["totalPages"] == 12


def test_list_items_carry_device_name_only_when_the_device_has_one(
    api: Clients, hierarchy: Hierarchy
) -> None:
    nameless = make_device(None)
    add_child_devices(hierarchy.agent, nameless)
    named = create(hierarchy.device, description="d")
    unnamed = create(nameless)

    response = api["admin"].get(OPERATIONS, HTTP_ACCEPT=COLLECTION_TYPE)

    body = ok_json(response)
    assert response["Content-Type"] == f"{COLLECTION_TYPE};charset=UTF-8;ver=0.9"
    assert body["self"] == f"{BASE}{OPERATIONS}?pageSize=5&currentPage=1"
    items = body["operations"]
    assert items[0] == {
        "id": str(named.pk),
        "self": f"{BASE}/devicecontrol/operations/{named.pk}",
        "deviceId": str(hierarchy.device.pk),
        "deviceName": "Device D",
        "status": "PENDING",
        "creationTime": items[0]["creationTime"],
        "description": "d",
    }
    assert items[1]["id"] == str(unnamed.pk)
    assert "deviceName" not in items[1]
    assert "deviceExternalIDs" not in items[0]

    single = ok_json(api["admin"].get(operation_path(named.pk)))
    assert "deviceName" not in single

    inventory_services.managed_object_update(
        managed_object_id=hierarchy.device.pk, data={"name": "New"}
    )
    assert listed(api["admin"])["operations"][0]["deviceName"] == "New"


def test_list_by_agent_carries_the_devices_external_ids(api: Clients, hierarchy: Hierarchy) -> None:
    inventory_services.external_id_create(
        managed_object=hierarchy.device, type="c8y_Serial", external_id="raspi-1"
    )
    inventory_services.external_id_create(
        managed_object=hierarchy.device, type="c8y_Imei", external_id="3531"
    )
    on_device = create(hierarchy.device)
    on_grandchild = create(hierarchy.grandchild)

    items = listed(api["admin"], f"agentId={hierarchy.agent.pk}&status=PENDING")["operations"]

    device_self = f"{BASE}/inventory/managedObjects/{hierarchy.device.pk}"
    assert [item["id"] for item in items] == [str(on_device.pk), str(on_grandchild.pk)]
    assert items[0]["deviceExternalIDs"] == {
        "self": f"{BASE}/identity/globalIds/{hierarchy.device.pk}/externalIds",
        "externalIds": [
            {
                "externalId": "raspi-1",
                "type": "c8y_Serial",
                "self": f"{BASE}/identity/externalIds/c8y_Serial/raspi-1",
                "managedObject": {"id": str(hierarchy.device.pk), "self": device_self},
            },
            {
                "externalId": "3531",
                "type": "c8y_Imei",
                "self": f"{BASE}/identity/externalIds/c8y_Imei/3531",
                "managedObject": {"id": str(hierarchy.device.pk), "self": device_self},
            },
        ],
    }
    assert items[1]["deviceExternalIDs"] == {
        "self": f"{BASE}/identity/globalIds/{hierarchy.grandchild.pk}/externalIds",
        "externalIds": [],
    }
    assert items[0]["deviceName"] == "Device D"
    for query in ("", f"deviceId={hierarchy.device.pk}", "status=PENDING"):
        assert all(
            "deviceExternalIDs" not in op for op in listed(api["admin"], query)["operations"]
        )


def test_list_query_count_does_not_grow_with_the_page(api: Clients, hierarchy: Hierarchy) -> None:
    def queries(count: int) -> int:
        Operation.objects.all().delete()
        for device in [hierarchy.device, hierarchy.grandchild] * count:
            create(device)
        with CaptureQueriesContext(connection) as captured:
            body = listed(api["admin"], f"agentId={hierarchy.agent.pk}&withTotalElements=true")
        assert len(body["operations"]) == min(2 * count, 5)
        return len(captured)

    queries(1)  # warms the password cache
    assert queries(1) == queries(3) <= 8


@pytest.fixture
def filter_world(hierarchy: Hierarchy) -> dict[str, Operation]:
    """Operations at known times: every filter below selects a known subset."""
    other_agent = make_device("Other agent", agent=True)
    ops = {
        "a": operation_create(
            device=hierarchy.device, data={"c8y_Restart": {}}, now=T0, bulk_operation_id=900
        ),
        "b": operation_create(
            device=hierarchy.grandchild,
            data={"c8y_Command": {"text": "x"}},
            now=T0 + timedelta(hours=1),
            bulk_operation_id=900,
        ),
        "c": operation_create(
            device=hierarchy.device,
            data={"c8y_Command": {"text": "y"}, "c8y_Restart": {}},
            now=T0 + timedelta(hours=2),
        ),
        "d": operation_create(
            device=other_agent,
            data={"c8y_Firmware": {"name": "f"}},
            now=T0 + timedelta(hours=3),
            bulk_operation_id=901,
        ),
    }
    operation_update(operation_id=ops["b"].pk, data={"status": "EXECUTING"})
    operation_update(operation_id=ops["c"].pk, data={"status": "FAILED", "failureReason": "no"})
    operation_update(operation_id=ops["d"].pk, data={"status": "EXECUTING"})
    return ops


FILTER_CASES = [
    ("", "abcd"),
    ("status=PENDING", "a"),
    ("status=EXECUTING", "bd"),
    ("status=FAILED", "c"),
    ("status=SUCCESSFUL", ""),
    ("fragmentType=c8y_Restart", "ac"),
    ("fragmentType=c8y_Command", "bc"),
    ("fragmentType=c8y_Unknown", ""),
    ("fragmentType=text", ""),  # only top-level keys count
    ("bulkOperationId=900", "ab"),
    ("bulkOperationId=901", "d"),
    ("bulkOperationId=902", ""),
    ("dateFrom=2024-05-14T11:00:00Z", "bcd"),
    ("dateTo=2024-05-14T11:00:00Z", "ab"),
    ("dateFrom=2024-05-14T11:00:00Z&dateTo=2024-05-14T12:00:00.000Z", "bc"),
    ("dateFrom=2024-05-14T11:00:00.001Z", "cd"),
    ("dateTo=2024-05-14T10:59:59.999Z", "a"),
    ("dateFrom=2024-05-14T13:00:00%2B02:00", "bcd"),
    ("dateFrom=2024-05-14T13:00:00+02:00", "bcd"),  # '+' arrives as a space
    ("dateTo=2024-05-14T06:00:00-05:00", "ab"),
    ("dateFrom=2024-05-14T13:00:00%2B0200", "bcd"),
    ("dateFrom=2024-05-14T11:00:00", "bcd"),  # no offset: UTC
    ("dateFrom=2024-05-14&dateTo=2024-05-15", "abcd"),
    ("dateFrom=2024-05-15", ""),
    ("dateFrom=1970-01-01", "abcd"),
    ("dateTo=9999-12-31T23:59:59.999Z", "abcd"),
    ("dateFrom=0001-01-01T00:00:00Z&dateTo=9999-12-31T23:59:59.999999Z", "abcd"),
    ("status=EXECUTING&fragmentType=c8y_Command", "b"),
    ("status=EXECUTING&bulkOperationId=900&dateTo=2024-05-14T11:00:00Z", "b"),
    ("fragmentType=c8y_Restart&dateFrom=2024-05-14T10:30:00Z", "c"),
    ("unknownParameter=1&bulkId=5", "abcd"),
    ("status=&deviceId=&dateFrom=", "abcd"),
]


@pytest.mark.parametrize(("query", "expected"), FILTER_CASES)
def test_list_filters(
    api: Clients, filter_world: dict[str, Operation], query: str, expected: str
) -> None:
    assert listed_ids(api["admin"], f"{query}&pageSize=100") == [
        filter_world[key].pk for key in expected
    ]


def test_list_filters_by_device_and_agent(
    api: Clients, hierarchy: Hierarchy, filter_world: dict[str, Operation]
) -> None:
    ops = filter_world
    other_agent = ops["d"].device
    cases = {
        f"deviceId={hierarchy.device.pk}": "ac",
        f"deviceId={hierarchy.grandchild.pk}": "b",
        f"deviceId={hierarchy.agent.pk}": "",
        f"agentId={hierarchy.agent.pk}": "abc",
        f"agentId={other_agent.pk}": "d",
        f"agentId={hierarchy.device.pk}": "",
        f"agentId={hierarchy.agent.pk}&status=PENDING": "a",
        f"deviceId={hierarchy.device.pk}&status=FAILED": "c",
        f"agentId={hierarchy.agent.pk}&deviceId={hierarchy.grandchild.pk}": "b",
        f"agentId={other_agent.pk}&deviceId={hierarchy.device.pk}": "",
        "deviceId=987654321": "",
        "deviceId=99999999999999999999": "",
        "agentId=99999999999999999999": "",
        "bulkOperationId=99999999999999999999": "",
    }
    for query, expected in cases.items():
        assert listed_ids(api["admin"], query) == [ops[key].pk for key in expected], query


def test_list_totals_follow_the_filters(api: Clients, filter_world: dict[str, Operation]) -> None:
    body = listed(
        api["admin"], "status=EXECUTING&pageSize=1&withTotalPages=true&withTotalElements=true"
    )

    assert [int(op["id"]) for op in body["operations"]] == [filter_world["b"].pk]
    assert body["statistics"] == {
        "pageSize": 1,
        "currentPage": 1,
        "totalPages": 2,
        "totalElements": 2,
    }
    assert parse_qs(urlsplit(body["next"]).query)["status"] == ["EXECUTING"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("revert=true", "abcd"),
        ("revert=TRUE&status=EXECUTING", "bd"),
        ("revert=false&dateFrom=2024-05-14", "abcd"),
        ("revert=true&dateFrom=2024-05-14", "dcba"),
        ("revert=true&dateTo=2024-05-14T12:00:00Z", "cba"),
        ("revert=true&dateFrom=2024-05-14T10:30:00Z&dateTo=2024-05-14T12:30:00Z", "cb"),
        ("revert=true&dateFrom=1970-01-01&pageSize=1", "d"),  # c8y-api's "last operation"
    ],
)
def test_revert_sorts_newest_first_only_with_a_date_filter(
    api: Clients, filter_world: dict[str, Operation], query: str, expected: str
) -> None:
    assert listed_ids(api["admin"], query) == [filter_world[key].pk for key in expected]


def test_date_filters_include_the_emitted_creation_time(api: Clients, hierarchy: Hierarchy) -> None:
    created = ok_json(
        call(api["admin"], "POST", OPERATIONS, {"deviceId": hierarchy.device.pk}, accept="*/*"),
        201,
    )
    emitted = created["creationTime"]

    assert listed_ids(api["admin"], f"dateFrom={emitted}") == [int(created["id"])]
    assert listed_ids(api["admin"], f"dateTo={emitted}") == [int(created["id"])]
    assert listed_ids(api["admin"], f"dateFrom={emitted}&dateTo={emitted}") == [int(created["id"])]


@pytest.mark.parametrize(
    ("query", "found"),
    [
        ("dateTo=2024-05-14T10:18:33.477Z", True),
        ("dateTo=2024-05-14T10:18:33.476Z", False),
        ("dateTo=2024-05-14T10:18:33Z", False),
        ("dateFrom=2024-05-14T10:18:33.477Z", True),
        ("dateFrom=2024-05-14T10:18:33.478Z", False),
        ("dateFrom=2024-05-14T10:18:33.477Z&dateTo=2024-05-14T10:18:33.477Z", True),
    ],
)
def test_date_filters_work_at_millisecond_precision(
    api: Clients, hierarchy: Hierarchy, query: str, found: bool
) -> None:
    operation = operation_create(
        device=hierarchy.device, data={}, now=datetime(2024, 5, 14, 10, 18, 33, 477900, tzinfo=UTC)
    )
    emitted = ok_json(api["admin"].get(operation_path(operation.pk)))["creationTime"]
    assert emitted == "2024-05-14T10:18:33.477Z"

    assert listed_ids(api["admin"], query) == ([operation.pk] if found else [])


@pytest.mark.parametrize(
    "query",
    [
        "status=BOGUS",
        "status=pending",
        "deviceId=abc",
        "deviceId=-1",
        "agentId=x",
        "bulkOperationId=1.5",
        "dateFrom=yesterday",
        "dateTo=2024-13-01",
        "dateFrom=2024-05-14T25:00:00Z",
        "revert=maybe",
        "pageSize=0",
        "currentPage=x",
        "withTotalPages=maybe",
    ],
)
def test_list_bad_parameters_are_422(api: Clients, hierarchy: Hierarchy, query: str) -> None:
    create(hierarchy.device)

    assert_error(api["admin"].get(f"{OPERATIONS}?{query}"), 422, VALIDATION)


def test_list_for_a_user_without_read_shows_only_operations_on_own_devices(
    api: Clients, hierarchy: Hierarchy
) -> None:
    foreign = make_device("Foreign", owner="zed")
    add_child_devices(hierarchy.agent, foreign)
    mine = [create(device) for device in (hierarchy.agent, hierarchy.device, hierarchy.grandchild)]
    theirs = [create(foreign) for _ in range(2)]
    mine.append(create(hierarchy.device))
    query = "pageSize=2&withTotalPages=true&withTotalElements=true"

    alice = listed(api["alice"], query)
    assert [int(op["id"]) for op in alice["operations"]] == pks(*mine[:2])
    assert alice["statistics"] == {
        "pageSize": 2,
        "currentPage": 1,
        "totalPages": 2,
        "totalElements": 4,
    }
    assert listed_ids(api["alice"], "pageSize=2&currentPage=2") == pks(*mine[2:])
    assert listed_ids(api["alice"], f"deviceId={foreign.pk}") == []
    assert listed_ids(api["alice"], f"agentId={hierarchy.agent.pk}&pageSize=100") == pks(*mine)

    for who in ("bob", "nobody"):
        body = listed(api[who], "withTotalPages=true&withTotalElements=true")
        assert body["operations"] == []
        assert body["statistics"]["totalElements"] == 0
        assert body["statistics"]["totalPages"] == 0

    everything = sorted(pks(*mine, *theirs))
    for who in ("admin", "reader"):
        body = listed(api[who], "pageSize=100&withTotalElements=true")
        assert [int(op["id"]) for op in body["operations"]] == everything
        assert body["statistics"]["totalElements"] == 6


@pytest.mark.parametrize("who", UNAUTHENTICATED)
def test_list_unauthenticated(api: Clients, who: str) -> None:
    assert_error(api[who].get(OPERATIONS), 401, ERROR_NAMES[401])


# --- GET /devicecontrol/operations/{id} -----------------------------------------------------------


def test_get_single(api: Clients, hierarchy: Hierarchy) -> None:
    operation = operation_create(
        device=hierarchy.device,
        data={"description": "Run", "c8y_Command": {"text": "ls"}},
        now=T0,
        bulk_operation_id=55,
    )
    operation_update(
        operation_id=operation.pk, data={"status": "FAILED", "failureReason": "no shell"}
    )

    for path in (operation_path(operation.pk), f"{operation_path(operation.pk)}/"):
        response = api["reader"].get(path, HTTP_ACCEPT=OPERATION_TYPE)
        assert response["Content-Type"] == f"{OPERATION_TYPE};charset=UTF-8;ver=0.9"
        assert ok_json(response) == {
            "id": str(operation.pk),
            "self": f"{BASE}/devicecontrol/operations/{operation.pk}",
            "deviceId": str(hierarchy.device.pk),
            "status": "FAILED",
            "creationTime": "2024-05-14T10:00:00.000Z",
            "failureReason": "no shell",
            "bulkOperationId": "55",
            "description": "Run",
            "c8y_Command": {"text": "ls"},
        }


@pytest.mark.parametrize("pk", ["987654321", "99999999999999999999", "abc", "-1", "1.0"])
def test_get_unknown_id_is_404(api: Clients, pk: str) -> None:
    body = assert_error(api["admin"].get(operation_path(pk)), 404, "devicecontrol/Not Found")

    assert body["message"] == not_found_message(pk)


# --- PUT /devicecontrol/operations/{id} (§7) ------------------------------------------------------


@pytest.fixture
def operation(hierarchy: Hierarchy) -> Operation:
    return operation_create(
        device=hierarchy.device,
        data={"description": "Run", "c8y_Command": {"text": "get uboot.sn"}, "c8y_Keep": [1]},
        now=T0,
    )


def put(client: Any, operation: Operation, body: Any, **kwargs: Any) -> Any:
    return call(client, "PUT", operation_path(operation.pk), body, **kwargs)


def test_put_returns_the_updated_operation(api: Clients, operation: Operation) -> None:
    response = put(
        api["admin"],
        operation,
        {"status": "SUCCESSFUL", "c8y_Command": {"text": "get uboot.sn", "result": "1657"}},
        accept=OPERATION_TYPE,
    )

    assert response["Content-Type"] == f"{OPERATION_TYPE};charset=UTF-8;ver=0.9"
    expected = {
        "id": str(operation.pk),
        "self": f"{BASE}/devicecontrol/operations/{operation.pk}",
        "deviceId": str(operation.device_id),
        "status": "SUCCESSFUL",
        "creationTime": "2024-05-14T10:00:00.000Z",
        "description": "Run",
        "c8y_Command": {"text": "get uboot.sn", "result": "1657"},
        "c8y_Keep": [1],
    }
    assert ok_json(response) == expected
    assert ok_json(api["admin"].get(operation_path(operation.pk))) == expected


def test_put_without_accept_has_an_empty_body(api: Clients, operation: Operation) -> None:
    response = put(api["admin"], operation, {"status": "EXECUTING"})

    assert response.status_code == 200
    assert response.content == b""
    assert response["Content-Length"] == "0"
    assert Operation.objects.get(pk=operation.pk).status == OperationStatus.EXECUTING


def test_put_with_trailing_slash(api: Clients, operation: Operation) -> None:
    response = call(
        api["admin"],
        "PUT",
        f"{operation_path(operation.pk)}/",
        {"status": "EXECUTING"},
        accept="*/*",
    )

    assert ok_json(response)["status"] == "EXECUTING"


def test_put_failure_reason_checklist(api: Clients, operation: Operation) -> None:
    admin = api["admin"]

    failed = ok_json(
        put(admin, operation, {"status": "FAILED", "failureReason": "disk full"}, accept="*/*")
    )
    assert failed["failureReason"] == "disk full"

    kept = ok_json(put(admin, operation, {"status": "FAILED"}, accept="*/*"))
    assert kept["failureReason"] == "disk full"

    pending = ok_json(put(admin, operation, {"status": "PENDING"}, accept="*/*"))
    assert pending["status"] == "PENDING"
    assert "failureReason" not in pending
    assert Operation.objects.get(pk=operation.pk).failure_reason is None

    again = ok_json(put(admin, operation, {"status": "FAILED"}, accept="*/*"))
    assert "failureReason" not in again


def test_put_replaces_fragments_whole_and_null_removes(api: Clients, operation: Operation) -> None:
    body = ok_json(
        put(
            api["alice"],
            operation,
            {
                "status": "EXECUTING",
                "c8y_Command": {"result": "partial"},
                "description": None,
                "c8y_Progress": {"percent": 10},
            },
            accept="*/*",
        )
    )

    assert {key: body[key] for key in body if key.startswith("c8y_") or key == "description"} == {
        "c8y_Command": {"result": "partial"},
        "c8y_Keep": [1],
        "c8y_Progress": {"percent": 10},
    }


def test_put_ignores_read_only_keys(
    api: Clients, hierarchy: Hierarchy, operation: Operation
) -> None:
    body = ok_json(
        put(
            api["admin"],
            operation,
            {
                "status": "EXECUTING",
                "id": "1",
                "self": "http://elsewhere/x",
                "deviceId": str(hierarchy.grandchild.pk),
                "creationTime": "2001-01-01T00:00:00.000Z",
                "bulkOperationId": "9",
                "deviceName": "x",
                "deviceExternalIDs": {"externalIds": []},
                "agentId": "5",
                "delivery": {},
            },
            accept="*/*",
        )
    )

    assert body == {
        "id": str(operation.pk),
        "self": f"{BASE}/devicecontrol/operations/{operation.pk}",
        "deviceId": str(hierarchy.device.pk),
        "status": "EXECUTING",
        "creationTime": "2024-05-14T10:00:00.000Z",
        "description": "Run",
        "c8y_Command": {"text": "get uboot.sn"},
        "c8y_Keep": [1],
    }
    stored = Operation.objects.get(pk=operation.pk)
    assert (stored.device_id, stored.agent_id) == (hierarchy.device.pk, hierarchy.agent.pk)


@pytest.mark.parametrize(
    ("start", "target"),
    [
        ("PENDING", "SUCCESSFUL"),
        ("PENDING", "FAILED"),
        ("EXECUTING", "PENDING"),
        ("SUCCESSFUL", "EXECUTING"),
        ("SUCCESSFUL", "PENDING"),
        ("FAILED", "PENDING"),
        ("FAILED", "SUCCESSFUL"),
        ("SUCCESSFUL", "SUCCESSFUL"),
        ("PENDING", "PENDING"),
    ],
)
def test_put_allows_any_transition(
    api: Clients, operation: Operation, start: str, target: str
) -> None:
    operation_update(operation_id=operation.pk, data={"status": start})

    body = ok_json(put(api["admin"], operation, {"status": target}, accept="*/*"))

    assert body["status"] == target
    assert ok_json(api["admin"].get(operation_path(operation.pk)))["status"] == target


def test_put_without_status_is_422(
    api: Clients, operation: Operation, capture_events: EventCapture
) -> None:
    before = snapshot()

    with capture_events() as events:
        response = put(api["admin"], operation, {"c8y_Command": {"result": "x"}})

    body = assert_error(response, 422, VALIDATION)
    assert body["message"] == "Following mandatory fields should be included: status"
    assert snapshot() == before
    assert events == []


@pytest.mark.parametrize("pk", ["987654321", "99999999999999999999", "abc"])
def test_put_unknown_id_is_404(api: Clients, pk: str, capture_events: EventCapture) -> None:
    with capture_events() as events:
        response = call(api["admin"], "PUT", operation_path(pk), {"status": "EXECUTING"})

    body = assert_error(response, 404, "devicecontrol/Not Found")
    assert body["message"] == not_found_message(pk)
    assert events == []


# --- DELETE /devicecontrol/operations (§8) --------------------------------------------------------


def test_delete_by_device_and_status_removes_only_those(
    api: Clients, hierarchy: Hierarchy, capture_events: EventCapture
) -> None:
    pending = [create(hierarchy.device) for _ in range(2)]
    executing = create(hierarchy.device)
    operation_update(operation_id=executing.pk, data={"status": "EXECUTING"})
    elsewhere = create(hierarchy.grandchild)

    with capture_events() as events:
        response = call(
            api["admin"], "DELETE", f"{OPERATIONS}?deviceId={hierarchy.device.pk}&status=PENDING"
        )

    assert response.status_code == 204
    assert response.content == b""
    assert list(Operation.objects.order_by("pk").values_list("pk", flat=True)) == pks(
        executing, elsewhere
    )
    assert sorted((e.action, e.operation_id) for e in events) == [
        ("DELETE", op.pk) for op in pending
    ]


@pytest.mark.parametrize(("query", "deleted"), [*FILTER_CASES[1:], ("", "abcd")])
def test_delete_by_every_filter(
    api: Clients, filter_world: dict[str, Operation], query: str, deleted: str
) -> None:
    path = f"{OPERATIONS}?{query}" if query else OPERATIONS

    assert call(api["admin"], "DELETE", path).status_code == 204

    remaining = [op.pk for key, op in filter_world.items() if key not in deleted]
    assert sorted(Operation.objects.values_list("pk", flat=True)) == remaining


def test_delete_by_agent_and_device(
    api: Clients, hierarchy: Hierarchy, filter_world: dict[str, Operation]
) -> None:
    response = call(api["admin"], "DELETE", f"{OPERATIONS}?agentId={hierarchy.agent.pk}")

    assert response.status_code == 204
    assert list(Operation.objects.values_list("pk", flat=True)) == [filter_world["d"].pk]


@pytest.mark.parametrize(
    "query",
    [
        "status=SUCCESSFUL",
        "deviceId=99999999999999999999",  # beyond the bigint range: names no device
        "agentId=99999999999999999999",
        "bulkOperationId=99999999999999999999",
    ],
)
def test_delete_when_nothing_matches_is_204(
    api: Clients, hierarchy: Hierarchy, capture_events: EventCapture, query: str
) -> None:
    kept = create(hierarchy.device)

    with capture_events() as events:
        response = call(api["admin"], "DELETE", f"{OPERATIONS}?{query}")

    assert response.status_code == 204
    assert list(Operation.objects.values_list("pk", flat=True)) == [kept.pk]
    assert events == []


@pytest.mark.parametrize(
    "query",
    [
        "status=BOGUS",
        "deviceId=abc",
        "agentId=-1",
        "bulkOperationId=x",
        "dateFrom=yesterday",
        "dateTo=2024-02-30",
        "deviceId=abc&status=PENDING",
    ],
)
def test_delete_with_a_bad_filter_is_422_and_deletes_nothing(
    api: Clients,
    hierarchy: Hierarchy,
    row_counts: Callable[[], dict[str, int]],
    capture_events: EventCapture,
    query: str,
) -> None:
    create(hierarchy.device)
    api.prepare("admin")
    before = row_counts()

    with capture_events() as events:
        response = call(api["admin"], "DELETE", f"{OPERATIONS}?{query}")

    assert_error(response, 422, VALIDATION)
    assert row_counts() == before
    assert events == []


@pytest.mark.parametrize("who", ["admin", "alice", "nobody"])
def test_delete_single_is_405(
    api: Clients,
    operation: Operation,
    row_counts: Callable[[], dict[str, int]],
    capture_events: EventCapture,
    who: str,
) -> None:
    api.prepare(who)
    before = row_counts()

    with capture_events() as events:
        response = call(api[who], "DELETE", operation_path(operation.pk))

    assert_error(response, 405, ERROR_NAMES[405])
    assert "DELETE" not in response["Allow"]
    assert row_counts() == before
    assert events == []


@pytest.mark.parametrize("method", ["PATCH", "DELETE"])
def test_other_unsupported_methods_are_405(
    api: Clients, operation: Operation, row_counts: Callable[[], dict[str, int]], method: str
) -> None:
    api.prepare("admin", "anon")
    before = row_counts()
    path = operation_path(operation.pk) if method == "DELETE" else OPERATIONS

    assert_error(call(api["admin"], method, path, {"status": "x"}), 405, ERROR_NAMES[405])
    assert_error(call(api["anon"], method, path, {}), 401, ERROR_NAMES[401])
    assert row_counts() == before


# --- permission matrix (auth.md §4-§8) ------------------------------------------------------------


@pytest.fixture
def foreign(hierarchy: Hierarchy) -> ManagedObject:
    """A device below alice's agent that somebody else owns."""
    device = make_device("Foreign", owner="zed")
    add_child_devices(hierarchy.agent, device)
    return device


@pytest.mark.parametrize(
    ("who", "target", "status"),
    [
        ("admin", "device", 201),
        ("admin", "foreign", 201),
        ("alice", "device", 201),
        ("alice", "grandchild", 201),
        ("alice", "foreign", 403),
        ("bob", "device", 403),
        ("reader", "device", 403),
        ("reader", "foreign", 403),
        ("nobody", "device", 403),
        ("nobody", "unknown", 422),  # existence is checked before permission (§6)
        *[(who, "device", 401) for who in UNAUTHENTICATED],
    ],
)
def test_post_matrix(
    api: Clients,
    hierarchy: Hierarchy,
    foreign: ManagedObject,
    row_counts: Callable[[], dict[str, int]],
    capture_events: EventCapture,
    who: str,
    target: str,
    status: int,
) -> None:
    device_id = {
        "device": hierarchy.device.pk,
        "grandchild": hierarchy.grandchild.pk,
        "foreign": foreign.pk,
        "unknown": 987654321,
    }[target]
    api.prepare(who)
    before = row_counts()

    with capture_events() as events:
        response = call(api[who], "POST", OPERATIONS, {"deviceId": device_id}, accept="*/*")

    if status == 201:
        body = ok_json(response, 201)
        assert body["deviceId"] == str(device_id)
        assert [(e.action, e.operation_id) for e in events] == [("CREATE", int(body["id"]))]
    else:
        error = assert_error(response, status, ERROR_NAMES.get(status, INVALID))
        if status == 403:
            assert error["message"] == "Access is denied"
        if status == 401:
            assert response["WWW-Authenticate"].startswith("Basic")
        assert row_counts() == before
        assert events == []


@pytest.fixture
def owned_and_foreign(hierarchy: Hierarchy, foreign: ManagedObject) -> dict[str, Operation]:
    return {"own": create(hierarchy.device), "foreign": create(foreign)}


@pytest.mark.parametrize(
    ("who", "target", "status"),
    [
        ("admin", "own", 200),
        ("admin", "foreign", 200),
        ("reader", "foreign", 200),
        ("alice", "own", 200),
        ("alice", "foreign", 403),
        ("bob", "own", 403),
        ("nobody", "own", 403),
        ("nobody", "unknown", 404),
        ("alice", "unknown", 404),
        *[(who, "own", 401) for who in UNAUTHENTICATED],
        ("anon", "unknown", 401),
    ],
)
def test_get_single_matrix(
    api: Clients, owned_and_foreign: dict[str, Operation], who: str, target: str, status: int
) -> None:
    pk = owned_and_foreign[target].pk if target in owned_and_foreign else 987654321

    response = api[who].get(operation_path(pk))

    if status == 200:
        assert ok_json(response)["id"] == str(pk)
    else:
        assert_error(response, status, ERROR_NAMES[status])


@pytest.mark.parametrize(
    ("who", "target", "status"),
    [
        ("admin", "own", 200),
        ("admin", "foreign", 200),
        ("alice", "own", 200),
        ("alice", "foreign", 403),
        ("reader", "own", 403),
        ("reader", "foreign", 403),
        ("bob", "own", 403),
        ("nobody", "own", 403),
        ("nobody", "unknown", 404),
        ("reader", "unknown", 404),
        *[(who, "own", 401) for who in UNAUTHENTICATED],
        ("anon", "unknown", 401),
    ],
)
def test_put_matrix(
    api: Clients,
    owned_and_foreign: dict[str, Operation],
    capture_events: EventCapture,
    who: str,
    target: str,
    status: int,
) -> None:
    pk = owned_and_foreign[target].pk if target in owned_and_foreign else 987654321
    api.prepare(who)
    before = snapshot()

    with capture_events() as events:
        response = call(
            api[who],
            "PUT",
            operation_path(pk),
            {"status": "EXECUTING", "c8y_Mark": 1},
            accept="*/*",
        )

    if status == 200:
        assert ok_json(response)["c8y_Mark"] == 1
        assert [(e.action, e.operation_id) for e in events] == [("UPDATE", pk)]
    else:
        assert_error(response, status, ERROR_NAMES[status])
        assert snapshot() == before
        assert events == []


@pytest.mark.parametrize(
    ("who", "status"),
    [
        ("admin", 204),
        ("reader", 403),
        ("alice", 403),  # the owner rule gives no right to delete collections (auth.md §4)
        ("bob", 403),
        ("nobody", 403),
        *[(who, 401) for who in UNAUTHENTICATED],
    ],
)
def test_delete_matrix(
    api: Clients,
    hierarchy: Hierarchy,
    owned_and_foreign: dict[str, Operation],
    row_counts: Callable[[], dict[str, int]],
    who: str,
    status: int,
) -> None:
    api.prepare(who)
    before = row_counts()

    for query in ("", f"?deviceId={hierarchy.device.pk}"):
        response = call(api[who], "DELETE", f"{OPERATIONS}{query}")
        if status == 204:
            assert response.status_code == 204
        else:
            assert_error(response, status, ERROR_NAMES[status])
            assert row_counts() == before

    if status == 204:
        assert not Operation.objects.exists()


@pytest.mark.parametrize(
    ("who", "target", "status"),
    [
        ("admin", "foreign", 201),
        ("alice", "own", 201),
        ("alice", "foreign", 403),
        ("reader", "own", 403),
        ("bob", "own", 403),
        ("nobody", "unknown", 404),
        *[(who, "own", 401) for who in UNAUTHENTICATED],
    ],
)
def test_retry_permission_matrix(
    api: Clients,
    owned_and_foreign: dict[str, Operation],
    row_counts: Callable[[], dict[str, int]],
    who: str,
    target: str,
    status: int,
) -> None:
    for operation in owned_and_foreign.values():
        operation_update(operation_id=operation.pk, data={"status": "FAILED", "failureReason": "x"})
    pk = owned_and_foreign[target].pk if target in owned_and_foreign else 987654321
    api.prepare(who)
    before = row_counts()

    response = call(api[who], "POST", f"{operation_path(pk)}/retry", accept="*/*")

    if status == 201:
        assert ok_json(response, 201)["status"] == "PENDING"
        assert Operation.objects.count() == before["devicecontrol.Operation"] + 1
    else:
        assert_error(response, status, ERROR_NAMES[status])
        assert row_counts() == before


def test_not_found_and_forbidden_are_decided_before_the_body_is_validated(
    api: Clients,
    owned_and_foreign: dict[str, Operation],
    row_counts: Callable[[], dict[str, int]],
    capture_events: EventCapture,
) -> None:
    foreign_device = owned_and_foreign["foreign"].device_id
    api.prepare("admin", "alice", "reader")
    before = (row_counts(), snapshot())
    bad_bodies = [{"raw": "{"}, {"body": {"status": "BOGUS"}}, {"body": []}, {"body": {"a.b": 1}}]

    with capture_events() as events:
        for spec in bad_bodies:
            body, raw = spec.get("body"), spec.get("raw")
            unknown = call(api["admin"], "PUT", operation_path(987654321), body, raw=raw)
            assert_error(unknown, 404, ERROR_NAMES[404])
            for who, target in (("alice", "foreign"), ("reader", "own")):
                path = operation_path(owned_and_foreign[target].pk)
                assert_error(call(api[who], "PUT", path, body, raw=raw), 403, ERROR_NAMES[403])
        for fragment in ({"a.b": 1}, {"pendingTimeout": -1}):
            response = call(
                api["reader"], "POST", OPERATIONS, {"deviceId": foreign_device, **fragment}
            )
            assert_error(response, 403, ERROR_NAMES[403])

    assert (row_counts(), snapshot()) == before
    assert events == []


# --- bad input on every write endpoint (README §2, §6) --------------------------------------------


POST_BAD_BODIES: list[tuple[dict[str, Any], int, str]] = [
    ({"body": {"deviceId": "987654321"}}, 422, INVALID),
    ({"body": {"deviceId": "{lonely}"}}, 422, INVALID),
    ({"body": {"deviceId": True}}, 422, INVALID),
    ({"body": {"deviceId": False}}, 422, INVALID),
    ({"body": {"deviceId": {}}}, 422, INVALID),
    ({"body": {"deviceId": []}}, 422, INVALID),
    ({"body": {"deviceId": "abc"}}, 422, INVALID),
    ({"body": {"deviceId": -5}}, 422, INVALID),
    ({"body": {"deviceId": 1.5}}, 422, INVALID),
    ({"body": {"deviceId": None}}, 422, VALIDATION),
    ({"body": {}}, 422, VALIDATION),
    ({"body": {"deviceId": "{device}", "pendingTimeout": -1}}, 422, VALIDATION),
    ({"body": {"deviceId": "{device}", "pendingTimeout": "x"}}, 422, VALIDATION),
    ({"body": {"deviceId": "{device}", "executionTimeout": 0}}, 422, VALIDATION),
    ({"body": {"deviceId": "{device}", "executionTimeout": 2**31}}, 422, VALIDATION),
    ({"body": {"deviceId": "{device}", "pendingTimeout": 10**12}}, 422, VALIDATION),
    ({"body": {"deviceId": "99999999999999999999"}}, 422, INVALID),
    ({"body": {"deviceId": "{device}", "a.b": {}}}, 422, VALIDATION),
    ({"body": {"deviceId": "{device}", "$set": {}}}, 422, VALIDATION),
    ({"body": {"deviceId": "{device}", "a b": {}}}, 422, VALIDATION),
    ({"raw": '{"deviceId": "{device}", '}, 400, ERROR_NAMES[400]),
    ({"raw": "not json"}, 400, ERROR_NAMES[400]),
    ({"raw": "[]"}, 422, VALIDATION),
    ({"raw": '"text"'}, 422, VALIDATION),
    ({"raw": "5"}, 422, VALIDATION),
    ({"raw": "null"}, 422, VALIDATION),
    ({"raw": ""}, 422, VALIDATION),
    ({"raw": '{"deviceId": "{device}"}', "content_type": "text/plain"}, 415, ERROR_NAMES[415]),
    (
        {"raw": '{"deviceId": "{device}"}', "content_type": "application/xml"},
        415,
        ERROR_NAMES[415],
    ),
    ({"body": {"deviceId": "{device}", "c8y_Big": "x" * 400}, "limit": 200}, 413, ERROR_NAMES[413]),
]

PUT_BAD_BODIES: list[tuple[dict[str, Any], int, str]] = [
    ({"body": {}}, 422, VALIDATION),
    ({"body": {"c8y_Result": 1}}, 422, VALIDATION),
    ({"body": {"status": "BOGUS"}}, 422, INVALID),
    ({"body": {"status": "successful"}}, 422, INVALID),
    ({"body": {"status": 5}}, 422, INVALID),
    ({"body": {"status": None}}, 422, INVALID),
    ({"body": {"status": ["FAILED"]}}, 422, INVALID),
    ({"body": {"status": "SUCCESSFUL", "failureReason": "x"}}, 422, INVALID),
    ({"body": {"status": "EXECUTING", "failureReason": "x"}}, 422, INVALID),
    ({"body": {"status": "PENDING", "failureReason": 7}}, 422, INVALID),
    ({"body": {"status": "FAILED", "failureReason": 7}}, 422, VALIDATION),
    ({"body": {"status": "FAILED", "failureReason": {"text": "x"}}}, 422, VALIDATION),
    ({"body": {"status": "EXECUTING", "pendingTimeout": -1}}, 422, VALIDATION),
    ({"body": {"status": "EXECUTING", "pendingTimeout": "x"}}, 422, VALIDATION),
    ({"body": {"status": "EXECUTING", "executionTimeout": True}}, 422, VALIDATION),
    ({"body": {"status": "EXECUTING", "executionTimeout": 2**31}}, 422, VALIDATION),
    ({"body": {"status": "PENDING", "pendingTimeout": 10**12}}, 422, VALIDATION),
    ({"body": {"status": "EXECUTING", "a.b": 1}}, 422, VALIDATION),
    ({"body": {"status": "EXECUTING", "$x": 1}}, 422, VALIDATION),
    ({"raw": '{"status": "EXECUTING"'}, 400, ERROR_NAMES[400]),
    ({"raw": "[]"}, 422, VALIDATION),
    ({"raw": '"EXECUTING"'}, 422, VALIDATION),
    ({"raw": "null"}, 422, VALIDATION),
    ({"raw": ""}, 422, VALIDATION),
    ({"raw": '{"status": "EXECUTING"}', "content_type": "text/plain"}, 415, ERROR_NAMES[415]),
    ({"body": {"status": "EXECUTING", "c8y_Big": "x" * 400}, "limit": 200}, 413, ERROR_NAMES[413]),
]


def fill(spec: dict[str, Any], names: dict[str, str]) -> tuple[Any, str | None]:
    """The spec's JSON body or raw text with {device}/{lonely} replaced by real IDs."""

    def replace(text: str) -> str:
        for key, value in names.items():
            text = text.replace("{" + key + "}", value)
        return text

    if "raw" in spec:
        return None, replace(spec["raw"])
    body = {
        key: replace(value) if isinstance(value, str) else value
        for key, value in spec["body"].items()
    }
    return body, None


@pytest.mark.parametrize(("spec", "status", "error"), POST_BAD_BODIES)
def test_post_bad_input(
    api: Clients,
    hierarchy: Hierarchy,
    settings: Any,
    row_counts: Callable[[], dict[str, int]],
    capture_events: EventCapture,
    spec: dict[str, Any],
    status: int,
    error: str,
) -> None:
    lonely = make_device("Lonely")
    body, raw = fill(spec, {"device": str(hierarchy.device.pk), "lonely": str(lonely.pk)})
    if "limit" in spec:
        settings.DATA_UPLOAD_MAX_MEMORY_SIZE = spec["limit"]
    api.prepare("admin")
    before = row_counts()

    with capture_events() as events:
        response = call(
            api["admin"],
            "POST",
            OPERATIONS,
            body,
            raw=raw,
            content_type=spec.get("content_type", "application/json"),
            accept="application/json",
        )

    assert_error(response, status, error)
    assert "Location" not in response
    assert row_counts() == before
    assert events == []


@pytest.mark.parametrize(("spec", "status", "error"), PUT_BAD_BODIES)
@pytest.mark.parametrize("who", ["admin", "alice"])
def test_put_bad_input(
    api: Clients,
    operation: Operation,
    settings: Any,
    row_counts: Callable[[], dict[str, int]],
    capture_events: EventCapture,
    who: str,
    spec: dict[str, Any],
    status: int,
    error: str,
) -> None:
    body, raw = fill(spec, {})
    if "limit" in spec:
        settings.DATA_UPLOAD_MAX_MEMORY_SIZE = spec["limit"]
    api.prepare(who)
    before = (row_counts(), snapshot())

    with capture_events() as events:
        response = call(
            api[who],
            "PUT",
            operation_path(operation.pk),
            body,
            raw=raw,
            content_type=spec.get("content_type", "application/json"),
            accept="application/json",
        )

    assert_error(response, status, error)
    assert (row_counts(), snapshot()) == before
    assert events == []
