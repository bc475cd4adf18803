"""Live bulk operations across processes (bulkops/live.py): a bulk operation created through one
server process, ramped by another (this test process, as a Celery worker would) and whose children
change status through both servers at once is published on /bulkoperations/* a few times, not once
per change, and the last message is what GET answers. The throttle's gate lives in Redis, so the
three processes share it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async

from bulkops import live, services
from devicecontrol.models import Operation
from deviceplatform.roles import Role
from tests.bulkops.conftest import make_fleet
from tests.realtime.conftest import WAIT, LongPolling, Rest, Server, http_session

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.asyncio,
]

REALTIME = "/notification/realtime"
ADMIN = "t100/rt_bulk_admin"
SIZE = 24


@pytest.fixture
def group(make_user: Callable[..., Any]) -> int:
    make_user("rt_bulk_admin", [Role.BULK_OPERATION_ADMIN, Role.DEVICE_CONTROL_ADMIN])
    return make_fleet(SIZE).group.pk


def ramp() -> None:
    services.bulk_operations_advance()
    assert live.throttle().wait_idle(WAIT)


def child_ids(bulk_id: int) -> list[int]:
    return list(
        Operation.objects.filter(bulk_operation_id=bulk_id)
        .order_by("pk")
        .values_list("pk", flat=True)
    )


async def test_changes_seen_by_several_processes_are_throttled_and_end_exact(
    servers: tuple[Server, Server], group: int
) -> None:
    first, second = servers
    async with http_session() as http, http_session(ADMIN) as admin_http:
        on_first, on_second = Rest(admin_http, first), Rest(admin_http, second)
        polling = LongPolling(http, first, REALTIME)
        client_id = await polling.open(ADMIN, "/bulkoperations/*")

        created = await on_second._call(
            "POST",
            "/devicecontrol/bulkoperations",
            201,
            json={
                "groupId": str(group),
                "startDate": "2020-01-01T00:00:00.000Z",
                "creationRamp": 0,
                "operationPrototype": {"description": "Restart", "c8y_Restart": {}},
            },
        )
        bulk_id = int(created["id"])
        await database_sync_to_async(ramp)()
        ids = await database_sync_to_async(child_ids)(bulk_id)
        assert len(ids) == SIZE
        for status in ("EXECUTING", "SUCCESSFUL"):
            await asyncio.gather(
                *(
                    (on_first if index % 2 else on_second).update_operation(
                        operation_id, {"status": status}
                    )
                    for index, operation_id in enumerate(ids)
                )
            )

        # Collect until the last message is GET's answer and nothing more comes.
        received: list[dict[str, Any]] = []
        fetched: dict[str, Any] = {}
        for _ in range(20):
            events, reply = await polling.connect(client_id, timeout_ms=1500)
            assert reply["successful"] is True, reply
            received.extend(events)
            fetched = await on_first._call("GET", f"/devicecontrol/bulkoperations/{bulk_id}", 200)
            if not events and received and received[-1]["data"]["data"] == fetched:
                break

    channel = f"/bulkoperations/{bulk_id}"
    assert {event["channel"] for event in received} == {channel}
    actions = [event["data"]["realtimeAction"] for event in received]
    assert actions[0] == "CREATE"
    assert set(actions[1:]) == {"UPDATE"}
    assert received[-1]["data"]["data"] == fetched
    assert fetched["generalStatus"] == "SUCCESSFUL"
    assert fetched["progress"]["successful"] == SIZE
    # 2 * SIZE status changes through two processes and a ramp batch through a third.
    assert len(received) < SIZE, actions
