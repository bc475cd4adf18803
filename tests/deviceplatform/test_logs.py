"""Logs a person can read (deviceplatform/logs.py): one access line per request with status,
duration, user and request id; the request id on every line the request logs; JSON lines; the
session's user never loaded just to be logged; idle ramp and sweep ticks log nothing."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient, Client
from pythonjsonlogger.json import JsonFormatter
from rest_framework.test import APIClient

from bulkops import tasks as bulk_tasks
from devicecontrol import tasks as devicecontrol_tasks
from deviceplatform.logs import REQUEST_ID_HEADER, logging_config
from tests.bulkops.conftest import advance, create_bulk, make_fleet
from tests.devicecontrol.conftest import add_child_devices, make_device
from tests.servers import Servers, launch  # noqa: F401  (fixture)

ACCESS = "deviceplatform.access"
HEX_ID = re.compile(r"[0-9a-f]{32}")


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == ACCESS]


@pytest.mark.django_db
def test_each_request_logs_one_line_with_status_duration_user_and_request_id(
    admin_api: APIClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    response = admin_api.get("/inventory/managedObjects?pageSize=1")
    assert response.status_code == 200
    [record] = access_records(caplog)
    assert record.levelno == logging.INFO
    assert (record.method, record.path, record.status, record.user) == (
        "GET",
        "/inventory/managedObjects?pageSize=1",
        200,
        "admin",
    )
    assert isinstance(record.duration_ms, float)
    assert record.duration_ms >= 0
    assert HEX_ID.fullmatch(record.request_id)
    assert response[REQUEST_ID_HEADER] == record.request_id
    assert re.fullmatch(
        r"GET /inventory/managedObjects\?pageSize=1 200 \d+\.\dms user=admin", record.getMessage()
    )


@pytest.mark.django_db
def test_refusals_are_logged_with_their_status_and_no_user(
    anon_api: APIClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    assert anon_api.get("/inventory/managedObjects").status_code == 401
    [record] = access_records(caplog)
    assert (record.status, record.user) == (401, None)
    assert record.getMessage().endswith("user=-")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("0f3c9e0d2c7a4b5e8f1a2b3c4d5e6f70", True),  # nginx's $request_id
        ("trace-42:a.b_c", True),
        ("bad id\r\nINFO forged line", False),
        ("x" * 129, False),
    ],
)
def test_a_request_id_from_the_proxy_is_kept_unless_it_is_not_plain(
    admin_api: APIClient, caplog: pytest.LogCaptureFixture, given: str, kept: bool
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    response = admin_api.get("/inventory", HTTP_X_REQUEST_ID=given)
    [record] = access_records(caplog)
    assert response[REQUEST_ID_HEADER] == record.request_id
    if kept:
        assert record.request_id == given
    else:
        assert HEX_ID.fullmatch(record.request_id)


@pytest.mark.django_db(transaction=True)
def test_lines_logged_while_a_request_runs_carry_its_request_id(
    admin_api: APIClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The SMS hand-off logs after the request's transaction commits, still inside the request."""
    caplog.set_level(logging.INFO)
    agent = make_device("Agent", agent=True)
    device = make_device("SMS device")
    add_child_devices(agent, device)
    response = admin_api.post(
        "/devicecontrol/operations",
        {"deviceId": str(device.pk), "deliveryType": "SMS", "c8y_Restart": {}},
        format="json",
    )
    assert response.status_code == 201
    [delivery] = [r for r in caplog.records if r.name == "devicecontrol.delivery"]
    assert delivery.request_id == response[REQUEST_ID_HEADER]
    [access] = access_records(caplog)
    assert access.request_id == response[REQUEST_ID_HEADER]


@pytest.mark.django_db
def test_json_format_is_one_object_per_line_with_every_field(
    admin_api: APIClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    admin_api.get("/inventory")
    [record] = access_records(caplog)
    options = dict(logging_config(level="INFO", fmt="json")["formatters"]["main"])
    formatter = JsonFormatter(**{key: value for key, value in options.items() if key != "()"})
    line = formatter.format(record)
    assert "\n" not in line
    body = json.loads(line)
    assert body["level"] == "INFO"
    assert body["logger"] == ACCESS
    assert body["message"] == record.getMessage()
    assert {k: body[k] for k in ("method", "path", "status", "user")} == {
        "method": "GET",
        "path": "/inventory",
        "status": 200,
        "user": "admin",
    }
    assert body["request_id"] == record.request_id
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00", body["time"])


@pytest.mark.django_db
def test_a_session_user_the_view_never_looked_at_costs_no_query(
    admin: Any,
    django_assert_num_queries: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    browser = Client()
    browser.force_login(admin)
    with django_assert_num_queries(0):
        response = browser.get("/static/admin/css/missing.css")
    assert response.status_code == 404
    [record] = access_records(caplog)
    assert record.user is None


@pytest.mark.django_db
def test_under_asgi_a_logged_in_browser_gets_its_page_not_a_500(admin: Any) -> None:
    """The async path of the middleware once loaded the session's user to log it: a synchronous
    query in async code, so every such request answered 500."""
    browser = AsyncClient()
    browser.force_login(admin)
    response = async_to_sync(browser.get)("/static/admin/css/missing.css")
    assert response.status_code == 404
    assert response[REQUEST_ID_HEADER]


def test_celery_per_task_lines_are_quiet_unless_debug() -> None:
    info = logging_config(level="INFO", fmt="plain")["loggers"]
    debug = logging_config(level="debug", fmt="plain")["loggers"]
    for name in ("celery.app.trace", "celery.worker.strategy", "celery.beat"):
        assert info[name]["level"] == "WARNING"
        assert debug[name]["level"] == "DEBUG"


@pytest.mark.django_db
def test_idle_ramp_and_sweep_ticks_log_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for task in (
        bulk_tasks.advance_bulk_operations,
        devicecontrol_tasks.expire_pending_operations,
        devicecontrol_tasks.time_out_executing_operations,
        devicecontrol_tasks.purge_old_operations,
    ):
        assert task.apply().get() == 0
    ours = [r for r in caplog.records if r.name.split(".")[0] in {"bulkops", "devicecontrol"}]
    assert ours == []


@pytest.mark.django_db
def test_a_ramp_run_that_created_children_logs_one_line_with_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fleet = make_fleet(3)
    bulk = create_bulk(fleet.group, creationRamp=1)
    caplog.set_level(logging.INFO, logger="bulkops.services")
    assert advance(1) == 2
    assert advance(1.5) == 0
    assert advance(2) == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "bulkops.services"]
    assert lines == [
        f"Bulk ramp: 2 target(s) processed: bulk operation {bulk.pk} +2, 2 of 3 (IN_PROGRESS)",
        f"Bulk ramp: 1 target(s) processed: bulk operation {bulk.pk} +1, 3 of 3 (COMPLETED)",
    ]


@pytest.mark.django_db(transaction=True)
def test_a_websocket_connection_logs_one_line(launch: Servers, tmp_path: Any) -> None:  # noqa: F811
    """uvicorn's `"WebSocket /notification/operations" [accepted]` line, without the websockets
    library's "connection open" and "connection closed" (three lines per agent connection)."""
    from websockets.sync.client import connect

    server = launch.start("uvicorn", LOG_LEVEL="INFO")
    with connect(f"{server.ws}/notification/operations") as socket:
        socket.send('[{"channel": "/meta/handshake", "version": "1.0"}]')
        assert "/meta/handshake" in socket.recv(timeout=30)  # refused (no login): any answer
    # Both sides closed; the server's lines are written by then or within a moment.
    deadline = time.monotonic() + 30
    while "[accepted]" not in server.log():
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    time.sleep(0.5)
    log = server.log()
    assert log.count('"WebSocket /notification/operations" [accepted]') == 1, log
    assert "connection open" not in log, log
    assert "connection closed" not in log, log


def test_the_websocket_chatter_filter_passes_any_other_record() -> None:
    from deviceplatform.logs import WebSocketChatterFilter

    def record(msg: Any, level: int = logging.INFO) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", level, __file__, 1, msg, None, None)

    chatter = WebSocketChatterFilter()
    assert not chatter.filter(record("connection open"))
    assert not chatter.filter(record("connection closed"))
    assert chatter.filter(record("connection closed", logging.WARNING))
    assert chatter.filter(record({"not": "hashable"}))  # never raises into the caller
    assert chatter.filter(record("Started server process [%d]"))
