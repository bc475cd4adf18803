"""A request's story reaches the realtime delivery (issue 15 item 4): the event a request causes is
stored with the request's id in its envelope; the server delivering it logs the id (DEBUG) and takes
it off, so subscribers get the plain Bayeux message, as CometD clients expect."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.test import Client

from deviceplatform.realtime.events import delivered, envelope_suffix
from deviceplatform.roles import Role
from tests.helpers import basic
from tests.realtime.bayeux import LpBayeux, World, event_ids

PROTOCOL_LOGGER = "deviceplatform.realtime.protocol"


@pytest.mark.parametrize(
    "data",
    [
        "4711",
        {"id": "1", "status": "PENDING"},
        {"requestId": "x"},
        ',"requestId":"forged',  # a string: its quotes are escaped
        ["a", {"requestId": "y"}],
        None,
    ],
)
@pytest.mark.parametrize("request_id", [None, "0f3c9e0d2c7a4b5e8f1a2b3c4d5e6f70", "a.b_c:d-1"])
def test_the_envelope_comes_off_whole_and_leaves_the_message_as_published(
    data: Any, request_id: str | None
) -> None:
    message = json.dumps({"channel": "/operations/1", "data": data}, separators=(",", ":"))
    stored = message.encode()[:-1] + envelope_suffix(request_id)
    assert json.loads(stored)["data"] == data
    assert delivered(stored) == (message.encode(), request_id)
    assert delivered(message.encode()) == (message.encode(), None)


def post_operation(device_id: int, request_id: str) -> Any:
    """The operator's REST request, through the whole middleware chain (in a thread, as
    create_operation does, so its database connection goes back to the pool)."""
    return Client().post(
        "/devicecontrol/operations",
        data=json.dumps({"deviceId": str(device_id), "c8y_Restart": {}}),
        content_type="application/json",
        headers={
            "Authorization": basic("operator"),
            "Accept": "application/json",
            "X-Request-ID": request_id,
        },
    )


@pytest.fixture
def operator(make_user: Callable[..., Any]) -> Any:
    return make_user("operator", roles=[Role.DEVICE_CONTROL_ADMIN])


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_an_event_a_request_caused_is_logged_with_its_id_and_delivered_without_it(
    world: World, operator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    lp = LpBayeux()
    await lp.start("reader", f"/operations/{world.device.pk}")
    caplog.set_level(logging.DEBUG, logger=PROTOCOL_LOGGER)
    created = await database_sync_to_async(post_operation)(world.device.pk, "story-rt-1")
    assert created.status_code == 201, created.content
    received = await lp.connect_now()
    [event] = [m for m in received if m["channel"] == f"/operations/{world.device.pk}"]
    assert set(event) == {"channel", "data"}  # the envelope's request id stays on the server
    assert event_ids(received) == [json.loads(created.content)["id"]]
    deliveries = [r for r in caplog.records if r.getMessage().startswith("realtime: event on")]
    assert [(r.request_id, r.client_id) for r in deliveries] == [("story-rt-1", lp.client_id)]
