"""Device registration (`/devicecontrol/newDeviceRequests`) and device credentials
(`/devicecontrol/deviceCredentials`): Cumulocity's bootstrap flow, its state machine, its roles and
its refusals, through the REST API with real Basic credentials."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from rest_framework.test import APIClient

from devicecontrol.models import NewDeviceRequest
from deviceplatform.api.authentication import authenticate_credentials
from deviceplatform.models import User
from deviceplatform.roles import Role
from deviceplatform.services import bootstrap_user_ensure
from tests.devicecontrol.conftest import call, ok_json
from tests.helpers import assert_error, basic

pytestmark = pytest.mark.django_db

REQUESTS = "/devicecontrol/newDeviceRequests"
CREDENTIALS = "/devicecontrol/deviceCredentials"
BOOTSTRAP_PASSWORD = "bootstrap-secret"
NO_CREDENTIALS = "devicecontrol/Not Found"
VENDOR = "application/vnd.com.nsn.cumulocity."


@pytest.fixture
def dc_admin(make_user: Callable[..., Any], client_for: Callable[..., APIClient]) -> APIClient:
    return client_for(make_user("operator", [Role.DEVICE_CONTROL_ADMIN]))


def bootstrap_client(login: str = "management/devicebootstrap") -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=basic(login, BOOTSTRAP_PASSWORD))
    return client


@pytest.fixture
def device(db: None) -> APIClient:
    """The device side: the bootstrap login, as Cumulocity's devices send it."""
    bootstrap_user_ensure(BOOTSTRAP_PASSWORD)
    return bootstrap_client()


def request_path(device_id: str) -> str:
    return f"{REQUESTS}/{device_id}"


def register(client: APIClient, device_id: str, **extra: Any) -> Any:
    return ok_json(
        call(client, "POST", REQUESTS, {"id": device_id, **extra}, accept="application/json"),
        201,
    )


def poll(client: APIClient, device_id: str, **extra: Any) -> Any:
    return call(client, "POST", CREDENTIALS, {"id": device_id, **extra}, accept="application/json")


def accept(client: APIClient, device_id: str, **extra: Any) -> Any:
    return call(
        client,
        "PUT",
        request_path(device_id),
        {"status": "ACCEPTED", **extra},
        accept="application/json",
    )


def status_of(device_id: str) -> str:
    return NewDeviceRequest.objects.get(device_id=device_id).status


# --- the state machine ---------------------------------------------------------------------------


def test_register_poll_accept_poll_gives_credentials_once(
    dc_admin: APIClient, device: APIClient
) -> None:
    created = register(dc_admin, "sn-4711")
    assert created["id"] == "sn-4711"
    assert created["status"] == "WAITING_FOR_CONNECTION"
    assert created["owner"] == "operator"
    assert created["tenantId"] == "t100"
    assert created["self"] == "http://testserver/devicecontrol/newDeviceRequests/sn-4711"
    assert created["creationTime"].endswith("Z")

    # Accepting before the device asked is refused, as on Cumulocity.
    body = assert_error(accept(dc_admin, "sn-4711"), 422, "devicecontrol/Invalid Data")
    assert "has not asked for credentials yet" in body["message"]
    assert status_of("sn-4711") == "WAITING_FOR_CONNECTION"

    # The first poll moves the request on; it still answers 404.
    assert_error(poll(device, "sn-4711"), 404, NO_CREDENTIALS)
    assert status_of("sn-4711") == "PENDING_ACCEPTANCE"
    assert NewDeviceRequest.objects.get().last_polled_at is not None
    assert_error(poll(device, "sn-4711"), 404, NO_CREDENTIALS)
    assert status_of("sn-4711") == "PENDING_ACCEPTANCE"

    accepted = ok_json(accept(dc_admin, "sn-4711"))
    assert accepted["status"] == "ACCEPTED"
    assert accepted["acceptedBy"] == "operator"
    assert not User.objects.filter(username="device_sn-4711").exists()  # not before the poll

    response = poll(device, "sn-4711")
    credentials = ok_json(response, 201)
    assert response["Cache-Control"] == "no-store"
    assert set(credentials) == {"id", "self", "tenantId", "username", "password"}
    assert credentials["id"] == "sn-4711"
    assert credentials["tenantId"] == "t100"
    assert credentials["username"] == "device_sn-4711"
    user = User.objects.get(username="device_sn-4711")
    assert list(user.groups.values_list("name", flat=True)) == ["devices"]
    assert user.password != credentials["password"]  # only the hash is stored
    assert authenticate_credentials("device_sn-4711", credentials["password"]) is not None

    # Shown exactly once: the next poll is the same 404 as for an unknown id.
    again = assert_error(poll(device, "sn-4711"), 404, NO_CREDENTIALS)
    unknown = assert_error(poll(device, "never-registered"), 404, NO_CREDENTIALS)
    assert again == unknown
    read = ok_json(call(dc_admin, "GET", request_path("sn-4711")))
    assert read["status"] == "ACCEPTED"
    assert "credentialsIssuedTime" in read
    assert "password" not in str(read)
