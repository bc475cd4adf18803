"""Limits on credential polls: per device id (every poll) and per client address (misses: an id
without a request, a wrong token), with Redis counters (the test runs) and in-process ones, and
an unreachable Redis that lets polls through. Also: a password never reaches a log line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import override_settings
from rest_framework.test import APIClient

from devicecontrol import services
from deviceplatform.api.auth_throttle import MemoryCounters, get_counters
from deviceplatform.services import bootstrap_user_ensure
from tests.helpers import assert_error, basic
from tests.servers import free_port

pytestmark = pytest.mark.django_db

CREDENTIALS = "/devicecontrol/deviceCredentials"


@pytest.fixture(params=["redis", "memory"])
def limits(request: Any, settings: Any) -> Iterator[Any]:
    """Small limits on fresh counters: Redis under this test's own prefix, or this process's
    memory (no REDIS_URL)."""
    if request.param == "memory":
        settings.REDIS_URL = ""
    else:
        assert settings.REDIS_URL, "the Redis-shared limits need the real Redis: set REDIS_URL"
    settings.AUTH_FAILURE_PREFIX = f"{settings.AUTH_FAILURE_PREFIX}:{request.node.name}"
    settings.DEVICE_CREDENTIALS_POLLS_PER_ID = 3
    settings.DEVICE_CREDENTIALS_MISSES_PER_ADDRESS = 2
    settings.DEVICE_CREDENTIALS_WINDOW_SECONDS = 60
    counters = get_counters()
    assert isinstance(counters, MemoryCounters) == (request.param == "memory")
    counters.clear()
    yield settings
    counters.clear()


@pytest.fixture
def device(db: None) -> APIClient:
    bootstrap_user_ensure("bs-pw")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=basic("management/devicebootstrap", "bs-pw"))
    return client


def poll(client: APIClient, device_id: str, address: str = "192.0.2.10", **body: Any) -> Any:
    return client.post(
        CREDENTIALS,
        json.dumps({"id": device_id, **body}),
        content_type="application/json",
        HTTP_ACCEPT="application/json",
        REMOTE_ADDR=address,
    )


def test_polls_per_id_are_limited(limits: Any, device: APIClient) -> None:
    services.new_device_request_create(device_id="lim-1", owner="op")
    services.new_device_request_create(device_id="lim-2", owner="op")

    statuses = [poll(device, "lim-1").status_code for _ in range(3)]
    refused = poll(device, "LIM-1", address="198.51.100.1")  # the id counts, not the address

    assert statuses == [404, 404, 404]
    body = assert_error(refused, 429, "security/tooManyRequests")
    assert "Too many device credential requests" in body["message"]
    assert 1 <= int(refused["Retry-After"]) <= 60
    assert poll(device, "lim-2").status_code == 404  # another id is not affected

    # A refused poll does nothing: an accepted request keeps its credentials for later.
    services.new_device_request_accept(device_id="lim-1", status="ACCEPTED", accepted_by="op")
    assert_error(poll(device, "lim-1"), 429)
    assert services.NewDeviceRequest.objects.get(device_id="lim-1").credentials_issued_at is None


def test_misses_per_address_are_limited(limits: Any, device: APIClient) -> None:
    services.new_device_request_create(device_id="tok", owner="op", security_token="right")
    services.new_device_request_create(device_id="plain", owner="op")

    # Polls for a registered id without a token are no misses, however many.
    assert [poll(device, "plain").status_code for _ in range(2)] == [404, 404]
    assert poll(device, "unknown-1").status_code == 404  # miss 1
    assert poll(device, "tok", securityToken="wrong").status_code == 404  # miss 2
    refused = poll(device, "plain")  # the address used up its misses: even a good id waits
    assert_error(refused, 429, "security/tooManyRequests")
    assert int(refused["Retry-After"]) >= 1
    assert_error(poll(device, "tok", securityToken="right"), 429)
    # Another address is not affected.
    assert poll(device, "tok", address="198.51.100.7", securityToken="right").status_code == 404
    assert services.NewDeviceRequest.objects.get(device_id="tok").status == "PENDING_ACCEPTANCE"


def test_zero_turns_the_limits_off(limits: Any, device: APIClient) -> None:
    limits.DEVICE_CREDENTIALS_POLLS_PER_ID = 0
    limits.DEVICE_CREDENTIALS_MISSES_PER_ADDRESS = 0
    assert {poll(device, "nobody").status_code for _ in range(6)} == {404}


def test_an_unreachable_redis_lets_polls_through(
    settings: Any, device: APIClient, caplog: pytest.LogCaptureFixture
) -> None:
    settings.DEVICE_CREDENTIALS_POLLS_PER_ID = 1
    settings.DEVICE_CREDENTIALS_MISSES_PER_ADDRESS = 1
    services.new_device_request_create(device_id="open-1", owner="op")
    services.device_credentials_poll(device_id="open-1", security_token=None)
    services.new_device_request_accept(device_id="open-1", status="ACCEPTED", accepted_by="op")

    with override_settings(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"):  # nobody listens
        misses = [poll(device, "unknown").status_code for _ in range(3)]
        issued = poll(device, "open-1")

    assert misses == [404, 404, 404]
    assert issued.status_code == 201
    assert "poll limiter unavailable" in caplog.text


def test_the_password_never_reaches_a_log_line(
    settings: Any, device: APIClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Every record of every logger, at every level, through a poll that issues credentials and
    one refused because a person holds the device user's name."""
    from deviceplatform.services import user_upsert

    services.new_device_request_create(device_id="quiet", owner="op")
    services.device_credentials_poll(device_id="quiet", security_token=None)
    services.new_device_request_accept(device_id="quiet", status="ACCEPTED", accepted_by="op")
    services.new_device_request_create(device_id="taken", owner="op")
    services.device_credentials_poll(device_id="taken", security_token=None)
    services.new_device_request_accept(device_id="taken", status="ACCEPTED", accepted_by="op")
    user_upsert(username="device_taken", password="a-person", roles=["ROLE_INVENTORY_READ"])

    with caplog.at_level(logging.DEBUG):
        issued = poll(device, "quiet")
        refused = poll(device, "taken")

    password = issued.json()["password"]
    assert refused.status_code == 404
    assert caplog.records
    assert "POST /devicecontrol/deviceCredentials 201" in caplog.text  # the access log line
    assert "device_taken is not a device user" in caplog.text
    for record in caplog.records:
        assert password not in record.getMessage()
        assert password not in str(record.__dict__)
