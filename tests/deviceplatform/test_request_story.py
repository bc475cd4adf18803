"""A request's story (issue 15 item 4): its id comes in with `X-Request-ID` or is made up, goes back
in the response header, is on every line logged while it runs (plain and JSON) and in its error
body's `requestId`, and a task it runs inline keeps it. The worker side is in
tests/bulkops/test_request_id.py, the realtime side in tests/realtime/test_request_id.py."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import redis
from celery.signals import before_task_publish
from django.conf import settings
from django.utils import timezone
from rest_framework.test import APIClient

from bulkops import tasks as bulk_tasks
from deviceplatform.api.exceptions import INFO_URL, error_body
from deviceplatform.logs import (
    REQUEST_ID_HEADER,
    current_request_id,
    logging_config,
    reset_request_id,
    set_request_id,
)
from tests.bulkops.conftest import create_bulk, make_fleet

HEX_ID = re.compile(r"[0-9a-f]{32}")
OPERATIONS = "/devicecontrol/operations"


def our_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.split(".")[0] in {"deviceplatform", "django"}]


def refuse(api: APIClient, **headers: str) -> Any:
    """A POST the server refuses with 422 (no deviceId) after authenticating."""
    return api.post(OPERATIONS, {"c8y_Restart": {}}, format="json", **headers)


@pytest.mark.django_db
def test_a_request_without_an_id_gets_one_in_its_header_log_lines_and_error_body(
    admin_api: APIClient,
    caplog: pytest.LogCaptureFixture,
    row_counts: Callable[[], dict[str, int]],
) -> None:
    caplog.set_level(logging.DEBUG)
    before = row_counts()
    response = refuse(admin_api)
    assert response.status_code == 422
    request_id = response[REQUEST_ID_HEADER]
    assert HEX_ID.fullmatch(request_id)
    body = response.json()
    assert body["requestId"] == request_id
    assert body["info"] == INFO_URL  # still the documentation URL clients expect
    assert body["error"] == "undefined/validationError"
    records = our_records(caplog)
    assert records, "the request logged nothing"
    assert {record.request_id for record in records} == {request_id}
    assert row_counts() == before


@pytest.mark.django_db
def test_a_request_id_sent_by_the_client_is_echoed_logged_and_in_the_error_body(
    admin_api: APIClient,
    anon_api: APIClient,
    caplog: pytest.LogCaptureFixture,
    row_counts: Callable[[], dict[str, int]],
) -> None:
    caplog.set_level(logging.INFO)
    before = row_counts()
    refused = refuse(admin_api, HTTP_X_REQUEST_ID="client-trace:42")
    unauthenticated = anon_api.get(OPERATIONS, HTTP_X_REQUEST_ID="client-trace:43")
    assert (refused.status_code, unauthenticated.status_code) == (422, 401)
    assert refused[REQUEST_ID_HEADER] == refused.json()["requestId"] == "client-trace:42"
    assert unauthenticated[REQUEST_ID_HEADER] == "client-trace:43"
    assert unauthenticated.json()["requestId"] == "client-trace:43"
    ids = [record.request_id for record in our_records(caplog)]
    assert ids == ["client-trace:42", "client-trace:43"]  # the two access lines
    assert row_counts() == before


@pytest.mark.django_db
@pytest.mark.parametrize("given", ["bad id\r\nINFO forged", "x" * 129, "", "ümlaut", "a/b"])
def test_an_unsafe_or_overlong_id_is_replaced_everywhere(
    admin_api: APIClient, caplog: pytest.LogCaptureFixture, given: str
) -> None:
    caplog.set_level(logging.INFO)
    response = refuse(admin_api, HTTP_X_REQUEST_ID=given)
    request_id = response[REQUEST_ID_HEADER]
    assert HEX_ID.fullmatch(request_id)
    assert response.json()["requestId"] == request_id
    assert [record.request_id for record in our_records(caplog)] == [request_id]


@pytest.mark.django_db
def test_a_404_from_djangos_own_handler_carries_the_id(admin_api: APIClient) -> None:
    response = admin_api.get("/no/such/path", HTTP_X_REQUEST_ID="r-404")
    assert response.status_code == 404
    assert response.json()["requestId"] == "r-404"


def test_an_error_body_made_outside_a_request_has_no_request_id() -> None:
    assert current_request_id() is None
    assert error_body(400, "general/badRequest", "Bad request") == {
        "error": "general/badRequest",
        "message": "Bad request",
        "info": INFO_URL,
    }


def test_plain_lines_show_the_request_id_before_the_message() -> None:
    options = dict(logging_config(level="INFO", fmt="plain")["formatters"]["main"])
    factory = options.pop("()")
    assert factory == "deviceplatform.logs.PlainFormatter"
    from deviceplatform.logs import PlainFormatter

    formatter = PlainFormatter(options["format"])
    record = logging.LogRecord(
        "devicecontrol.x", logging.INFO, __file__, 1, "did %s", ("it",), None
    )
    assert formatter.format(record).endswith(" INFO devicecontrol.x did it")
    record.request_id = "abc-1"
    assert formatter.format(record).endswith(" INFO devicecontrol.x [abc-1] did it")


@pytest.mark.django_db
def test_a_task_run_inline_keeps_the_id_of_the_request_that_runs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without a broker (no REDIS_URL) Celery runs tasks eagerly, in the caller's context: the
    task's lines carry the caller's request id, and the task leaves it as it found it."""
    fleet = make_fleet(2)
    # Started a second ago: both children are due when the task runs, however soon that is.
    past = timezone.now() - timedelta(seconds=1)
    create_bulk(fleet.group, now=past, creationRamp=0.01, startDate=past.isoformat())
    caplog.set_level(logging.INFO, logger="bulkops.services")
    token = set_request_id("inline-7")
    try:
        assert bulk_tasks.advance_bulk_operations.apply().get() == 2
        assert current_request_id() == "inline-7"
    finally:
        reset_request_id(token)
    [line] = [r for r in caplog.records if r.getMessage().startswith("Bulk ramp:")]
    assert line.request_id == "inline-7"


@pytest.mark.django_db
def test_a_task_no_request_caused_goes_by_its_task_id(caplog: pytest.LogCaptureFixture) -> None:
    """A beat tick (here run inline, as the embedded scheduler does) logs with its own task id,
    and leaves no id behind."""
    fleet = make_fleet(1)
    now = timezone.now()
    create_bulk(fleet.group, now=now, creationRamp=0.01, startDate=now.isoformat())
    caplog.set_level(logging.INFO, logger="bulkops.services")
    result = bulk_tasks.advance_bulk_operations.apply()
    assert result.get() == 1
    assert current_request_id() is None
    [line] = [r for r in caplog.records if r.getMessage().startswith("Bulk ramp:")]
    assert line.request_id == result.id


def test_a_task_message_carries_the_current_request_id_as_a_header() -> None:
    """`before_task_publish` puts the id in the message's headers (what the worker reads back);
    a message sent outside a request (beat) carries none. Sent to a queue nobody consumes."""
    assert settings.REDIS_URL, "needs the broker: bin/test sets REDIS_URL"
    queue = f"test-request-id-{uuid.uuid4().hex[:12]}"
    sent: list[dict[str, Any]] = []

    def seen(headers: dict[str, Any], **kwargs: Any) -> None:
        sent.append(dict(headers))

    before_task_publish.connect(seen)
    try:
        bulk_tasks.advance_bulk_operations.apply_async(queue=queue)
        token = set_request_id("publish-9")
        try:
            bulk_tasks.advance_bulk_operations.apply_async(queue=queue)
        finally:
            reset_request_id(token)
    finally:
        before_task_publish.disconnect(seen)
        redis.Redis.from_url(settings.REDIS_URL).delete(queue)
    assert "request_id" not in sent[0]
    assert sent[1]["request_id"] == "publish-9"
