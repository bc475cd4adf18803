"""The agent's poll and a device's history page read with one fixed statement (PostgreSQL,
devicecontrol.selectors.OperationPage) answer byte for byte what the queryset path answers for the
same request: every item shape (deviceName or none, failureReason, bulkOperationId, retryOf,
fragments, external IDs), the owner rule for device users, paging links and statistics."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIRequestFactory

from devicecontrol.models import Operation, OperationStatus
from devicecontrol.services import operation_create
from devicecontrol.views import OperationCollectionView
from deviceplatform.logs import reset_request_id, set_request_id
from tests.devicecontrol.conftest import OPERATIONS, Hierarchy, make_device
from tests.factories import Clients, ExternalIdFactory
from tests.helpers import basic

FIXED = connection.vendor == "postgresql"  # SQLite answers every query with the queryset path


class QuerysetPath(OperationCollectionView):
    """The same view, forced to answer through the ORM."""

    def get(self, request: Any) -> Any:
        return self.queryset_page(request)


@pytest.fixture
def rows(hierarchy: Hierarchy) -> Hierarchy:
    ExternalIdFactory(managed_object=hierarchy.device, external_id="serial-D")
    ExternalIdFactory(managed_object=hierarchy.device, external_id="imei-D", type="c8y_IMEI")
    unnamed = make_device(owner="ALICE")  # no name; the owner differs only in case
    first = operation_create(device=hierarchy.device, data={"c8y_Restart": {}, "note": [1, "x"]})
    operation_create(device=hierarchy.grandchild, data={"c8y_Command": {"text": "ls"}})
    operation_create(device=unnamed, data={"c8y_Restart": {}}, agent_id=hierarchy.agent.pk)
    Operation.objects.create(
        device=hierarchy.device,
        agent_id=hierarchy.agent.pk,
        status=OperationStatus.FAILED,
        failure_reason="broken",
        bulk_operation_id=4242,
        retry_of=first,
        fragments={"c8y_Firmware": {"version": "1.0", "nested": {"n": None, "b": True}}},
    )
    Operation.objects.create(
        device=hierarchy.device,
        agent_id=hierarchy.agent.pk,
        status=OperationStatus.SUCCESSFUL,
        failure_reason="kept but not shown",
    )
    other = make_device("Bob's", owner="bob")
    operation_create(device=other, data={"c8y_Restart": {}}, agent_id=hierarchy.agent.pk)
    return hierarchy


def both(
    api: Clients, user: str, params: dict[str, Any], status: int = 200
) -> tuple[bytes, bytes, list[str]]:
    """(fast path body, queryset path body, the fast path's SQL) for one GET."""
    client = api[user]
    with CaptureQueriesContext(connection) as queries:
        fast = client.get(OPERATIONS, params, HTTP_ACCEPT="application/json")
    request = APIRequestFactory().get(
        OPERATIONS,
        params,
        HTTP_ACCEPT="application/json",
        HTTP_AUTHORIZATION=basic(f"t100/{api.user(user).username}"),
    )
    # The view alone, without the middleware that gives a request its id: the fast path's id,
    # so that error bodies (their `requestId`) compare byte for byte.
    token = set_request_id(fast["X-Request-ID"])
    try:
        slow = QuerysetPath.as_view()(request)
        slow.render()
    finally:
        reset_request_id(token)
    assert fast.status_code == slow.status_code == status, (fast.content, slow.content)
    assert fast["Content-Type"] == slow["Content-Type"]
    return fast.content, slow.content, [query["sql"] for query in queries.captured_queries]


@pytest.mark.django_db
@pytest.mark.parametrize("user", ["admin", "reader", "alice", "bob"])
def test_fixed_page_is_the_queryset_page(api: Clients, rows: Hierarchy, user: str) -> None:
    agent, device = rows.agent.pk, rows.device.pk
    shapes: list[dict[str, Any]] = [
        {"agentId": agent, "status": "PENDING", "pageSize": 100},
        {"agentId": agent, "pageSize": 2, "currentPage": 2, "withTotalPages": "true"},
        {"agentId": agent, "pageSize": 2, "currentPage": 3, "withTotalElements": "true"},
        {"deviceId": device, "pageSize": 20, "currentPage": 1},
        {"deviceId": device, "status": "FAILED", "withTotalPages": "true"},
        {"status": "PENDING", "pageSize": 2000, "withTotalElements": "true"},
        {"pageSize": 3, "currentPage": 2, "withTotalPages": "true", "withTotalElements": "false"},
        {},
        {"deviceId": device, "agentId": agent, "status": "SUCCESSFUL"},
        {"deviceId": str(2**63 - 1)},
        {"agentId": agent, "status": "PENDING", "pageSize": 100, "currentPage": 9},
        # the history page newest first (c8y-api's get_last) and the other date shapes
        {"deviceId": device, "dateFrom": "1970-01-01", "revert": "true", "pageSize": 20},
        {
            "deviceId": device,
            "dateFrom": "1970-01-01",
            "revert": "TRUE",
            "pageSize": 2,
            "currentPage": 2,
            "withTotalPages": "true",
        },
        {"deviceId": device, "revert": "true", "pageSize": 20},
        {"agentId": agent, "dateTo": "9999-12-31T23:59:59.999Z", "revert": "true"},
        {"agentId": agent, "dateFrom": "2999-01-01", "withTotalElements": "true"},
        {"agentId": agent, "dateTo": "1970-01-01T00:00:00Z", "revert": "false"},
    ]
    seen_items = 0
    for params in shapes:
        fast, slow, sql = both(api, user, params)
        assert fast == slow, params
        seen_items += fast.count(b'"creationTime"')
        names_statement = [q for q in sql if q.startswith('SELECT "id", "name" FROM')]
        if FIXED:
            assert not names_statement, sql  # the names come with the page's one statement
    assert seen_items > 0


@pytest.mark.django_db
def test_fixed_page_shows_every_item_shape(api: Clients, rows: Hierarchy) -> None:
    """The comparison above covers these shapes (not an empty page against an empty page)."""
    fast, _, _ = both(api, "admin", {"agentId": rows.agent.pk, "pageSize": 100})
    assert b'"deviceName":"Device D"' in fast
    assert b'"failureReason":"broken"' in fast
    assert b"kept but not shown" not in fast
    assert b'"bulkOperationId":"4242"' in fast
    assert b'"retryOf":"' in fast
    assert b'"externalId":"imei-D"' in fast
    assert b'"note":[1,"x"]' in fast
    assert fast.count(b'"deviceName"') == 5  # 6 items, one device without a name
    alice, _, _ = both(api, "alice", {"pageSize": 100})
    bob, _, _ = both(api, "bob", {"pageSize": 100})
    assert alice.count(b'"creationTime"') == 5
    assert bob.count(b'"creationTime"') == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    "params",
    [
        {"deviceId": "1", "dateFrom": "yesterday", "revert": "true"},
        {"deviceId": "1", "dateFrom": "1970-01-01", "revert": "maybe"},
        {"deviceId": "1", "dateTo": "2024-13-01"},
        {"agentId": "1", "pageSize": "0"},
        {"agentId": "1", "pageSize": "x"},
        {"deviceId": "1", "currentPage": "0"},
        {"deviceId": "1", "currentPage": str(2**62), "pageSize": "100"},
        {"deviceId": "1", "withTotalPages": "yes"},
    ],
)
def test_fixed_page_keeps_the_paging_errors(
    api: Clients, rows: Hierarchy, params: dict[str, Any]
) -> None:
    fast, slow, _ = both(api, "admin", params, status=422)
    assert fast == slow


@pytest.mark.django_db
def test_fixed_page_date_to_is_inclusive_at_milliseconds(api: Clients, rows: Hierarchy) -> None:
    """dateTo set to an operation's own creationTime finds it, newest first, on both paths."""
    newest = Operation.objects.filter(device=rows.device).order_by("-id").first()
    assert newest is not None
    stamp = newest.creation_time.strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{newest.creation_time.microsecond // 1000:03d}Z"
    )
    params = {"deviceId": rows.device.pk, "dateTo": stamp, "revert": "true", "pageSize": 1}
    fast, slow, _ = both(api, "admin", params)
    assert fast == slow
    assert f'"id":"{newest.pk}"'.encode() in fast
