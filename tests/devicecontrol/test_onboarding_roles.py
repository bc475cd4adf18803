"""Who may call the onboarding endpoints (every endpoint and method, for an operator, a superuser,
a reader, a device user, the bootstrap login and no login), and the bootstrap login refused on
every other endpoint."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from devicecontrol import services
from deviceplatform.roles import Role
from deviceplatform.services import bootstrap_user_ensure
from inventory.services import managed_object_create
from tests.devicecontrol.conftest import call
from tests.helpers import PASSWORD, assert_error, basic

pytestmark = pytest.mark.django_db

USERS = ("operator", "superuser", "reader", "device", "bootstrap", "anon")
BOOTSTRAP_PASSWORD = "bootstrap-pw"

# (method, path) -> the status each user gets; "ok" is the success status of the endpoint.
MATRIX: dict[tuple[str, str], dict[str, int]] = {
    ("GET", "/devicecontrol/newDeviceRequests"): {
        "operator": 200, "superuser": 200, "reader": 200,
        "device": 403, "bootstrap": 403, "anon": 401,
    },
    ("POST", "/devicecontrol/newDeviceRequests"): {
        "operator": 201, "superuser": 201, "reader": 403,
        "device": 403, "bootstrap": 403, "anon": 401,
    },
    ("GET", "/devicecontrol/newDeviceRequests/m-pending"): {
        "operator": 200, "superuser": 200, "reader": 200,
        "device": 403, "bootstrap": 403, "anon": 401,
    },
    ("PUT", "/devicecontrol/newDeviceRequests/m-pending"): {
        "operator": 200, "superuser": 200, "reader": 403,
        "device": 403, "bootstrap": 403, "anon": 401,
    },
    ("DELETE", "/devicecontrol/newDeviceRequests/m-pending"): {
        "operator": 204, "superuser": 204, "reader": 403,
        "device": 403, "bootstrap": 403, "anon": 401,
    },
    ("POST", "/devicecontrol/deviceCredentials"): {
        "operator": 403, "superuser": 403, "reader": 403,
        "device": 403, "bootstrap": 201, "anon": 401,
    },
    ("POST", "/devicecontrol/bulkNewDeviceRequests"): {
        "operator": 201, "superuser": 201, "reader": 403,
        "device": 403, "bootstrap": 403, "anon": 401,
    },
}  # fmt: skip


@pytest.fixture
def clients(make_user: Callable[..., Any], client_for: Callable[..., APIClient]) -> dict[str, Any]:
    bootstrap_user_ensure(BOOTSTRAP_PASSWORD)
    bootstrap = APIClient()
    bootstrap.credentials(
        HTTP_AUTHORIZATION=basic("management/devicebootstrap", BOOTSTRAP_PASSWORD)
    )
    return {
        "operator": client_for(make_user("operator", [Role.DEVICE_CONTROL_ADMIN])),
        "superuser": client_for(make_user("root", superuser=True)),
        "reader": client_for(make_user("reader", [Role.DEVICE_CONTROL_READ])),
        "device": client_for(make_user("device_old", groups=["devices"])),
        "bootstrap": bootstrap,
        "anon": APIClient(),
    }


def body_for(method: str, path: str) -> dict[str, Any]:
    if path.endswith("/deviceCredentials"):
        return {"id": "m-accepted"}
    if method == "POST":
        return {"id": "m-new"}
    return {"status": "ACCEPTED"}


def send(client: APIClient, method: str, path: str) -> Any:
    if path.endswith("/bulkNewDeviceRequests"):
        upload = SimpleUploadedFile("d.csv", b"ID;CREDENTIALS\nm-bulk;password-1\n")
        return client.post(
            path, {"file": upload}, format="multipart", HTTP_ACCEPT="application/json"
        )
    return call(client, method, path, body_for(method, path), accept="application/json")


@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize(("method", "path"), list(MATRIX))
def test_role_matrix(
    clients: dict[str, Any],
    row_counts: Callable[[], dict[str, int]],
    user: str,
    method: str,
    path: str,
) -> None:
    services.new_device_request_create(device_id="m-pending", owner="operator")
    services.device_credentials_poll(device_id="m-pending", security_token=None)
    services.new_device_request_create(device_id="m-accepted", owner="operator")
    services.device_credentials_poll(device_id="m-accepted", security_token=None)
    services.new_device_request_accept(
        device_id="m-accepted", status="ACCEPTED", accepted_by="operator"
    )
    expected = MATRIX[(method, path)][user]
    before = row_counts()

    response = send(clients[user], method, path)

    if expected >= 400:
        assert_error(response, expected)
        assert row_counts() == before
    else:
        assert response.status_code == expected, response.content[:300]


def test_bootstrap_may_onboard_any_device_but_an_admin_may_not_poll(
    clients: dict[str, Any],
) -> None:
    """The bootstrap role stands alone: a superuser holds every role but that one."""
    services.new_device_request_create(device_id="x-1", owner="operator")
    body = assert_error(
        call(clients["superuser"], "POST", "/devicecontrol/deviceCredentials", {"id": "x-1"}), 403
    )
    assert body["error"] == "security/Forbidden"
    assert services.NewDeviceRequest.objects.get().status == "WAITING_FOR_CONNECTION"


ELSEWHERE = [
    ("GET", "/platform"),
    ("GET", "/tenant/currentTenant"),
    ("GET", "/user/currentUser"),
    ("GET", "/inventory"),
    ("GET", "/inventory/managedObjects"),
    ("POST", "/inventory/managedObjects"),
    ("GET", "/inventory/managedObjects/{id}"),
    ("PUT", "/inventory/managedObjects/{id}"),
    ("DELETE", "/inventory/managedObjects/{id}"),
    ("GET", "/inventory/managedObjects/{id}/childDevices"),
    ("GET", "/identity"),
    ("GET", "/identity/globalIds/{id}/externalIds"),
    ("POST", "/identity/globalIds/{id}/externalIds"),
    ("GET", "/devicecontrol"),
    ("GET", "/devicecontrol/operations"),
    ("POST", "/devicecontrol/operations"),
    ("DELETE", "/devicecontrol/operations"),
    ("GET", "/devicecontrol/bulkoperations"),
    ("POST", "/devicecontrol/bulkoperations"),
]


@pytest.mark.parametrize(("method", "path"), ELSEWHERE)
def test_the_bootstrap_login_is_refused_everywhere_else(
    clients: dict[str, Any], row_counts: Callable[[], dict[str, int]], method: str, path: str
) -> None:
    device = managed_object_create(owner="devicebootstrap", data={"c8y_IsDevice": {}})
    before = row_counts()
    body = {"name": "x", "deviceId": str(device.pk), "type": "t", "externalId": "e"}
    response = call(clients["bootstrap"], method, path.format(id=device.pk), body)
    assert_error(response, 403, "security/Forbidden")
    assert row_counts() == before


@pytest.mark.django_db(transaction=True)  # the realtime views check credentials in a thread
def test_the_bootstrap_login_cannot_handshake(clients: dict[str, Any]) -> None:
    handshake = [
        {
            "channel": "/meta/handshake",
            "version": "1.0",
            "supportedConnectionTypes": ["long-polling"],
            "id": "1",
        }
    ]
    for path in ("/notification/realtime", "/notification/operations"):
        response = clients["bootstrap"].post(
            path, json.dumps(handshake), content_type="application/json"
        )
        [reply] = response.json()
        assert (reply["successful"], reply["error"]) == (False, "403::Handshake denied")
    # The same request with an ordinary login succeeds: the refusal is the bootstrap role's.
    reader = APIClient()
    reader.credentials(HTTP_AUTHORIZATION=basic("t100/reader", PASSWORD))
    reply = reader.post(
        "/notification/realtime", json.dumps(handshake), content_type="application/json"
    ).json()[0]
    assert reply["successful"] is True
